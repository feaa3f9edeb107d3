"""``train.synthetic_anomalies``: the deformable AE's field is trained on slices with synthetic
anomalies, registering the clean prior to them with the similarity masked and the deformation
held inside the synthetic mask."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from anomorph.config import load_config
from anomorph.errors import ConfigError
from anomorph.losses import displacement_consistency
from anomorph.training.module import AnomalyModule
from conftest import tiny_run_config


def _module(train: tuple[str, ...] = (), **guidance) -> AnomalyModule:
    overrides = ["model.name=morphaeus", "data.size=32", "model.channels=[8,16,32]", "model.strides=[2,2,2]",
                 "model.latent_dim=16", "model.head_channels=[8,16]", "train.synthetic_anomalies=true", *train]
    overrides += [f"guidance.{k}={v}" for k, v in guidance.items()]
    config = load_config(None, overrides)
    torch.manual_seed(0)
    module = AnomalyModule(dataclasses.asdict(config))
    with torch.no_grad():  # a head that deforms visibly (training starts near identity)
        module.network.velocity_head.velocity.weight.normal_(0, 0.3)
    return module.eval()


def _batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 32, 32, generator=g) * 0.5 + 0.25
    brain = torch.zeros(n, 1, 32, 32)
    brain[..., 3:29, 3:29] = 1
    return x, brain


def test_the_prior_reads_the_clean_slice_and_the_field_the_corrupted_one():
    module = _module(mask_probability=0.5)
    x, brain = _batch()
    with torch.no_grad():
        out, m, corrupted, clean_branch, teacher = module.anomaly_aware_forward(x, brain)
        clean = module.network(x)
        again = module.anomaly_aware_forward(x, brain)
    # x̂ is the clean slice's reconstruction, bit for bit: the prior never sees a synthetic anomaly
    assert torch.equal(out.reconstruction, clean.reconstruction)
    # the corruption stays inside the brain, m marks changed brain pixels only
    assert torch.equal(corrupted * (1 - brain), x * (1 - brain))
    assert float((m * (1 - brain)).max()) == 0.0 and set(m.unique().tolist()) <= {0.0, 1.0}
    assert bool(((corrupted - x).abs().amax(1, keepdim=True)[m > 0] >= 0.05).all())
    touched = (corrupted != x).flatten(1).any(1)
    assert 0 < int(touched.sum()) < len(x)  # mask_probability 0.5: some slices corrupted, some clean
    # the field reads the corrupted slice: unchanged slices give the clean forward's field, the
    # corrupted ones another
    assert torch.equal(out.velocity[~touched], clean.velocity[~touched])
    assert not torch.allclose(out.velocity[touched], clean.velocity[touched])
    # the same training step draws the same anomalies (a resumed run repeats them)
    assert torch.equal(again[2], corrupted) and torch.equal(again[1], m)
    assert clean_branch is None and teacher is None  # field_consistency_weight null: no clean field computed


def test_blob_count_and_radius_settings_bound_the_synthetic_mask():
    """Radii are fractions of the side: at 32², radius ≤ 0.03 is ≤ 0.96 px, so each blob's
    half-weight region holds at most π·0.96² < 3 pixels; radius 0.2–0.25 blobs hold dozens."""
    x, brain = _batch()
    small = _module(("train.synthetic_max_blobs=2", "train.synthetic_radius_range=[0.02,0.03]"), mask_probability=1.0)
    large = _module(("train.synthetic_max_blobs=2", "train.synthetic_radius_range=[0.2,0.25]"), mask_probability=1.0)
    with torch.no_grad():
        m_small = small.anomaly_aware_forward(x, brain).mask
        m_large = large.anomaly_aware_forward(x, brain).mask
    assert float(m_small.flatten(1).sum(1).max()) <= 2 * 3
    assert float(m_large.flatten(1).sum(1).max()) > 30


def test_the_registration_loss_ignores_what_the_synthetic_anomaly_contains():
    """Poisoned input: whatever the corrupted slice holds inside m, the similarity term is the
    same (masked out), while the stiffness and anchor terms act there."""
    module = _module(mask_probability=1.0, alpha=20.0, anchor_weight=1.0)
    x, brain = _batch()
    with torch.no_grad():
        out, m, corrupted, _, _ = module.anomaly_aware_forward(x, brain)
        poisoned = torch.where(m > 0, torch.rand_like(corrupted), corrupted)
        terms = module.compute_losses(x, out, 0.1, guidance=m, registration_target=corrupted)
        terms_poisoned = module.compute_losses(x, out, 0.1, guidance=m, registration_target=poisoned)
        unmasked = module.compute_losses(x, out, 0.1, registration_target=poisoned)
        unmasked_ref = module.compute_losses(x, out, 0.1, registration_target=corrupted)
    assert float(m.sum()) > 0
    assert float(terms["ncc"]) == pytest.approx(float(terms_poisoned["ncc"]), abs=1e-6)
    assert abs(float(unmasked["ncc"]) - float(unmasked_ref["ncc"])) > 1e-3  # the poison is visible unmasked
    assert float(terms["anchor"]) > 0 and float(terms["smooth"]) > float(unmasked["smooth"])


def test_fit_with_synthetic_anomalies_trains_the_masked_registration(tiny_phantom, tmp_path):
    from anomorph.training import fit, load_run, read_training_log

    config = tiny_run_config(tiny_phantom, max_epochs=2, warmup_epochs=0, synthetic_anomalies=True)
    run = fit(config, run_dir=tmp_path / "run")
    network, loaded = load_run(run)
    assert loaded.train.synthetic_anomalies and network.guidance_channels == 0  # no mask input at inference
    rows = read_training_log(run)
    # the anchor term exists only on the synthetic-mask path: every epoch trained through it
    anchor = [float(r["train/anchor_epoch"]) for r in rows if r.get("train/anchor_epoch")]
    assert len(anchor) == 2 and all(a >= 0 for a in anchor)
    # the control without the mask: the same corrupted inputs (the field's input changes the
    # loss), registration unmasked and unheld (no anchor term)
    control_config = tiny_run_config(tiny_phantom, max_epochs=1, warmup_epochs=0, synthetic_anomalies=True,
                                     synthetic_anomaly_mask=False)
    control = fit(control_config, run_dir=tmp_path / "control")
    plain = fit(tiny_run_config(tiny_phantom, max_epochs=1, warmup_epochs=0), run_dir=tmp_path / "plain")
    assert not any(r.get("train/anchor_epoch") for r in read_training_log(control))
    first_loss = [float(r["train/ncc_epoch"]) for r in read_training_log(control) if r.get("train/ncc_epoch")]
    plain_loss = [float(r["train/ncc_epoch"]) for r in read_training_log(plain) if r.get("train/ncc_epoch")]
    assert first_loss[0] != plain_loss[0]  # same seed, same data: only the corrupted inputs differ


def test_field_consistency_ties_the_corrupted_slices_field_to_the_clean_slices_field():
    """The clean branch is the network's own registration of the clean slice (brute force: its
    forward on x); the tie is zero on slices left clean and positive on corrupted ones; the
    registration terms are the mean of both branches'; the tie's gradient reaches both fields."""
    module = _module(("train.field_consistency_weight=10",), mask_probability=0.5, alpha=0.0, anchor_weight=0.0)
    x, brain = _batch()
    with torch.no_grad():
        out, m, corrupted, clean_branch, _ = module.anomaly_aware_forward(x, brain)
        clean = module.network(x)
        alone = _module(mask_probability=0.5, alpha=0.0, anchor_weight=0.0).anomaly_aware_forward(x, brain)
    torch.testing.assert_close(clean_branch.displacement, clean.displacement)
    torch.testing.assert_close(clean_branch.warped, clean.warped)
    torch.testing.assert_close(out.displacement, alone.output.displacement)  # batching both changes nothing
    touched = (corrupted != x).flatten(1).any(1)
    assert 0 < int(touched.sum()) < len(x)
    per_slice = (out.displacement - clean_branch.displacement).pow(2).sum(1).flatten(1).mean(1)
    assert float(per_slice[~touched].max()) < 1e-10 and float(per_slice[touched].min()) > 1e-6
    terms = module.compute_losses(x, out, 0.1, guidance=m, registration_target=corrupted, clean_branch=clean_branch)
    assert float(terms["consistency"]) == pytest.approx(float(per_slice.mean()), rel=1e-3)
    plain = module.compute_losses(x, clean, 0.1)
    assert float(terms["ncc_clean"]) == pytest.approx(float(plain["ncc"]), abs=1e-6)
    without = module.compute_losses(x, out, 0.1, guidance=m, registration_target=corrupted)
    assert "consistency" not in without
    # weight 0, the control: both fields trained (the clean branch exists), not tied
    control = _module(("train.field_consistency_weight=0",), mask_probability=0.5, alpha=0.0, anchor_weight=0.0)
    with torch.no_grad():
        c_out, c_m, c_corrupted, c_clean, _ = control.anomaly_aware_forward(x, brain)
        c_terms = control.compute_losses(x, c_out, 0.1, guidance=c_m, registration_target=c_corrupted,
                                         clean_branch=c_clean)
    assert c_clean is not None and float(c_terms["consistency"]) > 0
    assert float(c_terms["loss"]) == pytest.approx(float(
        c_terms["mse"] + c_terms["ssim"] + (c_terms["ncc"] + c_terms["ncc_clean"]) / 2
        + 0.1 * (c_terms["smooth"] + c_terms["smooth_clean"]) / 2), abs=1e-5)
    expected = (without["loss"] + 0.5 * (terms["ncc_clean"] - terms["ncc"])
                + 0.1 * 0.5 * (terms["smooth_clean"] - terms["smooth"]) + 10 * terms["consistency"])
    assert float(terms["loss"]) == pytest.approx(float(expected), abs=1e-5)
    # the tie's gradient reaches both branches: each alone has a non-zero gradient
    module.train()
    for branch in ("corrupted", "clean"):
        out, m, corrupted, clean_branch, _ = module.anomaly_aware_forward(x, brain)
        tied = (out.displacement, clean_branch.displacement.detach()) if branch == "corrupted" else \
            (out.displacement.detach(), clean_branch.displacement)
        module.zero_grad()
        displacement_consistency(*tied).backward()
        assert float(module.network.velocity_head.velocity.weight.grad.abs().sum()) > 0, branch


def test_fit_with_field_consistency_logs_the_term(tiny_phantom, tmp_path):
    from anomorph.training import fit, read_training_log

    config = tiny_run_config(tiny_phantom, max_epochs=2, warmup_epochs=0, synthetic_anomalies=True,
                             field_consistency_weight=10.0)
    rows = read_training_log(fit(config, run_dir=tmp_path / "run"))
    consistency = [float(r["train/consistency_epoch"]) for r in rows if r.get("train/consistency_epoch")]
    assert len(consistency) == 2 and all(c >= 0 for c in consistency)


def test_mean_teacher_tie_targets_the_teachers_clean_field_and_trains_only_the_corrupted_field():
    """``train.consistency_teacher_decay``: the tie's target is the teacher's displacement of the
    clean slice (brute force: an eval-mode copy of the network), it sends no gradient to the clean
    branch or the teacher, and each optimiser step moves the teacher by the EMA rule."""
    import copy

    module = _module(("train.field_consistency_weight=10", "train.consistency_teacher_decay=0.9"),
                     mask_probability=0.5, alpha=0.0, anchor_weight=0.0)
    module.consistency_teacher.update_parameters(module.network)  # the first update copies the network
    reference = copy.deepcopy(module.network).eval()
    x, brain = _batch()
    module.train()  # the teacher stays in eval mode: no dropout, running statistics
    out, m, corrupted, clean_branch, teacher = module.anomaly_aware_forward(x, brain)
    with torch.no_grad():
        expected = reference(x).displacement
    torch.testing.assert_close(teacher, expected)
    torch.testing.assert_close(module.teacher_displacement(x), expected)
    assert not teacher.requires_grad and clean_branch is not None
    # during the warm-up (registration off, no tie) the teacher's pass is skipped
    assert module.anomaly_aware_forward(x, brain, registration=False).teacher_displacement is None
    terms = module.compute_losses(x, out, 0.1, guidance=m, registration_target=corrupted, clean_branch=clean_branch,
                                  consistency_target=teacher)
    per_slice = (out.displacement - expected).pow(2).sum(1).flatten(1).mean(1)
    assert float(terms["consistency"].detach()) == pytest.approx(float(per_slice.detach().mean()), rel=1e-4)
    symmetric = module.compute_losses(x, out, 0.1, guidance=m, registration_target=corrupted, clean_branch=clean_branch)
    assert float(terms["consistency"].detach()) != pytest.approx(float(symmetric["consistency"].detach()), rel=1e-3)
    into_clean, into_corrupted = torch.autograd.grad(terms["consistency"], [clean_branch.displacement, out.displacement],
                                                     allow_unused=True, retain_graph=True)
    assert into_clean is None and float(into_corrupted.abs().sum()) > 0
    assert all(not p.requires_grad for p in module.consistency_teacher.parameters())
    # one optimiser step, then the EMA step: teacher = 0.9 teacher + 0.1 network, weights and buffers
    before = {k: v.clone() for k, v in module.consistency_teacher.module.state_dict().items()}
    optimiser = module.configure_optimizers()
    optimiser.zero_grad()
    terms["loss"].backward()
    optimiser.step()
    module.on_train_batch_end(None, None, 0)
    after, network = module.consistency_teacher.module.state_dict(), module.network.state_dict()
    moved = 0
    for key, old in before.items():
        if old.is_floating_point():
            torch.testing.assert_close(after[key], 0.9 * old + 0.1 * network[key], rtol=1e-5, atol=1e-7)
            moved += int(not torch.equal(after[key], old))
    assert moved > 0


def test_fit_with_a_mean_teacher_checkpoints_the_teacher_and_loads_the_network(tiny_phantom, tmp_path):
    from anomorph.training import fit, load_run, read_training_log

    config = tiny_run_config(tiny_phantom, max_epochs=2, warmup_epochs=0, synthetic_anomalies=True,
                             field_consistency_weight=10.0, consistency_teacher_decay=0.5)
    run = fit(config, run_dir=tmp_path / "run")
    consistency = [float(r["train/consistency_epoch"]) for r in read_training_log(run)
                   if r.get("train/consistency_epoch")]
    assert len(consistency) == 2 and all(c >= 0 for c in consistency)
    network, loaded = load_run(run)  # the network's weights only; the teacher is not what predict runs
    assert loaded.train.consistency_teacher_decay == 0.5
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    teacher_keys = [k for k in state if k.startswith("consistency_teacher.module.")]
    assert teacher_keys and int(state["consistency_teacher.n_averaged"]) > 1
    # the teacher lags the network: an average of its past weights, not a copy
    name = "velocity_head.velocity.weight"
    assert not torch.equal(state[f"consistency_teacher.module.{name}"], state[f"network.{name}"])
    torch.testing.assert_close(network.state_dict()[name], state[f"network.{name}"])


def test_a_frozen_teacher_run_gives_the_target_and_never_moves(tiny_phantom, tiny_calibrated_run, tmp_path):
    """``train.consistency_teacher_run``: the target is the trained run's displacement of the
    clean slice (brute force: ``load_run``'s network), no optimiser step moves the teacher, and a
    run trained with it loads as a plain network."""
    from anomorph.training import fit, load_run

    teacher_network, _ = load_run(tiny_calibrated_run)
    config = tiny_run_config(tiny_phantom, max_epochs=1, warmup_epochs=0, synthetic_anomalies=True,
                             field_consistency_weight=10.0, consistency_teacher_run=str(tiny_calibrated_run))
    module = AnomalyModule(dataclasses.asdict(config)).train()
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    brain = torch.ones_like(x)
    with torch.no_grad():
        expected = teacher_network(x).displacement
    out, m, corrupted, clean_branch, teacher = module.anomaly_aware_forward(x, brain)
    torch.testing.assert_close(teacher, expected)
    before = {k: v.clone() for k, v in module.consistency_teacher.state_dict().items()}
    terms = module.compute_losses(x, out, 0.1, guidance=m, registration_target=corrupted, clean_branch=clean_branch,
                                  consistency_target=teacher)
    optimiser = module.configure_optimizers()
    optimiser.zero_grad()
    terms["loss"].backward()
    optimiser.step()
    module.on_train_batch_end(None, None, 0)
    assert all(torch.equal(v, before[k]) for k, v in module.consistency_teacher.state_dict().items())
    assert all(p.grad is None for p in module.consistency_teacher.parameters())
    run = fit(config, run_dir=tmp_path / "student")
    network, loaded = load_run(run)
    assert loaded.train.consistency_teacher_run == str(tiny_calibrated_run)
    assert sum(p.numel() for p in network.parameters()) == sum(p.numel() for p in teacher_network.parameters())


def test_finetuning_from_the_teacher_trains_the_velocity_head_only_and_keeps_the_teachers_prior(
        tiny_phantom, tiny_calibrated_run, tmp_path):
    """``train.finetune_from_teacher``: the run starts from the teacher's weights; after training
    the prior (encoder, decoder, batch-norm statistics included) is the teacher's bit for bit, so x̂
    is the teacher's, while the velocity head has moved."""
    from anomorph.training import fit, load_run

    teacher, _ = load_run(tiny_calibrated_run)
    config = tiny_run_config(tiny_phantom, max_epochs=1, warmup_epochs=0, beta_ramp_epochs=0, synthetic_anomalies=True,
                             field_consistency_weight=10.0, consistency_teacher_run=str(tiny_calibrated_run),
                             finetune_from_teacher=True)
    start = AnomalyModule(dataclasses.asdict(config))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in start.network.state_dict().items())
    network, _ = load_run(fit(config, run_dir=tmp_path / "student"), "last")
    prior = {k: v for k, v in network.state_dict().items() if k.startswith("prior.")}
    assert prior and all(torch.equal(v, teacher.state_dict()[k]) for k, v in prior.items())
    head = [k for k in network.state_dict() if k.startswith("velocity_head.") and "weight" in k]
    assert head and any(not torch.equal(network.state_dict()[k], teacher.state_dict()[k]) for k in head)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(network(x).reconstruction, teacher(x).reconstruction)
    with pytest.raises(ConfigError, match=r"train\.finetune_from_teacher"):
        tiny_run_config(tiny_phantom, synthetic_anomalies=True, field_consistency_weight=1.0,
                        finetune_from_teacher=True)


def test_a_teacher_run_that_cannot_be_the_teacher_is_a_config_error_naming_the_key(tiny_phantom, tmp_path):
    from anomorph.training import fit

    for teacher in (tmp_path / "nowhere", None):
        if teacher is None:  # an AE run: no field to be tied to
            teacher = fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=1), run_dir=tmp_path / "ae")
        config = tiny_run_config(tiny_phantom, max_epochs=1, synthetic_anomalies=True, field_consistency_weight=1.0,
                                 consistency_teacher_run=str(teacher))
        with pytest.raises(ConfigError, match=r"train\.consistency_teacher_run"):
            fit(config, run_dir=tmp_path / "student")
        assert not (tmp_path / "student").exists()  # nothing written


@pytest.mark.parametrize("overrides, key", [
    (["model.name=morphaeus", "train.field_consistency_weight=0"], "train.field_consistency_weight"),
    (["model.name=morphaeus", "train.synthetic_anomalies=true", "train.field_consistency_weight=-1"],
     "train.field_consistency_weight"),
    (["model.name=morphaeus", "train.synthetic_anomalies=true", "train.field_consistency_weight=.nan"],
     "train.field_consistency_weight"),
    (["model.name=ae", "train.synthetic_anomalies=true"], "train.synthetic_anomalies"),
    (["model.name=morphaeus", "guidance.strategy=conditioned", "train.synthetic_anomalies=true"],
     "train.synthetic_anomalies"),
    (["model.name=morphaeus", "train.synthetic_anomaly_mask=false"], "train.synthetic_anomaly_mask"),
    (["model.name=morphaeus", "guidance.mask_probability=1.5"], "guidance.mask_probability"),
    (["model.name=morphaeus", "guidance.alpha=-1"], "guidance.alpha"),
    (["model.name=morphaeus", "train.synthetic_radius_range=[0.2,0.1]"], "train.synthetic_radius_range"),
    (["model.name=morphaeus", "train.synthetic_anomalies=true", "train.consistency_teacher_decay=0.9"],
     "train.consistency_teacher_decay"),
    (["model.name=morphaeus", "train.synthetic_anomalies=true", "train.field_consistency_weight=1",
      "train.consistency_teacher_decay=1.0"], "train.consistency_teacher_decay"),
    (["model.name=morphaeus", "train.synthetic_anomalies=true", "train.field_consistency_weight=1",
      "train.consistency_teacher_decay=-0.1"], "train.consistency_teacher_decay"),
    (["model.name=morphaeus", "train.synthetic_anomalies=true", "train.field_consistency_weight=1",
      "train.consistency_teacher_decay=.nan"], "train.consistency_teacher_decay"),
    (["model.name=morphaeus", "train.synthetic_anomalies=true", "train.consistency_teacher_run=runs/x"],
     "train.consistency_teacher_run"),
    (["model.name=morphaeus", "train.synthetic_anomalies=true", "train.field_consistency_weight=1",
      "train.consistency_teacher_decay=0.9", "train.consistency_teacher_run=runs/x"], "train.consistency_teacher_run"),
    (["model.name=morphaeus", "train.synthetic_max_blobs=0"], "train.synthetic_max_blobs"),
])
def test_invalid_synthetic_anomaly_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)
