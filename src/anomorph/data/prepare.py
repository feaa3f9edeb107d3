"""Raw scans → preprocessed volumes in MNI152 space + a validated manifest (``anomorph data prepare``).

The steps are the ones published brain-UAD pipelines share, each switchable in
:class:`PrepareConfig` and recorded per subject in ``provenance/<subject>.json``:

1. **read** a NIfTI file or a DICOM series folder (SimpleITK / GDCM), cast to float32;
2. **N4 bias-field correction** (``N4BiasFieldCorrectionImageFilter``, fitted on a copy shrunk to
   about ``n4_shrink_mm`` and applied at full resolution through its log bias field);
3. **registration** to the MNI152 2009a T1 template that ships with nilearn: rigid then affine
   (Mattes mutual information, multi-resolution), optionally followed by a cubic B-spline;
   ``none`` keeps world coordinates (data already in MNI space, e.g. ATLAS v2.0);
4. **resampling** onto the template's field of view at ``spacing_mm`` (linear for intensities,
   nearest neighbour for lesion masks, which may live on a different grid than the image as long
   as they share its world space);
5. **brain extraction** by the template brain mask, which after registration is already on the
   output grid (``atlas``, offline); ``hd-bet`` runs the optional HD-BET tool, which needs
   downloaded weights, and fails with a clear message when it is absent;
6. **intensity standardisation** inside the brain: percentiles mapped to 0 and 1 (``percentile``)
   or a z-score (``zscore``); 0 outside the brain.

The spatial transform is stored in both directions (``transforms/<subject>.tfm`` maps template
points to raw points, ITK convention; ``<subject>_inverse.tfm`` the reverse), with the raw grid in
the provenance, so :func:`to_native` puts any template-space map (e.g. a predicted anomaly map)
back onto the raw scan's grid, where it overlays the input in ITK-SNAP / FSLeyes.

Outputs are written atomically; the provenance file is written last and marks a subject done, so a
rerun with the same config and unchanged inputs skips it. A subject that fails is reported with
its file and does not stop the others.

Entry points: :func:`prepare_dataset` (many subjects, manifest), :func:`prepare_subject` (one),
:func:`to_native`. Dataset layouts (IXI, BraTS, ...) live in :mod:`anomorph.data.recipes`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import locale
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .io import atomic_write
from .manifest import read_manifest, write_manifest

REGISTRATIONS = ("none", "rigid", "affine", "affine+bspline")
SKULL_STRIPS = ("none", "atlas", "hd-bet")
NORMALISATIONS = ("none", "percentile", "zscore")
PROVENANCE_VERSION = 1


@dataclass
class PrepareConfig:
    """Every switch of the preprocessing; recorded verbatim in each subject's provenance.

    spacing_mm: isotropic output voxel size (mm) on the MNI152 field of view.
    bias_correction: run N4 before registration.
    n4_shrink_mm: N4 is fitted on a copy shrunk to about this voxel size (mm).
    n4_levels: N4 fitting levels (each doubles the B-spline control-point resolution).
    n4_iterations: N4 iterations per fitting level.
    registration: ``none`` (world coordinates kept), ``rigid``, ``affine`` (rigid, then affine)
        or ``affine+bspline`` (then a cubic B-spline with control points ``bspline_mesh_mm`` apart).
    registration_spacing_mm: the template is registered at this voxel size (mm) or at
        ``spacing_mm`` when that is coarser; the coarsest pyramid level is about 4× it.
    registration_iterations: optimizer iterations per pyramid level.
    bspline_mesh_mm: control-point spacing (mm) of the deformable stage.
    skull_strip: ``none``, ``atlas`` (registered MNI152 brain mask) or ``hd-bet``.
    normalize: ``none``, ``percentile`` (``percentiles`` inside the brain → 0 and 1, values below
        0 clipped) or ``zscore`` (mean 0, std 1 inside the brain).
    percentiles: lower/upper percentiles of the ``percentile`` standardisation.
    seed: seed of the registration's random metric sampling (same seed → same result).
    threads: SimpleITK threads (0 = SimpleITK's default, all cores).
    """

    spacing_mm: float = 1.0
    bias_correction: bool = True
    n4_shrink_mm: float = 6.0
    n4_levels: int = 3
    n4_iterations: int = 50
    registration: str = "affine"
    registration_spacing_mm: float = 2.0
    registration_iterations: int = 100
    bspline_mesh_mm: float = 50.0
    skull_strip: str = "atlas"
    normalize: str = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.0)
    seed: int = 0
    threads: int = 0

    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ConfigError(f"prepare option '{name}': {why} (got {getattr(self, name)!r})")

        for name in ("spacing_mm", "n4_shrink_mm", "registration_spacing_mm", "bspline_mesh_mm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                fail(name, "must be a positive number of millimetres")
        if self.spacing_mm > 16:
            fail("spacing_mm", "must be at most 16 mm")
        for name in ("n4_levels", "n4_iterations", "registration_iterations"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        if self.registration not in REGISTRATIONS:
            fail("registration", f"must be one of {REGISTRATIONS}")
        if self.skull_strip not in SKULL_STRIPS:
            fail("skull_strip", f"must be one of {SKULL_STRIPS}")
        if self.normalize not in NORMALISATIONS:
            fail("normalize", f"must be one of {NORMALISATIONS}")
        pair = tuple(self.percentiles)
        if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair) or not 0 <= pair[0] < pair[1] <= 100:
            fail("percentiles", "must be two numbers 0 <= low < high <= 100")
        if not isinstance(self.seed, int) or self.seed < 0:
            fail("seed", "must be a non-negative integer")
        if not isinstance(self.threads, int) or self.threads < 0:
            fail("threads", "must be a non-negative integer")

    def fingerprint(self) -> str:
        """A short hash of every option that changes the outputs (``threads`` does not)."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k != "threads"}
        values["percentiles"] = list(values["percentiles"])
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RawSubject:
    """One raw input: an image (NIfTI file or DICOM series folder) and its optional lesion mask.

    mask_labels: label values of ``mask`` that count as lesion (``None``: every value > 0).
    healthy: True for subjects without pathology (only these may go to the train split).
    info: free metadata (e.g. age and sex from a demographics sheet) copied into the provenance.
    """

    subject: str
    image: Path
    mask: Path | None = None
    healthy: bool = True
    lesion_type: str = ""
    mask_labels: tuple[int, ...] | None = None
    info: dict = field(default_factory=dict)


@dataclass
class PrepareReport:
    """What :func:`prepare_dataset` did. ``failed`` holds ``(subject, one-line message)``."""

    manifest: Path | None
    prepared: list[str]
    skipped: list[str]
    failed: list[tuple[str, str]]
    seconds: float

    def format(self) -> str:
        lines = [f"prepared {len(self.prepared)}, skipped {len(self.skipped)} already done, "
                 f"failed {len(self.failed)} ({self.seconds:.1f} s)"]
        lines += [f"  FAILED {subject}: {message}" for subject, message in self.failed]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- SimpleITK helpers
def _sitk():
    import SimpleITK as sitk

    return sitk


def _one_line(err: BaseException) -> str:
    """SimpleITK exceptions span many lines; keep the informative ones on one line."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text[:400] or type(err).__name__


def nib_to_sitk(array: np.ndarray, affine: np.ndarray):
    """A nibabel-style ``(X, Y, Z)`` array + RAS affine → SimpleITK image (LPS physical space)."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    flip = np.diag([-1.0, -1.0, 1.0])
    lps = flip @ np.asarray(affine, float)[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps / spacing).ravel()])
    image.SetOrigin([float(v) for v in flip @ np.asarray(affine, float)[:3, 3]])
    return image


@contextlib.contextmanager
def keep_locale():
    """Restore the C locale settings afterwards. GDCM's DICOM writer switches the process to the
    "C" locale (after which Python's default text encoding is ASCII); reading did not in our
    checks, but the guard costs nothing."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def read_raw(path: Path, what: str = "image"):
    """Read a NIfTI file or a DICOM series folder as a float32 SimpleITK image.

    Raises :class:`DataError` naming the file for missing, unreadable, non-3D or non-finite input.
    A folder with several DICOM series uses the one with the most files.
    """
    sitk = _sitk()
    path = Path(path)
    where = f"{what} {path}"
    if not path.exists():
        raise DataError(f"{where}: file not found")
    try:
        if path.is_dir():
            with keep_locale():
                reader = sitk.ImageSeriesReader()
                series = reader.GetGDCMSeriesIDs(str(path))
                if not series:
                    raise DataError(f"{where}: folder holds no DICOM series")
                files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
                if len(files) < 2:
                    raise DataError(f"{where}: the DICOM series has {len(files)} slice(s); need a 3D volume")
                reader.SetFileNames(files)
                image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except DataError:
        raise
    except RuntimeError as err:
        raise DataError(f"{where}: cannot read ({_one_line(err)})") from err
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{where}: expected a 3D single-channel volume, got size {image.GetSize()} with "
                        f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    if min(image.GetSize()) < 2:
        raise DataError(f"{where}: a 3D volume needs at least 2 voxels per axis, got size {image.GetSize()}")
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise DataError(f"{where}: {bad} non-finite voxel(s) (NaN or inf)")
    return image


def _grid_of(image) -> dict:
    return {"size": [int(s) for s in image.GetSize()], "spacing": [float(s) for s in image.GetSpacing()],
            "origin": [float(s) for s in image.GetOrigin()], "direction": [float(s) for s in image.GetDirection()]}


def _grid_image(grid: dict):
    sitk = _sitk()
    image = sitk.Image([int(s) for s in grid["size"]], sitk.sitkUInt8)
    image.SetSpacing(grid["spacing"])
    image.SetOrigin(grid["origin"])
    image.SetDirection(grid["direction"])
    return image


def _write_image(image, path: Path) -> Path:
    sitk = _sitk()
    return atomic_write(Path(path), lambda tmp: sitk.WriteImage(image, str(tmp), True))


def _write_transform(transform, path: Path) -> Path:
    sitk = _sitk()
    return atomic_write(Path(path), lambda tmp: sitk.WriteTransform(transform, str(tmp)))


# ----------------------------------------------------------------------------- template
@functools.lru_cache(maxsize=1)
def _template_1mm():
    """The MNI152 2009a T1 template and brain mask shipped with nilearn (read offline)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    brain = datasets.load_mni152_brain_mask(resolution=1)
    return (nib_to_sitk(np.asarray(t1.get_fdata(), np.float32), t1.affine),
            nib_to_sitk(np.asarray(brain.get_fdata(), np.float32), brain.affine))


def template_grid(spacing_mm: float):
    """The output grid: the MNI152 template's field of view at ``spacing_mm`` (RAS+ on disk)."""
    t1, _ = _template_1mm()
    size = [int(math.floor((n - 1) * s / spacing_mm)) + 1 for n, s in zip(t1.GetSize(), t1.GetSpacing())]
    return _grid_image({"size": size, "spacing": [float(spacing_mm)] * 3,
                        "origin": list(t1.GetOrigin()), "direction": list(t1.GetDirection())})


@functools.lru_cache(maxsize=4)
def _template_on(spacing_mm: float):
    """Template T1 (anti-aliased) and brain mask (> 0.5) resampled onto :func:`template_grid`."""
    sitk = _sitk()
    t1, brain = _template_1mm()
    grid = template_grid(spacing_mm)
    sigma = 0.4 * math.sqrt(max(spacing_mm ** 2 - 1.0, 0.0))
    smooth_t1 = sitk.SmoothingRecursiveGaussian(t1, sigma) if sigma > 0 else t1
    t1_out = sitk.Resample(smooth_t1, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    brain_out = sitk.Resample(brain, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32) > 0.5
    return t1_out, sitk.Cast(brain_out, sitk.sitkUInt8)


# ----------------------------------------------------------------------------- steps
def n4_correct(image, shrink_mm: float = 6.0, iterations: int = 50, levels: int = 3):
    """N4 bias-field correction; returns ``(corrected, info)``. Fitted inside an Otsu foreground
    mask on a copy shrunk to about ``shrink_mm`` voxels, applied at full resolution."""
    sitk = _sitk()
    values = sitk.GetArrayViewFromImage(image)
    offset = 0.0
    if float(values.min()) <= 0:
        offset = 1.0 - float(values.min())  # N4 works on log intensities: make them positive
    shifted = image + offset if offset else image
    mask = sitk.OtsuThreshold(shifted, 0, 1, 200)
    factors = [max(1, int(round(shrink_mm / s))) for s in image.GetSpacing()]
    factors = [min(f, max(1, n // 4)) for f, n in zip(factors, image.GetSize())]
    small = sitk.Shrink(shifted, factors)
    small_mask = sitk.Shrink(mask, factors)
    if int(sitk.GetArrayViewFromImage(small_mask).sum()) < 10:
        raise DataError("N4: the Otsu foreground mask is (almost) empty; is the image constant?")
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([iterations] * levels)
    n4.Execute(small, small_mask)
    log_bias = n4.GetLogBiasFieldAsImage(shifted)
    corrected = shifted / sitk.Exp(log_bias) - offset if offset else shifted / sitk.Exp(log_bias)
    gain = np.exp(sitk.GetArrayViewFromImage(log_bias)[sitk.GetArrayViewFromImage(mask) > 0])
    info = {"shrink_factors": factors, "iterations": [iterations] * levels,
            "bias_gain_range": [float(gain.min()), float(gain.max())],
            "converged_at_level": int(n4.GetCurrentLevel()), "intensity_offset": offset}
    return sitk.Cast(corrected, sitk.sitkFloat32), info


def _downsample(image, spacing_mm: float):
    """Anti-aliased copy of ``image`` with voxels no smaller than ``spacing_mm`` (same world space).

    Registering a 1 mm scan on a 2 mm template gains nothing from the fine voxels, but ITK would
    smooth and differentiate the full moving image at every pyramid level."""
    sitk = _sitk()
    spacing = np.array(image.GetSpacing())
    target = np.maximum(spacing, spacing_mm)
    if np.allclose(target, spacing):
        return image
    sigma = [0.4 * math.sqrt(max(t * t - s * s, 0.0)) for t, s in zip(target, spacing)]
    smooth = sitk.SmoothingRecursiveGaussian(image, [max(v, 1e-3) for v in sigma])
    size = [max(2, int(round(n * s / t))) for n, s, t in zip(image.GetSize(), spacing, target)]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # keep the field of view centred where it was
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    origin = centre - direction @ (target * (np.array(size) - 1) / 2)
    return sitk.Resample(smooth, [int(v) for v in size], sitk.Transform(), sitk.sitkLinear, [float(v) for v in origin],
                         [float(v) for v in target], image.GetDirection(), 0.0, sitk.sitkFloat32)


def _optimise(fixed, moving, transform, spacing, config) -> dict:
    """Optimise ``transform`` in place (one linear stage); returns its final metric and stop reason."""
    method = _registration_method(spacing, config.registration_iterations, config.seed)
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)
    return {"metric": float(method.GetMetricValue()), "stop": method.GetOptimizerStopConditionDescription()}


def _registration_method(fixed_spacing: float, iterations: int, seed: int, scale_from_shift: bool = True):
    sitk = _sitk()
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4,
                                                    numberOfIterations=iterations,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    if scale_from_shift:
        method.SetOptimizerScalesFromPhysicalShift()
    levels = [f for f in (4, 2, 1) if fixed_spacing * f <= 12.0] or [1]
    method.SetShrinkFactorsPerLevel(levels)
    method.SetSmoothingSigmasPerLevel([fixed_spacing * (f - 1) / 2.0 for f in levels])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def register_to_template(moving, config: PrepareConfig):
    """Register ``moving`` (raw, bias-corrected) to the MNI152 template.

    Returns ``(transform, inverse, info)``: ``transform`` maps template points to raw points (what
    resampling the raw image onto the template grid needs), ``inverse`` maps raw points to template
    points. ``none`` gives identity transforms (world coordinates kept).
    """
    sitk = _sitk()
    if config.registration == "none":
        return sitk.Transform(3, sitk.sitkIdentity), sitk.Transform(3, sitk.sitkIdentity), {"kind": "none"}
    reg_spacing = max(config.registration_spacing_mm, config.spacing_mm)
    fixed, fixed_brain = _template_on(reg_spacing)
    moving = _downsample(moving, reg_spacing)  # same physical space: the transform is unaffected
    info: dict = {"kind": config.registration, "template_spacing_mm": reg_spacing,
                  "metric": "Mattes mutual information (32 bins, 10% random samples)"}
    rigid = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    info["rigid"] = _optimise(fixed, moving, rigid, reg_spacing, config)
    linear = rigid
    if config.registration in ("affine", "affine+bspline"):
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetCenter(rigid.GetCenter())
        affine.SetTranslation(rigid.GetTranslation())
        info["affine"] = _optimise(fixed, moving, affine, reg_spacing, config)
        linear = affine
    linear_inverse = linear.GetInverse()
    info["matrix"] = [float(v) for v in linear.GetMatrix()]
    info["translation_mm"] = [float(v) for v in linear.GetTranslation()]
    if config.registration != "affine+bspline":
        return sitk.Transform(linear), sitk.Transform(linear_inverse), info

    mesh = [max(1, int(round(n * s / config.bspline_mesh_mm))) for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, config.seed)
    method.SetMetricFixedMask(sitk.BinaryDilate(fixed_brain, [2, 2, 2]))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=config.registration_iterations)
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetMovingInitialTransform(linear)
    method.SetInitialTransform(bspline, inPlace=True)
    method.Execute(fixed, moving)
    info["bspline"] = {"mesh": mesh, "metric": float(method.GetMetricValue()),
                       "stop": method.GetOptimizerStopConditionDescription()}
    forward = sitk.CompositeTransform(3)
    forward.AddTransform(linear)
    forward.AddTransform(bspline)  # applied first: template point → B-spline → affine → raw point
    # The B-spline has no closed-form inverse: invert its displacement field on the template grid.
    field = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, fixed.GetSize(),
                                              fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
    inverse_field = sitk.InvertDisplacementField(field, maximumNumberOfIterations=50,
                                                 maxErrorToleranceThreshold=0.01,
                                                 meanErrorToleranceThreshold=0.0001,
                                                 enforceBoundaryCondition=True)
    inverse = sitk.CompositeTransform(3)
    inverse.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(inverse_field, sitk.sitkVectorFloat64)))
    inverse.AddTransform(linear_inverse)  # applied first: raw point → affine⁻¹ → B-spline⁻¹ → template
    return forward, inverse, info


def _hd_bet_mask(image, work: Path):
    """Brain mask in raw space from the optional HD-BET command-line tool (needs its weights)."""
    sitk = _sitk()
    exe = shutil.which("hd-bet")
    if exe is None:
        raise ConfigError(HD_BET_MISSING)
    source, target = work / "input.nii.gz", work / "brain.nii.gz"
    sitk.WriteImage(image, str(source))
    result = subprocess.run([exe, "-i", str(source), "-o", str(target), "-device", "cpu", "-mode", "fast",
                             "-tta", "0"], capture_output=True, text=True)
    mask_path = work / "brain_mask.nii.gz"
    if result.returncode != 0 or not mask_path.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"hd-bet failed (exit {result.returncode}): {tail[0]}; its model weights must be "
                        "downloaded beforehand (run hd-bet once with internet access)")
    return sitk.ReadImage(str(mask_path))


HD_BET_MISSING = ("skull_strip 'hd-bet' needs the optional HD-BET tool ('hd-bet' on PATH) and its model "
                  "weights, which are downloaded separately and are not installed here; use "
                  "--skull-strip atlas (offline: the registered MNI152 brain mask)")


def standardise(values: np.ndarray, brain: np.ndarray, mode: str, percentiles=(1.0, 99.0)) -> tuple[np.ndarray, dict]:
    """Robust intensity standardisation inside ``brain`` (bool); 0 outside. Returns (array, info)."""
    inside = values[brain] if brain.any() else values.ravel()
    if mode == "none":
        return np.where(brain, values, 0).astype(np.float32), {"mode": "none"}
    if mode == "zscore":
        mean, std = float(inside.mean()), float(inside.std()) or 1.0
        return np.where(brain, (values - mean) / std, 0).astype(np.float32), {"mode": "zscore", "mean": mean, "std": std}
    lo, hi = (float(v) for v in np.percentile(inside, percentiles))
    if not hi > lo:
        hi = lo + 1.0
    out = np.where(brain, np.clip((values - lo) / (hi - lo), 0.0, None), 0).astype(np.float32)
    return out, {"mode": "percentile", "percentiles": list(percentiles), "low": lo, "high": hi}


def _lesion_mask(raw_mask, labels: tuple[int, ...] | None):
    sitk = _sitk()
    values = sitk.GetArrayFromImage(raw_mask)
    binary = np.isin(np.rint(values), labels) if labels is not None else values > 0
    out = sitk.GetImageFromArray(binary.astype(np.uint8))
    out.CopyInformation(raw_mask)
    return out


def _fingerprint_inputs(subject: RawSubject) -> dict:
    def digest(path: Path | None, what: str) -> str | None:
        if path is None:
            return None
        if not path.exists():
            raise DataError(f"{what} {path}: file not found")
        h = hashlib.sha256()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            h.update(file.name.encode())
            with file.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()

    return {"image": digest(Path(subject.image), "image"),
            "mask": digest(Path(subject.mask), "mask") if subject.mask is not None else None}


# ----------------------------------------------------------------------------- one subject
def output_paths(out_dir: Path, subject: str, linear: bool = True) -> dict[str, Path]:
    ext = "tfm" if linear else "h5"
    return {"image": out_dir / "images" / f"{subject}.nii.gz",
            "mask": out_dir / "masks" / f"{subject}.nii.gz",
            "brain_mask": out_dir / "brain_masks" / f"{subject}.nii.gz",
            "transform": out_dir / "transforms" / f"{subject}.{ext}",
            "inverse_transform": out_dir / "transforms" / f"{subject}_inverse.{ext}",
            "provenance": out_dir / "provenance" / f"{subject}.json"}


def prepare_subject(subject: RawSubject, out_dir: str | Path, config: PrepareConfig | None = None,
                    inputs: dict | None = None) -> dict:
    """Preprocess one subject into ``out_dir``; return its provenance dict (also written as JSON).

    Raises :class:`DataError` (naming the file) on bad input; nothing is left half-written.
    """
    sitk = _sitk()
    config = config or PrepareConfig()
    config.validate()
    if config.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(config.threads)
    out = Path(out_dir)
    paths = output_paths(out, subject.subject, linear=config.registration != "affine+bspline")
    if paths["provenance"].exists():  # outputs are about to change: the old record no longer holds
        paths["provenance"].unlink()
    timings: dict[str, float] = {}
    steps: dict[str, dict] = {}
    clock = time.perf_counter()

    def tick(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    raw = read_raw(subject.image, "image")
    raw_mask = read_raw(subject.mask, "mask") if subject.mask is not None else None
    tick("read")
    moving = raw
    if config.bias_correction:
        try:
            moving, steps["n4"] = n4_correct(raw, config.n4_shrink_mm, config.n4_iterations, config.n4_levels)
        except RuntimeError as err:
            raise DataError(f"image {subject.image}: N4 failed ({_one_line(err)})") from err
        tick("n4")
    try:
        transform, inverse, steps["registration"] = register_to_template(moving, config)
    except RuntimeError as err:
        raise DataError(f"image {subject.image}: registration failed ({_one_line(err)})") from err
    tick("registration")

    grid = template_grid(config.spacing_mm)
    image = sitk.Resample(moving, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(image)
    steps["resample"] = {"spacing_mm": config.spacing_mm, "size": list(grid.GetSize()),
                         "interpolation": "linear (image), nearest neighbour (masks)"}
    _, template_brain = _template_on(config.spacing_mm)
    if config.skull_strip == "atlas":
        brain = sitk.GetArrayFromImage(template_brain) > 0
        steps["skull_strip"] = {"method": "atlas", "mask": "MNI152 2009a brain mask (nilearn), registered"}
    elif config.skull_strip == "hd-bet":
        with tempfile.TemporaryDirectory() as work:
            raw_brain = _hd_bet_mask(moving, Path(work))
        brain = sitk.GetArrayFromImage(sitk.Resample(raw_brain, grid, transform, sitk.sitkNearestNeighbor,
                                                     0, sitk.sitkUInt8)) > 0
        steps["skull_strip"] = {"method": "hd-bet"}
    else:
        brain = values > 0
        steps["skull_strip"] = {"method": "none", "brain": "voxels with raw data (> 0)"}
    if not brain.any():
        raise DataError(f"image {subject.image}: the brain mask is empty after registration")
    standardised, steps["normalize"] = standardise(values, brain, config.normalize, config.percentiles)
    tick("resample_strip_normalize")

    out_image = sitk.GetImageFromArray(standardised)
    out_image.CopyInformation(grid)
    brain_image = sitk.GetImageFromArray(brain.astype(np.uint8))
    brain_image.CopyInformation(grid)
    written = {"image": paths["image"], "brain_mask": paths["brain_mask"]}
    mask_voxels = None
    if raw_mask is not None:
        lesion = sitk.Resample(_lesion_mask(raw_mask, subject.mask_labels), grid, transform,
                               sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        mask_voxels = int(sitk.GetArrayViewFromImage(lesion).sum())
        raw_voxels = int(sitk.GetArrayFromImage(_lesion_mask(raw_mask, subject.mask_labels)).sum())
        if raw_voxels and not mask_voxels:
            raise DataError(f"mask {subject.mask}: its {raw_voxels} lesion voxel(s) fall outside the registered "
                            "brain field of view; does the mask share the image's world space?")
        _write_image(lesion, paths["mask"])
        written["mask"] = paths["mask"]
    _write_image(out_image, paths["image"])
    _write_image(brain_image, paths["brain_mask"])
    _write_transform(transform, paths["transform"])
    _write_transform(inverse, paths["inverse_transform"])
    tick("write")

    from .. import __version__

    provenance = {
        "format": PROVENANCE_VERSION,
        "status": "done",
        "subject": subject.subject,
        "healthy": subject.healthy,
        "lesion_type": subject.lesion_type,
        "info": subject.info,
        "inputs": {"image": str(subject.image), "mask": str(subject.mask) if subject.mask else None,
                   "mask_labels": list(subject.mask_labels) if subject.mask_labels is not None else None,
                   "sha256": inputs if inputs is not None else _fingerprint_inputs(subject)},
        "raw_grid": _grid_of(raw),
        "template_grid": _grid_of(grid),
        "template": "MNI152 2009a T1 + brain mask (nilearn, 1 mm)",
        "config": {**dataclasses.asdict(config), "percentiles": list(config.percentiles)},
        "config_fingerprint": config.fingerprint(),
        "steps": steps,
        "transform_convention": ("transform: template point -> raw point (ITK); inverse_transform: raw point "
                                 "-> template point; to_native() resamples a template map with transform⁻¹"),
        "outputs": {k: os.path.relpath(v, out) for k, v in {**written, "transform": paths["transform"],
                                                            "inverse_transform": paths["inverse_transform"]}.items()},
        "lesion_voxels": mask_voxels,
        "seconds": timings,
        "versions": {"anomorph": __version__, "SimpleITK": sitk.Version_VersionString(),
                     "python": sys.version.split()[0]},
    }
    payload = json.dumps(provenance, indent=2)
    atomic_write(paths["provenance"], lambda tmp: Path(tmp).write_text(payload, encoding="utf-8"))
    return provenance


def _is_done(out: Path, subject: RawSubject, config: PrepareConfig, inputs: dict) -> bool:
    path = output_paths(out, subject.subject)["provenance"]
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if old.get("status") != "done" or old.get("config_fingerprint") != config.fingerprint():
        return False
    if old.get("inputs", {}).get("sha256") != inputs:
        return False
    return all((out / rel).is_file() for rel in old.get("outputs", {}).values())


# ----------------------------------------------------------------------------- splits
def assign_splits(subjects: list[RawSubject], seed: int = 0,
                  healthy_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                  lesion_val_fraction: float = 0.3) -> dict[str, str]:
    """Subject → split. Healthy subjects are shuffled (seeded) into train/val/test by
    ``healthy_fractions``; lesion subjects only into val/test (``lesion_val_fraction`` to val).
    The assignment depends only on the seed and the set of subject names."""
    fractions = tuple(float(f) for f in healthy_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ConfigError(f"healthy split fractions must be 3 non-negative numbers summing to 1, got {healthy_fractions}")
    if not 0 <= lesion_val_fraction <= 1:
        raise ConfigError(f"lesion val fraction must be in [0, 1], got {lesion_val_fraction}")
    names = [s.subject for s in subjects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"duplicate subject name(s) {duplicates[:5]}: subject names must be unique")
    splits: dict[str, str] = {}
    for healthy in (True, False):
        group = sorted(s.subject for s in subjects if s.healthy == healthy)
        if not group:
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(healthy)]))
        order = [group[i] for i in rng.permutation(len(group))]
        if healthy:
            n_train = int(round(fractions[0] * len(order)))
            n_val = int(round(fractions[1] * len(order)))
            cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
                    "test": order[n_train + n_val:]}
        else:
            n_val = int(round(lesion_val_fraction * len(order)))
            cuts = {"val": order[:n_val], "test": order[n_val:]}
        for split, members in cuts.items():
            splits.update({name: split for name in members})
    return splits


# ----------------------------------------------------------------------------- many subjects
def _progress_line(done: int, total: int, subject: str, status: str, start: float) -> str:
    width = 20
    filled = int(round(width * done / max(total, 1)))
    elapsed = time.perf_counter() - start
    eta = elapsed / done * (total - done) if done else 0.0
    return (f"prepare [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {subject}: {status} "
            f"({elapsed:.0f} s elapsed, ~{eta:.0f} s left)")


def prepare_dataset(subjects: list[RawSubject], out_dir: str | Path, config: PrepareConfig | None = None,
                    seed: int = 0, healthy_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                    lesion_val_fraction: float = 0.3, progress: bool = False, resume: bool = True) -> PrepareReport:
    """Preprocess ``subjects`` into ``out_dir`` and write a validated ``manifest.csv``.

    Subjects already done with the same config and unchanged inputs are skipped (``resume``).
    A failing subject is recorded with its file and one-line reason, the others go on;
    ``prepare_failures.txt`` lists them. The manifest lists every subject that is done (it is
    only written when at least one is), with splits from :func:`assign_splits`; it is re-read
    with :func:`anomorph.data.manifest.read_manifest` before returning.
    """
    config = config or PrepareConfig()
    config.validate()
    if not subjects:
        raise DataError("no subjects to prepare (the recipe found no input files)")
    if config.skull_strip == "hd-bet" and shutil.which("hd-bet") is None:
        raise ConfigError(HD_BET_MISSING)
    splits = assign_splits(subjects, seed, healthy_fractions, lesion_val_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prepared, skipped, failed = [], [], []
    rows: list[dict[str, str]] = []
    for number, subject in enumerate(subjects, start=1):
        try:
            inputs = _fingerprint_inputs(subject)
            if resume and _is_done(out, subject, config, inputs):
                skipped.append(subject.subject)
                status = "already done, skipped"
            else:
                t0 = time.perf_counter()
                prepare_subject(subject, out, config, inputs=inputs)
                prepared.append(subject.subject)
                status = f"done in {time.perf_counter() - t0:.1f} s"
        except (DataError, ConfigError, OSError) as err:
            failed.append((subject.subject, str(err).splitlines()[0] if str(err) else type(err).__name__))
            status = f"FAILED: {failed[-1][1]}"
        except RuntimeError as err:  # an ITK error in a step without its own message
            failed.append((subject.subject, f"image {subject.image}: {_one_line(err)}"))
            status = f"FAILED: {failed[-1][1]}"
        if progress:
            print(_progress_line(number, len(subjects), subject.subject, status, start), file=sys.stderr, flush=True)
        if subject.subject in prepared or subject.subject in skipped:
            paths = output_paths(out, subject.subject)
            row = {"image": os.path.relpath(paths["image"], out), "split": splits[subject.subject],
                   "brain_mask": os.path.relpath(paths["brain_mask"], out), "mask": "",
                   "label": "0" if subject.healthy else "1", "subject": subject.subject,
                   "lesion_type": subject.lesion_type}
            if subject.mask is not None:
                row["mask"] = os.path.relpath(paths["mask"], out)
            rows.append(row)
    failures_path = out / "prepare_failures.txt"
    if failed:
        text = "".join(f"{s}\t{m}\n" for s, m in failed)
        atomic_write(failures_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    elif failures_path.exists():
        failures_path.unlink()
    manifest = None
    if rows:
        manifest = write_manifest(out / "manifest.csv", rows)
        read_manifest(manifest)
    return PrepareReport(manifest=manifest, prepared=prepared, skipped=skipped, failed=failed,
                         seconds=time.perf_counter() - start)


# ----------------------------------------------------------------------------- back to raw space
def to_native(map_path: str | Path, provenance: str | Path, out_path: str | Path,
              interpolation: str = "linear", reference: str | Path | None = None) -> Path:
    """Resample a template-space map (e.g. a predicted anomaly map) onto the raw scan's grid.

    ``provenance`` is the subject's ``provenance/<subject>.json`` written by :func:`prepare_subject`;
    its stored transform (template → raw points) is inverted exactly (affine) or through its stored
    inverse displacement field (B-spline) — ITK resampling needs, for each raw voxel, its template
    point. ``interpolation``: ``linear`` (maps) or ``nearest`` (label masks). ``reference``: the raw
    image, to copy its grid from the file itself (default: the raw grid recorded in the provenance).
    The output overlays the raw input in ITK-SNAP / FSLeyes; outside the template's field of view
    it is 0.
    """
    sitk = _sitk()
    if interpolation not in ("linear", "nearest"):
        raise ConfigError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    provenance = Path(provenance)
    if not provenance.is_file():
        raise DataError(f"provenance {provenance}: file not found")
    try:
        record = json.loads(provenance.read_text(encoding="utf-8"))
        inverse_rel = record["outputs"]["inverse_transform"]
        raw_grid = record["raw_grid"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"provenance {provenance}: not an anomorph prepare provenance file ({err})") from err
    base = provenance.resolve().parent.parent
    inverse_path = base / inverse_rel
    if not inverse_path.is_file():
        raise DataError(f"provenance {provenance}: field 'outputs.inverse_transform': file not found: {inverse_path}")
    template_map = read_raw(Path(map_path), "map")
    try:
        inverse = sitk.ReadTransform(str(inverse_path))
    except RuntimeError as err:
        raise DataError(f"transform {inverse_path}: cannot read ({_one_line(err)})") from err
    reference_image = read_raw(Path(reference), "reference") if reference is not None else _grid_image(raw_grid)
    mode = sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor
    # Resample pulls values: output (raw) point q takes the map at inverse(q), a template point.
    native = sitk.Resample(template_map, reference_image, inverse, mode, 0.0, sitk.sitkFloat32)
    return _write_image(native, Path(out_path))
