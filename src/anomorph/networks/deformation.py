"""Velocity fields, their integration into deformations, warping and the Jacobian determinant.

Conventions, shared by every function and class here and by MONAI's ``Warp``/``DVF2DDF``:

- Velocity fields v and dense displacement fields (DDF) d are ``(B, spatial_dims, *spatial)``
  tensors in **pixels** (voxels in 3D), not normalised [-1, 1] coordinates.
- Channel k is the component along spatial axis k of the tensor: in 2D channel 0 moves along
  rows (H, the first spatial axis) and channel 1 along columns (W).
- Warping pulls: ``warp(image, d)(p) = image(p + d(p))`` with (bi/tri)linear interpolation,
  i.e. ``image ∘ φ`` with ``φ(p) = p + d(p)``.
- φ = exp(v) is computed by scaling and squaring: ``d = v / 2**steps``, then ``steps`` times
  ``d <- d + warp(d, d)`` (MONAI ``DVF2DDF``).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from monai.networks.blocks import DVF2DDF, Warp
from torch import nn

from anomorph.networks.blocks import ConvNormAct, conv_type, resize_to

PADDING_MODES = ("border", "zeros", "reflection")
try:  # MONAI's compiled resampler (not built in the CPU wheels this project installs)
    from monai.networks.blocks.warp import USE_COMPILED as _MONAI_COMPILED
except ImportError:  # pragma: no cover
    _MONAI_COMPILED = False


class PixelWarp(Warp):
    """MONAI ``Warp`` whose cached reference grid follows the DDF's device and dtype.

    ``forward(image, ddf)``: image ``(B, C, *spatial)``, ddf ``(B, spatial_dims, *spatial)``
    in **pixels**, channel k along spatial axis k; returns ``image(p + ddf(p))``.
    ``padding_mode`` ("border" | "zeros" | "reflection") sets the values sampled outside.
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "border") -> None:
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
            super().__init__(mode=mode, padding_mode=padding_mode)

    def get_reference_grid(self, ddf: torch.Tensor, jitter: bool = False, seed: int = 0) -> torch.Tensor:
        if self.ref_grid is not None and (self.ref_grid.device != ddf.device or self.ref_grid.dtype != ddf.dtype):
            self.ref_grid = None
        return super().get_reference_grid(ddf, jitter=jitter, seed=seed)

    def native_path(self, ddf: torch.Tensor) -> bool:
        """Whether this layer warps with torch's ``grid_sample`` itself (2-d/3-d, no jitter, no
        MONAI compiled resampler) instead of handing over to MONAI's ``Warp.forward``."""
        return ddf.ndim in (4, 5) and not self.jitter and not _MONAI_COMPILED

    def normalised_identity(self, ddf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``grid_sample``'s frame for a DDF like ``ddf`` ``(B, D, *spatial)``: the identity grid
        ``(1, *spatial, D)`` in normalised [-1, 1] coordinates, axes in x, y(, z) order (the
        reverse of the tensor's), and the ``(D,)`` factors 2 / max(n − 1, 1) (same order) that
        turn pixels into normalised units (``align_corners=True``). Cached per shape/dtype/device."""
        key = (tuple(ddf.shape[2:]), ddf.dtype, ddf.device)
        if getattr(self, "_identity_key", None) != key:
            sizes = ddf.shape[2:]
            factors = torch.tensor([2.0 / max(n - 1, 1) for n in reversed(sizes)], dtype=ddf.dtype,
                                   device=ddf.device)
            axes = torch.meshgrid(*[torch.arange(n, dtype=ddf.dtype, device=ddf.device) for n in sizes],
                                  indexing="ij")
            identity = torch.stack(axes[::-1], dim=-1) * factors - 1
            self._identity_key, self._identity = key, (identity.unsqueeze(0), factors)
        return self._identity

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """MONAI ``Warp.forward``'s native path with the same arithmetic, without its per-axis
        in-place slice writes and the advanced-indexing reversal of the axes (an index/index_put
        pair with copies in forward and backward, ~a fifth of a test-time step on CPU): the
        normalised grid is (p + d)·2 / max(n − 1, 1) − 1 per axis, the axes reversed by ``flip``.
        The values are the same (tests/test_networks.py compares with ``Warp.forward``)."""
        spatial_dims = image.ndim - 2
        if (not self.native_path(ddf)
                or tuple(ddf.shape) != (image.shape[0], spatial_dims, *image.shape[2:])):
            return super().forward(image, ddf)  # MONAI's checks, messages and compiled path
        grid = self.get_reference_grid(ddf) + ddf
        denominators = [float(max(n - 1, 1)) for n in ddf.shape[2:]]
        scale = torch.tensor(denominators, dtype=grid.dtype, device=grid.device).view(1, spatial_dims,
                                                                                     *[1] * spatial_dims)
        grid = (grid * 2 / scale - 1).flip(1).movedim(1, -1)  # (B, *spatial, D): x, y(, z) order
        return nn.functional.grid_sample(image, grid, mode=self._interp_mode_native,
                                         padding_mode=self._padding_mode_native, align_corners=True)

    def warp_normalised(self, image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        """``image`` ``(B, C, *spatial)`` warped by a displacement given in ``grid_sample``'s frame,
        ``field`` ``(B, *spatial, D)`` in normalised units, x, y(, z) order (as
        :meth:`VelocityIntegrator.normalised_field` returns it): the same as ``forward`` with that
        displacement in pixels, up to float rounding. Native path only (:meth:`native_path`)."""
        identity, _ = self.normalised_identity(field.movedim(-1, 1))
        return nn.functional.grid_sample(image, identity + field, mode=self._interp_mode_native,
                                         padding_mode=self._padding_mode_native, align_corners=True)


class VelocityIntegrator(DVF2DDF):
    """exp(v) by scaling and squaring (MONAI ``DVF2DDF``) with a device/dtype-safe warp.

    ``forward(velocity)``: stationary velocity ``(B, spatial_dims, *spatial)`` in **pixels**
    -> DDF d = φ − id of the same shape, in pixels, channel k along spatial axis k.
    ``num_steps=0`` skips integration (d = v). ``padding_mode`` is how the displacement is
    extrapolated outside the grid during composition; "border" keeps a constant field exact
    up to the edge (MONAI's default, "zeros", pulls displacements to 0 near the edge).
    """

    def __init__(self, num_steps: int = 7, mode: str = "bilinear", padding_mode: str = "border") -> None:
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")
            super().__init__(num_steps=max(num_steps, 1), mode=mode, padding_mode=padding_mode)
        self.num_steps = num_steps
        self.warp_layer = PixelWarp(mode=mode, padding_mode=padding_mode)

    def forward(self, dvf: torch.Tensor) -> torch.Tensor:
        """MONAI ``DVF2DDF``'s recursion, d ← d/2**steps, then ``steps`` times d ← d + d ∘ (id + d),
        carried out in ``grid_sample``'s own frame (:meth:`normalised_field`), the result
        converted back to pixels, ``(B, D, *spatial)``. Bilinear interpolation commutes with the
        per-axis scaling, so this is the same map up to float rounding (tests/test_networks.py
        compares it with MONAI's ``DVF2DDF``)."""
        if self.num_steps == 0:
            return dvf
        field = self.normalised_field(dvf)
        if field is None:
            return super().forward(dvf)
        _, factors = self.warp_layer.normalised_identity(dvf)
        return (field / factors).flip(-1).movedim(-1, 1).contiguous()

    def normalised_field(self, dvf: torch.Tensor) -> torch.Tensor | None:
        """exp(v) − id for ``dvf`` ``(B, D, *spatial)`` in pixels, returned in ``grid_sample``'s
        frame: channel-last ``(B, *spatial, D)``, normalised units (``align_corners=True``), axes
        in x, y(, z) order. Each composition is one ``grid_sample`` and one add, without building
        a pixel grid, rescaling, flipping and transposing it at every step (forward and backward:
        about a third of the integration's time on CPU). None where that path does not apply
        (1-d, jitter, MONAI's compiled resampler, a channel count other than D): use ``forward``."""
        warp_layer = self.warp_layer
        if not warp_layer.native_path(dvf) or dvf.shape[1] != dvf.ndim - 2:
            return None
        identity, factors = warp_layer.normalised_identity(dvf)
        field = dvf.movedim(1, -1).flip(-1) * (factors / 2**self.num_steps)
        for _ in range(self.num_steps):
            sampled = nn.functional.grid_sample(
                field.movedim(-1, 1), identity + field, mode=warp_layer._interp_mode_native,
                padding_mode=warp_layer._padding_mode_native, align_corners=True)
            field = field + sampled.movedim(1, -1)
        return field


def integrate_velocity(
    velocity: torch.Tensor, steps: int = 7, padding_mode: str = "border"
) -> torch.Tensor:
    """DDF ``(B, D, *spatial)`` in pixels = exp(velocity), velocity in pixels; see :class:`VelocityIntegrator`."""
    return VelocityIntegrator(steps, padding_mode=padding_mode)(velocity)


def warp(
    image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border"
) -> torch.Tensor:
    """``image(p + displacement(p))``: image ``(B, C, *spatial)``, displacement ``(B, D, *spatial)`` in pixels."""
    return PixelWarp(mode=mode, padding_mode=padding_mode)(image, displacement)


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """det J of φ(p) = p + d(p) for a DDF ``(B, D, *spatial)`` in **pixels**; returns ``(B, 1, *spatial)``.

    Derivatives are central differences with a 1-pixel spacing (one-sided at the border).
    1 = volume preserved, < 1 compression, <= 0 folding.
    """
    spatial_dims = displacement.ndim - 2
    if displacement.shape[1] != spatial_dims:
        raise ValueError(
            f"displacement must have {spatial_dims} channels for {spatial_dims} spatial dims, got {displacement.shape}"
        )
    axes = list(range(2, displacement.ndim))
    # gradients[j][:, i] = d(d_i) / d(axis j)
    gradients = torch.gradient(displacement, dim=axes)
    if spatial_dims == 2:
        a = 1 + gradients[0][:, 0]
        b = gradients[1][:, 0]
        c = gradients[0][:, 1]
        d = 1 + gradients[1][:, 1]
        return (a * d - b * c).unsqueeze(1)
    jacobian = torch.stack(gradients, dim=-1)  # (B, D_i, *spatial, D_j)
    jacobian = jacobian.movedim(1, -2)  # (B, *spatial, D_i, D_j)
    jacobian = jacobian + torch.eye(spatial_dims, dtype=jacobian.dtype, device=jacobian.device)
    return torch.linalg.det(jacobian).unsqueeze(1)


def _one_sided_differences(displacement: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, backward) differences of ``displacement`` along tensor dim ``axis``, 1-pixel spacing.

    forward(p) = d(p + e) − d(p), backward(p) = d(p) − d(p − e). Where one does not exist (the
    last / first index along ``axis``) the other is used; an axis of size 1 has no neighbour and
    gets 0 for both (d does not vary along it).
    """
    size = displacement.shape[axis]
    if size < 2:
        zeros = torch.zeros_like(displacement)
        return zeros, zeros
    step = displacement.diff(dim=axis)  # step[i] = d[i + 1] − d[i], size − 1 entries
    last = step.narrow(axis, size - 2, 1)
    first = step.narrow(axis, 0, 1)
    forward = torch.cat([step, last], dim=axis)  # at the last index: the backward difference
    backward = torch.cat([first, step], dim=axis)  # at the first index: the forward difference
    return forward, backward


def one_sided_jacobian_determinants(displacement: torch.Tensor) -> torch.Tensor:
    """The 2^D one-sided finite-difference det J of φ(p) = p + d(p); returns ``(B, 2**D, *spatial)``.

    ``displacement``: DDF ``(B, D, *spatial)`` in **pixels**, channel k along spatial axis k,
    D = 2 or 3. Column j of the Jacobian (the derivative along spatial axis j) is taken with
    either the forward difference d(p + e_j) − d(p) or the backward difference d(p) − d(p − e_j),
    for all components at once; output channel c uses, for spatial axis j, the forward
    difference if bit j of c (bit 0 = the first spatial axis) is 0 and the backward one if it
    is 1. So channel 0 is all-forward and channel 2**D − 1 all-backward. At the border the
    missing difference is replaced by the one that exists.

    Each determinant is the signed volume of the image of the simplex spanned by p and one
    neighbour p ± e_j per axis, divided by that simplex's undeformed signed volume, so unlike the central difference (:func:`jacobian_determinant`, blind to
    fields alternating between neighbours, e.g. +a/−a) they see every local orientation flip
    of the discrete map along the grid axes. Following Liu et al. 2022 ("On finite difference
    Jacobian computation in deformable image registration"), a discrete map is folding-free
    only if all of them are > 0 (a necessary condition; in 3D that paper also examines
    simplices not aligned with the grid axes, which are not computed here).
    Dimensionless: 1 = volume preserved, <= 0 folding.
    """
    spatial_dims = displacement.ndim - 2
    if spatial_dims not in (2, 3) or displacement.shape[1] != spatial_dims:
        raise ValueError(
            f"displacement must be (B, 2, H, W) or (B, 3, D, H, W), got {tuple(displacement.shape)}"
        )
    # differences[j] = (forward, backward) derivatives along spatial axis j, each (B, D_i, *spatial)
    differences = [_one_sided_differences(displacement, 2 + j) for j in range(spatial_dims)]
    eye = torch.eye(spatial_dims, dtype=displacement.dtype, device=displacement.device)
    determinants = []
    for combination in range(2**spatial_dims):
        columns = [differences[j][(combination >> j) & 1] for j in range(spatial_dims)]
        jacobian = torch.stack(columns, dim=-1).movedim(1, -2) + eye  # (B, *spatial, D_i, D_j)
        if spatial_dims == 2:
            det = jacobian[..., 0, 0] * jacobian[..., 1, 1] - jacobian[..., 0, 1] * jacobian[..., 1, 0]
        else:
            det = torch.linalg.det(jacobian)
        determinants.append(det)
    return torch.stack(determinants, dim=1)


def folding_mask(displacement: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, 1, *spatial)``: True where any one-sided det J of φ = id + d is <= 0.

    ``displacement`` ``(B, D, *spatial)`` in pixels; see :func:`one_sided_jacobian_determinants`.
    """
    return (one_sided_jacobian_determinants(displacement) <= 0).any(dim=1, keepdim=True)


def feature_level(image_size: Sequence[int], feature_size: Sequence[int], downsample: int, levels: int) -> int:
    """Head level (resolution ``image_size / 2**(level + downsample)``) nearest to ``feature_size``."""
    ratio = image_size[0] / feature_size[0]
    return int(min(max(round(math.log2(ratio)) - downsample, 0), levels - 1))


class VelocityHead(nn.Module):
    """Small U-Net predicting a stationary velocity field, in full-resolution **pixels**.

    Level ``l`` of the U-Net works at ``image_size / 2**(l + downsample)`` with
    ``channels[l]`` features. Inputs:

    - the image pair (x, x̂) when ``use_pair`` and ``guidance_channels`` guidance maps
      (e.g. an anomaly probability m in [0, 1]), concatenated at full resolution and entering
      level 0 through a stem convolution of stride ``2**downsample``;
    - decoder feature maps, ``feature_channels[i]`` wide, each concatenated into the
      convolution of head level ``feature_levels[i]`` (resized linearly if its size differs).

    The velocity is predicted at level 0 and, when ``downsample > 0``, resized linearly to the
    full resolution (values are already in full-resolution pixels, so they are not rescaled).
    The last convolution starts with N(0, ``init_std``²) weights and zero bias, so training
    starts near the identity warp. The image size must be divisible by
    ``2 ** (len(channels) - 1 + downsample)``.

    ``forward(image, prior, guidance=None, features=())`` returns
    ``(B, spatial_dims, *spatial)``, channel k along spatial axis k.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        image_channels: int = 1,
        guidance_channels: int = 0,
        feature_channels: Sequence[int] = (),
        feature_levels: Sequence[int] = (),
        use_pair: bool = True,
        channels: Sequence[int] = (32, 32, 64),
        downsample: int = 1,
        norm: str | None = None,
        act: str | None = "leakyrelu",
        init_std: float = 1e-5,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        levels = len(channels)
        if not channels:
            raise ValueError("head channels must not be empty")
        if len(feature_channels) != len(feature_levels):
            raise ValueError("feature_channels and feature_levels must have the same length")
        if any(not 0 <= level < levels for level in feature_levels):
            raise ValueError(f"feature_levels {tuple(feature_levels)} must lie in [0, {levels - 1}]")
        if downsample < 0:
            raise ValueError(f"downsample must be >= 0, got {downsample}")
        self.spatial_dims = spatial_dims
        self.use_pair = use_pair
        self.guidance_channels = guidance_channels
        self.downsample = downsample
        self.feature_levels = tuple(int(level) for level in feature_levels)
        stem_inputs = (2 * image_channels if use_pair else 0) + guidance_channels
        if stem_inputs == 0 and not feature_channels:
            raise ValueError("the velocity head needs the image pair, guidance or decoder features as input")
        conv = conv_type(spatial_dims)

        self.stem = (
            ConvNormAct(spatial_dims, stem_inputs, channels[0], stride=2**downsample, norm=norm, act=act)
            if stem_inputs
            else None
        )
        # Per level: an optional entry (stem or stride-2 down conv) then a block conv that also
        # fuses that level's decoder features. A level with no input at all stays empty.
        self.down = nn.ModuleDict()
        self.blocks = nn.ModuleDict()
        has_entry = self.stem is not None
        for level in range(levels):
            if level > 0 and has_entry:
                self.down[str(level)] = ConvNormAct(
                    spatial_dims, channels[level - 1], channels[level], stride=2, norm=norm, act=act
                )
            fused = sum(c for c, lv in zip(feature_channels, self.feature_levels) if lv == level)
            block_inputs = (channels[level] if has_entry else 0) + fused
            if block_inputs:
                self.blocks[str(level)] = ConvNormAct(spatial_dims, block_inputs, channels[level], norm=norm, act=act)
                has_entry = True
        self.up = nn.ModuleDict()
        self.merge = nn.ModuleDict()
        for level in reversed(range(1, levels)):
            self.up[str(level)] = ConvNormAct(
                spatial_dims, channels[level], channels[level - 1], stride=2, norm=norm, act=act, transposed=True
            )
            skip = channels[level - 1] if str(level - 1) in self.blocks else 0
            self.merge[str(level - 1)] = ConvNormAct(
                spatial_dims, channels[level - 1] + skip, channels[level - 1], norm=norm, act=act
            )
        self.levels = levels
        self.velocity = conv(channels[0], spatial_dims, kernel_size=3, padding=1)
        nn.init.normal_(self.velocity.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.velocity.bias)

    def forward(
        self,
        image: torch.Tensor,
        prior: torch.Tensor,
        guidance: torch.Tensor | None = None,
        features: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        if len(features) != len(self.feature_levels):
            raise ValueError(f"expected {len(self.feature_levels)} decoder feature maps, got {len(features)}")
        if self.guidance_channels and (guidance is None or guidance.shape[1] != self.guidance_channels):
            raise ValueError(f"expected guidance with {self.guidance_channels} channels")
        full_shape = image.shape[2:]
        level_shapes = [
            tuple(size // 2 ** (level + self.downsample) for size in full_shape) for level in range(self.levels)
        ]
        inputs = ([image, prior] if self.use_pair else []) + ([guidance] if self.guidance_channels else [])
        h = self.stem(torch.cat(inputs, dim=1)) if self.stem is not None else None
        skips: list[torch.Tensor | None] = []
        for level in range(self.levels):
            key = str(level)
            parts = []
            if level > 0 and h is not None:
                parts.append(self.down[key](h))
            elif level == 0 and h is not None:
                parts.append(h)
            parts.extend(
                resize_to(feature, level_shapes[level])
                for feature, feature_level in zip(features, self.feature_levels)
                if feature_level == level
            )
            h = self.blocks[key](torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]) if parts else None
            skips.append(h)
        for level in reversed(range(1, self.levels)):
            skip = skips[level - 1]
            up = self.up[str(level)](h)
            h = self.merge[str(level - 1)](torch.cat([up, skip], dim=1) if skip is not None else up)
        return resize_to(self.velocity(h), full_shape)
