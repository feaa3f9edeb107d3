"""Issue 16 (reliability, round two): metric files with non-finite values, checkpoints that are the
latest state and survive a failed write, run-directory locks, output collisions, memory bombs."""
from __future__ import annotations

import concurrent.futures
import importlib
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anomorph.cli.main import main
from conftest import write_nifti


# ------------------------------------------------------------------ 10: -inf in metrics.json
def _darken_lesions(manifest: Path) -> None:
    """Make every lesion of the synthetic dataset dark (intensity 0): a bright-only scorer then
    ranks lesion pixels lowest and its best-Dice threshold is -inf."""
    import csv

    with manifest.open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["mask"]:
            image = nib.load(str(manifest.parent / row["image"]))
            data = np.asarray(image.dataobj, np.float32)
            mask = np.asarray(nib.load(str(manifest.parent / row["mask"])).dataobj) > 0
            data[mask] = 0.0
            write_nifti(manifest.parent / row["image"], data)


def test_write_results_makes_infinite_values_explicit(tmp_path):
    from anomorph.evaluation.evaluate import MethodResult, write_results

    metrics = {"pixel_auroc": 0.5, "oracle_best_dice_threshold": -math.inf, "undefined": {},
               "thresholds": {"val_threshold": math.inf, "fpr_threshold": 0.25},
               "by_lesion_type": {"ms": {"oracle_best_dice": 0.0, "oracle_best_dice_threshold": -math.inf,
                                         "pixel_auroc": float("nan"),
                                         "undefined": {"pixel_auroc": "no anomalous pixels"}}}}
    files = write_results([MethodResult("threshold", False, metrics)], tmp_path)
    payload = json.loads(files["json"].read_text())["methods"]["threshold"]
    assert payload["oracle_best_dice_threshold"] is None
    assert payload["undefined"]["oracle_best_dice_threshold"].startswith("-inf")
    assert payload["thresholds"]["val_threshold"] is None
    assert payload["undefined"]["thresholds.val_threshold"].startswith("+inf")
    ms = payload["by_lesion_type"]["ms"]
    assert ms["oracle_best_dice_threshold"] is None and ms["undefined"]["oracle_best_dice_threshold"].startswith("-inf")
    assert ms["undefined"]["pixel_auroc"] == "no anomalous pixels"  # existing reasons are kept
    assert "inf" not in files["csv"].read_text().lower()


def test_evaluate_threshold_with_minus_inf_best_threshold(synthetic_dataset, tmp_path, capsys):
    _darken_lesions(synthetic_dataset)
    out = tmp_path / "eval"
    code = main(["evaluate", "--method", "threshold-intensity", "--data", str(synthetic_dataset),
                 "--size", "32", "--out", str(out), "--no-report", "--no-oracle"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads((out / "metrics.json").read_text())["methods"]["threshold-intensity"]
    blob = metrics["by_lesion_type"]["blob"]
    assert blob["oracle_best_dice_threshold"] is None
    assert blob["undefined"]["oracle_best_dice_threshold"].startswith("-inf")


# ------------------------------------------------------------------ 3: last.ckpt is the last state
def _rising_val_loss(monkeypatch, crash_epoch: int | None = None):
    """val/loss grows by 100 per epoch (so best stays at epoch 0); optionally the training step of
    ``crash_epoch`` dies like a killed process would."""
    from anomorph.training.module import AnomalyModule

    original_losses = AnomalyModule.compute_losses
    original_step = AnomalyModule.training_step

    def losses(self, x, out, beta, **kwargs):
        terms = original_losses(self, x, out, beta, **kwargs)
        if not self.training:
            terms["loss"] = terms["loss"] + 100.0 * self.current_epoch
        return terms

    def step(self, batch, batch_idx):
        if crash_epoch is not None and self.current_epoch == crash_epoch:
            raise RuntimeError("simulated kill")
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(AnomalyModule, "compute_losses", losses)
    monkeypatch.setattr(AnomalyModule, "training_step", step)


def test_last_checkpoint_is_the_last_epoch_whatever_val_does(tiny_phantom, tmp_path, monkeypatch):
    import torch

    from anomorph.training import fit, load_checkpoint, load_run, read_training_log
    from conftest import tiny_run_config

    _rising_val_loss(monkeypatch)
    run = fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=3), run_dir=tmp_path / "run")
    best = load_checkpoint(run / "checkpoints" / "best.ckpt")
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert best["epoch"] == 0 and last["epoch"] == 2
    # best.ckpt is for scoring: no optimizer state; last.ckpt keeps everything resume needs
    assert "optimizer_states" not in best and last["optimizer_states"]
    steps = [int(r["step"]) for r in read_training_log(run) if r.get("train/loss_epoch")]
    assert last["global_step"] == steps[-1] + 1
    assert any(not torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    network, _ = load_run(run, "last")  # what `predict --checkpoint last` uses
    for key, value in network.state_dict().items():
        assert torch.equal(value, last["state_dict"]["network." + key])


def test_resume_after_a_crash_does_not_rerun_the_finished_epoch(tiny_phantom, tmp_path, monkeypatch):
    from anomorph.training import fit, load_checkpoint, read_training_log
    from conftest import tiny_run_config

    _rising_val_loss(monkeypatch, crash_epoch=2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=3), run_dir=tmp_path / "run")
    run = tmp_path / "run"
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1  # not the best epoch 0
    assert load_checkpoint(run / "checkpoints" / "best.ckpt")["epoch"] == 0
    monkeypatch.undo()
    _rising_val_loss(monkeypatch)
    assert main(["fit", "--resume", str(run)]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 2
    epochs = [int(r["epoch"]) for r in read_training_log(run, superseded=True) if r.get("train/loss_epoch")]
    assert epochs == [0, 1, 2]  # epoch 1 was not trained twice (every session's rows)


# ------------------------------------------------------------------ 4: a full disk keeps the old checkpoint
def _session_rows(run):
    """Every CSV log row of ``run`` with its session folder's name (an independent reader)."""
    import csv

    rows = []
    for path in sorted((run / "logs" / "csv").glob("session*/metrics.csv")):
        with path.open(newline="") as handle:
            rows += [dict(row, session=path.parent.name) for row in csv.DictReader(handle)]
    return rows


def test_full_disk_keeps_previous_checkpoint_and_resume_works(tiny_phantom, tmp_path, monkeypatch, capsys):
    import errno

    fit_module = importlib.import_module("anomorph.training.fit")
    from anomorph.training import load_checkpoint, read_training_log

    writes = {"last": 0}
    real = fit_module._write_bytes

    def disk_full(handle, data):
        if handle.name.endswith("-last.ckpt"):
            writes["last"] += 1
            if writes["last"] == 2:  # the second epoch's last.ckpt: half written, then ENOSPC
                handle.write(bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
        real(handle, data)

    monkeypatch.setattr(fit_module, "_write_bytes", disk_full)
    run = tmp_path / "run"
    code = main(["fit", "--run-dir", str(run), f"data.manifest={tiny_phantom}", "model.name=ae", "data.size=32",
                 "model.channels=[8,16]", "model.strides=[2,2]", "model.latent_dim=8", "train.max_epochs=2",
                 "train.progress_bar=false"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "last.ckpt" in err
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 0  # the previous one, whole
    assert not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(fit_module, "_write_bytes", real)
    assert main(["fit", "--resume", str(run)]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1
    # epoch 1 was trained again (its checkpoint was lost); the log keeps the retrained one
    assert [int(r["epoch"]) for r in read_training_log(run) if r.get("train/loss_epoch")] == [0, 1]
    every = [(int(r["epoch"]), r["session"]) for r in _session_rows(run) if r.get("train/loss_epoch")]
    assert every[-1] == (1, "session1") and (0, "session0") in every


def test_checkpoints_are_written_in_their_own_directory(tiny_phantom, tmp_path, monkeypatch):
    fit_module = importlib.import_module("anomorph.training.fit")
    from conftest import tiny_run_config

    folders = []
    real = fit_module._write_bytes
    monkeypatch.setattr(fit_module, "_write_bytes",
                        lambda handle, data: (folders.append(Path(handle.name).parent), real(handle, data)))
    fit_module.fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=1), run_dir=tmp_path / "run")
    assert folders and set(folders) == {tmp_path / "run" / "checkpoints"}


# ------------------------------------------------------------------ 5: one writer per run directory
def test_second_fit_into_a_locked_run_directory_is_refused(tiny_phantom, tmp_path, capsys):
    import os

    from anomorph.training.fit import RunLock

    run = tmp_path / "run"
    with RunLock(run):
        code = main(["fit", "--run-dir", str(run), f"data.manifest={tiny_phantom}", "model.name=ae",
                     "data.size=32", "model.channels=[8,16]", "model.strides=[2,2]", "train.max_epochs=1"])
        err = capsys.readouterr().err
        assert code == 2 and f"PID {os.getpid()}" in err and str(run) in err and "Traceback" not in err
        assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    with RunLock(run):  # released: the next writer gets it
        pass


# ------------------------------------------------------------------ 1: the voxel limit is configurable
def test_voxel_limit_is_configurable(tmp_path, monkeypatch):
    from anomorph.data.io import load_image
    from anomorph.errors import DataError

    path = write_nifti(tmp_path / "scan.nii.gz", np.ones((32, 32, 4), np.float32))
    assert load_image(path)[0].shape == (32, 32, 4)
    monkeypatch.setenv("ANOMORPH_MAX_VOXELS", "4000")
    with pytest.raises(DataError, match=r"4,096 voxels, over the limit of 4,000"):
        load_image(path)
    monkeypatch.setenv("ANOMORPH_MAX_VOXELS", "lots")
    with pytest.raises(DataError, match="ANOMORPH_MAX_VOXELS"):
        load_image(path)


# ------------------------------------------------------------------ 2 and 9: predict outputs
def _scan(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_nifti(path, (rng.random((32, 32, 4)) * 100 + 50).astype(np.float32))


@pytest.fixture
def threshold_scorer(monkeypatch):
    """predict through the CLI with a training-free scorer (no run directory needed)."""
    from anomorph.evaluation.inference import ThresholdScorer
    from anomorph.scoring import Detector

    scorer = ThresholdScorer(size=32)
    scorer.config = type("C", (), {"data": type("D", (), {"axis": -1, "percentiles": [1.0, 99.0]})()})()
    scorer.calibration, scorer.strategy = None, "none"
    monkeypatch.setattr(Detector, "from_run", classmethod(lambda cls, run, **options: scorer))
    return scorer


def _predict(*args: str) -> int:
    return main(["predict", "--run", "unused", *args])


def test_predict_refuses_inputs_with_the_same_output_names(tmp_path, threshold_scorer, capsys):
    a, b = _scan(tmp_path / "a" / "scan.nii.gz"), _scan(tmp_path / "b" / "scan.nii.gz", 1)
    assert _predict(str(a), str(b), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert str(a) in err and str(b) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a" / "scan.png")  # same preview name
    assert _predict(str(a), str(tmp_path / "a" / "scan.png"), "--out", str(tmp_path / "o")) == 2
    assert "scan_preview.png" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_predict_never_replaces_existing_outputs_without_overwrite(tmp_path, threshold_scorer, capsys):
    folder = tmp_path / "d"
    scan = _scan(folder / "scan.nii.gz")
    foreign = folder / "scan_warped.nii.gz"
    foreign.write_bytes(b"someone else's file")
    assert _predict(str(scan), "--out", str(folder)) == 2
    err = capsys.readouterr().err
    assert "scan_warped.nii.gz" in err and "--overwrite" in err and "Traceback" not in err
    assert foreign.read_bytes() == b"someone else's file"
    assert not (folder / "scan_anomaly.nii.gz").exists()
    assert _predict(str(scan), "--out", str(folder), "--overwrite") == 0
    assert nib.load(str(foreign)).shape == (32, 32, 4)


def test_interrupted_predict_reruns_only_the_missing_scans(tmp_path, threshold_scorer, capsys, monkeypatch):
    import os

    from anomorph.evaluation import predict as predict_module

    scans = [_scan(tmp_path / "in" / f"s{i}.nii.gz", i) for i in range(3)]
    out = tmp_path / "out"
    real = predict_module.predict_volume
    calls: list[int] = []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_volume", dies_on_third)
    assert _predict(*map(str, scans), "--out", str(out)) == 130
    assert (out / "s1_preview.png").exists() and not (out / "s2_anomaly.nii.gz").exists()
    stale = out / ".tmp-predict-999999999"  # a killed run's staging folder (no such process)
    stale.mkdir()
    (stale / "s2_anomaly.nii.gz").write_bytes(b"half")
    (out / ".tmp-abc123-s2_preview.png").write_bytes(b"half")  # an older version's temporary
    before = {p: os.stat(out / f"{p}_anomaly.nii.gz").st_mtime_ns for p in ("s0", "s1")}
    calls.clear()
    monkeypatch.setattr(predict_module, "predict_volume", real)
    capsys.readouterr()
    assert _predict(*map(str, scans), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2 and "s2_anomaly.nii.gz" in printed
    assert {p: os.stat(out / f"{p}_anomaly.nii.gz").st_mtime_ns for p in ("s0", "s1")} == before
    assert not list(out.glob(".tmp-*"))


def test_benchmark_with_only_the_threshold_method_writes_its_tables(synthetic_dataset, tmp_path, capsys):
    _darken_lesions(synthetic_dataset)
    config = tmp_path / "bench.yaml"
    config.write_text(f"name: t\noutput_dir: {tmp_path / 'out'}\nseeds: [0]\nreport_seeds: []\n"
                      f"datasets: [{{name: dark, manifest: {synthetic_dataset}}}]\n"
                      f"methods: [{{name: thr, kind: threshold, mode: intensity}}]\n")
    code = main(["benchmark", "--config", str(config)])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "dark" / "seed0" / "metrics.json").read_text())["methods"]["thr"]
    assert metrics["by_lesion_type"]["blob"]["undefined"]["oracle_best_dice_threshold"].startswith("-inf")
    assert (tmp_path / "out" / "results.md").is_file()


# ------------------------------------------------------------------ 9: leftovers of a killed fit
def test_resume_removes_a_killed_runs_temporary_files(tiny_phantom, tmp_path):
    from anomorph.training import fit, load_checkpoint
    from conftest import tiny_run_config

    run = fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=1), run_dir=tmp_path / "run")
    leftovers = [run / "figures" / ".tmp-k1ll3d-val_epoch001.png", run / "checkpoints" / ".tmp-k1ll3d-last.ckpt"]
    for path in leftovers:
        path.write_bytes(b"half written")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("max_epochs: 1", "max_epochs: 2"))
    fit(None, run_dir=run, resume=True)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1
    assert not any(path.exists() for path in leftovers)


def test_second_writer_into_a_locked_ensemble_directory_is_refused(tiny_phantom, tmp_path, capsys):
    import os

    from anomorph.training.fit import RunLock

    run = tmp_path / "ens"
    with RunLock(run):
        code = main(["fit", "--ensemble", "2", "--run-dir", str(run), f"data.manifest={tiny_phantom}", "model.name=ae",
                     "data.size=32", "model.channels=[8,16]", "model.strides=[2,2]", "train.max_epochs=1"])
        err = capsys.readouterr().err
    assert code == 2 and f"PID {os.getpid()}" in err and "Traceback" not in err
    assert not (run / "ensemble.yaml").exists() and not (run / "member0").exists()


def test_evaluate_removes_a_killed_runs_temporary_files(tiny_phantom, tmp_path):
    out = tmp_path / "eval"
    (out / "figures").mkdir(parents=True)
    leftovers = [out / ".tmp-k1ll3d-metrics.json", out / "figures" / ".tmp-k1ll3d-roc.png"]
    for path in leftovers:
        path.write_bytes(b"half written")
    assert main(["evaluate", "--method", "threshold", "--data", str(tiny_phantom), "--size", "32",
                 "--out", str(out)]) == 0
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
    assert not any(path.exists() for path in leftovers)


def test_background_checkpoint_writes_land_in_order_and_raise_their_error(tmp_path, monkeypatch):
    """fit writes checkpoints on a writer thread (issue 15): each save is a snapshot of that
    moment, the writes land in order, and a failed write is raised at the next save (not lost),
    leaving the previous file whole."""
    import errno

    fit_module = importlib.import_module("anomorph.training.fit")
    io_ = fit_module.AtomicCheckpointIO(background=True)
    state = {"w": torch.zeros(3)}
    path = tmp_path / "ck" / "last.ckpt"
    io_.save_checkpoint(state, path)
    state["w"] += 1  # after the save: must not reach the file
    io_.save_checkpoint({"w": torch.full((3,), 5.0)}, tmp_path / "ck" / "best.ckpt")
    io_.wait()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))
    assert torch.equal(io_.load_checkpoint(tmp_path / "ck" / "best.ckpt")["w"], torch.full((3,), 5.0))

    real = fit_module._write_bytes

    def disk_full(handle, data):
        handle.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fit_module, "_write_bytes", disk_full)
    io_.save_checkpoint({"w": torch.ones(3)}, path)  # fails on the writer thread
    concurrent.futures.wait(io_._pending)  # let it fail before the disk is "freed"
    monkeypatch.setattr(fit_module, "_write_bytes", real)
    with pytest.raises(OSError, match="No space left on device") as caught:
        io_.save_checkpoint({"w": torch.ones(3)}, path)  # the next save raises it
    assert str(path) in str(caught.value)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))  # the previous one, whole
    assert not list(path.parent.glob(".tmp-*"))
    io_.teardown()
    assert io_._writer is None


def test_training_log_keeps_the_retrained_epochs_of_a_resumed_run(tmp_path):
    """read_training_log: a session that restarts at epoch e supersedes earlier sessions' rows of
    epochs >= e (their checkpoint never landed); superseded=True returns every row."""
    from anomorph.training import read_training_log

    def session(index, rows):
        folder = tmp_path / "logs" / "csv" / f"session{index}"
        folder.mkdir(parents=True)
        lines = ["epoch,step,train/loss_epoch"] + [f"{e},{s},{v}" for e, s, v in rows]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")

    session(0, [(0, 3, 0.9), (1, 7, 0.8), (2, 11, 0.7)])  # epoch 2's checkpoint was lost
    session(1, [(2, 11, 0.65), (3, 15, 0.6)])
    session(10, [(4, 19, 0.5)])  # sessions sort by number, not as text
    rows = read_training_log(tmp_path)
    assert [(int(r["epoch"]), float(r["train/loss_epoch"])) for r in rows] == [
        (0, 0.9), (1, 0.8), (2, 0.65), (3, 0.6), (4, 0.5)]
    assert len(read_training_log(tmp_path, superseded=True)) == 6
