"""The scoring contract shared by ``evaluate``, ``predict`` and the benchmark.

A *scorer* maps a batch of model-grid slices ``(B, 1, H, W)`` in [0, 1] (with their brain
masks) to a :class:`Prediction`. Anomaly maps are in [0, 1] (absolute intensity residuals of
[0, 1] images) and zero outside the brain mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig


@dataclass
class Prediction:
    """What a scorer returns for a ``(B, 1, H, W)`` batch; every map has that shape.

    anomaly_map: per-pixel anomaly score in [0, 1], 0 outside the brain mask.
    reconstruction: pseudo-healthy x̂ in [0, 1]. warped: x̃ = x̂ ∘ φ (== reconstruction for
    non-deformable methods). displacement: d = φ − id in **pixels**, ``(B, 2, H, W)``, channel 0
    along rows (H), or None. jacobian: det ∇φ ``(B, 1, H, W)`` or None. uncertainty: u in
    [0, 1] or None. guidance_mask: the mask m in [0, 1] a guided scorer held the deformation
    with (1 = stiff), or None.
    """

    anomaly_map: torch.Tensor
    reconstruction: torch.Tensor
    warped: torch.Tensor
    displacement: torch.Tensor | None = None
    jacobian: torch.Tensor | None = None
    uncertainty: torch.Tensor | None = None
    guidance_mask: torch.Tensor | None = None


class Scorer:
    """Base class: ``name``, ``deformable``, ``size`` (model grid side, pixels) and
    ``__call__(images, brain_masks, healthy=None) -> Prediction``; ``healthy`` is only read by
    the oracle."""

    name = "scorer"
    deformable = False
    size: int = 128

    def __call__(self, images: torch.Tensor, brain_masks: torch.Tensor,
                 healthy: torch.Tensor | None = None) -> Prediction:
        raise NotImplementedError


class ModelScorer(Scorer):
    """A trained network: anomaly map = |x − x̃| inside the brain mask (SPEC §3).

    ``estimator``: an uncertainty estimator (or a fitted ``HealthyNormaliser``) from
    :mod:`anomorph.uncertainty`; when given, ``Prediction.uncertainty`` is its u map.
    """

    def __init__(self, network: torch.nn.Module, config: RunConfig, name: str | None = None,
                 device: str | torch.device = "cpu", estimator=None) -> None:
        self.network = network.to(device).eval()
        self.config = config
        self.name = name or config.name
        self.deformable = config.model.name == "morphaeus"
        self.size = config.data.size
        self.device = torch.device(device)
        self.estimator = estimator

    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "best", device: str = "cpu",
                 estimator=None) -> "ModelScorer":
        """Load a run directory; for an ensemble directory (``anomorph fit --ensemble K``) the
        scored model is member 0 (the other members are used by the ``ensemble`` estimator)."""
        from ..runs import load_run, resolve_run_dir

        network, config = load_run(resolve_run_dir(run_dir), which)
        return cls(network, config, device=device, estimator=estimator)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, brain_masks: torch.Tensor,
                 healthy: torch.Tensor | None = None) -> Prediction:
        from ..networks import jacobian_determinant

        x = images.to(self.device)
        out = self.network(x)
        brain = brain_masks.to(self.device)
        anomaly = (x - out.warped).abs() * brain
        jacobian = jacobian_determinant(out.displacement) if out.displacement is not None else None
        uncertainty = None
        if self.estimator is not None:
            uncertainty = self.estimator(self.network, x, brain).uncertainty.cpu()
        return Prediction(anomaly.cpu(), out.reconstruction.cpu(), out.warped.cpu(),
                          None if out.displacement is None else out.displacement.cpu(),
                          None if jacobian is None else jacobian.cpu(), uncertainty)
