"""Uncertainty estimators, healthy normalisation, edge/cost diagnostics and their evaluation."""
from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
import yaml

from anomorph.networks import ModelOutput, build_network, warp
from anomorph.uncertainty import (
    Augmentation,
    EnsembleEstimator,
    HealthyNormaliser,
    SeededDropout,
    build_estimator,
    edge_area_fraction,
    edge_mask,
    edge_mass_fraction,
    relative_cost,
)
from anomorph.uncertainty.base import draw_seed

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks on 2 shared, busy cores: one intra-op thread avoids OpenMP barrier stalls
    (10-100x faster here); restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(image_size=32, channels=[8, 16, 32], strides=[2, 2, 2], latent_dim=16)


def ae(**options):
    torch.manual_seed(0)
    return build_network({"name": "ae", **SMALL, **options})


def morphaeus(**options):
    torch.manual_seed(0)
    return build_network({"name": "morphaeus", **SMALL, "head_channels": [8, 16], **options})


def smooth_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, size // 4, size // 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def modes(network: torch.nn.Module) -> list[bool]:
    return [m.training for m in network.modules()]


class Identity(torch.nn.Module):
    """x̂ = x̃ = x: every correctly inverted augmentation predicts the input exactly."""

    def forward(self, x):
        return ModelOutput(reconstruction=x, warped=x)


# ----------------------------------------------------------------------------- MC dropout
def test_mc_dropout_deterministic_given_seed_and_restores_modes():
    net = morphaeus(dropout=0.3)
    x = smooth_images(3)
    net.train()
    before = modes(net)
    a = build_estimator("mc_dropout", passes=6, seed=5)(net, x)
    b = build_estimator("mc_dropout", passes=6, seed=5)(net, x)
    c = build_estimator("mc_dropout", passes=6, seed=6)(net, x)
    assert modes(net) == before  # train mode (dropout, batch norm) left as found
    assert torch.equal(a.raw, b.raw) and torch.equal(a.uncertainty, b.uncertainty)
    assert not torch.equal(a.raw, c.raw)
    assert a.raw.shape == (3, 1, 32, 32) and (a.raw > 0).any()
    assert 0 <= float(a.uncertainty.min()) and float(a.uncertainty.max()) <= 1
    assert not a.raw.requires_grad
    # shared masks: a slice's map does not depend on the batch it is in
    single = build_estimator("mc_dropout", passes=6, seed=5)(net.eval(), x[1:2])
    assert torch.allclose(single.raw, a.raw[1:2], atol=1e-6)
    # an explicit generator is used (and advanced) instead of the seed
    g = torch.Generator().manual_seed(5)
    assert torch.equal(build_estimator("mc_dropout", passes=6)(net, x, generator=g).raw, a.raw)


def test_zero_dropout_gives_zero_variance():
    x = smooth_images(2)
    with pytest.warns(UserWarning, match="no dropout layer"):
        out = build_estimator("mc_dropout", passes=4)(ae(dropout=0.0), x)
    assert torch.count_nonzero(out.raw) == 0 and torch.count_nonzero(out.uncertainty) == 0
    with pytest.warns(UserWarning, match="dropout=0"):
        out = build_estimator("mc_dropout", passes=4, dropout=0.0, target="displacement")(morphaeus(dropout=0.3), x)
    assert torch.count_nonzero(out.raw) == 0
    assert torch.count_nonzero(out.extras["variance"]) == 0


def test_batched_mc_dropout_equals_a_loop_of_single_passes_with_the_same_masks():
    net = morphaeus(dropout=0.25)
    x = smooth_images(3, seed=1)
    passes = 5
    batched = build_estimator("mc_dropout", passes=passes, target="displacement", seed=2)(net, x)
    looped = build_estimator("mc_dropout", passes=passes, target="displacement", seed=2, max_batch=3)(net, x)
    for key in ("mean", "variance", "warped_variance", "displacement_variance"):
        assert torch.allclose(batched.extras[key], looped.extras[key], atol=1e-6), key
    # the same masks in N separate full forward passes (encoder not reused) give the same moments
    seed = draw_seed(torch.Generator().manual_seed(2))
    samples, displacements = [], []
    net.eval()
    with torch.no_grad(), SeededDropout(net, seed) as sampler:
        for n in range(passes):
            sampler.passes = [n]
            out = net(x)
            samples.append(out.reconstruction)
            displacements.append(out.displacement)
    samples, displacements = torch.stack(samples), torch.stack(displacements)
    assert torch.allclose(samples.mean(0), batched.extras["mean"], atol=1e-6)
    assert torch.allclose(samples.var(0, unbiased=False), batched.extras["variance"], atol=1e-7)
    assert torch.allclose(displacements.var(0, unbiased=False).sum(1, keepdim=True),
                          batched.extras["displacement_variance"], atol=1e-9)
    assert samples.var(0).max() > 0  # the passes really were stochastic
    assert torch.allclose(batched.raw, batched.extras["displacement_variance"].sqrt())


def _reference_mc_samples(net, x, seed, passes, p=None):
    """The definition of the seeded MC-dropout distribution, written independently of the fast
    path: N full forward passes of the prior on the B images, each dropout layer l of pass n
    multiplying by a (1, *shape) mask drawn from child_seed(seed, l, n), divided by 1 - p."""
    from anomorph.uncertainty.estimators import child_seed, dropout_layers

    prior = net.prior if hasattr(net, "prior") else net
    layers = dropout_layers(net)
    current = {"n": 0}

    def hook_for(index):
        def hook(module, inputs, output):
            q = module.p if p is None else p
            if q == 0:
                return inputs[0]
            generator = torch.Generator().manual_seed(child_seed(seed, index, current["n"]))
            mask = torch.rand((1, *inputs[0].shape[1:]), generator=generator) >= q
            return inputs[0] * mask.to(inputs[0].dtype) / (1.0 - q)
        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    samples = []
    try:
        net.eval()
        with torch.no_grad():
            for n in range(passes):
                current["n"] = n
                samples.append(prior(x).reconstruction)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(samples)


@pytest.mark.parametrize("builder", [ae, morphaeus])
def test_fast_mc_dropout_matches_the_naive_n_pass_loop(builder):
    net = builder(dropout=0.2)
    x = smooth_images(3, seed=4)
    passes = 6
    seed = draw_seed(torch.Generator().manual_seed(11))
    reference = _reference_mc_samples(net, x, seed, passes)
    for max_batch in (None, 3, 6, 100):  # auto, one pass per forward, two passes, all at once
        out = build_estimator("mc_dropout", passes=passes, max_batch=max_batch)(
            net, x, generator=torch.Generator().manual_seed(11))
        assert torch.allclose(out.extras["mean"], reference.mean(0), atol=1e-6), max_batch
        assert torch.allclose(out.extras["variance"], reference.var(0, unbiased=False), atol=1e-7), max_batch
    assert reference.var(0).max() > 1e-6  # stochastic: the comparison is not trivially between zeros


def _max_sample_error(net, x, seed, passes, **options):
    """Largest |Δ| between the estimator's passes and the naive per-pass reference."""
    from anomorph.uncertainty.estimators import MCDropoutEstimator

    reference = _reference_mc_samples(net, x, seed, passes)
    samples, _ = MCDropoutEstimator(passes=passes, **options).samples(net, x, seed)
    assert samples["reconstruction"].shape == reference.shape
    return float((samples["reconstruction"] - reference).abs().max())


@pytest.mark.parametrize("builder", [ae, morphaeus])
@pytest.mark.parametrize("channels_last", [True, False])
def test_mc_dropout_passes_equal_the_naive_per_pass_forwards(builder, channels_last, monkeypatch):
    """Every pass (not only mean and variance) equals a full forward of the unmodified network
    with that pass's seeded masks, to 1e-6, for every chunking and both layouts."""
    import anomorph.uncertainty.estimators as estimators

    monkeypatch.setattr(estimators, "use_channels_last", lambda images: channels_last)
    net = builder(dropout=0.2)
    x = smooth_images(3, seed=4)
    for max_batch in (None, 3, 6, 100):
        assert _max_sample_error(net, x, seed=123, passes=5, max_batch=max_batch) <= 1e-6, max_batch
    assert _reference_mc_samples(net, x, 123, 5).var(0).max() > 1e-6  # the passes differ


def test_sample_comparison_catches_a_wrong_prefix_reuse(monkeypatch):
    """The check above is sharp: reusing one layer too many (the first dropout layer itself runs
    once, so every pass gets pass 0's mask there) is caught."""
    import anomorph.networks.autoencoder as autoencoder

    net = ae(dropout=0.2)
    x = smooth_images(3, seed=4)
    assert _max_sample_error(net, x, seed=123, passes=4, max_batch=3) <= 1e-6

    def one_child_too_far(module, h):  # runs the child holding the first dropout layer once
        children = list(module)
        index = next(i for i, child in enumerate(children) if autoencoder.has_dropout(child))
        for child in children[:index + 1]:
            h = child(h)

        def rest(y):
            for child in children[index + 1:]:
                y = child(y)
            return y
        return h, rest

    monkeypatch.setattr(autoencoder, "split_at_first_dropout", one_child_too_far)
    assert _max_sample_error(net, x, seed=123, passes=4, max_batch=3) > 1e-3


def test_fast_mc_dropout_with_p_zero_is_the_plain_prior():
    net = ae(dropout=0.3)
    x = smooth_images(2, seed=5)
    with pytest.warns(UserWarning, match="dropout=0"):
        out = build_estimator("mc_dropout", passes=4, dropout=0.0)(net, x)
    with torch.no_grad():
        plain = net.eval()(x).reconstruction
    assert torch.allclose(out.extras["mean"], plain, atol=1e-6)
    assert torch.count_nonzero(out.extras["variance"]) == 0


@pytest.mark.parametrize("max_batch", [100, 2])  # all 8 passes in one forward; one pass per forward
def test_fast_mc_dropout_runs_the_deterministic_part_once_per_image(max_batch):
    """Encoder, from_latent and the first up-convolution see B images once, however the passes
    are chunked; the dropout-bearing layers see every pass. (This is where the speed comes from;
    see benchmarks/README.md.)"""
    net = ae(dropout=0.2)
    x = smooth_images(2, seed=6)
    seen: dict[str, list[int]] = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, []).append(inputs[0].shape[0])
        return hook

    from anomorph.uncertainty.estimators import folded_prior, use_channels_last

    # the encoder and the passes run on this BatchNorm-folded copy (cached)
    fast = folded_prior(net.eval(), use_channels_last(x))
    first_stage = fast.decoder.stages[0]
    assert isinstance(first_stage.up.norm, torch.nn.Identity)
    handles = [fast.encoder.register_forward_hook(record("encoder")),
               fast.from_latent.register_forward_hook(record("from_latent")),
               first_stage.up.conv.register_forward_hook(record("first_up_conv")),
               first_stage.up.act.register_forward_hook(record("first_up_act")),
               fast.decoder.output.register_forward_hook(record("output"))]
    try:
        build_estimator("mc_dropout", passes=8, max_batch=max_batch)(net, x)
    finally:
        for handle in handles:
            handle.remove()
    assert seen["encoder"] == [2] and seen["from_latent"] == [2] and seen["first_up_conv"] == [2]
    per_forward = 16 if max_batch == 100 else 2
    assert seen["first_up_act"] == [per_forward] * (16 // per_forward)
    assert seen["output"] == [per_forward] * (16 // per_forward)


def test_folded_copy_is_the_same_function_and_refreshes_after_training():
    from anomorph.networks.blocks import fold_batch_norm
    from anomorph.uncertainty.estimators import folded_prior

    net = ae(dropout=0.2)
    x = smooth_images(4, seed=7)
    net.train()
    with torch.no_grad():
        net(x)                      # moves the BatchNorm running statistics away from 0 / 1
    net.eval()
    folded = fold_batch_norm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.decoder.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x).reconstruction, net(x).reconstruction, atol=1e-6)
    first = folded_prior(net)
    assert folded_prior(net) is first            # cached while the weights stay
    with torch.no_grad():
        net.decoder.output.weight.mul_(0.5)      # an optimizer step changes them in place
    second = folded_prior(net)
    assert second is not first
    with torch.no_grad():
        assert torch.allclose(second(x).reconstruction, net(x).reconstruction, atol=1e-6)


def test_decode_repeated_equals_decode_of_the_repeated_code():
    for builder in (ae, morphaeus):
        net = builder(dropout=0.2, heteroscedastic=True).eval()
        prior = net.prior if hasattr(net, "prior") else net
        z = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            fast = prior.decode_repeated(z, 4)
            slow = prior.decode(z.repeat(4, 1))
        assert torch.allclose(fast.image, slow.image, atol=1e-6)
        assert torch.allclose(fast.log_variance, slow.log_variance, atol=1e-6)
        assert len(fast.features) == len(slow.features)
        for a, b in zip(fast.features, slow.features):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_auto_max_batch_keeps_cpu_forwards_cache_sized():
    from anomorph.uncertainty.estimators import auto_max_batch

    assert auto_max_batch(torch.zeros(16, 1, 128, 128)) == 16      # one pass of 16 per forward
    assert auto_max_batch(torch.zeros(4, 1, 128, 128)) == 16       # 4 passes of 4
    assert auto_max_batch(torch.zeros(16, 1, 64, 64)) == 64        # 4 passes of 16 at 64²
    assert auto_max_batch(torch.zeros(64, 1, 128, 128)) == 64      # never less than one pass


# ----------------------------------------------------------------------------- TTA
def test_tta_round_trip_maps_a_known_pattern_back_exactly():
    pattern = smooth_images(2, seed=3)
    pattern[:, :, 10:14, 5:9] = 1.0
    for augmentation in (Augmentation(True, (2, -1), 1.1, 0.95), Augmentation(False, (-2, 2), 0.9, 1.0),
                         Augmentation(True, (0, 0), 1.0, 1.0)):
        assert torch.equal(augmentation.invert_geometry(augmentation.apply_geometry(pattern)), pattern)
        assert torch.allclose(augmentation.invert(augmentation.apply(pattern)), pattern, atol=1e-6)
        assert not torch.equal(augmentation.apply(pattern), pattern)
    # a displacement predicted on the flipped image, mapped back, deforms the original image alike
    flip = Augmentation(True, (0, 0))
    d_original = torch.zeros(2, 2, 32, 32)
    d_original[:, 0], d_original[:, 1] = 0.7, 1.5  # rows, columns (pixels)
    d_augmented = flip.apply_geometry(torch.cat([d_original[:, :1], -d_original[:, 1:]], dim=1))
    assert torch.equal(flip.invert_displacement(d_augmented), d_original)
    assert torch.allclose(flip.invert(warp(flip.apply(pattern), d_augmented)), warp(pattern, d_original), atol=1e-6)
    # identity network: every augmented prediction maps back onto the input → no spread
    out = build_estimator("tta", augmentations=6, seed=1)(Identity(), pattern)
    assert torch.allclose(out.extras["mean"], pattern, atol=1e-6)
    assert float(out.raw.max()) < 1e-5
    tta = build_estimator("tta", augmentations=6, seed=1)
    drawn = tta.sample(torch.Generator().manual_seed(0))
    assert drawn[0].is_identity and not any(a.is_identity for a in drawn[1:])
    assert all(max(abs(s) for s in a.shift) <= 2 for a in drawn)


def test_tta_is_deterministic_and_sees_a_real_network():
    net = morphaeus(dropout=0.1)
    x = smooth_images(2)
    a = build_estimator("tta", augmentations=4, seed=0, target="displacement")(net, x)
    b = build_estimator("tta", augmentations=4, seed=0, target="displacement")(net, x)
    assert torch.equal(a.raw, b.raw) and a.raw.shape == (2, 1, 32, 32)
    prior = build_estimator("tta", augmentations=4, seed=0)(net, x)
    assert float(prior.raw.mean()) > 0


# ----------------------------------------------------------------------------- aleatoric, registration
def test_aleatoric_needs_a_log_variance_head():
    x = smooth_images(2)
    with pytest.raises(ValueError, match="heteroscedastic"):
        build_estimator("aleatoric")(ae(), x)
    net = ae(heteroscedastic=True)
    out = build_estimator("aleatoric")(net, x)
    expected = torch.exp(0.5 * net.eval()(x).log_variance)
    assert torch.allclose(out.raw, expected)
    warped = build_estimator("aleatoric", target="warped")(morphaeus(heteroscedastic=True), x)
    assert warped.raw.shape == (2, 1, 32, 32)


def test_registration_inconsistency():
    x = smooth_images(2)
    with pytest.raises(ValueError, match="deformable"):
        build_estimator("registration")(ae(), x)
    with pytest.raises(ValueError, match="features"):
        build_estimator("registration")(morphaeus(head_inputs="features"), x)
    net = morphaeus()
    torch.nn.init.zeros_(net.velocity_head.velocity.weight)  # the head outputs v = 0
    out = build_estimator("registration")(net, x)
    assert torch.count_nonzero(out.raw) == 0
    torch.nn.init.normal_(net.velocity_head.velocity.weight, std=0.5)
    out = build_estimator("registration")(net, x)
    assert float(out.raw.mean()) > 0.01  # an untrained head is not forward-backward consistent
    assert out.extras["displacement_forward"].shape == (2, 2, 32, 32)


def test_registration_backward_pass_swaps_images_and_features(monkeypatch):
    """The backward call registers x onto x̂: pair (x̂, x) and the decoder features of the AE
    run on x̂; the forward call reads (x, x̂) and the features of the AE run on x."""
    net = morphaeus().eval()
    x = smooth_images(2, seed=3)
    with torch.no_grad():
        forward_decoded = net.prior.decode(net.prior.encode(x)[0])
        x_hat = forward_decoded.image
        backward_decoded = net.prior.decode(net.prior.encode(x_hat)[0])
    calls = []
    original = net.predict_velocity

    def spy(image, prior, decoder_features=(), guidance=None):
        calls.append((image.clone(), prior.clone(), [f.clone() for f in decoder_features]))
        return original(image, prior, decoder_features, guidance)

    monkeypatch.setattr(net, "predict_velocity", spy)
    build_estimator("registration")(net, x)
    assert len(calls) == 2
    (image_f, prior_f, features_f), (image_b, prior_b, features_b) = calls
    assert torch.equal(image_f, x) and torch.allclose(prior_f, x_hat)
    assert torch.allclose(image_b, x_hat) and torch.equal(prior_b, x)
    assert len(features_f) == len(features_b) == len(forward_decoded.features)
    for got_f, got_b, want_f, want_b in zip(features_f, features_b, forward_decoded.features,
                                            backward_decoded.features):
        assert torch.allclose(got_f, want_f) and torch.allclose(got_b, want_b)
        assert not torch.allclose(got_b, got_f)  # the backward features are not the forward ones


@pytest.mark.parametrize("shift", [(1.5, -0.75), (0.0, 2.25)])
def test_registration_inconsistency_of_exact_inverse_translations(monkeypatch, shift):
    """v_f = t and v_b = −t (constant): d_f = t, d_b = −t and d_f + d_b ∘ (id + d_f) = 0; with
    v_b = +t instead the map is ‖2t‖ everywhere (border padding keeps constants exact)."""
    net = morphaeus().eval()
    x = smooth_images(2)
    t = torch.tensor(shift).view(1, 2, 1, 1).expand(2, 2, 32, 32)
    for sign, expected in ((-1.0, 0.0), (1.0, 2.0 * math.hypot(*shift))):
        calls = []

        def fake(image, prior, decoder_features=(), guidance=None, sign=sign):
            calls.append(image)
            return t.clone() if len(calls) == 1 else sign * t

        monkeypatch.setattr(net, "predict_velocity", fake)
        out = build_estimator("registration")(net, x)
        assert torch.allclose(out.extras["displacement_forward"], t, atol=1e-5)
        assert torch.allclose(out.extras["displacement_backward"], sign * t, atol=1e-5)
        assert torch.allclose(out.raw, torch.full_like(out.raw, expected), atol=1e-5)


def test_residual_z_is_the_prior_residual_before_registration():
    net = morphaeus(heteroscedastic=True)
    x = smooth_images(2)
    out = build_estimator("residual_z", use_variance=False)(net, x)
    assert torch.allclose(out.raw, (x - net.eval().prior(x).reconstruction).abs())
    scaled = build_estimator("residual_z")(net, x)
    assert torch.allclose(scaled.raw, out.raw * torch.exp(-0.5 * net.prior(x).log_variance))


def test_every_estimator_restores_modes_and_build_errors():
    net = morphaeus(dropout=0.2, heteroscedastic=True)
    x = smooth_images(2)
    for training in (True, False):
        net.train(training)
        before = modes(net)
        for name in ("mc_dropout", "tta", "aleatoric", "registration", "residual_z"):
            options = {"passes": 2} if name == "mc_dropout" else {}
            out = build_estimator(name, **options)(net, x, brain_masks=torch.zeros(2, 1, 32, 32))
            assert modes(net) == before, name
            assert torch.count_nonzero(out.uncertainty) == 0  # u is 0 outside the brain mask
    with pytest.raises(ValueError, match="unknown uncertainty estimator"):
        build_estimator("bayes")
    with pytest.raises(ValueError, match="accepted"):
        build_estimator("mc_dropout", n=3)
    with pytest.raises(ValueError, match="run_dir"):
        build_estimator("ensemble")
    ensemble = EnsembleEstimator(members=[ae(dropout=0.1), ae(dropout=0.1)])
    assert torch.count_nonzero(ensemble(ae(), x).raw) == 0  # identical members agree exactly


# ----------------------------------------------------------------------------- normalisation
def test_healthy_normaliser_standardises_its_fit_slices():
    net = ae()
    estimator = build_estimator("residual_z")
    healthy = smooth_images(40, seed=4)
    brains = torch.ones_like(healthy)
    brains[:, :, :2] = 0
    normaliser = HealthyNormaliser.fit(estimator, net, healthy, brains, smooth=0.0, floor=0.0, batch_size=16)
    out = normaliser(net, healthy, brains)
    z = out.extras["z"][:, 0, 2:]  # pixels inside every brain mask
    assert torch.allclose(z.mean(0), torch.zeros_like(z[0]), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones_like(z[0]), atol=1e-3)
    u = out.uncertainty
    assert float(u.min()) >= 0 and float(u.max()) <= 1 and torch.count_nonzero(u[:, :, :2]) == 0
    median_z = float(z.median())
    assert -0.6 < median_z < 0.6
    squash = normaliser.squash(torch.tensor([median_z - 0.1, 0.0, median_z + 0.1]))
    assert squash[0] <= float(u[:, 0, 2:].median()) <= squash[2]
    assert float((u[:, 0, 2:] > 0.5).float().mean()) < 0.1  # z > 2 is rare on healthy slices
    # defaults (smoothed statistics): about standardised; a saved state gives the same maps
    smoothed = HealthyNormaliser.fit(estimator, net, healthy, brains)
    z = smoothed(net, healthy, brains).extras["z"][:, 0, 2:]
    assert abs(float(z.mean())) < 0.2 and 0.7 < float(z.std()) < 1.3
    state = smoothed.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = HealthyNormaliser.from_state(estimator, state)
    assert torch.equal(restored(net, healthy[:3]).uncertainty, smoothed(net, healthy[:3]).uncertainty)


def test_tissue_normaliser_standardises_per_tissue_bin():
    net = ae()
    estimator = build_estimator("residual_z")
    healthy = smooth_images(24, seed=5)
    normaliser = HealthyNormaliser.fit(estimator, net, healthy, mode="tissue", n_intensity_bins=4,
                                       n_gradient_bins=2, floor=0.0, min_count=1)
    z = normaliser(net, healthy).extras["z"]
    assert abs(float(z.mean())) < 1e-3 and float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    restored = HealthyNormaliser.from_state(estimator, normaliser.state_dict())
    assert torch.allclose(restored(net, healthy[:2]).extras["z"], z[:2], atol=1e-4)


# ----------------------------------------------------------------------------- diagnostics
def test_edge_mass_fraction():
    axis = torch.linspace(-1, 1, 32)
    r2 = axis[:, None] ** 2 + axis[None, :] ** 2
    image = (0.3 * r2 + 0.5 * ((axis[:, None].abs() < 0.4) & (axis[None, :].abs() < 0.4))).expand(2, 1, 32, 32)
    brains = (r2 < 0.95).float().expand(2, 1, 32, 32)
    edges = edge_mask(image, brains)
    area = edge_area_fraction(image, brains)
    assert 0.05 < area < 0.15
    assert edge_mass_fraction(edges.float(), image, brains) == pytest.approx(1.0)
    assert edge_mass_fraction(torch.ones_like(image), image, brains) == pytest.approx(area)
    assert edge_mass_fraction(1.0 - edges.float(), image, brains) == pytest.approx(0.0)
    assert math.isnan(edge_mass_fraction(torch.zeros_like(image), image, brains))


def test_relative_cost_is_a_positive_ratio():
    net = morphaeus(dropout=0.1)
    cost = relative_cost(build_estimator("mc_dropout", passes=2), net, smooth_images(2), repeats=1)
    assert cost > 0 and math.isfinite(cost)


# ----------------------------------------------------------------------------- ensemble + evaluate
@pytest.fixture(scope="module")
def tiny_ensemble(tiny_phantom, tmp_path_factory):
    """`anomorph fit --ensemble 2` with Lightning's training replaced by a stub that saves the
    seeded, untrained network as an ordinary run directory (real fits are tested in
    test_training.py; this keeps the file fast)."""
    from anomorph.cli.main import main
    from anomorph.config import config_to_dict, save_config
    from anomorph.training.module import network_options

    calls = []

    def fake_fit(config, run_dir=None, resume=False, **trainer):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        torch.manual_seed(config.seed)
        network = build_network(network_options(config))
        torch.save({"hyper_parameters": {"config": config_to_dict(config)},
                    "state_dict": {f"network.{k}": v for k, v in network.state_dict().items()}},
                   run_dir / "checkpoints" / "last.ckpt")
        calls.append((config.seed, run_dir.name, resume))
        return run_dir

    run_dir = tmp_path_factory.mktemp("ensemble") / "ens"
    overrides = [f"data.manifest={tiny_phantom}", "data.size=32", "data.min_brain_fraction=0.0", "model.name=ae",
                 "model.channels=[8,16,32]", "model.strides=[2,2,2]", "model.latent_dim=32", "model.dropout=0.2",
                 "seed=3"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(importlib.import_module("anomorph.training.fit"), "fit", fake_fit)
        assert main(["fit", "--ensemble", "2", "--run-dir", str(run_dir), *overrides]) == 0
        assert calls == [(3, "member0", False), (4, "member1", False)]
        assert main(["fit", "--resume", str(run_dir)]) == 0  # an ensemble resumes member by member
        assert calls[2:] == [(3, "member0", True), (4, "member1", True)]
    return run_dir


def test_fit_ensemble_writes_seeded_members(tiny_ensemble):
    from anomorph.evaluation.inference import ModelScorer
    from anomorph.training import ensemble_members, load_run

    listing = yaml.safe_load((tiny_ensemble / "ensemble.yaml").read_text())
    assert listing["members"] == ["member0", "member1"] and listing["seeds"] == [3, 4]
    members = ensemble_members(tiny_ensemble)
    (net0, config0), (net1, config1) = load_run(members[0]), load_run(members[1])
    assert (config0.seed, config1.seed) == (3, 4)
    scorer = ModelScorer.from_run(tiny_ensemble)  # an ensemble directory scores member 0
    assert scorer.config == config0
    x = smooth_images(2)
    estimator = build_estimator("ensemble", run_dir=tiny_ensemble)
    out = estimator(scorer.network, x)
    assert float(out.raw.mean()) > 0
    assert torch.equal(out.raw, estimator(scorer.network, x).raw)
    recon = torch.stack([net0(x).reconstruction, net1(x).reconstruction])
    assert torch.allclose(out.raw, recon.std(0, unbiased=False), atol=1e-6)


def test_evaluate_reports_uncertainty(tiny_ensemble, tiny_phantom, tmp_path):
    from anomorph.evaluation.api import evaluate

    out = evaluate([tiny_ensemble], tiny_phantom, tmp_path / "eval", report=False, oracle=False, batch_size=16,
                   uncertainty=["mc_dropout", "ensemble"], uncertainty_options={"mc_dropout": {"passes": 3}},
                   uncertainty_cost_repeats=1)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    section = saved["uncertainty"]["run"]
    assert set(section) == {"mc_dropout", "ensemble"}
    for values in section.values():
        assert 0.0 <= values["uncertainty_auroc"] <= 1.0 and 0.0 <= values["uncertainty_auprc"] <= 1.0
        assert 0.0 <= values["edge_mass_fraction"] <= 1.0 and values["relative_cost"] > 0
        assert values["normalised"] and values["normaliser_mode"] == "pixel"
    # the run's own row carries the first estimator's u
    assert saved["methods"]["run"]["uncertainty_auroc"] == pytest.approx(section["mc_dropout"]["uncertainty_auroc"])
    assert "mc_dropout" in out.uncertainty_table and "ensemble" in out.uncertainty_table


def test_deformation_atypicality_and_warped_residual_read_the_unguided_registration():
    import pytest as _pytest

    from anomorph.errors import ConfigError
    from anomorph.networks import build_network, jacobian_determinant
    from anomorph.uncertainty import build_estimator

    torch.manual_seed(0)
    net = build_network({"name": "morphaeus", "image_size": 32, "channels": [8, 16, 32], "strides": [2, 2, 2],
                         "latent_dim": 16, "head_channels": [8, 16]}).eval()
    with torch.no_grad():
        net.velocity_head.velocity.weight.normal_(0, 0.3)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)
    logdet = build_estimator("deformation")(net, x)
    expected = torch.log(jacobian_determinant(out.displacement).clamp_min(1e-3)).abs()
    assert torch.allclose(logdet.raw, expected, atol=1e-6) and float(logdet.raw.max()) > 0
    magnitude = build_estimator("deformation", quantity="displacement")(net, x)
    assert torch.allclose(magnitude.raw, out.displacement.norm(dim=1, keepdim=True), atol=1e-6)
    residual = build_estimator("warped_residual")(net, x)
    assert torch.allclose(residual.raw, (x - out.warped).abs(), atol=1e-6)
    with _pytest.raises(ConfigError, match="quantity"):
        build_estimator("deformation", quantity="curl")
    ae = build_network({"name": "ae", "image_size": 32, "channels": [8, 16, 32], "strides": [2, 2, 2],
                        "latent_dim": 16}).eval()
    with _pytest.raises(ConfigError, match="deformable"):
        build_estimator("deformation")(ae, x)


# ----------------------------------------------------------------------------- combinations
@pytest.mark.parametrize("rule", ["max", "mean", "min"])
def test_combination_is_the_rule_over_separately_normalised_parts(rule):
    from anomorph.uncertainty import CombinedEstimator

    net = morphaeus()
    healthy = smooth_images(24, seed=7)
    brains = torch.ones_like(healthy)
    options = dict(smooth=0.0, floor=0.0, batch_size=8)
    combined = build_estimator(f"{rule}(warped_residual, deformation)")
    assert isinstance(combined, CombinedEstimator) and combined.name == f"{rule}(warped_residual,deformation)"
    outer = HealthyNormaliser.fit(combined, net, healthy, brains, **options)
    # reference: each part normalised on its own, then the rule by hand
    parts = [HealthyNormaliser.fit(build_estimator(name), net, healthy, brains, **options)
             for name in ("warped_residual", "deformation")]
    new = smooth_images(5, seed=8)
    zs = torch.stack([p(net, new).extras["z"] for p in parts])
    expected = {"max": zs.amax(0), "mean": zs.mean(0), "min": zs.amin(0)}[rule]
    out = outer(net, new)
    assert torch.allclose(out.raw, expected, atol=1e-5)
    # the unguided pass a part ran is passed on as one (x̂, v) pair: a test-time strategy starts from it
    with torch.no_grad():
        plain = net.eval()(new)
    assert torch.allclose(out.extras["velocity"], plain.velocity, atol=1e-6)
    assert torch.allclose(out.extras["reconstruction"], plain.reconstruction, atol=1e-6)
    assert bool((out.raw < 0).any())  # a z-score: not clamped at 0 like other raw maps
    # the outer normaliser re-standardises the combination on its fit slices (per pixel)
    z_fit = outer(net, healthy).extras["z"]
    assert torch.allclose(z_fit.mean(0), torch.zeros_like(z_fit[0]), atol=1e-3)
    # saved tensors only; a freshly built combination restored from them gives the same maps
    state = outer.state_dict()
    assert {"estimator.part0.mean", "estimator.part1.std"} <= set(state)
    restored = HealthyNormaliser.from_state(build_estimator(f"{rule}(warped_residual,deformation)"), state)
    assert torch.equal(restored(net, new).uncertainty, out.uncertainty)


def test_combination_spelling_errors_and_unfitted_use():
    from anomorph.errors import ConfigError
    from anomorph.uncertainty import canonical_estimator_name

    assert canonical_estimator_name(" max( residual_z ,warped_residual ) ") == "max(residual_z,warped_residual)"
    assert canonical_estimator_name("residual_z") == "residual_z"
    for bad, message in [("prod(residual_z,warped_residual)", "rule"), ("max(residual_z)", "two or more"),
                         ("max(residual_z,)", "two or more"), ("max(residual_z,max(a,b))", "nest"),
                         ("max(residual_z,residual_z)", "repeated"), ("max(residual_z,nope)", "nope")]:
        with pytest.raises(ConfigError, match=message):
            build_estimator(bad)
    with pytest.raises(ConfigError, match="passes"):
        build_estimator("max(residual_z,mc_dropout)", passes=4)
    import argparse

    from anomorph.cli.evaluation import _estimator_name

    assert _estimator_name("mean(residual_z, warped_residual)") == "mean(residual_z,warped_residual)"
    for bad in ("max(residual_z,nope)", "nope", "prod(residual_z,warped_residual)"):
        with pytest.raises(argparse.ArgumentTypeError):
            _estimator_name(bad)
    combined = build_estimator("max(residual_z,mc_dropout)", seed=3)
    assert [p.seed for p in combined.parts] == [3, 3]
    with pytest.raises(ConfigError, match="healthy statistics"):
        combined(ae(dropout=0.1), smooth_images(1))
    part0 = HealthyNormaliser.fit(build_estimator("residual_z"), ae(), smooth_images(4)).state_dict()
    outer = {**part0, **{f"estimator.part0.{key}": value for key, value in part0.items()}}
    with pytest.raises(ConfigError, match="part 1"):  # a saved state without the second part's statistics
        HealthyNormaliser.from_state(combined, outer)


def test_field_disagreement_is_the_norm_of_the_two_fields_difference():
    """Brute force: ‖d − d_tied‖ per pixel from the two networks' own passes; zero against a copy
    of the scored network; the extras are the scored network's unguided pass (its reconstruction
    and velocity, where a test-time strategy starts)."""
    import copy

    from anomorph.errors import ConfigError
    from anomorph.uncertainty.estimators import FieldDisagreementEstimator

    torch.manual_seed(0)
    network = morphaeus().eval()
    tied = copy.deepcopy(network)
    with torch.no_grad():
        for p in tied.velocity_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    estimator = build_estimator("field_disagreement", tied=tied)
    result = estimator(network, x)
    with torch.no_grad():
        expected = (network(x).displacement - tied(x).displacement).norm(dim=1, keepdim=True)
        plain = network(x)
    torch.testing.assert_close(result.raw, expected)
    assert float(expected.max()) > 0
    torch.testing.assert_close(result.extras["reconstruction"], plain.reconstruction)
    torch.testing.assert_close(result.extras["velocity"], plain.velocity)
    same = FieldDisagreementEstimator(tied=copy.deepcopy(network))(network, x)
    assert float(same.raw.abs().max()) == 0.0
    with pytest.raises(ConfigError, match="field_disagreement: give tied_run"):
        build_estimator("field_disagreement")
