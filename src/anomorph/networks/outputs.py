"""The single return type of every anomorph network."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ModelOutput:
    """What a network's ``forward`` returns. Shapes are for a ``(B, C, *spatial)`` input.

    - ``reconstruction``: x̂, the auto-encoder prior, ``(B, C, *spatial)``, in [0, 1] with the
      default sigmoid output.
    - ``warped``: x̃ = x̂ ∘ φ, the prior warped onto the input, ``(B, C, *spatial)``; the same
      tensor as ``reconstruction`` for non-deformable models.
    - ``velocity``: the stationary velocity field that was integrated (after the
      ``max_displacement`` bound and the ``velocity_gate``), ``(B, spatial_dims, *spatial)``,
      in **pixels**; channel k is the component along spatial axis k (channel 0 = rows / H).
      None for non-deformable models.
    - ``displacement``: d = φ − id, the integrated dense displacement field (DDF), same shape,
      units (pixels) and channel order as ``velocity``; ``warped(p) = reconstruction(p + d(p))``.
      None for non-deformable models.
    - ``mu``, ``logvar``: VAE posterior mean and log-variance, ``(B, latent_dim)``; None otherwise.
    - ``log_variance``: heteroscedastic per-pixel log-variance of ``reconstruction`` (on the
      prior's grid, not warped), ``(B, C, *spatial)``, natural log of intensity², bounded to
      the network's ``log_variance_range``; None unless ``heteroscedastic=True``.
    - ``latent``: the code that was decoded, ``(B, latent_dim)`` (the VAE sample in training,
      ``mu`` in eval).
    """

    reconstruction: torch.Tensor
    warped: torch.Tensor
    velocity: torch.Tensor | None = None
    displacement: torch.Tensor | None = None
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    log_variance: torch.Tensor | None = None
    latent: torch.Tensor | None = None

    def float(self) -> "ModelOutput":
        """The same output with every floating-point tensor in float32 (e.g. after a bf16
        autocast forward, before losses whose sums and variances bf16 cannot hold)."""
        return ModelOutput(**{f.name: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                              for f in fields(self) for v in (getattr(self, f.name),)})
