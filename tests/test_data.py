"""Data layer: manifest parsing, loading, slicing geometry, normalisation and bad input."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from anomorph.data import DataError, SliceConfig, SliceDataset, collate_slices, read_manifest, write_manifest
from anomorph.data.io import load_image, save_like, to_source_orientation
from anomorph.data.slices import to_model_grid, to_source_grid
from anomorph.data.summary import check_manifest
from conftest import write_csv, write_nifti


def test_manifest_round_trip(tmp_path, synthetic_dataset):
    rows = read_manifest(synthetic_dataset)
    assert [r.split for r in rows] == ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    assert all(r.image.is_file() and r.image.is_absolute() for r in rows)
    assert rows[5].mask is not None and rows[4].mask is None
    assert rows[0].subject == "sub00" and rows[5].lesion_type == "blob"
    out = tmp_path / "copy" / "manifest.csv"
    out.parent.mkdir()
    write_manifest(out, [{"image": str(r.image), "split": r.split, "mask": str(r.mask or ""),
                          "subject": r.subject, "lesion_type": r.lesion_type} for r in rows])
    again = read_manifest(out)
    assert [(r.image, r.split, r.mask, r.subject, r.lesion_type) for r in again] == \
           [(r.image, r.split, r.mask, r.subject, r.lesion_type) for r in rows]


def test_dataset_labels_and_training_skips_lesion_slices(synthetic_dataset):
    train = SliceDataset(synthetic_dataset, ["train"], SliceConfig(size=32), healthy_only=True)
    assert len(train) == 4 * 6 and int(train.labels.sum()) == 0
    test = SliceDataset(synthetic_dataset, ["test"], SliceConfig(size=32))
    # the lesion spans 2 of 6 slices of the one lesion subject
    assert int(test.labels.sum()) == 2
    lesion_val = SliceDataset(synthetic_dataset, ["val"], SliceConfig(size=32), healthy_only=True)
    assert len(lesion_val) == 6 + 4
    batch = collate_slices([test[i] for i in range(len(test))])
    assert batch.image.shape == (12, 1, 32, 32)
    assert batch.has_healthy.all()
    for i in range(len(batch)):
        assert (batch.mask[i].sum() > 0) == bool(batch.label[i])


def test_normalisation_range(synthetic_dataset):
    ds = SliceDataset(synthetic_dataset, ["train", "val", "test"], SliceConfig(size=32, percentiles=(1.0, 99.0)))
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    inside = ds.images[ds.brain_masks > 0]
    # robust percentiles: about 1% of brain pixels at 0 and 1% at 1 (resizing blurs a little)
    assert 0.3 < float(inside.mean()) < 0.7
    assert float((inside >= 0.999).float().mean()) < 0.05


def test_known_blob_lands_where_expected(tmp_path):
    """A blob at canonical (x=10..13, y=30..33) of a 40×48 slice maps through pad+resize exactly."""
    volume = np.zeros((40, 48, 3), np.float32)
    volume[10:14, 30:34, 1] = 1.0
    write_nifti(tmp_path / "a.nii.gz", volume + 1.0)
    mask = (volume > 0).astype(np.uint8)
    write_nifti(tmp_path / "m.nii.gz", mask)
    write_csv(tmp_path / "manifest.csv", [{"image": "a.nii.gz", "split": "train", "mask": "m.nii.gz"}])
    ds = SliceDataset(tmp_path / "manifest.csv", ["train"], SliceConfig(size=24, min_brain_fraction=0.0))
    assert len(ds) == 3 and ds.labels.tolist() == [0, 1, 0]
    # padding 40 rows → 48: 4 rows on top; scale 24/48 = 0.5 → rows (10+4)/2..(14+4)/2, cols 15..17
    expected = np.zeros((24, 24), bool)
    expected[7:9, 15:17] = True
    assert np.array_equal(ds.masks[1, 0].numpy() > 0, expected)
    # the inverse maps the model grid back onto the 40×48 source grid
    back = to_source_grid(ds.masks[1:2], (40, 48))[0, 0].numpy()
    assert back.shape == (40, 48)
    assert back[11, 31] > 0.5 and back[0, 0] == 0


def test_model_grid_round_trip_is_exact_at_native_size():
    source = torch.rand(2, 1, 30, 20)
    grid = to_model_grid(source, 30)
    assert torch.equal(to_source_grid(grid, (30, 20)), source)


def test_canonical_orientation_and_write_back(tmp_path):
    rng = np.random.default_rng(7)
    data = rng.random((5, 6, 4)).astype(np.float32) + 1.0
    flipped = np.diag([-2.0, 2.0, 3.0, 1.0])  # x axis runs right-to-left on disk
    write_nifti(tmp_path / "lps.nii.gz", data, flipped)
    canonical, geometry = load_image(tmp_path / "lps.nii.gz")
    assert np.array_equal(canonical, data[::-1])
    out = save_like(canonical * 2, geometry, tmp_path / "out.nii.gz")
    written = nib.load(str(out))
    assert np.allclose(written.affine, flipped)
    assert np.allclose(np.asarray(written.dataobj), data * 2)
    assert not list(tmp_path.glob(".tmp-*"))


def test_png_grayscale_rgb_and_16bit(tmp_path):
    gray = (np.arange(20 * 30).reshape(20, 30) % 251).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb_gray.png")
    Image.fromarray((gray.astype(np.uint16) * 200)).save(tmp_path / "d16.png")
    color = np.stack([gray, gray // 2, gray // 3], -1)
    Image.fromarray(color).save(tmp_path / "color.png")
    a, geo = load_image(tmp_path / "g.png")
    assert a.shape == (20, 30, 1) and geo.is_2d and np.array_equal(a[..., 0], gray)
    assert np.array_equal(load_image(tmp_path / "rgb_gray.png")[0], a)
    assert np.array_equal(load_image(tmp_path / "d16.png")[0][..., 0], gray.astype(np.float32) * 200)
    luma = load_image(tmp_path / "color.png")[0][..., 0]
    expected = np.asarray(Image.fromarray(color).convert("L"), np.float32)
    assert np.array_equal(luma, expected)
    assert np.array_equal(to_source_orientation(a, geo), gray)


# ---------------------------------------------------------------- bad input: one clear error each

def _manifest(tmp_path: Path, rows, columns=None) -> Path:
    return write_csv(tmp_path / "manifest.csv", rows, columns)


def _good(tmp_path: Path, name: str = "ok.nii.gz") -> str:
    # not constant: a blank/constant image is itself an error (issue 16)
    write_nifti(tmp_path / name, np.arange(8 * 8 * 2, dtype=np.float32).reshape(8, 8, 2) + 1)
    return name


def test_missing_file_names_row_and_file(tmp_path):
    m = _manifest(tmp_path, [{"image": _good(tmp_path), "split": "train"}, {"image": "gone.nii.gz", "split": "test"}])
    with pytest.raises(DataError, match=r"row 2 .*'image'.*gone\.nii\.gz"):
        read_manifest(m)


def test_truncated_nifti(tmp_path):
    good = tmp_path / _good(tmp_path)
    raw = good.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
    m = _manifest(tmp_path, [{"image": good.name, "split": "train"}, {"image": "trunc.nii.gz", "split": "train"}])
    with pytest.raises(DataError, match=r"row 2.*trunc\.nii\.gz.*cannot read"):
        check_manifest(m)


def test_wrong_magic(tmp_path):
    (tmp_path / "bad.nii").write_bytes(b"not a nifti file at all" * 20)
    m = _manifest(tmp_path, [{"image": "bad.nii", "split": "train"}])
    with pytest.raises(DataError, match=r"row 1.*bad\.nii.*cannot read"):
        check_manifest(m)


def test_non_finite_voxels(tmp_path):
    data = np.ones((8, 8, 2), np.float32)
    data[3, 3, 1] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", data)
    m = _manifest(tmp_path, [{"image": "nan.nii.gz", "split": "train"}])
    with pytest.raises(DataError, match=r"row 1.*nan\.nii\.gz.*1 non-finite"):
        check_manifest(m)


def test_mask_grid_differs(tmp_path):
    write_nifti(tmp_path / "m.nii.gz", np.zeros((8, 9, 2), np.uint8))
    m = _manifest(tmp_path, [{"image": _good(tmp_path), "split": "train", "mask": "m.nii.gz"}])
    with pytest.raises(DataError, match=r"row 1.*'mask'.*m\.nii\.gz.*grid"):
        check_manifest(m)


def test_unknown_split(tmp_path):
    m = _manifest(tmp_path, [{"image": _good(tmp_path), "split": "training"}])
    with pytest.raises(DataError, match=r"row 1.*'split'.*'training'"):
        read_manifest(m)


def test_empty_train_split(tmp_path):
    m = _manifest(tmp_path, [{"image": _good(tmp_path), "split": "test"}])
    with pytest.raises(DataError, match=r"train split is empty"):
        check_manifest(m)


def test_missing_required_column(tmp_path):
    m = _manifest(tmp_path, [{"image": _good(tmp_path)}])
    with pytest.raises(DataError, match=r"missing required column.*split"):
        read_manifest(m)


def test_four_d_volume_rejected(tmp_path):
    write_nifti(tmp_path / "4d.nii.gz", np.ones((4, 4, 2, 3), np.float32))
    m = _manifest(tmp_path, [{"image": "4d.nii.gz", "split": "train"}])
    with pytest.raises(DataError, match=r"row 1.*4d\.nii\.gz.*4D"):
        check_manifest(m)


def test_data_check_summary(synthetic_dataset):
    summary = check_manifest(synthetic_dataset, SliceConfig(size=32))
    assert summary.rows_per_split == {"train": 4, "val": 2, "test": 2}
    assert summary.slices_per_split == {"train": 24, "val": 12, "test": 12}
    assert summary.abnormal_slices_per_split == {"train": 0, "val": 2, "test": 2}
    assert summary.lesion_types == {"blob": 2}
    assert "40×48×6" in summary.format()
