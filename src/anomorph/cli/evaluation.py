"""``anomorph evaluate`` and ``anomorph predict``."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.api import evaluate

    if not args.run and not args.method:
        raise SystemExit("anomorph evaluate: give --run RUN_DIR (repeatable) and/or --method threshold")
    from ..uncertainty.evaluation import parse_options

    out = evaluate(runs=args.run or [], manifest=args.data, out_dir=args.out,
                   methods=args.method or [], size=args.size, oracle=not args.no_oracle,
                   report=not args.no_report, batch_size=args.batch_size,
                   uncertainty=args.uncertainty or [], normalise=args.normalise,
                   normalise_mode=args.normalise_mode,
                   uncertainty_options=parse_options(args.uncertainty_option or []))
    print(out.table)
    if out.uncertainty_table:
        print("\nuncertainty u (AUROC/AUPRC of u against the masks; edge mass: fraction of u on image edges "
              "of healthy test slices, lower is better, a uniform u scores the edge area; cost: × one forward)")
        print(out.uncertainty_table)
    if out.notes:
        print("\n".join(out.notes))
    print(f"metrics: {out.files['json']} and {out.files['csv']}")
    if "report" in out.files:
        print(f"report: {out.files['report']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..evaluation.inference import ModelScorer
    from ..evaluation.predict import predict_files

    scorer = ModelScorer.from_run(args.run, args.checkpoint)
    skipped: list[str] = []
    written = predict_files(scorer, args.inputs, args.out, axis=scorer.config.data.axis,
                            percentiles=scorer.config.data.percentiles, overwrite=args.overwrite,
                            skipped=skipped)
    for source in skipped:
        print(f"{source}: skipped, its outputs are already in {args.out} (--overwrite recomputes them)")
    for source, files in written.items():
        print(f"{source}:")
        for name, path in files.items():
            print(f"  {name:<15} {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evaluate", help="score trained runs and baselines on a manifest (SPEC §4 metrics, report.html)",
        description="Evaluate on the val (threshold selection) and test splits of --data. Writes "
                    "metrics.json, metrics.csv and report.html into --out.")
    e.add_argument("--run", type=Path, action="append", metavar="RUN_DIR", help="trained run (repeatable)")
    e.add_argument("--method", action="append", choices=["threshold", "threshold-intensity"],
                   help="training-free baseline (repeatable)")
    e.add_argument("--data", type=Path, required=True, metavar="MANIFEST", help="manifest.csv")
    e.add_argument("--out", type=Path, default=None,
                   help="output folder (default: RUN_DIR/evaluation, or ./evaluation)")
    e.add_argument("--size", type=int, default=None,
                   help="slice size in pixels (default: the runs' training size; 128 for baselines alone)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--no-oracle", action="store_true", help="skip the oracle row")
    e.add_argument("--no-report", action="store_true", help="skip report.html")
    from ..uncertainty.estimators import ESTIMATORS

    e.add_argument("--uncertainty", action="append", choices=sorted(ESTIMATORS), metavar="ESTIMATOR",
                   help=f"uncertainty estimator to evaluate for every run (repeatable; one of "
                        f"{', '.join(sorted(ESTIMATORS))}); the first one's u fills the report panels. "
                        f"See docs/uncertainty.md")
    e.add_argument("--normalise", action=argparse.BooleanOptionalAction, default=True,
                   help="z-score each estimator against the healthy val slices (default: on)")
    e.add_argument("--normalise-mode", choices=["pixel", "tissue"], default="pixel",
                   help="healthy statistics per pixel or per tissue bin (default: pixel)")
    e.add_argument("--uncertainty-option", action="append", metavar="ESTIMATOR.KEY=VALUE",
                   help="estimator option, e.g. mc_dropout.passes=8, tta.max_shift=1, "
                        "normalise.smooth=0 (repeatable)")
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="anomaly maps for NIfTI/PNG/JPG files, on each input's own grid",
        description="Writes NAME_anomaly, NAME_pseudo_healthy, NAME_warped, NAME_brain_mask "
                    "(NIfTI for NIfTI inputs, PNG for PNG/JPG inputs) and NAME_preview.png into --out, "
                    "NAME = the input's file name without its suffix. Two inputs with the same NAME are "
                    "refused; existing outputs are never replaced without --overwrite, and an input whose "
                    "outputs all exist is skipped (rerunning an interrupted predict completes the rest).")
    p.add_argument("--run", type=Path, required=True, metavar="RUN_DIR")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=cmd_predict)
