"""Uncertainty sources for guided scoring, built from the estimators of
:mod:`anomorph.uncertainty` and normalised on healthy val slices."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..uncertainty import HealthyNormaliser, UncertaintyEstimator, build_estimator


class WarpedResidualEstimator(UncertaintyEstimator):
    """|x − x̃| of the *unguided* registration, in intensity units. Only used to fit healthy
    statistics for the iterative strategy's second round (never as a first-round u: it
    depends on φ)."""

    name = "warped_residual"
    units = "intensity"
    default_scale = 0.1

    def estimate(self, network: nn.Module, images: torch.Tensor, generator: torch.Generator):
        out = network(images)
        return (images - out.warped).abs(), {"reconstruction": out.reconstruction}


def uncertainty_source(estimator: str, network: nn.Module, healthy_images: torch.Tensor,
                       healthy_brains: torch.Tensor, normalise: bool = True, seed: int = 0,
                       **options) -> tuple[Callable, object]:
    """(u function for :class:`GuidedScorer`, the fitted estimator/normaliser).

    With ``normalise`` the estimator's raw map is z-scored per pixel against its statistics on
    the given healthy slices (SPEC §3: raw uncertainty concentrates on edges)."""
    base = build_estimator(estimator, seed=seed, **options)
    model = HealthyNormaliser.fit(base, network, healthy_images, healthy_brains) if normalise else base

    def source(net: nn.Module, images: torch.Tensor, brains: torch.Tensor) -> torch.Tensor:
        return model(net, images, brains).uncertainty

    return source, model


def residual_normaliser(network: nn.Module, healthy_images: torch.Tensor, healthy_brains: torch.Tensor
                        ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """For the iterative strategy: maps a residual |x − x̃| to u in [0, 1] by its per-pixel
    z-score against the unguided registration's residual on healthy slices."""
    normaliser = HealthyNormaliser.fit(WarpedResidualEstimator(), network, healthy_images, healthy_brains)

    def normalise(residual: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        mean, std = normaliser.statistics(network, images, {})
        return normaliser.squash((residual - mean) / std)

    return normalise
