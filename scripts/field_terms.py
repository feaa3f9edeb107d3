"""What did training do to the field? The deformable rows' loss terms from their own training logs.

    .venv/bin/python scripts/field_terms.py runs/benchmark_consistent --config benchmarks/phantom_consistent.yaml

An analysis of the training logs of a finished study (it chooses nothing): for every trained
deformable run of the main dataset — the val search's runs of the selection seed and each
seed's runs with the val-chosen values — the terms Lightning logged at the last epoch:

- ``val/smooth``: ‖∇v‖² of the field on the **healthy val** slices (pixels²/pixel², the
  smoothness term without β): how much the field deforms;
- ``val/residual``: mean |x − x̃| over brain pixels of the healthy val slices (intensity): how
  well it registers healthy anatomy (lower is better);
- ``val/ncc``: the local NCC loss on the same slices (−1 is perfect);
- ``train/consistency``: field-consistency training's tie, mean ‖d(corrupted) − d(clean)‖² over
  the last epoch's training slices (pixels²), where the run has it.

A field that satisfies a tie by deforming less everywhere shows a smaller ``val/smooth`` and a
larger ``val/residual`` than the unguided run. A second table reads the test split's
``mean_displacement_lesion`` and ``mean_displacement_healthy`` (mean |d| in pixels inside lesions
and over healthy brain pixels, all test slices) from each seed's ``metrics.csv`` and averages
them over seeds, with their ratio: a field that registers lesions away moves lesion pixels more
than healthy ones (ratio > 1); one that protects them locally brings the ratio towards 1 without
moving healthy pixels less. Writes ``--out`` (Markdown), a figure of
``val/smooth`` and ``val/residual`` per epoch (from the end of the warm-up, when the field starts)
for the selection seed's runs, and the
``--marker`` pair of docs/results.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_results import publish  # noqa: E402

TERMS = (("val/smooth", "val ‖∇v‖²"), ("val/residual", "val residual"), ("val/ncc", "val NCC loss"),
         ("train/consistency_epoch", "train tie (px²)"))


def last_values(rows: list[dict[str, str]]) -> dict[str, float | None]:
    """The last logged value of each term in ``TERMS`` (None where the run never logged it)."""
    values: dict[str, float | None] = {key: None for key, _ in TERMS}
    for row in rows:
        for key, _ in TERMS:
            if row.get(key):
                values[key] = float(row[key])
    return values


def per_epoch(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of ``key`` in logged order, one value per epoch (the last one logged)."""
    by_epoch: dict[int, float] = {}
    for row in rows:
        if row.get(key) and row.get("epoch"):
            by_epoch[int(row["epoch"])] = float(row[key])
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


def runs_of(results: Path, dataset: str, seeds: list[int]) -> list[tuple[str, str, Path]]:
    """(row, label, run directory) of every finished deformable run: the val search's runs, then
    each seed's own runs (the selection seed reuses a search run, which is listed once)."""
    found = []
    selection = results / dataset / "selection"
    for method_dir in sorted(p for p in selection.iterdir() if p.is_dir()) if selection.is_dir() else []:
        for run in sorted(p for p in method_dir.iterdir() if (p / "done").exists()):
            found.append((method_dir.name, f"val search: {run.name}", run))
    for method_dir in sorted(p for p in (results / dataset).iterdir() if p.is_dir() and p.name != "selection"):
        for seed in seeds:
            run = method_dir / f"seed{seed}"
            if (run / "done").exists():
                found.append((method_dir.name, f"seed {seed}", run))
    return found


def displacement_rows(results: Path, dataset: str, seeds: list[int]) -> list[tuple[str, float, float, int]]:
    """(method, mean |d| in lesions, mean |d| on healthy pixels, seeds) over the test split's
    ``overall`` rows of each seed's metrics.csv, averaged over the seeds that have the method;
    rows without a field (NaN) are left out. Methods in first-seen order."""
    import csv
    import math

    sums: dict[str, list[float]] = {}
    for seed in seeds:
        path = results / dataset / f"seed{seed}" / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row["group_kind"] != "overall" or not row.get("mean_displacement_lesion"):
                    continue
                lesion, healthy = float(row["mean_displacement_lesion"]), float(row["mean_displacement_healthy"])
                if math.isnan(lesion) or math.isnan(healthy):
                    continue
                acc = sums.setdefault(row["method"], [0.0, 0.0, 0])
                acc[0] += lesion
                acc[1] += healthy
                acc[2] += 1
    return [(method, a[0] / a[2], a[1] / a[2], int(a[2])) for method, a in sums.items()]


def curves_to_plot(runs: list[tuple[str, str, Path]], selection_seed: int) -> set[tuple[str, str]]:
    """(row, label) of the runs whose curves the figure shows: every val-search run, and the
    selection seed's run of each row that had no search (its one setting)."""
    searched = {row for row, label, _ in runs if label.startswith("val search")}
    return {(row, label) for row, label, _ in runs
            if label.startswith("val search") or (row not in searched and label == f"seed {selection_seed}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the benchmark's output_dir")
    parser.add_argument("--config", type=Path, default=Path("benchmarks/phantom_consistent.yaml"))
    parser.add_argument("--dataset", default="phantom")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/phantom_consistent/field_terms.md"))
    parser.add_argument("--figure", type=Path, default=Path("docs/img/consistent_field_terms.png"))
    parser.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--marker", default="consistent-field", help="the doc's marker pair to fill")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anomorph.benchmark.runner import load_benchmark_config
    from anomorph.config import load_config
    from anomorph.training import read_training_log

    config = load_benchmark_config(args.config)
    runs = [(row, label, run) for row, label, run in runs_of(args.results, args.dataset, config.seeds)
            if load_config(run / "config.yaml").model.name == "morphaeus"]
    plotted = curves_to_plot(runs, config.selection["seed"])
    command = " ".join(["python scripts/field_terms.py", *sys.argv[1:]])
    lines = [f"Generated by `{command}` (training logs of the {args.dataset} runs, last epoch; val terms on the "
             "healthy val slices).\n",
             "| row | run | " + " | ".join(label for _, label in TERMS) + " |", "|---|---|" + "---|" * len(TERMS)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis in axes:
        axis.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 curves, each its own colour
    for row, label, run in runs:
        rows = read_training_log(run)
        values = last_values(rows)
        cells = ["—" if values[key] is None else f"{values[key]:.3g}" for key, _ in TERMS]
        lines.append(f"| {row} | {label} | " + " | ".join(cells) + " |")
        if (row, label) in plotted:
            train = load_config(run / "config.yaml").train
            warmup = train.warmup_epochs  # no field before: ‖∇v‖² ≈ 0
            # a run fine-tuned from its teacher continues after the teacher's epochs
            start = (load_config(Path(train.consistency_teacher_run) / "config.yaml").train.max_epochs
                     if train.finetune_from_teacher else 0)
            for axis, key in zip(axes, ("val/smooth", "val/residual")):
                epochs, series = per_epoch(rows, key)
                epochs, series = [start + e for e in epochs[warmup:]], series[warmup:]
                axis.plot(epochs, series, label=f"{row} ({label.replace('val search: ', '')})")
    for axis, (key, title) in zip(axes, (("val/smooth", "val ‖∇v‖² (healthy val slices)"),
                                         ("val/residual", "val |x − x̃| (healthy val slices)"))):
        axis.set_xlabel("epoch (a fine-tuned run's after its teacher's)")
        axis.set_title(title, fontsize=10)
        axis.set_yscale("log" if key == "val/smooth" else "linear")
    axes[1].legend(fontsize=6, loc="upper right")
    fig.suptitle(f"{args.config.name}: the field's training terms, val search (seed {config.selection['seed']})",
                 fontsize=10)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    lines += ["", f"Test split of {args.dataset}, all test slices (per-seed `metrics.csv`, mean over seeds): mean "
              "displacement |d| in pixels.\n",
              "| row | seeds | inside lesions | healthy pixels | lesion / healthy |", "|---|---|---|---|---|"]
    for method, lesion, healthy, n in displacement_rows(args.results, args.dataset, config.seeds):
        lines.append(f"| {method} | {n} | {lesion:.3f} | {healthy:.3f} | {lesion / healthy:.2f} |")
    table = "\n".join(lines) + f"\n\nFigure: `{args.figure}`."
    publish(table, args.out, args.doc, args.marker)


if __name__ == "__main__":
    main()
