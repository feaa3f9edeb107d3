"""``anomorph evaluate`` and ``anomorph predict``."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.api import evaluate

    if not args.run and not args.method:
        raise SystemExit("anomorph evaluate: give --run RUN_DIR (repeatable) and/or --method threshold")
    from ..evaluation.uncertainty import parse_options

    out = evaluate(runs=args.run or [], manifest=args.data, out_dir=args.out, guidance=args.guidance,
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
    from ..evaluation.predict import predict_files
    from ..scoring import Detector

    detector = Detector.from_run(args.run, guidance=_guidance_arg(args), estimator=args.estimator,
                                 which=args.checkpoint)
    if detector.calibration is None:
        print(f"note: {args.run} has no calibration (run `anomorph calibrate --run {args.run}`): no lesion masks, "
              f"no u for the unguided detector")
    skipped: list[str] = []
    written = predict_files(detector, args.inputs, args.out, axis=detector.config.data.axis,
                            percentiles=detector.config.data.percentiles, brain_masks=args.brain_mask,
                            overwrite=args.overwrite, skipped=skipped)
    for source in skipped:
        print(f"{source}: skipped, its outputs are already in {args.out} (--overwrite recomputes them)")
    print(f"detector: {detector.name} (guidance {detector.strategy}"
          f"{'' if detector.calibration is None else ', calibration ' + detector.calibration.version})")
    for source, files in written.items():
        print(f"{source}:")
        for name, path in files.items():
            print(f"  {name:<16} {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..evaluation.calibrate import calibrate
    from ..evaluation.uncertainty import parse_options

    from .main import UserError

    options = parse_options(args.estimator_option or [])
    if len(options) > 1 or (options and args.estimator and args.estimator not in options):
        raise UserError(f"--estimator-option: options for {sorted(options)} but the calibrated estimator is "
                        f"{args.estimator or 'the run default'}; give options for one estimator, with --estimator")
    estimator = args.estimator or (next(iter(options)) if options else None)
    result = calibrate(args.run, manifest=args.data, guidance=_guidance_arg(args), estimator=estimator,
                       estimator_options=options.get(estimator) if estimator else None,
                       which=args.checkpoint, calibration_fraction=args.calibration_fraction,
                       batch_size=args.batch_size)
    info = result.info
    print(f"calibrated {args.run} (guidance {info['guidance']['strategy']}, estimator {info['estimator']['name']}, "
          f"version {result.version})")
    for entry in info["thresholds"]:
        print(f"  {entry['fpr']:.0%} FPR: threshold {entry['threshold']:.4f} (realised {entry['realised_fpr']:.4f} "
              f"on {entry['n_healthy_pixels']} healthy val pixels)")
    if info.get("dice_threshold"):
        print(f"  val max-Dice threshold: {info['dice_threshold']['threshold']:.4f}")
    if info.get("note"):
        print(f"  note: {info['note']}")
    print(f"wrote {result.path}")
    return 0


def _guidance_option(parser: argparse.ArgumentParser, default_help: str) -> None:
    from ..scoring import STRATEGIES

    parser.add_argument("--guidance", choices=sorted(STRATEGIES), default=None, metavar="STRATEGY",
                        help=f"guidance strategy ({', '.join(sorted(STRATEGIES))}); {default_help}")
    parser.add_argument("--guidance-option", action="append", default=None, metavar="KEY=VALUE",
                        help="a guidance value over the setting, e.g. map_steps=10 (fewer test-time steps for "
                             "map/cost_masking/tto) or threshold=6; repeatable (keys: GuidanceConfig fields)")
    parser.add_argument("--estimator", default=None, metavar="ESTIMATOR",
                        help="uncertainty estimator giving u (default: the run's guidance.estimator)")


def _guidance_arg(args: argparse.Namespace):
    """``--guidance`` and ``--guidance-option`` as one :func:`resolve_guidance` argument: the
    strategy name alone, or a mapping of overrides (applied over the run's calibrated setting;
    KEY=VALUE parsed as the config overrides are, by :func:`anomorph.config.apply_overrides`)."""
    from ..config import apply_overrides
    from ..errors import ConfigError
    from .main import UserError

    if not args.guidance_option:
        return args.guidance
    for item in args.guidance_option:
        if item.partition("=")[0].strip() == "strategy":
            raise UserError(f"--guidance-option {item!r}: the strategy is --guidance")
    try:
        values = apply_overrides({}, args.guidance_option)
    except ConfigError as err:
        raise UserError(f"--guidance-option: {err}") from err
    return {**values, **({"strategy": args.guidance} if args.guidance else {})}


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

    e.add_argument("--uncertainty", action="append", type=_estimator_name, metavar="ESTIMATOR",
                   help=f"uncertainty estimator to evaluate for every run (repeatable; one of "
                        f"{', '.join(sorted(ESTIMATORS))}, or a combination such as "
                        f"'max(warped_residual,noncorrespondence)'); the first one's u fills the report panels. "
                        f"See docs/uncertainty.md")
    e.add_argument("--normalise", action=argparse.BooleanOptionalAction, default=True,
                   help="z-score each estimator against the healthy val slices (default: on)")
    e.add_argument("--normalise-mode", choices=["pixel", "tissue"], default="pixel",
                   help="healthy statistics per pixel or per tissue bin (default: pixel)")
    e.add_argument("--uncertainty-option", action="append", metavar="ESTIMATOR.KEY=VALUE",
                   help="estimator option, e.g. mc_dropout.passes=8, tta.max_shift=1, "
                        "normalise.smooth=0 (repeatable)")
    e.add_argument("--guidance", default=None, metavar="STRATEGY",
                   help="score the runs with this guidance strategy (default: each run's calibrated setting)")
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="anomaly maps for NIfTI/PNG/JPG files, on each input's own grid",
        description="Writes, per input NAME, on its own grid: NAME_anomaly, NAME_pseudo_healthy, NAME_warped, "
                    "NAME_brain_mask, NAME_displacement (mm vectors), NAME_log_jacobian, NAME_uncertainty, "
                    "NAME_guidance_mask, NAME_lesions_fprNN (calibrated thresholds), NAME_summary.json and "
                    "NAME_preview.png into --out (see docs/inference.md); NAME = the input's file name without "
                    "its suffix. Two inputs with the same NAME are refused; existing outputs are never replaced "
                    "without --overwrite, and an input whose outputs all exist is skipped (rerunning an "
                    "interrupted predict completes the rest).")
    p.add_argument("--run", type=Path, required=True, metavar="RUN_DIR")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--brain-mask", type=Path, action="append", default=None, metavar="MASK",
                   help="brain mask on the input's grid (> 0 = brain), one per input in order (default: derived)")
    _guidance_option(p, "default: the run's calibrated setting")
    p.set_defaults(func=cmd_predict)

    c = sub.add_parser(
        "calibrate", help="fit and save what inference needs (healthy normaliser, FPR thresholds) in a run",
        description="Fits the healthy normaliser of the estimator on healthy val calibration subjects and the "
                    "anomaly thresholds at 1/2/5%% healthy FPR on the other val subjects; writes "
                    "RUN_DIR/calibration/ (JSON + NPZ). Also run at the end of `anomorph fit`.")
    c.add_argument("--run", type=Path, required=True, metavar="RUN_DIR")
    c.add_argument("--data", type=Path, default=None, metavar="MANIFEST",
                   help="manifest whose val split calibrates (default: the run's data.manifest)")
    c.add_argument("--checkpoint", choices=["best", "last"], default="best")
    c.add_argument("--calibration-fraction", type=float, default=0.5,
                   help="share of healthy val subjects that fit the normaliser (the rest set thresholds)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--estimator-option", action="append", metavar="ESTIMATOR.KEY=VALUE",
                   help="estimator option, e.g. mc_dropout.passes=8 (repeatable)")
    _guidance_option(c, "default: the run's guidance.strategy")
    c.set_defaults(func=cmd_calibrate)


def _estimator_name(text: str) -> str:
    """argparse type of ``--uncertainty``: an estimator name or a combination of known ones."""
    from ..errors import ConfigError
    from ..uncertainty import canonical_estimator_name, estimator_parts
    from ..uncertainty.estimators import ESTIMATORS

    try:
        unknown = [part for part in estimator_parts(text) if part not in ESTIMATORS]
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown estimator(s) {unknown}; expected one of {sorted(ESTIMATORS)} "
                                         f"or a combination of them such as max(warped_residual,noncorrespondence)")
    return canonical_estimator_name(text)
