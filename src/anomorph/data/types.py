"""Typed sample and batch structures shared by datasets, models and evaluation.

Every image tensor is ``(C, H, W)`` per sample / ``(B, C, H, W)`` per batch, float32, with
intensities normalised to [0, 1]; masks are float32 in {0, 1} on the same grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class SliceGeometry:
    """Where a 2D slice came from, enough to write a result back onto the original grid.

    ``source_shape`` is the shape of the slice *before* padding to a square and resizing
    (rows, cols) in the canonical (RAS+) orientation of the volume; ``axis`` and
    ``slice_index`` locate it in the canonical volume (``axis`` is -1 for 2D images).
    """

    row: int
    source: str
    source_shape: tuple[int, int]
    axis: int
    slice_index: int


@dataclass
class SliceSample:
    """One 2D slice. ``healthy`` is ``None`` when the manifest row has no healthy counterpart."""

    image: torch.Tensor
    mask: torch.Tensor
    brain_mask: torch.Tensor
    healthy: torch.Tensor | None
    label: int
    subject: str
    lesion_type: str
    split: str
    geometry: SliceGeometry


@dataclass
class SliceBatch:
    """A collated batch of :class:`SliceSample`.

    ``healthy`` is zero where ``has_healthy`` is False. ``label`` is (B,) int64, 1 = abnormal.
    """

    image: torch.Tensor
    mask: torch.Tensor
    brain_mask: torch.Tensor
    healthy: torch.Tensor
    has_healthy: torch.Tensor
    label: torch.Tensor
    subject: list[str] = field(default_factory=list)
    lesion_type: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    geometry: list[SliceGeometry] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device | str) -> "SliceBatch":
        return SliceBatch(
            image=self.image.to(device),
            mask=self.mask.to(device),
            brain_mask=self.brain_mask.to(device),
            healthy=self.healthy.to(device),
            has_healthy=self.has_healthy.to(device),
            label=self.label.to(device),
            subject=self.subject,
            lesion_type=self.lesion_type,
            split=self.split,
            geometry=self.geometry,
        )


def collate_slices(samples: Sequence[SliceSample]) -> SliceBatch:
    """Stack samples into a :class:`SliceBatch` (use as a DataLoader ``collate_fn``)."""
    if not samples:
        raise ValueError("cannot collate an empty list of slices")
    image = torch.stack([s.image for s in samples])
    healthy = torch.stack([s.healthy if s.healthy is not None else torch.zeros_like(s.image) for s in samples])
    return SliceBatch(
        image=image,
        mask=torch.stack([s.mask for s in samples]),
        brain_mask=torch.stack([s.brain_mask for s in samples]),
        healthy=healthy,
        has_healthy=torch.tensor([s.healthy is not None for s in samples]),
        label=torch.tensor([s.label for s in samples], dtype=torch.int64),
        subject=[s.subject for s in samples],
        lesion_type=[s.lesion_type for s in samples],
        split=[s.split for s in samples],
        geometry=[s.geometry for s in samples],
    )
