"""``anomorph`` console script. Every subcommand calls one public Python function."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from ..errors import AnomorphError


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback, exit code 2."""


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Expose every scalar field of dataclass ``cls`` as ``--field-name``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default: {default})")
        elif kind in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                                help=f"(default: {default})")
        elif typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            parser.add_argument(flag, dest=f.name, type=inner, nargs="+", default=None,
                                metavar=f.name.upper(), help=f"(default: {default})")


def _dataclass_from_args(cls: type, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if getattr(args, f.name, None) is not None}
    for name, value in list(values.items()):
        if isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


def cmd_phantom(args: argparse.Namespace) -> int:
    from ..data.phantom import PhantomConfig, build_phantom

    config = _dataclass_from_args(PhantomConfig, args)
    manifest = build_phantom(args.out, config, progress=not args.quiet)
    print(f"wrote {manifest}")
    print(f"next: anomorph data check {manifest}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from ..data.slices import SliceConfig
    from ..data.summary import check_manifest

    config = SliceConfig(axis=args.axis, size=args.size,
                         slice_range=tuple(args.slice_range) if args.slice_range else None)
    summary = check_manifest(args.manifest, config)
    print(summary.format())
    print("OK: every row loaded and passed the checks")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="anomorph",
        description="Unsupervised anomaly detection in medical images with uncertainty-guided "
                    "deformable auto-encoders. See README.md and docs/.",
    )
    parser.add_argument("--version", action="version", version=f"anomorph {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    phantom = sub.add_parser("phantom", help="build the built-in brain phantom (NIfTI + manifest.csv)",
                             description="Build the MNI152-based brain phantom; every option is "
                                         "documented in docs/phantom.md.")
    phantom.add_argument("--out", required=True, type=Path, help="output folder")
    phantom.add_argument("--quiet", action="store_true", help="no progress bar")
    from ..data.phantom import PhantomConfig

    _add_dataclass_options(phantom, PhantomConfig)
    phantom.set_defaults(func=cmd_phantom)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    check = data_sub.add_parser("check", help="validate a manifest and print a summary",
                                description="Load every file of MANIFEST, check it (SPEC §2) and "
                                            "print rows/slices per split, lesion types, sizes, intensities.")
    check.add_argument("manifest", type=Path, help="path to manifest.csv")
    check.add_argument("--axis", type=int, default=-1, help="canonical axis to slice along (default -1)")
    check.add_argument("--size", type=int, default=128, help="slice size in pixels (default 128)")
    check.add_argument("--slice-range", type=int, nargs=2, metavar=("START", "STOP"), default=None)
    check.set_defaults(func=cmd_data_check)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list:
    from . import benchmark, evaluation, train

    return [train.register, evaluation.register, benchmark.register]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..runtime import configure_threads

    configure_threads(announce=lambda line: print(line, file=sys.stderr, flush=True))
    try:
        return int(args.func(args) or 0)
    except (AnomorphError, UserError) as err:
        print(f"anomorph: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anomorph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
