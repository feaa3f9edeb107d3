"""From a trained run to maps for new scans (issue 13): Preprocessor, Detector.from_run,
calibration files, guided predict, predict ↔ evaluate parity, the derived brain mask."""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from anomorph.cli.main import main
from anomorph.data import SliceConfig, SliceDataset
from anomorph.data.io import load_image
from anomorph.data.manifest import read_manifest
from anomorph.data.preprocess import Preprocessor
from anomorph.data.slices import derive_brain_mask, load_subject
from anomorph.evaluation.inference import Prediction, Scorer, ThresholdScorer
from anomorph.evaluation.predict import predict_files, predict_volume
from anomorph.scoring import Calibration, Detector
from conftest import synthetic_subject, write_nifti


def _test_row(manifest, lesion=True):
    rows = [r for r in read_manifest(manifest) if r.split == "test" and (r.mask is not None) == lesion]
    return rows[0]


# ---------------------------------------------------------------------------- preprocessing
def test_preprocessor_is_the_slice_dataset_path_and_inverts(tiny_phantom):
    config = SliceConfig(size=24, slice_range=(1, 4), min_brain_fraction=0.2)
    row = _test_row(tiny_phantom)
    dataset = SliceDataset(tiny_phantom, ["test"], config, rows=[row])
    volume, _ = load_image(row.image)
    brain, _ = load_image(row.brain_mask)
    slices, geometry = Preprocessor.from_config(config).forward(volume, brain)
    assert geometry.indices == [g.slice_index for _, g, _ in dataset.meta]
    assert all(1 <= i < 4 for i in geometry.indices)
    assert torch.equal(slices.images, dataset.images) and torch.equal(slices.brain_masks, dataset.brain_masks)
    # inverse at the source size is exact on the scored slices and `fill` elsewhere
    same = Preprocessor(size=32, slice_range=(1, 4), min_brain_fraction=0.2)
    slices, geometry = same.forward(volume, brain)
    back = same.inverse(slices.images, geometry, fill=-1.0)
    subject = load_subject(row, tiny_phantom)
    for index in range(volume.shape[2]):
        if index in geometry.indices:
            np.testing.assert_allclose(back[:, :, index], subject.image[:, :, index], atol=1e-6)
        else:
            assert np.all(back[:, :, index] == -1.0)


# ---------------------------------------------------------------------------- derived brain mask
def _volume_with_empty_slices():
    rng = np.random.default_rng(5)
    image, _, _, brain = synthetic_subject(rng, shape=(40, 48, 6))
    image[:, :, 1] = 0.0  # an all-zero slice next to brain
    image[:, :, 5] = 0.0
    return image, brain


def test_derived_mask_leaves_empty_slices_empty():
    image, _ = _volume_with_empty_slices()
    mask = derive_brain_mask(image)
    assert mask[:, :, 1].sum() == 0 and mask[:, :, 5].sum() == 0
    assert all(mask[:, :, z].sum() > 500 for z in (0, 2, 3, 4))


def test_empty_slices_get_zero_anomaly_and_do_not_change_the_image_score(tmp_path):
    image, _ = _volume_with_empty_slices()
    scorer = ThresholdScorer("deviation", reference=0.5, size=48)  # |x − 0.5| > 0 on an empty slice
    result = predict_volume(scorer, image)
    assert result.anomaly[:, :, 1].max() == 0 and result.anomaly[:, :, 5].max() == 0
    assert result.anomaly[:, :, 2].max() > 0.1
    mass = result.anomaly.sum(axis=(0, 1))
    assert int(np.argmax(mass)) not in (1, 5)
    # the image-level score is that of the same scan without the empty slices
    full = write_nifti(tmp_path / "full.nii.gz", image)
    cropped = write_nifti(tmp_path / "cropped.nii.gz", image[:, :, [0, 2, 3, 4]])
    files = predict_files(scorer, [full, cropped], tmp_path / "out")
    scores = [json.loads(files[str(p)]["summary"].read_text())["image_score"] for p in (full, cropped)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-6) and scores[0] > 0


def test_derived_mask_matches_the_phantom_mask_and_covers_lesions(tiny_phantom):
    for row in read_manifest(tiny_phantom):
        image, _ = load_image(row.image)
        given = load_image(row.brain_mask)[0] > 0
        derived = derive_brain_mask(image)
        dice = 2 * np.sum(derived & given) / (derived.sum() + given.sum())
        assert dice >= 0.95, (row.subject, dice)
        if row.mask is not None:
            lesion = load_image(row.mask)[0] > 0
            if lesion.any():
                assert np.sum(lesion & derived) / lesion.sum() >= 0.99, row.subject


# ---------------------------------------------------------------------------- calibration
def test_calibration_files_are_plain_and_reproduce_the_detector(tiny_calibrated_run, tiny_phantom):
    folder = tiny_calibrated_run / "calibration"
    info = json.loads((folder / "calibration.json").read_text())
    assert [t["fpr"] for t in info["thresholds"]] == [0.01, 0.02, 0.05]
    for entry in info["thresholds"]:
        assert entry["realised_fpr"] <= entry["fpr"] + 1e-12 and entry["n_healthy_pixels"] > 1000
    assert info["dice_threshold"] is not None  # tiny_phantom has val lesions
    for name in ("normaliser.npz", "residual.npz"):
        with np.load(folder / name, allow_pickle=False) as arrays:
            assert arrays["mean"].shape == (1, 1, 32, 32) and np.all(arrays["std"] > 0)
    torch.load(tiny_calibrated_run / "checkpoints" / "best.ckpt", weights_only=True)
    # the saved normaliser = the one fitted on the calibration subjects
    rows = read_manifest(tiny_phantom)
    detector = Detector.from_run(tiny_calibrated_run)
    assert detector.strategy == "none" and detector.calibration_matches and len(detector.thresholds) == 3
    config = SliceConfig.from_config(detector.config.data)
    reference = SliceDataset(tiny_phantom, ["val"], config,
                             rows=[r for r in rows if r.subject in info["calibration_subjects"]])
    healthy = reference.labels == 0
    refit = Detector.from_run(tiny_calibrated_run, healthy=(reference.images[healthy], reference.brain_masks[healthy]),
                              calibration=False)
    test = SliceDataset(tiny_phantom, ["test"], config, rows=rows)
    u_saved = detector(test.images, test.brain_masks).uncertainty
    u_refit = refit(test.images, test.brain_masks).uncertainty
    assert torch.allclose(u_saved, u_refit, atol=1e-5)
    # the realised FPR is what the threshold gives on the threshold subjects' healthy pixels
    chosen = SliceDataset(tiny_phantom, ["val"], config, rows=[r for r in rows if r.subject in info["threshold_subjects"]])
    maps = detector(chosen.images, chosen.brain_masks).anomaly_map.numpy()
    normal = (chosen.brain_masks.numpy() > 0) & (chosen.masks.numpy() == 0)
    for entry in info["thresholds"]:
        assert np.mean(maps[normal] > entry["threshold"]) == pytest.approx(entry["realised_fpr"], abs=1e-9)


def test_guided_detector_needs_a_matching_calibration(tiny_calibrated_run, tmp_path, capsys):
    code = main(["predict", "--run", str(tiny_calibrated_run), str(tmp_path / "missing.nii.gz"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.nii.gz" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    volume = write_nifti(tmp_path / "scan.nii.gz", np.ones((32, 32, 2), np.float32))
    code = main(["predict", "--run", str(tiny_calibrated_run), "--guidance", "gating", "--estimator", "tta",
                 str(volume), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "'tta'" in err and "anomorph calibrate" in err and "Traceback" not in err


def test_corrupt_calibration_is_a_one_line_error(tiny_calibrated_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_calibrated_run, run)
    path = run / "calibration" / "calibration.json"
    info = json.loads(path.read_text())
    info["format"] = 99
    path.write_text(json.dumps(info))
    volume = write_nifti(tmp_path / "scan.nii.gz", np.ones((32, 32, 2), np.float32))
    code = main(["predict", "--run", str(run), str(volume), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "calibration.json" in err and "'format'" in err and "99" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_calibrate_cli_without_val_rows_is_a_user_error(tiny_calibrated_run, tiny_phantom, tmp_path, capsys):
    text = tiny_phantom.read_text().splitlines()
    header, rows = text[0], [line for line in text[1:] if ",val," not in line]
    manifest = tiny_phantom.parent / "no_val.csv"
    manifest.write_text("\n".join([header, *rows]) + "\n")
    code = main(["calibrate", "--run", str(tiny_calibrated_run), "--data", str(manifest)])
    err = capsys.readouterr().err
    assert code == 2 and "no_val.csv" in err and "val" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- predict ↔ evaluate
@pytest.mark.parametrize("guidance", ["none", "gating"])
def test_predict_gives_the_maps_evaluate_gives(tiny_calibrated_run, tiny_phantom, tmp_path, guidance):
    from anomorph.evaluation.evaluate import EvaluationData, _score

    row = _test_row(tiny_phantom)
    if guidance == "gating":  # calibrate the guided setting first (the CLI path)
        assert main(["calibrate", "--run", str(tiny_calibrated_run), "--guidance", "gating"]) == 0
    try:
        detector = Detector.from_run(tiny_calibrated_run, guidance=guidance)
        data = EvaluationData.load(tiny_phantom, SliceConfig.from_config(detector.config.data))
        picked = [i for i, (r, _, _) in enumerate(data.test.meta) if r.subject == row.subject]
        s = slice(picked[0], picked[-1] + 1)
        expected = _score(detector, data.test, s)
        files = predict_files(detector, [row.image], tmp_path / "pred", brain_masks=[row.brain_mask])[str(row.image)]
    finally:
        if guidance == "gating":  # restore the run's default calibration for the other tests
            assert main(["calibrate", "--run", str(tiny_calibrated_run)]) == 0
    indices = [g.slice_index for _, g, _ in data.test.meta[s]]
    anomaly = np.asarray(nib.load(str(files["anomaly"])).dataobj)
    got = np.stack([anomaly[:, :, i] for i in indices])
    np.testing.assert_allclose(got, expected.anomaly_map.numpy()[:, 0], atol=1e-5)
    assert float(expected.anomaly_map.max()) > 0
    u = np.asarray(nib.load(str(files["uncertainty"])).dataobj)
    np.testing.assert_allclose(np.stack([u[:, :, i] for i in indices]), expected.uncertainty.numpy()[:, 0], atol=1e-5)
    # binary lesion masks = anomaly > the calibrated threshold, and the JSON counts them
    summary = json.loads(files["summary"].read_text())
    assert summary["brain_mask"] == "given" and summary["calibration"]["thresholds_apply"]
    assert summary["guidance"]["strategy"] == guidance
    for entry in summary["thresholds"]:
        name = f"lesions_fpr{int(round(entry['fpr'] * 100)):02d}"
        lesions = np.asarray(nib.load(str(files[name])).dataobj)
        assert np.array_equal(lesions > 0, anomaly > entry["threshold"])
        assert entry["lesion_voxels"] == int(lesions.sum())
        assert entry["lesion_count"] == ndimage.label(lesions > 0)[1]
        voxel = abs(np.linalg.det(nib.load(str(row.image)).affine[:3, :3]))
        assert entry["lesion_volume_mm3"] == pytest.approx(lesions.sum() * voxel)
    if guidance == "gating":
        assert "guidance_mask" in files


def test_guided_predict_differs_from_unguided_only_near_the_mask(tiny_calibrated_run, tiny_phantom):
    row = _test_row(tiny_phantom)
    volume, _ = load_image(row.image)
    brain, _ = load_image(row.brain_mask)
    plain = predict_volume(Detector.from_run(tiny_calibrated_run, guidance="none"), volume, brain)
    setting = {"strategy": "gating", "threshold": 3.0, "softness": 0.5, "dilation": 0}
    guided = predict_volume(Detector.from_run(tiny_calibrated_run, guidance=setting), volume, brain)
    m = guided.guidance_mask > 0
    assert 0 < m.sum() and m.sum() < 0.2 * (brain > 0).sum()
    diff = np.abs(guided.anomaly - plain.anomaly)
    assert diff[m].max() > 1e-7  # gating changes the map where m > 0 ...
    # ... and nowhere beyond the deformation's reach from m (integration + bilinear warp)
    reach = math.ceil(float(np.abs(plain.displacement).max())) + 2
    near = np.stack([ndimage.binary_dilation(m[:, :, z], iterations=reach) for z in range(m.shape[2])], axis=2)
    assert diff[~near].max() <= 1e-6
    assert (~near & (brain > 0)).sum() > 100


class ShiftScorer(Scorer):
    """A constant displacement of +1 model pixel along rows and −2 along columns."""

    name = "shift"
    deformable = True

    def __init__(self, size):
        self.size = size

    def __call__(self, images, brain_masks, healthy=None):
        d = torch.zeros(images.shape[0], 2, *images.shape[2:])
        d[:, 0], d[:, 1] = 1.0, -2.0
        return Prediction(images * 0, images, images, d, torch.ones_like(images))


def test_displacement_is_written_in_mm_along_world_axes(tmp_path):
    volume = np.zeros((16, 16, 3), np.float32)
    volume[3:13, 3:13] = 100.0
    affine = np.diag([-1.5, 2.0, 3.0, 1.0])  # x flipped on disk, anisotropic voxels
    path = write_nifti(tmp_path / "scan.nii.gz", volume, affine)
    files = predict_files(ShiftScorer(size=32), [path], tmp_path / "out")[str(path)]
    image = nib.load(str(files["displacement"]))
    assert image.shape == (16, 16, 3, 1, 3) and image.header.get_intent()[0] == "vector"
    assert np.array_equal(image.affine, affine)
    d = np.asarray(image.dataobj)[6, 6, 1, 0]
    # model px → source px: 16 / 32; canonical x = flipped disk x: world x = −1.5 mm × (−(+0.5)) ...
    # canonical axes are RAS, so +0.5 canonical voxels along x is +0.5 × 1.5 mm in world x
    np.testing.assert_allclose(d, [0.5 * 1.5, -1.0 * 2.0, 0.0], atol=1e-5)
    log_jacobian = np.asarray(nib.load(str(files["log_jacobian"])).dataobj)
    assert np.allclose(log_jacobian, 0.0)


def test_predict_brain_mask_option_is_used_and_checked(tiny_calibrated_run, tiny_phantom, tmp_path, capsys):
    row = _test_row(tiny_phantom)
    out = tmp_path / "out"
    assert main(["predict", "--run", str(tiny_calibrated_run), str(row.image), "--brain-mask", str(row.brain_mask),
                 "--out", str(out)]) == 0
    capsys.readouterr()
    written = np.asarray(nib.load(str(next(out.glob("*_brain_mask.nii.gz")))).dataobj) > 0
    given = np.asarray(nib.load(str(row.brain_mask)).dataobj) > 0
    assert np.array_equal(written, given)
    small = write_nifti(tmp_path / "small_mask.nii.gz", np.ones((8, 8, 2), np.uint8))
    code = main(["predict", "--run", str(tiny_calibrated_run), str(row.image), "--brain-mask", str(small),
                 "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "small_mask.nii.gz" in err and "grid" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_calibration_load_refuses_pickles(tiny_calibrated_run, tmp_path):
    import pickle
    import shutil

    from anomorph.errors import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(tiny_calibrated_run, run)
    (run / "calibration" / "normaliser.npz").write_bytes(pickle.dumps({"mean": object()}))
    with pytest.raises(CheckpointError, match="normaliser.npz"):
        Calibration.load(run)


def test_evaluate_scores_a_run_with_its_calibrated_guidance(tiny_calibrated_run, tiny_phantom, tmp_path):
    """The run's guidance setting is no longer ignored at inference: after calibrating gating,
    ``evaluate`` scores the run with gating (u and m included) unless told otherwise."""
    import shutil

    from anomorph.evaluation.api import evaluate
    from anomorph.evaluation.calibrate import calibrate

    run = tmp_path / "run"
    shutil.copytree(tiny_calibrated_run, run)
    calibrate(run, guidance="gating")
    guided = evaluate([run], tiny_phantom, tmp_path / "eval", report=False, oracle=False).results[0]
    plain = evaluate([run], tiny_phantom, tmp_path / "eval0", report=False, oracle=False,
                     guidance="none").results[0]
    assert guided.name.endswith("+gating") and "uncertainty_auroc" in guided.metrics
    assert "uncertainty_auroc" not in plain.metrics
    assert guided.metrics["pixel_auprc"] != plain.metrics["pixel_auprc"]


def test_predict_guidance_option_sets_the_test_time_steps(tiny_calibrated_run, tiny_phantom, tmp_path, capsys):
    """`anomorph predict --guidance cost_masking --guidance-option map_steps=N`: the detector runs
    N Adam steps (recorded in the summary, and a different map from the default 30)."""
    row = _test_row(tiny_phantom)
    maps = {}
    for steps in (None, 2):
        out = tmp_path / f"steps{steps}"
        extra = [] if steps is None else ["--guidance-option", f"map_steps={steps}", "--guidance-option", "map_lr=0.05"]
        assert main(["predict", "--run", str(tiny_calibrated_run), str(row.image), "--guidance", "cost_masking",
                     *extra, "--out", str(out)]) == 0
        summary = json.loads(next(out.glob("*_summary.json")).read_text())
        assert summary["guidance"]["strategy"] == "cost_masking"
        assert summary["guidance"]["map_steps"] == (30 if steps is None else 2)
        maps[steps] = np.asarray(nib.load(str(next(out.glob("*_anomaly.nii.gz")))).dataobj)
    assert np.abs(maps[None] - maps[2]).max() > 1e-6
    capsys.readouterr()
    code = main(["predict", "--run", str(tiny_calibrated_run), str(row.image), "--guidance-option", "steps=3",
                 "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "steps" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code = main(["predict", "--run", str(tiny_calibrated_run), str(row.image), "--guidance-option", "map_steps",
                 "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "KEY=VALUE" in err
    # a value no strategy can use is refused before any scan is read, naming the key
    for bad in ("hysteresis=2", "softness=-1"):
        code = main(["predict", "--run", str(tiny_calibrated_run), str(row.image), "--guidance", "cost_masking",
                     "--guidance-option", bad, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and f"guidance.{bad.split('=')[0]}" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
