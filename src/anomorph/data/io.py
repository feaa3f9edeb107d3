"""Load image files (NIfTI, PNG, JPG) into canonical float32 arrays with clear errors.

Every image becomes a 3D array ``(X, Y, Z)``: NIfTI volumes are reoriented to the closest
canonical (RAS+) orientation first; 2D NIfTI and PNG/JPG images become ``(H, W, 1)`` so that
slicing along the last axis yields the image itself. Writing results back inverts this exactly
(:func:`to_source_orientation`).

Conversions (documented, not errors): 16-bit PNG → float intensities as stored; RGB/RGBA PNG or
JPG → grayscale by ITU-R 601 luma (PIL ``convert("L")``) unless all colour channels are equal,
in which case one channel is used; a trailing singleton 4th NIfTI dimension is dropped.
Rejected: 4D volumes with more than one frame, empty (zero-size) images, non-finite voxels,
unreadable or truncated files, and images larger than :data:`MAX_VOXELS` voxels (environment
variable ``ANOMORPH_MAX_VOXELS``). Before any voxel is read, a NIfTI header's declared data size
is checked against the file (``.nii``: the file size; ``.nii.gz``: the gzip ISIZE trailer, then
a bounded streaming read if that disagrees), so a few-KB file declaring a huge volume is an
error, not a memory bomb.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import DataError, missing_reason


DEFAULT_MAX_VOXELS = 2**27  # 134 M voxels (512 MiB as float32); a 256³ MRI is 16.8 M


def max_voxels() -> int:
    """The voxel limit: ``ANOMORPH_MAX_VOXELS`` if set (a positive integer), else 2**27."""
    raw = os.environ.get("ANOMORPH_MAX_VOXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(raw)
    except ValueError:
        raise DataError(f"environment variable ANOMORPH_MAX_VOXELS={raw!r} is not an integer") from None
    if value <= 0:
        raise DataError(f"environment variable ANOMORPH_MAX_VOXELS={raw!r} must be positive")
    return value


def _check_voxels(shape: tuple[int, ...]) -> int:
    count = 1
    for side in shape:
        count *= int(side)
    limit = max_voxels()
    if count > limit:
        raise DataError(f"declared shape {shape} is {count:,} voxels, over the limit of {limit:,} "
                        f"(set ANOMORPH_MAX_VOXELS to raise it)")
    return count


def _gzip_payload_at_least(path: Path, needed: int) -> int:
    """Uncompressed size of a gzip file, read in bounded chunks and stopped once ``needed`` bytes
    are reached (so it never costs more than the data the header promises)."""
    import gzip

    total = 0
    with gzip.open(path, "rb") as handle:
        while total < needed:
            chunk = handle.read(min(1 << 20, needed - total))
            if not chunk:
                break
            total += len(chunk)
    return total


def _check_nifti_size(path: Path, img) -> None:
    """The declared voxel data must fit the file before anything is allocated."""
    header = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    count = _check_voxels(shape)
    needed = int(header.get_data_offset()) + count * int(header.get_data_dtype().itemsize)
    if path.name.lower().endswith(".gz"):
        with path.open("rb") as handle:
            handle.seek(-4, os.SEEK_END)
            isize = int.from_bytes(handle.read(4), "little")  # uncompressed size mod 2**32
        if needed < 2**32 and isize >= needed:
            return
        have = _gzip_payload_at_least(path, needed)
    else:
        have = path.stat().st_size
    if have < needed:
        raise DataError(f"header declares shape {shape} of {header.get_data_dtype()} ({needed:,} bytes with "
                        f"the header) but the file holds only {have:,} bytes (truncated or a bogus header)")


@dataclass(frozen=True)
class ImageGeometry:
    """The on-disk geometry of a loaded image.

    ``affine`` is the original 4×4 voxel-to-world matrix (mm; identity for PNG/JPG),
    ``source_shape`` the on-disk array shape, ``orientation`` the nibabel orientation array
    (``io_orientation``) of the original affine, ``is_2d`` True for PNG/JPG and 2D NIfTI.
    """

    path: str
    affine: np.ndarray
    source_shape: tuple[int, ...]
    orientation: np.ndarray
    is_2d: bool
    kind: str  # "nifti" or "raster"


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _load_nifti(path: Path) -> tuple[np.ndarray, ImageGeometry]:
    import nibabel as nib
    from nibabel.orientations import io_orientation

    img = nib.load(str(path))  # reads the header only
    _check_nifti_size(path, img)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
        shape = shape[:3]
    if len(shape) not in (2, 3):
        raise DataError(f"expected a 2D or 3D image, got shape {shape} (a 4D series is not supported)")
    if min(shape) == 0:
        raise DataError(f"empty image (shape {shape})")
    if len(shape) == 2:
        data = np.asarray(img.dataobj, dtype=np.float32)[:, :, None]
        geometry = ImageGeometry(str(path), np.asarray(img.affine, float), shape,
                                 np.array([[0, 1], [1, 1]], float), True, "nifti")
        return data, geometry
    affine = np.asarray(img.affine, float)
    if not np.isfinite(affine).all() or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise DataError(f"the voxel-to-world affine is not usable (NaN/inf or a zero voxel size: "
                        f"{np.round(affine[:3, :3], 4).tolist()}); fix the header's pixdim/qform/sform")
    orientation = io_orientation(img.affine)
    canonical = nib.as_closest_canonical(img)
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    geometry = ImageGeometry(str(path), np.asarray(img.affine, float), shape, orientation, False, "nifti")
    return data, geometry


def _load_raster(path: Path) -> tuple[np.ndarray, ImageGeometry]:
    from PIL import Image

    with Image.open(path) as pil:
        _check_voxels(tuple(pil.size))
        pil.load()
        mode = pil.mode
        if mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
            rgb = np.asarray(pil.convert("RGB"))
            if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
                data = rgb[..., 0].astype(np.float32)
            else:
                data = np.asarray(pil.convert("L"), dtype=np.float32)
        else:  # "L", "I", "I;16", "F", "1"
            data = np.asarray(pil, dtype=np.float32)
    if data.ndim != 2 or data.size == 0:
        raise DataError(f"expected a non-empty 2D image, got shape {data.shape}")
    geometry = ImageGeometry(str(path), np.eye(4), tuple(data.shape), np.array([[0, 1], [1, 1]], float), True, "raster")
    return data[:, :, None], geometry


def load_image(path: Path, where: str = "") -> tuple[np.ndarray, ImageGeometry]:
    """Load ``path`` as a canonical float32 ``(X, Y, Z)`` array and its geometry.

    ``where`` (e.g. "manifest.csv: row 3, field 'image'") prefixes every error message.
    Raises :class:`DataError` for unreadable, truncated, empty, 4D or non-finite images.
    """
    prefix = f"{where}, file {path}" if where else f"file {path}"
    if not path.is_file():
        reason = missing_reason(path)
        raise DataError(f"{prefix}: {'file not found' if reason.startswith('file not found') else reason}")
    try:
        data, geometry = _load_nifti(path) if is_nifti(path) else _load_raster(path)
    except DataError as err:
        raise DataError(f"{prefix}: {err}") from err
    except Exception as err:  # nibabel/PIL/gzip raise many types for corrupt files
        raise DataError(f"{prefix}: cannot read ({type(err).__name__}: {err})") from err
    finite = np.isfinite(data)
    if not finite.all():
        raise DataError(f"{prefix}: {int((~finite).sum())} non-finite voxel(s) (NaN or inf)")
    return data, geometry


def to_source_orientation(canonical: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Map a canonical ``(X, Y, Z)`` array back onto the image's on-disk array layout."""
    if geometry.is_2d:
        return canonical[:, :, 0]
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    to_source = ornt_transform(axcodes2ornt(("R", "A", "S")), geometry.orientation)
    return np.ascontiguousarray(apply_orientation(canonical, to_source))


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a partial file.

    The temporary name keeps ``path``'s full suffix (``.nii.gz`` stays gzip for nibabel).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def write_json(path: Path, payload: Any, allow_nan: bool = True) -> Path:
    """``payload`` as indented JSON (+ newline) at ``path``, atomically; the parent folder is created."""
    text = json.dumps(payload, indent=2, allow_nan=allow_nan) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_like(array: np.ndarray, geometry: ImageGeometry, path: Path) -> Path:
    """Write a canonical-layout ``(X, Y, Z)`` array as NIfTI onto the source grid of ``geometry``.

    The output has the source's array layout and affine, so it overlays on the input in
    ITK-SNAP / FSLeyes (raster sources get an identity affine).
    """
    import nibabel as nib

    source = to_source_orientation(array, geometry).astype(np.float32)
    image = nib.Nifti1Image(source, geometry.affine)
    return atomic_write(Path(path), lambda tmp: nib.save(image, str(tmp)))
