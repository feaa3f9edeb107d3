"""Guided inference: the strategies of SPEC §3 and their controls behind one scorer.

Pipeline per batch: a guidance signal (u ∈ [0, 1] and the score the mask is cut from — the
healthy z-score when u is healthy-normalised) is estimated *before* registration, from x and x̂
only, never from |x − x̃| (so it cannot depend on φ) → m = dilate(ramp_mask(score)) inside the
brain → a guided deformation → anomaly map |x − x̃| inside the brain mask. The oracle-guided
variant uses the dilated ground-truth mask as m: the limit of any uncertainty estimator for
that strategy.

Strategies are classes in :data:`STRATEGIES` (name → class):

=================  ==========================================================================
``none``           plain (unguided) registration
``gating``         v' = (1 − m)·v before integration: points with m = 1 do not move
``conditioned``    the velocity head reads m (a model trained with ``guidance.strategy:
                   conditioned``)
``map``            test-time MAP from the head's v: masked similarity + λ₀‖∇v‖² + λ₁·mean(m‖d‖²)
``cost_masking``   control: the same optimisation with the masked similarity only — the
                   classical cost-function masking of registration tools, no added stiffness
``tto``            control: the same optimisation with m = 0 (test-time optimisation alone)
``iterative``      register, z-score the registered residual, gate, register again
=================  ==========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..config import GuidanceConfig, RunConfig
from .base import Prediction, Scorer
from ..networks import ModelOutput, jacobian_determinant
from .. import losses
from ..guidance.masks import dilate_mask, hysteresis_region, ramp_mask


@dataclass
class GuidanceSignal:
    """What an uncertainty source returns for a ``(B, 1, H, W)`` batch.

    uncertainty: u in [0, 1] (reported, scored by the uncertainty AUROC).
    score: what the guidance mask is cut from (same shape): the healthy z-score when u is
    healthy-normalised (``guidance.threshold`` is then in healthy standard deviations), else u.
    start: (x̂, v) of the network's plain pass on these images when the estimator ran it (e.g.
    ``warped_residual``), else None: the test-time strategies start from it instead of running
    the same pass again.
    """

    uncertainty: torch.Tensor
    score: torch.Tensor
    start: tuple[torch.Tensor, torch.Tensor] | None = None


# (network, images, brain_masks) -> GuidanceSignal
UncertaintySource = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], GuidanceSignal]
# (residual |x − x̃|, images) -> GuidanceSignal, for the iterative strategy
ResidualNormaliser = Callable[[torch.Tensor, torch.Tensor], GuidanceSignal]


class Strategy:
    """A way of registering x̂ onto x given a guidance mask m ``(B, 1, H, W)`` in [0, 1].

    ``uses_mask``: the strategy needs m from u (or the oracle) before registering.
    ``oracle_twin``: an oracle-guided row (m = dilated ground truth) is meaningful.
    """

    name: ClassVar[str] = ""
    uses_mask: ClassVar[bool] = True
    oracle_twin: ClassVar[bool] = True
    needs_conditioned_model: ClassVar[bool] = False

    def register(self, scorer: "GuidedScorer", images: torch.Tensor, brains: torch.Tensor,
                 m: torch.Tensor) -> tuple[ModelOutput, torch.Tensor, GuidanceSignal | None]:
        """(output, the m actually used, the signal estimated during registration or None)."""
        raise NotImplementedError


class Unguided(Strategy):
    name = "none"
    uses_mask = False
    oracle_twin = False

    def register(self, scorer, images, brains, m):
        return scorer.network(images), torch.zeros_like(m), None


class Gating(Strategy):
    name = "gating"

    def register(self, scorer, images, brains, m):
        return scorer.network(images, velocity_gate=1.0 - m), m, None


class Conditioned(Strategy):
    name = "conditioned"
    needs_conditioned_model = True

    def register(self, scorer, images, brains, m):
        return scorer.network(images, guidance=m), m, None


class TestTimeRegistration(Strategy):
    """Per-image Adam on v from the head's v (``map_steps`` steps, lr ``map_lr`` pixels) of

        similarity + map_lambda·‖∇v‖² + anchor·map_anchor·mean(m‖d‖²)

    where the similarity is the masked local NCC (window statistics and average over 1 − m,
    :func:`anomorph.losses.masked_local_ncc_loss`) when ``mask_similarity``, else the
    plain local NCC."""

    mask_similarity: ClassVar[bool] = True
    anchor: ClassVar[bool] = True

    def objective(self, scorer: "GuidedScorer", images: torch.Tensor, prior: torch.Tensor,
                  velocity: torch.Tensor, m: torch.Tensor, fixed: losses.FixedWindowMoments | None = None,
                  with_output: bool = True) -> tuple[torch.Tensor, ModelOutput | None]:
        """The objective at ``velocity``; ``fixed``: the window moments of (x, 1 − m), which do
        not depend on v (:class:`~anomorph.losses.FixedWindowMoments`; recomputed when None).
        ``with_output=False`` (the Adam steps): no ModelOutput, and without the anchor term
        the displacement in pixels is never formed (``warp_by_velocity``: same value, fewer ops)."""
        g, window = scorer.guidance, scorer.config.train.ncc_window
        if with_output or self.anchor:
            displacement = scorer.network.integrate(velocity)
            warped = scorer.network.warp(prior, displacement)
        else:
            warped = scorer.network.warp_by_velocity(prior, velocity)
        if self.mask_similarity:
            similarity = losses.masked_local_ncc_loss(warped, images, 1.0 - m, kernel_size=window, fixed=fixed)
        else:
            similarity = losses.local_ncc_loss(warped, images, kernel_size=window)
        objective = similarity + g.map_lambda * losses.velocity_smoothness(velocity)
        if self.anchor:
            objective = objective + g.map_anchor * (m * displacement.pow(2).sum(1, keepdim=True)).mean()
        return objective, (ModelOutput(prior, warped, velocity, displacement) if with_output else None)

    def refine(self, scorer: "GuidedScorer", images: torch.Tensor, start: ModelOutput, m: torch.Tensor,
               history: list[float] | None = None) -> ModelOutput:
        """Adam from ``start.velocity``; ``history`` (optional) receives the objective before each
        step and at the end."""
        prior = start.reconstruction.detach()
        velocity = start.velocity.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([velocity], lr=scorer.guidance.map_lr)
        # what does not depend on v is computed once (the same numbers as at every step)
        fixed = (losses.FixedWindowMoments(images, 1.0 - m, scorer.config.train.ncc_window)
                 if self.mask_similarity else None)
        with torch.enable_grad():
            for _ in range(scorer.guidance.map_steps):
                objective, _ = self.objective(scorer, images, prior, velocity, m, fixed, with_output=False)
                if history is not None:
                    history.append(float(objective.detach()))
                optimiser.zero_grad()
                objective.backward()
                optimiser.step()
        with torch.no_grad():
            objective, out = self.objective(scorer, images, prior, velocity.detach(), m, fixed)
        if history is not None:
            history.append(float(objective))
        return out

    def register(self, scorer, images, brains, m):
        return self.refine(scorer, images, scorer.plain_start(images), m), m, None


class MAP(TestTimeRegistration):
    name = "map"


class CostMasking(TestTimeRegistration):
    name = "cost_masking"
    anchor = False


class TestTimeOnly(TestTimeRegistration):
    name = "tto"
    uses_mask = False
    oracle_twin = False
    mask_similarity = False
    anchor = False

    def register(self, scorer, images, brains, m):
        m = torch.zeros_like(m)
        return self.refine(scorer, images, scorer.network(images), m), m, None


class Iterative(Strategy):
    """``rounds`` registrations in all: round 1 plain; each later round gates with
    m = max(m, ramp(z of |x − x̃| of the previous round)) inside the brain. ``rounds = 1`` is
    the unguided registration (no u). No oracle twin: with the oracle mask it is gating.

    The signal it returns (the Prediction's u) is the pixel-wise maximum of the signals of all
    rounds, u and score alike: the final m is exactly the mask cut from that score (ramp and
    dilation are monotone), so u is the uncertainty the last registration was held with."""

    name = "iterative"
    uses_mask = False
    oracle_twin = False

    def register(self, scorer, images, brains, m):
        if scorer.residual_normaliser is None:
            raise ValueError("the iterative strategy needs a residual normaliser (healthy statistics)")
        out = scorer.network(images)
        signal = None
        for _ in range(scorer.guidance.rounds - 1):
            latest = scorer.residual_normaliser((images - out.warped).abs(), images)
            m = torch.maximum(m, scorer.mask_from(latest.score, brains))
            signal = latest if signal is None else GuidanceSignal(
                torch.maximum(signal.uncertainty, latest.uncertainty), torch.maximum(signal.score, latest.score))
            out = scorer.network(images, velocity_gate=1.0 - m)
        return out, m, signal


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Unguided, Gating, Conditioned, MAP, CostMasking, TestTimeOnly, Iterative)}


def build_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown guidance strategy {name!r}; choose from {sorted(STRATEGIES)}")
    return STRATEGIES[name]()


class GuidedScorer(Scorer):
    """A trained deformable network run with an uncertainty-guided deformation.

    ``uncertainty`` gives the guidance signal (ignored when ``oracle=True``, where m is the
    ground-truth lesion mask dilated by ``guidance.dilation`` pixels). ``strategy``: a name in
    :data:`STRATEGIES`. ``residual_normaliser``: for the iterative strategy, z-scores a
    registered residual against healthy statistics (:func:`~.sources.residual_normaliser`).
    """

    deformable = True

    def __init__(self, network: torch.nn.Module, config: RunConfig, strategy: str,
                 uncertainty: UncertaintySource | None = None, oracle: bool = False,
                 guidance: GuidanceConfig | None = None, name: str | None = None,
                 residual_normaliser: ResidualNormaliser | None = None) -> None:
        if config.model.name != "morphaeus":
            raise ValueError("guided scoring needs a deformable (morphaeus) model")
        self.strategy_impl = build_strategy(strategy)
        impl = self.strategy_impl
        if impl.needs_conditioned_model and getattr(network, "guidance_channels", 0) < 1:
            raise ValueError("the 'conditioned' strategy needs a model trained with guidance.strategy: conditioned")
        if oracle and not impl.oracle_twin:
            raise ValueError(f"strategy {strategy!r} has no oracle-guided variant")
        if not oracle and uncertainty is None and impl.uses_mask:
            raise ValueError("a guided strategy needs an uncertainty source (or oracle=True)")
        self.network = network.eval()
        self.config = config
        self.guidance = guidance or config.guidance
        if self.guidance.rounds < 1:
            raise ValueError(f"guidance.rounds must be >= 1, got {self.guidance.rounds}")
        self.strategy = strategy
        self.uncertainty = uncertainty
        self.oracle = oracle
        self.residual_normaliser = residual_normaliser
        self.size = config.data.size
        self.name = name or f"{config.name}+{strategy}{'(oracle)' if oracle else ''}"
        self._start: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def plain_start(self, images: torch.Tensor) -> ModelOutput:
        """The plain pass a test-time optimisation starts from (x̂ and v are what it uses): the
        one the uncertainty estimator ran on these very images in :meth:`guidance_mask`
        (same network, eval mode, no grad: the same numbers), else ``network(images)``."""
        cached, self._start = self._start, None
        if cached is not None and cached[0] is images:
            reconstruction, velocity = cached[1]
            return ModelOutput(reconstruction, reconstruction, velocity)
        return self.network(images)

    # ------------------------------------------------------------------ masks
    def mask_from(self, score: torch.Tensor, brain_masks: torch.Tensor) -> torch.Tensor:
        """m = dilate(ramp_mask(score, threshold, softness), dilation) inside the brain; with
        ``hysteresis``, m before dilation is the max of the ramp and the hysteresis region
        (score ≥ hysteresis · threshold and connected to score ≥ threshold)."""
        g = self.guidance
        m = ramp_mask(score, g.threshold, g.softness)
        if g.hysteresis is not None:
            region = hysteresis_region(score, g.threshold, g.hysteresis * g.threshold)
            m = torch.maximum(m, region.to(m.dtype))
        return dilate_mask(m, g.dilation) * (brain_masks > 0)

    def guidance_mask(self, images: torch.Tensor, brain_masks: torch.Tensor,
                      lesion_masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(m, u): m in [0, 1] ``(B, 1, H, W)``; u is None for the oracle."""
        if self.oracle:
            if lesion_masks is None:
                raise ValueError("oracle guidance needs the ground-truth lesion masks")
            return dilate_mask((lesion_masks > 0).float(), self.guidance.dilation) * (brain_masks > 0), None
        assert self.uncertainty is not None
        with torch.no_grad():
            signal = self.uncertainty(self.network, images, brain_masks)
        self._start = None if signal.start is None else (images, signal.start)
        return self.mask_from(signal.score, brain_masks), signal.uncertainty.clamp(0, 1)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def register(self, images: torch.Tensor, brain_masks: torch.Tensor,
                 m: torch.Tensor) -> tuple[ModelOutput, torch.Tensor, GuidanceSignal | None]:
        return self.strategy_impl.register(self, images, brain_masks, m)

    def __call__(self, images: torch.Tensor, brain_masks: torch.Tensor, healthy: torch.Tensor | None = None,
                 lesion_masks: torch.Tensor | None = None) -> Prediction:
        u = None
        if self.strategy_impl.uses_mask:
            m, u = self.guidance_mask(images, brain_masks, lesion_masks)
        else:
            m = torch.zeros_like(images)
        out, m, signal = self.register(images, brain_masks, m)
        if signal is not None:
            u = signal.uncertainty.clamp(0, 1) * (brain_masks > 0)
        anomaly = (images - out.warped).abs() * brain_masks
        displacement = out.displacement.detach()
        return Prediction(anomaly, out.reconstruction.detach(), out.warped.detach(), displacement,
                          jacobian_determinant(displacement), u, m.detach())
