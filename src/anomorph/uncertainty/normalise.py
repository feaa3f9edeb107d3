"""Healthy-population normalisation of any estimator's raw map (SPEC §3).

Raw uncertainty is high on every edge (sulci, ventricle borders, the skull) in healthy and
abnormal scans alike; what is informative is *more uncertainty than a healthy scan has at
that place*. :class:`HealthyNormaliser` measures the estimator's raw map on healthy
validation slices and turns a new raw map into a z-score

    z = (raw − μ) / σ

with μ and σ either per pixel (``mode="pixel"``: statistics over the healthy slices at the
same model-grid pixel, pooled over a Gaussian neighbourhood of ``smooth`` pixels) or per
tissue (``mode="tissue"``: over the healthy pixels of the same tissue bin — the intensity of
the pseudo-healthy prior x̂ in ``n_intensity_bins`` equal bins of [0, 1] crossed with its
gradient magnitude in ``n_gradient_bins`` quantile bins, so edges are compared with edges).
σ is floored at ``floor`` × the median σ (and at 1e-6) so near-constant pixels do not explode,
and bins or pixels with fewer than ``min_count`` healthy samples use the pooled statistics.

The z-score is squashed to u = sigmoid((z − z0) / temperature): with the defaults z0 = 2,
temperature = 0.5, a healthy pixel at its mean (z = 0) gets u = sigmoid(−4) ≈ 0.018,
z = 2 (two healthy standard deviations) u = 0.5 and z = 4 u ≈ 0.98. The squash is strictly
monotone, so the uncertainty AUROC of u equals that of z. u is 0 outside the brain mask.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from .base import UncertaintyEstimator, UncertaintyOutput, eval_mode, gradient_magnitude, prior_network

MODES = ("pixel", "tissue")
#: state_dict keys of the wrapped estimator's own statistics (a combination's part normalisers)
ESTIMATOR_PREFIX = "estimator."


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable zero-padded Gaussian blur of ``(1, 1, *spatial)`` float64 maps (sums, not means)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    spatial = maps.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    for axis in range(spatial):
        shape = [1, 1] + [1] * spatial
        shape[2 + axis] = kernel.numel()
        padding = [0] * spatial
        padding[axis] = radius
        maps = conv(maps, kernel.view(shape), padding=tuple(padding))
    return maps


class HealthyNormaliser:
    """Wraps an estimator: u = sigmoid((z − z0) / temperature), z = (raw − μ) / σ (see module doc).

    Build with :meth:`fit`; save with :meth:`state_dict` (tensors only, loadable with
    ``torch.load(weights_only=True)``) and restore with :meth:`from_state`.
    ``__call__(network, images, brain_masks=None, generator=None)`` returns the estimator's
    raw map unchanged, u from the z-score, and extras with ``z`` and ``uncertainty_unnormalised``.
    """

    def __init__(self, estimator: UncertaintyEstimator, mode: str, mean: torch.Tensor, std: torch.Tensor,
                 z0: float = 2.0, temperature: float = 0.5, intensity_edges: torch.Tensor | None = None,
                 gradient_edges: torch.Tensor | None = None, n_fit: int = 0) -> None:
        if mode not in MODES:
            raise ConfigError(f"normaliser mode must be one of {MODES}, got {mode!r}")
        if not temperature > 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        if mode == "tissue" and (intensity_edges is None or gradient_edges is None):
            raise ConfigError("tissue mode needs intensity_edges and gradient_edges")
        self.estimator = estimator
        self.mode = mode
        self.mean = mean.float()
        self.std = std.float()
        self.z0 = float(z0)
        self.temperature = float(temperature)
        self.intensity_edges = None if intensity_edges is None else intensity_edges.float()
        self.gradient_edges = None if gradient_edges is None else gradient_edges.float()
        self.n_fit = int(n_fit)

    @property
    def name(self) -> str:
        return self.estimator.name

    @property
    def seed(self) -> int:
        return self.estimator.seed

    def options(self) -> dict[str, Any]:
        return {**self.estimator.options(), "normalise": self.mode, "z0": self.z0,
                "temperature": self.temperature, "n_fit_slices": self.n_fit}

    def __repr__(self) -> str:
        return f"HealthyNormaliser({self.estimator!r}, mode={self.mode!r}, n_fit={self.n_fit})"

    # ------------------------------------------------------------------ squash
    def squash(self, z: torch.Tensor) -> torch.Tensor:
        """u = sigmoid((z − z0) / temperature)."""
        return torch.sigmoid((z - self.z0) / self.temperature)

    # ------------------------------------------------------------------ tissue bins
    @staticmethod
    def _tissue_context(network: nn.Module, images: torch.Tensor, extras: dict[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂ intensity, ‖∇x̂‖), each ``(B, 1, *spatial)``; x̂ from the extras or one prior pass."""
        prior = extras.get("reconstruction")
        if prior is None or prior.shape != images.shape:
            with torch.no_grad(), eval_mode(network):
                prior = prior_network(network)(images).reconstruction
        intensity = prior.mean(1, keepdim=True) if prior.shape[1] > 1 else prior
        return intensity, gradient_magnitude(prior)

    def _bins(self, intensity: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        assert self.intensity_edges is not None and self.gradient_edges is not None
        i = torch.bucketize(intensity.contiguous(), self.intensity_edges.to(intensity.device))
        g = torch.bucketize(gradient.contiguous(), self.gradient_edges.to(gradient.device))
        return i * (self.gradient_edges.numel() + 1) + g

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(cls, estimator: UncertaintyEstimator, network: nn.Module, healthy_images: torch.Tensor,
            brain_masks: torch.Tensor | None = None, mode: str = "pixel", batch_size: int = 32,
            smooth: float = 1.0, floor: float = 0.1, min_count: int = 3, z0: float = 2.0,
            temperature: float = 0.5, n_intensity_bins: int = 8, n_gradient_bins: int = 4,
            generator: torch.Generator | None = None) -> "HealthyNormaliser":
        """Measure ``estimator`` on healthy slices ``(N, C, *spatial)`` (e.g. the label-0 val
        slices) inside their brain masks (None = every pixel) and return the normaliser.

        ``smooth`` (pixel mode): σ in pixels of the Gaussian neighbourhood the per-pixel
        statistics are pooled over (0 = strictly per pixel). ``floor``: σ ≥ floor × median σ.
        ``min_count``: fewer healthy samples than this at a pixel / in a bin → pooled μ, σ.
        The estimator runs with ``generator`` (None = its own seed at every batch).
        """
        if mode not in MODES:
            raise ConfigError(f"normaliser mode must be one of {MODES}, got {mode!r}")
        if healthy_images.shape[0] == 0:
            raise ConfigError("HealthyNormaliser.fit: no healthy slices to fit on")
        # the estimator's own statistics first (a combination z-scores each part on the same slices)
        estimator.fit_statistics(network, healthy_images, brain_masks, mode=mode, batch_size=batch_size,
                                 smooth=smooth, floor=floor, min_count=min_count, z0=z0, temperature=temperature,
                                 n_intensity_bins=n_intensity_bins, n_gradient_bins=n_gradient_bins,
                                 generator=generator)
        device = next(iter(network.parameters()), torch.empty(0)).device
        raws, contexts, insides = [], [], []
        for start in range(0, healthy_images.shape[0], batch_size):
            images = healthy_images[start:start + batch_size].to(device)
            brain = None if brain_masks is None else brain_masks[start:start + batch_size].to(device)
            out = estimator(network, images, brain, generator)
            raws.append(out.raw.double().cpu())
            inside = torch.ones_like(out.raw, dtype=torch.bool) if brain is None else brain > 0
            insides.append(inside.cpu())
            if mode == "tissue":
                contexts.append(tuple(t.float().cpu() for t in cls._tissue_context(network, images, out.extras)))
        raw, inside = torch.cat(raws), torch.cat(insides)
        values = raw[inside]
        if values.numel() == 0:
            raise ConfigError("HealthyNormaliser.fit: the brain masks are empty")
        pooled_mean, pooled_std = values.mean(), values.std(unbiased=False)
        kwargs: dict[str, Any] = {}
        if mode == "pixel":
            weight = inside.double()
            count = _gaussian_blur(weight.sum(0, keepdim=True), smooth)
            total = _gaussian_blur((raw * weight).sum(0, keepdim=True), smooth)
            squares = _gaussian_blur((raw.pow(2) * weight).sum(0, keepdim=True), smooth)
            mean = total / count.clamp_min(1e-12)
            variance = (squares / count.clamp_min(1e-12) - mean.pow(2)).clamp_min(0)
            enough = count >= min_count
        else:
            intensity = torch.cat([c[0] for c in contexts])[inside]
            gradient = torch.cat([c[1] for c in contexts])[inside]
            intensity_edges = torch.linspace(0, 1, n_intensity_bins + 1)[1:-1]
            quantiles = torch.linspace(0, 1, n_gradient_bins + 1)[1:-1]
            step = max(1, math.ceil(gradient.numel() / 2**24))  # torch.quantile's input limit
            gradient_edges = (torch.quantile(gradient.float()[::step], quantiles) if n_gradient_bins > 1
                              else torch.zeros(0))
            kwargs = {"intensity_edges": intensity_edges, "gradient_edges": gradient_edges}
            probe = cls(estimator, "tissue", torch.zeros(1), torch.ones(1), **kwargs)
            bins = probe._bins(intensity, gradient)
            n_bins = n_intensity_bins * max(n_gradient_bins, 1)
            count = torch.bincount(bins, minlength=n_bins).double()
            total = torch.bincount(bins, values, minlength=n_bins)
            squares = torch.bincount(bins, values.pow(2), minlength=n_bins)
            mean = total / count.clamp_min(1)
            variance = (squares / count.clamp_min(1) - mean.pow(2)).clamp_min(0)
            enough = count >= min_count
        std = variance.sqrt()
        mean = torch.where(enough, mean, pooled_mean)
        std = torch.where(enough, std, pooled_std)
        reference = std[enough].median() if enough.any() else pooled_std
        std = std.clamp_min(max(float(floor) * float(reference), 1e-6))
        return cls(estimator, mode, mean, std, z0, temperature, n_fit=int(healthy_images.shape[0]), **kwargs)

    # ------------------------------------------------------------------ apply
    def statistics(self, network: nn.Module, images: torch.Tensor, extras: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and σ maps broadcastable to the raw map of ``images``."""
        if self.mode == "pixel":
            if tuple(self.mean.shape[2:]) != tuple(images.shape[2:]):
                raise ConfigError(f"normaliser was fitted on {tuple(self.mean.shape[2:])} images, "
                                 f"got {tuple(images.shape[2:])}")
            return self.mean.to(images.device), self.std.to(images.device)
        bins = self._bins(*self._tissue_context(network, images, extras))
        return self.mean.to(images.device)[bins], self.std.to(images.device)[bins]

    def __call__(self, network: nn.Module, images: torch.Tensor, brain_masks: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> UncertaintyOutput:
        out = self.estimator(network, images, brain_masks, generator)
        mean, std = self.statistics(network, images, out.extras)
        z = (out.raw - mean) / std
        uncertainty = self.squash(z)
        if brain_masks is not None:
            uncertainty = uncertainty * (brain_masks.to(uncertainty.device) > 0)
        return UncertaintyOutput(out.raw, uncertainty,
                                 {**out.extras, "z": z, "uncertainty_unnormalised": out.uncertainty})

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: ``mode`` (0 pixel, 1 tissue), ``mean``, ``std``, ``z0``,
        ``temperature``, ``n_fit``, in tissue mode ``intensity_edges``, ``gradient_edges``, and
        for an estimator with statistics of its own (a combination) its ``statistics_state()``
        under ``estimator.``."""
        state = {"mode": torch.tensor(MODES.index(self.mode)), "mean": self.mean.clone(), "std": self.std.clone(),
                 "z0": torch.tensor(self.z0), "temperature": torch.tensor(self.temperature),
                 "n_fit": torch.tensor(self.n_fit)}
        if self.intensity_edges is not None and self.gradient_edges is not None:
            state["intensity_edges"] = self.intensity_edges.clone()
            state["gradient_edges"] = self.gradient_edges.clone()
        state.update({f"{ESTIMATOR_PREFIX}{key}": value for key, value in self.estimator.statistics_state().items()})
        return state

    @classmethod
    def from_state(cls, estimator: UncertaintyEstimator, state: dict[str, torch.Tensor]) -> "HealthyNormaliser":
        """Rebuild from :meth:`state_dict` around ``estimator`` (the same estimator and options)."""
        estimator.load_statistics_state({key[len(ESTIMATOR_PREFIX):]: value for key, value in state.items()
                                         if key.startswith(ESTIMATOR_PREFIX)})
        return cls(estimator, MODES[int(state["mode"])], state["mean"], state["std"], float(state["z0"]),
                   float(state["temperature"]), state.get("intensity_edges"), state.get("gradient_edges"),
                   int(state.get("n_fit", torch.tensor(0))))
