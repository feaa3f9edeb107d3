"""Guidance signals for guided scoring, built from the estimators of :mod:`anomorph.uncertainty`
and normalised on healthy val slices (the *calibration* subjects, disjoint from those that
choose thresholds; see :meth:`anomorph.evaluation.evaluate.EvaluationData.calibration`)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..uncertainty import HealthyNormaliser, UncertaintyEstimator, build_estimator
from .scorer import GuidanceSignal


class WarpedResidualEstimator(UncertaintyEstimator):
    """|x − x̃| of the *unguided* registration, in intensity units. Only used to fit healthy
    statistics for the iterative strategy's later rounds (never as a first-round u: it
    depends on φ)."""

    name = "warped_residual"
    units = "intensity"
    default_scale = 0.1

    def estimate(self, network: nn.Module, images: torch.Tensor, generator: torch.Generator):
        out = network(images)
        return (images - out.warped).abs(), {"reconstruction": out.reconstruction}


def uncertainty_source(estimator: str, network: nn.Module, healthy_images: torch.Tensor,
                       healthy_brains: torch.Tensor, normalise: bool = True, seed: int = 0,
                       **options) -> tuple[Callable[[nn.Module, torch.Tensor, torch.Tensor], GuidanceSignal], object]:
    """(signal function for :class:`~.scorer.GuidedScorer`, the fitted estimator/normaliser).

    With ``normalise`` the estimator's raw map is z-scored per pixel against its statistics on
    the given healthy slices (SPEC §3: raw uncertainty concentrates on edges) and the mask is cut
    from that z-score (``guidance.threshold`` in healthy standard deviations); without it the
    mask is cut from u itself (threshold in [0, 1])."""
    base = build_estimator(estimator, seed=seed, **options)
    model = HealthyNormaliser.fit(base, network, healthy_images, healthy_brains) if normalise else base

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
