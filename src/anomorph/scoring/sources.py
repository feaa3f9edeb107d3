"""Guidance signals for guided scoring, built from the estimators of :mod:`anomorph.uncertainty`
and normalised on healthy val slices (the *calibration* subjects, disjoint from those that
choose thresholds; see :meth:`anomorph.evaluation.evaluate.EvaluationData.calibration`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..runs import is_ensemble
from ..uncertainty import HealthyNormaliser, UncertaintyEstimator, build_estimator, parse_combination
from ..uncertainty.estimators import WarpedResidualEstimator
from .strategies import GuidanceSignal


def signal_function(model, normalise: bool) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], GuidanceSignal]:
    """The guidance signal of an estimator or a fitted :class:`HealthyNormaliser`: u, and the
    score the mask is cut from (the healthy z-score when ``normalise``, else u)."""

    def source(net: nn.Module, images: torch.Tensor, brains: torch.Tensor) -> GuidanceSignal:
        out = model(net, images, brains)
        start = None
        if out.extras.get("velocity") is not None and out.extras.get("reconstruction") is not None:
            start = (out.extras["reconstruction"], out.extras["velocity"])  # the estimator's unguided pass
        return GuidanceSignal(out.uncertainty, out.extras["z"] if normalise else out.uncertainty, start)

    return source


def uncertainty_source(estimator: str | UncertaintyEstimator, network: nn.Module, healthy_images: torch.Tensor,
                       healthy_brains: torch.Tensor, normalise: bool = True, seed: int = 0,
                       mode: str = "pixel", run_dir: str | Path | None = None,
                       **options) -> tuple[Callable[[nn.Module, torch.Tensor, torch.Tensor], GuidanceSignal], object]:
    """(signal function for :class:`~.strategies.GuidedScorer`, the fitted estimator/normaliser).

    With ``normalise`` the estimator's raw map is z-scored per pixel against its statistics on
    the given healthy slices (SPEC §3: raw uncertainty concentrates on edges) and the mask is cut
    from that z-score (``guidance.threshold`` in healthy standard deviations); without it the
    mask is cut from u itself (threshold in [0, 1]). ``estimator``: a name (built with
    ``seed`` and ``options``) or an estimator instance. ``mode``: the normaliser's "pixel" (same
    model-grid pixel) or "tissue" (same intensity × gradient bin of x̂) statistics. ``run_dir``:
    the trained run, for estimators that read files of it (``ensemble``, ``noncorrespondence``)."""
    base = (build_estimator_for_run(estimator, run_dir, {"seed": seed, **options}) if isinstance(estimator, str)
            else estimator)
    model = HealthyNormaliser.fit(base, network, healthy_images, healthy_brains, mode=mode) if normalise else base
    return signal_function(model, normalise), model


def fit_residual_statistics(network: nn.Module, healthy_images: torch.Tensor, healthy_brains: torch.Tensor
                            ) -> HealthyNormaliser:
    """Healthy statistics of the unguided registration's residual |x − x̃| (iterative strategy)."""
    return HealthyNormaliser.fit(WarpedResidualEstimator(), network, healthy_images, healthy_brains)


def residual_normaliser_from(normaliser: HealthyNormaliser, network: nn.Module
                             ) -> Callable[[torch.Tensor, torch.Tensor], GuidanceSignal]:
    """A registered residual → (u = squash(z), z) against fitted residual statistics."""

    def normalise(residual: torch.Tensor, images: torch.Tensor) -> GuidanceSignal:
        mean, std = normaliser.statistics(network, images, {})
        z = (residual - mean) / std
        return GuidanceSignal(normaliser.squash(z), z)

    return normalise


def residual_normaliser(network: nn.Module, healthy_images: torch.Tensor, healthy_brains: torch.Tensor
                        ) -> Callable[[torch.Tensor, torch.Tensor], GuidanceSignal]:
    """For the iterative strategy: a registered residual |x − x̃| → its per-pixel z-score against
    the unguided registration's residual on healthy slices (score) and u = squash(z)."""
    return residual_normaliser_from(fit_residual_statistics(network, healthy_images, healthy_brains), network)


def build_estimator_for_run(name: str, run_dir: str | Path | None, options: Mapping[str, Any] | None = None
                            ) -> UncertaintyEstimator:
    """``build_estimator(name, **options)``; the ``ensemble`` and ``noncorrespondence``
    estimators get ``run_dir`` (the ensemble directory; the run holding the head), also as parts
    of a combination ``RULE(a,b)``."""
    options = dict(options or {})
    combination = parse_combination(name)
    parts = [name] if combination is None else combination[1]
    if (combination is not None or name == "noncorrespondence") and "head" not in options and run_dir is not None:
        options["run_dir"] = str(run_dir)  # the head lives in the run: never a stale saved path
    if "ensemble" in parts and "members" not in options:
        run = options.get("run_dir", run_dir)
        if run is None or not is_ensemble(run):
            raise ConfigError(f"the ensemble estimator needs an ensemble run directory (trained with "
                              f"`anomorph fit --ensemble K`); {run} has no ensemble.yaml")
        options["run_dir"] = str(run)
    return build_estimator(name, **options)
