"""``anomorph predict``: anomaly maps for new scans, written on each input's own grid.

Scores through the same :class:`~anomorph.scoring.Detector` and
:class:`~anomorph.data.preprocess.Preprocessor` as ``evaluate``, so a volume gives the maps
``evaluate`` gives for the same slices. For a NIfTI input every output has the input's array
layout and affine (it overlays on the input in ITK-SNAP / FSLeyes); for a PNG/JPG input the
image-like outputs are PNGs of the same size and the float fields are NIfTI (identity affine).

Outputs per input ``NAME`` (see docs/inference.md):

=========================  ====================================================================
``NAME_anomaly``           |x − x̃| in [0, 1] inside the brain mask (0 outside, 0 on unscored slices)
``NAME_pseudo_healthy``    x̂, in the input's intensity units
``NAME_warped``            x̃ = x̂ ∘ φ, in the input's intensity units
``NAME_brain_mask``        the brain mask used (given with ``--brain-mask`` or derived)
``NAME_displacement``      d = φ − id, NIfTI vector (X×Y×Z×1×3, intent VECTOR), **mm** along the
                           world (scanner RAS) axes of the input's affine (deformable runs)
``NAME_log_jacobian``      log det Jφ (det clamped at 1e-3, so folds read ≈ −6.9; deformable runs)
``NAME_uncertainty``       u in [0, 1] (when the detector has an estimator)
``NAME_guidance_mask``     m in [0, 1] the deformation was held with (1 = stiff; guided runs)
``NAME_lesions_fprNN``     anomaly > the calibrated threshold at NN% healthy FPR (uint8)
``NAME_summary.json``      image-level score, lesion count and volume per threshold, versions
``NAME_preview.png``       the slice with the highest anomaly mass (written last)
=========================  ====================================================================

Output safety: ``NAME`` is the input's file name without its image suffix, so two inputs with
the same name (``a/scan.nii.gz`` and ``b/scan.nii.gz``, or ``scan.png`` and ``scan.nii.gz``)
would write the same files: that is refused before anything is written, as is an output that
would replace one of the inputs. An existing output is never replaced without
``overwrite=True`` (``--overwrite``); an input whose outputs are complete (its summary and
preview exist) is skipped, so an interrupted ``predict`` rerun completes only the missing
scans; an input with only some of its outputs present is an error naming the file. Each
input's outputs are written into a hidden staging folder ``OUT/.tmp-predict-PID/`` and then
renamed into ``OUT``, preview last; staging folders of dead processes are removed on the next
run.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import __version__
from ..data.io import ImageGeometry, atomic_write, is_nifti, load_image, save_like, to_source_orientation
from ..data.manifest import file_stem
from ..data.preprocess import Preprocessor, VolumeGeometry
from ..errors import DataError
from ..runtime import configure_threads
from ..scoring.base import Scorer
from .metrics import slice_scores

MAP_NAMES = ("anomaly", "pseudo_healthy", "warped", "brain_mask")
FLOAT_FIELDS = ("log_jacobian", "uncertainty", "guidance_mask")
JACOBIAN_FLOOR = 1e-3
IMAGE_SCORE_REDUCTION = "top1pct_mean"


@dataclass
class PredictedVolume:
    """Canonical ``(X, Y, Z)`` arrays for one input; see the module docstring for units.

    ``displacement`` is ``(X, Y, Z, 3)`` in canonical **voxels** (convert with
    :func:`displacement_mm`); ``log_jacobian`` / ``uncertainty`` / ``guidance_mask`` are None
    when the scorer gives none. ``geometry``: the preprocessing geometry (scored slices).
    """

    anomaly: np.ndarray
    pseudo_healthy: np.ndarray
    warped: np.ndarray
    brain_mask: np.ndarray
    displacement: np.ndarray | None = None
    log_jacobian: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    guidance_mask: np.ndarray | None = None
    geometry: VolumeGeometry | None = field(default=None, repr=False)


def default_preprocessor(scorer: Scorer, axis: int = -1, percentiles: Sequence[float] = (1.0, 99.0)) -> Preprocessor:
    """The scorer's own (a :class:`~anomorph.scoring.Detector` carries its run's), else one at
    the scorer's grid size that scores every non-empty slice."""
    own = getattr(scorer, "preprocessor", None)
    return own if own is not None else Preprocessor(scorer.size, axis, None, percentiles, 0.0)


def predict_volume(scorer: Scorer, volume: np.ndarray, brain_mask: np.ndarray | None = None,
                   axis: int = -1, percentiles: Sequence[float] = (1.0, 99.0),
                   batch_size: int = 32, preprocessor: Preprocessor | None = None,
                   is_2d: bool = False) -> PredictedVolume:
    """Score a canonical ``(X, Y, Z)`` volume slice by slice and map every output back onto it.

    ``preprocessor`` (default :func:`default_preprocessor`) does the slicing and normalisation,
    with ``brain_mask`` when given (else derived) — the same code path as the training and
    evaluation slices. Slices it does not score (outside ``slice_range``, too little or no
    brain) get anomaly 0 and x̂ = x̃ = the input.
    """
    pre = preprocessor or default_preprocessor(scorer, axis, percentiles)
    volume = np.asarray(volume, dtype=np.float32)
    slices, geometry = pre.forward(volume, brain_mask, is_2d)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("anomaly", "pseudo_healthy", "warped", "displacement",
                                                              "jacobian", "uncertainty", "guidance_mask")}
    for start in range(0, slices.images.shape[0], batch_size):
        pred = scorer(slices.images[start:start + batch_size], slices.brain_masks[start:start + batch_size])
        parts["anomaly"].append(pred.anomaly_map)
        parts["pseudo_healthy"].append(pred.reconstruction)
        parts["warped"].append(pred.warped)
        for key, value in (("displacement", pred.displacement), ("jacobian", pred.jacobian),
                           ("uncertainty", pred.uncertainty), ("guidance_mask", pred.guidance_mask)):
            if value is not None:
                parts[key].append(value.detach().cpu())
    n = len(geometry.indices)

    def inverse(key: str, fill: float | np.ndarray = 0.0) -> np.ndarray | None:
        if n == 0 and key in ("anomaly", "pseudo_healthy", "warped"):
            return pre.inverse(torch.zeros(0, 1, pre.size, pre.size), geometry, fill)
        if len(parts[key]) == 0 or sum(p.shape[0] for p in parts[key]) != n:
            return None
        return pre.inverse(torch.cat(parts[key]), geometry, fill)

    brain_f = geometry.brain.astype(np.float32)
    scored = np.zeros(volume.shape, dtype=bool)
    np.moveaxis(scored, geometry.axis, 0)[geometry.indices] = True
    anomaly = np.clip(inverse("anomaly"), 0, 1) * brain_f * scored
    result = PredictedVolume(
        anomaly=anomaly.astype(np.float32),
        pseudo_healthy=np.where(scored, geometry.denormalise(inverse("pseudo_healthy")), volume).astype(np.float32),
        warped=np.where(scored, geometry.denormalise(inverse("warped")), volume).astype(np.float32),
        brain_mask=brain_f,
        geometry=geometry,
    )
    displacement = inverse("displacement")
    if displacement is not None:
        side = max(geometry.source_shape)
        in_plane = [a for a in range(3) if a != geometry.axis]
        voxels = np.zeros(volume.shape + (3,), dtype=np.float32)
        for channel, canonical_axis in enumerate(in_plane):  # channel 0 = rows = first in-plane axis
            voxels[..., canonical_axis] = displacement[..., channel] * (side / pre.size)
        result.displacement = voxels
    jacobian = inverse("jacobian", 1.0)
    if jacobian is not None:
        result.log_jacobian = np.log(np.maximum(jacobian, JACOBIAN_FLOOR)).astype(np.float32)
    for key in ("uncertainty", "guidance_mask"):
        value = inverse(key)
        if value is not None:
            setattr(result, key, (np.clip(value, 0, 1) * brain_f).astype(np.float32))
    return result


def canonical_affine(geometry: ImageGeometry) -> np.ndarray:
    """Voxel-to-world matrix of the canonical (RAS+) array of an image."""
    if geometry.is_2d or geometry.kind != "nifti":
        return np.asarray(geometry.affine, float)
    from nibabel.orientations import inv_ornt_aff

    return np.asarray(geometry.affine, float) @ inv_ornt_aff(geometry.orientation, geometry.source_shape)


def displacement_mm(voxels: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Canonical-voxel displacements ``(..., 3)`` → mm along the world axes of the affine."""
    return np.einsum("ij,...j->...i", canonical_affine(geometry)[:3, :3], voxels).astype(np.float32)


def voxel_volume_mm3(geometry: ImageGeometry) -> float:
    return float(abs(np.linalg.det(np.asarray(geometry.affine, float)[:3, :3])))


def _save_vector(vectors: np.ndarray, geometry: ImageGeometry, path: Path) -> Path:
    """A canonical ``(X, Y, Z, 3)`` vector field as a NIfTI vector image on the source grid."""
    import nibabel as nib

    source = to_source_orientation(vectors, geometry)  # orientation acts on the leading 3 axes
    if source.ndim == 3:  # 2D source: (H, W, 3)
        source = source[:, :, None, :]
    data = np.ascontiguousarray(source[:, :, :, None, :], dtype=np.float32)
    image = nib.Nifti1Image(data, geometry.affine)
    image.header.set_intent("vector", (), name="displacement_mm")
    image.header.set_xyzt_units("mm")
    return atomic_write(path, lambda tmp: nib.save(image, str(tmp)))


def _thresholds(scorer: Scorer) -> list[dict[str, Any]]:
    """Calibrated thresholds valid for this scorer (a Detector's, for its own setting only)."""
    return list(getattr(scorer, "thresholds", None) or [])


def _components(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask)[1])


def scan_summary(result: PredictedVolume, geometry: ImageGeometry, scorer: Scorer, source: Path,
                 brain_given: bool) -> dict[str, Any]:
    """The per-scan JSON: image-level score, per-threshold lesion count/volume, versions."""
    calibration = getattr(scorer, "calibration", None)
    guidance = getattr(scorer, "guidance", None)
    brain = result.brain_mask > 0
    values = result.anomaly[brain]
    if values.size:
        score = float(slice_scores(values[None, :], None, IMAGE_SCORE_REDUCTION)[0])
    else:
        score = None
    voxel = voxel_volume_mm3(geometry)
    thresholds = []
    for entry in _thresholds(scorer):
        lesions = (result.anomaly > entry["threshold"]) & brain
        thresholds.append({"fpr": entry["fpr"], "threshold": entry["threshold"],
                           "realised_healthy_fpr_on_val": entry.get("realised_fpr"),
                           "lesion_count": _components(lesions), "lesion_voxels": int(lesions.sum()),
                           "lesion_volume_mm3": float(lesions.sum() * voxel)})
    import dataclasses

    return {
        "input": str(source),
        "image_score": score,
        "image_score_reduction": "mean of the top 1% anomaly values over the brain voxels of the scored slices",
        "brain_mask": "given" if brain_given else "derived",
        "brain_voxels": int(brain.sum()),
        "scored_slices": list(result.geometry.indices) if result.geometry is not None else None,
        "voxel_volume_mm3": voxel,
        "units": {"displacement": "mm, world (scanner RAS) axes of the input affine",
                  "volume": "mm^3" if geometry.kind == "nifti" else "pixels (no physical spacing)"},
        "thresholds": thresholds,
        "model": {"run": None if getattr(scorer, "run_dir", None) is None else str(scorer.run_dir),
                  "name": scorer.name, "checkpoint_sha256_12": getattr(scorer, "model_version", None),
                  "anomorph_version": __version__},
        "guidance": None if guidance is None else dataclasses.asdict(guidance),
        "calibration": None if calibration is None else {
            "version": calibration.version, "created": calibration.info.get("created"),
            "estimator": calibration.info.get("estimator"),
            "calibrated_guidance": (calibration.info.get("guidance") or {}).get("strategy"),
            "thresholds_apply": bool(getattr(scorer, "calibration_matches", False)),
            "note": None if getattr(scorer, "calibration_matches", False) else
            "the run was calibrated for another guidance setting or estimator: no thresholds, no lesion masks; "
            "run `anomorph calibrate` with this --guidance/--estimator"},
    }


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


def _lesion_name(fpr: float) -> str:
    return f"lesions_fpr{int(round(fpr * 100)):02d}"


OPTIONAL_NAMES = ("displacement", *FLOAT_FIELDS)


def output_paths(path: Path, out_dir: Path) -> dict[str, Path]:
    """The files ``predict`` always writes for input ``path`` into ``out_dir``, preview last
    (maps that depend on the detector — displacement, log det J, u, m, lesion masks — are
    written beside them under the same ``NAME_`` prefix)."""
    stem = file_stem(path)
    suffix = ".nii.gz" if is_nifti(path) else ".png"
    files = {name: out_dir / f"{stem}_{name}{suffix}" for name in MAP_NAMES}
    files["summary"] = out_dir / f"{stem}_summary.json"
    files["preview"] = out_dir / f"{stem}_preview.png"
    return files


def _is_output_name(file_name: str, stem: str) -> bool:
    """Whether ``file_name`` is one of the outputs predict writes for an input named ``stem``."""
    if not file_name.startswith(f"{stem}_"):
        return False
    name = file_name[len(stem) + 1:].split(".")[0]
    return name in (*MAP_NAMES, *OPTIONAL_NAMES, "summary", "preview") or name.startswith("lesions_fpr")


def _existing_outputs(path: Path, out_dir: Path) -> list[Path]:
    """Every file already in ``out_dir`` that predict would write (or has written) for ``path``."""
    stem = file_stem(path)
    found = [f for f in out_dir.glob(f"{stem}_*") if _is_output_name(f.name, stem)] if out_dir.is_dir() else []
    return sorted(found)


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
    """``{input: output paths}`` (None: skipped, its outputs are complete). Raises
    :class:`DataError` on two inputs writing under one ``NAME_`` prefix, an output that is an
    input, or a partly present output set without ``overwrite``."""
    claimed: dict[str, Path] = {}
    sources = {os.path.realpath(p) for p in inputs}  # realpath: no error on a link loop
    plan: dict[Path, dict[str, Path] | None] = {}
    for path in inputs:
        files = output_paths(path, out_dir)
        stem = file_stem(path)
        other = claimed.get(stem)
        if other is not None:
            raise DataError(f"inputs {other} and {path} would both write {files['preview']} (outputs are named "
                            f"after the file name without its suffix); rename one or predict them into separate "
                            f"--out folders")
        claimed[stem] = path
        for source in sources:
            if Path(source).parent == Path(os.path.realpath(out_dir)) and _is_output_name(Path(source).name, stem):
                raise DataError(f"output {out_dir / Path(source).name} for input {path} would replace the input "
                                f"{source}; choose another --out")
        existing = _existing_outputs(path, out_dir)
        if overwrite or not existing:
            plan[path] = files
        elif files["summary"].exists() and files["preview"].exists():
            plan[path] = None
        else:
            raise DataError(f"output {existing[0]} for input {path} already exists (its outputs are incomplete); "
                            f"pass --overwrite to replace them")
    return plan


def predict_files(scorer: Scorer, inputs: Sequence[str | Path], out_dir: str | Path, axis: int = -1,
                  percentiles: Sequence[float] = (1.0, 99.0),
                  brain_masks: Sequence[str | Path | None] | None = None,
                  preprocessor: Preprocessor | None = None, overwrite: bool = False,
                  skipped: list[str] | None = None) -> dict[str, dict[str, Path]]:
    """Predict every input file; returns ``{input: {output name: path}}``. ``brain_masks``: one
    per input (None entries: derived). All inputs and masks are loaded and checked, and every
    output name planned (see the module docstring), before anything is written, so a bad file
    leaves no partial output. Inputs whose outputs are complete are skipped unless
    ``overwrite``; their names are appended to ``skipped``."""
    configure_threads(log=False)
    out_dir = Path(out_dir)
    paths = [Path(p) for p in inputs]
    masks = list(brain_masks) if brain_masks is not None else [None] * len(paths)
    if len(masks) != len(paths):
        raise DataError(f"--brain-mask given {len(masks)} time(s) for {len(paths)} input(s); give one per input")
    plan = plan_outputs(paths, out_dir, overwrite)
    loaded = []
    for path, m in zip(paths, masks):
        if plan[path] is None:
            continue
        volume, geometry = load_image(path, "input")
        brain = None
        if m is not None:
            brain, _ = load_image(Path(m), f"brain mask of {path}")
            if brain.shape != volume.shape:
                raise DataError(f"brain mask {m}: grid {brain.shape} differs from the grid {volume.shape} of input {path}")
            if not (brain > 0).any():
                raise DataError(f"brain mask {m}: empty (no voxel > 0)")
        loaded.append((path, volume, geometry, brain))
    for path, volume, _, _ in loaded:  # every file loaded first: an unreadable one is named before this
        if float(volume.min()) == float(volume.max()):
            raise DataError(f"input {path}: every voxel is {float(volume.min()):g} (a blank or constant image "
                            f"cannot be normalised or scored)")
    if skipped is not None:
        skipped.extend(str(path) for path in paths if plan[path] is None)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    for path in paths:  # hidden temporaries of an older, killed predict (atomic_write names)
        for stale in out_dir.glob(f".tmp-*-{file_stem(path)}_*"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
    configure_threads()  # logged once the inputs passed their checks
    thresholds = _thresholds(scorer)
    staging = out_dir / f".tmp-predict-{os.getpid()}"
    written: dict[str, dict[str, Path]] = {}
    try:
        for path, volume, geometry, brain in loaded:
            staging.mkdir(exist_ok=True)
            slice_axis = 2 if geometry.is_2d else axis
            result = predict_volume(scorer, volume, brain, slice_axis, percentiles, preprocessor=preprocessor,
                                    is_2d=geometry.is_2d)
            if not np.isfinite(result.anomaly).all():
                raise DataError(f"input {path}: the model produced non-finite (NaN/inf) anomaly scores; its "
                                f"checkpoint is probably broken (NaN weights)")
            stem = file_stem(path)
            targets = plan[path]
            assert targets is not None
            staged: dict[str, Path] = {}
            nifti = geometry.kind == "nifti"
            for name in MAP_NAMES:
                array = getattr(result, name)
                if nifti:
                    staged[name] = save_like(array, geometry, staging / targets[name].name)
                else:  # PNG: maps in [0, 1] → 0..255; images in the input's range → 0..255
                    low, high = (0.0, 1.0) if name in ("anomaly", "brain_mask") else (0.0, 255.0 if volume.max() <= 255 else float(volume.max()))
                    staged[name] = _save_png(array[:, :, 0], staging / targets[name].name, low, high)
            if result.displacement is not None:
                staged["displacement"] = _save_vector(displacement_mm(result.displacement, geometry), geometry,
                                                      staging / f"{stem}_displacement.nii.gz")
            for name in FLOAT_FIELDS:
                array = getattr(result, name)
                if array is not None:
                    staged[name] = save_like(array, geometry, staging / f"{stem}_{name}.nii.gz")
            for entry in thresholds:
                name = _lesion_name(entry["fpr"])
                binary = ((result.anomaly > entry["threshold"]) & (result.brain_mask > 0)).astype(np.uint8)
                if nifti:
                    staged[name] = _save_mask(binary, geometry, staging / f"{stem}_{name}.nii.gz")
                else:
                    staged[name] = _save_png(binary[:, :, 0].astype(np.float32), staging / f"{stem}_{name}.png", 0.0, 1.0)
            summary = scan_summary(result, geometry, scorer, path, brain is not None)
            summary["files"] = {k: str(out_dir / v.name) for k, v in staged.items()}
            summary["files"]["preview"] = str(targets["preview"])
            text = json.dumps(summary, indent=2) + "\n"
            staged["summary"] = atomic_write(staging / targets["summary"].name,
                                             lambda tmp, t=text: Path(tmp).write_text(t, encoding="utf-8"))
            staged["preview"] = _preview(result, volume, slice_axis, staging / targets["preview"].name, stem)
            files: dict[str, Path] = {}
            for name, file in staged.items():  # preview last: a complete set ends with it
                files[name] = out_dir / file.name
                os.replace(file, files[name])
            written[str(path)] = files
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _save_mask(mask: np.ndarray, geometry: ImageGeometry, path: Path) -> Path:
    import nibabel as nib

    source = to_source_orientation(mask, geometry).astype(np.uint8)
    image = nib.Nifti1Image(source, geometry.affine)
    return atomic_write(path, lambda tmp: nib.save(image, str(tmp)))
