"""``anomorph`` console script. Every subcommand calls one public Python function."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import typing
from pathlib import Path

from ..errors import AnomorphError


# OSErrors caused by the user's environment (permissions, a full or read-only disk, a path that
# is a directory), not by a bug: one line, exit code 2, like every other user error.
USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR,
                  errno.ENOTDIR, errno.ENOENT, errno.ELOOP, errno.ENAMETOOLONG, errno.EEXIST}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


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


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import PrepareConfig
    from ..data.recipes import prepare_layout

    overrides = {f.name: (tuple(v) if isinstance(v, list) else v) for f in dataclasses.fields(PrepareConfig)
                 if (v := getattr(args, f.name, None)) is not None}
    find_options = {"mask_pattern": args.mask_pattern, "suffix": args.suffix}
    if args.modality is not None:
        find_options["modality"] = args.modality
    recipe, report = prepare_layout(
        args.layout, args.root, args.out, overrides, seed=args.split_seed,
        healthy_fractions=tuple(args.healthy_split), lesion_val_fraction=args.lesion_val_fraction,
        progress=not args.quiet, resume=not args.no_resume, **find_options)
    print(f"{args.layout}: {len(recipe.subjects)} subject(s) found under {args.root}")
    for note in recipe.notes:
        print(f"note: {note}")
    print(report.format())
    if report.manifest is not None:
        print(f"wrote {report.manifest}")
    if report.failed:
        names = ", ".join(f"{s} ({m})" for s, m in report.failed[:3])
        more = f" and {len(report.failed) - 3} more" if len(report.failed) > 3 else ""
        raise UserError(f"{len(report.failed)} of {len(recipe.subjects)} subject(s) failed: {names}{more}; "
                        f"listed in {Path(args.out) / 'prepare_failures.txt'}")
    print(f"next: anomorph data check {report.manifest}")
    return 0


def cmd_data_to_native(args: argparse.Namespace) -> int:
    from ..data.prepare import to_native

    out = to_native(args.map, args.provenance, args.out,
                    interpolation="nearest" if args.nearest else "linear", reference=args.reference)
    print(f"wrote {out}")
    return 0


def cmd_data_merge(args: argparse.Namespace) -> int:
    from ..data.recipes import merge_manifests

    out = merge_manifests(args.manifests, args.out)
    print(f"wrote {out}")
    print(f"next: anomorph data check {out}")
    return 0


def _register_prepare(data_sub) -> None:
    from ..data.prepare import PrepareConfig
    from ..data.recipes import LAYOUTS

    prepare = data_sub.add_parser(
        "prepare", help="raw scans → preprocessed MNI152-space volumes + manifest.csv",
        description="Find the subjects of ROOT by --layout, then bias-correct (N4), register to the "
                    "MNI152 template, skull-strip, resample and standardise each one (SimpleITK); write "
                    "images/, masks/, brain_masks/, transforms/, provenance/ and manifest.csv into --out. "
                    "Reruns skip finished subjects. See docs/datasets.md.")
    prepare.add_argument("root", type=Path, help="dataset folder as downloaded and unpacked")
    prepare.add_argument("--layout", required=True, choices=LAYOUTS, help="dataset layout (recipe)")
    prepare.add_argument("--out", required=True, type=Path, help="output folder")
    prepare.add_argument("--modality", default=None,
                         help="ixi: T1|T2|PD; brats: t1|t1ce|t2|flair; mslub: T1W|T1WKS|T2W|FLAIR; wmh: T1|FLAIR")
    prepare.add_argument("--mask-pattern", default="{stem}_mask.nii.gz",
                         help="folder layout: mask path relative to ROOT, {stem} = image name")
    prepare.add_argument("--suffix", default="T1w", help="bids layout: image suffix (default T1w)")
    prepare.add_argument("--split-seed", type=int, default=0, help="seed of the subject-level split (default 0)")
    prepare.add_argument("--healthy-split", type=float, nargs=3, default=(0.7, 0.1, 0.2),
                         metavar=("TRAIN", "VAL", "TEST"), help="fractions of healthy subjects (default 0.7 0.1 0.2)")
    prepare.add_argument("--lesion-val-fraction", type=float, default=0.3,
                         help="fraction of lesion subjects in val; the rest go to test (default 0.3)")
    prepare.add_argument("--no-resume", action="store_true", help="prepare every subject again")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_dataclass_options(prepare, PrepareConfig)
    prepare.set_defaults(func=cmd_data_prepare)

    native = data_sub.add_parser(
        "to-native", help="map a template-space map (e.g. a predicted anomaly map) onto the raw scan",
        description="Resample MAP (on a prepared subject's MNI152 grid) onto that subject's raw grid "
                    "with the inverse transform stored by 'data prepare'; the output overlays the raw "
                    "scan in ITK-SNAP / FSLeyes.")
    native.add_argument("map", type=Path, help="NIfTI map on the prepared (template) grid")
    native.add_argument("--provenance", required=True, type=Path, help="OUT/provenance/<subject>.json")
    native.add_argument("--out", required=True, type=Path, help="output NIfTI on the raw grid")
    native.add_argument("--nearest", action="store_true", help="nearest-neighbour (for label masks)")
    native.add_argument("--reference", type=Path, default=None,
                        help="the raw image (default: its grid as recorded in the provenance)")
    native.set_defaults(func=cmd_data_to_native)

    merge = data_sub.add_parser(
        "merge", help="concatenate prepared manifests into one study (e.g. IXI train + BraTS test)",
        description="Validate each MANIFEST, rewrite its paths relative to --out and write one manifest; "
                    "splits are kept, subject names must be unique.")
    merge.add_argument("manifests", type=Path, nargs="+", metavar="MANIFEST")
    merge.add_argument("--out", required=True, type=Path, help="output manifest.csv")
    merge.set_defaults(func=cmd_data_merge)


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
    _register_prepare(data_sub)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list:
    from . import benchmark, evaluation, train

    return [train.register, evaluation.register, benchmark.register]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..runtime import configure_threads, set_announcer

    # threads are set now; the one stderr line comes when fit / evaluate / predict start working
    # (after their inputs were checked, so a user error stays one line)
    set_announcer(lambda line: print(line, file=sys.stderr, flush=True))
    configure_threads(log=False)
    try:
        return int(args.func(args) or 0)
    except (AnomorphError, UserError) as err:
        print(f"anomorph: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in USER_OS_ERRORS:
            raise
        where = err.filename if err.filename is not None else "a file"
        print(f"anomorph: error: cannot write or read {where}: {err.strerror or err} "
              f"({errno.errorcode.get(err.errno, err.errno)})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anomorph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
