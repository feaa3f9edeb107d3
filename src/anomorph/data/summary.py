"""``anomorph data check``: validate every file of a manifest and summarise it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .manifest import SPLITS, DataError, read_manifest
from .slices import SliceConfig, _slice_indices, load_subject


@dataclass
class ManifestSummary:
    """What ``data check`` reports. Slice counts use the given :class:`SliceConfig`."""

    manifest: str
    rows_per_split: dict[str, int] = field(default_factory=dict)
    slices_per_split: dict[str, int] = field(default_factory=dict)
    abnormal_slices_per_split: dict[str, int] = field(default_factory=dict)
    labelled_rows: int = 0
    lesion_types: dict[str, int] = field(default_factory=dict)
    image_shapes: dict[str, int] = field(default_factory=dict)
    intensity_min: float = float("inf")
    intensity_max: float = float("-inf")
    has_healthy: int = 0

    def format(self) -> str:
        lines = [f"manifest: {self.manifest}", "split   rows  slices  abnormal slices"]
        for split in SPLITS:
            lines.append(f"{split:<7} {self.rows_per_split.get(split, 0):>4}  {self.slices_per_split.get(split, 0):>6}"
                         f"  {self.abnormal_slices_per_split.get(split, 0):>15}")
        lines.append(f"rows with a mask or label: {self.labelled_rows}; with a healthy counterpart: {self.has_healthy}")
        kinds = ", ".join(f"{k or '(none)'}: {v}" for k, v in sorted(self.lesion_types.items())) or "(none)"
        lines.append(f"lesion types (rows): {kinds}")
        shapes = ", ".join(f"{k} ×{v}" for k, v in sorted(self.image_shapes.items()))
        lines.append(f"image sizes (canonical X×Y×Z): {shapes}")
        lines.append(f"raw intensity range: [{self.intensity_min:.4g}, {self.intensity_max:.4g}]")
        return "\n".join(lines)


def check_manifest(manifest: str | Path, config: SliceConfig | None = None) -> ManifestSummary:
    """Load every row of ``manifest`` (all checks of :func:`load_subject`) and summarise it.

    Raises :class:`DataError` naming the row and file of the first problem, including an empty
    train split.
    """
    config = config or SliceConfig()
    rows = read_manifest(manifest, require_train=True)
    summary = ManifestSummary(manifest=str(manifest))
    rows_c, slices_c, abnormal_c, kinds, shapes = Counter(), Counter(), Counter(), Counter(), Counter()
    for row in rows:
        subject = load_subject(row, manifest, config.percentiles)
        rows_c[row.split] += 1
        axis = 2 if subject.geometry.is_2d else config.axis
        indices = list(_slice_indices(subject.image.shape, axis,
                                      None if subject.geometry.is_2d else config.slice_range))
        mask_slices = np.moveaxis(subject.mask, axis, 0)[indices]
        abnormal = mask_slices.reshape(len(indices), -1).any(1)
        if row.label == 1 and row.mask is None:
            abnormal[:] = True
        slices_c[row.split] += len(indices)
        abnormal_c[row.split] += int(abnormal.sum())
        summary.labelled_rows += int(row.mask is not None or row.label is not None)
        summary.has_healthy += int(row.healthy is not None)
        if row.lesion_type or subject.mask.any():
            kinds[row.lesion_type] += 1
        shapes["×".join(str(s) for s in subject.image.shape)] += 1
        summary.intensity_min = min(summary.intensity_min, subject.raw_range[0])
        summary.intensity_max = max(summary.intensity_max, subject.raw_range[1])
    if not any(r.split == "train" for r in rows):
        raise DataError(f"{manifest}: the train split is empty")
    summary.rows_per_split = dict(rows_c)
    summary.slices_per_split = dict(slices_c)
    summary.abnormal_slices_per_split = dict(abnormal_c)
    summary.lesion_types = dict(kinds)
    summary.image_shapes = dict(shapes)
    return summary
