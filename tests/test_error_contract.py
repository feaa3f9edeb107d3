"""One error contract (issue 16, item 6): every user error on the command line exits with code 2
and ONE line naming the file/field/value, never a traceback, and leaves nothing half-written.
The corpus below drives each case through ``anomorph.cli.main``; any traceback fails it."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from anomorph.cli.main import main

TINY = ["model.name=ae", "data.size=32", "model.channels=[8,16]", "model.strides=[2,2]", "model.latent_dim=8",
        "train.max_epochs=1", "train.progress_bar=false"]


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anomorph: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


# (overrides, what the message must name)
FIT_CONFIG_CASES = {
    "negative_epochs": (["train.max_epochs=-3"], "train.max_epochs"),
    "zero_epochs": (["train.max_epochs=0"], "train.max_epochs"),
    "zero_batch": (["data.batch_size=0"], "data.batch_size"),
    "negative_batch": (["data.batch_size=-4"], "data.batch_size"),
    "nan_lr": (["train.lr=.nan"], "train.lr"),
    "negative_lr": (["train.lr=-0.001"], "train.lr"),
    "size_zero": (["data.size=0"], "data.size"),
    "size_not_multiple": (["data.size=34"], "not divisible"),
    "unknown_model": (["model.name=transformer"], "model.name"),
    "unknown_option": (["model.wings=2"], "wings"),
    "bad_accelerator": (["train.accelerator=warp-drive"], "warp-drive"),
    "bad_precision": (["train.precision=fp17"], "fp17"),
    "negative_max_steps": (["train.max_steps=-5"], "train.max_steps"),
    "bad_axis": (["data.axis=5"], "data.axis"),
}


@pytest.mark.parametrize("case", sorted(FIT_CONFIG_CASES))
def test_fit_config_errors(case, tiny_phantom, tmp_path, capsys):
    overrides, needle = FIT_CONFIG_CASES[case]
    run = tmp_path / "run"
    code, err = _run_cli(["fit", "--run-dir", str(run), f"data.manifest={tiny_phantom}", *TINY, *overrides], capsys)
    _assert_user_error(code, err, needle)
    assert not run.exists()  # nothing written, not even the lock file


def test_non_utf8_yaml(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    code, err = _run_cli(["fit", "--config", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    _assert_user_error(code, err, str(config), "line 1", "UTF-8")


@pytest.mark.parametrize("text", ["datasets: [\n  - name: x\n", "methods: {a: 1}\n\t- bad", "- just\n- a list\n",
                                  "datasets: []\nmethods: []\n"])
def test_invalid_benchmark_yaml(text, tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text(text)
    code, err = _run_cli(["benchmark", "--config", str(config), "--output-dir", str(tmp_path / "out")], capsys)
    _assert_user_error(code, err)
    assert not (tmp_path / "out").exists()


def test_non_utf8_benchmark_yaml(tmp_path, capsys):
    config = tmp_path / "bench.yaml"
    config.write_bytes(b"name: \xff\xfe\n")
    code, err = _run_cli(["benchmark", "--config", str(config)], capsys)
    _assert_user_error(code, err, str(config), "UTF-8")


@pytest.mark.parametrize("argv, needle", [
    (["--axis", "5"], "axis"),
    (["--slice-range", "5", "2"], "slice range"),
    (["--size", "0"], "size"),
])
def test_data_check_options(argv, needle, tiny_phantom, capsys):
    code, err = _run_cli(["data", "check", str(tiny_phantom), *argv], capsys)
    _assert_user_error(code, err, needle)


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--size", "0"], "--size 0"),
])
def test_evaluate_options(argv, needle, tiny_phantom, tmp_path, capsys):
    out = tmp_path / "eval"
    code, err = _run_cli(["evaluate", "--method", "threshold", "--data", str(tiny_phantom), "--out", str(out),
                          "--no-report", *argv], capsys)
    _assert_user_error(code, err, needle)
    assert "run" not in err.split("error: ", 1)[1]  # no mention of runs that do not exist
    assert not out.exists()


def test_output_folder_under_a_file(tiny_phantom, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    code, err = _run_cli(["evaluate", "--method", "threshold", "--data", str(tiny_phantom),
                          "--out", str(blocker / "eval"), "--no-report"], capsys)
    _assert_user_error(code, err, "file.txt")


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_full_read_only_or_denied_while_writing_metrics(failure, tiny_phantom, tmp_path, capsys, monkeypatch):
    """Root ignores file modes, so the failure is injected at the rename of the atomic write."""
    import anomorph.data.io as io_module

    real = os.replace

    def failing(src, dst, *args, **kwargs):
        if str(dst).endswith("metrics.json"):
            raise OSError(failure, os.strerror(failure), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(io_module.os, "replace", failing)
    out = tmp_path / "eval"
    code, err = _run_cli(["evaluate", "--method", "threshold", "--data", str(tiny_phantom), "--out", str(out),
                          "--no-report"], capsys)
    monkeypatch.setattr(io_module.os, "replace", real)
    _assert_user_error(code, err, "metrics.json", os.strerror(failure))
    assert not (out / "metrics.json").exists() and not list(out.glob(".tmp-*"))


# ------------------------------------------------------------------ fit --resume on a bad checkpoint
@pytest.fixture(scope="module")
def trained_run(tiny_phantom, tmp_path_factory):
    from anomorph.training import fit
    from conftest import tiny_run_config

    return fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=1), run_dir=tmp_path_factory.mktemp("run") / "r")


class _Payload:
    """Unpickling it would write ``marker``: the test checks the file never appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def _spoil(path: Path, case: str, other: Path) -> None:
    if case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "garbage":
        path.write_bytes(os.urandom(3000))
    elif case == "payload":
        with path.open("wb") as handle:
            pickle.dump({"state_dict": _Payload(path.parent / "pwned")}, handle)
    elif case == "missing_keys":
        checkpoint = torch.load(path, weights_only=True)
        del checkpoint["optimizer_states"], checkpoint["loops"]
        torch.save(checkpoint, path)
    elif case == "wrong_shapes":
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["state_dict"] = {k: torch.zeros(3, 3) for k in checkpoint["state_dict"]}
        torch.save(checkpoint, path)
    elif case == "not_a_dict":
        torch.save([1, 2, 3], path)


RESUME_CASES = {"zero_bytes": "refused or unreadable", "garbage": "refused or unreadable",
                "payload": "refused or unreadable", "missing_keys": "missing key(s)",
                "wrong_shapes": "do not match", "not_a_dict": "not a Lightning checkpoint"}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_from_a_bad_checkpoint(case, trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = run / "checkpoints" / "last.ckpt"
    _spoil(last, case, trained_run)
    config_before = (run / "config.yaml").read_bytes()
    sessions_before = sorted(p.name for p in (run / "logs" / "csv").iterdir())
    code, err = _run_cli(["fit", "--resume", str(run)], capsys)
    _assert_user_error(code, err, "last.ckpt", RESUME_CASES[case])
    assert (run / "config.yaml").read_bytes() == config_before
    assert sorted(p.name for p in (run / "logs" / "csv").iterdir()) == sessions_before
    assert not (last.parent / "pwned").exists()


# ------------------------------------------------------------------ silent wrong results (item 7)
def test_predict_with_nan_weights_is_an_error(trained_run, tmp_path, capsys):
    from conftest import write_nifti
    import numpy as np

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for name in ("best.ckpt", "last.ckpt"):
        path = run / "checkpoints" / name
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                    for k, v in checkpoint["state_dict"].items()}
        torch.save(checkpoint, path)
    scan = write_nifti(tmp_path / "scan.nii.gz", (np.random.default_rng(0).random((32, 32, 4)) * 100 + 50))
    code, err = _run_cli(["predict", "--run", str(run), str(scan), "--out", str(tmp_path / "pred")], capsys)
    _assert_user_error(code, err, "non-finite", str(scan))
    assert not list((tmp_path / "pred").glob("scan_*"))


def test_uncertainty_option_with_a_bad_value(trained_run, tiny_phantom, tmp_path, capsys):
    out = tmp_path / "eval"
    code, err = _run_cli(["evaluate", "--run", str(trained_run), "--data", str(tiny_phantom), "--out", str(out),
                          "--no-report", "--uncertainty", "mc_dropout",
                          "--uncertainty-option", "mc_dropout.passes=abc"], capsys)
    _assert_user_error(code, err, "mc_dropout", "abc")
    assert not (out / "metrics.json").exists()


# ------------------------------------------------------------------ silent wrong results and misleading messages
def _copy_phantom(tiny_phantom: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(tiny_phantom.parent, folder)
    return folder / "manifest.csv"


def _rows(manifest: Path) -> list[dict[str, str]]:
    import csv

    with manifest.open() as handle:
        return list(csv.DictReader(handle))


def _write_rows(manifest: Path, rows: list[dict[str, str]]) -> None:
    from conftest import write_csv

    write_csv(manifest, rows, list(rows[0]))


def _spoil_manifest(manifest: Path, case: str) -> str:
    """Make ``manifest`` bad in one way; return what the error must say."""
    import nibabel as nib
    import numpy as np

    rows = _rows(manifest)
    train = next(r for r in rows if r["split"] == "train")
    lesion = next(r for r in rows if r["split"] == "test" and r.get("mask"))
    if case == "train_test_leak":
        rows.append(dict(lesion, split="train", mask="", label=""))
        _write_rows(manifest, rows)
        return "a leak between splits"
    if case == "duplicate_row":
        rows.append(dict(train))
        _write_rows(manifest, rows)
        return "duplicate row"
    if case == "label0_with_mask":
        lesion["label"] = "0"
        _write_rows(manifest, rows)
        return "label 0"
    if case == "fractional_mask":
        path = manifest.parent / lesion["mask"]
        data = np.asarray(nib.load(str(path)).dataobj, np.float32) * 0.5
        nib.save(nib.Nifti1Image(data, nib.load(str(path)).affine), str(path))
        return "not 0/1 labels"
    if case == "constant_image":
        path = manifest.parent / train["image"]
        image = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine), str(path))
        return "every voxel is 0"
    if case == "zero_affine":
        import gzip

        path = manifest.parent / train["image"]
        image = nib.load(str(path))
        header = nib.Nifti1Image(np.asarray(image.dataobj, np.float32), np.eye(4)).header.copy()
        header["qform_code"], header["sform_code"] = 0, 1  # an sform of zeros: the affine is all zeros
        for row in ("srow_x", "srow_y", "srow_z"):
            header[row] = 0
        header.set_data_offset(352)
        raw = header.binaryblock + b"\0" * 4 + np.asarray(image.dataobj, np.float32).tobytes(order="F")
        path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
        return "affine is not usable"
    if case == "latin1_manifest":
        text = manifest.read_text().splitlines()
        text[3] = text[3] + "\u00e9"
        manifest.write_bytes(("\n".join(text) + "\n").encode("latin-1"))
        return "row 3 (line 4)"
    raise AssertionError(case)


MANIFEST_CASES = ["train_test_leak", "duplicate_row", "label0_with_mask", "fractional_mask", "constant_image",
                  "zero_affine", "latin1_manifest"]


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_data_check_refuses_silently_wrong_data(case, tiny_phantom, tmp_path, capsys):
    manifest = _copy_phantom(tiny_phantom, tmp_path)
    needle = _spoil_manifest(manifest, case)
    code, err = _run_cli(["data", "check", str(manifest), "--size", "32"], capsys)
    _assert_user_error(code, err, str(manifest), needle)


def test_predict_refuses_a_constant_image(trained_run, tmp_path, capsys):
    from conftest import write_nifti
    import numpy as np

    scan = write_nifti(tmp_path / "blank.nii.gz", np.zeros((32, 32, 4), np.float32))
    code, err = _run_cli(["predict", "--run", str(trained_run), str(scan), "--out", str(tmp_path / "pred")], capsys)
    _assert_user_error(code, err, str(scan), "every voxel is 0")
    assert not (tmp_path / "pred").exists()
