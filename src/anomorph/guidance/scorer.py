"""Guided inference: the four strategies of SPEC §3 behind one scorer.

Pipeline per batch: u ∈ [0, 1] is estimated *before* registration (from x and x̂ only, never
from |x − x̃|, so it cannot depend on φ) → m = dilate(soft_mask(u)) → a guided deformation →
anomaly map |x − x̃| inside the brain mask. The oracle-guided variant uses the dilated
ground-truth mask as m: the limit of any uncertainty estimator for that strategy.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import GuidanceConfig, RunConfig
from ..evaluation.inference import Prediction, Scorer
from ..networks import ModelOutput, jacobian_determinant
from ..training import losses
from .masks import dilate_mask, soft_mask

# (network, images, brain_masks) -> u in [0, 1], (B, 1, H, W)
UncertaintySource = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class GuidedScorer(Scorer):
    """A trained deformable network run with an uncertainty-guided deformation.

    ``uncertainty`` gives u (ignored when ``oracle=True``, where m is the ground-truth lesion
    mask dilated by ``guidance.dilation`` pixels). Strategies: "none", "gating",
    "conditioned", "map", "iterative" (see :class:`anomorph.config.GuidanceConfig`).
    """

    deformable = True

    def __init__(self, network: torch.nn.Module, config: RunConfig, strategy: str,
                 uncertainty: UncertaintySource | None = None, oracle: bool = False,
                 guidance: GuidanceConfig | None = None, name: str | None = None,
                 residual_normaliser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        if config.model.name != "morphaeus":
            raise ValueError("guided scoring needs a deformable (morphaeus) model")
        if strategy == "conditioned" and getattr(network, "guidance_channels", 0) < 1:
            raise ValueError("the 'conditioned' strategy needs a model trained with guidance.strategy: conditioned")
        if not oracle and uncertainty is None and strategy not in ("none", "iterative"):
            raise ValueError("a guided strategy needs an uncertainty source (or oracle=True)")
        self.network = network.eval()
        self.config = config
        self.guidance = guidance or config.guidance
        self.strategy = strategy
        self.uncertainty = uncertainty
        self.oracle = oracle
        self.residual_normaliser = residual_normaliser
        self.size = config.data.size
        self.name = name or f"{config.name}+{strategy}{'(oracle)' if oracle else ''}"

    # ------------------------------------------------------------------ masks
    def guidance_mask(self, images: torch.Tensor, brain_masks: torch.Tensor,
                      lesion_masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(m, u): m in [0, 1] ``(B, 1, H, W)``; u is None for the oracle."""
        g = self.guidance
        if self.oracle:
            if lesion_masks is None:
                raise ValueError("oracle guidance needs the ground-truth lesion masks")
            return dilate_mask(lesion_masks.float(), g.dilation) * brain_masks, None
        assert self.uncertainty is not None
        with torch.no_grad():
            u = self.uncertainty(self.network, images, brain_masks).clamp(0, 1)
        return dilate_mask(soft_mask(u, g.threshold, g.softness), g.dilation) * brain_masks, u

    # ------------------------------------------------------------------ strategies
    @torch.no_grad()
    def register(self, images: torch.Tensor, m: torch.Tensor) -> ModelOutput:
        net = self.network
        if self.strategy == "none":
            return net(images)
        if self.strategy == "gating":
            return net(images, velocity_gate=1.0 - m)
        if self.strategy == "conditioned":
            return net(images, guidance=m)
        if self.strategy == "map":
            return self.map_refine(images, net(images), m)
        if self.strategy == "iterative" and self.oracle:
            return net(images, velocity_gate=1.0 - m)
        if self.strategy == "iterative":
            out = net(images)  # round 1: plain registration
            for _ in range(max(self.guidance.rounds - 1, 1)):
                m = torch.maximum(m, self.residual_mask(images, out))
                out = net(images, velocity_gate=1.0 - m)
            return out
        raise ValueError(f"unknown guidance strategy {self.strategy!r}")

    def residual_mask(self, images: torch.Tensor, out: ModelOutput) -> torch.Tensor:
        """Iterative strategy: m from the residual of the previous registration, z-scored by
        ``residual_normaliser`` (the unguided residual's statistics on healthy val slices). It
        depends on φ, so it runs only at inference, under no_grad, never in training."""
        g = self.guidance
        residual = (images - out.warped).abs()
        u = self.residual_normaliser(residual, images) if self.residual_normaliser is not None else residual
        return dilate_mask(soft_mask(u.clamp(0, 1), g.threshold, g.softness), g.dilation)

    def map_objective(self, images: torch.Tensor, prior: torch.Tensor, velocity: torch.Tensor,
                      m: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
        """Σ(1 − m)·NCC-loss(x, x̂∘φ) + λ₀‖∇v‖² + λ₁·mean(m‖d‖²), per batch (images independent)."""
        g, t = self.guidance, self.config.train
        displacement = self.network.integrate(velocity)
        warped = self.network.warp(prior, displacement)
        similarity = losses.local_ncc_loss(warped, images, kernel_size=t.ncc_window, weight=1.0 - m)
        objective = (similarity + g.map_lambda * losses.velocity_smoothness(velocity)
                     + g.map_anchor * (m * displacement.pow(2).sum(1, keepdim=True)).mean())
        return objective, ModelOutput(prior, warped, velocity, displacement)

    def map_refine(self, images: torch.Tensor, start: ModelOutput, m: torch.Tensor,
                   history: list[float] | None = None) -> ModelOutput:
        """Test-time MAP: Adam on v (pixels) from the head's v for ``map_steps`` steps, batched.
        ``history`` (optional) receives the objective before each step and at the end."""
        prior = start.reconstruction.detach()
        velocity = start.velocity.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([velocity], lr=self.guidance.map_lr)
        with torch.enable_grad():
            for _ in range(self.guidance.map_steps):
                objective, _ = self.map_objective(images, prior, velocity, m)
                if history is not None:
                    history.append(float(objective.detach()))
                optimiser.zero_grad()
                objective.backward()
                optimiser.step()
        with torch.no_grad():
            objective, out = self.map_objective(images, prior, velocity.detach(), m)
        if history is not None:
            history.append(float(objective))
        return out

    def __call__(self, images: torch.Tensor, brain_masks: torch.Tensor, healthy: torch.Tensor | None = None,
                 lesion_masks: torch.Tensor | None = None) -> Prediction:
        if self.strategy == "none" or (self.strategy == "iterative" and not self.oracle):
            m, u = torch.zeros_like(images), None  # iterative: u comes from round 1's registration
        else:
            m, u = self.guidance_mask(images, brain_masks, lesion_masks)
        out = self.register(images, m)
        anomaly = (images - out.warped).abs() * brain_masks
        return Prediction(anomaly, out.reconstruction.detach(), out.warped.detach(), out.displacement.detach(),
                          jacobian_determinant(out.displacement.detach()), u)
