"""Convolutional auto-encoder (AE) and variational auto-encoder (VAE) with a dense bottleneck.

Both map ``(B, C, *spatial)`` images with intensities in [0, 1] to a reconstruction x̂ of the
same shape. The decoder keeps its multi-scale feature maps (coarse to fine) so a deformation
head can read them (:class:`anomorph.networks.morphaeus.MorphAEus`). The decoder's last layer
is one transposed convolution straight to the output channels, so no wide convolution runs at
full resolution (those dominate the training time on CPUs).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from anomorph.networks.blocks import (
    DecoderStage,
    EncoderStage,
    bottleneck_shape,
    check_dropout,
    conv_type,
    make_activation,
    upsample_geometry,
)
from anomorph.networks.outputs import ModelOutput

OUTPUT_ACTIVATIONS = ("sigmoid", None)


def as_spatial_size(image_size: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """``image_size`` as a tuple of ``spatial_dims`` ints (an int means a square / cube)."""
    if isinstance(image_size, int):
        return (image_size,) * spatial_dims
    size = tuple(int(s) for s in image_size)
    if len(size) != spatial_dims:
        raise ValueError(f"image_size {size} does not have spatial_dims={spatial_dims} entries")
    return size


class Encoder(nn.Module):
    """Strided conv stages: ``(B, in_channels, *spatial)`` -> ``(B, channels[-1], *spatial / prod(strides))``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        strides: Sequence[int],
        num_res_units: int = 1,
        norm: str | None = "batch",
        act: str | None = "leakyrelu",
    ) -> None:
        super().__init__()
        widths = (in_channels, *channels)
        self.stages = nn.Sequential(
            *(
                EncoderStage(spatial_dims, widths[i], widths[i + 1], strides[i], num_res_units, norm, act)
                for i in range(len(channels))
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


class Decoder(nn.Module):
    """Transposed-conv stages mirroring :class:`Encoder`; the last one is the output layer.

    From the coarsest level, stage ``i`` maps ``channels[L-1-i]`` to ``channels[L-2-i]``
    features and multiplies the size by the matching stride; the last stage is a single
    transposed convolution from ``channels[0]`` straight to ``out_channels`` at full
    resolution (no full-resolution wide convolutions: they dominate the cost on CPUs).
    ``forward`` returns the raw output ``(B, out_channels, *spatial)`` (no output activation)
    and the feature maps ``[bottleneck, stage 1, ..., stage L-1]``, coarse to fine (the
    finest is at ``1 / strides[0]`` of the full resolution); their widths are
    :attr:`feature_channels`.
    """

    def __init__(
        self,
        spatial_dims: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[int],
        num_res_units: int = 1,
        norm: str | None = "batch",
        act: str | None = "leakyrelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        levels = len(channels)
        self.stages = nn.ModuleList(
            DecoderStage(
                spatial_dims, channels[level], channels[level - 1], strides[level], num_res_units, norm, act, dropout
            )
            for level in reversed(range(1, levels))
        )
        self.feature_channels: tuple[int, ...] = tuple(reversed(channels))
        kernel_size, padding = upsample_geometry(strides[0])
        self.output = conv_type(spatial_dims, transposed=True)(
            channels[0], out_channels, kernel_size, stride=strides[0], padding=padding
        )

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = [h]
        for stage in self.stages:
            h = stage(h)
            features.append(h)
        return self.output(h), features

    def forward_repeated(self, h: torch.Tensor, times: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``forward(repeat_passes(h, times))``, with every layer before the first dropout layer
        run once on the ``B`` inputs (their outputs are the same for every repetition); the
        batch is pass-major (entry ``n·B + b`` = repetition ``n`` of input ``b``)."""
        return self.forward_suffix(self.forward_prefix(h), times)

    def forward_prefix(self, h: torch.Tensor) -> "DecoderPrefix":
        """Run the layers before the first dropout layer once on the ``B`` inputs; the result
        feeds :meth:`forward_suffix` any number of times (e.g. once per chunk of MC passes)."""
        features = [h]
        for index, stage in enumerate(self.stages):
            if has_dropout(stage):
                before, rest = split_at_first_dropout(stage, h)
                return DecoderPrefix(before, rest, index, features)
            h = stage(h)
            features.append(h)
        return DecoderPrefix(h, None, len(self.stages), features)

    def forward_suffix(self, prefix: "DecoderPrefix", times: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The rest of ``forward`` on ``times`` pass-major repetitions of ``prefix``."""
        h = repeat_passes(prefix.hidden, times)
        features = [repeat_passes(f, times) for f in prefix.features]
        if prefix.rest is not None:
            h = prefix.rest(h)
            features.append(h)
            for stage in list(self.stages)[prefix.stage + 1:]:
                h = stage(h)
                features.append(h)
        return self.output(h), features


class DecoderPrefix(NamedTuple):
    """What :meth:`Decoder.forward_prefix` ran: ``hidden`` (the input of the first dropout layer,
    or of the output layer when there is none), ``rest`` (the remaining layers of that stage, or
    None), ``stage`` (its index) and the feature maps of the stages before it."""

    hidden: torch.Tensor
    rest: "Callable[[torch.Tensor], torch.Tensor] | None"
    stage: int
    features: list[torch.Tensor]


def repeat_passes(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """Pass-major repetition ``(B, ...)`` -> ``(times·B, ...)``: entry ``n·B + b`` = ``tensor[b]``;
    always a new tensor (also for ``times = 1``: MC dropout may scale it in place), with the
    layout of ``tensor`` (``Tensor.repeat`` would return a contiguous one)."""
    return torch.cat([tensor] * times)


def has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules())


def split_at_first_dropout(module: nn.Module, x: torch.Tensor
                           ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Run the layers of ``module`` before its first dropout layer on ``x``: returns (their
    output, ``rest``) with ``rest(y)`` = the remaining layers of ``module`` applied to ``y``, so
    ``rest(split(x)[0]) == module(x)`` and ``rest`` can take a repeated batch.

    Walks nested ``nn.Sequential`` containers in order: a child without dropout runs on ``x``;
    the child holding the first dropout layer is entered (if it is a Sequential), otherwise it
    and everything after it form ``rest``. Exact up to float rounding of batch-size-dependent
    kernels: eval-mode layers treat images independently.
    """
    if isinstance(module, nn.Sequential):
        children = list(module)
        for index, child in enumerate(children):
            if has_dropout(child):
                before, inner = split_at_first_dropout(child, x)
                tail = children[index + 1:]

                def rest(y: torch.Tensor, inner=inner, tail=tail) -> torch.Tensor:
                    y = inner(y)
                    for layer in tail:
                        y = layer(y)
                    return y

                return before, rest
            x = child(x)
    return x, module


def run_then_repeat(module: nn.Module, x: torch.Tensor, times: int) -> torch.Tensor:
    """``module(repeat_passes(x, times))`` with the layers before the first dropout layer run once
    (:func:`split_at_first_dropout`)."""
    if not has_dropout(module):
        return repeat_passes(module(x), times)
    before, rest = split_at_first_dropout(module, x)
    return rest(repeat_passes(before, times))


class Decoded(NamedTuple):
    """Decoder result: image ``(B, C, *spatial)``, log-variance (or None), features coarse to fine."""

    image: torch.Tensor
    log_variance: torch.Tensor | None
    features: list[torch.Tensor]


class AutoEncoder(nn.Module):
    """Convolutional AE with a dense bottleneck.

    Args:
        spatial_dims: 2 for slices, 3 for volumes.
        in_channels: image channels C (the reconstruction has the same count).
        image_size: input spatial size (int = square/cube); each size must be divisible by
            ``prod(strides)``. The dense bottleneck is sized from it.
        channels: encoder widths per level (decoder mirrors them), multiples of 8 run fastest.
        strides: downsampling factor of each level (same length as ``channels``).
        latent_dim: size of the dense code.
        num_res_units: residual blocks after each (de)convolution, per level.
        norm: "batch" | "instance" | "group" | None.
        act: activation name (see :mod:`anomorph.networks.blocks`).
        dropout: dropout probability in the decoder stages only (for MC dropout).
        heteroscedastic: add C output channels with a per-pixel log-variance.
        log_variance_range: (low, high) bounds of the log-variance (natural log of
            intensity²), enforced smoothly as ``low + (high - low) * sigmoid(raw)``.
        output_activation: "sigmoid" (x̂ in [0, 1]) or None (unbounded).

    ``forward(x)`` takes ``(B, C, *image_size)`` and returns a :class:`ModelOutput` with
    ``warped`` equal to ``reconstruction``.
    """

    variational = False

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        image_size: int | Sequence[int] = 128,
        channels: Sequence[int] = (32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        latent_dim: int = 256,
        num_res_units: int = 1,
        norm: str | None = "batch",
        act: str | None = "leakyrelu",
        dropout: float = 0.0,
        heteroscedastic: bool = False,
        log_variance_range: Sequence[float] = (-9.0, 2.0),
        output_activation: str | None = "sigmoid",
    ) -> None:
        super().__init__()
        channels, strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels {channels} and strides {strides} must be non-empty and equally long")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}")
        low, high = (float(v) for v in log_variance_range)
        if not low < high:
            raise ValueError(f"log_variance_range must be (low, high) with low < high, got {log_variance_range}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.image_size = as_spatial_size(image_size, spatial_dims)
        self.latent_dim = latent_dim
        self.heteroscedastic = heteroscedastic
        self.log_variance_range = (low, high)
        self.output_activation = output_activation
        self.dropout = check_dropout(dropout)
        self.strides = strides

        self.bottleneck_shape = (channels[-1], *bottleneck_shape(self.image_size, strides))
        flat = math.prod(self.bottleneck_shape)
        self.encoder = Encoder(spatial_dims, in_channels, channels, strides, num_res_units, norm, act)
        self.to_latent = nn.Linear(flat, latent_dim * (2 if self.variational else 1))
        self.from_latent = nn.Linear(latent_dim, flat)
        self.latent_act = make_activation(act) or nn.Identity()
        out_channels = in_channels * (2 if heteroscedastic else 1)
        self.decoder = Decoder(spatial_dims, out_channels, channels, strides, num_res_units, norm, act, dropout)

    @property
    def decoder_feature_channels(self) -> tuple[int, ...]:
        """Widths of the decoder feature maps returned by :meth:`decode`, coarse to fine."""
        return self.decoder.feature_channels

    @property
    def decoder_feature_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Spatial shapes of the decoder feature maps returned by :meth:`decode`, coarse to fine."""
        shapes = [tuple(self.bottleneck_shape[1:])]
        for stride in reversed(self.strides[1:]):
            shapes.append(tuple(size * stride for size in shapes[-1]))
        return tuple(shapes)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(B, C, *spatial)`` -> (code z, mu, logvar), each ``(B, latent_dim)``; AE: mu = logvar = None."""
        return self.to_latent(self.encoder(x).flatten(1)), None, None

    def decode(self, z: torch.Tensor) -> Decoded:
        """``(B, latent_dim)`` code -> :class:`Decoded` image, log-variance and feature maps."""
        h = self.latent_act(self.from_latent(z).view(z.shape[0], *self.bottleneck_shape))
        return self._decoded(*self.decoder(h))

    def decode_repeated(self, z: torch.Tensor, times: int) -> Decoded:
        """``decode(repeat_passes(z, times))`` (pass-major ``times·B`` batch) for Monte-Carlo
        passes: the layers before the decoder's first dropout layer run once on the ``B`` codes
        (in eval mode they give the same result for every pass). Must only be used in eval mode
        with the dropout layers being the only source of randomness (as MC dropout runs)."""
        return self.decode_suffix(self.decode_prefix(z), times)

    def decode_prefix(self, z: torch.Tensor) -> DecoderPrefix:
        """The part of :meth:`decode_repeated` that runs once on the ``B`` codes (up to the
        decoder's first dropout layer); pass it to :meth:`decode_suffix` once per chunk of passes."""
        h = self.latent_act(self.from_latent(z).view(z.shape[0], *self.bottleneck_shape))
        return self.decoder.forward_prefix(h)

    def decode_suffix(self, prefix: DecoderPrefix, times: int) -> Decoded:
        """:meth:`decode_repeated` from a :meth:`decode_prefix` result: ``times`` repetitions."""
        return self._decoded(*self.decoder.forward_suffix(prefix, times))

    def _decoded(self, raw: torch.Tensor, features: list[torch.Tensor]) -> Decoded:
        mean_raw = raw[:, : self.in_channels]
        image = torch.sigmoid(mean_raw) if self.output_activation == "sigmoid" else mean_raw
        log_variance = None
        if self.heteroscedastic:
            low, high = self.log_variance_range
            log_variance = low + (high - low) * torch.sigmoid(raw[:, self.in_channels :])
        return Decoded(image, log_variance, features)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the expected shape if ``x`` does not fit the network."""
        expected = (self.in_channels, *self.image_size)
        if x.ndim != self.spatial_dims + 2 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> ModelOutput:
        self.check_input(x)
        z, mu, logvar = self.encode(x)
        decoded = self.decode(z)
        return ModelOutput(
            reconstruction=decoded.image,
            warped=decoded.image,
            mu=mu,
            logvar=logvar,
            log_variance=decoded.log_variance,
            latent=z,
        )


class VariationalAutoEncoder(AutoEncoder):
    """VAE: same constructor as :class:`AutoEncoder`; the encoder outputs mu and logvar.

    In training mode the decoded code is ``mu + exp(logvar / 2) * eps`` (reparameterisation,
    eps ~ N(0, I)); in eval mode it is ``mu``. ``logvar`` is clamped to [-20, 10].
    """

    variational = True
    logvar_clamp = (-20.0, 10.0)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_latent(self.encoder(x).flatten(1)).chunk(2, dim=1)
        logvar = logvar.clamp(*self.logvar_clamp)
        if self.training:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        else:
            z = mu
        return z, mu, logvar
