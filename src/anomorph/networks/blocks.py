"""Dimension-agnostic convolutional building blocks.

Every block takes ``spatial_dims`` (2 or 3) and works on tensors shaped
``(B, C, *spatial)``. Normalisation, activation and dropout are chosen by name so a whole
network can be configured from a YAML file.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

NORM_NAMES = ("batch", "instance", "group")
ACTIVATION_NAMES = ("relu", "leakyrelu", "silu", "swish", "gelu", "elu", "prelu", "tanh")


def conv_type(spatial_dims: int, transposed: bool = False) -> type[nn.Module]:
    """``nn.Conv{n}d`` (or ``nn.ConvTranspose{n}d``) for ``spatial_dims`` in {1, 2, 3}."""
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    if transposed:
        return (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[spatial_dims - 1]
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]


def interpolation_mode(spatial_dims: int) -> str:
    """The linear ``F.interpolate`` mode for ``spatial_dims``: linear / bilinear / trilinear."""
    return ("linear", "bilinear", "trilinear")[spatial_dims - 1]


def group_count(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups`` (the GroupNorm group count)."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


def make_norm(norm: str | None, channels: int, spatial_dims: int) -> nn.Module | None:
    """Normalisation layer by name: ``"batch"``, ``"instance"`` (affine), ``"group"`` or None."""
    if norm is None or norm == "none":
        return None
    name = norm.lower()
    if name == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 1](channels)
    if name == "instance":
        return (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial_dims - 1](channels, affine=True)
    if name == "group":
        return nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORM_NAMES} or None")


def make_activation(act: str | None) -> nn.Module | None:
    """Activation layer by name (see :data:`ACTIVATION_NAMES`); leaky ReLU uses slope 0.2."""
    if act is None or act == "none":
        return None
    name = act.lower()
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leakyrelu":
        return nn.LeakyReLU(0.2, inplace=True)
    if name in ("silu", "swish"):
        return nn.SiLU(inplace=True)
    if name == "gelu":
        return nn.GELU()
    if name == "elu":
        return nn.ELU(inplace=True)
    if name == "prelu":
        return nn.PReLU()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATION_NAMES} or None")


def check_dropout(dropout: float) -> float:
    """Validate a dropout probability in [0, 1)."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


class Dropout(nn.Dropout):
    """Element-wise dropout, as ``nn.Dropout``: in training mode each entry is kept with
    probability 1 − p and scaled by 1 / (1 − p), else zeroed; in eval mode (and at p = 0) the
    identity. On CPU the keep mask is drawn as ``rand >= p`` — one vectorised uniform draw and a
    compare, the same distribution as the ``bernoulli_`` that ``nn.Dropout`` draws, which runs
    element by element on CPUs (it was the costliest non-convolution op of the 128² deformable
    AE's training step in ``benchmarks/results/speed/train_profile.json`` as of commit 13d1075,
    written by ``benchmarks/throughput.py --profile``). Other devices use ``F.dropout``. It is an
    ``nn.Dropout``, so MC dropout's seeded masks (:class:`anomorph.uncertainty.SeededDropout`)
    and checkpoints are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace:
            return F.dropout(x, self.p, True, self.inplace)
        # rand_like keeps x's memory format, so the multiply runs layout-matched
        return x * torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))


def downsample_geometry(stride: int) -> tuple[int, int]:
    """(kernel_size, padding) of a conv that divides a size divisible by ``stride`` exactly by it."""
    if stride == 1:
        return 3, 1
    if stride % 2 == 0:
        return stride + 1, stride // 2
    return stride, 0


def upsample_geometry(stride: int) -> tuple[int, int]:
    """(kernel_size, padding) of a transposed conv that multiplies a size exactly by ``stride``."""
    if stride == 1:
        return 3, 1
    padding = stride // 2
    return stride + 2 * padding, padding


class ConvNormAct(nn.Sequential):
    """Convolution -> normalisation -> dropout -> activation (MONAI's "NDA" order).

    ``transposed=True`` uses a transposed convolution that multiplies the spatial size by
    ``stride``; otherwise the spatial size is divided by ``stride`` (it must divide it).
    The convolution has a bias only when there is no normalisation.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_size: int | None = None,
        norm: str | None = "batch",
        act: str | None = "leakyrelu",
        dropout: float = 0.0,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        geometry = upsample_geometry(stride) if transposed else downsample_geometry(stride)
        if kernel_size is None:
            kernel_size, padding = geometry
        else:
            if stride != 1:
                raise ValueError("an explicit kernel_size is only supported with stride 1")
            padding = kernel_size // 2
        norm_layer = make_norm(norm, out_channels, spatial_dims)
        self.add_module(
            "conv",
            conv_type(spatial_dims, transposed)(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=norm_layer is None
            ),
        )
        if norm_layer is not None:
            self.add_module("norm", norm_layer)
        if check_dropout(dropout) > 0:
            self.add_module("dropout", Dropout(dropout))
        act_layer = make_activation(act)
        if act_layer is not None:
            self.add_module("act", act_layer)


class ResidualBlock(nn.Module):
    """``act(x + norm(conv(drop(act(norm(conv(x)))))))`` with 3^d kernels; keeps shape and channels."""

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        norm: str | None = "batch",
        act: str | None = "leakyrelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.first = ConvNormAct(spatial_dims, channels, channels, norm=norm, act=act, dropout=dropout)
        self.second = ConvNormAct(spatial_dims, channels, channels, norm=norm, act=None)
        self.act = make_activation(act) or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(self.first(x))
        if not torch.is_grad_enabled():
            # inference: add into the branch's fresh output instead of allocating a third tensor
            # (MC dropout runs this block once per pass; the same values bit for bit)
            return self.act(y.add_(x))
        return self.act(x + y)


class EncoderStage(nn.Sequential):
    """A strided ``ConvNormAct`` (divides the size by ``stride``) then ``num_res_units`` residual blocks."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int,
        num_res_units: int,
        norm: str | None,
        act: str | None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.add_module("down", ConvNormAct(spatial_dims, in_channels, out_channels, stride, norm=norm, act=act))
        for index in range(num_res_units):
            self.add_module(f"res{index}", ResidualBlock(spatial_dims, out_channels, norm, act, dropout))


class DecoderStage(nn.Sequential):
    """A transposed ``ConvNormAct`` (multiplies the size by ``stride``) then residual blocks.

    Dropout (if > 0) is applied after the normalisation of every convolution of the stage,
    so Monte-Carlo dropout can be switched on at inference with
    :func:`anomorph.networks.enable_mc_dropout`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int,
        num_res_units: int,
        norm: str | None,
        act: str | None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "up",
            ConvNormAct(
                spatial_dims, in_channels, out_channels, stride, norm=norm, act=act, dropout=dropout, transposed=True
            ),
        )
        for index in range(num_res_units):
            self.add_module(f"res{index}", ResidualBlock(spatial_dims, out_channels, norm, act, dropout))


def resize_to(features: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Linearly resample ``(B, C, *spatial)`` features to ``spatial_shape`` (no-op when equal)."""
    if tuple(features.shape[2:]) == tuple(spatial_shape):
        return features
    mode = interpolation_mode(features.ndim - 2)
    return F.interpolate(features, size=tuple(spatial_shape), mode=mode, align_corners=False)


def bottleneck_shape(image_size: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
    """Spatial shape after the encoder; raises if a size is not divisible by the total stride."""
    total = math.prod(int(s) for s in strides)
    for size in image_size:
        if size % total != 0:
            raise ValueError(f"image size {tuple(image_size)} is not divisible by the total stride {total}")
    return tuple(int(size) // total for size in image_size)


def enable_mc_dropout(module: nn.Module) -> int:
    """Put only the dropout layers of ``module`` in training mode (Monte-Carlo dropout).

    Call after ``module.eval()``: normalisation layers keep their running statistics and
    only dropout becomes stochastic. Returns the number of dropout layers switched on
    (0 means the network has no dropout and MC sampling would return identical outputs).
    """
    count = 0
    for layer in module.modules():
        if isinstance(layer, nn.modules.dropout._DropoutNd):
            layer.train()
            count += 1
    return count


def disable_mc_dropout(module: nn.Module) -> int:
    """Put the dropout layers of ``module`` back in eval mode; returns how many there are."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, nn.modules.dropout._DropoutNd):
            layer.eval()
            count += 1
    return count


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """An inference copy of ``module`` with every eval-mode BatchNorm folded into the convolution
    before it (``ConvNormAct``: conv → norm becomes one conv with bias; the norm an Identity).

    The copy computes the same function as ``module`` in eval mode (running statistics) up to
    float rounding (~1e-7), one elementwise pass per convolution cheaper; dropout layers and
    everything else are copied unchanged, in the same order, without forward hooks. ``module``
    is not modified.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module)
    for block in folded.modules():  # hooks of the original (e.g. an active MC sampler) stay there
        block._forward_hooks.clear()
        block._forward_pre_hooks.clear()
    for block in folded.modules():
        if isinstance(block, ConvNormAct) and isinstance(getattr(block, "norm", None), nn.modules.batchnorm._BatchNorm):
            conv, norm = block.conv, block.norm
            if not norm.track_running_stats or norm.running_mean is None:
                continue
            conv.eval()
            norm.eval()
            transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
            block.conv = fuse_conv_bn_eval(conv, norm, transpose=transposed)
            block.norm = nn.Identity()
    return folded.eval()


class SubPixelConvTranspose2d(nn.Module):
    """A stride-``s`` ``nn.ConvTranspose2d`` (kernel ``s + 2·(s // 2)``, padding ``s // 2``, as
    :func:`upsample_geometry` builds them) computed as one ordinary convolution to ``s²·C_out``
    channels followed by ``pixel_shuffle(s)``: the same function up to float rounding.

    Output pixel ``s·u + a`` of the transposed convolution reads input ``u + t`` through tap
    ``a + p − s·t``; the ``s²`` phases become the output channels of one convolution whose
    kernel holds, per phase, the taps of that phase (the rest zero). On CPUs oneDNN runs a
    transposed convolution with few output channels (the decoder's last layer) several times
    slower than this convolution, despite its zero taps (benchmarks/README.md).
    """

    def __init__(self, layer: nn.ConvTranspose2d) -> None:
        super().__init__()
        (s, s_w), (k, k_w), (p, p_w) = layer.stride, layer.kernel_size, layer.padding
        if (s, k, p) != (s_w, k_w, p_w) or k != s + 2 * (s // 2) or p != s // 2 or layer.groups != 1 \
                or tuple(layer.dilation) != (1, 1) or tuple(layer.output_padding) != (0, 0):
            raise ValueError(f"unsupported transposed convolution {layer}")
        taps = {a: [(t, a + p - s * t) for t in range(-k, k + 1) if 0 <= a + p - s * t < k] for a in range(s)}
        low = min(t for a in taps for t, _ in taps[a])
        high = max(t for a in taps for t, _ in taps[a])
        weight = layer.weight.detach()                      # (C_in, C_out, k, k)
        c_in, c_out = weight.shape[:2]
        size = high - low + 1
        kernel = weight.new_zeros(c_out, s, s, c_in, size, size)
        for a in range(s):
            for ty, ky in taps[a]:
                for b in range(s):
                    for tx, kx in taps[b]:
                        kernel[:, a, b, :, ty - low, tx - low] = weight[:, :, ky, kx].t()
        self.stride = s
        self.pad = (-low, high, -low, high)               # (left, right, top, bottom)
        self.weight = nn.Parameter(kernel.reshape(c_out * s * s, c_in, size, size), requires_grad=False)
        bias = None if layer.bias is None else layer.bias.detach().repeat_interleave(s * s)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad[0] == self.pad[1]:
            y = F.conv2d(x, self.weight, self.bias, padding=self.pad[0])
        else:
            y = F.conv2d(F.pad(x, self.pad), self.weight, self.bias)
        return F.pixel_shuffle(y, self.stride)


def sub_pixel_output_layers(module: nn.Module, max_out_channels: int = 4) -> nn.Module:
    """Replace, in place, every stride-2+ ``nn.ConvTranspose2d`` of ``module`` with at most
    ``max_out_channels`` output channels by its :class:`SubPixelConvTranspose2d`; returns ``module``."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.ConvTranspose2d and child.out_channels <= max_out_channels
                    and child.stride[0] > 1):
                try:
                    setattr(parent, name, SubPixelConvTranspose2d(child))
                except ValueError:
                    continue
    return module
