"""The aleatoric (heteroscedastic) head as u: the row the u-quality table lacked (issue 12). Val only.

    .venv/bin/python scripts/aleatoric_quality.py            # trains both runs first if missing (minutes each on 2 cores)

`aleatoric` needs a network that predicts a per-pixel variance, so it cannot be measured on the
benchmark's val-chosen run. This script trains two twins of that run on phantom seed 0 (the
benchmark's own phantom, built by the same code): the val-chosen config (`configs/morphaeus.yaml`
with the benchmark's overrides and the val-chosen `train.beta_end`, read from the committed
`benchmarks/results/phantom/selection/chosen.json`) once as it is (`reference`) and once with
`model.options.heteroscedastic=true` (Gaussian NLL on top of the same losses). Both use seed 0.

On each run it measures u-quality rows exactly as the benchmark's table does
(:func:`anomorph.benchmark.uncertainty_quality.quality_rows`: healthy normalisers fitted on the
val calibration subjects, metrics on the other val subjects, gating with the val-chosen gating
values) plus the unguided val pixel AUPRC of the run, so every row has its own baseline:

* heteroscedastic run: `aleatoric` (σ of the prior), `aleatoric[target=warped]` (σ ∘ φ),
  `residual_z` (|x − x̂| / σ), `residual_z[use_variance=False]` (|x − x̂|), `warped_residual`;
* reference run: `residual_z`, `warped_residual` (the same code, to compare the two trainings).

No test slice is read and nothing is chosen here. Writes ``<out>/aleatoric.md``, ``aleatoric.csv``,
the panel figure ``docs/img/phantom_aleatoric_panels.png`` and copies the table between the
``aleatoric`` markers of docs/uncertainty.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_results import replace  # noqa: E402

RUNS = {
    "heteroscedastic": (["model.options.heteroscedastic=true"],
                        [{"name": "aleatoric"}, {"name": "aleatoric", "options": {"target": "warped"}},
                         {"name": "residual_z"}, {"name": "residual_z", "options": {"use_variance": False}},
                         {"name": "warped_residual"}]),
    "reference": ([], [{"name": "residual_z"}, {"name": "warped_residual"}]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("benchmarks/phantom.yaml"))
    parser.add_argument("--chosen", type=Path, default=Path("benchmarks/results/phantom/selection/chosen.json"))
    parser.add_argument("--runs", type=Path, default=Path("runs/aleatoric64"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/phantom/uncertainty"))
    parser.add_argument("--figure", type=Path, default=Path("docs/img/phantom_aleatoric_panels.png"))
    parser.add_argument("--doc", type=Path, default=Path("docs/uncertainty.md"))
    args = parser.parse_args()

    from anomorph.benchmark.runner import chosen_reference, load_benchmark_config, train_method
    from anomorph.benchmark.uncertainty_quality import (gating_guidance, quality_csv, quality_markdown,
                                                        quality_panels, quality_rows)
    from anomorph.evaluation.evaluate import EvaluationData, evaluate_scorer
    from anomorph.runs import load_run
    from anomorph.scoring import ModelScorer
    from anomorph.training.datamodule import slice_config

    config = load_benchmark_config(args.config)
    chosen = json.loads(args.chosen.read_text())
    manifest, method, base = chosen_reference(config, chosen)

    rows, maps, baselines, data = [], {}, {}, None
    for name, (overrides, specs) in RUNS.items():
        run_dir = train_method(method.config, base + overrides, args.runs / name)
        network, run_config = load_run(run_dir)
        if data is None:  # the twins differ only in the model: the same slices for both
            data = EvaluationData.load(manifest, slice_config(run_config.data), config.calibration_fraction)
            on_val = data.val_as_test()
        guidance, raw_guidance = gating_guidance(run_config, chosen)
        baselines[name] = evaluate_scorer(ModelScorer(network, run_config), on_val, config.batch_size
                                          ).metrics.get("pixel_auprc")
        run_rows, run_maps = quality_rows(specs, network, run_config, run_dir, data, guidance, raw_guidance,
                                          chosen["seed"], config.batch_size)
        for row in run_rows:
            row["estimator"] = f"{name}: {row['estimator']}"
        rows += run_rows
        maps.update({f"{name}: {label}": u for label, u in run_maps.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aleatoric.csv").write_text(quality_csv(rows))
    quality_panels(data.val, maps, args.figure)
    command = "python scripts/aleatoric_quality.py"
    unguided = ", ".join(f"{name} {value:.3f}" for name, value in baselines.items())
    table = (f"Generated by `{command}` (runs `{args.runs}/heteroscedastic` and `{args.runs}/reference`: "
             f"the val-chosen config {' '.join(chosen['train'][config.reference])}, seed {chosen['seed']}, "
             f"with and without `model.options.heteroscedastic=true`). Unguided val pixel AUPRC of each run: "
             f"{unguided}.\n\n" + quality_markdown(rows, guidance.threshold, chosen, raw_guidance.threshold))
    (args.out / "aleatoric.md").write_text(table)
    replace(args.doc, "aleatoric", table.rstrip("\n"))
    print(table)


if __name__ == "__main__":
    main()
