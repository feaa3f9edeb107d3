"""Slow end-to-end checks (``make test-slow``): kill -9 and resume, DDP on CPU, the demo."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anomorph.config import save_config
from anomorph.training import load_checkpoint, read_training_log
from conftest import tiny_run_config

pytestmark = pytest.mark.slow


def _fit_command(config_path: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "anomorph.cli.main", "fit", "--config", str(config_path), "--run-dir", str(run_dir),
            *extra]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tiny_phantom, tmp_path):
    config = tiny_run_config(tiny_phantom, max_epochs=6, warmup_epochs=2, beta_ramp_epochs=3)
    config_path = tmp_path / "config.yaml"
    save_config(config, config_path)
    reference = tmp_path / "reference"
    subprocess.run(_fit_command(config_path, reference), check=True, capture_output=True)

    run = tmp_path / "killed"
    process = subprocess.Popen(_fit_command(config_path, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:  # wait until epoch 2 is under way (a checkpoint exists, more to do)
        rows = read_training_log(run) if (run / "logs").exists() else []
        if any(r.get("epoch") == "2" and r.get("train/loss_step") for r in rows):
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"]
    assert killed_at < 5, "the run finished before it could be killed"
    assert not list((run / "checkpoints").glob("*.tmp*"))
    subprocess.run([sys.executable, "-m", "anomorph.cli.main", "fit", "--resume", str(run)], check=True,
                   capture_output=True)
    a = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    b = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 5 and a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_ddp_two_cpu_processes(tiny_phantom, tmp_path):
    config = tiny_run_config(tiny_phantom, model="ae", max_epochs=2)
    config_path = tmp_path / "config.yaml"
    save_config(config, config_path)
    done = subprocess.run(_fit_command(config_path, tmp_path / "run", "--accelerator", "cpu", "--devices", "2",
                                       "--strategy", "ddp"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert checkpoint["epoch"] == 1
    # the 2 processes split each epoch's slices: ceil(ceil(n / 2) / batch) steps per epoch
    from anomorph.data import SliceDataset
    from anomorph.training.datamodule import slice_config

    n = len(SliceDataset(tiny_phantom, ["train"], slice_config(config.data), healthy_only=True))
    per_process = -(-n // 2)
    assert checkpoint["global_step"] == 2 * -(-per_process // config.data.batch_size)


def test_demo_runs_end_to_end(tmp_path):
    from anomorph.benchmark.demo import run_demo

    result = run_demo(tmp_path / "demo", epochs=2)
    assert result.report.is_file()
    assert "morphaeus+" in result.table and "oracle" in result.table  # the guided row best on val
