"""The common interface of every uncertainty estimator (SPEC §3).

An estimator takes a trained network and a batch of model-grid images ``(B, C, *spatial)`` in
[0, 1] and returns an :class:`UncertaintyOutput`:

- ``raw``: ``(B, 1, *spatial)``, ≥ 0, the estimator's own quantity in its own units (an
  intensity standard deviation, pixels, ...; see each estimator's docstring);
- ``uncertainty``: ``(B, 1, *spatial)`` in [0, 1], "how unsure the model is that this tissue is
  normal": the raw map squashed by ``1 − exp(−raw / scale)`` (or, through
  :class:`~anomorph.uncertainty.normalise.HealthyNormaliser`, a squashed z-score against
  healthy validation slices), multiplied by the brain mask when one is given;
- ``extras``: named intermediate maps (means, variances, displacements).

Rules every estimator follows:

- it runs under ``torch.no_grad()`` with the network in eval mode (normalisation layers use
  their running statistics) and restores every submodule's train/eval flag afterwards;
- all randomness comes from a ``torch.Generator``: the one passed in, else a fresh one seeded
  with the estimator's ``seed`` option at every call (so a slice's map does not depend on the
  batch it is in, nor on the order of calls);
- it never looks at the final residual |x − x̃|: u must not depend on φ through the anomaly map
  (SPEC §3 pitfall), so guidance built from u cannot "explain away" what φ explained away.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class UncertaintyOutput:
    """Result of an estimator for a ``(B, C, *spatial)`` batch.

    raw: ``(B, 1, *spatial)`` raw estimator map, ≥ 0, units documented per estimator.
    uncertainty: ``(B, 1, *spatial)`` u in [0, 1] (0 outside the brain mask when one was given).
    extras: further maps, e.g. ``mean`` / ``variance`` of x̂ over MC passes, ``displacement_std``.
        The estimators that run the network's full unguided pass (``warped_residual``,
        ``deformation``, ``noncorrespondence``) give its ``reconstruction`` and ``velocity``: a
        test-time strategy starts from them instead of running the same pass again.
    """

    raw: torch.Tensor
    uncertainty: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def eval_mode(network: nn.Module) -> Iterator[nn.Module]:
    """Put ``network`` (every submodule) in eval mode; restore each module's flag on exit."""
    flags = [(module, module.training) for module in network.modules()]
    network.eval()
    try:
        yield network
    finally:
        for module, training in flags:
            module.training = training


def squash_exponential(raw: torch.Tensor, scale: float) -> torch.Tensor:
    """``1 − exp(−raw / scale)``: 0 at raw = 0, 0.63 at raw = scale, → 1; monotone."""
    return -torch.expm1(-raw.clamp_min(0) / scale)


def channel_rms(values: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` → ``(B, 1, *spatial)``: root mean square over channels (identity for C = 1)."""
    if values.shape[1] == 1:
        return values
    return values.pow(2).mean(1, keepdim=True).sqrt()


def sample_moments(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population variance over dim 0 of ``(N, ...)`` samples.

    Shifted by the first sample, so N identical samples give a variance of exactly 0.
    """
    shifted = samples - samples[:1]
    offset = shifted.mean(0)
    variance = (shifted - offset).pow(2).mean(0)
    return samples[0] + offset, variance


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` → ``(B, 1, *spatial)``: ‖∇image‖ per pixel (central differences,
    one-sided at the border; RMS over channels), intensity per pixel."""
    gradients = torch.gradient(images, dim=tuple(range(2, images.ndim)))
    return channel_rms(torch.stack(gradients).pow(2).sum(0).sqrt())


def is_deformable(network: nn.Module) -> bool:
    """True for networks with a deformation head (``MorphAEus``)."""
    return hasattr(network, "velocity_head") and hasattr(network, "predict_velocity")


def prior_network(network: nn.Module) -> nn.Module:
    """The auto-encoder that produces x̂: ``network.prior`` for MorphAEus, else ``network``."""
    return network.prior if is_deformable(network) else network


def check_images(network: nn.Module, images: torch.Tensor) -> None:
    check = getattr(prior_network(network), "check_input", None)
    if check is not None:
        check(images)


def default_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def draw_seed(generator: torch.Generator) -> int:
    """A 62-bit integer drawn from ``generator`` (used to derive child generators)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


class UncertaintyEstimator:
    """Base class. Subclasses set ``name`` and implement :meth:`estimate`.

    Options common to all: ``seed`` (default 0; the generator used when none is passed) and
    ``scale`` (the raw value mapped to u = 1 − 1/e ≈ 0.63 when no normaliser is used).
    """

    name = "estimator"
    #: raw-map units, for reports and docs
    units = ""
    default_scale = 1.0
    #: raw maps are ≥ 0 (clamped at 0); a combination of z-scores (:mod:`.combined`) is signed
    nonnegative_raw = True

    def __init__(self, seed: int = 0, scale: float | None = None) -> None:
        self.seed = int(seed)
        self.scale = float(self.default_scale if scale is None else scale)
        if not self.scale > 0:
            raise ConfigError(f"{self.name}: scale must be positive, got {scale}")

    def options(self) -> dict[str, Any]:
        """The estimator's options (for reports)."""
        return {"seed": self.seed, "scale": self.scale}

    def estimate(self, network: nn.Module, images: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Raw map ``(B, 1, *spatial)`` ≥ 0 and extras; runs in eval mode under no_grad."""
        raise NotImplementedError

    # healthy statistics of the estimator's own (a combination's part normalisers); none by default.
    # HealthyNormaliser.fit calls fit_statistics first and saves / restores statistics_state.
    def fit_statistics(self, network: nn.Module, healthy_images: torch.Tensor, brain_masks: torch.Tensor | None,
                       **fit_options: Any) -> None:
        """Fit statistics the estimator itself needs on healthy slices (``HealthyNormaliser.fit`` options)."""

    def statistics_state(self) -> dict[str, torch.Tensor]:
        """Tensors of those statistics (saved with the normaliser); {} when there are none."""
        return {}

    def load_statistics_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`statistics_state`."""

    def scale_for(self, network: nn.Module) -> float:
        """The squashing scale used for ``network`` (default: the ``scale`` option)."""
        return self.scale

    def squash(self, raw: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """u = 1 − exp(−raw / scale) in [0, 1]."""
        return squash_exponential(raw, self.scale if scale is None else scale)

    def __call__(self, network: nn.Module, images: torch.Tensor, brain_masks: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> UncertaintyOutput:
        check_images(network, images)
        if generator is None:
            generator = default_generator(self.seed)
        with torch.no_grad(), eval_mode(network):
            raw, extras = self.estimate(network, images, generator)
        if self.nonnegative_raw:
            raw = raw.clamp_min(0)
        uncertainty = self.squash(raw, self.scale_for(network))
        if brain_masks is not None:
            uncertainty = uncertainty * (brain_masks.to(uncertainty.device) > 0)
        return UncertaintyOutput(raw, uncertainty, extras)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({options})"
