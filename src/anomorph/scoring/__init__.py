"""The scoring layer: from a trained run to maps, below evaluation and above the models.

- :class:`Prediction`, :class:`Scorer`: the contract every method follows (``base``);
- :class:`Preprocessor`: volume ↔ model-grid slices, one implementation (``anomorph.data.preprocess``);
- :data:`STRATEGIES`, :class:`GuidedScorer`: the guidance strategies as classes (``strategies``);
- :class:`Calibration`: the run's saved normaliser statistics and FPR thresholds (``calibration``);
- :class:`Detector` with :meth:`Detector.from_run`: a ready, guided detector (``detector``).

Nothing here imports Lightning or :mod:`anomorph.training`.
"""
from ..data.preprocess import Preprocessor, Slices, VolumeGeometry
from .base import ModelScorer, Prediction, Scorer
from .calibration import Calibration
from .detector import Detector, resolve_guidance
from .strategies import STRATEGIES, GuidanceSignal, GuidedScorer, Strategy, build_strategy

__all__ = ["Calibration", "Detector", "GuidanceSignal", "GuidedScorer", "ModelScorer", "Prediction", "Preprocessor",
           "STRATEGIES", "Scorer", "Slices", "Strategy", "VolumeGeometry", "build_strategy", "resolve_guidance"]
