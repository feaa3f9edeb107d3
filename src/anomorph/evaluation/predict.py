"""``anomorph predict``: anomaly maps for new scans, written on each input's own grid.

Uses the same scorers as ``evaluate`` (:mod:`anomorph.evaluation.inference`). For a NIfTI input
the outputs are NIfTI volumes with the input's array layout and affine (they overlay on the
input in ITK-SNAP / FSLeyes); for a PNG/JPG input they are PNGs of the same size.

Outputs per input ``NAME``: ``NAME_anomaly`` (score in [0, 1]), ``NAME_pseudo_healthy`` (x̂) and
``NAME_warped`` (x̃), both mapped back to the input's intensity units, ``NAME_brain_mask``, and
``NAME_preview.png`` (the slice with the highest anomaly mass).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.io import atomic_write, load_image, save_like
from ..data.manifest import file_stem
from ..data.slices import derive_brain_mask, normalisation_range, normalise, to_model_grid, to_source_grid
from ..runtime import configure_threads
from .inference import Scorer

MAP_NAMES = ("anomaly", "pseudo_healthy", "warped", "brain_mask")


@dataclass
class PredictedVolume:
    """Canonical ``(X, Y, Z)`` arrays for one input; see the module docstring for units."""

    anomaly: np.ndarray
    pseudo_healthy: np.ndarray
    warped: np.ndarray
    brain_mask: np.ndarray


def predict_volume(scorer: Scorer, volume: np.ndarray, brain_mask: np.ndarray | None = None,
                   axis: int = -1, percentiles: Sequence[float] = (1.0, 99.0),
                   batch_size: int = 32) -> PredictedVolume:
    """Score every slice of a canonical ``(X, Y, Z)`` volume along ``axis`` at the scorer's grid size.

    The volume is normalised like the training data (robust percentiles inside the brain mask,
    derived when not given); outputs are mapped back to the source grid and intensity units.
    """
    brain = brain_mask > 0 if brain_mask is not None else derive_brain_mask(volume)
    lo, hi = normalisation_range(volume, brain, percentiles)
    image = np.moveaxis(normalise(volume, lo, hi), axis, 0)
    brain_slices = np.moveaxis(brain, axis, 0)
    source_shape = image.shape[1:]
    x = to_model_grid(torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(1), scorer.size)
    b = to_model_grid(torch.from_numpy(np.ascontiguousarray(brain_slices, dtype=np.float32)).unsqueeze(1),
                      scorer.size, is_mask=True)
    outputs = {"anomaly": [], "pseudo_healthy": [], "warped": []}
    for start in range(0, x.shape[0], batch_size):
        pred = scorer(x[start:start + batch_size], b[start:start + batch_size])
        outputs["anomaly"].append(pred.anomaly_map)
        outputs["pseudo_healthy"].append(pred.reconstruction)
        outputs["warped"].append(pred.warped)
    arrays = {}
    for name, parts in outputs.items():
        source = to_source_grid(torch.cat(parts), source_shape)[:, 0].numpy()
        arrays[name] = np.moveaxis(source, 0, axis).astype(np.float32)
    brain_f = brain.astype(np.float32)
    return PredictedVolume(
        anomaly=np.clip(arrays["anomaly"], 0, 1) * brain_f,
        pseudo_healthy=arrays["pseudo_healthy"] * (hi - lo) + lo,
        warped=arrays["warped"] * (hi - lo) + lo,
        brain_mask=brain_f,
    )


def _save_png(array2d: np.ndarray, path: Path, low: float, high: float) -> Path:
    from PIL import Image

    scaled = np.clip((array2d - low) / max(high - low, 1e-12), 0, 1) * 255
    image = Image.fromarray(np.round(scaled).astype(np.uint8))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _preview(result: PredictedVolume, source: np.ndarray, axis: int, path: Path, title: str) -> Path:
    from ..reporting.figures import save_figure
    import matplotlib.pyplot as plt

    mass = np.moveaxis(result.anomaly, axis, 0).reshape(result.anomaly.shape[axis], -1).sum(1)
    k = int(np.argmax(mass))
    take = lambda a: np.take(a, k, axis=axis)  # noqa: E731
    lo, hi = np.percentile(source, [1, 99.5])
    panels = [("input", take(source), "gray", lo, hi), ("pseudo-healthy x̂", take(result.pseudo_healthy), "gray", lo, hi),
              ("warped x̃", take(result.warped), "gray", lo, hi), ("anomaly map", take(result.anomaly), "inferno", 0,
                                                                  max(float(result.anomaly.max()), 1e-6))]
    fig, axes = plt.subplots(1, 4, figsize=(11, 3))
    for ax, (name, arr, cmap, vmin, vmax) in zip(axes, panels):
        im = ax.imshow(arr.T, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{title} (slice {k})", fontsize=10)
    return save_figure(fig, path)


def predict_files(scorer: Scorer, inputs: Sequence[str | Path], out_dir: str | Path, axis: int = -1,
                  percentiles: Sequence[float] = (1.0, 99.0)) -> dict[str, dict[str, Path]]:
    """Predict every input file; returns ``{input: {output name: path}}``. All inputs are
    loaded and checked before anything is written, so a bad file leaves no partial output."""
    configure_threads()
    out_dir = Path(out_dir)
    loaded = [(Path(p), *load_image(Path(p), "input")) for p in inputs]
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Path]] = {}
    for path, volume, geometry in loaded:
        slice_axis = 2 if geometry.is_2d else axis
        result = predict_volume(scorer, volume, None, slice_axis, percentiles)
        stem = file_stem(path)
        files: dict[str, Path] = {}
        for name in MAP_NAMES:
            array = getattr(result, name)
            if geometry.kind == "nifti":
                files[name] = save_like(array, geometry, out_dir / f"{stem}_{name}.nii.gz")
            else:  # PNG: maps in [0, 1] → 0..255; images in the input's range → 0..255
                low, high = (0.0, 1.0) if name in ("anomaly", "brain_mask") else (0.0, 255.0 if volume.max() <= 255 else float(volume.max()))
                files[name] = _save_png(array[:, :, 0], out_dir / f"{stem}_{name}.png", low, high)
        files["preview"] = _preview(result, volume, slice_axis, out_dir / f"{stem}_preview.png", stem)
        written[str(path)] = files
    return written
