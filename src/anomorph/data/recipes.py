"""Dataset recipes: find the raw subjects of a public dataset by its published layout and file names.

Each recipe turns a dataset folder, as its users download and unpack it, into
:class:`~anomorph.data.prepare.RawSubject` records plus the preprocessing defaults that suit it;
:func:`prepare_layout` runs :func:`~anomorph.data.prepare.prepare_dataset` on them. Layouts
(``root`` is the folder you give; ``**/`` means at any depth):

``ixi``
    ``**/IXI<nnn>-<site>-<nnnn>-<MOD>.nii.gz`` (MOD = T1, T2 or PD); all healthy. The demographics
    sheet ``IXI.xls`` (or a CSV export ``IXI.csv``) anywhere under ``root`` adds age and sex to
    the provenance.
``brats``
    BraTS 2021: ``**/BraTS2021_<nnnnn>/BraTS2021_<nnnnn>_<mod>.nii.gz`` (t1, t1ce, t2, flair) with
    ``..._seg.nii.gz``; labels 1, 2, 4 merged into one lesion mask. Subjects without a
    segmentation (the validation release) are left out, with a note.
``atlas``
    ATLAS v2.0 (BIDS, already in MNI152NLin2009aSym space, so registration defaults to ``none``):
    ``**/sub-<id>/ses-<n>/anat/sub-<id>_ses-<n>_space-MNI152NLin2009aSym_T1w.nii.gz`` with
    ``..._label-L_desc-T1lesion_mask.nii.gz``. Subjects without a mask (the test release) are
    left out, with a note.
``mslub``
    MSLUB (Lesjak et al. 2018): ``**/patient<nn>/<MOD>.nii.gz`` (T1W, T1WKS, T2W, FLAIR) with
    ``consensus_gt.nii.gz``; the ``raw`` copy is used when ``raw/`` and other copies both exist.
``wmh``
    MICCAI 2017 WMH challenge: ``**/<site>/<id>/pre/<MOD>.nii.gz`` (T1, FLAIR) with
    ``<site>/<id>/wmh.nii.gz``; label 1 is the lesion, label 2 ("other pathology") is not counted.
``bids``
    ``**/sub-*/[ses-*/]anat/*_<suffix>.nii.gz`` outside ``derivatives/``; a lesion mask is any
    ``*_mask.nii.gz`` in the same folder or under ``derivatives/`` whose name starts with the
    image's name up to the suffix. Subjects without one are healthy.
``folder``
    ``root/<name>.nii[.gz]`` images and DICOM series folders ``root/<name>/`` (holding ``*.dcm``);
    a lesion mask is ``root/`` + ``mask_pattern`` with ``{stem}`` replaced by the image name
    (default ``{stem}_mask.nii.gz``). Images without a mask are healthy.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError
from .manifest import file_stem
from .prepare import PrepareConfig, PrepareReport, RawSubject, prepare_dataset

LAYOUTS = ("ixi", "brats", "atlas", "mslub", "wmh", "bids", "folder")
MODALITIES = {"ixi": ("T1", "T2", "PD"), "brats": ("t1", "t1ce", "t2", "flair"),
              "mslub": ("T1W", "T1WKS", "T2W", "FLAIR"), "wmh": ("T1", "FLAIR")}
DEFAULT_MODALITY = {"ixi": "T1", "brats": "t1", "mslub": "T1W", "wmh": "T1"}


@dataclass
class Recipe:
    """What a layout found: subjects, preprocessing defaults for this dataset, and notes."""

    layout: str
    subjects: list[RawSubject]
    defaults: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _nifti_files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file())


def _read_ixi_demographics(root: Path) -> tuple[dict[int, dict], str | None]:
    """IXI_ID → {"age", "sex"} from ``IXI.xls`` (or a CSV export ``IXI.csv``), and a note."""
    sheets = sorted(root.rglob("IXI.xls")) + sorted(root.rglob("IXI.csv"))
    if not sheets:
        return {}, None
    sheet = sheets[0]
    try:
        if sheet.suffix == ".xls":
            import xlrd

            table = xlrd.open_workbook(str(sheet)).sheet_by_index(0)
            header = [str(v).strip() for v in table.row_values(0)]
            records = [dict(zip(header, table.row_values(i))) for i in range(1, table.nrows)]
        else:
            with sheet.open(newline="", encoding="utf-8-sig") as handle:
                records = [{(k or "").strip(): v for k, v in r.items()} for r in csv.DictReader(handle)]
    except Exception as err:  # xlrd/csv raise many types for corrupt sheets
        raise DataError(f"{sheet}: cannot read the IXI demographics sheet ({type(err).__name__}: {err})") from err
    out: dict[int, dict] = {}
    for record in records:
        try:
            ixi_id = int(float(record.get("IXI_ID", "")))
        except (TypeError, ValueError):
            continue
        sex_key = next((k for k in record if k.startswith("SEX_ID")), "")
        sex = {"1": "male", "2": "female"}.get(str(record.get(sex_key, "")).split(".")[0], "")
        try:
            age = round(float(record.get("AGE", "")), 2)
        except (TypeError, ValueError):
            age = None
        out[ixi_id] = {"sex": sex, "age": age}
    return out, f"demographics: {len(out)} row(s) from {sheet}"


def ixi(root: Path, modality: str = "T1") -> Recipe:
    pattern = re.compile(rf"^(IXI(\d+)-[A-Za-z]+-\d+)-{re.escape(modality)}\.nii(\.gz)?$")
    demographics, note = _read_ixi_demographics(root)
    subjects = []
    for path in _nifti_files(root, f"IXI*-{modality}.nii*"):
        match = pattern.match(path.name)
        if match:
            info = dict(demographics.get(int(match.group(2)), {}))
            subjects.append(RawSubject(match.group(1), path, healthy=True, info=info))
    return Recipe("ixi", subjects, notes=[note] if note else [])


def brats(root: Path, modality: str = "t1") -> Recipe:
    subjects, missing = [], []
    for path in _nifti_files(root, f"*_{modality}.nii*"):
        name = re.sub(rf"_{re.escape(modality)}\.nii(\.gz)?$", "", path.name)
        if not name.startswith("BraTS"):
            continue
        seg = next((p for p in (path.parent / f"{name}_seg.nii.gz", path.parent / f"{name}_seg.nii") if p.is_file()), None)
        if seg is None:
            missing.append(name)
            continue
        subjects.append(RawSubject(name, path, seg, healthy=False, lesion_type="glioma"))
    notes = [f"{len(missing)} subject(s) without *_seg.nii.gz left out (e.g. {missing[0]})"] if missing else []
    # BraTS volumes are co-registered to SRI24 and skull-stripped: an affine to MNI152 suffices.
    return Recipe("brats", subjects, notes=notes)


def _bids(root: Path, suffix: str, lesion_type: str, layout: str, mask_required: bool = False) -> Recipe:
    subjects, missing = [], []
    derivatives = [p for p in _nifti_files(root, "*_mask.nii*") if "derivatives" in p.parts]
    for path in _nifti_files(root, f"sub-*_{suffix}.nii*"):
        if "derivatives" in path.relative_to(root).parts or path.parent.name != "anat":
            continue
        prefix = re.sub(rf"_{re.escape(suffix)}\.nii(\.gz)?$", "", path.name)
        candidates = [p for p in path.parent.glob(f"{prefix}_*mask.nii*")] + \
            [p for p in derivatives if p.name.startswith(prefix + "_")]
        mask = sorted(candidates)[0] if candidates else None
        if mask is None and mask_required:
            missing.append(prefix)
            continue
        subjects.append(RawSubject(prefix, path, mask, healthy=mask is None,
                                   lesion_type=lesion_type if mask is not None else ""))
    notes = [f"{len(missing)} subject(s) without a lesion mask left out (e.g. {missing[0]})"] if missing else []
    return Recipe(layout, subjects, notes=notes)


def atlas(root: Path) -> Recipe:
    recipe = _bids(root, "T1w", "stroke", "atlas", mask_required=True)
    for s in recipe.subjects:  # sub-r001s001_ses-1_space-MNI152NLin2009aSym → sub-r001s001_ses-1
        s.subject = s.subject.replace("_space-MNI152NLin2009aSym", "")
    recipe.defaults = {"registration": "none"}
    recipe.notes.append("ATLAS v2.0 is already in MNI152NLin2009aSym space: registration 'none' by default")
    return recipe


def bids(root: Path, suffix: str = "T1w") -> Recipe:
    return _bids(root, suffix, "lesion", "bids")


def mslub(root: Path, modality: str = "T1W") -> Recipe:
    found = [p for p in _nifti_files(root, f"{modality}.nii*") if re.match(r"^patient\d+$", p.parent.name)]
    if any("raw" in p.relative_to(root).parts for p in found):
        found = [p for p in found if "raw" in p.relative_to(root).parts]
    subjects = []
    for path in found:
        gt = next((p for p in (path.parent / "consensus_gt.nii.gz", path.parent / "consensus_gt.nii") if p.is_file()), None)
        subjects.append(RawSubject(path.parent.name, path, gt, healthy=gt is None,
                                   lesion_type="ms" if gt is not None else ""))
    return Recipe("mslub", subjects)


def wmh(root: Path, modality: str = "T1") -> Recipe:
    subjects, missing = [], []
    for path in _nifti_files(root, f"{modality}.nii*"):
        if path.parent.name != "pre":
            continue
        case = path.parent.parent
        mask = next((p for p in (case / "wmh.nii.gz", case / "wmh.nii") if p.is_file()), None)
        name = f"{case.parent.name}_{case.name}"
        if mask is None:
            missing.append(name)
            continue
        subjects.append(RawSubject(name, path, mask, healthy=False, lesion_type="wmh", mask_labels=(1,)))
    notes = [f"{len(missing)} case(s) without wmh.nii.gz left out (e.g. {missing[0]})"] if missing else []
    return Recipe("wmh", subjects, notes=notes)


def folder(root: Path, mask_pattern: str = "{stem}_mask.nii.gz") -> Recipe:
    if "{stem}" not in mask_pattern:
        raise ConfigError(f"mask pattern {mask_pattern!r} must contain '{{stem}}'")
    mask_regex = re.compile("^" + re.escape(mask_pattern).replace(re.escape("{stem}"), "(.+)") + "$")
    subjects = []
    entries = sorted(root.iterdir())
    for entry in entries:
        rel = entry.relative_to(root).as_posix()
        if entry.is_file() and entry.name.lower().endswith((".nii", ".nii.gz")) and not mask_regex.match(rel):
            stem, image = file_stem(entry), entry
        elif entry.is_dir() and any(entry.glob("*.dcm")):
            stem, image = entry.name, entry
        else:
            continue
        mask = root / mask_pattern.format(stem=stem)
        mask = mask if mask.is_file() else None
        subjects.append(RawSubject(stem, image, mask, healthy=mask is None,
                                   lesion_type="lesion" if mask is not None else ""))
    return Recipe("folder", subjects)


def find_subjects(layout: str, root: str | Path, modality: str | None = None,
                  mask_pattern: str = "{stem}_mask.nii.gz", suffix: str = "T1w") -> Recipe:
    """Scan ``root`` with the named layout (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if modality is not None and layout in MODALITIES and modality not in MODALITIES[layout]:
        raise ConfigError(f"layout {layout!r}: modality {modality!r} is not one of {MODALITIES[layout]}")
    if modality is not None and layout not in MODALITIES:
        raise ConfigError(f"layout {layout!r} has no --modality option")
    if layout == "folder":
        recipe = folder(root, mask_pattern)
    elif layout == "bids":
        recipe = bids(root, suffix)
    elif layout == "atlas":
        recipe = atlas(root)
    else:
        recipe = {"ixi": ixi, "brats": brats, "mslub": mslub, "wmh": wmh}[layout](
            root, modality or DEFAULT_MODALITY[layout])
    if not recipe.subjects:
        raise DataError(f"layout {layout!r}: no subjects found under {root} (see docs/datasets.md for the "
                        "expected file names)")
    return recipe


def prepare_layout(layout: str, root: str | Path, out_dir: str | Path, overrides: dict | None = None,
                   seed: int = 0, healthy_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                   lesion_val_fraction: float = 0.3, progress: bool = False, resume: bool = True,
                   **find_options) -> tuple[Recipe, PrepareReport]:
    """Find the subjects of ``root`` by ``layout`` and prepare them into ``out_dir``.

    ``overrides`` are :class:`PrepareConfig` fields; they win over the recipe's defaults (e.g.
    ATLAS's ``registration='none'``), which win over the :class:`PrepareConfig` defaults.
    """
    def make_config(values: dict) -> PrepareConfig:
        try:
            config = PrepareConfig(**values)
        except TypeError as err:
            raise ConfigError(f"unknown prepare option ({err})") from err
        config.validate()
        return config

    make_config(overrides or {})  # bad options fail before the folder is scanned
    recipe = find_subjects(layout, root, **find_options)
    config = make_config({**recipe.defaults, **(overrides or {})})
    report = prepare_dataset(recipe.subjects, out_dir, config, seed=seed, healthy_fractions=healthy_fractions,
                             lesion_val_fraction=lesion_val_fraction, progress=progress, resume=resume)
    return recipe, report


def merge_manifests(manifests: list[str | Path], out: str | Path) -> Path:
    """Concatenate prepared manifests into one study manifest (e.g. IXI train + BraTS test).

    Every input is validated; paths are rewritten relative to ``out``'s folder; splits, labels and
    lesion types are kept. Subject names must be unique across the inputs.
    """
    import os

    from .manifest import read_manifest, write_manifest

    out = Path(out)
    if not manifests:
        raise DataError("merge: give at least one manifest")
    base = out.resolve().parent
    rows: list[dict[str, str]] = []
    seen: dict[str, Path] = {}
    for manifest in manifests:
        for row in read_manifest(manifest):
            if row.subject in seen:
                raise DataError(f"{manifest}: row {row.row}, field 'subject': {row.subject!r} also appears in "
                                f"{seen[row.subject]}; subject names must be unique")
            seen[row.subject] = Path(manifest)

            def rel(path: Path | None) -> str:
                return "" if path is None else os.path.relpath(path.resolve(), base)

            rows.append({"image": rel(row.image), "split": row.split, "mask": rel(row.mask),
                         "brain_mask": rel(row.brain_mask), "healthy": rel(row.healthy),
                         "label": "" if row.label is None else str(row.label), "subject": row.subject,
                         "lesion_type": row.lesion_type})
    base.mkdir(parents=True, exist_ok=True)
    write_manifest(out, rows)
    read_manifest(out)
    return out
