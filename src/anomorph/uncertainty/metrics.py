"""Diagnostics of uncertainty maps: edge concentration and inference cost."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from .base import eval_mode, gradient_magnitude


def edge_mask(images: torch.Tensor, brain_masks: torch.Tensor | None = None,
              edge_quantile: float = 0.9) -> torch.Tensor:
    """Bool ``(B, 1, *spatial)``: brain pixels whose image gradient magnitude exceeds the
    ``edge_quantile`` quantile of that slice's brain pixels (about the top 10% by default)."""
    if not 0.0 <= edge_quantile < 1.0:
        raise ValueError(f"edge_quantile must be in [0, 1), got {edge_quantile}")
    gradient = gradient_magnitude(images.float())
    inside = (torch.ones_like(gradient, dtype=torch.bool) if brain_masks is None
              else brain_masks.to(gradient.device) > 0)
    edges = torch.zeros_like(inside)
    for i in range(gradient.shape[0]):
        values = gradient[i][inside[i]]
        if values.numel() == 0:
            continue
        threshold = torch.quantile(values, edge_quantile)
        edges[i] = (gradient[i] > threshold) & inside[i]
    return edges


def edge_area_fraction(images: torch.Tensor, brain_masks: torch.Tensor | None = None,
                       edge_quantile: float = 0.9) -> float:
    """Fraction of brain pixels that are edge pixels (what a uniform u scores on
    :func:`edge_mass_fraction`)."""
    edges = edge_mask(images, brain_masks, edge_quantile)
    inside = torch.ones_like(edges) if brain_masks is None else brain_masks.to(edges.device) > 0
    total = int(inside.sum())
    return float("nan") if total == 0 else int(edges.sum()) / total


def edge_mass_terms(u: torch.Tensor, images: torch.Tensor, brain_masks: torch.Tensor | None = None,
                    edge_quantile: float = 0.9) -> tuple[float, float, int, int]:
    """(Σ u on edge pixels, Σ u on brain pixels, edge pixel count, brain pixel count) of a batch,
    for pooling :func:`edge_mass_fraction` over batches."""
    edges = edge_mask(images, brain_masks, edge_quantile)
    inside = torch.ones_like(edges) if brain_masks is None else brain_masks.to(edges.device) > 0
    u = u.to(edges.device).double()
    if u.shape[1] != 1:
        u = u.mean(1, keepdim=True)
    u = u.expand_as(edges)
    return float((u * edges).sum()), float((u * inside).sum()), int(edges.sum()), int(inside.sum())


def edge_mass_fraction(u: torch.Tensor, images: torch.Tensor, brain_masks: torch.Tensor | None = None,
                       edge_quantile: float = 0.9) -> float:
    """Σ u over edge pixels / Σ u over brain pixels, pooled over the batch (use healthy slices).

    Edge pixels: see :func:`edge_mask`. Lower is better: raw uncertainty concentrates on edges
    (fraction → 1); a uniform u gives :func:`edge_area_fraction` (≈ 1 − edge_quantile).
    NaN when u has no mass inside the brain.
    """
    edge_mass, total, _, _ = edge_mass_terms(u, images, brain_masks, edge_quantile)
    return float("nan") if total <= 0 else edge_mass / total


def _median_time(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up (allocations, lazily built grids)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_cost(estimator: Callable, network: nn.Module, images: torch.Tensor,
                  brain_masks: torch.Tensor | None = None, repeats: int = 3) -> float:
    """Wall time of ``estimator(network, images, brain_masks)`` over that of one plain
    ``network(images)`` forward (eval mode, no_grad), medians of ``repeats`` runs after a warm-up.

    A ratio measured in one process on one machine, as SPEC §5 asks; not a benchmark.
    """
    def plain() -> object:
        with torch.no_grad(), eval_mode(network):
            return network(images)

    base = _median_time(plain, repeats)
    cost = _median_time(lambda: estimator(network, images, brain_masks), repeats)
    return cost / max(base, 1e-9)
