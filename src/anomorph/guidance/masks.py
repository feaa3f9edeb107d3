"""Guidance masks m ∈ [0, 1] (1 = hold the deformation stiff), from uncertainty or synthetic."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ramp_mask(score: torch.Tensor, threshold: float = 3.0, softness: float = 1.0) -> torch.Tensor:
    """Guidance mask m ∈ [0, 1] from a score, reaching both ends of its range exactly.

    m = clamp((score − (threshold − softness)) / softness, 0, 1): 0 where score ≤ threshold −
    softness, 1 where score ≥ threshold, linear in between; ``softness`` = 0 gives the hard
    step (score ≥ threshold). With the healthy z-score as the score (the default guidance
    signal, see :func:`anomorph.scoring.sources.uncertainty_source`) threshold 3 and softness 1
    read "hold the field fully where the tissue is ≥ 3 healthy standard deviations away from
    normal, not at all below 2". Scores of +inf (u = 1) give m = 1; NaN gives 0.
    """
    if softness < 0:
        raise ValueError(f"softness must be >= 0, got {softness}")
    score = torch.nan_to_num(score, nan=-torch.inf)
    if softness == 0:
        return (score >= threshold).to(score.dtype if score.is_floating_point() else torch.float32)
    return ((score - (threshold - softness)) / softness).clamp(0.0, 1.0)


def hysteresis_region(score: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """Hysteresis thresholding (as in Canny's edge linking): 1 on every pixel whose score is
    ≥ ``low`` and that is connected to a pixel with score ≥ ``high`` through pixels with score
    ≥ ``low`` (8-connectivity in 2-d, 26 in 3-d), else 0; float, the shape of ``score``
    ``(B, 1, *spatial)``. Each image is its own region. Computed as a morphological
    reconstruction by dilation (3^d max-pooling restricted to ``score ≥ low``, repeated until
    nothing changes), so it runs batched on any device. NaN scores count as below both."""
    if low > high:
        raise ValueError(f"hysteresis: the low threshold {low} is above the high threshold {high}")
    score = torch.nan_to_num(score.float(), nan=-torch.inf)
    allowed = (score >= low).float()
    region = (score >= high).float()
    pool = F.max_pool3d if score.ndim == 5 else F.max_pool2d
    for _ in range(math.prod(score.shape[2:])):  # the longest possible path; stops far earlier
        grown = pool(region, kernel_size=3, stride=1, padding=1) * allowed
        if torch.equal(grown, region):
            break
        region = grown
    return region


def dilate_mask(m: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Grey-value dilation of ``(B, 1, H, W)`` m with a (2·radius+1)² square, in pixels."""
    if radius <= 0:
        return m
    return F.max_pool2d(m, kernel_size=2 * radius + 1, stride=1, padding=radius)


def synthetic_anomaly_masks(shape: tuple[int, int, int, int], generator: torch.Generator,
                            brain_masks: torch.Tensor | None = None, max_blobs: int = 3,
                            radius_range: tuple[float, float] = (0.03, 0.15),
                            amplitude_range: tuple[float, float] = (0.3, 1.0),
                            empty_probability: float = 0.25) -> torch.Tensor:
    """Random soft blob masks ``(B, 1, H, W)`` in [0, 1] for training the conditioned head.

    Each sample gets 0..``max_blobs`` elliptical blobs (radii a fraction of the image side) with
    a random amplitude (so λ(x) = λ₀(1 + α·m) takes random values), restricted to the brain mask
    when given; with ``empty_probability`` a sample gets no blob (m = 0: plain registration).
    """
    b, _, h, w = shape
    device = brain_masks.device if brain_masks is not None else torch.device("cpu")
    ys = torch.linspace(0, 1, h, device=device).view(1, h, 1)
    xs = torch.linspace(0, 1, w, device=device).view(1, 1, w)
    masks = torch.zeros(b, 1, h, w, device=device)

    def rand(*size: int) -> torch.Tensor:
        return torch.rand(*size, generator=generator).to(device)

    counts = torch.randint(1, max_blobs + 1, (b,), generator=generator)
    empty = rand(b) < empty_probability
    for k in range(max_blobs):
        active = ((counts > k) & ~empty.cpu()).to(device).float().view(b, 1, 1)
        centre = 0.15 + 0.7 * rand(b, 2)
        radii = radius_range[0] + (radius_range[1] - radius_range[0]) * rand(b, 2)
        angle = rand(b) * math.pi
        amplitude = amplitude_range[0] + (amplitude_range[1] - amplitude_range[0]) * rand(b)
        dy = ys - centre[:, 0].view(b, 1, 1)
        dx = xs - centre[:, 1].view(b, 1, 1)
        cos, sin = torch.cos(angle).view(b, 1, 1), torch.sin(angle).view(b, 1, 1)
        u = (cos * dx + sin * dy) / radii[:, 0].view(b, 1, 1)
        v = (-sin * dx + cos * dy) / radii[:, 1].view(b, 1, 1)
        blob = torch.sigmoid((1.0 - (u ** 2 + v ** 2)) * 8.0)  # soft edge about 1/8 of the radius
        masks[:, 0] = torch.maximum(masks[:, 0], active * amplitude.view(b, 1, 1) * blob)
    if brain_masks is not None:
        masks = masks * brain_masks
    return masks


def paste_intensity(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
                    probability: float = 0.5) -> torch.Tensor:
    """Fake anomalies for training: inside m, blend x towards a random constant intensity in
    [0, 1] (weight = m / max m), for a random ``probability`` fraction of the samples."""
    b = images.shape[0]
    device = images.device
    chosen = (torch.rand(b, generator=generator) < probability).to(device).float().view(b, 1, 1, 1)
    level = torch.rand(b, generator=generator).to(device).view(b, 1, 1, 1)
    peak = masks.flatten(1).amax(1).clamp_min(1e-6).view(b, 1, 1, 1)
    weight = chosen * masks / peak
    return images * (1 - weight) + level * weight


CORRUPTIONS = ("paste", "scale", "foreign")


def synthetic_corruption(images: torch.Tensor, generator: torch.Generator, brain_masks: torch.Tensor | None = None,
                         max_blobs: int = 3, radius_range: tuple[float, float] = (0.03, 0.15),
                         empty_probability: float = 0.25, min_change: float = 0.05
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic anomalies for training the non-correspondence head: (corrupted x, target).

    ``images`` ``(B, C, H, W)`` in [0, 1]. Each sample gets 0..``max_blobs`` soft elliptical
    blobs (:func:`synthetic_anomaly_masks`, radii a fraction of the image side, inside the
    brain mask) and one corruption kind, blended in with the blob as the weight:

    - ``paste``: a constant intensity drawn in [0, 1] (dark CSF-like to bright);
    - ``scale``: the tissue's own intensity × a factor in [0.3, 0.7] or [1.3, 2.0], clipped
      to [0, 1] (hypo-/hyper-intense tissue that keeps its texture);
    - ``foreign``: the same place of another slice of the batch, mirrored left–right (foreign
      patch: plausible tissue in the wrong place).

    None of these is the phantom's lesion generator. ``target`` ``(B, 1, H, W)`` ∈ {0, 1} is
    1 inside the blob's half-weight contour where the corruption changed x by at least
    ``min_change`` (intensity units): invisible changes are not asked for.
    """
    b = images.shape[0]
    device = images.device
    blobs = synthetic_anomaly_masks((b, 1, *images.shape[2:]), generator, brain_masks, max_blobs, radius_range,
                                    amplitude_range=(1.0, 1.0), empty_probability=empty_probability).to(device)
    kind = torch.randint(0, len(CORRUPTIONS), (b,), generator=generator).to(device).view(b, 1, 1, 1)
    level = torch.rand(b, generator=generator).to(device).view(b, 1, 1, 1)
    hyper = torch.rand(b, generator=generator).to(device).view(b, 1, 1, 1) < 0.5
    spread = torch.rand(b, generator=generator).to(device).view(b, 1, 1, 1)
    factor = torch.where(hyper, 1.3 + 0.7 * spread, 0.3 + 0.4 * spread)
    foreign = images.roll(1, dims=0).flip(-1)
    replacement = torch.where(kind == 0, level.expand_as(images),
                              torch.where(kind == 1, (images * factor).clamp(0, 1), foreign))
    corrupted = images * (1 - blobs) + replacement * blobs
    changed = (corrupted - images).abs().amax(1, keepdim=True) >= min_change
    return corrupted, ((blobs >= 0.5) & changed).float()
