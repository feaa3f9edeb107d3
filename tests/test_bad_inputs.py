"""Bad-input corpus (generated) through data check, fit, evaluate and predict: every case gets a
clear one-line error naming the file (exit code 2, no traceback) or a documented conversion."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from anomorph.cli.main import main
from conftest import tiny_run_config, write_nifti

REJECTED = ["truncated_gzip", "wrong_magic", "nan_volume", "four_d", "zero_size", "mask_grid",
            "nifti1_bomb", "nifti1_short", "nifti2_bomb", "gzip_bomb", "directory", "symlink_loop"]
# what the one-line error must say (beyond the file name and row), where it matters
MESSAGES = {"nifti1_bomb": "over the limit", "nifti1_short": "holds only", "nifti2_bomb": "over the limit", "gzip_bomb": "holds only",
            "directory": "is a directory", "symlink_loop": "symbolic link loop"}


def _bomb(header_class, shape, gz: bool = False) -> bytes:
    """A NIfTI header declaring ``shape`` float32 followed by only ~4 KB of data."""
    header = header_class()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_data_offset(header.single_vox_offset)
    raw = header.binaryblock
    raw += b"\0" * (int(header.single_vox_offset) - len(raw)) + b"\1" * 4096
    return gzip.compress(raw) if gz else raw
CONVERTED = ["png_16bit", "png_rgb"]


def _make_case(folder: Path, case: str) -> dict[str, str]:
    """Write one bad (or convertible) file into ``folder``; return its manifest row fields."""
    rng = np.random.default_rng(0)
    good = (rng.random((32, 32, 4)) * 100 + 50).astype(np.float32)
    if case == "truncated_gzip":
        raw = gzip.compress(nib.Nifti1Image(good, np.eye(4)).to_bytes())
        (folder / "bad.nii.gz").write_bytes(raw[: len(raw) // 3])
        return {"image": "bad.nii.gz"}
    if case == "wrong_magic":
        (folder / "bad.nii").write_bytes(b"PK\x03\x04 definitely not a NIfTI header" * 20)
        return {"image": "bad.nii"}
    if case == "nan_volume":
        bad = good.copy()
        bad[3, 4, 1] = np.nan
        write_nifti(folder / "bad.nii.gz", bad)
        return {"image": "bad.nii.gz"}
    if case == "four_d":
        write_nifti(folder / "bad.nii.gz", np.stack([good, good], -1))
        return {"image": "bad.nii.gz"}
    if case == "nifti1_bomb":  # 32767×32767×4 float32 = 17 GB declared
        (folder / "bad.nii").write_bytes(_bomb(nib.Nifti1Header, (32767, 32767, 4)))
        return {"image": "bad.nii"}
    if case == "nifti1_short":  # 400×400×200 float32 (128 MB, under the voxel limit) in 4 KB
        (folder / "bad.nii").write_bytes(_bomb(nib.Nifti1Header, (400, 400, 200)))
        return {"image": "bad.nii"}
    if case == "nifti2_bomb":  # 100000×100000×1 = 10^10 voxels declared
        (folder / "bad.nii").write_bytes(_bomb(nib.Nifti2Header, (100000, 100000, 1)))
        return {"image": "bad.nii"}
    if case == "gzip_bomb":  # 400×400×200 float32 (128 MB, under the voxel limit) in a 4 KB payload
        (folder / "bad.nii.gz").write_bytes(_bomb(nib.Nifti1Header, (400, 400, 200), gz=True))
        return {"image": "bad.nii.gz"}
    if case == "directory":
        (folder / "bad.nii.gz").mkdir(exist_ok=True)
        return {"image": "bad.nii.gz"}
    if case == "symlink_loop":
        if not (folder / "bad.nii.gz").is_symlink():
            (folder / "bad.nii.gz").symlink_to("bad.nii.gz")
        return {"image": "bad.nii.gz"}
    if case == "zero_size":
        (folder / "bad.png").write_bytes(b"")
        return {"image": "bad.png"}
    if case == "mask_grid":
        write_nifti(folder / "bad.nii.gz", good)
        write_nifti(folder / "bad_mask.nii.gz", np.zeros((32, 30, 4), np.uint8))
        return {"image": "bad.nii.gz", "mask": "bad_mask.nii.gz"}
    image = (good[:, :, 0] / 150 * 255).astype(np.uint8)
    if case == "png_16bit":
        Image.fromarray(image.astype(np.uint16) * 250).save(folder / "bad.png")
    elif case == "png_rgb":
        Image.fromarray(np.stack([image, image // 2, image], -1)).save(folder / "bad.png")
    return {"image": "bad.png"}


def _dataset(tmp_path: Path, tiny_phantom: Path, case: str, split: str) -> Path:
    """The tiny phantom plus one bad row in ``split``."""
    folder = tmp_path / "data"
    shutil.copytree(tiny_phantom.parent, folder)
    lines = (folder / "manifest.csv").read_text().splitlines()
    header = lines[0].split(",")
    row = {c: "" for c in header} | _make_case(folder, case) | {"split": split}
    (folder / "manifest.csv").write_text("\n".join(lines + [",".join(row[c] for c in header)]) + "\n")
    return folder / "manifest.csv"


@pytest.mark.parametrize("case", REJECTED + CONVERTED)
def test_data_check(case, tiny_phantom, tmp_path, capsys):
    manifest = _dataset(tmp_path, tiny_phantom, case, "test")
    code = main(["data", "check", str(manifest), "--size", "32"])
    err = capsys.readouterr().err
    if case in CONVERTED:
        assert code == 0, err
    else:
        assert code == 2 and "Traceback" not in err
        assert "bad" in err and f"row {len(manifest.read_text().splitlines()) - 1}" in err
        assert MESSAGES.get(case, "") in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", REJECTED)
def test_fit_rejects_bad_train_rows(case, tiny_phantom, tmp_path, capsys):
    manifest = _dataset(tmp_path, tiny_phantom, case, "train")
    code = main(["fit", "--run-dir", str(tmp_path / "run"), f"data.manifest={manifest}", "model.name=ae",
                 "data.size=32", "model.channels=[8,16]", "model.strides=[2,2]", "model.latent_dim=8",
                 "train.max_epochs=1", "train.progress_bar=false"])
    err = capsys.readouterr().err
    assert code == 2 and "bad" in err and "Traceback" not in err and MESSAGES.get(case, "") in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def tiny_run(tiny_phantom, tmp_path_factory):
    from anomorph.training import fit

    return fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=1), run_dir=tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("case", REJECTED)
def test_evaluate_and_predict_reject(case, tiny_phantom, tiny_run, tmp_path, capsys):
    manifest = _dataset(tmp_path, tiny_phantom, case, "test")
    code = main(["evaluate", "--run", str(tiny_run), "--data", str(manifest), "--out", str(tmp_path / "eval"),
                 "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and "bad" in err and "Traceback" not in err
    assert not (tmp_path / "eval" / "metrics.json").exists()
    bad = Path(manifest.parent / _make_case(tmp_path / "data", case)["image"])
    code = main(["predict", "--run", str(tiny_run), str(bad), "--out", str(tmp_path / "pred")])
    err = capsys.readouterr().err
    if case == "mask_grid":  # predict reads no mask: the image itself is fine
        assert code == 0
    else:
        assert code == 2 and "bad" in err and "Traceback" not in err and MESSAGES.get(case, "") in err
        assert not (tmp_path / "pred").exists()


@pytest.mark.parametrize("case", CONVERTED)
def test_predict_converts_png(case, tiny_run, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _make_case(folder, case)
    assert main(["predict", "--run", str(tiny_run), str(folder / "bad.png"), "--out", str(tmp_path / "pred")]) == 0
    assert np.asarray(Image.open(tmp_path / "pred" / "bad_anomaly.png")).shape == (32, 32)
