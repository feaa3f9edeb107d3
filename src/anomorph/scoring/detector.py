"""``Detector.from_run``: a trained run, assembled once, ready to score (guided or not).

The one assembly of the project: load the network (:mod:`anomorph.runs`, no Lightning), pick
the guidance setting, build the uncertainty estimator and its healthy normaliser (saved by
``anomorph calibrate``, or fitted on given healthy slices), build the strategy's scorer
(:data:`~.strategies.STRATEGIES`) and the run's :class:`~anomorph.data.preprocess.Preprocessor`.
``evaluate``, ``predict``, ``calibrate`` and the benchmark all score through it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import GuidanceConfig, RunConfig, check_guidance
from ..data.preprocess import Preprocessor
from ..errors import ConfigError
from ..runs import checkpoint_path, file_sha256, load_run, resolve_run_dir
from ..uncertainty import canonical_estimator_name, estimator_parts
from .base import ModelScorer, Prediction, Scorer
from .calibration import Calibration
from .sources import build_estimator_for_run, fit_residual_statistics, residual_normaliser_from, signal_function
from .strategies import STRATEGIES, GuidedScorer

GuidanceArg = str | Mapping[str, Any] | GuidanceConfig | None


def resolve_guidance(config: RunConfig, guidance: GuidanceArg, calibration: Calibration | None = None
                     ) -> GuidanceConfig:
    """The guidance setting to score with.

    None: the run's calibrated setting (``calibration.json``'s ``guidance``), else the run's
    config. A strategy name: that setting with ``strategy`` replaced. A mapping: GuidanceConfig
    fields overriding it. A :class:`GuidanceConfig`: used as it is.
    """
    if isinstance(guidance, GuidanceConfig):
        base, overrides = guidance, {}
    else:
        base = config.guidance
        if calibration is not None and calibration.info.get("guidance"):
            known = {f.name for f in dataclasses.fields(GuidanceConfig)}
            base = dataclasses.replace(base, **{k: v for k, v in calibration.info["guidance"].items() if k in known})
        overrides = {"strategy": guidance} if isinstance(guidance, str) else dict(guidance or {})
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(GuidanceConfig)})
    if unknown:
        raise ConfigError(f"unknown guidance key(s) {unknown}")
    resolved = dataclasses.replace(base, **overrides)
    if resolved.strategy not in STRATEGIES:
        raise ConfigError(f"guidance strategy {resolved.strategy!r} is not one of {sorted(STRATEGIES)}")
    return check_guidance(resolved)


class Detector(Scorer):
    """A scorer plus everything needed to use it on new volumes.

    Attributes: ``network``, ``config`` (the run's), ``guidance`` (the setting scored with),
    ``scorer`` (a :class:`~.base.ModelScorer` for ``none``, else a
    :class:`~.strategies.GuidedScorer`), ``preprocessor``, ``calibration`` (or None),
    ``estimator`` (the u model: a fitted normaliser or raw estimator, or None),
    ``model_version`` (first 12 hex of the checkpoint's SHA-256, when loaded from a run).
    ``__call__`` has the :class:`~.base.Scorer` signature.
    """

    def __init__(self, network: torch.nn.Module, config: RunConfig, scorer: Scorer, guidance: GuidanceConfig,
                 estimator=None, calibration: Calibration | None = None, run_dir: Path | None = None,
                 model_version: str | None = None, residual=None) -> None:
        self.network = network
        self.config = config
        self.scorer = scorer
        self.guidance = guidance
        self.estimator_model = estimator
        self.residual = residual
        self.calibration = calibration
        self.run_dir = run_dir
        self.model_version = model_version
        self.preprocessor = Preprocessor.from_config(config.data)
        self.device = getattr(scorer, "device", torch.device("cpu"))

    # the Scorer interface, delegated -------------------------------------------------
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.scorer.name

    @name.setter
    def name(self, value: str) -> None:
        self.scorer.name = value

    @property
    def deformable(self) -> bool:  # type: ignore[override]
        return self.scorer.deformable

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.scorer.size

    @property
    def oracle(self) -> bool:
        return bool(getattr(self.scorer, "oracle", False))

    @property
    def strategy(self) -> str:
        return self.guidance.strategy

    @property
    def estimator(self):
        """The u model attached to an unguided scorer (settable, as on ModelScorer)."""
        return getattr(self.scorer, "estimator", None) if isinstance(self.scorer, ModelScorer) else self.estimator_model

    @estimator.setter
    def estimator(self, value) -> None:
        if isinstance(self.scorer, ModelScorer):
            self.scorer.estimator = value
        self.estimator_model = value

    @property
    def thresholds(self) -> list[dict[str, Any]]:
        """The calibrated FPR thresholds, when they were set for this very setting (guidance and
        estimator); [] otherwise (they would not hold their FPR for another setting)."""
        if self.calibration is None or not self.calibration_matches:
            return []
        return self.calibration.thresholds

    @property
    def calibration_matches(self) -> bool:
        """The saved calibration was made with this detector's guidance setting and estimator."""
        if self.calibration is None:
            return False
        saved = self.calibration.info.get("guidance") or {}
        mine = dataclasses.asdict(self.guidance)
        same_guidance = all(saved.get(k) == v for k, v in mine.items())
        same_estimator = self.estimator_model is None or self.calibration.estimator_name == self.estimator_model.name
        return same_guidance and same_estimator and not self.oracle

    def __call__(self, images: torch.Tensor, brain_masks: torch.Tensor, healthy: torch.Tensor | None = None,
                 lesion_masks: torch.Tensor | None = None) -> Prediction:
        if isinstance(self.scorer, GuidedScorer):
            return self.scorer(images, brain_masks, healthy, lesion_masks)
        return self.scorer(images, brain_masks, healthy)

    def __repr__(self) -> str:
        return (f"Detector({self.name!r}, strategy={self.strategy!r}, estimator="
                f"{None if self.estimator_model is None else self.estimator_model.name!r}, "
                f"calibration={None if self.calibration is None else self.calibration.version})")

    # assembly --------------------------------------------------------------------------
    @classmethod
    def assemble(cls, network: torch.nn.Module, config: RunConfig, guidance: GuidanceConfig,
                 estimator: str | None = None, estimator_options: Mapping[str, Any] | None = None,
                 healthy: tuple[torch.Tensor, torch.Tensor] | None = None,
                 calibration: Calibration | None = None, seed: int = 0, name: str | None = None,
                 oracle: bool = False, run_dir: Path | None = None, model_version: str | None = None,
                 device: str | torch.device = "cpu") -> "Detector":
        """Build a detector around a loaded network.

        u comes from ``estimator`` (default ``guidance.estimator``); its healthy normaliser is
        fitted on ``healthy`` = (images, brain masks) when given, else read from
        ``calibration``. An unguided detector gets u only when a normaliser is available (or
        ``guidance.normalise`` is off). ``oracle``: m = the dilated ground truth.
        """
        strategy = STRATEGIES[guidance.strategy]
        deformable = config.model.name == "morphaeus"
        name_u = canonical_estimator_name(estimator or guidance.estimator)
        if not guidance.normalise and len(estimator_parts(name_u)) > 1:
            raise ConfigError(f"estimator {name_u} combines healthy z-scores: it needs guidance.normalise=true")
        options = dict(estimator_options or {})
        if calibration is not None and not options and calibration.estimator_name == name_u:
            options = dict((calibration.info.get("estimator") or {}).get("options") or {})
        wants_u = strategy.uses_mask and not oracle
        model = None
        if guidance.normalise:
            if healthy is not None:
                base = build_estimator_for_run(name_u, run_dir, {"seed": seed, **options})
                from ..uncertainty import HealthyNormaliser

                model = HealthyNormaliser.fit(base, network, healthy[0], healthy[1],
                                              mode=getattr(guidance, "normaliser_mode", "pixel"))
            elif calibration is not None and calibration.estimator_name == name_u:
                base = build_estimator_for_run(name_u, run_dir, options)
                model = calibration.normaliser(base)
                if model is not None and model.mode != getattr(guidance, "normaliser_mode", model.mode):
                    model = None  # saved for the other normaliser mode
            if model is None and wants_u:
                where = f"{run_dir}" if run_dir is not None else "this run"
                have = calibration.estimator_name if calibration is not None else None
                raise ConfigError(
                    f"guidance strategy {guidance.strategy!r} needs the healthy statistics of estimator {name_u!r}, "
                    f"but {where} has " + (f"calibration for estimator {have!r}" if have else "no calibration")
                    + f"; run `anomorph calibrate --run {where} --estimator {name_u}`")
        else:
            model = build_estimator_for_run(name_u, run_dir, {"seed": seed, **options})
        residual = None
        if deformable:
            if healthy is not None and guidance.strategy == "iterative":
                residual = fit_residual_statistics(network, healthy[0], healthy[1])
            elif calibration is not None and calibration.info.get("residual"):
                from ..uncertainty.estimators import WarpedResidualEstimator

                residual = calibration.normaliser(WarpedResidualEstimator(), "residual")
            if guidance.strategy == "iterative" and residual is None:
                raise ConfigError(f"the iterative strategy needs healthy residual statistics; run "
                                  f"`anomorph calibrate --run {run_dir}`")
        if guidance.strategy == "none":
            scorer: Scorer = ModelScorer(network, config, name=name, device=device, estimator=model)
        else:
            source = signal_function(model, guidance.normalise) if (wants_u and model is not None) else None
            scorer = GuidedScorer(network, config, guidance.strategy, source, oracle=oracle, guidance=guidance,
                                  name=name, residual_normaliser=None if residual is None
                                  else residual_normaliser_from(residual, network))
        return cls(network, config, scorer, guidance, model, calibration, run_dir, model_version, residual)

    @classmethod
    def from_run(cls, run_dir: str | Path, guidance: GuidanceArg = None, estimator: str | None = None,
                 which: str = "best", healthy: tuple[torch.Tensor, torch.Tensor] | None = None,
                 calibration: bool = True, seed: int = 0, name: str | None = None, oracle: bool = False,
                 estimator_options: Mapping[str, Any] | None = None,
                 device: str | torch.device = "cpu") -> "Detector":
        """Load ``run_dir`` (member 0 of an ensemble directory) and assemble a ready detector.

        ``guidance``: None = the run's calibrated setting; a strategy name; GuidanceConfig field
        overrides; or a GuidanceConfig (see :func:`resolve_guidance`). ``estimator``: the u
        estimator (default: the setting's). ``healthy``: (images, brain masks) of healthy slices
        to fit the normalisers on instead of the saved calibration (the benchmark passes its
        calibration subjects). ``calibration=False`` ignores saved calibration files.
        """
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ConfigError(f"run directory not found: {run_dir}")
        member = resolve_run_dir(run_dir)
        network, config = load_run(member, which)
        saved = Calibration.load(member) if calibration else None
        resolved = resolve_guidance(config, guidance, saved)
        version = file_sha256(checkpoint_path(member, which))[:12]
        return cls.assemble(network, config, resolved, estimator, estimator_options, healthy, saved, seed,
                            name or (config.name if resolved.strategy == "none" else None), oracle,
                            run_dir, version, device)

    def oracle_twin(self, name: str | None = None) -> "Detector":
        """The same network and setting with m = the dilated ground-truth mask (oracle-guided)."""
        scorer = GuidedScorer(self.network, self.config, self.guidance.strategy, oracle=True, guidance=self.guidance,
                              name=name)
        return Detector(self.network, self.config, scorer, self.guidance, None, self.calibration, self.run_dir,
                        self.model_version, self.residual)
