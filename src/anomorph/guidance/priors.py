"""Local anchor of the spatially weighted prior (SPEC §3). The weighted smoothness term
λ(x)·‖∇v‖² is ``anomorph.losses.velocity_smoothness(v, weight=λ)``."""
from __future__ import annotations

import torch

from ..networks import jacobian_determinant


def log_jacobian_anchor(displacement: torch.Tensor, weight: torch.Tensor, gamma: float = 0.1,
                        eps: float = 1e-3) -> torch.Tensor:
    """Local anchor mean(w(x)·(‖d(x)‖² + γ·(log det Jφ(x))²)) on the integrated displacement
    d ``(B, 2, H, W)`` in pixels; det J is clamped at ``eps`` before the log."""
    squared = (displacement ** 2).sum(1, keepdim=True)
    log_det = torch.log(jacobian_determinant(displacement).clamp_min(eps))
    return (weight * (squared + gamma * log_det ** 2)).mean()
