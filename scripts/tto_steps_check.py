"""Val check of cost masking's number of test-time Adam steps (issue 15).

    .venv/bin/python scripts/tto_steps_check.py runs/benchmark \\
        --json benchmarks/results/speed/tto_steps_val.json
    .venv/bin/python scripts/update_speed_tables.py      # the table in benchmarks/README.md

For each seed of the phantom benchmark (default 0, 1, 2) this scores the trained unguided
deformable run of that seed (``morphaeus``; seed 0: the run the val search chose) with the
``cost_masking`` row and its val-chosen values (``RUNS_DIR/phantom/selection/chosen.json``),
``guidance.map_steps`` replaced by each value of ``--steps`` (default 5 10 15 20 30), on the
**val** split only: u is calibrated on the calibration subjects and the metrics are computed on
the other val subjects — exactly the data the benchmark's val search chose on
(:func:`anomorph.benchmark.selection.run_selection`); the test split is never scored. Detectors
are built by :func:`anomorph.benchmark.runner.guided_scorers` and scored by
:func:`anomorph.evaluation.evaluate.evaluate_scorer` (pooled val pixel AUPRC, the best Dice over
val thresholds = Dice at the val-chosen threshold on val, per-subject pixel AUPRC), as the
benchmark does; the paired per-subject differences to 30 steps go through
:func:`anomorph.benchmark.statistics.paired_bootstrap` (stratified by seed, 10 000 resamples).

**Selection rule** (fixed before any number of this check was seen): the reference is
``--reference-steps`` (30, today's setting). A steps value *passes* when, against it,

1. the mean over seeds of the difference in pooled val pixel AUPRC is ≥ −0.005, and
2. the per-subject paired differences in val pixel AUPRC (lesion val subjects of all seeds) have
   a mean ≥ −0.005 and a 95 % bootstrap CI lower bound ≥ −0.02.

The rule chooses the **fewest** steps that pass (30 itself always passes). Why these margins:
cost masking's gain over the unguided deformable AE in the phantom benchmark is ~0.03 test pixel
AUPRC (0.313 vs 0.281) with a seed std of ~0.03; giving up at most 0.005 (a sixth of that gain,
below the third decimal the tables report) on average is "equal quality" for a 2–6x cheaper
predict; with only 4 lesion val subjects per seed, the CI bound is wider (−0.02) so that noise alone
does not fail every value, while a real loss of a few hundredths still fails it.

The script only reports: the ``cost_masking_fast`` row of ``benchmarks/phantom.yaml`` carries the
chosen value, and the benchmark run produces its TEST numbers.
"""
from __future__ import annotations

import anomorph  # noqa: F401,I001 - first: the threading setup before torch loads (anomorph.runtime)

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence
from anomorph.data.io import write_json

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "anomorph.tto_steps_check/1"
MEAN_MARGIN = -0.005
CI_MARGIN = -0.02


def resolve(path: str | Path, root: Path) -> Path:
    """A path of the benchmark (relative to the folder it ran in) on this machine."""
    path = Path(path)
    return path if path.is_absolute() else root / path


def benchmark_root(runs_dir: Path, output_dir: str) -> Path:
    """The folder the benchmark ran in: ``runs_dir`` (resolved) without the config's
    ``output_dir`` (e.g. runs/benchmark) at its end; its relative paths (manifests, the
    selection's run) are relative to it."""
    resolved = runs_dir.resolve()
    parts = Path(output_dir).parts
    if resolved.parts[-len(parts):] != parts:
        raise SystemExit(f"{runs_dir} does not end with the benchmark's output_dir {output_dir}; pass --root")
    return Path(*resolved.parts[:-len(parts)])


def seed_inputs(config, dataset, seed: int, chosen: dict[str, Any], root: Path, runs_dir: Path):
    """(manifest, {method: run dir}) of one seed, as :func:`run_benchmark` finds them (with the
    benchmark's relative paths read from ``root`` and its output_dir = ``runs_dir``)."""
    import copy
    import dataclasses

    from anomorph.benchmark.runner import seed_runs

    def here(path: str) -> str:
        if path.startswith(config.output_dir + "/"):  # the runs live under RUNS_DIR here
            return str(runs_dir.resolve() / path[len(config.output_dir) + 1:])
        return str(resolve(path, root))

    local = copy.deepcopy(chosen)
    local["runs"] = {k: here(v) for k, v in chosen.get("runs", {}).items()}
    runs = {}
    for name, (run_dir, _) in seed_runs(dataclasses.replace(config, output_dir=str(runs_dir.resolve())),
                                        dataset, seed, local).items():
        runs[name] = Path(run_dir)
        if not (runs[name] / "done").exists():
            raise SystemExit(f"seed {seed}: {name} run {runs[name]} is not finished (no 'done' marker)")
    return resolve(dataset.manifest_for(seed), root), runs


def val_only(data):
    """The val threshold subjects as the scored split (the selection's ``on_val``), calibration
    subjects kept for u: no test slice is scored."""
    return data.val_as_test()


def check(args: argparse.Namespace) -> dict[str, Any]:
    from anomorph.benchmark.runner import chosen_values, guided_scorers, load_benchmark_config, load_seed_data
    from anomorph.benchmark.statistics import paired_bootstrap
    from anomorph.evaluation.evaluate import evaluate_scorer

    config = load_benchmark_config(args.config)
    runs_dir = Path(args.runs_dir)
    root = args.root or benchmark_root(runs_dir, config.output_dir)
    dataset = next(d for d in config.datasets if d.name == args.dataset)
    chosen = json.loads((runs_dir / dataset.name / "selection" / "chosen.json").read_text())
    method = next(m for m in config.methods if m.name == args.method)
    values = chosen_values(method, chosen.get("guidance", {})) or {}
    steps = sorted(set(args.steps) | {args.reference_steps})
    per_seed: dict[str, Any] = {}
    for seed in args.seeds:
        manifest, runs = seed_inputs(config, dataset, seed, chosen, root, runs_dir)
        on_val = val_only(load_seed_data(config, manifest, runs))
        run_dir = runs[method.run or method.name]
        entry: dict[str, Any] = {"manifest": str(manifest), "run": str(run_dir), "steps": {}}
        for n in steps:
            start = time.perf_counter()
            scorer = guided_scorers(method, run_dir, on_val, seed, {**values, "map_steps": n})[0]
            assert scorer.guidance.map_steps == n
            metrics = evaluate_scorer(scorer, on_val, config.batch_size).metrics
            entry["steps"][str(n)] = {
                "pixel_auprc": metrics["pixel_auprc"], "dice_at_val_threshold": metrics.get("oracle_best_dice"),
                "val_threshold": metrics.get("oracle_best_dice_threshold"),
                "per_subject_auprc": {k: v["pixel_auprc"] for k, v in metrics["per_subject"].items()},
                "seconds": time.perf_counter() - start}
            print(f"seed {seed}, {n} steps: val pixel AUPRC {metrics['pixel_auprc']:.4f}, "
                  f"Dice {metrics.get('oracle_best_dice', float('nan')):.4f} "
                  f"({entry['steps'][str(n)]['seconds']:.0f} s)", file=sys.stderr, flush=True)
        per_seed[str(seed)] = entry

    reference = str(args.reference_steps)
    rows = []
    for n in steps:
        key = str(n)
        pooled = [per_seed[s]["steps"][key]["pixel_auprc"] for s in per_seed]
        dice = [per_seed[s]["steps"][key]["dice_at_val_threshold"] for s in per_seed]
        pooled_diff = [per_seed[s]["steps"][key]["pixel_auprc"] - per_seed[s]["steps"][reference]["pixel_auprc"]
                       for s in per_seed]
        differences, groups = [], []
        for s in per_seed:
            mine, ref = per_seed[s]["steps"][key]["per_subject_auprc"], per_seed[s]["steps"][reference]["per_subject_auprc"]
            for subject in sorted(ref):
                differences.append(mine[subject] - ref[subject])
                groups.append(s)
        paired = paired_bootstrap(differences, groups, n_resamples=10000, seed=0)
        mean_pooled_diff = sum(pooled_diff) / len(pooled_diff)
        passes = n == args.reference_steps or (
            mean_pooled_diff >= MEAN_MARGIN and paired["mean"] is not None and paired["mean"] >= MEAN_MARGIN
            and paired["ci_low"] is not None and paired["ci_low"] >= CI_MARGIN)
        rows.append({"map_steps": n, "val_pixel_auprc": pooled, "val_pixel_auprc_mean": sum(pooled) / len(pooled),
                     "val_dice": dice, "val_dice_mean": sum(dice) / len(dice),
                     "pooled_auprc_difference": pooled_diff, "pooled_auprc_difference_mean": mean_pooled_diff,
                     "paired_per_subject": paired, "passes": bool(passes)})
    chosen_steps = min(r["map_steps"] for r in rows if r["passes"])
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "scripts/tto_steps_check.py", *sys.argv[1:]]),
        "method": method.name, "dataset": dataset.name, "seeds": list(args.seeds), "guidance": values,
        "reference_steps": args.reference_steps,
        "rule": {"pooled_auprc_difference_mean_min": MEAN_MARGIN, "paired_mean_min": MEAN_MARGIN,
                 "paired_ci_low_min": CI_MARGIN, "confidence": 0.95, "choose": "fewest passing steps"},
        "rows": rows, "chosen_steps": chosen_steps, "per_seed": per_seed,
        "threads": __import__("torch").get_num_threads(), "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def format_table(result: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    values = ", ".join(f"{k} {v}" for k, v in result["guidance"].items())
    lines = [f"Generated by `{result['command']}` ({result['created']}). {result['method']} ({values}) on the "
             f"{result['dataset']} VAL threshold subjects of seeds {seeds} (no test slice scored); pooled val "
             f"pixel AUPRC and Dice at the best val threshold per seed, mean over seeds; Δ vs "
             f"{result['reference_steps']} steps: pooled per seed (mean) and paired per lesion val subject (mean "
             f"[95 % CI], bootstrap stratified by seed). Rule (fixed before the run): pooled Δ ≥ "
             f"{result['rule']['pooled_auprc_difference_mean_min']}, per-subject mean Δ ≥ "
             f"{result['rule']['paired_mean_min']} and CI low ≥ {result['rule']['paired_ci_low_min']}; the fewest "
             f"passing steps: "
             f"**{result['chosen_steps']}**.", "",
             "| map_steps | val pixel AUPRC | val Dice | Δ AUPRC pooled | Δ AUPRC per subject [95 % CI] | n | passes |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p = r["paired_per_subject"]
        ci = "—" if p["ci_low"] is None else f"{p['mean']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]"
        per_seed = " / ".join(f"{v:.3f}" for v in r["val_pixel_auprc"])
        lines.append(f"| {r['map_steps']} | {r['val_pixel_auprc_mean']:.4f} ({per_seed}) | {r['val_dice_mean']:.4f} | "
                     f"{r['pooled_auprc_difference_mean']:+.4f} | {ci} | {p['n']} | {'yes' if r['passes'] else 'no'} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, metavar="RUNS_DIR", help="the benchmark's output_dir (runs/benchmark)")
    parser.add_argument("--config", type=Path, default=REPO / "benchmarks" / "phantom.yaml")
    parser.add_argument("--root", type=Path, default=None,
                        help="folder the benchmark ran in (default: RUNS_DIR without the config's output_dir)")
    parser.add_argument("--dataset", default="phantom")
    parser.add_argument("--method", default="cost_masking")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 15, 20, 30])
    parser.add_argument("--reference-steps", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = check(args)
    table = format_table(result)
    print(table)
    if args.json is not None:
        print(f"wrote {write_json(args.json, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
