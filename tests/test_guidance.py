"""Uncertainty-guided registration: gating limits, weighted prior, test-time MAP, conditioning."""
from __future__ import annotations

import pytest
import torch

from anomorph.config import load_config
from anomorph.guidance import dilate_mask, log_jacobian_anchor, soft_mask, synthetic_anomaly_masks
from anomorph.guidance.scorer import GuidedScorer
from anomorph.networks import build_network
from anomorph.training import losses


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
    out = scorer.map_refine(x, start, m, history)
    assert len(history) == 16
    assert history[-1] < history[0]
    assert out.displacement.shape == (3, 2, 32, 32)
    assert not out.velocity.requires_grad


def test_soft_mask_and_dilation():
    u = torch.tensor([0.0, 0.45, 0.5, 0.55, 1.0]).view(1, 1, 1, 5)
    m = soft_mask(u, 0.5, 0.05)
    assert float(m[..., 2]) == pytest.approx(0.5)
    assert torch.all(m[..., 1:] >= m[..., :-1])
    assert torch.equal(soft_mask(u, 0.5, 0.0), (u > 0.5).float())
    point = torch.zeros(1, 1, 7, 7)
    point[0, 0, 3, 3] = 1
    assert int(dilate_mask(point, 2).sum()) == 25


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


def test_iterative_registers_then_holds_where_the_residual_is_abnormal():
    net = _network()
    x, brain = _images()
    config = _config("iterative", dilation=0)
    with torch.no_grad():
        free = net(x)
    calm = GuidedScorer(net, config, "iterative", residual_normaliser=lambda r, _: torch.zeros_like(r))
    assert torch.allclose(calm(x, brain).warped, free.warped, atol=1e-3)  # u = 0 → plain registration
    alarmed = GuidedScorer(net, config, "iterative", residual_normaliser=lambda r, _: torch.ones_like(r))
    pred = alarmed(x, brain)  # u = 1 everywhere after round 1 → the second round holds still
    assert float(pred.displacement.abs().max()) < 1e-3


def test_guided_model_on_healthy_slices_is_close_to_unguided(tiny_phantom):
    """u normalised on healthy val slices stays low on healthy slices, so m ≈ 0 there."""
    from anomorph.data import SliceConfig, SliceDataset
    from anomorph.guidance.sources import uncertainty_source

    net = _network()
    healthy = SliceDataset(tiny_phantom, ["train"], SliceConfig(size=32, min_brain_fraction=0.0), healthy_only=True)
    fit_images, fit_brains = healthy.images[::2], healthy.brain_masks[::2]
    test_images, test_brains = healthy.images[1::2], healthy.brain_masks[1::2]
    source, _ = uncertainty_source("residual_z", net, fit_images, fit_brains)
    scorer = GuidedScorer(net, _config(threshold=0.99), "gating", source)
    guided = scorer(test_images, test_brains)
    with torch.no_grad():
        free = net(test_images)
    m, _ = scorer.guidance_mask(test_images, test_brains, None)
    assert float(m.mean()) < 0.05
    brain = test_brains > 0
    assert float((guided.warped - free.warped).abs()[brain].mean()) < 0.1 * float((test_images - free.warped).abs()[brain].mean())
