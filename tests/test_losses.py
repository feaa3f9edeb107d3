"""Loss functions: closed forms, MONAI equivalence, signs and schedules."""
from __future__ import annotations

import math

import pytest
import torch
from monai.losses import BendingEnergyLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss, SSIMLoss

from anomorph.losses import (
    beta_schedule,
    bending_energy,
    gaussian_nll,
    kl_divergence,
    local_ncc_loss,
    reconstruction_loss,
    ssim_loss,
    ssim_map,
    velocity_smoothness,
)

# MONAI's DiffusionLoss / BendingEnergyLoss (used here only as references) index with lists
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")


def textured(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator)


def grid(size, dims=2):
    return torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * dims, indexing="ij"))


# ---------------------------------------------------------------- SSIM / reconstruction


@pytest.mark.parametrize("shape", [(3, 1, 48, 48), (2, 2, 24, 32), (2, 1, 14, 14, 14)])
def test_ssim_loss_equals_monai(shape):
    x = textured(shape)
    y = (x + 0.2 * textured(shape, seed=1) - 0.1).clamp(0, 1)
    expected = SSIMLoss(spatial_dims=len(shape) - 2, data_range=1.0)(y, x)
    assert torch.allclose(ssim_loss(y, x), expected, atol=1e-5)


def test_ssim_of_identical_images_is_one_and_gradients_flow():
    x = textured((2, 1, 32, 32))
    assert ssim_loss(x, x).abs() < 1e-6
    assert ssim_map(x, x).shape == (2, 1, 22, 22)
    prediction = (0.5 * x).requires_grad_()
    ssim_loss(prediction, x).backward()
    assert torch.count_nonzero(prediction.grad) > 0


def test_reconstruction_loss_is_mse_plus_weighted_ssim():
    x = textured((2, 1, 32, 32))
    x_hat = (x + 0.1).clamp(0, 1)
    mse = torch.mean((x - x_hat) ** 2)
    assert torch.allclose(reconstruction_loss(x, x_hat, 0.0), mse)
    assert torch.allclose(reconstruction_loss(x, x_hat, 0.5), mse + 0.5 * ssim_loss(x_hat, x), atol=1e-6)


# ---------------------------------------------------------------- KL and Gaussian NLL


def test_kl_divergence_closed_form():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # per sample 0.5 * sum(var + mu^2 - 1 - log var): row 0 = 0.5 * (1 + 1 - log 2), row 1 = 0
    expected_row0 = 1.0 - 0.5 * math.log(2.0)
    per_sample = kl_divergence(mu, logvar, reduction="none")
    assert torch.allclose(per_sample, torch.tensor([expected_row0, 0.0]))
    assert math.isclose(float(kl_divergence(mu, logvar)), expected_row0 / 2, rel_tol=1e-6)
    assert math.isclose(float(kl_divergence(mu, logvar, reduction="sum")), expected_row0, rel_tol=1e-6)
    assert math.isclose(float(kl_divergence(mu, logvar, reduction="mean")), expected_row0 / 4, rel_tol=1e-6)


def test_gaussian_nll_known_values():
    x = torch.tensor([1.0, 0.0])
    mean = torch.tensor([0.0, 0.0])
    log_variance = torch.tensor([0.0, math.log(4.0)])
    # 0.5 * (0 + 1) = 0.5 and 0.5 * (log 4 + 0) = log 2
    per_pixel = gaussian_nll(x, mean, log_variance, reduction="none")
    assert torch.allclose(per_pixel, torch.tensor([0.5, math.log(2.0)]))
    full = gaussian_nll(x, mean, log_variance, full=True, reduction="sum")
    assert math.isclose(float(full), 0.5 + math.log(2.0) + math.log(2 * math.pi), rel_tol=1e-6)
    # unit variance: the NLL is half the MSE
    y = textured((2, 1, 8, 8))
    assert torch.allclose(gaussian_nll(y, 0.5 * y, torch.zeros_like(y)), 0.5 * torch.mean((0.5 * y) ** 2))


# ---------------------------------------------------------------- local NCC


def test_local_ncc_of_an_image_with_itself_is_minus_one():
    x = textured((2, 1, 32, 32))
    assert math.isclose(float(local_ncc_loss(x, x)), -1.0, abs_tol=1e-5)


@pytest.mark.parametrize("scale, offset", [(2.5, 0.3), (0.4, -0.1), (-1.5, 1.0)])
def test_local_ncc_is_invariant_to_affine_intensity_changes(scale, offset):
    x = textured((2, 1, 32, 32))
    per_pixel = local_ncc_loss(x, scale * x + offset, reduction="none")
    # zero padding of the 9x9 windows breaks the invariance within 4 pixels of the border
    interior = per_pixel[..., 4:-4, 4:-4]
    assert torch.allclose(interior, torch.full_like(interior, -1.0), atol=1e-4)


def test_local_ncc_matches_monai_and_is_near_zero_for_independent_noise():
    x, y = textured((2, 1, 32, 32)), textured((2, 1, 32, 32), seed=3)
    expected = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=9)(x, y)
    assert torch.allclose(local_ncc_loss(x, y), expected, atol=1e-6)
    # independent noise: E[NCC²] ≈ 1 / 80 for 81-pixel windows (away from the zero-padded border)
    interior = local_ncc_loss(x, y, reduction="none")[..., 4:-4, 4:-4]
    assert -0.05 < float(interior.mean()) <= 0.0
    x3, y3 = textured((1, 1, 12, 12, 12)), textured((1, 1, 12, 12, 12), seed=4)
    expected3 = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=5)(x3, y3)
    assert torch.allclose(local_ncc_loss(x3, y3, kernel_size=5), expected3, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 5, 40, 36), (2, 3, 10, 12, 14)])
def test_window_sums_in_the_fast_layout_equal_nchw_values_and_gradients(shape):
    """The CPU speed path (channels-last depthwise filtering, zero padding inside the
    convolutions) must not change a value or a gradient beyond float rounding: compared with
    MONAI's separable filtering (explicit padded copies) of the same tensor kept NCHW."""
    from monai.networks.layers import separable_filtering

    from anomorph.losses import _depthwise_layout, _gaussian_window, _separable_valid_filter, _window_sums

    stacked = textured(shape)
    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    assert _depthwise_layout(stacked).is_contiguous(memory_format=layout)
    kernel = [torch.ones(5)] * (len(shape) - 2)
    fast_input, slow_input = stacked.clone().requires_grad_(True), stacked.clone().requires_grad_(True)
    fast, slow = _window_sums(fast_input, 5), separable_filtering(slow_input, kernel)
    assert torch.allclose(fast, slow, atol=1e-6, rtol=1e-6)  # sums up to ~75: float rounding
    weights = textured(shape, seed=1)
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    assert torch.allclose(fast_input.grad, slow_input.grad, atol=1e-4, rtol=1e-6)  # grads up to ~100
    taps = _gaussian_window(5, 1.5, torch.float32, torch.device("cpu"))
    valid = _separable_valid_filter(stacked, taps)
    reference = stacked
    for axis in range(len(shape) - 2):  # the plain NCHW definition of a 'valid' separable filter
        view = [1] * (len(shape) - 2)
        view[axis] = 5
        reference = reference.unfold(2 + axis, 5, 1).mul(taps.view(*view[axis:axis + 1])).sum(-1)
    assert torch.allclose(valid, reference, atol=1e-5, rtol=0)


def test_local_ncc_weight_masks_pixels():
    x = textured((1, 1, 32, 32))
    weight = torch.zeros(1, 1, 32, 32)
    weight[..., :16, :] = 1.0
    assert math.isclose(float(local_ncc_loss(x, x, weight=weight)), -0.5, abs_tol=1e-5)
    assert float(local_ncc_loss(torch.zeros(1, 1, 16, 16), x[..., :16, :16])) == 0.0


# ---------------------------------------------------------------- smoothness and bending


def test_velocity_smoothness_of_a_linear_field_is_analytic():
    a, b, c, d = 0.5, -1.0, 2.0, 0.25
    rows, cols = grid(16)
    field = torch.stack([a * rows + b * cols, c * rows + d * cols]).unsqueeze(0)
    expected = a**2 + b**2 + c**2 + d**2
    assert math.isclose(float(velocity_smoothness(field)), expected, rel_tol=1e-5)
    # MONAI's DiffusionLoss averages over the D channels instead of summing
    assert math.isclose(float(velocity_smoothness(field)), 2 * float(DiffusionLoss()(field)), rel_tol=1e-5)
    assert float(velocity_smoothness(torch.full((1, 2, 8, 8), 3.0))) == 0.0


def test_velocity_smoothness_weights():
    torch.manual_seed(0)
    field = torch.randn(2, 2, 16, 16)
    plain = velocity_smoothness(field)
    assert torch.allclose(velocity_smoothness(field, weight=torch.ones(2, 1, 16, 16)), plain)
    assert torch.allclose(velocity_smoothness(field, weight=torch.full((2, 1, 16, 16), 3.0)), 3 * plain)
    assert float(velocity_smoothness(field, weight=torch.zeros(2, 1, 16, 16))) == 0.0


def test_velocity_smoothness_3d_linear_field():
    field = 0.5 * grid(8, dims=3).unsqueeze(0)  # d_k = 0.5 p_k: three unit-diagonal terms
    assert math.isclose(float(velocity_smoothness(field)), 3 * 0.25, rel_tol=1e-5)


def test_bending_energy_matches_monai_and_closed_forms():
    rows, cols = grid(16)
    linear = torch.stack([0.3 * rows - cols, 2 * cols]).unsqueeze(0)
    assert float(bending_energy(linear)) < 1e-8
    quadratic = torch.stack([0.5 * rows**2, torch.zeros_like(rows)]).unsqueeze(0)
    # d2/di2 of 0.5 i^2 = 1 in channel 0 only; the mean over the two channels is 0.5
    assert math.isclose(float(bending_energy(quadratic)), 0.5, rel_tol=1e-5)
    torch.manual_seed(0)
    field = torch.randn(2, 2, 12, 12)
    assert torch.allclose(bending_energy(field), BendingEnergyLoss()(field))
    doubled = bending_energy(field, weight=torch.full((2, 1, 12, 12), 2.0))
    assert torch.allclose(doubled, 2 * BendingEnergyLoss()(field))
    field3 = torch.randn(1, 3, 6, 7, 8)
    assert torch.allclose(bending_energy(field3), BendingEnergyLoss()(field3))


# ---------------------------------------------------------------- beta schedule


def test_beta_schedule_values():
    kwargs = dict(warmup_epochs=10, ramp_epochs=20, beta_start=1e-3, beta_end=3.0)
    assert beta_schedule(0, **kwargs) is None
    assert beta_schedule(9, **kwargs) is None
    assert beta_schedule(10, **kwargs) == pytest.approx(1e-3)
    assert beta_schedule(20, **kwargs) == pytest.approx(1e-3 + 0.5 * (3.0 - 1e-3))
    assert beta_schedule(30, **kwargs) == pytest.approx(3.0)
    assert beta_schedule(500, **kwargs) == pytest.approx(3.0)
    assert beta_schedule(0, 0, 0, 1e-3, 3.0) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        beta_schedule(0, -1, 10, 0.0, 1.0)


def test_masked_local_ncc_excludes_masked_pixels_from_every_window():
    from anomorph.losses import local_ncc_map, masked_local_ncc_loss, masked_local_ncc_map

    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(2, 1, 24, 24, generator=g), torch.rand(2, 1, 24, 24, generator=g)
    ones = torch.ones(2, 1, 24, 24)
    # w ≡ 1: the plain local NCC wherever the 9×9 window lies inside the image
    assert torch.allclose(masked_local_ncc_map(x, y, ones)[..., 4:-4, 4:-4], local_ncc_map(x, y)[..., 4:-4, 4:-4],
                          atol=1e-5)
    keep = ones.clone()
    keep[:, :, 6:14, 8:16] = 0
    x2, y2 = x.clone(), y.clone()
    x2[keep == 0] = 5.0
    y2[keep == 0] = -3.0
    assert torch.equal(masked_local_ncc_map(x, y, keep) * keep, masked_local_ncc_map(x2, y2, keep) * keep)
    assert float(masked_local_ncc_loss(x, y, keep)) == pytest.approx(float(masked_local_ncc_loss(x2, y2, keep)), abs=1e-7)
    # a brute-force weighted NCC at one pixel whose window straddles the mask
    r, c = 10, 18
    wx = x[0, 0, r - 4:r + 5, c - 4:c + 5]
    wy = y[0, 0, r - 4:r + 5, c - 4:c + 5]
    ww = keep[0, 0, r - 4:r + 5, c - 4:c + 5]
    n = ww.sum()
    mx, my = (ww * wx).sum() / n, (ww * wy).sum() / n
    cross = (ww * (wx - mx) * (wy - my)).sum()
    expected = -(cross ** 2) / ((ww * (wx - mx) ** 2).sum() * (ww * (wy - my) ** 2).sum())
    assert float(masked_local_ncc_map(y, x, keep)[0, 0, r, c]) == pytest.approx(float(expected), rel=1e-4)
