"""``anomorph predict``: anomaly maps for new scans, written on each input's own grid.

Uses the same scorers as ``evaluate`` (:mod:`anomorph.evaluation.inference`). For a NIfTI input
the outputs are NIfTI volumes with the input's array layout and affine (they overlay on the
input in ITK-SNAP / FSLeyes); for a PNG/JPG input they are PNGs of the same size.

Outputs per input ``NAME``: ``NAME_anomaly`` (score in [0, 1]), ``NAME_pseudo_healthy`` (x̂) and
``NAME_warped`` (x̃), both mapped back to the input's intensity units, ``NAME_brain_mask``, and
``NAME_preview.png`` (the slice with the highest anomaly mass).

Output safety: ``NAME`` is the input's file name without its image suffix, so two inputs with
the same name (``a/scan.nii.gz`` and ``b/scan.nii.gz``, or ``scan.png`` and ``scan.nii.gz``)
would write the same files: that is refused before anything is written, as is an output that
would replace one of the inputs. An existing output is never replaced without
``overwrite=True`` (``--overwrite``); an input whose outputs all exist already is skipped (so
an interrupted ``predict`` rerun completes only the missing scans); an input with only some
of its outputs present is an error naming the file. Each input's outputs are written into a
hidden staging folder ``OUT/.tmp-predict-PID/`` and then renamed into ``OUT``, preview last;
staging folders of dead processes are removed on the next run.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.io import atomic_write, load_image, save_like
from ..data.io import is_nifti
from ..data.manifest import file_stem
from ..errors import DataError
from ..data.slices import derive_brain_mask, normalisation_range, normalise, to_model_grid, to_source_grid
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


def output_paths(path: Path, out_dir: Path) -> dict[str, Path]:
    """The files ``predict`` writes for input ``path`` into ``out_dir``, preview last."""
    stem = file_stem(path)
    suffix = ".nii.gz" if is_nifti(path) else ".png"
    files = {name: out_dir / f"{stem}_{name}{suffix}" for name in MAP_NAMES}
    files["preview"] = out_dir / f"{stem}_preview.png"
    return files


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(out_dir: Path) -> None:
    """Staging folders (``.tmp-predict-PID``) of processes that are gone: a killed predict's."""
    for folder in out_dir.glob(".tmp-predict-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if folder.is_dir() and (not pid.isdigit() or not _process_alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def plan_outputs(inputs: Sequence[Path], out_dir: Path, overwrite: bool = False) -> dict[Path, dict[str, Path] | None]:
    """``{input: output paths}`` (None: skipped, every output exists). Raises :class:`DataError`
    on two inputs writing one file, an output that is an input, or a partly present output set
    (or any existing output when inputs repeat) without ``overwrite``."""
    claimed: dict[Path, Path] = {}
    sources = {os.path.realpath(p) for p in inputs}  # realpath: no error on a link loop
    plan: dict[Path, dict[str, Path] | None] = {}
    for path in inputs:
        files = output_paths(path, out_dir)
        for target in files.values():
            other = claimed.get(target)
            if other is not None:
                raise DataError(f"inputs {other} and {path} would both write {target} (outputs are named after "
                                f"the file name without its suffix); rename one or predict them into separate "
                                f"--out folders")
            claimed[target] = path
            if os.path.realpath(target) in sources:
                raise DataError(f"output {target} for input {path} would replace the input {target}; "
                                f"choose another --out")
        existing = [f for f in files.values() if f.exists() or f.is_symlink()]
        if overwrite or not existing:
            plan[path] = files
        elif len(existing) == len(files):
            plan[path] = None
        else:
            raise DataError(f"output {existing[0]} for input {path} already exists (and {len(files) - len(existing)} "
                            f"of its outputs do not); pass --overwrite to replace it")
    return plan


def predict_files(scorer: Scorer, inputs: Sequence[str | Path], out_dir: str | Path, axis: int = -1,
                  percentiles: Sequence[float] = (1.0, 99.0), overwrite: bool = False,
                  skipped: list[str] | None = None) -> dict[str, dict[str, Path]]:
    """Predict every input file; returns ``{input: {output name: path}}``. All inputs are
    loaded and checked, and every output name planned (see the module docstring), before
    anything is written, so a bad file leaves no partial output. Inputs whose outputs all exist
    are skipped unless ``overwrite``; their names are appended to ``skipped``."""
    out_dir = Path(out_dir)
    paths = [Path(p) for p in inputs]
    plan = plan_outputs(paths, out_dir, overwrite)
    loaded = [(path, *load_image(path, "input")) for path in paths if plan[path] is not None]
    for path, volume, _ in loaded:
        if float(volume.min()) == float(volume.max()):
            raise DataError(f"input {path}: every voxel is {float(volume.min()):g} (a blank or constant image "
                            f"cannot be normalised or scored)")
    if skipped is not None:
        skipped.extend(str(path) for path in paths if plan[path] is None)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    for targets in plan.values():  # hidden temporaries of an older, killed predict (atomic_write names)
        for target in (targets or {}).values():
            for stale in out_dir.glob(f".tmp-*-{target.name}"):
                stale.unlink(missing_ok=True)
    staging = out_dir / f".tmp-predict-{os.getpid()}"
    written: dict[str, dict[str, Path]] = {}
    try:
        for path, volume, geometry in loaded:
            staging.mkdir(exist_ok=True)
            slice_axis = 2 if geometry.is_2d else axis
            result = predict_volume(scorer, volume, None, slice_axis, percentiles)
            if not np.isfinite(result.anomaly).all():
                raise DataError(f"input {path}: the model produced non-finite (NaN/inf) anomaly scores; its "
                                f"checkpoint is probably broken (NaN weights)")
            stem = file_stem(path)
            targets = plan[path]
            assert targets is not None
            staged: dict[str, Path] = {}
            for name in MAP_NAMES:
                array = getattr(result, name)
                if geometry.kind == "nifti":
                    staged[name] = save_like(array, geometry, staging / targets[name].name)
                else:  # PNG: maps in [0, 1] → 0..255; images in the input's range → 0..255
                    low, high = (0.0, 1.0) if name in ("anomaly", "brain_mask") else (0.0, 255.0 if volume.max() <= 255 else float(volume.max()))
                    staged[name] = _save_png(array[:, :, 0], staging / targets[name].name, low, high)
            staged["preview"] = _preview(result, volume, slice_axis, staging / targets["preview"].name, stem)
            for name, file in staged.items():  # preview last: a complete set ends with it
                os.replace(file, targets[name])
            written[str(path)] = dict(targets)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
