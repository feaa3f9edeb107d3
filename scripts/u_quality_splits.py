"""Does a u measured on val hold on test? The u-quality rows of a study on both splits.

    .venv/bin/python scripts/u_quality_splits.py runs/benchmark_teacher --config benchmarks/phantom_teacher.yaml

An analysis of a finished study (it chooses nothing): the estimators of the yaml's
``uncertainty_quality`` section, measured exactly as the benchmark's u-quality table measures them
(:func:`anomorph.benchmark.uncertainty_quality.quality_rows`: healthy normalisers fitted on the val
calibration subjects, u AUROC / AUPRC of the healthy z-score over brain pixels, healthy false
alarms at the gating threshold), on the run of the reference method of each seed — once on
the val split (for the selection seed, the benchmark's own table) and once on the **test** split of
the same seed. The u-quality table is measured on val of the selection seed only; a u whose val
figures do not carry to test, or to other seeds, is not established. ``--tied-method``: for every
seed, the ``field_disagreement`` specs get that method's run of the same seed as ``tied_run``.
Writes ``--out`` (Markdown) and the ``--marker`` pair of ``--doc``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_results import publish  # noqa: E402


def with_tied_run(specs: list[dict], tied_run: str | None) -> list[dict]:
    """``specs`` with ``options.tied_run`` of every ``field_disagreement`` spec set to ``tied_run``
    (unchanged when it is None); the label of a spec then names its estimator without the path."""
    if tied_run is None:
        return specs
    return [{**spec, "options": {**spec.get("options", {}), "tied_run": str(tied_run)}}
            if spec.get("name") == "field_disagreement" else spec for spec in specs]


def split_table(rows_by_split: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: one per (estimator, split), overall u AUROC / AUPRC, false alarms, then
    u AUROC / AUPRC per lesion kind (kinds in first-seen order). Splits are labels such as
    "val" or "seed 1 test"."""
    def cell(value) -> str:
        return "—" if value is None else f"{value:.3f}"

    kinds = list(dict.fromkeys(r["group"] for rows in rows_by_split.values() for r in rows if r["group"] != "overall"))
    lines = ["| estimator | split | u AUROC | u AUPRC | healthy false alarms | "
             + " | ".join(f"u AUROC / AUPRC: {k}" for k in kinds) + " |", "|---|---|---|---|---|" + "---|" * len(kinds)]
    estimators = list(dict.fromkeys(r["estimator"] for rows in rows_by_split.values() for r in rows))
    for estimator in estimators:
        for split, rows in rows_by_split.items():
            mine = {r["group"]: r for r in rows if r["estimator"] == estimator}
            if "overall" not in mine:
                continue
            o = mine["overall"]
            per_kind = [f"{cell(mine[k]['u_auroc'])} / {cell(mine[k]['u_auprc'])}" if k in mine else "—" for k in kinds]
            lines.append(f"| {estimator} | {split} | {cell(o['u_auroc'])} | {cell(o['u_auprc'])} | "
                         f"{cell(o['healthy_false_alarm'])} | " + " | ".join(per_kind) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the benchmark's output_dir")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--dataset", default="phantom")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/phantom_teacher/u_quality_splits.md"))
    parser.add_argument("--doc", type=Path, default=Path("docs/uncertainty.md"))
    parser.add_argument("--marker", default="teacher-usplits", help="the doc's marker pair to fill")
    parser.add_argument("--tied-method", default=None, help="the method whose run of each seed is field_disagreement's tied_run")
    args = parser.parse_args()

    from anomorph.benchmark.aggregate import dataset_seeds
    from anomorph.benchmark.runner import ensure_dataset, load_benchmark_config, seed_runs
    from anomorph.benchmark.uncertainty_quality import gating_guidance, quality_rows
    from anomorph.evaluation.evaluate import EvaluationData
    from anomorph.training import load_run
    from anomorph.training.datamodule import slice_config

    config = load_benchmark_config(args.config)
    dataset = next(d for d in config.datasets if d.name == args.dataset)
    chosen = json.loads((args.results / args.dataset / "selection" / "chosen.json").read_text())
    rows_by_split: dict[str, list[dict]] = {}
    threshold = None
    for seed in dataset_seeds(config, dataset):
        runs = seed_runs(config, dataset, seed, chosen)
        run_dir = runs[config.reference][0]
        tied = runs[args.tied_method][0] if args.tied_method else None
        specs = with_tied_run(config.uncertainty_quality, tied)
        network, run_config = load_run(run_dir)
        data = EvaluationData.load(ensure_dataset(dataset, seed), slice_config(run_config.data),
                                   config.calibration_fraction)
        guidance, raw_guidance = gating_guidance(run_config, chosen)
        threshold = guidance.threshold
        for split in ("val", "test"):
            measured = data if split == "val" else dataclasses.replace(data, val=data.test)
            rows = quality_rows(specs, network, run_config, run_dir, measured, guidance, raw_guidance, seed,
                                config.batch_size)[0]
            for row in rows:  # one label per estimator across seeds: the tied run is in the split label
                row["estimator"] = row["estimator"].split("[tied_run=")[0]
            rows_by_split[f"seed {seed} {split}"] = rows
    command = " ".join(["python scripts/u_quality_splits.py", *sys.argv[1:]])
    header = (f"Generated by `{command}` (runs of `{config.reference}` per seed"
              + (f", field_disagreement tied to `{args.tied_method}` of the same seed" if args.tied_method else "")
              + f"; normalisers fitted on each seed's val calibration subjects; val: the other val subjects, as the "
              f"u-quality table; test: the test split of the same seed; healthy false alarms at z ≥ {threshold:g}).\n")
    publish("\n".join([header, *split_table(rows_by_split)]), args.out, args.doc, args.marker)


if __name__ == "__main__":
    main()
