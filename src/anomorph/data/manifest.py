"""Read and validate a dataset manifest (SPEC §2).

A manifest is a UTF-8 CSV with a header row. Required columns: ``image``, ``split``; optional:
``mask``, ``brain_mask``, ``healthy``, ``label``, ``subject``, ``lesion_type``. Relative paths
are resolved against the manifest's folder.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

REQUIRED_COLUMNS = ("image", "split")
OPTIONAL_COLUMNS = ("mask", "brain_mask", "healthy", "label", "subject", "lesion_type")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".png", ".jpg", ".jpeg")




@dataclass(frozen=True)
class ManifestRow:
    """One manifest row with paths resolved to absolute :class:`Path` objects.

    ``row`` is the 1-based data row number (the header is row 0), as a spreadsheet shows it
    minus one; ``line`` is the physical CSV line number. ``label`` is ``None`` when the column
    is absent or empty (it is then derived from the mask).
    """

    row: int
    line: int
    image: Path
    split: str
    mask: Path | None
    brain_mask: Path | None
    healthy: Path | None
    label: int | None
    subject: str
    lesion_type: str

    def where(self, manifest: Path | str, field: str | None = None, path: Path | None = None) -> str:
        """A location string for error messages: manifest, row, field and file."""
        parts = [f"{manifest}: row {self.row} (line {self.line})"]
        if field:
            parts.append(f"field '{field}'")
        if path is not None:
            parts.append(f"file {path}")
        return ", ".join(parts)


def missing_reason(path: Path) -> str:
    """Why ``path`` is not a readable file: a directory, a broken link or loop, or not there."""
    import errno
    import os

    if path.is_dir():
        return f"{path} is a directory, not an image file"
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return f"{path} is a symbolic link loop"
            return f"{path} is a broken symbolic link (target {os.readlink(path)!r} not found)"
    if path.exists() and not path.is_file():
        return f"{path} is not a regular file"
    return f"file not found: {path}"


def file_stem(path: Path) -> str:
    """The file name without its image suffix (``sub-01.nii.gz`` → ``sub-01``)."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _resolve(base: Path, value: str) -> Path | None:
    value = value.strip()
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def read_manifest(path: str | Path, require_train: bool = False) -> list[ManifestRow]:
    """Parse and validate ``manifest.csv``; raise :class:`DataError` naming row and field.

    Checks the header, split values, label values, the image suffix and that every referenced
    file exists. File *contents* (readability, finiteness, grids) are checked when loaded.
    ``require_train`` additionally demands at least one ``train`` row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    base = path.resolve().parent
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        row = f"row {line - 1} (line {line})" if line > 1 else "the header (line 1)"
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise DataError(f"{path}: {row}: not UTF-8 text (byte {raw[err.start]:#04x}, column {column}); "
                        f"save the manifest as UTF-8") from err
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        records = [(reader.line_num, rec) for rec in reader]
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err})") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: missing required column(s) {missing}; header is {header}")
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise DataError(
            f"{path}: unknown column(s) {unknown}; allowed: {list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}"
        )
    rows: list[ManifestRow] = []
    for index, (line, record) in enumerate(records, start=1):
        rec = {k.strip(): (v or "").strip() for k, v in record.items() if k is not None}
        if None in record:
            raise DataError(f"{path}: row {index} (line {line}) has more cells than the header")
        where = f"{path}: row {index} (line {line})"
        image_value = rec.get("image", "")
        if not image_value:
            raise DataError(f"{where}, field 'image': empty")
        image = _resolve(base, image_value)
        assert image is not None
        if not image.name.lower().endswith(IMAGE_SUFFIXES):
            raise DataError(f"{where}, field 'image': unsupported file type {image.name!r}; use {IMAGE_SUFFIXES}")
        split = rec.get("split", "")
        if split not in SPLITS:
            raise DataError(f"{where}, field 'split': {split!r} is not one of {SPLITS}")
        label_text = rec.get("label", "")
        label: int | None = None
        if label_text:
            if label_text not in ("0", "1"):
                raise DataError(f"{where}, field 'label': {label_text!r} is not 0 or 1")
            label = int(label_text)
        paths = {name: _resolve(base, rec.get(name, "")) for name in ("mask", "brain_mask", "healthy")}
        for name, file in [("image", image), *paths.items()]:
            if file is not None and not file.is_file():
                raise DataError(f"{where}, field '{name}': {missing_reason(file)}")
        rows.append(
            ManifestRow(
                row=index,
                line=line,
                image=image,
                split=split,
                mask=paths["mask"],
                brain_mask=paths["brain_mask"],
                healthy=paths["healthy"],
                label=label,
                subject=rec.get("subject", "") or file_stem(image),
                lesion_type=rec.get("lesion_type", ""),
            )
        )
    if not rows:
        raise DataError(f"{path}: no data rows")
    seen: dict[str, ManifestRow] = {}
    for row in rows:  # one file in two rows: a duplicate, or a leak when the splits differ
        key = os.path.realpath(row.image)
        first = seen.setdefault(key, row)
        if first is not row:
            what = (f"in split '{first.split}' and split '{row.split}': a leak between splits"
                    if first.split != row.split else "twice: a duplicate row")
            raise DataError(f"{path}: row {row.row} (line {row.line}), field 'image': {row.image} is also used by "
                            f"row {first.row} (line {first.line}), {what}")
    if require_train and not any(r.split == "train" for r in rows):
        raise DataError(f"{path}: the train split is empty (no row has split == 'train')")
    return rows


def write_manifest(path: str | Path, rows: list[dict[str, str]]) -> Path:
    """Write manifest rows (dicts keyed by column) atomically; columns in SPEC order."""
    path = Path(path)
    columns = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if any(c in r for r in rows)]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in columns})
    tmp.replace(path)
    return path
