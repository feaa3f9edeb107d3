"""Training: a real (tiny) fit end to end, resume, schedule, checkpoint safety."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

from anomorph.errors import CheckpointError, ConfigError
from anomorph.training import fit, load_checkpoint, load_run, read_training_log
from conftest import tiny_run_config


def test_tiny_fit_writes_run_dir_and_follows_beta_schedule(tiny_phantom, tmp_path):
    config = tiny_run_config(tiny_phantom, beta_start=0.5, beta_end=2.0)
    run = fit(config, run_dir=tmp_path / "run")
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    # figures at the first epoch and the last of max_epochs = 3 (figure_every_n_epochs = 5)
    assert sorted(p.name for p in (run / "figures").glob("*.png")) == ["val_epoch000.png", "val_epoch002.png"]
    assert list((run / "logs" / "tensorboard" / "session0").glob("events.out.tfevents*"))
    rows = read_training_log(run)
    beta = {int(r["epoch"]): float(r["train/beta"]) for r in rows if r.get("train/beta")}
    # warm-up epoch 0: registration off; then a linear ramp 0.5 → 2.0 over 2 epochs
    assert beta == pytest.approx({0: 0.0, 1: 0.5, 2: 1.25})
    ncc = [r["train/ncc_epoch"] for r in rows if r.get("train/ncc_epoch")]
    assert len(ncc) == 2  # only the two post-warm-up epochs have a registration term
    network, loaded = load_run(run)
    assert loaded == config
    x = torch.rand(2, 1, 32, 32)
    out = network(x)
    assert out.warped.shape == x.shape and out.displacement.shape == (2, 2, 32, 32)


def test_validation_figures_every_n_epochs_and_at_the_end(tiny_phantom, tmp_path):
    def figures(run):
        return sorted(int(p.stem[-3:]) for p in (run / "figures").glob("val_epoch*.png"))

    run = fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=4, figure_every_n_epochs=2),
              run_dir=tmp_path / "every2")
    assert figures(run) == [0, 2, 3]
    steps_per_epoch = load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] // 4
    # stopped by max_steps after epoch 1 of 10: the last validated epoch is drawn at the end
    run = fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=10, max_steps=2 * steps_per_epoch,
                              figure_every_n_epochs=5), run_dir=tmp_path / "stopped")
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert figures(run) == [0, 1]


def test_resume_continues_from_saved_step(tiny_phantom, tmp_path):
    config = tiny_run_config(tiny_phantom, max_epochs=1)
    run = fit(config, run_dir=tmp_path / "run")
    first = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert first["epoch"] == 0
    step = first["global_step"]
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        fit(config, run_dir=run)
    # extend the run to 2 epochs, then resume
    text = (run / "config.yaml").read_text().replace("max_epochs: 1", "max_epochs: 2")
    (run / "config.yaml").write_text(text)
    fit(config, run_dir=run, resume=True)
    second = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert second["epoch"] == 1 and second["global_step"] == 2 * step
    rows = read_training_log(run)
    epochs = [int(r["epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert epochs == [0, 1]  # the first session's log survives the resume
    steps = [int(r["step"]) for r in rows if r.get("train/loss_epoch")]
    assert steps == [step - 1, 2 * step - 1]


def test_same_seed_same_weights(tiny_phantom, tmp_path):
    config = tiny_run_config(tiny_phantom, model="ae", max_epochs=1)
    a = load_checkpoint(fit(config, run_dir=tmp_path / "a") / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(fit(config, run_dir=tmp_path / "b") / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_channels_last_training_is_the_same_function(tiny_phantom, tmp_path):
    """On CPU fit stores the 2-d network and its batches channels-last; the weights it learns equal
    an NCHW fit's up to float rounding, and the checkpoint loads into a plain (NCHW) network."""
    import lightning as L

    from anomorph.config import config_to_dict
    from anomorph.data.types import SliceBatch
    from anomorph.training.module import AnomalyModule

    seen = []

    class LayoutProbe(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            conv = next(m for m in module.network.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
            seen.append(conv.weight.is_contiguous(memory_format=torch.channels_last))

    runs = {}
    for flag in (True, False):
        config = tiny_run_config(tiny_phantom, model="morphaeus", max_epochs=2, channels_last=flag)
        seen.clear()
        runs[flag] = fit(config, run_dir=tmp_path / f"cl{flag}", callbacks=[LayoutProbe()])
        assert seen and set(seen) == {flag}
    a, b = (load_checkpoint(runs[f] / "checkpoints" / "last.ckpt")["state_dict"] for f in (True, False))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-3
    network, _ = load_run(runs[True])
    x = torch.rand(2, 1, 32, 32)
    assert network(x).warped.shape == x.shape
    on = AnomalyModule(config_to_dict(tiny_run_config(tiny_phantom, model="ae")))
    assert on.memory_format(torch.device("cpu")) is torch.channels_last
    assert on.memory_format(torch.device("cuda")) is torch.contiguous_format
    assert AnomalyModule(config_to_dict(config)).memory_format(torch.device("cpu")) is torch.contiguous_format
    # batches follow (a 1-channel NCHW tensor already counts as channels-last: use 3 channels)
    on._layout = on.apply_memory_format(torch.device("cpu"))
    image = torch.rand(2, 3, 8, 8)
    batch = SliceBatch(image=image, mask=torch.zeros(2, 1, 8, 8), brain_mask=torch.ones(2, 1, 8, 8),
                       healthy=torch.zeros(2, 1, 8, 8), has_healthy=torch.zeros(2, dtype=torch.bool),
                       label=torch.zeros(2, dtype=torch.long))
    moved = on.in_layout(batch)
    assert moved.image.stride() == (192, 1, 24, 3) and torch.equal(moved.image, image)


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as handle:
        pickle.dump({"state_dict": payload}, handle)
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        load_checkpoint(path)
    assert not marker.exists()
    with path.open("rb") as handle:  # the payload is real: plain unpickling runs it
        pickle.load(handle)
    assert marker.exists()


def test_incompatible_checkpoint_gives_clear_error(tiny_phantom, tmp_path):
    run = fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=1), run_dir=tmp_path / "run")
    ckpt = load_checkpoint(run / "checkpoints" / "best.ckpt")
    ckpt["hyper_parameters"]["config"]["model"]["options"]["latent_dim"] = 64
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_run(run)


def test_non_finite_loss_stops_with_step_and_last_checkpoint(tiny_phantom, tmp_path, monkeypatch):
    from anomorph.errors import NonFiniteLossError
    from anomorph.training.module import AnomalyModule

    original = AnomalyModule.compute_losses

    def poisoned(self, x, out, beta, **kwargs):
        terms = original(self, x, out, beta, **kwargs)
        if self.training and self.current_epoch == 1:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(AnomalyModule, "compute_losses", poisoned)
    config = tiny_run_config(tiny_phantom, model="ae", max_epochs=2)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, global step \d+.*last\.ckpt"):
        fit(config, run_dir=tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["epoch"] == 0


def test_the_optimizer_is_fused_adam_on_cpu_and_steps_like_the_reference_adam(tiny_phantom):
    """configure_optimizers: fused Adam for CPU parameters; three of its steps equal PyTorch's
    reference per-parameter Adam loop (foreach=False) on the same gradients to float rounding."""
    from anomorph.config import config_to_dict
    from anomorph.training.module import AnomalyModule

    module = AnomalyModule(config_to_dict(tiny_run_config(tiny_phantom, model="ae")))
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"] is True
    params = list(module.network.parameters())
    initial = [p.detach().clone() for p in params]
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    reference = torch.optim.Adam(twins, lr=optimizer.defaults["lr"], weight_decay=optimizer.defaults["weight_decay"],
                                 foreach=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    moved = max(float((p - q).abs().max()) for p, q in zip(params, twins))
    assert moved < 1e-6
    assert max(float((p.detach() - p0).abs().max()) for p, p0 in zip(params, initial)) > 1e-4  # it did step


def test_losses_are_float32_under_bf16_autocast():
    """Under ``train.precision: bf16-mixed`` the outputs arrive in bf16 inside an autocast region;
    the loss must equal the float32 loss of the same values (bf16 local NCC windows gave −3·10⁶)."""
    from anomorph.networks import ModelOutput
    from anomorph.training.module import AnomalyModule

    config = tiny_run_config(Path("unused.csv"))
    module = AnomalyModule(dataclasses.asdict(config))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(4, 1, 32, 32, generator=g), 5, 1, 2)
    out = ModelOutput(reconstruction=(x * 0.8 + 0.1 * smooth), warped=(x * 0.9 + 0.05 * smooth),
                      velocity=torch.randn(4, 2, 32, 32, generator=g) * 0.3,
                      displacement=torch.randn(4, 2, 32, 32, generator=g) * 0.3)
    reference = module.compute_losses(x, out, 0.1)
    low = ModelOutput(*(v.bfloat16() if isinstance(v, torch.Tensor) else v for v in
                        (out.reconstruction, out.warped, out.velocity, out.displacement)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.compute_losses(x, low, 0.1)
        mixed_same_inputs = module.compute_losses(x, out, 0.1)
    for key in ("mse", "ssim", "ncc", "smooth", "loss"):
        assert mixed[key].dtype == torch.float32
        assert float(mixed_same_inputs[key]) == pytest.approx(float(reference[key]), rel=1e-5, abs=1e-6)
        # bf16 *values* (rounded outputs) differ only by their rounding, not by orders of magnitude
        assert float(mixed[key]) == pytest.approx(float(reference[key]), rel=0.05, abs=2e-3)
