"""The built-in brain MRI phantom: synthetic T1 subjects made from the MNI152 template.

Every subject is the MNI152 2009a T1 template (shipped inside nilearn, read offline) warped by
*normal variability* — a smooth random B-spline deformation, a ventricle dilation or shrinkage,
a small rigid pose change — and rendered with a random gamma/scale contrast, a smooth
multiplicative bias field and Rician noise. Lesion subjects additionally carry one of
:data:`LESION_TYPES`, painted with a soft, irregular 3D border into the warped anatomy; each
lesion subject comes with its exact healthy counterpart (same warp, contrast, bias and noise
realisation, no lesion).

Volumes are float32 NIfTI, shape ``(size, size, n_slices)``, axial slices along the last axis,
RAS+ affine in MNI millimetres; intensities are positive, white matter ≈ 870 × a per-subject
scale in [0.85, 1.15] (the template's 0..1 range times 1000), background = Rician noise
magnitude. Masks are uint8 {0, 1}. See ``docs/phantom.md``.

Entry point: :func:`build_phantom`; one subject in memory: :func:`generate_subject`.
"""
from __future__ import annotations

import functools
import gzip
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import ConfigError
from .io import atomic_write
from .manifest import write_manifest

LESION_TYPES: tuple[str, ...] = ("csf_like", "mass_effect", "multifocal", "large")
"""Lesion kinds, in the round-robin order in which lesion subjects are assigned them."""

MANIFEST_COLUMNS: tuple[str, ...] = (
    "image", "split", "mask", "brain_mask", "healthy", "label", "subject", "lesion_type",
)
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_TEMPLATE_MARGIN_MM = 30.0     # template slab kept around the output slab (covers all warps)
_VENTRICLE_SMOOTHING_MM = 4.0  # width of the ventricle dilation profile
_MIN_MASK_WEIGHT = 0.2         # lesion weights below this are cut to 0 (mask = weight > 0)
_MAX_LESION_ATTEMPTS = 40


@dataclass
class PhantomConfig:
    """Everything that defines a phantom; the same config and seed give identical arrays.

    Every ``*_range`` field is a ``(low, high)`` pair; each subject draws a value uniformly in it.

    Grid and splits
        size: in-plane pixels per axis of each axial slice (voxel size = field_of_view_mm / size).
        n_slices: axial slices per volume, evenly covering the slab (slice spacing =
            slab_thickness_mm / n_slices).
        seed: non-negative integer; subject ``i`` of split ``s`` uses the child seed
            ``SeedSequence([seed, s, i])``, so a subject does not change when counts change.
        n_train: healthy training subjects.
        n_val_healthy, n_val_lesion: healthy and lesion validation subjects (thresholds are
            tuned on val, so it needs both).
        n_test: test subjects in total, of which ``n_test_healthy`` are healthy.
        field_of_view_mm: in-plane field of view (mm), centred on the brain.
        slab_center_mm: MNI z coordinate (mm) of the slab centre; 14 mm covers the ventricles.
        slab_thickness_mm: through-plane extent of the slab (mm).

    Normal variability
        deformation_amplitude_mm: largest displacement (mm) of the random smooth deformation,
            per axis.
        deformation_smoothness_mm: control-point spacing (mm) of that cubic B-spline field.
        ventricle_dilation_range_mm: shift (mm) of the ventricle walls; > 0 enlarges,
            < 0 shrinks the lateral ventricles; within [-3, 3].
        max_rotation_deg: largest in-plane (yaw) rotation (degrees).
        max_tilt_deg: largest out-of-plane (pitch and roll) rotation (degrees).
        max_translation_mm: largest in-plane shift (mm), per axis.
        max_slab_shift_mm: largest through-plane shift (mm) of the slab.
        gamma_range: contrast exponent applied to template intensities in [0, 1].
        intensity_scale_range: global intensity gain (1 = white matter ≈ 870).
        bias_field_strength: largest absolute log-gain of the smooth multiplicative bias field
            (0.15 → gains in [0.86, 1.16]).
        bias_field_smoothness_mm: control-point spacing (mm) of the bias field.
        noise_sigma_range: Rician noise: standard deviation of each of the two Gaussian
            channels, as a fraction of the subject's white-matter intensity.

    Lesions (radii are nominal ellipsoid radii before the irregular border; they are raised
    to at least 0.6 × the largest voxel spacing so every lesion is visible on the grid)
        lesion_irregularity: relative radius perturbation of lesion borders (0 = ellipsoid).
        lesion_border_mm: width (mm) of the soft lesion edge (weight ramps 0 → 1).
        csf_like_radius_range_mm: radius (mm) of ``csf_like`` lesions.
        mass_effect_radius_range_mm: radius (mm) of ``mass_effect`` lesions.
        mass_effect_push_range: outward displacement of the surrounding tissue at the lesion
            edge, as a fraction of the lesion radius.
        mass_effect_falloff_mm: Gaussian decay length (mm) of that displacement outside the
            lesion.
        multifocal_count_range: number of foci of a ``multifocal`` lesion (integers, inclusive).
        multifocal_radius_range_mm: radius (mm) of each focus.
        large_radius_range_mm: radius (mm) of ``large`` lesions.
    """

    size: int = 128
    n_slices: int = 16
    seed: int = 0
    n_train: int = 24
    n_val_healthy: int = 4
    n_val_lesion: int = 4
    n_test: int = 16
    n_test_healthy: int = 4
    field_of_view_mm: float = 192.0
    slab_center_mm: float = 14.0
    slab_thickness_mm: float = 48.0
    deformation_amplitude_mm: float = 3.0
    deformation_smoothness_mm: float = 24.0
    ventricle_dilation_range_mm: tuple[float, float] = (-1.5, 3.0)
    max_rotation_deg: float = 4.0
    max_tilt_deg: float = 2.0
    max_translation_mm: float = 4.0
    max_slab_shift_mm: float = 3.0
    gamma_range: tuple[float, float] = (0.8, 1.25)
    intensity_scale_range: tuple[float, float] = (0.85, 1.15)
    bias_field_strength: float = 0.15
    bias_field_smoothness_mm: float = 80.0
    noise_sigma_range: tuple[float, float] = (0.01, 0.03)
    lesion_irregularity: float = 0.3
    lesion_border_mm: float = 2.0
    csf_like_radius_range_mm: tuple[float, float] = (5.0, 12.0)
    mass_effect_radius_range_mm: tuple[float, float] = (6.0, 12.0)
    mass_effect_push_range: tuple[float, float] = (0.3, 0.5)
    mass_effect_falloff_mm: float = 10.0
    multifocal_count_range: tuple[int, int] = (3, 8)
    multifocal_radius_range_mm: tuple[float, float] = (2.0, 5.0)
    large_radius_range_mm: tuple[float, float] = (13.0, 20.0)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`~anomorph.config.ConfigError` naming the first invalid field."""
        def fail(name: str, why: str) -> None:
            raise ConfigError(f"PhantomConfig.{name} = {getattr(self, name)!r}: {why}")

        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_range") or f.name.endswith("_range_mm"):
                if len(value) != 2 or not all(np.isfinite(v) for v in value):
                    fail(f.name, "must be two finite numbers (low, high)")
                if value[0] > value[1]:
                    fail(f.name, "low must not exceed high")
            elif not np.isfinite(value):
                fail(f.name, "must be finite")
        for name in ("size", "n_slices", "seed", "n_train", "n_val_healthy", "n_val_lesion", "n_test",
                     "n_test_healthy"):
            if int(getattr(self, name)) != getattr(self, name):
                fail(name, "must be an integer")
        if self.size < 8:
            fail("size", "must be at least 8 pixels")
        if self.n_slices < 2:
            fail("n_slices", "must be at least 2")
        if self.seed < 0:
            fail("seed", "must be >= 0")
        for name in ("n_train", "n_val_healthy", "n_val_lesion", "n_test", "n_test_healthy"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.n_test_healthy > self.n_test:
            fail("n_test_healthy", f"exceeds n_test = {self.n_test}")
        if self.n_train + self.n_val_healthy + self.n_val_lesion + self.n_test == 0:
            fail("n_train", "the phantom would have no subjects")
        for name in ("field_of_view_mm", "slab_thickness_mm", "deformation_smoothness_mm",
                     "bias_field_smoothness_mm", "lesion_border_mm", "mass_effect_falloff_mm"):
            if getattr(self, name) <= 0:
                fail(name, "must be > 0")
        for name in ("deformation_amplitude_mm", "max_rotation_deg", "max_tilt_deg",
                     "max_translation_mm", "max_slab_shift_mm", "bias_field_strength"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if not -3.0 <= self.ventricle_dilation_range_mm[0] <= self.ventricle_dilation_range_mm[1] <= 3.0:
            fail("ventricle_dilation_range_mm", "must lie in [-3, 3] mm (larger values fold the warp)")
        if not 0 <= self.lesion_irregularity <= 0.6:
            fail("lesion_irregularity", "must be in [0, 0.6]")
        for name in ("gamma_range", "intensity_scale_range", "csf_like_radius_range_mm",
                     "mass_effect_radius_range_mm", "multifocal_radius_range_mm",
                     "large_radius_range_mm"):
            if getattr(self, name)[0] <= 0:
                fail(name, "values must be > 0")
        if self.noise_sigma_range[0] < 0:
            fail("noise_sigma_range", "values must be >= 0")
        if self.mass_effect_push_range[0] < 0 or self.mass_effect_push_range[1] > 0.6:
            fail("mass_effect_push_range", "values must be in [0, 0.6]")
        if self.multifocal_count_range[0] < 1 or any(int(v) != v for v in self.multifocal_count_range):
            fail("multifocal_count_range", "must be integers >= 1")


@dataclass(frozen=True)
class PhantomSubject:
    """One synthesized subject. Arrays are ``(size, size, n_slices)``.

    ``image``/``healthy`` are float32 intensities (≥ 0); ``healthy`` is ``None`` for healthy
    subjects (the image is its own counterpart). ``mask`` is uint8 {0, 1} or ``None`` for
    healthy subjects; ``brain_mask`` is uint8 {0, 1} of ``image``. ``affine`` maps voxel
    indices to RAS+ millimetres.
    """

    subject: str
    split: str
    lesion_type: str
    image: np.ndarray
    healthy: np.ndarray | None
    mask: np.ndarray | None
    brain_mask: np.ndarray
    affine: np.ndarray


# ----------------------------------------------------------------------------- template
@dataclass(frozen=True)
class _Template1mm:
    """MNI152 2009a maps at 1 mm: T1 (0..1), GM/WM/brain probabilities, ventricle mask."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    ventricles: np.ndarray
    affine: np.ndarray
    brain_center_xy_mm: tuple[float, float]
    csf_level: float
    gm_level: float
    wm_level: float


@functools.lru_cache(maxsize=1)
def _template_1mm() -> _Template1mm:
    """Load the template maps shipped with nilearn (no network access) once per process."""
    from nilearn import datasets

    def load(loader) -> tuple[np.ndarray, np.ndarray]:
        image = loader(resolution=1)
        return np.asarray(image.get_fdata(), dtype=np.float32), np.asarray(image.affine, float)

    t1, affine = load(datasets.load_mni152_template)
    gm, _ = load(datasets.load_mni152_gm_template)
    wm, _ = load(datasets.load_mni152_wm_template)
    brain, _ = load(datasets.load_mni152_brain_mask)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)

    # Lateral (and third) ventricles: the second-largest CSF component (the largest is the
    # sulcal CSF around the brain, which is connected to the surface).
    labels, count = ndi.label(csf > 0.5)
    sizes = ndi.sum_labels(np.ones_like(labels), labels, np.arange(1, count + 1))
    ventricles = labels == (int(np.argsort(sizes)[-2]) + 1)

    brain_voxels = np.argwhere(brain > 0.5)
    lo = affine[:3, :3] @ brain_voxels.min(0) + affine[:3, 3]
    hi = affine[:3, :3] @ brain_voxels.max(0) + affine[:3, 3]
    return _Template1mm(
        t1=t1, gm=gm, wm=wm, brain=brain, ventricles=ventricles, affine=affine,
        brain_center_xy_mm=(float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2)),
        csf_level=float(np.median(t1[ventricles])),
        gm_level=float(np.median(t1[(gm > 0.8) & (brain > 0.5)])),
        wm_level=float(np.median(t1[(wm > 0.9) & (brain > 0.5)])),
    )


@dataclass(frozen=True)
class _Atlas:
    """Template maps cropped to the slab and pre-smoothed for one output voxel size.

    ``maps`` holds ``t1, gm, wm, brain, ventricles`` (float32, template voxel grid);
    ``ventricle_pull`` is (3, ...) the gradient (dimensionless, peak norm 1) of the smoothed
    ventricle mask, pointing into the ventricles. ``world_to_voxel`` maps MNI mm to indices.
    """

    maps: dict[str, np.ndarray]
    ventricle_pull: np.ndarray
    world_to_voxel: np.ndarray


@functools.lru_cache(maxsize=4)
def _atlas(spacing_mm: tuple[float, float, float], z_range_mm: tuple[float, float]) -> _Atlas:
    template = _template_1mm()
    voxel_to_world = template.affine
    z_lo, z_hi = z_range_mm[0] - _TEMPLATE_MARGIN_MM, z_range_mm[1] + _TEMPLATE_MARGIN_MM
    k_lo = max(int(math.floor((z_lo - voxel_to_world[2, 3]) / voxel_to_world[2, 2])), 0)
    k_hi = min(int(math.ceil((z_hi - voxel_to_world[2, 3]) / voxel_to_world[2, 2])) + 1,
               template.t1.shape[2])
    if k_hi - k_lo < 2:
        raise ConfigError(f"the slab {z_range_mm} mm lies outside the MNI152 template")
    crop = (slice(None), slice(None), slice(k_lo, k_hi))
    # Anti-aliasing: a Gaussian approximating the larger output voxel's point-spread.
    sigma = [0.4 * math.sqrt(max(s * s - 1.0, 0.0)) for s in spacing_mm]
    maps = {
        name: ndi.gaussian_filter(getattr(template, name)[crop].astype(np.float32), sigma)
        for name in ("t1", "gm", "wm", "brain", "ventricles")
    }
    smooth_ventricles = ndi.gaussian_filter(template.ventricles.astype(np.float32),
                                            _VENTRICLE_SMOOTHING_MM)[crop]
    pull = np.stack(np.gradient(smooth_ventricles))
    pull /= max(float(np.sqrt((pull ** 2).sum(0)).max()), 1e-12)
    shift = np.eye(4)
    shift[2, 3] = k_lo
    world_to_voxel = np.linalg.inv(voxel_to_world @ shift)
    return _Atlas(maps=maps, ventricle_pull=pull.astype(np.float32), world_to_voxel=world_to_voxel)


# ----------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class _Grid:
    """The output voxel grid: shape, spacing (mm), RAS affine and world coordinates (3, ...)."""

    shape: tuple[int, int, int]
    spacing: np.ndarray
    affine: np.ndarray
    world: np.ndarray
    center: np.ndarray

    def to_world(self, voxel: np.ndarray) -> np.ndarray:
        return self.affine[:3, :3] @ voxel + self.affine[:3, 3]


def _output_grid(config: PhantomConfig) -> _Grid:
    cx, cy = _template_1mm().brain_center_xy_mm
    in_plane = config.field_of_view_mm / config.size
    through = config.slab_thickness_mm / config.n_slices
    spacing = np.array([in_plane, in_plane, through])
    center = np.array([cx, cy, config.slab_center_mm])
    extent = np.array([config.field_of_view_mm, config.field_of_view_mm, config.slab_thickness_mm])
    origin = center - extent / 2 + spacing / 2
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    shape = (config.size, config.size, config.n_slices)
    axes = [origin[a] + spacing[a] * np.arange(shape[a]) for a in range(3)]
    world = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
    return _Grid(shape=shape, spacing=spacing, affine=affine, world=world, center=center)


# ----------------------------------------------------------------------------- random fields
def _bspline_weights(n_fine: int, spacing_mm: float, step_mm: float) -> np.ndarray:
    """(n_fine, n_coarse) cubic B-spline basis matrix for control points every ``step_mm``."""
    u = np.arange(n_fine) * spacing_mm / step_mm + 1.0
    n_coarse = int(math.floor(u[-1])) + 3
    base = np.floor(u).astype(int)
    t = u - base
    basis = np.stack([(1 - t) ** 3, 3 * t ** 3 - 6 * t ** 2 + 4, -3 * t ** 3 + 3 * t ** 2 + 3 * t + 1,
                      t ** 3]) / 6.0
    weights = np.zeros((n_fine, n_coarse))
    for offset in range(4):
        weights[np.arange(n_fine), base - 1 + offset] = basis[offset]
    return weights


def _smooth_noise(shape: tuple[int, ...], spacing_mm, smoothness_mm: float,
                  rng: np.random.Generator) -> np.ndarray:
    """A random smooth field on a grid, peak |value| = 1, float32.

    Cubic B-spline with standard-normal control points every ``smoothness_mm`` millimetres.
    """
    matrices = [_bspline_weights(n, float(s), smoothness_mm) for n, s in zip(shape, spacing_mm)]
    field = rng.standard_normal(tuple(m.shape[1] for m in matrices))
    for axis, matrix in enumerate(matrices):
        field = np.moveaxis(np.tensordot(matrix, field, axes=(1, axis)), 0, axis)
    peak = float(np.abs(field).max())
    return (field / peak if peak > 0 else field).astype(np.float32)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# ----------------------------------------------------------------------------- subjects
@dataclass(frozen=True)
class _Appearance:
    """Per-subject rendering: ``1000·scale·I^gamma·bias`` then Rician noise of ``noise_sigma``."""

    gamma: float
    scale: float
    bias: np.ndarray
    noise: np.ndarray
    noise_sigma: float

    def render(self, template_intensity: np.ndarray) -> np.ndarray:
        signal = (1000.0 * self.scale) * np.clip(template_intensity, 0.0, None) ** self.gamma * self.bias
        real = signal + self.noise_sigma * self.noise[0]
        imaginary = self.noise_sigma * self.noise[1]
        return np.sqrt(real * real + imaginary * imaginary).astype(np.float32)


class _Anatomy:
    """Template maps sampled onto the output grid on first use (float32, template units).

    ``t1`` is the T1 intensity (0..1); ``gm``, ``wm``, ``brain``, ``ventricles`` are
    probabilities in [0, 1]. Healthy subjects only ever sample ``t1`` and ``brain``.
    """

    def __init__(self, atlas: _Atlas, template_voxels: np.ndarray) -> None:
        self._atlas = atlas
        self._voxels = template_voxels

    def _map(self, name: str) -> np.ndarray:
        return _sample(self._atlas.maps[name], self._voxels)

    @functools.cached_property
    def t1(self) -> np.ndarray:
        return self._map("t1")

    @functools.cached_property
    def gm(self) -> np.ndarray:
        return self._map("gm")

    @functools.cached_property
    def wm(self) -> np.ndarray:
        return self._map("wm")

    @functools.cached_property
    def brain(self) -> np.ndarray:
        return self._map("brain")

    @functools.cached_property
    def ventricles(self) -> np.ndarray:
        return self._map("ventricles")

    @property
    def csf(self) -> np.ndarray:
        return np.clip(self.brain - self.gm - self.wm, 0.0, 1.0)

    @property
    def brain_mask(self) -> np.ndarray:
        return self.brain > 0.5


def _rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    yaw, pitch, roll = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    ry = np.array([[np.cos(pitch), 0, np.sin(pitch)], [0, 1, 0], [-np.sin(pitch), 0, np.cos(pitch)]])
    rx = np.array([[1, 0, 0], [0, np.cos(roll), -np.sin(roll)], [0, np.sin(roll), np.cos(roll)]])
    return rz @ ry @ rx


def _apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points of shape (3, ...)."""
    return (np.tensordot(matrix[:3, :3], points, axes=(1, 0))
            + matrix[:3, 3].reshape((3,) + (1,) * (points.ndim - 1))).astype(np.float32)


def _sample(volume: np.ndarray, voxel_coords: np.ndarray) -> np.ndarray:
    return ndi.map_coordinates(volume, voxel_coords, order=1, mode="constant", cval=0.0,
                               prefilter=False)


def _template_coordinates(config: PhantomConfig, grid: _Grid, atlas: _Atlas,
                          rng: np.random.Generator) -> np.ndarray:
    """Draw pose, smooth deformation and ventricle dilation; return (3, ...) template voxels.

    For output point x: p = R(x − c) + c + t + d(x) (mm), then q = p + a·g(p) where g is the
    unit-peak gradient of the smoothed ventricle mask and a the ventricle dilation (mm).
    """
    rotation = _rotation(rng.uniform(-1, 1) * config.max_rotation_deg,
                         rng.uniform(-1, 1) * config.max_tilt_deg,
                         rng.uniform(-1, 1) * config.max_tilt_deg)
    translation = np.array([rng.uniform(-1, 1) * config.max_translation_mm,
                            rng.uniform(-1, 1) * config.max_translation_mm,
                            rng.uniform(-1, 1) * config.max_slab_shift_mm])
    relative = grid.world - grid.center.reshape(3, 1, 1, 1).astype(np.float32)
    points = np.tensordot(rotation.astype(np.float32), relative, axes=(1, 0))
    points += (grid.center + translation).reshape(3, 1, 1, 1).astype(np.float32)
    for axis in range(3):
        points[axis] += config.deformation_amplitude_mm * _smooth_noise(
            grid.shape, grid.spacing, config.deformation_smoothness_mm, rng)
    dilation = rng.uniform(*config.ventricle_dilation_range_mm)
    voxels = _apply_affine(atlas.world_to_voxel, points)
    pull = np.stack([_sample(atlas.ventricle_pull[a], voxels) for a in range(3)])
    return _apply_affine(atlas.world_to_voxel, points + np.float32(dilation) * pull)


def _draw_appearance(config: PhantomConfig, grid: _Grid, rng: np.random.Generator,
                     noise_rng: np.random.Generator) -> _Appearance:
    gamma = rng.uniform(*config.gamma_range)
    scale = rng.uniform(*config.intensity_scale_range)
    bias = np.exp(config.bias_field_strength
                  * _smooth_noise(grid.shape, grid.spacing, config.bias_field_smoothness_mm, rng))
    white_matter = 1000.0 * scale * _template_1mm().wm_level ** gamma
    noise_sigma = rng.uniform(*config.noise_sigma_range) * white_matter
    noise = noise_rng.standard_normal((2,) + grid.shape, dtype=np.float32)
    return _Appearance(gamma=float(gamma), scale=float(scale), bias=bias.astype(np.float32),
                       noise=noise, noise_sigma=float(noise_sigma))


# ----------------------------------------------------------------------------- lesions
@dataclass(frozen=True)
class _Blob:
    """An irregular soft ellipsoid in a bounding box of the output grid."""

    box: tuple[slice, slice, slice]
    weight: np.ndarray      # 0..1, 0 outside the blob
    radius: np.ndarray      # normalised, noise-perturbed radius (1 = border)


def _blob(config: PhantomConfig, grid: _Grid, center_mm: np.ndarray, radius_mm: float,
          rng: np.random.Generator) -> _Blob | None:
    """Soft ellipsoid with random axes (0.8–1.25 × radius), in-plane orientation and border noise."""
    axes_mm = radius_mm * rng.uniform(0.8, 1.25, 3)
    angle = rng.uniform(0, 2 * np.pi)
    reach = axes_mm.max() / (1.0 - config.lesion_irregularity) + grid.spacing
    lo = np.floor((center_mm - reach - grid.affine[:3, 3]) / grid.spacing).astype(int)
    hi = np.ceil((center_mm + reach - grid.affine[:3, 3]) / grid.spacing).astype(int) + 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, grid.shape)
    if np.any(hi <= lo):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    offset = grid.world[(slice(None),) + box] - center_mm.reshape(3, 1, 1, 1).astype(np.float32)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    along = cos * offset[0] + sin * offset[1]
    across = -sin * offset[0] + cos * offset[1]
    radius = np.sqrt((along / axes_mm[0]) ** 2 + (across / axes_mm[1]) ** 2 + (offset[2] / axes_mm[2]) ** 2)
    border_noise = _smooth_noise(radius.shape, grid.spacing, max(0.45 * radius_mm, 1.0), rng)
    radius = radius * (1.0 + config.lesion_irregularity * border_noise)
    weight = _smoothstep((1.0 - radius) * radius_mm / config.lesion_border_mm)
    return _Blob(box=box, weight=weight.astype(np.float32), radius=radius.astype(np.float32))


def _pick_center(rng: np.random.Generator, grid: _Grid, candidates: list[np.ndarray]) -> np.ndarray:
    """A random point (mm) in the first non-empty candidate mask, jittered within its voxel."""
    for candidate in candidates:
        flat = np.flatnonzero(candidate)
        if flat.size:
            break
    else:
        raise RuntimeError("phantom: no voxel can host a lesion; increase size or n_slices")
    voxel = np.array(np.unravel_index(flat[rng.integers(flat.size)], grid.shape), float)
    return grid.to_world(voxel + rng.uniform(-0.5, 0.5, 3))


def _radius(config: PhantomConfig, grid: _Grid, radius_range: tuple[float, float],
            rng: np.random.Generator) -> float:
    return max(rng.uniform(*radius_range), 0.6 * float(grid.spacing.max()))


def _mass_effect_voxels(grid: _Grid, template_voxels: np.ndarray, center_mm: np.ndarray,
                        radius_mm: float, push_mm: float, falloff_mm: float) -> np.ndarray:
    """Template coordinates of the subject with tissue pushed radially away from ``center_mm``.

    The output point at distance ρ' from the centre shows the tissue that was at
    ρ = max(ρ' − s(ρ'), 0), s = push for ρ' ≤ radius, decaying as a Gaussian of ``falloff_mm``
    beyond (cut to exactly 0 at 3 falloffs); ρ grows monotonically with ρ' outside the lesion,
    so there is no folding there.
    """
    offset = grid.world - center_mm.reshape(3, 1, 1, 1).astype(np.float32)
    distance = np.sqrt((offset ** 2).sum(0))
    outside = np.maximum(distance - radius_mm, 0.0)
    floor = math.exp(-4.5)  # the Gaussian at 3 falloffs: shifted to 0 so the push has compact support
    push = push_mm * np.maximum(np.exp(-0.5 * (outside / falloff_mm) ** 2) - floor, 0.0) / (1.0 - floor)
    ratio = np.maximum(distance - push, 0.0) / np.maximum(distance, 1e-6)
    source_mm = center_mm.reshape(3, 1, 1, 1) + offset * ratio
    source_voxels = _apply_affine(np.linalg.inv(grid.affine), source_mm)
    return np.stack([ndi.map_coordinates(template_voxels[a], source_voxels, order=1, mode="nearest",
                                         prefilter=False) for a in range(3)])


@dataclass(frozen=True)
class _Lesion:
    """A painted lesion: the anatomy it lives in (displaced for mass effect), weight, intensity."""

    anatomy: _Anatomy
    weight: np.ndarray
    intensity: np.ndarray


def _paint(intensity: np.ndarray, blob: _Blob, weight: np.ndarray, values: np.ndarray | float) -> None:
    """Merge a blob into the running ``weight`` (max) and set ``intensity`` where it dominates."""
    local_weight = weight[blob.box]
    wins = blob.weight > local_weight
    local_intensity = intensity[blob.box]
    local_values = np.broadcast_to(np.asarray(values, np.float32), blob.weight.shape)
    local_intensity[wins] = local_values[wins]
    local_weight[wins] = blob.weight[wins]


def _make_lesion(kind: str, config: PhantomConfig, grid: _Grid, atlas: _Atlas,
                 template_voxels: np.ndarray, anatomy: _Anatomy, rng: np.random.Generator) -> _Lesion:
    """One lesion attempt of ``kind`` in template-intensity units (0..1)."""
    levels = _template_1mm()
    brain = anatomy.brain_mask
    interior = np.zeros(grid.shape, bool)
    interior[:, :, 1:-1] = True
    depth = ndi.distance_transform_edt(brain, sampling=grid.spacing)
    texture = _smooth_noise(grid.shape, grid.spacing, 4.0, rng)
    weight = np.zeros(grid.shape, np.float32)
    intensity = anatomy.t1.copy()
    tissue = anatomy.gm + anatomy.wm

    if kind == "csf_like":
        radius = _radius(config, grid, config.csf_like_radius_range_mm, rng)
        csf_distance = ndi.distance_transform_edt(anatomy.csf <= 0.5, sampling=grid.spacing)
        ventricle_distance = ndi.distance_transform_edt(anatomy.ventricles <= 0.5, sampling=grid.spacing)

        def beside(distance: np.ndarray) -> np.ndarray:
            return (distance >= 0.4 * radius) & (distance <= 0.9 * radius) & (tissue > 0.5) & brain & interior

        near_ventricles = rng.random() < 0.5
        # Sulcal CSF must lie inside the brain (fissures, deep sulci), not at its outer surface.
        candidates = [beside(ventricle_distance), beside(csf_distance) & (depth >= 0.5 * radius + 2.0)]
        if not near_ventricles:
            candidates.reverse()
        center = _pick_center(rng, grid, candidates + [brain & interior, brain])
        blob = _blob(config, grid, center, radius, rng)
        if blob is not None:
            level = levels.csf_level * rng.uniform(0.9, 1.1)
            _paint(intensity, blob, weight, level * (1.0 + 0.05 * texture[blob.box]))
        # Only tissue turns CSF-like: the lesion abuts the CSF space without covering it.
        weight *= _smoothstep((tissue - 0.2) / 0.5)

    elif kind == "mass_effect":
        radius = _radius(config, grid, config.mass_effect_radius_range_mm, rng)
        center = _pick_center(rng, grid, [(anatomy.wm > 0.5) & (depth >= radius + 4.0) & interior,
                                          brain & (depth >= radius) & interior, brain])
        push = rng.uniform(*config.mass_effect_push_range) * radius
        displaced = _mass_effect_voxels(grid, template_voxels, center, radius, push,
                                        config.mass_effect_falloff_mm)
        anatomy = _Anatomy(atlas, displaced)
        intensity = anatomy.t1.copy()
        blob = _blob(config, grid, center, radius, rng)
        if blob is not None:
            level = levels.csf_level + rng.uniform(0.3, 0.7) * (levels.gm_level - levels.csf_level)
            _paint(intensity, blob, weight, level * (1.0 + 0.08 * texture[blob.box]))

    elif kind == "multifocal":
        count = int(rng.integers(config.multifocal_count_range[0], config.multifocal_count_range[1] + 1))
        hyperintense = rng.random() < 0.5
        if hyperintense:
            level = levels.wm_level * rng.uniform(1.12, 1.25)
        else:
            level = levels.wm_level + rng.uniform(0.5, 0.8) * (levels.csf_level - levels.wm_level)
        for _ in range(count):
            radius = _radius(config, grid, config.multifocal_radius_range_mm, rng)
            center = _pick_center(rng, grid, [(anatomy.wm > 0.5) & (depth >= radius + 2.0), brain])
            blob = _blob(config, grid, center, radius, rng)
            if blob is not None:
                _paint(intensity, blob, weight, level * (1.0 + 0.04 * texture[blob.box]))

    elif kind == "large":
        radius = _radius(config, grid, config.large_radius_range_mm, rng)
        center = _pick_center(rng, grid, [brain & (depth >= 0.5 * radius) & interior,
                                          brain & (depth >= 0.3 * radius), brain])
        blob = _blob(config, grid, center, radius, rng)
        if blob is not None:
            base = levels.csf_level + rng.uniform(0.2, 0.45) * (levels.gm_level - levels.csf_level)
            core_radius = rng.uniform(0.35, 0.6)
            rim_level = levels.wm_level * rng.uniform(1.12, 1.25)  # brighter than WM: visible everywhere
            values = base * (1.0 + 0.12 * texture[blob.box])
            core = _smoothstep((core_radius - blob.radius) / 0.15)
            values = values + core * (0.9 * levels.csf_level - values)
            rim = 0.8 * np.exp(-(((blob.radius - 0.75) / 0.16) ** 2))
            values = values + rim * (rim_level - values)
            _paint(intensity, blob, weight, values)
    else:
        raise ValueError(f"unknown lesion type {kind!r}; expected one of {LESION_TYPES}")

    weight *= anatomy.brain_mask
    weight[weight < _MIN_MASK_WEIGHT] = 0.0
    return _Lesion(anatomy=anatomy, weight=weight, intensity=intensity)


def _lesion_is_acceptable(mask: np.ndarray) -> bool:
    """Non-empty on ≥ 2 slices (1 if the volume has 2) and at least one lesion-free slice."""
    per_slice = mask.any(axis=(0, 1))
    return bool(per_slice.sum() >= min(2, mask.shape[2] - 1) and (~per_slice).any())


# ----------------------------------------------------------------------------- public API
def subject_plan(config: PhantomConfig) -> list[tuple[str, int, str]]:
    """``(split, index, lesion_type)`` for every subject; ``lesion_type`` is '' when healthy.

    Lesion subjects come first in val and test, assigned :data:`LESION_TYPES` round-robin.
    """
    plan = [("train", i, "") for i in range(config.n_train)]
    for split, n_lesion, n_healthy in (("val", config.n_val_lesion, config.n_val_healthy),
                                       ("test", config.n_test - config.n_test_healthy, config.n_test_healthy)):
        plan += [(split, i, LESION_TYPES[i % len(LESION_TYPES)]) for i in range(n_lesion)]
        plan += [(split, n_lesion + i, "") for i in range(n_healthy)]
    return plan


def generate_subject(config: PhantomConfig, split: str, index: int, lesion_type: str = "") -> PhantomSubject:
    """Synthesize subject ``index`` of ``split`` in memory (deterministic in config and seed).

    ``lesion_type`` '' gives a healthy subject; otherwise one of :data:`LESION_TYPES`. The
    anatomy, contrast, bias and noise depend only on (seed, split, index), not on the lesion.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {tuple(_SPLIT_CODES)}, got {split!r}")
    if lesion_type and lesion_type not in LESION_TYPES:
        raise ValueError(f"unknown lesion type {lesion_type!r}; expected one of {LESION_TYPES}")
    grid = _output_grid(config)
    z_lo = float(grid.world[2].min())
    z_hi = float(grid.world[2].max())
    atlas = _atlas(tuple(float(s) for s in grid.spacing), (z_lo, z_hi))
    anatomy_rng, lesion_rng, noise_rng = (
        np.random.default_rng(s)
        for s in np.random.SeedSequence([config.seed, _SPLIT_CODES[split], index]).spawn(3)
    )
    template_voxels = _template_coordinates(config, grid, atlas, anatomy_rng)
    anatomy = _Anatomy(atlas, template_voxels)
    appearance = _draw_appearance(config, grid, anatomy_rng, noise_rng)
    healthy_image = appearance.render(anatomy.t1)
    name = f"sub-{split}-{index:03d}"
    if not lesion_type:
        return PhantomSubject(subject=name, split=split, lesion_type="", image=healthy_image, healthy=None,
                              mask=None, brain_mask=anatomy.brain_mask.astype(np.uint8), affine=grid.affine)

    best: _Lesion | None = None
    for _ in range(_MAX_LESION_ATTEMPTS):
        lesion = _make_lesion(lesion_type, config, grid, atlas, template_voxels, anatomy, lesion_rng)
        mask = lesion.weight > 0
        if _lesion_is_acceptable(mask):
            best = lesion
            break
        if mask.any() and (best is None or mask.any(axis=(0, 1)).sum() > best.weight.any(axis=(0, 1)).sum()):
            best = lesion
    if best is None:
        raise RuntimeError(f"phantom: could not place a visible {lesion_type} lesion in {name}; "
                           "increase size or n_slices")
    lesion_t1 = best.anatomy.t1 + best.weight * (best.intensity - best.anatomy.t1)
    return PhantomSubject(subject=name, split=split, lesion_type=lesion_type,
                          image=appearance.render(lesion_t1), healthy=healthy_image,
                          mask=(best.weight > 0).astype(np.uint8),
                          brain_mask=best.anatomy.brain_mask.astype(np.uint8), affine=grid.affine)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Atomically write a gzip NIfTI with a fixed gzip timestamp (same data → same bytes)."""
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    payload = gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def build_phantom(out_dir: str | Path, config: PhantomConfig | None = None, progress: bool = False) -> Path:
    """Write the phantom's NIfTI volumes and ``manifest.csv`` into ``out_dir``; return the manifest.

    Layout: ``images/``, ``brain_masks/``, ``masks/`` (lesion subjects only) and ``healthy/``
    (lesion subjects only; a healthy subject's ``healthy`` column points at its own image).
    Each file is written atomically. ``progress`` prints one line per subject to stderr.
    """
    config = config or PhantomConfig()
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = subject_plan(config)
    rows: list[dict[str, str]] = []
    start = time.perf_counter()
    for number, (split, index, lesion_type) in enumerate(plan, start=1):
        subject = generate_subject(config, split, index, lesion_type)
        file_name = f"{subject.subject}.nii.gz"
        image_path = f"images/{file_name}"
        brain_path = f"brain_masks/{file_name}"
        _write_nifti(out / image_path, subject.image, subject.affine)
        _write_nifti(out / brain_path, subject.brain_mask, subject.affine)
        mask_path, healthy_path = "", image_path
        if subject.mask is not None:
            mask_path, healthy_path = f"masks/{file_name}", f"healthy/{file_name}"
            _write_nifti(out / mask_path, subject.mask, subject.affine)
            _write_nifti(out / healthy_path, subject.healthy, subject.affine)
        rows.append({"image": image_path, "split": split, "mask": mask_path, "brain_mask": brain_path,
                     "healthy": healthy_path, "label": "1" if subject.mask is not None else "0",
                     "subject": subject.subject, "lesion_type": lesion_type})
        if progress:
            print(f"phantom [{number}/{len(plan)}] {subject.subject} {lesion_type or 'healthy'} "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return write_manifest(out / "manifest.csv", rows)
