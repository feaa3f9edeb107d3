"""Guidance signals for guided scoring, built from the estimators of :mod:`anomorph.uncertainty`
and normalised on healthy val slices (the *calibration* subjects, disjoint from those that
choose thresholds; see :meth:`anomorph.evaluation.evaluate.EvaluationData.calibration`)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..uncertainty import HealthyNormaliser, build_estimator
from ..uncertainty.estimators import WarpedResidualEstimator
from .scorer import GuidanceSignal


def uncertainty_source(estimator: str, network: nn.Module, healthy_images: torch.Tensor,
                       healthy_brains: torch.Tensor, normalise: bool = True, seed: int = 0,
                       mode: str = "pixel", **options) -> tuple[Callable[[nn.Module, torch.Tensor, torch.Tensor], GuidanceSignal], object]:
    """(signal function for :class:`~.scorer.GuidedScorer`, the fitted estimator/normaliser).

    With ``normalise`` the estimator's raw map is z-scored per pixel against its statistics on
    the given healthy slices (SPEC §3: raw uncertainty concentrates on edges) and the mask is cut
    from that z-score (``guidance.threshold`` in healthy standard deviations); without it the
    mask is cut from u itself (threshold in [0, 1]). ``mode``: the normaliser's "pixel" (same
    model-grid pixel) or "tissue" (same intensity × gradient bin of x̂) statistics."""
    base = build_estimator(estimator, seed=seed, **options)
    model = HealthyNormaliser.fit(base, network, healthy_images, healthy_brains, mode=mode) if normalise else base

    def source(net: nn.Module, images: torch.Tensor, brains: torch.Tensor) -> GuidanceSignal:
        out = model(net, images, brains)
        return GuidanceSignal(out.uncertainty, out.extras["z"] if normalise else out.uncertainty)

    return source, model


def residual_normaliser(network: nn.Module, healthy_images: torch.Tensor, healthy_brains: torch.Tensor
                        ) -> Callable[[torch.Tensor, torch.Tensor], GuidanceSignal]:
    """For the iterative strategy: a registered residual |x − x̃| → its per-pixel z-score against
    the unguided registration's residual on healthy slices (score) and u = squash(z)."""
    normaliser = HealthyNormaliser.fit(WarpedResidualEstimator(), network, healthy_images, healthy_brains)

    def normalise(residual: torch.Tensor, images: torch.Tensor) -> GuidanceSignal:
        mean, std = normaliser.statistics(network, images, {})
        z = (residual - mean) / std
        return GuidanceSignal(normaliser.squash(z), z)

    return normalise
