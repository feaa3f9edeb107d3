"""Scorers used by ``evaluate`` next to trained detectors: intensity thresholding and the oracle.

The scoring contract (:class:`Prediction`, :class:`Scorer`) and the trained-model scorers live in
:mod:`anomorph.scoring`; they are re-exported here for compatibility.
"""
from __future__ import annotations

import torch

from ..data.slices import SliceDataset
from ..scoring.base import ModelScorer, Prediction, Scorer

__all__ = ["ModelScorer", "OracleScorer", "Prediction", "Scorer", "ThresholdScorer"]


class ThresholdScorer(Scorer):
    """Intensity thresholding, no training (SPEC §3, after Meissen et al.).

    mode "deviation": map = |x − μ| with μ the mean brain intensity of healthy train slices
    (catches dark and bright lesions); mode "intensity": map = x (bright lesions only).
    """

    deformable = False

    def __init__(self, mode: str = "deviation", reference: float = 0.5, size: int = 128) -> None:
        if mode not in ("deviation", "intensity"):
            raise ValueError(f"threshold mode must be 'deviation' or 'intensity', got {mode!r}")
        self.mode = mode
        self.reference = float(reference)
        self.size = size
        self.name = "threshold" if mode == "deviation" else "threshold-intensity"

    @classmethod
    def fit(cls, train: SliceDataset, mode: str = "deviation") -> "ThresholdScorer":
        """μ = mean normalised intensity over the brain pixels of the (healthy) train slices."""
        brain = train.brain_masks > 0
        return cls(mode, float(train.images[brain].mean()), train.config.size)

    def __call__(self, images: torch.Tensor, brain_masks: torch.Tensor,
                 healthy: torch.Tensor | None = None) -> Prediction:
        reference = torch.full_like(images, self.reference)
        score = (images - reference).abs() if self.mode == "deviation" else images
        return Prediction(score.clamp(0, 1) * brain_masks, reference, reference)


class OracleScorer(Scorer):
    """The limit of any reconstruction method: map = |x − healthy| (needs ``healthy``)."""

    name = "oracle"

    def __init__(self, size: int = 128) -> None:
        self.size = size

    def __call__(self, images: torch.Tensor, brain_masks: torch.Tensor,
                 healthy: torch.Tensor | None = None) -> Prediction:
        if healthy is None:
            raise ValueError("the oracle needs the healthy counterpart of every slice")
        return Prediction((images - healthy).abs() * brain_masks, healthy, healthy)
