"""``anomorph fit`` and ``anomorph fit-head``."""
from __future__ import annotations

import argparse
from pathlib import Path


def _devices(value: str):
    if value == "auto":
        return value
    if "," in value:
        return [int(v) for v in value.split(",") if v]
    return int(value)


def cmd_fit(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..training import fit, fit_ensemble, is_ensemble

    trainer = dict(devices=args.devices, strategy=args.strategy, accelerator=args.accelerator)
    if args.resume is not None and is_ensemble(args.resume):
        if args.config is not None or args.overrides:
            print("note: --resume uses the members' saved config.yaml; --config and overrides are ignored")
        run_dir = fit_ensemble(None, 0, run_dir=args.resume, resume=True, **trainer)
        print(f"ensemble directory: {run_dir} (members listed in {run_dir / 'ensemble.yaml'})")
        return 0
    if args.ensemble is not None and args.resume is None:
        run_dir = fit_ensemble(load_config(args.config, args.overrides), args.ensemble, run_dir=args.run_dir,
                               **trainer)
        print(f"ensemble directory: {run_dir} (members listed in {run_dir / 'ensemble.yaml'})")
        print("each member RUN_DIR/memberK is an ordinary run directory (seed + K)")
        return 0
    if args.resume is not None:
        if args.config is not None or args.overrides:
            print("note: --resume uses the run's saved config.yaml; --config and overrides are ignored")
        run_dir = fit(load_config(args.resume / "config.yaml"), run_dir=args.resume, resume=True,
                      devices=args.devices, strategy=args.strategy, accelerator=args.accelerator)
    else:
        config = load_config(args.config, args.overrides)
        run_dir = fit(config, run_dir=args.run_dir, devices=args.devices, strategy=args.strategy,
                      accelerator=args.accelerator)
    print(f"run directory: {run_dir}")
    print(f"checkpoints: {run_dir / 'checkpoints'} (best.ckpt, last.ckpt); logs: {run_dir / 'logs'}")
    return 0


def cmd_fit_head(args: argparse.Namespace) -> int:
    from ..training.noncorrespondence import HeadSettings, fit_head
    from .main import _dataclass_from_args

    settings = _dataclass_from_args(HeadSettings, args)
    out = fit_head(args.run, settings, manifest=args.data, overwrite=args.overwrite)
    print(f"non-correspondence head: {out} (head.pt, head.json)")
    print(f"use it: anomorph predict --run {args.run} --guidance gating --estimator noncorrespondence ...")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..training.noncorrespondence import HeadSettings
    from .main import _add_dataclass_options

    h = sub.add_parser(
        "fit-head", help="train the learned non-correspondence head (u estimator 'noncorrespondence') of a run",
        description="Train a small U-Net that reads (x, x̂, x̃) of a trained deformable run and segments synthetic "
                    "anomalies pasted into its healthy training slices; the run stays frozen. Writes "
                    "RUN/noncorrespondence/head.pt and head.json.")
    h.add_argument("--run", type=Path, required=True, help="a trained morphaeus run directory")
    h.add_argument("--data", type=Path, default=None, help="manifest with the healthy train slices (default: the run's)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing head")
    _add_dataclass_options(h, HeadSettings)
    h.set_defaults(func=cmd_fit_head)

    p = sub.add_parser(
        "fit", help="train a model from a YAML config",
        description="Train a model. Overrides are KEY=VALUE with dotted keys and YAML values, e.g. "
                    "train.max_epochs=5 data.manifest=phantom/manifest.csv model.latent_dim=128.")
    p.add_argument("--config", type=Path, default=None, help="YAML config, e.g. configs/morphaeus.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default: OUTPUT_DIR/NAME)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its last checkpoint")
    p.add_argument("--ensemble", type=int, default=None, metavar="K",
                   help="train a deep ensemble of K runs (seeds seed..seed+K-1) into RUN_DIR/member0..K-1 "
                        "with RUN_DIR/ensemble.yaml; --resume RUN_DIR continues an ensemble")
    p.add_argument("--accelerator", default=None, help="Lightning accelerator: auto, cpu, gpu (default: config)")
    p.add_argument("--devices", type=_devices, default=None, help="number of devices, 'auto' or a list '0,1'")
    p.add_argument("--strategy", default=None, help="Lightning strategy, e.g. ddp (default: config)")
    p.set_defaults(func=cmd_fit)
