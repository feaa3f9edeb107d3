"""A learned non-correspondence head: which pixels of x have no healthy counterpart?

The head reads the input x, the deformable AE's pseudo-healthy prior x̂ and its *unguided*
registration x̃ = x̂ ∘ φ, and predicts, per pixel, the logit of "this tissue of x cannot be
explained by a healthy anatomy plus a smooth deformation". It is the segmentation branch of
joint registration–segmentation methods (e.g. NCR-Net, which segments non-correspondent
regions while registering) reduced to a plug-in for a frozen MorphAEus: trained on healthy
slices with synthetic anomalies (see :func:`anomorph.guidance.masks.synthetic_corruption`),
it learns which x–x̂ differences the field explains (normal variability) and which it only
hides (pasted tissue that x̃ has partly registered away).

The network is MONAI's ``UNet`` (residual units, instance norm); inputs are stacked on the
channel axis: ``(B, 3·C, *spatial)`` for C-channel images, output ``(B, 1, *spatial)`` logits.
"""
from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn


class NonCorrespondenceNet(nn.Module):
    """``forward(x, prior, warped)`` → logits ``(B, 1, *spatial)`` of non-correspondence.

    Args:
        spatial_dims: 2 or 3.
        image_channels: C, the channels of each of x, x̂, x̃ (in [0, 1] model-grid intensities).
        channels: U-Net widths per level; ``len(channels) - 1`` stride-2 levels, so every
            spatial side must be divisible by ``2 ** (len(channels) - 1)``.
        num_res_units: residual units per level (MONAI ``UNet``).
    """

    def __init__(self, spatial_dims: int = 2, image_channels: int = 1,
                 channels: Sequence[int] = (16, 32, 64, 128), num_res_units: int = 1) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {tuple(channels)}")
        self.spatial_dims = int(spatial_dims)
        self.image_channels = int(image_channels)
        self.channels = tuple(int(c) for c in channels)
        self.num_res_units = int(num_res_units)
        self.unet = UNet(spatial_dims=self.spatial_dims, in_channels=3 * self.image_channels, out_channels=1,
                         channels=self.channels, strides=(2,) * (len(self.channels) - 1),
                         num_res_units=self.num_res_units, norm="INSTANCE")

    def options(self) -> dict:
        """The constructor arguments (saved next to the weights)."""
        return {"spatial_dims": self.spatial_dims, "image_channels": self.image_channels,
                "channels": list(self.channels), "num_res_units": self.num_res_units}

    def forward(self, x: torch.Tensor, prior: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([x, prior, warped], dim=1))
