"""2D slice datasets built from a manifest (SPEC §2), decoded once and kept in memory.

Pipeline per manifest row: load canonical volume (:mod:`anomorph.data.io`) → brain mask (from
the manifest or derived) → robust intensity normalisation to [0, 1] (percentiles inside the
brain mask; the healthy counterpart uses the *same* linear map so ``|x − healthy|`` is
meaningful) → slices along ``axis`` over ``slice_range`` → zero-pad to a square → resize to
``size × size`` (bilinear with antialiasing for intensities, area + 0.5 threshold for masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import Dataset

from .io import ImageGeometry, load_image
from .manifest import DataError, ManifestRow, read_manifest
from .types import SliceGeometry, SliceSample


@dataclass
class SliceConfig:
    """How volumes become 2D training/evaluation slices.

    axis: canonical (RAS+) axis to slice along; -1/2 = axial (the default).
    slice_range: ``[start, stop)`` slice indices in the canonical volume, or None for all.
    size: output side length in pixels (slices are zero-padded to a square, then resized).
    percentiles: lower/upper intensity percentiles inside the brain mask mapped to 0 and 1.
    min_brain_fraction: slices whose brain mask covers less than this fraction of the
        slice are dropped (0 keeps every slice).
    """

    axis: int = -1
    slice_range: tuple[int, int] | None = None
    size: int = 128
    percentiles: tuple[float, float] = (1.0, 99.0)
    min_brain_fraction: float = 0.05

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.axis not in (-3, -2, -1, 0, 1, 2):
            raise ConfigError(f"axis: {self.axis!r} is invalid; a volume has axes 0, 1, 2 (or -3..-1)")
        if self.slice_range is not None and not (len(self.slice_range) == 2
                                                 and 0 <= self.slice_range[0] < self.slice_range[1]):
            raise ConfigError(f"slice range: {tuple(self.slice_range)} is invalid; need START STOP with "
                              f"0 <= START < STOP")
        if not (isinstance(self.size, int) and self.size >= 8):
            raise ConfigError(f"size: {self.size!r} is invalid; the slice size must be an integer >= 8 pixels")

    @classmethod
    def from_config(cls, data) -> "SliceConfig":
        """The slicing described by a run's ``DataConfig`` (or anything with the same fields)."""
        return cls(axis=data.axis, slice_range=tuple(data.slice_range) if data.slice_range else None,
                   size=data.size, percentiles=tuple(data.percentiles), min_brain_fraction=data.min_brain_fraction)


def derive_brain_mask(volume: np.ndarray, sigma: float = 0.5, threshold: float = 0.2,
                      closing: int = 3) -> np.ndarray:
    """Foreground mask of a canonical volume, built slice by slice along the last axis (the
    slicing axis): each slice is smoothed in 2-D (``sigma`` px) and thresholded at
    ``threshold`` × the volume's 99th percentile of smoothed positive intensities; 3-D
    connected components smaller than 10% of the largest are dropped (specks; a piece cut off
    by an empty slice is kept); each slice is closed with a disk of radius ``closing`` pixels
    (so dark tissue at the brain edge, e.g. a stroke lesion, stays inside) and its holes are
    filled. Nothing is smoothed across slices, so an all-zero slice gets an empty mask.
    On the phantom it matches the phantom's brain mask with Dice ≥ 0.98 and covers every lesion
    voxel (``scripts/check_brain_mask.py``). Returns bool (X, Y, Z)."""
    volume = np.asarray(volume, dtype=np.float32)
    smooth = ndimage.gaussian_filter(volume, sigma=(sigma, sigma, 0.0)) if sigma > 0 else volume
    positive = smooth[smooth > 0]
    if positive.size == 0:
        return np.zeros(volume.shape, dtype=bool)
    mask = smooth > threshold * np.percentile(positive, 99)
    labels, count = ndimage.label(mask)
    if count > 1:  # drop specks; keep pieces cut off by an empty slice (≥ 10% of the largest)
        sizes = np.asarray(ndimage.sum(mask, labels, index=range(1, count + 1)))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()))
    radius = int(closing)
    disk = None
    if radius > 0:
        yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
        disk = (yy ** 2 + xx ** 2) <= radius ** 2
    for z in range(mask.shape[2]):
        plane = mask[:, :, z]
        if not plane.any():
            continue
        if disk is not None:  # pad so the closing does not erode at the image border
            padded = np.pad(plane, radius)
            plane = ndimage.binary_closing(padded, structure=disk)[radius:-radius, radius:-radius]
        mask[:, :, z] = ndimage.binary_fill_holes(plane)
    return mask


def normalisation_range(volume: np.ndarray, brain: np.ndarray, percentiles: Sequence[float]) -> tuple[float, float]:
    """Intensities at the given percentiles inside the brain mask (whole image if empty)."""
    values = volume[brain] if brain.any() else volume.ravel()
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def normalise(volume: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of ``[lo, hi]`` to ``[0, 1]``, clipped. float32."""
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def pad_to_square(slices: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``(N, C, H, W)`` symmetrically (extra pixel at the end) to ``(N, C, S, S)``."""
    h, w = slices.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(slices, (left, side - w - left, top, side - h - top))


def to_model_grid(slices: torch.Tensor, size: int, is_mask: bool = False) -> torch.Tensor:
    """``(N, C, H, W)`` source slices → ``(N, C, size, size)`` model grid (pad + resize)."""
    square = pad_to_square(slices)
    if square.shape[-1] == size:
        return square.contiguous()
    if is_mask:
        return (F.interpolate(square, size=(size, size), mode="area") >= 0.5).float()
    return F.interpolate(square, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def to_source_grid(maps: torch.Tensor, source_shape: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Inverse of :func:`to_model_grid` for ``(N, C, S, S)`` maps: resize to the padded square
    of the source (``mode`` "bilinear" or "nearest") and crop the padding away → ``(N, C, H, W)``."""
    h, w = source_shape
    side = max(h, w)
    if maps.shape[-1] != side:
        if mode == "nearest":
            maps = F.interpolate(maps, size=(side, side), mode="nearest")
        else:
            maps = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
    top, left = (side - h) // 2, (side - w) // 2
    return maps[..., top:top + h, left:left + w]


@dataclass
class LoadedSubject:
    """A manifest row decoded into canonical, normalised arrays (all (X, Y, Z))."""

    row: ManifestRow
    image: np.ndarray
    mask: np.ndarray
    brain_mask: np.ndarray
    healthy: np.ndarray | None
    geometry: ImageGeometry
    intensity_range: tuple[float, float]
    raw_range: tuple[float, float]


def load_subject(row: ManifestRow, manifest: Path | str, percentiles: Sequence[float] = (1.0, 99.0)) -> LoadedSubject:
    """Load and normalise one manifest row; errors name the manifest row, field and file."""
    image, geometry = load_image(row.image, row.where(manifest, "image"))

    def companion(field_name: str, path: Path | None) -> np.ndarray | None:
        if path is None:
            return None
        data, _ = load_image(path, row.where(manifest, field_name))
        if data.shape != image.shape:
            raise DataError(
                f"{row.where(manifest, field_name, path)}: grid {data.shape} differs from the image grid "
                f"{image.shape} ({row.image})"
            )
        return data

    if float(image.min()) == float(image.max()):
        raise DataError(f"{row.where(manifest, 'image', row.image)}: every voxel is {float(image.min()):g} "
                        f"(a blank or constant image cannot be normalised or scored)")
    mask = companion("mask", row.mask)
    brain = companion("brain_mask", row.brain_mask)
    healthy = companion("healthy", row.healthy)
    for field_name, data, path in (("mask", mask, row.mask), ("brain_mask", brain, row.brain_mask)):
        if data is None:
            continue
        odd = data[(data < 0) | (data != np.round(data))]
        if odd.size:
            raise DataError(f"{row.where(manifest, field_name, path)}: {odd.size} voxel(s) are not 0/1 labels "
                            f"(e.g. {float(odd.flat[0]):g}); masks hold 0 (normal) and positive integers "
                            f"(anomalous): binarise an interpolated mask first, e.g. mask > 0.5")
    if row.label == 0 and mask is not None and bool((mask > 0).any()):
        raise DataError(f"{row.where(manifest, 'label')}: label 0 (normal) but its mask {row.mask} marks "
                        f"{int((mask > 0).sum())} voxel(s) as anomalous; fix the label or the mask")
    from .preprocess import Preprocessor

    preprocessor = Preprocessor(percentiles=percentiles)
    brain_mask = preprocessor.brain_mask(image, brain)
    lo, hi = preprocessor.intensity_range(image, brain_mask)
    return LoadedSubject(
        row=row,
        image=normalise(image, lo, hi),
        mask=(mask > 0) if mask is not None else np.zeros(image.shape, dtype=bool),
        brain_mask=brain_mask,
        healthy=normalise(healthy, lo, hi) if healthy is not None else None,
        geometry=geometry,
        intensity_range=(lo, hi),
        raw_range=(float(image.min()), float(image.max())),
    )


def _slice_indices(shape: tuple[int, ...], axis: int, slice_range: tuple[int, int] | None) -> range:
    n = shape[axis]
    if slice_range is None:
        return range(n)
    start, stop = slice_range
    return range(max(0, start), min(n, stop))


def _take(volume: np.ndarray, axis: int, indices: Sequence[int]) -> torch.Tensor:
    """Slices of a 3D array along ``axis`` as ``(N, 1, H, W)`` float32 tensor."""
    moved = np.moveaxis(volume, axis, 0)[list(indices)]
    return torch.from_numpy(np.ascontiguousarray(moved, dtype=np.float32)).unsqueeze(1)


class SliceDataset(Dataset):
    """In-memory 2D slices of the manifest rows in ``splits``.

    ``healthy_only`` drops slices whose mask is non-empty (and slices of rows labelled 1 with no
    mask) — SPEC §2's rule for training. Items are :class:`SliceSample`; collate with
    :func:`anomorph.data.types.collate_slices`.
    """

    def __init__(
        self,
        manifest: str | Path,
        splits: Iterable[str] = ("train",),
        config: SliceConfig | None = None,
        healthy_only: bool = False,
        rows: list[ManifestRow] | None = None,
    ) -> None:
        self.manifest = Path(manifest)
        self.config = config or SliceConfig()
        self.splits = tuple(splits)
        all_rows = rows if rows is not None else read_manifest(self.manifest)
        self.rows = [r for r in all_rows if r.split in self.splits]
        if not self.rows:
            raise DataError(f"{self.manifest}: no rows in split(s) {self.splits}")
        self.healthy_only = healthy_only
        self.subjects: dict[int, LoadedSubject] = {}
        images, masks, brains, healthies, has_healthy = [], [], [], [], []
        self.meta: list[tuple[ManifestRow, SliceGeometry, int]] = []
        cfg = self.config
        from .preprocess import Preprocessor

        pre = Preprocessor.from_config(cfg)
        for row in self.rows:
            subject = load_subject(row, self.manifest, cfg.percentiles)
            self.subjects[row.row] = subject
            is_2d = subject.geometry.is_2d
            axis = pre.slice_axis(is_2d)
            indices = pre.candidate_indices(subject.image.shape, is_2d)
            if not indices:
                continue
            brain = pre.take(subject.brain_mask, axis, indices)
            mask = pre.take(subject.mask, axis, indices)
            keep = pre.keep(brain)
            abnormal = mask.flatten(1).amax(1) > 0
            if row.label == 1 and row.mask is None:
                abnormal = torch.ones_like(abnormal)
            if healthy_only:
                keep &= ~abnormal
            kept = [i for i, k in zip(indices, keep.tolist()) if k]
            if not kept:
                continue
            sel = keep.nonzero().flatten()
            source_shape = tuple(int(s) for s in brain.shape[-2:])
            images.append(pre.to_model(pre.take(subject.image, axis, kept)))
            masks.append(pre.to_model(mask[sel], is_mask=True))
            brains.append(pre.to_model(brain[sel], is_mask=True))
            if subject.healthy is not None:
                healthies.append(pre.to_model(pre.take(subject.healthy, axis, kept)))
            else:
                healthies.append(torch.zeros_like(images[-1]))
            has_healthy.extend([subject.healthy is not None] * len(kept))
            for slice_index, is_abnormal in zip(kept, abnormal[sel].tolist()):
                geometry = SliceGeometry(row.row, str(row.image), source_shape, axis, slice_index)
                self.meta.append((row, geometry, int(is_abnormal)))
        if not self.meta:
            raise DataError(f"{self.manifest}: no usable slices in split(s) {self.splits}")
        self.images = torch.cat(images)
        self.masks = torch.cat(masks)
        self.brain_masks = torch.cat(brains)
        self.healthy = torch.cat(healthies)
        self.has_healthy = torch.tensor(has_healthy)
        # labels come from the mask on the source grid, so resizing cannot hide a small lesion
        self.labels = torch.tensor([m[2] for m in self.meta], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, index: int) -> SliceSample:
        row, geometry, label = self.meta[index]
        return SliceSample(
            image=self.images[index],
            mask=self.masks[index],
            brain_mask=self.brain_masks[index],
            healthy=self.healthy[index] if self.has_healthy[index] else None,
            label=label,
            subject=row.subject,
            lesion_type=row.lesion_type,
            split=row.split,
            geometry=geometry,
        )
