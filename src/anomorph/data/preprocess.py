"""One preprocessing implementation, and its inverse, for training data, ``evaluate`` and ``predict``.

:class:`Preprocessor` turns a canonical ``(X, Y, Z)`` volume into model-grid slices and maps
model-grid outputs back onto the volume's own grid:

forward: brain mask (given, else :func:`~anomorph.data.slices.derive_brain_mask`) → robust
intensity normalisation to [0, 1] (``percentiles`` inside the brain mask) → slices along
``axis`` over ``slice_range`` → drop slices whose brain mask covers less than
``min_brain_fraction`` → zero-pad to a square → resize to ``size × size``.

inverse: model-grid maps → resize to the padded square → crop → put back at their slice
indices; slices that were not scored get ``fill``.

:class:`~anomorph.data.slices.SliceDataset` (training, ``evaluate``) and
:func:`anomorph.evaluation.predict.predict_volume` both use it, so a volume gives the same
slices either way. Build one from a run's data section with :meth:`Preprocessor.from_config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


@dataclass
class VolumeGeometry:
    """Where the model-grid slices of one volume came from (enough to invert the preprocessing).

    shape: canonical volume shape. axis: slicing axis (0..2). indices: the scored slice indices,
    in order (one per model-grid slice). source_shape: in-plane shape of a slice before padding.
    intensity_range: (lo, hi) mapped to (0, 1). brain: the canonical brain mask (bool).
    """

    shape: tuple[int, int, int]
    axis: int
    indices: list[int]
    source_shape: tuple[int, int]
    intensity_range: tuple[float, float]
    brain: np.ndarray = field(repr=False)

    def denormalise(self, array: np.ndarray) -> np.ndarray:
        """[0, 1] model intensities → the volume's intensity units."""
        lo, hi = self.intensity_range
        return array * (hi - lo) + lo


@dataclass
class Slices:
    """Model-grid slices of one volume: ``images`` and ``brain_masks`` ``(N, 1, size, size)``."""

    images: torch.Tensor
    brain_masks: torch.Tensor


class Preprocessor:
    """See the module docstring; the arguments are those of :class:`~anomorph.data.slices.SliceConfig`."""

    def __init__(self, size: int = 128, axis: int = -1, slice_range: Sequence[int] | None = None,
                 percentiles: Sequence[float] = (1.0, 99.0), min_brain_fraction: float = 0.05) -> None:
        self.size = int(size)
        self.axis = int(axis)
        self.slice_range = None if slice_range is None else (int(slice_range[0]), int(slice_range[1]))
        self.percentiles = tuple(float(p) for p in percentiles)
        self.min_brain_fraction = float(min_brain_fraction)

    @classmethod
    def from_config(cls, config) -> "Preprocessor":
        """From a :class:`~anomorph.data.slices.SliceConfig` or a run's ``DataConfig``."""
        return cls(config.size, config.axis, tuple(config.slice_range) if config.slice_range else None,
                   tuple(config.percentiles), config.min_brain_fraction)

    def __repr__(self) -> str:
        return (f"Preprocessor(size={self.size}, axis={self.axis}, slice_range={self.slice_range}, "
                f"percentiles={self.percentiles}, min_brain_fraction={self.min_brain_fraction})")

    # ------------------------------------------------------------------ steps
    def brain_mask(self, volume: np.ndarray, given: np.ndarray | None = None) -> np.ndarray:
        """``given > 0`` when a mask is given, else the derived foreground mask (bool)."""
        from .slices import derive_brain_mask

        return np.asarray(given) > 0 if given is not None else derive_brain_mask(volume)

    def intensity_range(self, volume: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
        from .slices import normalisation_range

        return normalisation_range(volume, brain, self.percentiles)

    def slice_axis(self, is_2d: bool) -> int:
        return 2 if is_2d else self.axis % 3

    def candidate_indices(self, shape: Sequence[int], is_2d: bool) -> list[int]:
        """Slice indices inside ``slice_range`` (every slice for 2D images)."""
        n = shape[self.slice_axis(is_2d)]
        if is_2d or self.slice_range is None:
            return list(range(n))
        start, stop = self.slice_range
        return list(range(max(0, start), min(n, stop)))

    def take(self, volume: np.ndarray, axis: int, indices: Sequence[int]) -> torch.Tensor:
        """Source-grid slices ``(N, 1, h, w)`` float32 of a canonical array."""
        moved = np.moveaxis(volume, axis, 0)[list(indices)]
        return torch.from_numpy(np.ascontiguousarray(moved, dtype=np.float32)).unsqueeze(1)

    def keep(self, brain_slices: torch.Tensor) -> torch.Tensor:
        """Bool ``(N,)``: the brain mask covers at least ``min_brain_fraction`` of the slice and is
        not empty (an empty slice is never scored)."""
        fraction = brain_slices.flatten(1).mean(1)
        return (fraction >= self.min_brain_fraction) & (fraction > 0)

    def to_model(self, slices: torch.Tensor, is_mask: bool = False) -> torch.Tensor:
        from .slices import to_model_grid

        return to_model_grid(slices, self.size, is_mask=is_mask)

    # ------------------------------------------------------------------ forward / inverse
    def forward(self, volume: np.ndarray, brain_mask: np.ndarray | None = None,
                is_2d: bool = False) -> tuple[Slices, VolumeGeometry]:
        """A canonical ``(X, Y, Z)`` volume → (model-grid slices, geometry for :meth:`inverse`)."""
        from .slices import normalise

        volume = np.asarray(volume, dtype=np.float32)
        brain = self.brain_mask(volume, brain_mask)
        lo, hi = self.intensity_range(volume, brain)
        axis = self.slice_axis(is_2d)
        candidates = self.candidate_indices(volume.shape, is_2d)
        brain_slices = self.take(brain, axis, candidates)
        kept_flags = self.keep(brain_slices) if candidates else torch.zeros(0, dtype=torch.bool)
        indices = [i for i, k in zip(candidates, kept_flags.tolist()) if k]
        in_plane = tuple(int(s) for i, s in enumerate(volume.shape) if i != axis)
        geometry = VolumeGeometry(tuple(int(s) for s in volume.shape), axis, indices, in_plane, (lo, hi), brain)
        if not indices:
            empty = torch.zeros(0, 1, self.size, self.size)
            return Slices(empty, empty.clone()), geometry
        images = self.to_model(self.take(normalise(volume, lo, hi), axis, indices))
        brains = self.to_model(brain_slices[kept_flags.nonzero().flatten()], is_mask=True)
        return Slices(images, brains), geometry

    def inverse(self, maps: torch.Tensor, geometry: VolumeGeometry, fill: float | np.ndarray = 0.0,
                mode: str = "bilinear") -> np.ndarray:
        """Model-grid maps ``(N, C, size, size)`` (N = ``len(geometry.indices)``) → a canonical
        float32 array ``(X, Y, Z)`` (C = 1) or ``(X, Y, Z, C)``; unscored slices get ``fill``
        (a scalar or an array of the output's shape). ``mode``: "bilinear" for maps, "nearest"
        for binary masks."""
        from .slices import to_source_grid

        channels = int(maps.shape[1]) if maps.ndim == 4 else 1
        shape = geometry.shape + ((channels,) if channels > 1 else ())
        out = np.empty(shape, dtype=np.float32)
        out[...] = fill
        if not geometry.indices:
            return out
        if maps.shape[0] != len(geometry.indices):
            raise ValueError(f"{maps.shape[0]} maps for {len(geometry.indices)} scored slices")
        source = to_source_grid(maps.float().cpu(), geometry.source_shape, mode=mode).numpy()  # (N, C, h, w)
        moved = np.moveaxis(out, geometry.axis, 0)  # a view: (n, h, w[, C])
        values = source[:, 0] if channels == 1 else np.moveaxis(source, 1, -1)
        moved[geometry.indices] = values
        return out
