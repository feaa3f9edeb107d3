"""Uncertainty evaluation for ``anomorph evaluate --uncertainty NAME`` (SPEC §4).

Per (run, estimator): the pixel AUROC / AUPRC of u alone against the lesion masks over the
brain pixels of all test slices (with the ``by_lesion_type`` breakdown), the fraction of u mass
on image edges of the healthy (label 0) test slices (lower is better; the edge area fraction is
what a uniform u scores), and the wall time relative to one plain forward pass.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..uncertainty.base import UncertaintyEstimator
from ..uncertainty.estimators import build_estimator
from ..uncertainty.metrics import edge_mass_terms, relative_cost
from ..uncertainty.normalise import HealthyNormaliser

EDGE_QUANTILE = 0.9


def build_for_run(name: str, run_dir: str | Path | None, options: Mapping[str, Any] | None = None
                  ) -> UncertaintyEstimator:
    """``build_estimator(name, **options)``; the ``ensemble`` estimator gets ``run_dir``."""
    from ..scoring.sources import build_estimator_for_run

    return build_estimator_for_run(name, run_dir, options)


def fit_normaliser(estimator: UncertaintyEstimator, network: nn.Module, data: Any, mode: str = "pixel",
                   batch_size: int = 32, **options: Any) -> tuple[HealthyNormaliser | None, str | None]:
    """Fit a :class:`HealthyNormaliser` on the healthy (label 0) val slices of ``data``
    (an ``EvaluationData``); returns (normaliser, None) or (None, reason)."""
    if data.val is None:
        return None, "no val split to fit the healthy normalisation on"
    healthy = data.val.labels == 0
    if not bool(healthy.any()):
        return None, "no healthy val slices to fit the healthy normalisation on"
    import inspect

    from ..errors import ConfigError

    accepted = set(inspect.signature(HealthyNormaliser.fit).parameters) - {"cls", "estimator", "network",
                                                                           "healthy_images", "brain_masks"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"unknown normalise option(s) {unknown}; accepted: {sorted(accepted)}")
    normaliser = HealthyNormaliser.fit(estimator, network, data.val.images[healthy], data.val.brain_masks[healthy],
                                       mode=mode, batch_size=batch_size, **options)
    return normaliser, None


def uncertainty_summary(estimator: UncertaintyEstimator | HealthyNormaliser, network: nn.Module, data: Any,
                        batch_size: int = 32, device: str | torch.device = "cpu",
                        row_metrics: Mapping[str, Any] | None = None, edge_quantile: float = EDGE_QUANTILE,
                        cost_repeats: int = 3) -> dict[str, Any]:
    """Uncertainty metrics of one estimator on ``data.test`` (an ``EvaluationData``).

    ``row_metrics``: the metrics of the method row that was scored with this estimator's u (its
    ``uncertainty_auroc`` / ``uncertainty_auprc`` are reused, and only the healthy test slices are
    run again for the edge statistics); None runs the estimator over every test slice.
    """
    from .metrics import MetricAccumulator

    test = data.test
    device = torch.device(device)
    need_auroc = row_metrics is None or "uncertainty_auroc" not in row_metrics
    accumulator = MetricAccumulator(size_edges=data.size_edges) if need_auroc else None
    edge_mass = total_mass = 0.0
    edge_pixels = brain_pixels = 0
    healthy = (test.labels == 0).numpy()
    for start in range(0, len(test), batch_size):
        s = slice(start, min(start + batch_size, len(test)))
        rows = range(s.start, s.stop)
        if not need_auroc and not healthy[s].any():
            continue
        images, brains = test.images[s], test.brain_masks[s]
        if need_auroc:
            u = estimator(network, images.to(device), brains.to(device)).uncertainty.cpu()
            types = [row.lesion_type for row, _, _ in test.meta[s]]
            accumulator.update(u.numpy(), images.numpy(), test.masks[s].numpy(), brains.numpy(),
                               test.labels[s].numpy(), types, uncertainty=u.numpy())
            keep = torch.from_numpy(healthy[s])
            u, images, brains = u[keep], images[keep], brains[keep]
        else:
            keep = torch.tensor([bool(healthy[i]) for i in rows])
            images, brains = images[keep], brains[keep]
            u = estimator(network, images.to(device), brains.to(device)).uncertainty.cpu()
        if images.shape[0]:
            terms = edge_mass_terms(u, images, brains, edge_quantile)
            edge_mass, total_mass = edge_mass + terms[0], total_mass + terms[1]
            edge_pixels, brain_pixels = edge_pixels + terms[2], brain_pixels + terms[3]
    metrics = accumulator.compute() if accumulator is not None else dict(row_metrics or {})
    inner = getattr(estimator, "estimator", estimator)
    summary: dict[str, Any] = {
        "uncertainty_auroc": metrics.get("uncertainty_auroc", math.nan),
        "uncertainty_auprc": metrics.get("uncertainty_auprc", math.nan),
        "by_lesion_type": {k: {"uncertainty_auroc": v.get("uncertainty_auroc", math.nan),
                               "uncertainty_auprc": v.get("uncertainty_auprc", math.nan)}
                           for k, v in metrics.get("by_lesion_type", {}).items()},
        "edge_mass_fraction": edge_mass / total_mass if total_mass > 0 else math.nan,
        "edge_area_fraction": edge_pixels / brain_pixels if brain_pixels > 0 else math.nan,
        "edge_quantile": edge_quantile,
        "n_healthy_test_slices": int(healthy.sum()),
        "normalised": isinstance(estimator, HealthyNormaliser),
        "raw_units": getattr(inner, "units", ""),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in estimator.options().items()},
    }
    if isinstance(estimator, HealthyNormaliser):
        summary["normaliser_mode"] = estimator.mode
        summary["n_normaliser_slices"] = estimator.n_fit
    cost_images = test.images[:batch_size].to(device)
    summary["relative_cost"] = relative_cost(estimator, network, cost_images,
                                             test.brain_masks[:batch_size].to(device), repeats=cost_repeats)
    summary["relative_cost_batch"] = int(cost_images.shape[0])
    return summary


def format_uncertainty_table(section: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Fixed-width table: run, estimator, u AUROC/AUPRC, edge mass (healthy) vs edge area, cost."""
    headers = ("unc.AUROC", "unc.AUPRC", "edge mass", "edge area", "rel.cost", "normalised")
    rows = [(run, name, values) for run, estimators in section.items() for name, values in estimators.items()]
    width = max([len("run / estimator")] + [len(f"{run} / {name}") for run, name, _ in rows])

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        if isinstance(value, bool):
            return "yes" if value else "no"
        return format(float(value), ".4f") if not isinstance(value, str) else value

    lines = ["run / estimator".ljust(width) + "".join(f"{h:>12}" for h in headers)]
    for run, name, v in rows:
        normalised = v.get("normaliser_mode", "yes") if v.get("normalised") else "no"
        values = (v.get("uncertainty_auroc"), v.get("uncertainty_auprc"), v.get("edge_mass_fraction"),
                  v.get("edge_area_fraction"), v.get("relative_cost"), normalised)
        lines.append(f"{run} / {name}".ljust(width) + "".join(f"{cell(x):>12}" for x in values))
    return "\n".join(lines)


def parse_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["mc_dropout.passes=8", "tta.flip=false"]`` → ``{"mc_dropout": {"passes": 8}, ...}``
    (values parsed as YAML). ``normalise.KEY=VALUE`` sets HealthyNormaliser.fit options."""
    import yaml

    from ..errors import ConfigError

    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, option = key.strip().partition(".")
        if not sep or not dot or not name or not option:
            raise ConfigError(f"--uncertainty-option {item!r}: expected ESTIMATOR.KEY=VALUE, e.g. mc_dropout.passes=8")
        try:
            options.setdefault(name, {})[option] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--uncertainty-option {item!r}: value is not valid YAML ({err})") from err
    return options
