"""One-call evaluation: ``anomorph.evaluate(...)`` is what ``anomorph evaluate`` runs."""
from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..data.slices import SliceConfig, SliceDataset
from ..errors import ConfigError
from .evaluate import MethodResult, evaluate_methods, format_table, write_results
from .inference import ModelScorer, Scorer, ThresholdScorer


@dataclass
class EvaluationOutput:
    """Results of :func:`evaluate`: per-method results, the printed table, written files."""

    results: list[MethodResult]
    table: str
    files: dict[str, Path]
    notes: list[str] = field(default_factory=list)


def evaluate(runs: Sequence[str | Path] = (), manifest: str | Path = "phantom/manifest.csv",
             out_dir: str | Path | None = None, methods: Sequence[str] = (), size: int | None = None,
             oracle: bool = True, report: bool = True, batch_size: int = 32,
             scorers: Sequence[Scorer] = ()) -> EvaluationOutput:
    """Evaluate trained runs (``runs``), baselines (``methods``: "threshold",
    "threshold-intensity") and already-built ``scorers`` on ``manifest``.

    All methods are scored on one slice grid: the runs' training size (they must agree), else
    ``size`` (default 128). The slicing/normalisation settings come from the first run's config.
    Writes ``metrics.json``, ``metrics.csv`` and (``report=True``) ``report.html`` to
    ``out_dir`` (default ``<first run>/evaluation`` or ``./evaluation``).
    """
    model_scorers: list[Scorer] = [ModelScorer.from_run(r) for r in runs]
    all_scorers = list(scorers) + model_scorers
    sizes = {s.size for s in all_scorers}
    if len(sizes) > 1:
        raise ConfigError(f"the methods were trained at different slice sizes {sorted(sizes)}; "
                          f"evaluate them separately")
    grid = sizes.pop() if sizes else (size or 128)
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
    data, results = evaluate_methods(all_scorers, manifest, config, batch_size, oracle)
    out = Path(out_dir) if out_dir is not None else (Path(runs[0]) / "evaluation" if runs else Path("evaluation"))
    context = {
        "manifest": str(manifest), "runs": ", ".join(str(r) for r in runs) or "(none)",
        "slice size": f"{grid}×{grid} px", "test slices": len(data.test),
        "val slices": 0 if data.val is None else len(data.val),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.machine()}, {platform.system()})",
    }
    files = write_results(results, out, extra={"context": context})
    if report:
        from ..reporting.report import write_report

        files["report"] = write_report(results, out, context=context)
    notes = []
    for r in results:
        undefined = r.metrics.get("undefined", {})
        if undefined:
            notes.append(f"{r.name}: undefined: " + "; ".join(f"{k}: {v}" for k, v in undefined.items()))
    return EvaluationOutput(results, format_table(results), files, notes)
