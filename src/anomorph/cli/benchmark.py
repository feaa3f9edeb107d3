"""``anomorph benchmark`` and ``anomorph demo``."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_benchmark(args: argparse.Namespace) -> int:
    from ..benchmark import load_benchmark_config, run_benchmark

    config = load_benchmark_config(args.config, args.overrides)
    if args.output_dir is not None:
        config.output_dir = str(args.output_dir)
    if args.seeds:
        config.seeds = args.seeds
    files = run_benchmark(config)
    print(Path(files["markdown"]).read_text())
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..benchmark.demo import run_demo

    result = run_demo(args.out, epochs=args.epochs)
    print(result.table)
    print(f"\nreport: {result.report}")
    print(f"demo took {result.seconds / 60:.1f} min (stages: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in result.stages.items()) + ")")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("benchmark", help="methods × seeds × datasets study with mean ± std tables (resumable)",
                       description="Train and evaluate every method of a benchmark YAML for every seed and "
                                   "dataset; rerun the same command to resume. Writes results.csv/.md/.html.")
    b.add_argument("--config", type=Path, required=True, help="e.g. benchmarks/phantom.yaml")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="run-config overrides for every trained method, e.g. train.max_epochs=5")
    b.add_argument("--output-dir", type=Path, default=None, help="override the YAML's output_dir")
    b.add_argument("--seeds", type=int, nargs="+", default=None, help="override the YAML's seeds")
    b.set_defaults(func=cmd_benchmark)

    d = sub.add_parser("demo", help="laptop-sized end-to-end run on the phantom: train, evaluate, report",
                       description="Builds a small phantom, trains the AE, the deformable AE and the guided "
                                   "model, evaluates them with the thresholding baseline and the oracle, and "
                                   "prints the table and the report path.")
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    d.add_argument("--epochs", type=int, default=None, help="training epochs per model (default: the demo's)")
    d.set_defaults(func=cmd_demo)
