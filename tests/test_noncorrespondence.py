"""The learned non-correspondence head: synthetic corruptions, training, the u estimator."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from anomorph.config import ConfigError
from anomorph.guidance.masks import synthetic_corruption
from anomorph.networks import NonCorrespondenceNet


def _images(b=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = 0.2 + 0.6 * torch.rand(b, 1, size, size, generator=g)
    brains = torch.zeros(b, 1, size, size)
    brains[:, :, 4:-4, 4:-4] = 1
    return images, brains


def test_corruption_changes_only_blobs_in_the_brain_and_targets_only_visible_changes():
    images, brains = _images(b=64)
    corrupted, target = synthetic_corruption(images, torch.Generator().manual_seed(1), brains, empty_probability=0.0)
    changed = (corrupted - images).abs() > 0
    assert not changed[brains == 0].any()                 # nothing outside the brain
    assert bool(target.any()) and set(target.unique().tolist()) <= {0.0, 1.0}
    # every target pixel changed by at least min_change; most changed pixels are targets or blob edges
    assert ((corrupted - images).abs()[target > 0] >= 0.05).all()
    # an impossible min_change asks for nothing; the corruption itself is unchanged (same generator)
    again, none = synthetic_corruption(images, torch.Generator().manual_seed(1), brains, empty_probability=0.0,
                                       min_change=2.0)
    assert torch.equal(again, corrupted) and not none.any()
    # about empty_probability of the slices stay clean (no target, unchanged)
    images, brains = _images(b=400, seed=2)
    corrupted, target = synthetic_corruption(images, torch.Generator().manual_seed(3), brains)
    clean = ~(corrupted != images).flatten(1).any(1)
    assert 0.15 < clean.float().mean() < 0.35 and not target[clean].any()


def test_head_network_shapes_2d_and_3d():
    x = torch.rand(2, 1, 16, 16)
    assert NonCorrespondenceNet(channels=(4, 8)).forward(x, x, x).shape == (2, 1, 16, 16)
    v = torch.rand(1, 2, 8, 8, 8)
    net = NonCorrespondenceNet(spatial_dims=3, image_channels=2, channels=(4, 8))
    assert net(v, v, v).shape == (1, 1, 8, 8, 8)
    with pytest.raises(ValueError):
        NonCorrespondenceNet(channels=(4,))


def test_fit_head_saves_loadable_weights_and_the_estimator_gives_u_equal_to_p(tiny_calibrated_run, tmp_path):
    from anomorph.runs import load_head, load_run
    from anomorph.training.noncorrespondence import HeadSettings, fit_head
    from anomorph.uncertainty import build_estimator

    run = tmp_path / "run"
    shutil.copytree(tiny_calibrated_run, run)
    settings = HeadSettings(steps=3, batch_size=4, draws=1, channels=(4, 8))
    out = fit_head(run, settings)
    info = json.loads((out / "head.json").read_text())
    assert info["settings"]["steps"] == 3 and info["pool_samples"] > 0
    state = torch.load(out / "head.pt", weights_only=True)
    head, _ = load_head(run)
    assert all(torch.equal(state[k], v) for k, v in head.state_dict().items())
    network, _ = load_run(run)
    images = torch.rand(3, 1, 32, 32)
    estimator = build_estimator("noncorrespondence", run_dir=str(run))
    result = estimator(network, images)
    out_net = network(images)
    with torch.no_grad():
        logits = head(images, out_net.reconstruction, out_net.warped)
    # raw = −log(1 − p) = softplus(logit); with scale 1 the squash gives u = p exactly
    assert torch.allclose(result.raw, torch.nn.functional.softplus(logits), atol=1e-5)
    assert torch.allclose(result.uncertainty, torch.sigmoid(logits), atol=1e-5)
    # an existing head is kept (no silent retraining); overwrite replaces it
    before = (out / "head.pt").read_bytes()
    fit_head(run, HeadSettings(steps=1, batch_size=4, draws=1, channels=(4, 8), seed=5))
    assert (out / "head.pt").read_bytes() == before


def test_fit_head_refuses_bad_settings_and_a_missing_head_names_the_command(tmp_path, tiny_calibrated_run):
    from anomorph.training.noncorrespondence import HeadSettings
    from anomorph.uncertainty import build_estimator

    with pytest.raises(ConfigError, match="steps"):
        HeadSettings(steps=0)
    with pytest.raises(ConfigError, match="radius_range"):
        HeadSettings(radius_range=(0.1,))
    with pytest.raises(ConfigError):
        build_estimator("noncorrespondence")
    from anomorph.runs import load_run

    network, _ = load_run(tiny_calibrated_run)
    estimator = build_estimator("noncorrespondence", run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="anomorph fit-head"):
        estimator(network, torch.rand(1, 1, 32, 32))


def test_fit_head_calibrate_and_predict_from_the_cli(tiny_calibrated_run, tiny_phantom, tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from anomorph.cli.main import main
    from anomorph.data.manifest import read_manifest

    run = tmp_path / "run"
    shutil.copytree(tiny_calibrated_run, run)
    assert main(["fit-head", "--run", str(run), "--steps", "2", "--batch-size", "4", "--draws", "1",
                 "--channels", "4", "8"]) == 0
    assert (run / "noncorrespondence" / "head.pt").is_file()
    assert main(["calibrate", "--run", str(run), "--guidance", "gating", "--estimator", "noncorrespondence"]) == 0
    row = next(r for r in read_manifest(tiny_phantom) if r.split == "test" and r.mask)
    assert main(["predict", "--run", str(run), "--guidance", "gating", "--estimator", "noncorrespondence",
                 str(row.image), "--brain-mask", str(row.brain_mask), "--out", str(tmp_path / "pred")]) == 0
    u = np.asarray(nib.load(str(next((tmp_path / "pred").rglob("*uncertainty*.nii.gz")))).dataobj)
    assert u.min() >= 0 and u.max() <= 1 and u.max() > 0
    capsys.readouterr()
    # a run without a head: one line naming the command that trains it, exit 2
    code = main(["predict", "--run", str(tiny_calibrated_run), "--guidance", "gating", "--estimator",
                 "noncorrespondence", str(row.image), "--out", str(tmp_path / "pred2")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_combined_estimator_calibrates_saves_its_parts_and_predicts_from_the_cli(tiny_calibrated_run, tiny_phantom,
                                                                                   tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from anomorph.cli.main import main
    from anomorph.data.manifest import read_manifest
    from anomorph.scoring import Detector

    run = tmp_path / "run"
    shutil.copytree(tiny_calibrated_run, run)
    name = "max(warped_residual,deformation)"
    assert main(["calibrate", "--run", str(run), "--guidance", "gating", "--estimator", name]) == 0
    npz = run / "calibration" / "normaliser.npz"
    with np.load(npz, allow_pickle=False) as saved:
        arrays = dict(saved)
    assert {"mean", "std", "estimator.part0.mean", "estimator.part1.std"} <= set(arrays)
    # the detector rebuilt from the files (no refit) has the saved part statistics
    detector = Detector.from_run(run)
    assert detector.estimator_model.name == name and detector.calibration_matches
    part = detector.estimator_model.estimator.normalisers[1]
    assert np.array_equal(part.std.numpy(), arrays["estimator.part1.std"])
    row = next(r for r in read_manifest(tiny_phantom) if r.split == "test" and r.mask)
    assert main(["predict", "--run", str(run), str(row.image), "--brain-mask", str(row.brain_mask),
                 "--out", str(tmp_path / "pred")]) == 0
    u = np.asarray(nib.load(str(next((tmp_path / "pred").rglob("*uncertainty*.nii.gz")))).dataobj)
    assert u.min() >= 0 and u.max() <= 1 and u.max() > 0
    capsys.readouterr()
    # calibration arrays without the parts' statistics: one line naming what is missing, exit 2
    np.savez(npz, **{k: v for k, v in arrays.items() if not k.startswith("estimator.part1.")})
    code = main(["predict", "--run", str(run), str(row.image), "--out", str(tmp_path / "pred2")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and "part 1" in err
