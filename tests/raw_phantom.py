"""Raw-looking test subjects with a *known* relation to MNI152 space, and miniature dataset layouts.

A subject is the nilearn MNI152 T1 template (brain only) with an optional bright spherical lesion,
seen through a random affine ``A`` (raw world point q ↦ template world point A(q), LPS mm), sampled
on a coarse, oblique raw grid, multiplied by a smooth bias field, with noise, stored as int16.
The lesion's raw-space ground truth is analytic: q is lesion iff ‖A(q) − c‖ ≤ r.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from anomorph.data.prepare import _template_1mm, keep_locale

LESION_CENTER_LPS = np.array([-26.0, 12.0, 22.0])  # MNI (26, -12, 22) RAS: right hemisphere white matter
LESION_RADIUS_MM = 14.0


@dataclass
class RawCase:
    image: sitk.Image          # raw scan (int16)
    mask: sitk.Image           # analytic lesion ground truth on the raw grid (uint8)
    unbiased: sitk.Image       # the same scan without the bias field (float32)
    bias: sitk.Image           # the multiplicative bias field (float32)
    raw_to_template: sitk.AffineTransform


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_affine(rng: np.random.Generator, max_rotation_deg: float = 10.0, scale=(0.92, 1.08),
                  max_translation_mm: float = 12.0) -> sitk.AffineTransform:
    matrix = _rotation(rng, max_rotation_deg) @ np.diag(rng.uniform(*scale, 3))
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix.ravel().tolist())
    transform.SetCenter((0.0, 18.0, 18.0))  # about the brain centre (LPS)
    transform.SetTranslation(rng.uniform(-max_translation_mm, max_translation_mm, 3).tolist())
    return transform


@functools.lru_cache(maxsize=4)
def template_with_lesion(lesion: bool = True, spacing: tuple = (1.0, 1.0, 1.0), lesion_gain: float = 1.7) -> sitk.Image:
    """The 1 mm template (bright lesion painted when ``lesion``), blurred for a ``spacing`` voxel."""
    t1, _ = _template_1mm()
    out = t1
    if lesion:
        arr = sitk.GetArrayFromImage(t1)
        wm = float(np.percentile(arr[arr > 0], 90))
        centre = np.array(t1.TransformPhysicalPointToIndex(LESION_CENTER_LPS.tolist()))[::-1]
        r = int(LESION_RADIUS_MM) + 3
        box = tuple(slice(c - r, c + r + 1) for c in centre)
        zz, yy, xx = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
        idx = np.stack([xx, yy, zz], -1).reshape(-1, 3)
        pts = np.array([t1.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in idx]).reshape(xx.shape + (3,))
        weight = np.clip(LESION_RADIUS_MM + 0.5 - np.linalg.norm(pts - LESION_CENTER_LPS, axis=-1), 0.0, 1.0)
        sub = arr[box]
        arr[box] = sub + weight * (lesion_gain * wm - sub) * (sub > 0)
        out = sitk.GetImageFromArray(arr.astype(np.float32))
        out.CopyInformation(t1)
    sigma = [0.4 * math.sqrt(max(s * s - 1.0, 0.0)) for s in spacing]
    return sitk.SmoothingRecursiveGaussian(out, [max(v, 0.01) for v in sigma]) if max(sigma) > 0 else out


def _physical_points(image: sitk.Image) -> np.ndarray:
    """(Z, Y, X, 3) LPS coordinates of every voxel centre (array order of GetArrayFromImage)."""
    size = image.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3).astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    pts = idx * np.array(image.GetSpacing()) @ direction.T + np.array(image.GetOrigin())
    return pts.reshape(size[0], size[1], size[2], 3).transpose(2, 1, 0, 3)


def raw_grid(spacing=(3.0, 3.5, 4.0), fov_mm=(200.0, 230.0, 200.0), oblique_deg: float = 0.0,
             sagittal: bool = True) -> sitk.Image:
    """A raw acquisition grid; ``sagittal`` permutes the axes (PIL-like storage order)."""
    direction = np.eye(3)
    if sagittal:  # i → anterior-posterior, j → inferior-superior, k → left-right: a sagittal stack
        direction = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
    c, s = math.cos(math.radians(oblique_deg)), math.sin(math.radians(oblique_deg))
    direction = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ direction
    size = [int(round(f / sp)) for f, sp in zip(np.abs(direction.T) @ np.array(fov_mm), spacing)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetDirection(direction.ravel().tolist())
    centre = np.array([0.0, 18.0, 18.0])
    extent = direction @ (np.array(spacing) * (np.array(size) - 1))
    grid.SetOrigin((centre - extent / 2).tolist())
    return grid


def make_raw_case(seed: int, spacing=(3.0, 3.5, 4.0), lesion: bool = True, bias_strength: float = 0.25,
                  sagittal: bool = True, oblique_deg: float = 8.0, scale: float = 1000.0,
                  in_mni: bool = False) -> RawCase:
    """``in_mni``: no random affine (identity) and an axial RAS grid: data already in MNI space."""
    rng = np.random.default_rng(seed)
    transform = random_affine(rng) if not in_mni else sitk.AffineTransform(3)
    if in_mni:
        sagittal, oblique_deg = False, 0.0
    grid = raw_grid(spacing, oblique_deg=oblique_deg, sagittal=sagittal)
    if in_mni:  # RAS+ on disk, like the MNI template and ATLAS v2.0
        grid.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        size = np.array(grid.GetSize())
        grid.SetOrigin((np.array([0.0, 18.0, 18.0]) - np.diag([-1, -1, 1]) @ (np.array(spacing) * (size - 1)) / 2).tolist())
    source = template_with_lesion(lesion, tuple(float(s) for s in spacing))  # blurred: coarse voxel's PSF
    unbiased = sitk.GetArrayFromImage(sitk.Resample(source, grid, transform, sitk.sitkLinear, 0.0)) * scale
    points = _physical_points(grid)
    unbiased = unbiased + np.abs(rng.normal(0, 0.01 * scale, unbiased.shape))
    # smooth multiplicative bias: low-order polynomial in raw world coordinates
    u = (points - points.reshape(-1, 3).mean(0)) / 100.0
    coeff = rng.uniform(-1, 1, 6)
    log_bias = bias_strength * (coeff[0] * u[..., 0] + coeff[1] * u[..., 1] + coeff[2] * u[..., 2]
                                + coeff[3] * u[..., 0] * u[..., 1] + coeff[4] * u[..., 2] ** 2 + coeff[5] * u[..., 1] ** 2)
    bias = np.exp(log_bias)
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    center, shift = np.array(transform.GetCenter()), np.array(transform.GetTranslation())
    template_points = (points - center) @ matrix.T + center + shift
    lesion_mask = (np.linalg.norm(template_points - LESION_CENTER_LPS, axis=-1) <= LESION_RADIUS_MM) if lesion else \
        np.zeros(bias.shape, bool)

    def wrap(arr: np.ndarray, pixel) -> sitk.Image:
        img = sitk.Cast(sitk.GetImageFromArray(arr.astype(np.float32)), pixel)
        img.CopyInformation(grid)
        return img

    return RawCase(image=wrap(np.rint(np.clip(unbiased * bias, 0, 32000)), sitk.sitkInt16),
                   mask=wrap(lesion_mask, sitk.sitkUInt8), unbiased=wrap(unbiased, sitk.sitkFloat32),
                   bias=wrap(bias, sitk.sitkFloat32), raw_to_template=transform)


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def landmark_error_mm(transform_path: Path, case: RawCase, step_vox: int = 6) -> tuple[float, float]:
    """Mean and max distance (mm) between the estimated template→raw map and the true one
    (A⁻¹) over template brain voxels on a lattice ``step_vox`` (1 mm voxels) apart."""
    estimated = sitk.ReadTransform(str(transform_path))
    truth = case.raw_to_template.GetInverse()
    _, brain = _template_1mm()
    arr = sitk.GetArrayFromImage(brain)[::step_vox, ::step_vox, ::step_vox] > 0.5
    zyx = np.argwhere(arr) * step_vox
    pts = [brain.TransformIndexToPhysicalPoint([int(i) for i in v[::-1]]) for v in zyx]
    err = np.array([np.linalg.norm(np.subtract(estimated.TransformPoint(p), truth.TransformPoint(p))) for p in pts])
    return float(err.mean()), float(err.max())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def template_space_truth(reference: sitk.Image) -> np.ndarray:
    """The lesion sphere on a template-space grid (array order of GetArrayFromImage)."""
    return np.linalg.norm(_physical_points(reference) - LESION_CENTER_LPS, axis=-1) <= LESION_RADIUS_MM


def centroid_mm(mask: sitk.Image) -> np.ndarray:
    """Centre of mass (LPS mm) of a binary mask."""
    arr = sitk.GetArrayFromImage(mask) > 0
    return _physical_points(mask)[arr].mean(0)


def write_dicom_series(image: sitk.Image, folder: Path) -> Path:
    """Write a 3D int16 image as a DICOM series (one file per slice), as scanners export it."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    series_uid = "1.2.826.0.1.3680043.2.1125.1." + str(abs(hash(str(folder))) % 10**12)
    with keep_locale():  # GDCM switches the process to the "C" locale
        _write_slices(image, folder, writer, orientation, series_uid)
    return folder


def _write_slices(image, folder, writer, orientation, series_uid) -> None:
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", "MR"), ("0020|000e", series_uid), ("0020|000d", series_uid + ".1"),
                           ("0020|0037", orientation), ("0020|0032", "\\".join(f"{v:.6f}" for v in position)),
                           ("0020|0013", str(k + 1)), ("0018|0050", f"{image.GetSpacing()[2]:.6f}"),
                           ("0008|0008", "ORIGINAL\\PRIMARY"), ("0010|0020", "mini")):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k + 1:04d}.dcm"))
        writer.Execute(plane)


def brats_labels(mask: sitk.Image) -> sitk.Image:
    """Split a binary lesion into BraTS labels: 4 (core), 1 (ring), 2 (outer edema)."""
    arr = sitk.GetArrayFromImage(mask) > 0
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(mask > 0, insideIsPositive=True,
                                                               useImageSpacing=True, squaredDistance=False))
    labels = np.where(arr, np.where(dist > 6, 4, np.where(dist > 3, 1, 2)), 0).astype(np.uint8)
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(mask)
    return out


def wmh_labels(mask: sitk.Image) -> sitk.Image:
    """WMH challenge labels: the lesion as 1, plus a small block of 2 ("other pathology")."""
    arr = sitk.GetArrayFromImage(mask).astype(np.uint8)
    z, y, x = (n // 2 for n in arr.shape)
    arr[z - 1:z + 1, y - 1:y + 1, x - 1:x + 1] = 2
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(mask)
    return out
