"""How good is each estimator as the guidance signal u? Measured on the **val** split.

For every estimator spec of ``config.uncertainty_quality`` (``{name, options, mode}``), on the
selection seed's run of the reference deformable method (the val-chosen one):

* the healthy normaliser is fitted on the val *calibration* subjects (as the guided rows do);
* on the other val subjects: pixel AUROC and AUPRC of z (rank-equal to u) against the lesion
  masks, overall and per lesion type, over brain pixels;
* the healthy false-alarm rate: the fraction of brain pixels of the healthy (non-calibration)
  val subjects with z ≥ τ, τ = the val-chosen gating threshold (m = 1 there);
* the detection result it gives: val pixel AUPRC of the gating strategy with this estimator and
  the val-chosen gating values.

Output: ``<output_dir>/<dataset>/uncertainty/quality.csv`` and ``quality.md`` and
``<dataset>/figures/uncertainty_panels.png`` (u of every estimator beside one val lesion per
kind). Reused when ``quality.csv`` exists.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import atomic_write
from ..evaluation.metrics import pixel_auprc, pixel_auroc
from ..reporting.figures import plt, save_figure


def spec_label(spec: dict[str, Any]) -> str:
    options = ",".join(f"{k}={v}" for k, v in sorted((spec.get("options") or {}).items()))
    mode = spec.get("mode", "pixel")
    suffix = {"pixel": "", "none": " (raw u)"}.get(mode, f" ({mode})")
    return spec["name"] + (f"[{options}]" if options else "") + suffix


def _safe(function, scores, labels) -> float | None:
    if labels.all() or not labels.any():
        return None
    value = float(function(scores, labels))
    return None if math.isnan(value) else value


def uncertainty_quality(config, dataset, chosen: dict[str, Any]) -> Path:
    from ..evaluation.evaluate import EvaluationData
    from ..training import load_run
    from ..training.datamodule import slice_config
    from .runner import _log, ensure_dataset

    from .runner import ensure_head

    out = Path(config.output_dir) / dataset.name / "uncertainty"
    reference = config.reference
    run_dir = chosen.get("runs", {}).get(reference)
    if run_dir is None:
        raise ValueError(f"uncertainty quality needs the val search's run of {reference!r}")
    if (out / "quality.csv").is_file() and (out / "quality.json").is_file():
        saved = json.loads((out / "quality.json").read_text())
        if saved.get("specs") == config.uncertainty_quality and saved.get("run") == str(run_dir) and \
                saved.get("gating") == _gating_choices(chosen):
            return out / "quality.csv"
        _log("uncertainty quality: the estimator list or the val choices changed; measuring again")
    ensure_head(config, reference, Path(run_dir))
    network, run_config = load_run(run_dir)
    manifest = ensure_dataset(dataset, chosen["seed"])
    data = EvaluationData.load(manifest, slice_config(run_config.data), config.calibration_fraction)
    guidance, raw_guidance = gating_guidance(run_config, chosen)
    tau = guidance.threshold
    rows, maps = quality_rows(config.uncertainty_quality, network, run_config, run_dir, data, guidance,
                              raw_guidance, chosen["seed"], config.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "quality.md", lambda tmp: Path(tmp).write_text(
        quality_markdown(rows, tau, chosen, raw_guidance.threshold)))
    quality_panels(data.val, maps, Path(config.output_dir) / dataset.name / "figures" / "uncertainty_panels.png")
    atomic_write(out / "quality.json", lambda tmp: Path(tmp).write_text(json.dumps(
        {"threshold": tau, "seed": chosen["seed"], "run": str(run_dir), "specs": config.uncertainty_quality,
         "gating": _gating_choices(chosen)}, indent=2)))
    return atomic_write(out / "quality.csv", lambda tmp: Path(tmp).write_text(quality_csv(rows)))


def quality_csv(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`quality_rows` as CSV text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["estimator", "group", "u_auroc", "u_auprc", "healthy_false_alarm",
                                                "gating_val_auprc"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def gating_guidance(run_config, chosen: dict[str, Any]):
    """``(guidance, raw_guidance)``: the run's guidance settings with the val-chosen values of
    ``gating`` (for healthy-normalised specs) and of ``gating_head`` (for ``mode: none`` specs,
    whose threshold is on u itself); the chosen estimator is dropped (each spec brings its own)."""
    gating = dict(chosen.get("guidance", {}).get("gating", {}))
    gating.pop("estimator", None)
    guidance = dataclasses.replace(run_config.guidance, **gating)
    raw_values = dict(chosen.get("guidance", {}).get(RAW_GATING, {}))
    raw_values.pop("estimator", None)
    raw_guidance = dataclasses.replace(run_config.guidance, **{"threshold": 0.5, "softness": 0.2, **raw_values,
                                                               "normalise": False})
    return guidance, raw_guidance


def quality_rows(specs: list[dict[str, Any]], network, run_config, run_dir, data, guidance, raw_guidance,
                 seed: int, batch_size: int) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The rows of the u-quality table for ``specs`` on ``network`` (the run ``run_dir``) and the
    u maps of the val slices, ``{label: (N, 1, H, W)}``. ``data``: an :class:`EvaluationData` with
    ``calibration`` (the healthy statistics) and ``val`` (the metrics); ``guidance`` /
    ``raw_guidance``: the gating settings of normalised / ``mode: none`` specs
    (:func:`gating_guidance`). One ``overall`` row per spec (u AUROC/AUPRC, healthy false-alarm
    rate at the gating threshold, gating val pixel AUPRC), then one row per lesion kind."""
    from ..evaluation.evaluate import EvaluationData, evaluate_scorer
    from ..scoring.strategies import GuidedScorer
    from .runner import _log

    val = data.val
    healthy_images, healthy_brains = data.healthy_reference()
    brains = val.brain_masks.numpy() > 0
    lesions = val.masks.numpy() > 0
    subject_healthy = {}
    for row, _, label in val.meta:
        subject_healthy[row.subject] = subject_healthy.get(row.subject, True) and not label
    slice_healthy = np.array([subject_healthy[row.subject] for row, _, _ in val.meta])
    kinds = np.array([row.lesion_type or "healthy" for row, _, _ in val.meta], dtype=object)
    on_val = EvaluationData(data.manifest, data.config, None, val, None, [], data.calibration)
    rows, maps = [], {}
    for spec in specs:
        label = spec_label(spec)
        _log(f"uncertainty quality: {label}")
        normalise = spec.get("mode", "pixel") != "none"
        spec_guidance = guidance if normalise else raw_guidance
        source = spec_source(spec, network, healthy_images, healthy_brains, seed, run_dir)
        z_parts, u_parts = [], []
        for start in range(0, len(val), batch_size):
            s = slice(start, min(start + batch_size, len(val)))
            signal = source(network, val.images[s], val.brain_masks[s])
            z_parts.append(signal.score.numpy())
            u_parts.append(signal.uncertainty.numpy())
        z = np.nan_to_num(np.concatenate(z_parts), nan=0.0, posinf=1e6, neginf=-1e6)
        maps[label] = np.concatenate(u_parts)
        row: dict[str, Any] = {"estimator": label, "group": "overall",
                               "u_auroc": _safe(pixel_auroc, z[brains], lesions[brains]),
                               "u_auprc": _safe(pixel_auprc, z[brains], lesions[brains])}
        healthy_pixels = brains & slice_healthy[:, None, None, None]
        row["healthy_false_alarm"] = (float((z[healthy_pixels] >= spec_guidance.threshold).mean())
                                      if healthy_pixels.any() else None)
        scorer = GuidedScorer(network, run_config, "gating", source, guidance=spec_guidance, name=label)
        row["gating_val_auprc"] = evaluate_scorer(scorer, on_val, batch_size).metrics.get("pixel_auprc")
        rows.append(row)
        for kind in sorted(set(kinds) - {"healthy"}):
            inside = brains & ((kinds == kind) | slice_healthy)[:, None, None, None]
            rows.append({"estimator": label, "group": kind, "u_auroc": _safe(pixel_auroc, z[inside], lesions[inside]),
                         "u_auprc": _safe(pixel_auprc, z[inside], lesions[inside])})
    return rows, maps


def spec_source(spec: dict[str, Any], network, healthy_images, healthy_brains, seed: int, run_dir: str | Path):
    """The guidance source of one ``uncertainty_quality`` spec on the scored ``network`` (the run
    ``run_dir``). ``options.run_dir``, when given, is the estimator's own directory — the
    ``ensemble`` estimator's ensemble (``anomorph fit --ensemble K``), trained on the same data —
    and replaces the scored run's directory for the estimator only."""
    from ..scoring.sources import uncertainty_source

    options = dict(spec.get("options") or {})
    estimator_dir = options.pop("run_dir", run_dir)
    normalise = spec.get("mode", "pixel") != "none"
    source, _ = uncertainty_source(spec["name"], network, healthy_images, healthy_brains, normalise, seed,
                                   spec.get("mode", "pixel") if normalise else "pixel", estimator_dir, **options)
    return source


RAW_GATING = "gating_head"  # the benchmark method whose val-chosen values gate with a raw (unnormalised) u


def _gating_choices(chosen: dict[str, Any]) -> dict[str, Any]:
    guidance = chosen.get("guidance", {})
    return {"gating": guidance.get("gating"), RAW_GATING: guidance.get(RAW_GATING)}


def quality_markdown(rows: list[dict[str, Any]], tau: float, chosen: dict[str, Any], raw_tau: float = 0.5) -> str:
    def cell(value: Any) -> str:
        return "—" if value is None else f"{value:.3f}"

    kinds = list(dict.fromkeys(r["group"] for r in rows if r["group"] != "overall"))
    header = ["estimator (healthy-normalised)", "u AUROC", "u AUPRC", f"healthy false alarms (z ≥ {tau:g})",
              "gating val AUPRC"] + [f"u AUROC / AUPRC: {k}" for k in kinds]
    lines = [f"Val split of seed {chosen['seed']} (normalisers fitted on the calibration subjects; metrics on the "
             "other val subjects; per kind: that kind's lesion subjects with the healthy ones; rows marked "
             f"(raw u) are not normalised: their false alarms count u ≥ {raw_tau:g} and they gate with the "
             f"val-chosen values of `{RAW_GATING}`)"
             + ("" if "gating" in chosen.get("guidance", {}) else
                "; this study has no `gating` row, so the false alarms and the gating column use the run "
                "config's gating values, chosen by nobody") + "\n",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        if r["group"] != "overall":
            continue
        per_kind = {x["group"]: x for x in rows if x["estimator"] == r["estimator"] and x["group"] != "overall"}
        cells = [r["estimator"], cell(r["u_auroc"]), cell(r["u_auprc"]), cell(r["healthy_false_alarm"]),
                 cell(r["gating_val_auprc"])]
        cells += [f"{cell(per_kind[k]['u_auroc'])} / {cell(per_kind[k]['u_auprc'])}" if k in per_kind else "—"
                  for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def quality_panels(val, maps: dict[str, np.ndarray], path: Path) -> Path:
    """A figure of u of every estimator (``maps`` from :func:`quality_rows`) beside the input, on
    the val slice with the largest lesion of each kind (cyan: the lesion outline)."""
    lesions = val.masks.numpy() > 0
    kinds = np.array([row.lesion_type or "healthy" for row, _, _ in val.meta], dtype=object)
    counts = lesions.reshape(len(lesions), -1).sum(1)
    picks = []
    for kind in sorted(set(kinds) - {"healthy"}):
        candidates = np.flatnonzero((kinds == kind) & (counts > 0))
        if candidates.size:
            picks.append(int(candidates[np.argmax(counts[candidates])]))
    columns = ["input x"] + list(maps)
    fig, axes = plt.subplots(len(picks), len(columns), figsize=(1.9 * len(columns), 1.9 * len(picks)), squeeze=False)
    for r, index in enumerate(picks):
        outline = lesions[index, 0].T
        for c, name in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.imshow(val.images[index, 0].numpy().T, cmap="gray", vmin=0, vmax=1, origin="lower")
                ax.set_ylabel(str(kinds[index]), fontsize=8)
            else:
                ax.imshow(maps[name][index, 0].T, cmap="magma", vmin=0, vmax=1, origin="lower")
            ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.6, origin="lower")
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(name, 24)), fontsize=6)
    fig.suptitle("u (healthy-normalised, squashed z) of every estimator; cyan: lesion outline (val slices)", fontsize=8)
    return save_figure(fig, path, dpi=90)
