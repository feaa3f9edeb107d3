"""Uncertainty-guided registration: gating limits, weighted prior, test-time MAP, conditioning."""
from __future__ import annotations

import pytest
import torch

from anomorph.config import load_config
from anomorph.errors import ConfigError
from anomorph.guidance import dilate_mask, log_jacobian_anchor, ramp_mask, synthetic_anomaly_masks
from anomorph.scoring.strategies import STRATEGIES, GuidanceSignal, GuidedScorer
from anomorph.networks import build_network
from anomorph import losses


def _config(strategy: str = "gating", **guidance):
    overrides = ["model.name=morphaeus", "data.size=32", f"guidance.strategy={strategy}"]
    overrides += [f"guidance.{k}={v}" for k, v in guidance.items()]
    return load_config(None, overrides)


def _network(guidance_channels: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    net = build_network({"name": "morphaeus", "image_size": 32, "channels": [8, 16, 32], "strides": [2, 2, 2],
                         "latent_dim": 16, "head_channels": [8, 16], "guidance_channels": guidance_channels})
    with torch.no_grad():  # a head that deforms visibly (training starts near identity)
        net.velocity_head.velocity.weight.normal_(0, 0.3)
        net.velocity_head.velocity.bias.uniform_(-1, 1)
    return net.eval()


def _images(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 1, 32, 32, generator=g), torch.ones(3, 1, 32, 32)


def test_gating_limits():
    net = _network()
    x, brain = _images()
    with torch.no_grad():
        free = net(x)
        stiff = net(x, velocity_gate=torch.zeros_like(x))  # m = 1 everywhere
        open_gate = net(x, velocity_gate=torch.ones_like(x))  # m = 0
    assert float(free.displacement.abs().max()) > 0.1
    assert torch.equal(stiff.displacement, torch.zeros_like(stiff.displacement))
    assert torch.allclose(stiff.warped, stiff.reconstruction, atol=1e-6)
    assert torch.allclose(open_gate.warped, free.warped)
    # through the scorer: oracle m = 1 everywhere → identity, m = 0 → unguided
    scorer = GuidedScorer(net, _config(dilation=0), "gating", oracle=True)
    pred = scorer(x, brain, lesion_masks=torch.ones_like(x))
    assert torch.allclose(pred.warped, pred.reconstruction, atol=1e-6)
    pred0 = scorer(x, brain, lesion_masks=torch.zeros_like(x))
    assert torch.allclose(pred0.warped, free.warped, atol=1e-6)


def test_gating_keeps_the_masked_region_in_place():
    net = _network()
    x, brain = _images()
    lesion = torch.zeros_like(x)
    lesion[:, :, 10:20, 10:20] = 1
    scorer = GuidedScorer(net, _config(dilation=2), "gating", oracle=True)
    pred = scorer(x, brain, lesion_masks=lesion)
    inside = pred.displacement[:, :, 12:18, 12:18].norm(dim=1)
    with torch.no_grad():
        free = net(x).displacement[:, :, 12:18, 12:18].norm(dim=1)
    assert float(inside.mean()) < 0.25 * float(free.mean())


def test_weighted_prior_equals_plain_prior_when_alpha_is_zero():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(2, 2, 16, 16, generator=g)
    m = torch.rand(2, 1, 16, 16, generator=g)
    alpha = 0.0
    assert torch.allclose(losses.velocity_smoothness(v, weight=1 + alpha * m), losses.velocity_smoothness(v))
    heavier = losses.velocity_smoothness(v, weight=1 + 5.0 * m)
    assert float(heavier) > float(losses.velocity_smoothness(v))


def test_log_jacobian_anchor_of_translation_is_displacement_energy():
    d = torch.zeros(1, 2, 8, 8)
    d[:, 0] = 1.5
    d[:, 1] = -0.5
    w = torch.ones(1, 1, 8, 8)
    assert float(log_jacobian_anchor(d, w, gamma=0.3)) == pytest.approx(1.5 ** 2 + 0.5 ** 2)
    assert float(log_jacobian_anchor(d, torch.zeros_like(w))) == 0.0


def test_test_time_map_lowers_its_objective():
    net = _network()
    x, brain = _images()
    lesion = torch.zeros_like(x)
    lesion[:, :, 8:16, 8:16] = 1
    scorer = GuidedScorer(net, _config("map", map_steps=15, map_lr=0.05), "map", oracle=True)
    m, _ = scorer.guidance_mask(x, brain, lesion)
    with torch.no_grad():
        start = net(x)
    history: list[float] = []
    out = scorer.strategy_impl.refine(scorer, x, start, m, history)
    assert len(history) == 16
    assert history[-1] < history[0]
    assert out.displacement.shape == (3, 2, 32, 32)
    assert not out.velocity.requires_grad


def test_ramp_mask_spans_zero_to_one_and_dilation():
    z = torch.tensor([-1.0, 1.9, 2.0, 2.5, 3.0, 7.0, float("inf"), float("nan")]).view(1, 1, 1, 8)
    m = ramp_mask(z, threshold=3.0, softness=1.0)
    assert m.flatten().tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0]
    assert torch.equal(ramp_mask(z, 3.0, 0.0), (torch.nan_to_num(z, nan=-1) >= 3.0).float())
    # on u itself (normalise off): u = 1 gives m = 1 (the old sigmoid mask stopped at 0.55)
    u = torch.tensor([0.0, 0.85, 1.0]).view(1, 1, 1, 3)
    assert ramp_mask(u, threshold=0.9, softness=0.1).flatten().tolist() == pytest.approx([0.0, 0.5, 1.0])
    point = torch.zeros(1, 1, 7, 7)
    point[0, 0, 3, 3] = 1
    assert int(dilate_mask(point, 2).sum()) == 25



@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_hysteresis_region_equals_connected_components_from_scipy(spatial_dims):
    from scipy import ndimage

    from anomorph.guidance.masks import hysteresis_region

    generator = torch.Generator().manual_seed(spatial_dims)
    shape = (3, 1, 40, 40) if spatial_dims == 2 else (2, 1, 12, 14, 16)
    # smooth random fields: blobs of every size, many touching the low threshold only
    score = torch.randn(shape, generator=generator)
    for _ in range(2):
        pool = torch.nn.functional.avg_pool2d if spatial_dims == 2 else torch.nn.functional.avg_pool3d
        score = pool(score, 3, stride=1, padding=1, count_include_pad=False)
    score = score / score.std()
    score.view(-1)[7] = float("nan")
    high, low = 1.5, 0.5
    region = hysteresis_region(score, high, low)
    structure = ndimage.generate_binary_structure(spatial_dims, spatial_dims)  # 8- / 26-connectivity
    for b in range(shape[0]):
        s = torch.nan_to_num(score[b, 0], nan=-1e9).numpy()
        labels, _ = ndimage.label(s >= low, structure=structure)
        seeds = set(labels[s >= high].tolist()) - {0}
        expected = torch.from_numpy(sum((labels == k) for k in seeds).astype("float32") if seeds else 0 * s)
        assert torch.equal(region[b, 0], expected)
    assert 0 < region.sum() < (score >= low).sum()  # the test field has both kinds of component
    # low = high: the plain threshold; a long snake-shaped path is followed to its end
    assert torch.equal(hysteresis_region(score, high, high), (torch.nan_to_num(score, nan=-1e9) >= high).float())
    snake = torch.zeros(1, 1, 9, 9)
    snake[0, 0, ::2, :] = 1
    snake[0, 0, 1::4, 8] = 1
    snake[0, 0, 3::4, 0] = 1
    snake[0, 0, 8, 8] = 5.0
    assert torch.equal(hysteresis_region(snake, 5.0, 1.0), (snake >= 1).float())
    with pytest.raises(ValueError, match="low threshold"):
        hysteresis_region(score, 1.0, 2.0)


def test_hysteresis_extends_the_guidance_mask_to_the_connected_rim_only():
    net = _network()
    x, brain = _images()
    score = torch.zeros_like(x)
    score[:, :, 10:20, 10:20] = 3.0   # a lesion's rim: z between the thresholds
    score[:, :, 14:16, 14:16] = 9.0   # its core: z above the threshold
    score[:, :, 25:28, 2:5] = 3.0     # an isolated faint spot: no core
    plain = GuidedScorer(net, _config(dilation=0, threshold=6.0, softness=1.0), "gating", _constant_source(0, 0))
    grown = GuidedScorer(net, _config(dilation=0, threshold=6.0, softness=1.0, hysteresis=1 / 3), "gating",
                         _constant_source(0, 0))
    assert float(plain.mask_from(score, brain).sum()) == 4 * x.shape[0]
    m = grown.mask_from(score, brain)
    expected = torch.zeros_like(x)
    expected[:, :, 10:20, 10:20] = 1
    assert torch.equal(m, expected * (brain > 0))
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="guidance.hysteresis"):
            _config(threshold=3.0, hysteresis=bad)
    with pytest.raises(ConfigError, match="guidance.hysteresis"):
        _config(threshold=-1.0, hysteresis=0.5)

def _constant_source(u_value: float, score_value: float):
    def source(net, images, brains):
        return GuidanceSignal(torch.full_like(images, u_value), torch.full_like(images, score_value))
    return source


def test_gating_with_full_uncertainty_holds_the_field_exactly():
    """u = 1 (z = +inf) → m = 1 → d = 0 there, not merely smaller."""
    net = _network()
    x, brain = _images()
    scorer = GuidedScorer(net, _config(dilation=0), "gating", _constant_source(1.0, float("inf")))
    pred = scorer(x, brain)
    assert float(pred.guidance_mask.min()) == 1.0
    assert float(pred.displacement.abs().max()) < 1e-5
    # a lesion-shaped m: the field is zero inside the square, free outside
    lesion = torch.zeros_like(x)
    lesion[:, :, 10:20, 10:20] = 1
    oracle = GuidedScorer(net, _config(dilation=0), "gating", oracle=True)
    pred = oracle(x, brain, lesion_masks=lesion)
    assert float(pred.displacement[:, :, 10:20, 10:20].abs().max()) < 1e-5
    assert float(pred.displacement[:, :, :6].abs().mean()) > 0.05


def test_masked_similarity_ignores_pixels_under_the_mask():
    """Changing x only where m = 1 leaves the MAP / cost-masking objective unchanged."""
    net = _network()
    x, brain = _images()
    lesion = torch.zeros_like(x)
    lesion[:, :, 8:16, 8:16] = 1
    scorer = GuidedScorer(net, _config("map", dilation=1), "map", oracle=True)
    m, _ = scorer.guidance_mask(x, brain, lesion)
    assert float(m[:, :, 7:17, 7:17].min()) == 1.0
    poisoned = x.clone()
    poisoned[m == 1] = torch.rand(int((m == 1).sum()), generator=torch.Generator().manual_seed(3))
    assert float((poisoned - x).abs().max()) > 0.3
    with torch.no_grad():
        start = net(x)
    for strategy in ("map", "cost_masking"):
        impl = STRATEGIES[strategy]()
        a, _ = impl.objective(scorer, x, start.reconstruction, start.velocity, m)
        b, _ = impl.objective(scorer, poisoned, start.reconstruction, start.velocity, m)
        assert float(a) == pytest.approx(float(b), abs=1e-6), strategy
    # the plain (unmasked) similarity does see those pixels: the control test-time optimisation
    tto = STRATEGIES["tto"]()
    a, _ = tto.objective(scorer, x, start.reconstruction, start.velocity, torch.zeros_like(m))
    b, _ = tto.objective(scorer, poisoned, start.reconstruction, start.velocity, torch.zeros_like(m))
    assert abs(float(a) - float(b)) > 1e-3


def test_controls_differ_from_map_only_in_their_terms():
    net = _network()
    x, brain = _images()
    lesion = torch.zeros_like(x)
    lesion[:, :, 8:16, 8:16] = 1
    config = _config("map", map_steps=5, dilation=0)
    with torch.no_grad():
        free = net(x)
    tto = GuidedScorer(net, config, "tto")(x, brain)  # needs no u: m = 0
    assert float(tto.guidance_mask.abs().max()) == 0.0
    assert float((tto.warped - free.warped).abs().max()) > 1e-4  # it did optimise
    cost = GuidedScorer(net, config, "cost_masking", oracle=True)(x, brain, lesion_masks=lesion)
    full = GuidedScorer(net, config, "map", oracle=True)(x, brain, lesion_masks=lesion)
    inside = (slice(None), slice(None), slice(8, 16), slice(8, 16))
    # the anchor (map only) holds the field harder under the mask than cost masking does
    assert float(full.displacement[inside].norm(dim=1).mean()) < float(cost.displacement[inside].norm(dim=1).mean())
    with pytest.raises(ValueError, match="no oracle-guided"):
        GuidedScorer(net, config, "tto", oracle=True)
    with pytest.raises(ValueError, match="no oracle-guided"):
        GuidedScorer(net, _config("iterative"), "iterative", oracle=True)


def test_strategy_registry_matches_the_config_choices():
    from anomorph.config import STRATEGIES as CONFIG_STRATEGIES

    assert set(STRATEGIES) == set(CONFIG_STRATEGIES)


def test_synthetic_masks_are_deterministic_and_in_range():
    brain = torch.zeros(4, 1, 32, 32)
    brain[:, :, 4:28, 4:28] = 1
    a = synthetic_anomaly_masks((4, 1, 32, 32), torch.Generator().manual_seed(5), brain, empty_probability=0.0)
    b = synthetic_anomaly_masks((4, 1, 32, 32), torch.Generator().manual_seed(5), brain, empty_probability=0.0)
    c = synthetic_anomaly_masks((4, 1, 32, 32), torch.Generator().manual_seed(6), brain, empty_probability=0.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert float((a * (1 - brain)).abs().max()) == 0.0
    assert bool((a.flatten(1).amax(1) > 0.2).all())


def test_conditioned_head_training_learns_to_hold_still(tiny_phantom, tmp_path):
    from anomorph.training import fit, load_run
    from conftest import tiny_run_config

    config = tiny_run_config(tiny_phantom, max_epochs=3, warmup_epochs=0)
    config.guidance.strategy = "conditioned"
    config.guidance.alpha = 50.0
    config.guidance.anchor_weight = 5.0
    run = fit(config, run_dir=tmp_path / "run")
    net, loaded = load_run(run, "last")
    assert net.guidance_channels == 1 and loaded.guidance.strategy == "conditioned"
    x, _ = _images()
    with torch.no_grad():
        free = net(x, guidance=torch.zeros_like(x)).displacement.norm(dim=1).mean()
        held = net(x, guidance=torch.ones_like(x)).displacement.norm(dim=1).mean()
    assert float(held) < float(free)


def test_guided_config_validation():
    from anomorph.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a deformable"):
        load_config(None, ["model.name=ae", "guidance.strategy=gating"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, ["model.name=morphaeus", "guidance.strategy=sideways"])


def _signal(value: float):
    return lambda residual, images: GuidanceSignal(torch.full_like(residual, min(value, 1.0)),
                                                   torch.full_like(residual, value))


def test_iterative_registers_then_holds_where_the_residual_is_abnormal():
    net = _network()
    x, brain = _images()
    config = _config("iterative", dilation=0)
    with torch.no_grad():
        free = net(x)
    calm = GuidedScorer(net, config, "iterative", residual_normaliser=_signal(0.0))
    assert torch.allclose(calm(x, brain).warped, free.warped, atol=1e-3)  # z = 0 → plain registration
    alarmed = GuidedScorer(net, config, "iterative", residual_normaliser=_signal(float("inf")))
    pred = alarmed(x, brain)  # z = inf everywhere after round 1 → the second round holds still
    assert float(pred.displacement.abs().max()) < 1e-5
    # the residual mask stays inside the brain
    half = brain.clone()
    half[..., :16] = 0
    pred = alarmed(x, half)
    assert float(pred.guidance_mask[..., :16].max()) == 0.0 and float(pred.guidance_mask[..., 16:].min()) == 1.0


def test_iterative_prediction_carries_the_u_its_mask_was_cut_from():
    """u of the iterative strategy is in its Prediction (its u AUROC can be reported) and, over
    several rounds, is the u of every round (max), so the final m is the mask of that u: with
    rounds=3 and the rounds flagging different halves, u and m cover both halves."""
    net = _network()
    x, brain = _images()
    calls = []

    def halves(residual, images):  # round 1 flags the left half, round 2 the right half
        z = torch.zeros_like(residual)
        if calls:
            z[..., 16:] = 10.0
        else:
            z[..., :16] = 10.0
        calls.append(1)
        return GuidanceSignal((z / 10.0).clamp(0, 1), z)

    scorer = GuidedScorer(net, _config("iterative", dilation=0, rounds=3), "iterative", residual_normaliser=halves)
    pred = scorer(x, brain)
    assert len(calls) == 2
    assert pred.uncertainty is not None and pred.uncertainty.shape == x.shape
    assert float(pred.guidance_mask.min()) == 1.0                    # both halves held
    assert float(pred.uncertainty.min()) == 1.0                      # ... and both in u
    assert torch.equal(scorer.mask_from(pred.uncertainty * 10.0, brain), pred.guidance_mask)
    # two rounds: u is that round's signal inside the brain
    calls.clear()
    half = brain.clone()
    half[..., :8] = 0
    pred = GuidedScorer(net, _config("iterative", dilation=0), "iterative", residual_normaliser=halves)(x, half)
    assert float(pred.uncertainty[..., :8].max()) == 0.0 and float(pred.uncertainty[..., 8:16].min()) == 1.0
    assert float(pred.uncertainty[..., 16:].max()) == 0.0


def test_iterative_with_one_round_registers_once():
    net = _network()
    x, brain = _images()
    calls = []
    handle = net.register_forward_hook(lambda *args: calls.append(1))
    try:
        scorer = GuidedScorer(net, _config("iterative", rounds=1), "iterative", residual_normaliser=_signal(float("inf")))
        pred = scorer(x, brain)
    finally:
        handle.remove()
    assert len(calls) == 1
    with torch.no_grad():
        assert torch.allclose(pred.warped, net(x).warped)


def test_guided_model_on_healthy_slices_is_close_to_unguided(tiny_phantom):
    """u normalised on healthy val slices stays low on healthy slices, so m ≈ 0 there."""
    from anomorph.data import SliceConfig, SliceDataset
    from anomorph.scoring.sources import uncertainty_source

    net = _network()
    healthy = SliceDataset(tiny_phantom, ["train"], SliceConfig(size=32, min_brain_fraction=0.0), healthy_only=True)
    fit_images, fit_brains = healthy.images[::2], healthy.brain_masks[::2]
    test_images, test_brains = healthy.images[1::2], healthy.brain_masks[1::2]
    source, _ = uncertainty_source("residual_z", net, fit_images, fit_brains)
    scorer = GuidedScorer(net, _config(threshold=4), "gating", source)  # z ≥ 4: m = 1
    guided = scorer(test_images, test_brains)
    with torch.no_grad():
        free = net(test_images)
    m, _ = scorer.guidance_mask(test_images, test_brains, None)
    assert float(m.mean()) < 0.05
    brain = test_brains > 0
    assert float((guided.warped - free.warped).abs()[brain].mean()) < 0.1 * float((test_images - free.warped).abs()[brain].mean())


def _old_refine(impl, scorer, images, start, m):
    """The test-time loop with every window moment filtered at every step, as before issue 15
    (the rest as the loop is now, so that only the moments' reuse is compared)."""
    prior = start.reconstruction.detach()
    velocity = start.velocity.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([velocity], lr=scorer.guidance.map_lr)
    with torch.enable_grad():
        for _ in range(scorer.guidance.map_steps):
            objective, _ = impl.objective(scorer, images, prior, velocity, m, None, with_output=False)
            optimiser.zero_grad()
            objective.backward()
            optimiser.step()
    with torch.no_grad():
        return impl.objective(scorer, images, prior, velocity.detach(), m, None)[1]


def test_fixed_window_moments_give_the_same_loss_gradient_and_registration():
    """The moments of (x, 1 − m) are filtered once per optimisation (issue 15): the loss, its
    gradient and the optimised registration equal the per-step computation to float precision."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(3, 1, 32, 32, generator=g), torch.rand(3, 1, 32, 32, generator=g)
    weight = (torch.rand(3, 1, 32, 32, generator=g) > 0.3).float()
    fixed = losses.FixedWindowMoments(y, weight, 9)
    grads = []
    values = []
    for moments in (None, fixed):
        moving = x.clone().requires_grad_(True)
        loss = losses.masked_local_ncc_loss(moving, y, weight, kernel_size=9, fixed=moments)
        loss.backward()
        values.append(float(loss.detach()))
        grads.append(moving.grad)
    assert values[0] == pytest.approx(values[1], abs=1e-6) and values[0] < -0.01
    assert float((grads[0] - grads[1]).abs().max()) < 1e-6 and float(grads[0].abs().max()) > 1e-4
    # moments of another image are not these: the check is not vacuous
    other = losses.masked_local_ncc_loss(x, y, weight, kernel_size=9, fixed=losses.FixedWindowMoments(x, weight, 9))
    assert abs(float(other) - values[0]) > 1e-3
    with pytest.raises(ValueError, match="kernel size"):
        losses.masked_local_ncc_loss(x, y, weight, kernel_size=7, fixed=fixed)

    net = _network()
    images, brain = _images()
    lesion = torch.zeros_like(images)
    lesion[:, :, 8:16, 8:16] = 1
    for strategy in ("map", "cost_masking"):
        scorer = GuidedScorer(net, _config(strategy, map_steps=8, dilation=1), strategy, oracle=True)
        m, _ = scorer.guidance_mask(images, brain, lesion)
        with torch.no_grad():
            start = net(images)
        new = scorer(images, brain, lesion_masks=lesion)
        old = _old_refine(scorer.strategy_impl, scorer, images, start, m)
        assert float((new.warped - start.warped).abs().max()) > 1e-3, strategy  # it did optimise
        assert float((new.warped - old.warped).abs().max()) < 1e-5, strategy
        assert float((new.displacement - old.displacement).abs().max()) < 1e-5, strategy


def test_test_time_strategies_start_from_the_estimators_plain_pass():
    """With an estimator that runs the plain pass (warped_residual), cost masking and MAP start
    from it instead of running the network again (issue 15): one network pass instead of two,
    the same prediction as from a fresh pass."""
    from anomorph.scoring.sources import uncertainty_source

    net = _network()
    images, brain = _images()
    healthy, healthy_brain = _images(seed=4)
    source, _ = uncertainty_source("warped_residual", net, healthy, healthy_brain)

    def without_start(network, x, brains):
        signal = source(network, x, brains)
        assert signal.start is not None  # warped_residual ran the plain pass
        return GuidanceSignal(signal.uncertainty, signal.score)

    passes = []
    hook = net.register_forward_hook(lambda module, args, out: passes.append(1))
    try:
        for strategy in ("cost_masking", "map"):
            config = _config(strategy, map_steps=6, threshold=0.5, dilation=0)
            results = []
            for signal_source in (source, without_start):
                passes.clear()
                results.append((GuidedScorer(net, config, strategy, signal_source)(images, brain), len(passes)))
            (reused, n_reused), (fresh, n_fresh) = results
            assert (n_reused, n_fresh) == (1, 2), strategy
            assert float(reused.guidance_mask.max()) > 0 and float(reused.guidance_mask.min()) == 0.0
            for field in ("anomaly_map", "warped", "displacement", "reconstruction"):
                difference = (getattr(reused, field) - getattr(fresh, field)).abs().max()
                assert float(difference) <= 1e-6, (strategy, field)
            assert float((reused.warped - net(images).warped).abs().max()) > 1e-4  # it did optimise
    finally:
        hook.remove()
