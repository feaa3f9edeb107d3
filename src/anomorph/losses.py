"""Loss terms as pure functions; none needs downloaded weights.

Images are ``(B, C, *spatial)`` with intensities in [0, 1]. Velocity and displacement fields
are ``(B, spatial_dims, *spatial)`` in **pixels** (channel k along spatial axis k). Optional
``weight`` maps are ``(B, 1, *spatial)`` (or broadcastable) non-negative per-pixel factors;
weighted means still divide by the pixel count, so a weight of 1 everywhere equals no weight.

SSIM, local NCC and bending energy reproduce MONAI's ``SSIMLoss``,
``LocalNormalizedCrossCorrelationLoss`` and ``BendingEnergyLoss`` (the tests compare them).
SSIM and NCC filter their five local moments in one depthwise pass (several times faster on
CPU than MONAI's five), channels-last on CPU (:func:`_depthwise_layout`), NCC's zero padding done
by the convolutions (:func:`_window_sums`); bending energy avoids MONAI's deprecated list indexing.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

REDUCTIONS = ("mean", "sum", "none")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _gaussian_window(win_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1D Gaussian taps, identical to MONAI's SSIM kernel."""
    offsets = torch.arange((1 - win_size) / 2, (1 + win_size) / 2, 1.0, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def _depthwise_layout(stacked: torch.Tensor) -> torch.Tensor:
    """``stacked`` ``(B, N, *spatial)`` in the memory layout its depthwise filtering is fastest in:
    channels-last on CPU for 2-d and 3-d images, unchanged elsewhere. oneDNN's depthwise
    convolution on CPU runs 2-5x faster (forward + backward) channels-last than NCHW for the
    window sums here; the values are the same (tests/test_losses.py compares both layouts).
    Measured by benchmarks/profile_tto.py and benchmarks/throughput.py (benchmarks/README.md).
    Unmeasured on GPUs, so left alone there."""
    if stacked.device.type != "cpu" or stacked.ndim not in (4, 5):
        return stacked
    layout = torch.channels_last if stacked.ndim == 4 else torch.channels_last_3d
    return stacked.contiguous(memory_format=layout)


def _window_sums(stacked: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-padded ``kernel_size``^d box sums (odd ``kernel_size``) of every channel of
    ``(B, N, *spatial)``, same shape: MONAI's ``separable_filtering`` with a rectangular kernel,
    laid out by :func:`_depthwise_layout`, and zero-padded by each 1-d convolution itself
    instead of by a padded copy per axis (``F.pad``: a fill and a copy forward, a slice copy
    backward). Equal to MONAI's up to float rounding (tests/test_losses.py)."""
    stacked = _depthwise_layout(stacked)
    channels, spatial_dims = stacked.shape[1], stacked.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial_dims - 1]
    sums = stacked
    for axis in reversed(range(spatial_dims)):  # MONAI's order: the last axis first
        shape, padding = [channels, 1] + [1] * spatial_dims, [0] * spatial_dims
        shape[2 + axis], padding[axis] = kernel_size, kernel_size // 2
        sums = conv(sums, stacked.new_ones(shape), padding=tuple(padding), groups=channels)
    return sums


def _separable_valid_filter(stacked: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Depthwise 'valid' filtering of ``(B, N, *spatial)`` with the same 1D taps along every axis."""
    stacked = _depthwise_layout(stacked)
    spatial_dims = stacked.ndim - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial_dims - 1]
    channels = stacked.shape[1]
    for axis in range(spatial_dims):
        shape = [1, 1] + [1] * spatial_dims
        shape[2 + axis] = taps.numel()
        weight = taps.reshape(shape).expand(channels, *shape[1:])
        stacked = conv(stacked, weight, groups=channels)
    return stacked


def ssim_map(
    prediction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-pixel SSIM, ``(B, C, *(spatial - win_size + 1))`` ('valid' windows), values in [-1, 1].

    Same definition and Gaussian window as MONAI's ``SSIMMetric`` (biased local statistics,
    c1 = (k1·data_range)², c2 = (k2·data_range)²) but with separable filtering of the five
    local moments in one depthwise convolution per axis, which is several times faster on CPU.
    Each spatial size must be >= ``win_size``.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    if min(prediction.shape[2:]) < win_size:
        raise ValueError(f"every spatial size must be >= win_size={win_size}, got {tuple(prediction.shape[2:])}")
    channels = prediction.shape[1]
    taps = _gaussian_window(win_size, sigma, prediction.dtype, prediction.device)
    stacked = torch.cat(
        [prediction, target, prediction * prediction, target * target, prediction * target], dim=1
    )
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = _separable_valid_filter(stacked, taps).split(channels, dim=1)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    sigma_x = mu_xx - mu_x * mu_x
    sigma_y = mu_yy - mu_y * mu_y
    sigma_xy = mu_xy - mu_x * mu_y
    contrast = (2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)
    return (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * contrast


def ssim_loss(
    prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, win_size: int = 11
) -> torch.Tensor:
    """1 − SSIM, mean over the batch: the value of MONAI ``SSIMLoss(spatial_dims, data_range)``.

    Gaussian window ``win_size`` with σ = 1.5; SSIM is averaged over channels and 'valid'
    pixels per sample. Scalar in [0, 2]; 0 for identical images. See :func:`ssim_map`.
    """
    per_sample = ssim_map(prediction, target, data_range=data_range, win_size=win_size).flatten(1).mean(1)
    return (1 - per_sample).mean()


def reconstruction_loss(
    x: torch.Tensor, x_hat: torch.Tensor, ssim_weight: float = 0.0, data_range: float = 1.0
) -> torch.Tensor:
    """MSE(x̂, x) + ``ssim_weight`` · (1 − SSIM(x̂, x)); the SSIM term is skipped when the weight is 0."""
    loss = F.mse_loss(x_hat, x)
    if ssim_weight:
        loss = loss + ssim_weight * ssim_loss(x_hat, x, data_range=data_range)
    return loss


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(N(mu, exp(logvar)) ‖ N(0, I)) for ``(B, latent_dim)`` posteriors.

    Per sample: −½ Σ_j (1 + logvar_j − mu_j² − exp(logvar_j)). ``reduction``: "batchmean"
    (mean over the batch of the per-sample sums; default), "mean" (over all elements),
    "sum", or "none" (per sample, ``(B,)``).
    """
    elementwise = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    if reduction == "batchmean":
        return elementwise.flatten(1).sum(1).mean()
    if reduction == "mean":
        return elementwise.mean()
    if reduction == "sum":
        return elementwise.sum()
    if reduction == "none":
        return elementwise.flatten(1).sum(1)
    raise ValueError(f"reduction must be 'batchmean', 'mean', 'sum' or 'none', got {reduction!r}")


def _check_ncc_inputs(x: torch.Tensor, y: torch.Tensor, kernel_size: int) -> None:
    if x.shape != y.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} differ in shape")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")


def local_ncc_map(x: torch.Tensor, y: torch.Tensor, kernel_size: int = 9, smooth_dr: float = 1e-5) -> torch.Tensor:
    """Per-pixel −NCC² over ``kernel_size``^d windows, ``(B, C, *spatial)``, values in [−1, 0].

    The formula of MONAI ``LocalNormalizedCrossCorrelationLoss(kernel_type="rectangular",
    reduction="none")`` (zero-padded windows; local variances are window *sums* clamped below
    at ``smooth_dr``), computed with one depthwise separable filtering of the five moments
    instead of five.
    """
    _check_ncc_inputs(x, y, kernel_size)
    channels = x.shape[1]
    window = float(kernel_size ** (x.ndim - 2))
    stacked = torch.cat([y, x, y * y, x * x, y * x], dim=1)
    t_sum, p_sum, t2_sum, p2_sum, tp_sum = _window_sums(stacked, kernel_size).split(channels, 1)
    t_avg = t_sum / window
    p_avg = p_sum / window
    cross = tp_sum - p_avg * t_sum
    t_var = torch.clamp(t2_sum - t_avg * t_sum, min=smooth_dr)
    p_var = torch.clamp(p2_sum - p_avg * p_sum, min=smooth_dr)
    return -(cross * cross) / (t_var * p_var)


def local_ncc_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel_size: int = 9,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Negative local *squared* normalised cross-correlation; equals MONAI
    ``LocalNormalizedCrossCorrelationLoss(spatial_dims, kernel_size)`` (see :func:`local_ncc_map`).

    Windows are ``kernel_size``^d pixels (rectangular, zero-padded at the border). Per pixel
    the value is −NCC² in [−1, 0]: −1 for locally affinely related intensities (any sign of
    the slope), 0 where either window is flat (variance below 1e-5) or uncorrelated. The loss
    is minimised and symmetric in (x, y). ``weight`` multiplies the per-pixel map (e.g. 1 − m
    for cost-function masking); ``reduction="none"`` returns the ``(B, C, *spatial)`` map.
    """
    values = local_ncc_map(x, y, kernel_size)
    if weight is not None:
        values = values * weight
    return _reduce(values, reduction)


class FixedWindowMoments:
    """The window sums of :func:`masked_local_ncc_map` that depend only on the fixed image y and
    the weight w (Σw, Σwy, Σwy² per window), computed once for an optimisation over x (the
    test-time strategies register x̂ ∘ φ onto a fixed x; the result is the same as recomputing
    them, they are merely not filtered again at every step). Attributes: ``y``, ``w`` and ``wy``
    (expanded like x), ``n`` (Σw clamped at 1e-12), ``t_sum``, ``t2_sum``, ``kernel_size``."""

    def __init__(self, y: torch.Tensor, weight: torch.Tensor, kernel_size: int = 9) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        with torch.no_grad():
            y = y.detach()
            channels = y.shape[1]
            w = weight.detach().to(y.dtype).expand(y.shape[0], 1, *y.shape[2:]).expand_as(y)
            wy = w * y
            n, t_sum, t2_sum = _window_sums(torch.cat([w, wy, wy * y], dim=1), kernel_size).split(channels, 1)
        self.y, self.w, self.wy, self.kernel_size = y, w, wy, kernel_size
        self.n, self.t_sum, self.t2_sum = n.clamp_min(1e-12), t_sum, t2_sum


def masked_local_ncc_map(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, kernel_size: int = 9, smooth_dr: float = 1e-5,
    fixed: FixedWindowMoments | None = None,
) -> torch.Tensor:
    """Per-pixel −NCC² whose window statistics count each pixel with its ``weight``.

    ``weight`` w ∈ [0, 1], broadcastable to ``(B, 1, *spatial)`` (e.g. 1 − m for cost-function
    masking). Every local moment is a w-weighted window sum (means divide by Σw in the window),
    so a pixel with w = 0 contributes nothing to any window: changing x or y there leaves every
    value of the map unchanged (exactly, for finite inputs). With w ≡ 1 the map equals
    :func:`local_ncc_map` wherever the window lies inside the image. Values in [−1, 0].
    ``fixed``: :class:`FixedWindowMoments` of this very (y, weight, kernel_size), reused instead of
    filtering them again (y and weight are then taken from it).
    """
    _check_ncc_inputs(x, y, kernel_size)
    channels = x.shape[1]
    if fixed is not None:
        if fixed.kernel_size != kernel_size or fixed.y.shape != x.shape:
            raise ValueError("fixed window moments of another kernel size or shape")
        w, wy, n, t_sum, t2_sum = fixed.w, fixed.wy, fixed.n, fixed.t_sum, fixed.t2_sum
        wx = w * x
        p_sum, p2_sum, tp_sum = _window_sums(torch.cat([wx, wx * x, wy * x], dim=1), kernel_size).split(channels, 1)
    else:
        w = weight.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:]).expand_as(x)
        wx, wy = w * x, w * y
        stacked = torch.cat([w, wy, wx, wy * y, wx * x, wy * x], dim=1)
        n, t_sum, p_sum, t2_sum, p2_sum, tp_sum = _window_sums(stacked, kernel_size).split(channels, 1)
        n = n.clamp_min(1e-12)
    t_avg, p_avg = t_sum / n, p_sum / n
    cross = tp_sum - p_avg * t_sum
    t_var = torch.clamp(t2_sum - t_avg * t_sum, min=smooth_dr)
    p_var = torch.clamp(p2_sum - p_avg * p_sum, min=smooth_dr)
    return -(cross * cross) / (t_var * p_var)


def masked_local_ncc_loss(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, kernel_size: int = 9,
    fixed: FixedWindowMoments | None = None,
) -> torch.Tensor:
    """Cost-function-masked local NCC loss: per sample Σ_p w(p)·(−NCC²(p)) / Σ_p w(p) with the
    window statistics of :func:`masked_local_ncc_map`, then the mean over the batch.

    Pixels with w = 0 are excluded from both the windows and the average, so the loss does not
    depend on their intensities at all (the test changes them and compares to float precision).
    A sample whose weights are all 0 contributes 0. Scalar in [−1, 0]. ``fixed``: see
    :func:`masked_local_ncc_map`.
    """
    values = masked_local_ncc_map(x, y, weight, kernel_size, fixed=fixed)
    w = weight.to(values.dtype).expand(x.shape[0], 1, *x.shape[2:]).expand_as(values)
    per_sample = (w * values).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)
    return per_sample.mean()


def velocity_smoothness(
    field: torch.Tensor, weight: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Mean squared Frobenius norm of the spatial Jacobian, ‖∇v‖² = Σ_k Σ_j (∂_j v_k)², per pixel.

    ``field``: ``(B, D, *spatial)`` in pixels; forward differences with a 1-pixel spacing, each
    axis averaged over the pixels where its difference exists (so a linear field v_k = Σ_j
    a_kj p_j gives exactly Σ a_kj²). For smooth fields this equals D × MONAI ``DiffusionLoss``
    (which uses central differences and averages over channels); forward differences also
    penalise checkerboard patterns that central differences miss. ``weight`` (broadcastable
    to ``(B, 1, *spatial)``) gives a per-pixel λ(x), sampled at the difference's first pixel.
    ``reduction`` "mean" (default) or "sum" over the pixels of each axis, summed over axes.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    total = field.new_zeros(())
    for axis in range(2, field.ndim):
        squared = torch.diff(field, dim=axis).pow(2).sum(dim=1, keepdim=True)
        if weight is not None:
            squared = squared * weight.narrow(axis, 0, field.shape[axis] - 1)
        total = total + _reduce(squared, reduction)
    return total


def displacement_consistency(displacement: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean over batch and pixels of ‖d − d'‖² (summed over the D components), pixels².

    Both ``(B, D, *spatial)`` in pixels; the gradient reaches both. Field-consistency training
    ties the field the network gives a slice with synthetic anomalies to the field it gives the
    clean slice (``train.field_consistency_weight``), both trained.
    """
    if displacement.shape != other.shape:
        raise ValueError(f"displacement {tuple(displacement.shape)} and {tuple(other.shape)} differ in shape")
    return (displacement - other).pow(2).sum(dim=1).mean()


def _second_derivative(field: torch.Tensor, axis_1: int, axis_2: int) -> torch.Tensor:
    """Compact central second difference along spatial axes (tensor dims) ``axis_1``, ``axis_2``,
    on the interior (every spatial axis cropped by one pixel), 1-pixel spacing."""
    def crop(tensor: torch.Tensor, shifts: dict[int, int]) -> torch.Tensor:
        for axis in range(2, field.ndim):
            start = 1 + shifts.get(axis, 0)
            tensor = tensor.narrow(axis, start, field.shape[axis] - 2)
        return tensor

    if axis_1 == axis_2:
        return crop(field, {axis_1: 1}) - 2 * crop(field, {}) + crop(field, {axis_1: -1})
    return (
        crop(field, {axis_1: 1, axis_2: 1})
        - crop(field, {axis_1: 1, axis_2: -1})
        - crop(field, {axis_1: -1, axis_2: 1})
        + crop(field, {axis_1: -1, axis_2: -1})
    ) / 4.0


def bending_energy(field: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Bending energy of a ``(B, D, *spatial)`` field in pixels; equals MONAI ``BendingEnergyLoss()``.

    Mean over batch, channels and interior pixels of Σ_j (∂²_jj v)² + 2 Σ_{j<l} (∂²_jl v)²
    with MONAI's compact central stencils ([1, −2, 1] and the 4-point mixed stencil); every
    spatial size must be > 2. ``weight`` (broadcastable to ``(B, 1, *spatial)``) gives a
    per-pixel λ(x), cropped to the interior like the energy.
    """
    if min(field.shape[2:]) <= 2:
        raise ValueError(f"every spatial size must be > 2, got {tuple(field.shape[2:])}")
    axes = range(2, field.ndim)
    energy = sum(_second_derivative(field, axis, axis).pow(2) for axis in axes)
    for axis_1 in axes:
        for axis_2 in range(axis_1 + 1, field.ndim):
            energy = energy + 2 * _second_derivative(field, axis_1, axis_2).pow(2)
    if weight is not None:
        interior = weight
        for axis in axes:
            interior = interior.narrow(axis, 1, field.shape[axis] - 2)
        energy = energy * interior
    return energy.mean()


def gaussian_nll(
    x: torch.Tensor,
    mean: torch.Tensor,
    log_variance: torch.Tensor,
    full: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Heteroscedastic Gaussian negative log-likelihood ½ (log σ² + (x − mean)² / σ²) per pixel.

    ``log_variance`` is the natural log of the intensity variance, same shape as ``x``.
    ``full`` adds the constant ½ log 2π. ``reduction``: "mean" | "sum" | "none".
    """
    nll = 0.5 * (log_variance + (x - mean).pow(2) * torch.exp(-log_variance))
    if full:
        nll = nll + 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=nll.dtype, device=nll.device))
    return _reduce(nll, reduction)


def beta_schedule(
    epoch: int | float,
    warmup_epochs: int | float,
    ramp_epochs: int | float,
    beta_start: float,
    beta_end: float,
) -> float | None:
    """Weight β of the deformation smoothness term at ``epoch`` (0-based).

    Returns None while ``epoch < warmup_epochs``: the registration terms (NCC and smoothness)
    are switched off entirely during the warm-up. From ``warmup_epochs`` β ramps linearly from
    ``beta_start`` (at ``warmup_epochs``) to ``beta_end`` (at ``warmup_epochs + ramp_epochs``)
    and stays there; ``ramp_epochs == 0`` jumps straight to ``beta_end``. The published
    MorphAEus setting ramps 1e-3 -> 3 over 200 epochs.
    """
    if warmup_epochs < 0 or ramp_epochs < 0:
        raise ValueError(f"warmup_epochs and ramp_epochs must be >= 0, got {warmup_epochs}, {ramp_epochs}")
    if epoch < warmup_epochs:
        return None
    if ramp_epochs == 0:
        return float(beta_end)
    progress = min(1.0, (epoch - warmup_epochs) / ramp_epochs)
    return float(beta_start + (beta_end - beta_start) * progress)
