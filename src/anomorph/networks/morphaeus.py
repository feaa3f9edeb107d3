"""MorphAEus-style deformable auto-encoder (Bercea, Rueckert, Schnabel, MICCAI 2023).

An AE (or VAE) gives a pseudo-healthy prior x̂; a velocity head reads (x, x̂, optional
guidance m) and/or the AE decoder's features and predicts a stationary velocity field v in
**pixels**; φ = exp(v) by scaling and squaring; the output x̃ = x̂ ∘ φ is the prior warped onto
the input. Displacements follow MONAI's ``Warp`` convention: pixels, channel k along spatial
axis k (channel 0 = rows / H in 2D), ``x̃(p) = x̂(p + d(p))``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from anomorph.networks.autoencoder import AutoEncoder, VariationalAutoEncoder
from anomorph.networks.deformation import PixelWarp, VelocityHead, VelocityIntegrator, feature_level
from anomorph.networks.outputs import ModelOutput

HEAD_INPUTS = ("pair", "features", "both")


class MorphAEus(nn.Module):
    """Deformable auto-encoder returning x̂, x̃ = x̂ ∘ exp(v), v and d = exp(v) − id.

    Prior arguments (``spatial_dims`` ... ``output_activation``) are those of
    :class:`~anomorph.networks.autoencoder.AutoEncoder`; ``variational=True`` uses a VAE prior.

    Deformation arguments:
        head_inputs: "pair" (conv net on concat(x, x̂[, m])), "features" (decoder features
            [+ m]) or "both" (default).
        head_channels: velocity U-Net widths per level (``len - 1`` stride-2 levels).
        head_downsample: the head's finest level works at ``1 / 2**head_downsample`` of the
            image size (default 1: half resolution; the velocity is resized to full resolution,
            so it cannot carry detail finer than 2 pixels). 0 = a full-resolution head: v is
            predicted at the image size itself (configs/morphaeus_128.yaml); its finest level
            has 4x the pixels of the default's.
        head_feature_levels: how many of the finest decoder feature maps the head reads; each
            is fused into the head level of the same resolution.
        head_norm, head_act: normalisation / activation inside the velocity head.
        guidance_channels: extra head input channels (e.g. 1 for an anomaly mask m in [0, 1]);
            ``forward`` uses zeros ("all normal") when no guidance is passed.
        integration_steps: scaling-and-squaring steps (0 = use v as the displacement).
        max_displacement: if set, each velocity component is bounded smoothly to
            ±max_displacement **pixels** by ``max_d * tanh(raw / max_d)``.
        detach_prior: stop the registration losses' gradients from reaching the AE
            (the head sees and warps a detached x̂ and detached features).
        warp_padding, integration_padding: grid-sample padding ("border" | "zeros" |
            "reflection") for warping the image and for composing displacements.
    """

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
        variational: bool = False,
        head_inputs: str = "both",
        head_channels: Sequence[int] = (32, 32, 64),
        head_downsample: int = 1,
        head_feature_levels: int = 2,
        head_norm: str | None = None,
        head_act: str | None = "leakyrelu",
        guidance_channels: int = 0,
        integration_steps: int = 7,
        max_displacement: float | None = None,
        detach_prior: bool = False,
        warp_padding: str = "border",
        integration_padding: str = "border",
    ) -> None:
        super().__init__()
        if head_inputs not in HEAD_INPUTS:
            raise ValueError(f"head_inputs must be one of {HEAD_INPUTS}, got {head_inputs!r}")
        if max_displacement is not None and max_displacement <= 0:
            raise ValueError(f"max_displacement must be positive pixels or None, got {max_displacement}")
        if guidance_channels < 0:
            raise ValueError(f"guidance_channels must be >= 0, got {guidance_channels}")
        prior_class = VariationalAutoEncoder if variational else AutoEncoder
        self.prior = prior_class(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            image_size=image_size,
            channels=channels,
            strides=strides,
            latent_dim=latent_dim,
            num_res_units=num_res_units,
            norm=norm,
            act=act,
            dropout=dropout,
            heteroscedastic=heteroscedastic,
            log_variance_range=log_variance_range,
            output_activation=output_activation,
        )
        self.spatial_dims = spatial_dims
        self.image_size = self.prior.image_size
        head_levels = len(tuple(head_channels))
        head_factor = 2 ** (head_levels - 1 + head_downsample)
        if any(size % head_factor for size in self.image_size):
            raise ValueError(
                f"image size {self.image_size} is not divisible by {head_factor} "
                f"(2 ** (len(head_channels) - 1 + head_downsample))"
            )
        available = self.prior.decoder_feature_channels
        if head_inputs == "pair":
            self.head_feature_levels = 0
        else:
            if not 1 <= head_feature_levels <= len(available):
                raise ValueError(f"head_feature_levels must be in [1, {len(available)}], got {head_feature_levels}")
            self.head_feature_levels = head_feature_levels
        feature_channels = available[len(available) - self.head_feature_levels :]
        feature_shapes = self.prior.decoder_feature_shapes[len(available) - self.head_feature_levels :]
        feature_levels = [
            feature_level(self.image_size, shape, head_downsample, head_levels) for shape in feature_shapes
        ]
        self.guidance_channels = guidance_channels
        self.max_displacement = max_displacement
        self.detach_prior = detach_prior
        self.velocity_head = VelocityHead(
            spatial_dims=spatial_dims,
            image_channels=in_channels,
            guidance_channels=guidance_channels,
            feature_channels=feature_channels,
            feature_levels=feature_levels,
            use_pair=head_inputs != "features",
            channels=head_channels,
            downsample=head_downsample,
            norm=head_norm,
            act=head_act,
        )
        self.integrator = VelocityIntegrator(integration_steps, padding_mode=integration_padding)
        self.warper = PixelWarp(padding_mode=warp_padding)

    def bound_velocity(self, raw_velocity: torch.Tensor) -> torch.Tensor:
        """Apply the smooth ±``max_displacement`` pixel bound (identity when it is None)."""
        if self.max_displacement is None:
            return raw_velocity
        return self.max_displacement * torch.tanh(raw_velocity / self.max_displacement)

    def predict_velocity(
        self,
        x: torch.Tensor,
        prior: torch.Tensor,
        decoder_features: Sequence[torch.Tensor] = (),
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bounded, ungated velocity ``(B, spatial_dims, *spatial)`` in pixels.

        ``decoder_features`` are the prior's decoder feature maps, coarse to fine (all of
        them, as returned by ``AutoEncoder.decode``); the head reads the finest
        ``head_feature_levels``. ``guidance``: ``(B, guidance_channels, *spatial)`` or None
        (zeros).
        """
        if guidance is not None and self.guidance_channels == 0:
            raise ValueError("guidance was given but the model was built with guidance_channels=0")
        if self.guidance_channels and guidance is None:
            guidance = x.new_zeros((x.shape[0], self.guidance_channels, *x.shape[2:]))
        if guidance is not None and tuple(guidance.shape) != (x.shape[0], self.guidance_channels, *x.shape[2:]):
            raise ValueError(
                f"guidance must be (B, {self.guidance_channels}, *spatial) like the input, got {tuple(guidance.shape)}"
            )
        if len(decoder_features) < self.head_feature_levels:
            raise ValueError(f"need at least {self.head_feature_levels} decoder feature maps, got {len(decoder_features)}")
        features = list(decoder_features)[len(decoder_features) - self.head_feature_levels :]
        if self.detach_prior:
            prior = prior.detach()
            features = [f.detach() for f in features]
        return self.bound_velocity(self.velocity_head(x, prior, guidance, features))

    def integrate(self, velocity: torch.Tensor) -> torch.Tensor:
        """DDF d = exp(v) − id ``(B, spatial_dims, *spatial)`` in pixels from a velocity in pixels."""
        return self.integrator(velocity)

    def warp(self, image: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        """``image(p + d(p))`` for image ``(B, C, *spatial)`` and a DDF in pixels."""
        return self.warper(image, displacement)

    def warp_by_velocity(self, image: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """``warp(image, integrate(velocity))`` (velocity in pixels) up to float rounding, without
        the displacement in pixels: integrated and applied in ``grid_sample``'s frame where the
        integrator and the warper share it (fewer ops per call; test-time optimisation)."""
        matching = tuple(velocity.shape) == (image.shape[0], image.ndim - 2, *image.shape[2:])
        field = self.integrator.normalised_field(velocity) if matching else None
        if field is None or not self.warper.native_path(velocity):  # MONAI's path, checks and messages
            return self.warp(image, self.integrate(velocity))
        return self.warper.warp_normalised(image, field)

    def warp_inverse(self, image: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """``image ∘ φ⁻¹`` with φ⁻¹ = exp(−v): pulls the input back onto the prior's grid.

        For bidirectional registration losses: if x̃ = x̂ ∘ exp(v) ≈ x then
        ``warp_inverse(x, v)`` ≈ x̂. ``velocity`` in pixels, as in :class:`ModelOutput`.
        """
        return self.warp(image, self.integrate(-velocity))

    def deform(
        self, image: torch.Tensor, velocity: torch.Tensor, velocity_gate: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate, integrate and warp: returns (warped image, gated velocity, displacement), pixels.

        ``velocity_gate`` (broadcastable to ``(B, 1, *spatial)``, e.g. 1 − m with m in [0, 1],
        or a scalar) multiplies v before integration; None means no gating.
        """
        if velocity_gate is not None:
            velocity = velocity * velocity_gate
        displacement = self.integrate(velocity)
        return self.warp(image, displacement), velocity, displacement

    def forward(
        self,
        x: torch.Tensor,
        guidance: torch.Tensor | None = None,
        velocity_gate: torch.Tensor | None = None,
    ) -> ModelOutput:
        """x ``(B, C, *spatial)`` in [0, 1]; guidance ``(B, guidance_channels, *spatial)`` or None;
        velocity_gate broadcastable to ``(B, 1, *spatial)`` or None. ``velocity`` in the output is
        the gated field that was integrated; ``displacement`` its exponential, both in pixels."""
        self.prior.check_input(x)
        z, mu, logvar = self.prior.encode(x)
        decoded = self.prior.decode(z)
        velocity = self.predict_velocity(x, decoded.image, decoded.features, guidance)
        prior = decoded.image.detach() if self.detach_prior else decoded.image
        warped, velocity, displacement = self.deform(prior, velocity, velocity_gate)
        return ModelOutput(
            reconstruction=decoded.image,
            warped=warped,
            velocity=velocity,
            displacement=displacement,
            mu=mu,
            logvar=logvar,
            log_variance=decoded.log_variance,
            latent=z,
        )
