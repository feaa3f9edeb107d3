"""The built-in brain phantom: manifest contract, lesion/healthy pairing, determinism.

Uses a tiny grid (32 × 32 × 6) so that the module builds in a few seconds.
"""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomorph.config import ConfigError
from anomorph.data.phantom import (
    LESION_TYPES,
    MANIFEST_COLUMNS,
    PhantomConfig,
    build_phantom,
    generate_subject,
    subject_plan,
)

TINY = dict(size=32, n_slices=6, n_train=2, n_val_healthy=1, n_val_lesion=1, n_test=5, n_test_healthy=1)
MASS_EFFECT_KINDS = {"mass_effect"}


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _load(base: Path, relative: str) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    image = nib.load(str(base / relative))
    return np.asarray(image.dataobj), image.affine, image.get_data_dtype()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return build_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(seed=0, **TINY))


@pytest.fixture(scope="module")
def rows(phantom: Path) -> list[dict[str, str]]:
    return _rows(phantom)


def test_manifest_columns_and_relative_paths_resolve(phantom: Path, rows) -> None:
    with phantom.open(encoding="utf-8") as handle:
        assert tuple(handle.readline().strip().split(",")) == MANIFEST_COLUMNS
    assert len(rows) == 2 + 1 + 1 + 5
    for row in rows:
        for column in ("image", "mask", "brain_mask", "healthy"):
            if row[column]:
                assert not Path(row[column]).is_absolute()
                assert (phantom.parent / row[column]).is_file(), row[column]
    assert not list(phantom.parent.rglob(".tmp-*")), "temporary files left behind"


def test_labels_masks_and_lesion_types_agree(phantom: Path, rows) -> None:
    for row in rows:
        lesion = row["lesion_type"] != ""
        assert row["label"] == ("1" if lesion else "0")
        assert (row["mask"] != "") == lesion
        if lesion:
            assert row["lesion_type"] in LESION_TYPES
            mask = _load(phantom.parent, row["mask"])[0]
            per_slice = mask.any(axis=(0, 1))
            assert per_slice.sum() >= 2, "a lesion must span several slices"
            assert not per_slice.all(), "a lesion volume must keep some normal slices"
        else:
            assert row["healthy"] == row["image"]
            assert row["split"] in ("train", "val", "test")
    assert all(r["label"] == "0" for r in rows if r["split"] == "train"), "train must be healthy"
    val_labels = {r["label"] for r in rows if r["split"] == "val"}
    assert val_labels == {"0", "1"}, "val needs healthy and lesion subjects"


def test_every_lesion_type_in_test_split_in_equal_numbers(rows) -> None:
    test_types = [r["lesion_type"] for r in rows if r["split"] == "test"]
    assert sorted(t for t in test_types if t) == sorted(LESION_TYPES)
    assert test_types.count("") == TINY["n_test_healthy"]


def test_default_plan_proportions() -> None:
    plan = subject_plan(PhantomConfig())
    test_types = [kind for split, _, kind in plan if split == "test"]
    assert all(test_types.count(kind) == 3 for kind in LESION_TYPES)
    assert test_types.count("") == 4
    assert sorted(kind for split, _, kind in plan if split == "val" and kind) == sorted(LESION_TYPES)
    assert all(kind == "" for split, _, kind in plan if split == "train")


def test_volumes_share_grid_dtype_and_are_finite(phantom: Path, rows) -> None:
    base = phantom.parent
    config = PhantomConfig(**TINY)
    expected_spacing = [config.field_of_view_mm / config.size] * 2 + [config.slab_thickness_mm / config.n_slices]
    for row in rows:
        image, affine, dtype = _load(base, row["image"])
        assert image.shape == (config.size, config.size, config.n_slices)
        assert dtype == np.float32 and np.isfinite(image).all() and image.min() >= 0
        np.testing.assert_allclose(np.diag(affine)[:3], expected_spacing)
        assert nib.aff2axcodes(affine) == ("R", "A", "S")
        for column, want in (("brain_mask", np.uint8), ("mask", np.uint8), ("healthy", np.float32)):
            if not row[column]:
                continue
            other, other_affine, other_dtype = _load(base, row[column])
            assert other.shape == image.shape and other_dtype == want
            assert np.isfinite(other).all()
            np.testing.assert_array_equal(other_affine, affine)
        brain = _load(base, row["brain_mask"])[0] > 0
        assert np.median(image[brain]) > 10 * np.median(image[~brain]), "brain must stand out of background"


def test_lesions_lie_in_brain_and_change_only_what_they_should(phantom: Path, rows) -> None:
    base = phantom.parent
    for row in (r for r in rows if r["lesion_type"]):
        image = _load(base, row["image"])[0]
        healthy = _load(base, row["healthy"])[0]
        mask = _load(base, row["mask"])[0] > 0
        brain = _load(base, row["brain_mask"])[0] > 0
        assert not (mask & ~brain).any(), f"{row['subject']}: lesion outside the brain mask"
        changed = image != healthy
        assert changed[mask].mean() > 0.9, f"{row['subject']}: lesion does not change the image"
        if row["lesion_type"] in MASS_EFFECT_KINDS:
            assert changed[~mask].any(), "mass effect must displace tissue outside the lesion"
        else:
            np.testing.assert_array_equal(image[~mask], healthy[~mask])


def test_same_seed_gives_identical_files_and_other_seed_differs(phantom: Path, rows, tmp_path: Path) -> None:
    again = build_phantom(tmp_path / "again", PhantomConfig(seed=0, **TINY))
    other = build_phantom(tmp_path / "other", PhantomConfig(seed=1, **TINY))
    assert _rows(again) == rows
    for row in rows:
        for column in ("image", "mask", "brain_mask", "healthy"):
            if row[column]:
                first = _load(phantom.parent, row[column])[0]
                np.testing.assert_array_equal(first, _load(again.parent, row[column])[0])
                assert (phantom.parent / row[column]).read_bytes() == (again.parent / row[column]).read_bytes()
        first_image = _load(phantom.parent, row["image"])[0]
        other_image = _load(other.parent, row["image"])[0]
        assert not np.array_equal(first_image, other_image), f"{row['subject']} identical across seeds"


def test_healthy_counterpart_is_the_same_subject_without_lesion() -> None:
    config = PhantomConfig(seed=3, **TINY)
    healthy = generate_subject(config, "test", 0, "")
    lesion = generate_subject(config, "test", 0, "multifocal")
    np.testing.assert_array_equal(lesion.healthy, healthy.image)
    assert healthy.mask is None and healthy.healthy is None
    assert lesion.mask.any()


@pytest.mark.parametrize("change", [
    dict(n_test_healthy=20), dict(gamma_range=(1.2, 0.8)), dict(size=4), dict(seed=-1),
    dict(ventricle_dilation_range_mm=(0.0, 6.0)), dict(lesion_irregularity=0.9),
    dict(multifocal_count_range=(0, 3)), dict(n_train=0, n_val_healthy=0, n_val_lesion=0, n_test=0),
])
def test_invalid_config_is_rejected(change) -> None:
    with pytest.raises(ConfigError, match="PhantomConfig"):
        PhantomConfig(**change)


def test_unknown_lesion_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="lesion type"):
        generate_subject(PhantomConfig(**TINY), "test", 0, "stroke")
