"""Networks: shapes, warping conventions, integration, Jacobian, gradients, MC dropout, factory."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from anomorph.networks import (
    AutoEncoder,
    ModelOutput,
    MorphAEus,
    VariationalAutoEncoder,
    VelocityIntegrator,
    build_network,
    disable_mc_dropout,
    enable_mc_dropout,
    integrate_velocity,
    jacobian_determinant,
    warp,
)
from anomorph.config import load_config
from anomorph.networks.blocks import resize_to
from anomorph.networks.deformation import VelocityHead, folding_mask, one_sided_jacobian_determinants
from anomorph.runs import network_options

SMALL = dict(channels=(8, 16, 16), strides=(2, 2, 2), latent_dim=16)


def smooth_image(batch: int = 2, size: int = 32, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A smooth, non-symmetric test image in [0, 1], (B, 1, size, size)."""
    rows = torch.arange(size, dtype=dtype).view(-1, 1)
    cols = torch.arange(size, dtype=dtype).view(1, -1)
    image = 0.5 + 0.25 * torch.sin(rows / 3.0) * torch.cos(cols / 5.0) + 0.2 * torch.sin((rows + 2 * cols) / 7.0)
    scales = torch.linspace(0.8, 1.0, batch, dtype=dtype).view(-1, 1, 1, 1)
    return image.expand(batch, 1, size, size) * scales


def linear_field(a: float, b: float, c: float, d: float, size: int = 16, dtype=torch.float32) -> torch.Tensor:
    """d_0 = a·i + b·j, d_1 = c·i + d·j in pixels, (1, 2, size, size)."""
    rows = torch.arange(size, dtype=dtype).view(-1, 1).expand(size, size)
    cols = torch.arange(size, dtype=dtype).view(1, -1).expand(size, size)
    return torch.stack([a * rows + b * cols, c * rows + d * cols]).unsqueeze(0)


# ---------------------------------------------------------------- integration and warping


def test_zero_velocity_gives_identity_warp():
    image = smooth_image()
    displacement = integrate_velocity(torch.zeros(2, 2, 32, 32), steps=7)
    assert torch.count_nonzero(displacement) == 0
    assert torch.allclose(warp(image, displacement), image, atol=1e-6, rtol=0)


@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
def test_constant_velocity_integrates_to_the_same_translation(padding_mode):
    shift = torch.tensor([2.0, -3.0]).view(1, 2, 1, 1)
    velocity = shift.expand(2, 2, 32, 32).clone()
    displacement = integrate_velocity(velocity, steps=7, padding_mode=padding_mode)
    # zero padding pulls the displacement towards 0 within about |c| + 3 pixels of the edge
    interior = displacement[..., 8:-8, 8:-8]
    assert torch.allclose(interior, shift.expand_as(interior), atol=1e-5, rtol=0)
    if padding_mode == "border":  # the border extrapolation keeps a constant field exact everywhere
        assert torch.allclose(displacement, velocity, atol=1e-5, rtol=0)


def test_integer_translation_warp_matches_roll_in_the_interior():
    image = smooth_image()
    displacement = torch.tensor([2.0, -3.0]).view(1, 2, 1, 1).expand(2, 2, 32, 32)
    warped = warp(image, displacement)
    # warped(i, j) = image(i + 2, j - 3): channel 0 moves along rows, channel 1 along columns
    expected = torch.roll(image, shifts=(-2, 3), dims=(2, 3))
    assert torch.allclose(warped[..., 3:-3, 3:-3], expected[..., 3:-3, 3:-3], atol=1e-5, rtol=0)


def test_subpixel_warp_interpolates_linearly():
    rows = torch.arange(16.0).view(1, 1, -1, 1).expand(1, 1, 16, 16)
    displacement = torch.zeros(1, 2, 16, 16)
    displacement[:, 0] = 0.25
    warped = warp(rows, displacement)
    assert torch.allclose(warped[..., :-1, :], rows[..., :-1, :] + 0.25, atol=1e-5)


def test_warping_preserves_a_constant_image():
    torch.manual_seed(0)
    image = torch.full((2, 1, 24, 24), 0.7)
    displacement = 3 * torch.randn(2, 2, 24, 24)
    assert torch.allclose(warp(image, displacement), image, atol=1e-6, rtol=0)
    velocity = torch.nn.functional.avg_pool2d(3 * torch.randn(2, 2, 24, 24), 5, stride=1, padding=2)
    assert torch.allclose(warp(image, integrate_velocity(velocity)), image, atol=1e-6, rtol=0)


def test_integrate_and_warp_gradcheck_in_double_precision():
    torch.manual_seed(1)
    signs = torch.where(torch.rand(1, 2, 5, 5) > 0.5, 1.0, -1.0)
    velocity = (signs * (0.3 + 0.5 * torch.rand(1, 2, 5, 5))).double().requires_grad_()
    image = torch.rand(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)

    def integrate_then_warp(v, img):
        return warp(img, integrate_velocity(v, steps=3))

    assert torch.autograd.gradcheck(integrate_then_warp, (velocity, image), eps=1e-6, atol=1e-4)


def test_integrator_follows_dtype_and_batch_changes():
    integrator = VelocityIntegrator(num_steps=4)
    float_out = integrator(torch.ones(2, 2, 8, 8))
    double_out = integrator(torch.ones(3, 2, 8, 8, dtype=torch.float64))
    assert float_out.dtype == torch.float32 and double_out.dtype == torch.float64
    assert torch.allclose(double_out, torch.ones_like(double_out))


@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
def test_integrator_in_grid_sample_frame_equals_monai_dvf2ddf(padding_mode):
    """VelocityIntegrator.forward integrates in grid_sample's normalised frame (issue 15): the
    same map as MONAI's DVF2DDF recursion in pixels (float64: to 1e-9, values and gradients),
    2-d and 3-d, non-square; float32 differs by rounding only."""
    from monai.networks.blocks import DVF2DDF

    g = torch.Generator().manual_seed(11)
    for shape in [(3, 2, 17, 33), (2, 3, 8, 9, 10)]:
        velocity = 2.5 * torch.randn(shape, generator=g, dtype=torch.float64)
        integrator = VelocityIntegrator(num_steps=5, padding_mode=padding_mode)
        ours_input, theirs_input = velocity.clone().requires_grad_(True), velocity.clone().requires_grad_(True)
        ours, theirs = integrator(ours_input), DVF2DDF.forward(integrator, theirs_input)
        assert ours.shape == theirs.shape and ours.is_contiguous()
        assert float((ours - theirs).detach().abs().max()) <= 1e-9
        assert float((ours.detach() - velocity).abs().max()) > 0.1  # the composition did something
        weights = torch.rand(shape, generator=g, dtype=torch.float64)
        (ours * weights).sum().backward()
        (theirs * weights).sum().backward()
        assert float((ours_input.grad - theirs_input.grad).abs().max()) <= 1e-9
        single = integrator(velocity.float())
        assert float((single.double() - theirs.detach()).abs().max()) <= 2e-3  # pixels


def test_zero_integration_steps_use_the_velocity_as_displacement():
    velocity = torch.randn(1, 2, 8, 8)
    assert torch.equal(VelocityIntegrator(num_steps=0)(velocity), velocity)


# ---------------------------------------------------------------- Jacobian determinant


def test_jacobian_of_identity_is_one():
    det = jacobian_determinant(torch.zeros(2, 2, 16, 16))
    assert det.shape == (2, 1, 16, 16)
    assert torch.allclose(det, torch.ones_like(det))


def test_jacobian_of_linear_fields_is_analytic():
    scaling = jacobian_determinant(linear_field(0.5, 0.0, 0.0, 0.5))
    assert torch.allclose(scaling, torch.full_like(scaling, 1.5**2), atol=1e-5)
    anisotropic = jacobian_determinant(linear_field(-0.25, 0.0, 0.0, 1.0))
    assert torch.allclose(anisotropic, torch.full_like(anisotropic, 0.75 * 2.0), atol=1e-5)
    # general affine: J = [[1 + a, b], [c, 1 + d]]
    a, b, c, d = 0.1, 0.3, -0.2, 0.4
    general = jacobian_determinant(linear_field(a, b, c, d))
    assert torch.allclose(general, torch.full_like(general, (1 + a) * (1 + d) - b * c), atol=1e-5)
    folding = jacobian_determinant(linear_field(-2.0, 0.0, 0.0, 0.0))
    assert (folding < 0).all()


def test_jacobian_of_3d_scaling():
    size = 6
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    det = jacobian_determinant(0.2 * grid.unsqueeze(0))
    assert det.shape == (1, 1, size, size, size)
    assert torch.allclose(det, torch.full_like(det, 1.2**3), atol=1e-5)


def brute_force_one_sided_determinants(displacement: np.ndarray) -> np.ndarray:
    """Reference loop: per pixel and per forward/backward choice c (bit j = backward along axis
    j), det(I + [d(hi_j) − d(lo_j)]_j), the difference that exists at the border."""
    batch, dims = displacement.shape[:2]
    spatial = displacement.shape[2:]
    out = np.empty((batch, 2**dims, *spatial))
    for b in range(batch):
        for index in np.ndindex(*spatial):
            for combination in range(2**dims):
                jacobian = np.eye(dims)
                for j in range(dims):
                    backward = (combination >> j) & 1
                    if index[j] == 0:
                        backward = 0
                    elif index[j] == spatial[j] - 1:
                        backward = 1
                    low, high = list(index), list(index)
                    if backward:
                        low[j] -= 1
                    else:
                        high[j] += 1
                    jacobian[:, j] += displacement[(b, slice(None), *high)] - displacement[(b, slice(None), *low)]
                out[(b, combination, *index)] = np.linalg.det(jacobian)
    return out


@pytest.mark.parametrize("spatial", [(7, 6), (5, 4, 6)])
def test_one_sided_determinants_match_a_brute_force_loop(spatial):
    generator = torch.Generator().manual_seed(3)
    displacement = 0.6 * torch.randn(2, len(spatial), *spatial, generator=generator, dtype=torch.float64)
    dets = one_sided_jacobian_determinants(displacement)
    assert dets.shape == (2, 2 ** len(spatial), *spatial)
    expected = brute_force_one_sided_determinants(displacement.numpy())
    np.testing.assert_allclose(dets.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(folding_mask(displacement)[:, 0], torch.from_numpy((expected <= 0).any(axis=1)))
    assert 0 < folding_mask(displacement).double().mean() < 1  # this field folds somewhere, not everywhere


@pytest.mark.parametrize("dims", [2, 3])
def test_one_sided_determinants_of_an_affine_field_equal_det_a(dims):
    """d(p) = (A − I) p + t: every one-sided difference is exact, so all 2^D dets = det A > 0."""
    matrix = {2: np.array([[1.1, 0.05], [-0.03, 0.95]]),
              3: np.array([[1.05, 0.02, -0.04], [0.03, 0.9, 0.01], [-0.02, 0.05, 1.1]])}[dims]
    spatial = (8, 7, 6)[:dims]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in spatial], indexing="ij"))
    field = np.einsum("ij,j...->i...", matrix - np.eye(dims), grid) + np.arange(1, dims + 1).reshape(
        -1, *[1] * dims)
    dets = one_sided_jacobian_determinants(torch.from_numpy(field[None]))
    assert torch.allclose(dets, torch.full_like(dets, float(np.linalg.det(matrix))), atol=1e-12)
    assert not folding_mask(torch.from_numpy(field[None])).any()


@pytest.mark.parametrize("spatial", [(8, 5), (6, 5, 4)])
def test_checkerboard_fold_is_seen_by_one_sided_but_not_central_differences(spatial):
    """d_0(i) = 0.75·(−1)^(i+1) along axis 0 (even length): φ_0 = i + d_0 goes −0.75, 1.75, 1.25,
    3.75, 3.25, ... so every interior pixel has a neighbour mapped to the wrong side. The
    central difference is 0 inside (det J = 1) and +1.5 at both borders (det J = 2.5)."""
    dims = len(spatial)
    rows = torch.arange(spatial[0], dtype=torch.float64)
    displacement = torch.zeros(1, dims, *spatial, dtype=torch.float64)
    displacement[:, 0] = (0.75 * (-1.0) ** (rows + 1)).view(-1, *[1] * (dims - 1))
    positions = rows + displacement[0, 0].reshape(spatial[0], -1)[:, 0]
    assert (positions[2:-1:2] < positions[1:-2:2]).all()  # the discrete map reverses order
    central = jacobian_determinant(displacement)
    assert (central > 0).all()
    assert torch.allclose(central[0, 0, 1:-1], torch.ones_like(central[0, 0, 1:-1]))
    folded = folding_mask(displacement)[0, 0]
    expected = torch.zeros(spatial, dtype=torch.bool)
    expected[1:-1] = True  # the two border rows have only their outward-correct difference
    assert torch.equal(folded, expected)
    np.testing.assert_allclose(one_sided_jacobian_determinants(displacement).numpy(),
                               brute_force_one_sided_determinants(displacement.numpy()), atol=1e-12)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("name", ["ae", "vae", "morphaeus"])
def test_output_shapes(name, size):
    torch.manual_seed(0)
    model = build_network({"name": name, "image_size": size, "channels": [8, 16, 32, 32], "latent_dim": 32})
    x = torch.rand(2, 1, size, size)
    out = model(x)
    assert isinstance(out, ModelOutput)
    assert out.reconstruction.shape == x.shape and out.warped.shape == x.shape
    assert out.latent.shape == (2, 32)
    assert ((out.reconstruction >= 0) & (out.reconstruction <= 1)).all()
    if name == "morphaeus":
        assert out.velocity.shape == out.displacement.shape == (2, 2, size, size)
    else:
        assert out.velocity is None and out.displacement is None and out.warped is out.reconstruction
    if name == "vae":
        assert out.mu.shape == out.logvar.shape == (2, 32)
    else:
        assert out.mu is None and out.logvar is None
    assert out.log_variance is None


def test_heteroscedastic_log_variance_is_bounded():
    model = AutoEncoder(image_size=32, heteroscedastic=True, log_variance_range=(-6.0, 1.0), **SMALL)
    out = model(torch.rand(2, 1, 32, 32))
    assert out.log_variance.shape == (2, 1, 32, 32)
    assert out.log_variance.min() >= -6.0 and out.log_variance.max() <= 1.0


def test_three_dimensional_models_smoke():
    x = torch.rand(2, 1, 16, 16, 16)
    ae = AutoEncoder(spatial_dims=3, image_size=16, channels=(8, 16), strides=(2, 2), latent_dim=8, norm="instance")
    out = ae(x)
    assert out.reconstruction.shape == x.shape
    assert [tuple(f.shape[2:]) for f in ae.decode(out.latent).features] == [(4, 4, 4), (8, 8, 8)]
    morph = MorphAEus(
        spatial_dims=3, image_size=16, channels=(8, 16), strides=(2, 2), latent_dim=8, head_channels=(8, 8)
    )
    out = morph(x)
    assert out.warped.shape == x.shape and out.displacement.shape == (2, 3, 16, 16, 16)


def test_decoder_feature_shapes_match_the_property():
    model = AutoEncoder(image_size=64, channels=(8, 16, 32), strides=(2, 2, 2), latent_dim=8)
    z, _, _ = model.encode(torch.rand(1, 1, 64, 64))
    features = model.decode(z).features
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, *s) for c, s in zip(model.decoder_feature_channels, model.decoder_feature_shapes)
    ]
    assert model.decoder_feature_shapes == ((8, 8), (16, 16), (32, 32))


@pytest.mark.parametrize("norm", ["batch", "instance", "group", None])
@pytest.mark.parametrize("act", ["leakyrelu", "relu", "silu", "gelu"])
def test_norm_and_activation_options(norm, act):
    model = AutoEncoder(image_size=32, norm=norm, act=act, **SMALL)
    assert model(torch.rand(2, 1, 32, 32)).reconstruction.shape == (2, 1, 32, 32)


def test_wrong_input_shape_is_a_clear_error():
    model = AutoEncoder(image_size=32, **SMALL)
    with pytest.raises(ValueError, match=r"expected input \(B, 1, 32, 32\)"):
        model(torch.rand(2, 1, 64, 64))


def test_image_size_must_be_divisible_by_total_stride():
    with pytest.raises(ValueError, match="divisible"):
        AutoEncoder(image_size=36, **SMALL)


# ---------------------------------------------------------------- deformable AE behaviour


def test_morphaeus_starts_near_identity():
    torch.manual_seed(0)
    model = MorphAEus(image_size=32, **SMALL)
    out = model(torch.rand(2, 1, 32, 32))
    assert out.displacement.abs().max() < 1e-2
    assert torch.allclose(out.warped, out.reconstruction, atol=1e-3)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_warp_by_velocity_equals_warp_of_the_integrated_displacement(spatial_dims):
    """MorphAEus.warp_by_velocity (the test-time loop's fused path, issue 15) is
    warp(image, integrate(v)): float64 to 1e-9 in values and gradients, non-square grids, the
    warper's zero padding and the integrator's border padding kept apart."""
    size = (16, 24) if spatial_dims == 2 else (8, 16, 24)
    model = MorphAEus(image_size=size, spatial_dims=spatial_dims, integration_steps=5,
                      warp_padding="zeros", **SMALL).double()
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 1, *size, generator=g, dtype=torch.float64)
    velocity = 3.0 * torch.randn(2, spatial_dims, *size, generator=g, dtype=torch.float64)
    fused_v, plain_v = velocity.clone().requires_grad_(True), velocity.clone().requires_grad_(True)
    fused, plain = model.warp_by_velocity(image, fused_v), model.warp(image, model.integrate(plain_v))
    assert float((fused - plain).detach().abs().max()) <= 1e-9
    assert float((plain.detach() - image).abs().max()) > 0.1  # the warp moved something
    weights = torch.rand(plain.shape, generator=g, dtype=torch.float64)
    (fused * weights).sum().backward()
    (plain * weights).sum().backward()
    assert float((fused_v.grad - plain_v.grad).abs().max()) <= 1e-9 and float(plain_v.grad.abs().max()) > 1e-3


def test_zero_velocity_gate_returns_the_prior_unchanged():
    torch.manual_seed(0)
    model = MorphAEus(image_size=32, **SMALL)
    x = torch.rand(2, 1, 32, 32)
    out = model(x, velocity_gate=torch.zeros(2, 1, 32, 32))
    assert torch.count_nonzero(out.velocity) == 0 and torch.count_nonzero(out.displacement) == 0
    assert torch.allclose(out.warped, out.reconstruction, atol=1e-6, rtol=0)


def test_velocity_gate_multiplies_velocity_and_max_displacement_bounds_it():
    torch.manual_seed(0)
    model = MorphAEus(image_size=32, max_displacement=2.0, **SMALL)
    torch.nn.init.constant_(model.velocity_head.velocity.bias, 50.0)
    x = torch.rand(2, 1, 32, 32)
    model.eval()
    free = model(x)
    assert free.velocity.abs().max() <= 2.0 + 1e-6 and free.velocity.abs().max() > 1.9
    gate = torch.zeros(2, 1, 32, 32)
    gate[..., :16, :] = 1.0
    gated = model(x, velocity_gate=gate)
    assert torch.allclose(gated.velocity, free.velocity * gate)


def test_guidance_channel_is_used_and_validated():
    torch.manual_seed(0)
    model = MorphAEus(image_size=32, guidance_channels=1, **SMALL)
    torch.nn.init.normal_(model.velocity_head.velocity.weight, std=0.1)
    model.eval()
    x = torch.rand(2, 1, 32, 32)
    without = model(x)
    zeros = model(x, guidance=torch.zeros(2, 1, 32, 32))
    ones = model(x, guidance=torch.ones(2, 1, 32, 32))
    assert torch.equal(without.velocity, zeros.velocity)
    assert not torch.allclose(ones.velocity, zeros.velocity)
    with pytest.raises(ValueError, match="guidance"):
        model(x, guidance=torch.ones(2, 2, 32, 32))
    with pytest.raises(ValueError, match="guidance_channels=0"):
        MorphAEus(image_size=32, **SMALL)(x, guidance=torch.ones(2, 1, 32, 32))


@pytest.mark.parametrize("head_inputs", ["pair", "features", "both"])
def test_head_input_modes(head_inputs):
    model = MorphAEus(image_size=32, head_inputs=head_inputs, head_downsample=0, **SMALL)
    out = model(torch.rand(2, 1, 32, 32))
    assert out.velocity.shape == (2, 2, 32, 32)


def upsampled_range_residual(field: torch.Tensor, coarse_shape: tuple[int, int]) -> torch.Tensor:
    """Relative distance of each channel map of ``field`` (B, C, H, W) from the linear span of
    ``resize_to(g, (H, W))`` over all fields g of ``coarse_shape``: exact least squares on the
    (H·W × h·w) matrix of the resize, built from basis images. 0 = representable."""
    height, width = field.shape[-2:]
    cells = coarse_shape[0] * coarse_shape[1]
    basis = torch.eye(cells, dtype=torch.float64).view(cells, 1, *coarse_shape)
    resize = resize_to(basis, (height, width)).reshape(cells, height * width).T
    target = field.detach().double().reshape(-1, height * width).T
    residual = target - resize @ torch.linalg.lstsq(resize, target).solution
    return residual.norm(dim=0) / target.norm(dim=0)


def checkerboard(size: int) -> torch.Tensor:
    """(−1)^(i+j), (1, 1, size, size): the finest pattern a field on the pixel grid can carry."""
    index = torch.arange(size)
    return (1.0 - 2.0 * ((index.view(-1, 1) + index.view(1, -1)) % 2)).float().view(1, 1, size, size)


def test_default_velocity_head_is_half_resolution_and_configs_choose_the_head():
    model = MorphAEus(image_size=32, **SMALL)
    assert model.velocity_head.downsample == 1
    torch.nn.init.normal_(model.velocity_head.velocity.weight, std=0.1)
    torch.nn.init.normal_(model.velocity_head.velocity.bias, std=0.1)
    model.eval()
    velocity = model(smooth_image()).velocity
    assert velocity.shape == (2, 2, 32, 32)
    # the default head's v is a 16² field resized to 32²: exactly in the span of such resizes
    assert upsampled_range_residual(velocity, (16, 16)).max() < 1e-4
    for path, size, level in [("configs/morphaeus.yaml", 64, 1), ("configs/morphaeus_128.yaml", 128, 0)]:
        config = load_config(Path(__file__).resolve().parents[1] / path)
        assert config.data.size == size
        assert build_network(network_options(config)).velocity_head.downsample == level


def test_full_resolution_velocity_head_has_detail_the_half_resolution_head_cannot_represent():
    torch.manual_seed(0)
    model = MorphAEus(image_size=32, head_downsample=0, **SMALL)
    torch.nn.init.normal_(model.velocity_head.velocity.weight, std=0.1)
    model.eval()
    velocity = model(smooth_image()).velocity
    assert velocity.shape == (2, 2, 32, 32) and velocity.dtype == torch.float32
    assert upsampled_range_residual(velocity, (16, 16)).min() > 0.05
    # analytic: no 8² field resized to 16² comes close to the pixel checkerboard, so a half-
    # resolution head cannot output it whatever its weights; the full-resolution head can
    # learn it from an input that carries it.
    board = checkerboard(16)
    assert upsampled_range_residual(board, (8, 8)).item() > 0.9
    target = torch.cat([board, torch.zeros_like(board)], dim=1)
    image, prior = (board + 1) / 2, torch.zeros_like(board)
    errors = {}
    for downsample in (0, 1):
        torch.manual_seed(0)
        head = VelocityHead(channels=(8, 8), downsample=downsample)
        optimiser = torch.optim.Adam(head.parameters(), lr=0.01)
        for _ in range(300):
            optimiser.zero_grad()
            loss = (head(image, prior) - target).pow(2).mean()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            errors[downsample] = ((head(image, prior) - target).norm() / target.norm()).item()
    assert errors[0] < 0.1
    assert errors[1] > 0.9


def test_deform_and_integrate_methods_follow_the_warp_convention():
    model = MorphAEus(image_size=32, **SMALL)
    image = smooth_image()
    velocity = torch.tensor([2.0, -3.0]).view(1, 2, 1, 1).expand(2, 2, 32, 32)
    warped, used, displacement = model.deform(image, velocity)
    assert torch.equal(used, velocity)
    assert torch.allclose(displacement, velocity, atol=1e-5)
    expected = torch.roll(image, shifts=(-2, 3), dims=(2, 3))
    assert torch.allclose(warped[..., 3:-3, 3:-3], expected[..., 3:-3, 3:-3], atol=1e-5)


def test_warp_inverse_undoes_the_forward_deformation():
    model = MorphAEus(image_size=32, **SMALL)
    image = smooth_image()
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    velocity = torch.stack([1.5 * torch.sin(cols / 6.0), -1.0 * torch.cos(rows / 5.0)]).expand(2, 2, 32, 32)
    warped, _, displacement = model.deform(image, velocity)
    assert displacement.abs().max() > 0.9
    restored = model.warp_inverse(warped, velocity)
    assert (restored - image)[..., 4:-4, 4:-4].abs().max() < 0.02
    assert (warped - image)[..., 4:-4, 4:-4].abs().max() > 0.1


def test_detach_prior_keeps_registration_gradients_out_of_the_auto_encoder():
    torch.manual_seed(0)
    model = MorphAEus(image_size=32, detach_prior=True, **SMALL)
    x = torch.rand(2, 1, 32, 32)
    out = model(x)
    (out.warped - x).pow(2).mean().backward()
    assert all(p.grad is None for p in model.prior.parameters())
    assert all(p.grad is not None for p in model.velocity_head.parameters())


# ---------------------------------------------------------------- gradients, VAE sampling, MC dropout


@pytest.mark.parametrize(
    "config",
    [
        {"name": "ae", "heteroscedastic": True, "dropout": 0.1},
        {"name": "vae", "heteroscedastic": True},
        {"name": "morphaeus", "heteroscedastic": True, "guidance_channels": 1, "dropout": 0.1},
        {"name": "morphaeus", "variational": True, "head_inputs": "features"},
    ],
)
def test_gradients_reach_every_parameter(config):
    torch.manual_seed(0)
    model = build_network({**config, "image_size": 32, **SMALL})
    x = torch.rand(4, 1, 32, 32)
    kwargs = {"guidance": torch.rand(4, 1, 32, 32)} if config.get("guidance_channels") else {}
    out = model(x, **kwargs)
    loss = (out.warped - x).pow(2).mean() + (out.reconstruction - x).pow(2).mean()
    if out.log_variance is not None:
        loss = loss + out.log_variance.mean()
    if out.mu is not None:
        loss = loss + (out.mu.pow(2) + out.logvar.exp() - out.logvar).mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.count_nonzero(parameter.grad) > 0, name


def test_vae_samples_in_training_and_uses_mu_in_eval():
    torch.manual_seed(0)
    model = VariationalAutoEncoder(image_size=32, **SMALL)
    x = torch.rand(2, 1, 32, 32)
    model.train()
    first, second = model(x), model(x)
    assert not torch.allclose(first.latent, second.latent)
    model.eval()
    out = model(x)
    assert torch.equal(out.latent, out.mu)
    assert torch.equal(model(x).reconstruction, out.reconstruction)


def test_mc_dropout_makes_eval_outputs_stochastic():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    model = MorphAEus(image_size=32, dropout=0.2, **SMALL).eval()
    assert torch.equal(model(x).reconstruction, model(x).reconstruction)
    enabled = enable_mc_dropout(model)
    assert enabled > 0
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(model(x).reconstruction, model(x).reconstruction)
    assert disable_mc_dropout(model) == enabled
    assert torch.equal(model(x).reconstruction, model(x).reconstruction)

    no_dropout = MorphAEus(image_size=32, dropout=0.0, **SMALL).eval()
    assert enable_mc_dropout(no_dropout) == 0
    assert torch.equal(no_dropout(x).warped, no_dropout(x).warped)


def test_residual_block_adds_in_place_only_without_autograd_and_leaves_its_input_alone():
    from anomorph.networks.blocks import ResidualBlock

    torch.manual_seed(0)
    block = ResidualBlock(2, 8).eval()
    x = torch.randn(2, 8, 16, 16)
    reference = block.act(x + block.second(block.first(x))).detach()
    kept = x.clone()
    with torch.no_grad():
        out = block(x)
    assert torch.equal(out, reference) and torch.equal(x, kept)  # same values; the input untouched
    x.requires_grad_(True)
    out = block(x)
    out.sum().backward()  # the autograd path still differentiates (no in-place on saved tensors)
    assert torch.equal(out.detach(), reference) and x.grad is not None and float(x.grad.abs().sum()) > 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_keeps_each_entry_with_probability_one_minus_p_and_scales_it(channels_last):
    from anomorph.networks.blocks import Dropout

    torch.manual_seed(0)
    p = 0.1
    x = torch.rand(4, 8, 128, 128) + 0.5  # no exact zeros in the input
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    layer = Dropout(p).train()
    y = layer(x)
    kept = y != 0
    # 524,288 Bernoulli(0.9) draws: the kept fraction's SD is 4e-4, so 0.002 is 5 SD
    assert abs(kept.float().mean().item() - (1 - p)) < 2e-3
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    # the mask is not the same for every channel or image (element-wise, not channel-wise)
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0], kept[1])
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert layer.eval()(x) is x and Dropout(0.0).train()(x) is x
    # the same distribution as torch's own dropout: mean and variance of the output
    reference = torch.nn.functional.dropout(x.detach(), p, True)
    assert abs(y.mean().item() - reference.mean().item()) < 0.01
    assert abs(y.var().item() - reference.var().item()) < 0.01 * reference.var().item() + 1e-3


# ---------------------------------------------------------------- factory


def test_factory_builds_each_network_and_rejects_bad_configs():
    assert isinstance(build_network({"name": "ae", "image_size": 32, **SMALL}), AutoEncoder)
    assert isinstance(build_network({"name": "VAE", "image_size": 32, **SMALL}), VariationalAutoEncoder)
    config = {"name": "morphaeus", "image_size": 32, "channels": [8, 16, 16], "strides": [2, 2, 2]}
    model = build_network(config)
    assert isinstance(model, MorphAEus) and config["name"] == "morphaeus"
    with pytest.raises(ValueError, match="unknown network name 'unet'"):
        build_network({"name": "unet"})
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_network({"image_size": 32})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['guidance_channels'\]"):
        build_network({"name": "ae", "guidance_channels": 1})
    with pytest.raises(ValueError, match="unknown norm"):
        build_network({"name": "ae", "image_size": 32, "norm": "layerz", **SMALL})


def test_default_morphaeus_parameter_count_is_moderate():
    model = build_network({"name": "morphaeus"})
    count = sum(p.numel() for p in model.parameters())
    assert 1e6 < count < 2e7
    assert math.prod(model.prior.bottleneck_shape) == 256 * 8 * 8


def test_optimising_a_constant_velocity_recovers_a_known_shift():
    # prior(p) = image(p - s) with s = (1.5, -1.0) pixels; warping it by d = s gives image(p) back.
    image = smooth_image(batch=1, size=48)
    true_shift = torch.tensor([1.5, -1.0]).view(1, 2, 1, 1)
    prior = warp(image, -true_shift.expand(1, 2, 48, 48))  # prior(p) = image(p - shift)
    velocity = torch.zeros(1, 2, 1, 1, requires_grad=True)
    optimiser = torch.optim.Adam([velocity], lr=0.1)
    for _ in range(150):
        displacement = integrate_velocity(velocity.expand(1, 2, 48, 48), steps=4)
        loss = (warp(prior, displacement) - image)[..., 6:-6, 6:-6].pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert torch.allclose(velocity.detach().flatten(), true_shift.flatten(), atol=0.05)


@pytest.mark.parametrize("stride,out_channels", [(2, 1), (2, 3), (3, 2)])
def test_sub_pixel_transposed_convolution_is_the_same_function(stride, out_channels):
    from anomorph.networks.blocks import SubPixelConvTranspose2d, sub_pixel_output_layers, upsample_geometry

    torch.manual_seed(0)
    kernel, padding = upsample_geometry(stride)
    layer = torch.nn.ConvTranspose2d(5, out_channels, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 5, 7, 6)
    fast = SubPixelConvTranspose2d(layer)
    with torch.no_grad():
        assert torch.allclose(fast(x), layer(x), atol=1e-5)
        assert torch.allclose(fast(x.contiguous(memory_format=torch.channels_last)), layer(x), atol=1e-5)
    wrapped = sub_pixel_output_layers(torch.nn.Sequential(layer, torch.nn.ConvTranspose2d(5, 8, 4, 2, 1)))
    assert isinstance(wrapped[0], SubPixelConvTranspose2d)
    assert type(wrapped[1]) is torch.nn.ConvTranspose2d              # wide layers stay as they are


@pytest.mark.parametrize("padding_mode", ["border", "zeros", "reflection"])
def test_pixel_warp_equals_monai_warp_values_and_gradients(padding_mode):
    """PixelWarp.forward (issue 15: no in-place slice writes, no advanced indexing) computes
    exactly MONAI Warp.forward's grid: same warped values and gradients, 2D and 3D, non-square."""
    from monai.networks.blocks import Warp

    from anomorph.networks.deformation import PixelWarp

    g = torch.Generator().manual_seed(7)
    for shape in [(3, 2, 17, 33), (2, 1, 8, 9, 10)]:
        spatial = len(shape) - 2
        image = torch.rand(shape, generator=g).requires_grad_(True)
        ddf = (3 * torch.randn(shape[0], spatial, *shape[2:], generator=g)).requires_grad_(True)
        layer = PixelWarp(padding_mode=padding_mode)
        ours, theirs = layer(image, ddf), Warp.forward(layer, image, ddf)
        assert float((ours - theirs).abs().max()) <= 1e-6
        assert float((ours - image).abs().max()) > 0.1  # it did move things
        grads = [torch.autograd.grad(out.square().sum(), (image, ddf)) for out in (ours, theirs)]
        for a, b in zip(*grads):
            assert float((a - b).abs().max()) <= 1e-5 and float(a.abs().max()) > 0
