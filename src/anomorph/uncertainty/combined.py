"""Combinations of healthy-normalised estimators: ``max(a,b)``, ``mean(a,b)``, ``min(a,b)``.

Two estimators can fail on different lesions: the registered residual |x − x̃| (``warped_residual``)
is blind where φ has already registered a lesion away, a learned non-correspondence head
(``noncorrespondence``) is blind to lesion types unlike its synthetic training anomalies. Their raw
maps live in different units, so they are combined on a common scale: each part's raw map is
z-scored against *its own* healthy statistics (a :class:`~.normalise.HealthyNormaliser` per part,
fitted on the same healthy slices as the outer one), and the combined raw map is

- ``max``: max_i z_i — atypical for *any* part (the union of the parts' masks at a threshold);
- ``mean``: the mean of the z_i — evidence summed over parts (Stouffer's combination up to the
  factor √k, which the outer normaliser removes);
- ``min``: min_i z_i — atypical for *every* part (the intersection; the z-scale counterpart of a
  product of probabilities).

The combined map is itself healthy-normalised like any estimator (``HealthyNormaliser`` around
the :class:`CombinedEstimator`), so a guidance threshold stays in healthy standard deviations *of
the combination* (e.g. the max of two healthy z-scores has mean ≈ 0.56 and is renormalised).
Unlike every other estimator the raw map is a z-score and may be negative.

Spelled in configs and on the command line as ``RULE(NAME,NAME[,...])`` (parts with their
default options, ``seed`` and ``run_dir`` passed on); built by
:func:`anomorph.uncertainty.build_estimator`.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import UncertaintyEstimator
from .normalise import HealthyNormaliser

RULES = ("max", "mean", "min")
_SPELLING = re.compile(r"^\s*([A-Za-z_]+)\s*\((.*)\)\s*$")


def parse_combination(name: str) -> tuple[str, list[str]] | None:
    """``"max(a, b)"`` → ``("max", ["a", "b"])``; None when ``name`` is not a combination.
    A malformed combination (unknown rule, fewer than two parts, nesting) is a ConfigError."""
    match = _SPELLING.match(str(name))
    if match is None:
        return None
    rule, inner = match.group(1), match.group(2)
    if rule not in RULES:
        raise ConfigError(f"uncertainty estimator {name!r}: unknown combination rule {rule!r}; expected one of {RULES}")
    if "(" in inner or ")" in inner:
        raise ConfigError(f"uncertainty estimator {name!r}: combinations do not nest")
    parts = [part.strip() for part in inner.split(",")]
    if len(parts) < 2 or any(not part for part in parts):
        raise ConfigError(f"uncertainty estimator {name!r}: a combination needs two or more estimator names, "
                          f"e.g. max(warped_residual,noncorrespondence)")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"uncertainty estimator {name!r}: a part is repeated")
    return rule, parts


def estimator_parts(name: str) -> list[str]:
    """The estimator names ``name`` is built from: a combination's parts, else ``[name]``."""
    combination = parse_combination(name)
    return [name] if combination is None else combination[1]


def canonical_estimator_name(name: str) -> str:
    """The spelling estimators are compared by: combinations without blanks, others unchanged."""
    combination = parse_combination(name)
    return name if combination is None else f"{combination[0]}({','.join(combination[1])})"


class CombinedEstimator(UncertaintyEstimator):
    """``rule`` over the healthy z-scores of ``parts`` (see the module docstring).

    Before use the part normalisers must be fitted: :meth:`fit_statistics` (called by
    :meth:`HealthyNormaliser.fit`) or :meth:`load_statistics_state` (from a saved calibration).
    raw: ``(B, 1, *spatial)`` combined z-score (healthy SDs, may be negative); ``uncertainty``
    without a normaliser: 1 − exp(−max(raw, 0) / scale), scale default 2 SDs. Extras: each
    part's z-score as ``z_<part name>`` and the ``reconstruction`` of the first part that gives one.
    Cost: the sum of the parts' costs.
    """

    units = "healthy standard deviations (combined z-score)"
    default_scale = 2.0
    nonnegative_raw = False  # a z-score: not clamped at 0

    def __init__(self, parts: Sequence[UncertaintyEstimator], rule: str = "max", seed: int = 0,
                 scale: float | None = None) -> None:
        if rule not in RULES:
            raise ConfigError(f"combination rule must be one of {RULES}, got {rule!r}")
        if len(parts) < 2:
            raise ConfigError("a combination needs two or more estimators")
        super().__init__(seed, scale)
        self.parts = list(parts)
        self.rule = rule
        self.name = f"{rule}({','.join(part.name for part in self.parts)})"
        self.normalisers: list[HealthyNormaliser] | None = None

    def options(self) -> dict[str, Any]:
        return {**super().options(), "rule": self.rule,
                "parts": {part.name: part.options() for part in self.parts}}

    # ------------------------------------------------------------------ part statistics
    def fit_statistics(self, network: nn.Module, healthy_images: torch.Tensor, brain_masks: torch.Tensor | None,
                       **fit_options: Any) -> None:
        """Fit one :class:`HealthyNormaliser` per part on the healthy slices (same options)."""
        self.normalisers = [HealthyNormaliser.fit(part, network, healthy_images, brain_masks, **fit_options)
                            for part in self.parts]

    def statistics_state(self) -> dict[str, torch.Tensor]:
        """Tensors only: the part normalisers' states under ``part<i>.<key>``."""
        if self.normalisers is None:
            raise ConfigError(f"{self.name}: the part normalisers are not fitted")
        return {f"part{i}.{key}": value for i, normaliser in enumerate(self.normalisers)
                for key, value in normaliser.state_dict().items()}

    def load_statistics_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the part normalisers from :meth:`statistics_state`'s tensors."""
        normalisers = []
        for i, part in enumerate(self.parts):
            prefix = f"part{i}."
            sub = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            if "mean" not in sub or "std" not in sub:
                raise ConfigError(f"{self.name}: saved statistics of part {i} ({part.name}) are missing")
            normalisers.append(HealthyNormaliser.from_state(part, sub))
        self.normalisers = normalisers

    # ------------------------------------------------------------------ estimate
    def estimate(self, network, images, generator):
        if self.normalisers is None:
            raise ConfigError(f"uncertainty estimator {self.name!r} needs healthy statistics of its parts: "
                              f"use it with normalisation (guidance.normalise on) and a calibration")
        zs, extras = [], {}
        for normaliser in self.normalisers:
            out = normaliser(network, images, None, generator)
            zs.append(out.extras["z"])
            extras[f"z_{normaliser.name}"] = out.extras["z"]
            # x̂ (and v) of the first part that ran the network's pass, as one pair: tissue bins and
            # the test-time strategies' start read them instead of running that pass again
            if "velocity" in out.extras and "velocity" not in extras:
                extras.update(reconstruction=out.extras["reconstruction"], velocity=out.extras["velocity"])
            elif "reconstruction" in out.extras and "reconstruction" not in extras:
                extras["reconstruction"] = out.extras["reconstruction"]
        stacked = torch.stack(zs)
        combined = {"max": lambda: stacked.amax(0), "min": lambda: stacked.amin(0),
                    "mean": lambda: stacked.mean(0)}[self.rule]()
        return combined, extras

    def __repr__(self) -> str:
        return f"CombinedEstimator({self.name!r}, fitted={self.normalisers is not None})"
