"""Training: a real (tiny) fit end to end, resume, schedule, checkpoint safety."""
from __future__ import annotations

import pickle

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
    assert sorted(p.name for p in (run / "figures").glob("*.png")) == [f"val_epoch00{i}.png" for i in range(3)]
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
