"""Shared fixtures: synthetic NIfTI subjects written to temp folders (as torchio's tests do)."""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def write_csv(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def synthetic_subject(rng: np.random.Generator, shape=(40, 48, 6), lesion: bool = False):
    """A blurry ellipsoid 'brain' with noise; optional bright blob lesion. Returns arrays."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (x / 0.8) ** 2 + (y / 0.85) ** 2 < 1.0
    brain = np.broadcast_to(brain[..., :1], shape).copy()
    image = np.where(brain, 100.0 + 20.0 * np.cos(3 * x) * np.sin(2 * y), 0.0)
    image = (image + rng.normal(0, 2.0, shape) * brain).astype(np.float32)
    healthy = image.copy()
    mask = np.zeros(shape, np.uint8)
    if lesion:
        cx, cy = rng.integers(shape[0] // 3, 2 * shape[0] // 3), rng.integers(shape[1] // 3, 2 * shape[1] // 3)
        mask[cx - 3:cx + 3, cy - 3:cy + 3, shape[2] // 2 - 1:shape[2] // 2 + 1] = 1
        image[mask > 0] = 200.0
    return image, healthy, mask, brain.astype(np.uint8)


@pytest.fixture
def synthetic_dataset(tmp_path: Path):
    """Folder with 4 train, 2 val (1 lesion), 2 test (1 lesion) subjects and manifest.csv."""
    rng = np.random.default_rng(1234)
    rows = []
    plan = [("train", False)] * 4 + [("val", False), ("val", True), ("test", False), ("test", True)]
    for i, (split, lesion) in enumerate(plan):
        image, healthy, mask, brain = synthetic_subject(rng, lesion=lesion)
        name = f"sub{i:02d}"
        write_nifti(tmp_path / "img" / f"{name}.nii.gz", image)
        write_nifti(tmp_path / "healthy" / f"{name}.nii.gz", healthy)
        write_nifti(tmp_path / "brain" / f"{name}.nii.gz", brain)
        row = {"image": f"img/{name}.nii.gz", "split": split, "brain_mask": f"brain/{name}.nii.gz",
               "healthy": f"healthy/{name}.nii.gz", "subject": name, "lesion_type": "blob" if lesion else ""}
        if lesion:
            write_nifti(tmp_path / "mask" / f"{name}.nii.gz", mask)
            row["mask"] = f"mask/{name}.nii.gz"
        rows.append(row)
    columns = ["image", "split", "mask", "brain_mask", "healthy", "subject", "lesion_type"]
    return write_csv(tmp_path / "manifest.csv", rows, columns)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """A tiny built-in phantom (32², 4 slices) shared by the training/evaluation tests."""
    from anomorph.data.phantom import PhantomConfig, build_phantom

    out = tmp_path_factory.mktemp("tiny_phantom")
    config = PhantomConfig(size=32, n_slices=4, seed=3, n_train=6, n_val_healthy=1, n_val_lesion=2,
                           n_test=5, n_test_healthy=1)
    return build_phantom(out, config)


def tiny_run_config(manifest: Path, model: str = "morphaeus", **train):
    """A RunConfig small enough to train in seconds on 2 CPU cores."""
    from anomorph.config import load_config

    overrides = [f"data.manifest={manifest}", "data.size=32", "data.batch_size=8", "data.min_brain_fraction=0.0",
                 f"model.name={model}", "model.channels=[8,16,32]", "model.strides=[2,2,2]",
                 "model.latent_dim=32", "train.max_epochs=3", "train.warmup_epochs=1",
                 "train.beta_ramp_epochs=2", "train.progress_bar=false", "train.log_every_n_steps=1"]
    if model == "morphaeus":
        overrides.append("model.head_channels=[8,16]")
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="session")
def tiny_calibrated_run(tiny_phantom, tmp_path_factory) -> Path:
    """A tiny deformable run trained on ``tiny_phantom``; ``fit`` calibrates it (val rows exist)."""
    from anomorph.training import fit

    return fit(tiny_run_config(tiny_phantom, max_epochs=2), run_dir=tmp_path_factory.mktemp("calibrated_run"))
