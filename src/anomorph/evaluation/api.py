"""One-call evaluation: ``anomorph.evaluate(...)`` is what ``anomorph evaluate`` runs."""
from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..data.slices import SliceConfig, SliceDataset
from ..errors import ConfigError
from ..runtime import configure_threads
from .evaluate import EvaluationData, MethodResult, evaluate_methods, format_table, write_results
from ..scoring import Detector
from .inference import Scorer, ThresholdScorer


@dataclass
class EvaluationOutput:
    """Results of :func:`evaluate`: per-method results, the printed table, written files."""

    results: list[MethodResult]
    table: str
    files: dict[str, Path]
    notes: list[str] = field(default_factory=list)
    uncertainty: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    uncertainty_table: str = ""


def evaluate(runs: Sequence[str | Path] = (), manifest: str | Path = "phantom/manifest.csv",
             out_dir: str | Path | None = None, methods: Sequence[str] = (), size: int | None = None,
             oracle: bool = True, report: bool = True, batch_size: int = 32,
             scorers: Sequence[Scorer] = (), uncertainty: Sequence[str] = (), normalise: bool = True,
             normalise_mode: str = "pixel",
             uncertainty_options: Mapping[str, Mapping[str, Any]] | None = None,
             uncertainty_cost_repeats: int = 3, guidance: str | Mapping[str, Any] | None = None) -> EvaluationOutput:
    """Evaluate trained runs (``runs``), baselines (``methods``: "threshold",
    "threshold-intensity") and already-built ``scorers`` on ``manifest``.

    All methods are scored on one slice grid: the runs' training size (they must agree), else
    ``size`` (default 128). The slicing/normalisation settings come from the first run's config.
    Writes ``metrics.json``, ``metrics.csv`` and (``report=True``) ``report.html`` to
    ``out_dir`` (default ``<first run>/evaluation`` or ``./evaluation``).

    ``uncertainty``: estimator names (:mod:`anomorph.uncertainty`) evaluated for every run; with
    ``normalise`` each is wrapped in a ``HealthyNormaliser`` (``normalise_mode`` "pixel" |
    "tissue") fitted on the healthy (label 0) val slices. Per run and estimator,
    ``metrics.json["uncertainty"][run][estimator]`` holds the u AUROC/AUPRC against the masks,
    the fraction of u on edges of healthy test slices and the cost relative to one forward
    pass; the run's own row (and its report panels) use the first estimator's u.
    ``uncertainty_options``: ``{estimator: {option: value}}``, plus ``{"normalise": {...}}``
    for ``HealthyNormaliser.fit`` options.

    Runs are loaded with :meth:`Detector.from_run <anomorph.scoring.Detector.from_run>`:
    ``guidance`` None scores each run with its calibrated guidance setting (a guided setting
    needs ``anomorph calibrate``), a strategy name or GuidanceConfig overrides with that.
    """
    configure_threads(log=False)
    if uncertainty and not runs:
        raise ConfigError("uncertainty estimators need trained runs (--run RUN_DIR)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size!r}: must be an integer >= 1")
    if size is not None and size < 8:
        raise ConfigError(f"--size {size!r}: the slice size must be an integer >= 8 pixels")
    model_scorers: list[Scorer] = []
    for run in runs:
        detector = Detector.from_run(run, guidance=guidance)
        if detector.strategy == "none":
            detector.estimator = None  # u only on request (--uncertainty), as before
        model_scorers.append(detector)
    all_scorers = list(scorers) + model_scorers
    sizes = {s.size for s in all_scorers}
    if len(sizes) > 1:
        raise ConfigError(f"the methods were trained at different slice sizes {sorted(sizes)}; "
                          f"evaluate them separately")
    grid = sizes.pop() if sizes else (size if size is not None else 128)
    if size is not None and size != grid:
        raise ConfigError(f"--size {size} differs from the runs' training size {grid}; inputs are resampled "
                          f"to the training size automatically, so omit --size")
    if model_scorers:
        d = model_scorers[0].config.data  # type: ignore[attr-defined]
        config = SliceConfig(axis=d.axis, slice_range=tuple(d.slice_range) if d.slice_range else None,
                             size=grid, percentiles=tuple(d.percentiles), min_brain_fraction=d.min_brain_fraction)
    else:
        config = SliceConfig(size=grid)
    if methods:
        train = SliceDataset(manifest, ["train"], config, healthy_only=True)
        for method in methods:
            mode = "deviation" if method == "threshold" else "intensity"
            all_scorers.insert(0, ThresholdScorer.fit(train, mode))
    names = [s.name for s in all_scorers]
    if len(set(names)) != len(names):
        for i, s in enumerate(all_scorers):
            if names.count(s.name) > 1:
                s.name = f"{s.name}#{i}"
    data = EvaluationData.load(manifest, config)
    configure_threads()  # logged once the data loaded
    estimators = _prepare_uncertainty(model_scorers, runs, uncertainty, normalise, normalise_mode,
                                      uncertainty_options or {}, data, batch_size) if uncertainty else {}
    data, results = evaluate_methods(all_scorers, manifest, config, batch_size, oracle, data=data)
    uncertainty_section = _uncertainty_section(model_scorers, estimators, results, data, batch_size,
                                               uncertainty_cost_repeats)
    out = Path(out_dir) if out_dir is not None else (Path(runs[0]) / "evaluation" if runs else Path("evaluation"))
    context = {
        "manifest": str(manifest), "runs": ", ".join(str(r) for r in runs) or "(none)",
        "slice size": f"{grid}×{grid} px", "test slices": len(data.test),
        "val slices": 0 if data.val is None else len(data.val),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}, {platform.system()})",
    }
    extra: dict[str, Any] = {"context": context}
    uncertainty_table = ""
    if uncertainty_section:
        from .uncertainty import format_uncertainty_table

        extra["uncertainty"] = uncertainty_section
        uncertainty_table = format_uncertainty_table(uncertainty_section)
    files = write_results(results, out, extra=extra)
    if report:
        from ..reporting.report import write_report

        report_context = dict(context)
        if uncertainty_table:
            report_context["uncertainty (u panels: first estimator; edge mass on healthy test slices, "
                           "lower is better)"] = uncertainty_table
        files["report"] = write_report(results, out, context=report_context)
    notes = []
    for r in results:
        undefined = r.metrics.get("undefined", {})
        if undefined:
            notes.append(f"{r.name}: undefined: " + "; ".join(f"{k}: {v}" for k, v in undefined.items()))
    for run_name, per_estimator in uncertainty_section.items():
        for name, values in per_estimator.items():
            if values.get("note"):
                notes.append(f"{run_name} / {name}: {values['note']}")
    return EvaluationOutput(results, format_table(results), files, notes, uncertainty_section, uncertainty_table)


def _prepare_uncertainty(model_scorers: Sequence[Scorer], runs: Sequence[str | Path], names: Sequence[str],
                         normalise: bool, normalise_mode: str, options: Mapping[str, Mapping[str, Any]],
                         data: EvaluationData, batch_size: int) -> dict[int, list[tuple[Any, str | None]]]:
    """Per model scorer (by position): [(estimator or fitted normaliser, note)], first one attached
    to the scorer so its row and report panels carry u."""
    from ..uncertainty import ESTIMATORS
    from .uncertainty import build_for_run, fit_normaliser

    unknown = sorted(set(names) - set(ESTIMATORS))
    if unknown:
        raise ConfigError(f"unknown uncertainty estimator(s) {unknown}; expected some of {sorted(ESTIMATORS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"uncertainty estimators given twice: {list(names)}")
    stray = sorted(set(options) - set(names) - {"normalise"})
    if stray:
        raise ConfigError(f"--uncertainty-option for estimator(s) {stray} not requested with --uncertainty")
    prepared: dict[int, list[tuple[Any, str | None]]] = {}
    for index, (scorer, run) in enumerate(zip(model_scorers, runs)):
        entries = []
        for name in names:
            estimator = build_for_run(name, run, options.get(name))
            note = None
            if normalise:
                fitted, note = fit_normaliser(estimator, scorer.network, data, normalise_mode, batch_size,
                                              **dict(options.get("normalise", {})))
                if fitted is not None:
                    estimator = fitted
                else:
                    note = f"{note}; u is the raw map squashed by 1 − exp(−raw/scale)"
            entries.append((estimator, note))
        scorer.estimator = entries[0][0]  # type: ignore[attr-defined]
        prepared[index] = entries
    return prepared


def _uncertainty_section(model_scorers: Sequence[Scorer], prepared: Mapping[int, list[tuple[Any, str | None]]],
                         results: Sequence[MethodResult], data: EvaluationData,
                         batch_size: int, cost_repeats: int = 3) -> dict[str, dict[str, dict[str, Any]]]:
    """``{run name: {estimator: summary}}`` (see :func:`anomorph.evaluation.uncertainty.uncertainty_summary`)."""
    if not prepared:
        return {}
    from .uncertainty import uncertainty_summary

    by_name = {r.name: r for r in results}
    section: dict[str, dict[str, dict[str, Any]]] = {}
    for index, entries in prepared.items():
        scorer = model_scorers[index]
        row = by_name.get(scorer.name)
        section[scorer.name] = {}
        for position, (estimator, note) in enumerate(entries):
            summary = uncertainty_summary(estimator, scorer.network, data, batch_size,  # type: ignore[attr-defined]
                                          device=scorer.device,  # type: ignore[attr-defined]
                                          row_metrics=row.metrics if position == 0 and row is not None else None,
                                          cost_repeats=cost_repeats)
            if note:
                summary["note"] = note
            section[scorer.name][estimator.name] = summary
    return section
