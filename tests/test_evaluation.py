"""Evaluation pipeline and prediction: metrics vs scikit-learn, honest thresholds, geometry."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from anomorph.data import SliceConfig
from anomorph.data.phantom import PhantomConfig, build_phantom
from anomorph.evaluation.api import evaluate
from anomorph.evaluation.evaluate import EvaluationData, evaluate_scorer
from anomorph.evaluation.inference import Prediction, Scorer, ThresholdScorer
from anomorph.evaluation.metrics import dice_at_threshold, threshold_at_fpr, threshold_max_dice
from anomorph.evaluation.predict import predict_files
from anomorph.training import fit
from conftest import tiny_run_config, write_nifti


class NoisyOracle(Scorer):
    """|x − healthy| plus seeded noise: a deterministic scorer with ties and errors."""

    name = "noisy"

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images, brain_masks, healthy=None):
        noise = 0.15 * torch.rand(images.shape, generator=self.generator)
        score = ((images - healthy).abs() + noise).clamp(0, 1) * brain_masks
        return Prediction(score, healthy, healthy)


def test_pixel_and_slice_metrics_match_sklearn(tiny_phantom):
    data = EvaluationData.load(tiny_phantom, SliceConfig(size=32))
    result = evaluate_scorer(NoisyOracle(32), data)
    # recompute from the very same maps (same seed → same noise sequence: val first, then test)
    scorer = NoisyOracle(32)
    for images, brains, healthy in [(data.val.images, data.val.brain_masks, data.val.healthy)]:
        val_map = torch.cat([scorer(images[i:i + 32], brains[i:i + 32], healthy[i:i + 32]).anomaly_map
                             for i in range(0, len(images), 32)])
    test_map = torch.cat([scorer(data.test.images[i:i + 32], data.test.brain_masks[i:i + 32],
                                 data.test.healthy[i:i + 32]).anomaly_map for i in range(0, len(data.test), 32)])
    inside = data.test.brain_masks.numpy() > 0
    scores, labels = test_map.numpy()[inside], data.test.masks.numpy()[inside] > 0
    bound = result.metrics["pixel_auroc_binning_error_bound"]
    assert result.metrics["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=bound + 1e-9)
    assert result.metrics["pixel_auprc"] == pytest.approx(average_precision_score(labels, scores), abs=2e-3)
    # Dice@val: threshold chosen on val pixels only, applied to test
    val_inside = data.val.brain_masks.numpy() > 0
    val_scores, val_labels = val_map.numpy()[val_inside], data.val.masks.numpy()[val_inside] > 0
    exact_threshold = threshold_max_dice(val_scores, val_labels)
    chosen = result.metrics["thresholds"]["val_threshold"]
    best_val_dice = dice_at_threshold(val_scores, val_labels, exact_threshold)
    assert dice_at_threshold(val_scores, val_labels, chosen) == pytest.approx(best_val_dice, abs=2e-3)
    assert result.metrics["dice_at_val"] == pytest.approx(
        dice_at_threshold(scores, labels, result.metrics["thresholds"]["val_threshold"]), abs=1e-3)
    fpr_thr = threshold_at_fpr(val_scores[~val_labels], 0.05)
    assert abs(result.metrics["thresholds"]["fpr_threshold"] - fpr_thr) <= 1 / 65536 + 1e-12
    # slice level: mean of the top 1% brain pixels per slice
    slice_scores = []
    for m, b in zip(test_map[:, 0].numpy(), data.test.brain_masks[:, 0].numpy() > 0):
        v = np.sort(m[b])[::-1]
        slice_scores.append(v[: max(1, int(np.ceil(0.01 * v.size)))].mean())
    assert result.metrics["slice_auroc"] == pytest.approx(roc_auc_score(data.test.labels.numpy(), slice_scores))


def test_dice_at_val_depends_only_on_val(tiny_phantom):
    data = EvaluationData.load(tiny_phantom, SliceConfig(size=32))
    before = evaluate_scorer(NoisyOracle(32), data).metrics["thresholds"]
    data.test.masks.zero_()  # poison the test labels: the val-chosen thresholds must not move
    data.test.images.mul_(0.5)
    after = evaluate_scorer(NoisyOracle(32), data).metrics["thresholds"]
    assert before == after


def test_oracle_row_beats_models_and_files_written(tiny_phantom, tmp_path):
    run = fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=1), run_dir=tmp_path / "run")
    out = evaluate([run], tiny_phantom, tmp_path / "eval", methods=["threshold"], report=False)
    names = [r.name for r in out.results]
    assert names == ["threshold", "run", "oracle"]  # "run": the default config name
    metrics = {r.name: r.metrics for r in out.results}
    for name, m in metrics.items():
        if name != "oracle":
            assert metrics["oracle"]["pixel_auprc"] >= m["pixel_auprc"]
            assert metrics["oracle"]["oracle_best_dice"] >= m["oracle_best_dice"]
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(saved["methods"]) == set(names)
    assert "csf_like" in saved["methods"]["oracle"]["by_lesion_type"]
    assert set(saved["methods"]["oracle"]["by_size"]) <= {"small", "medium", "large"}
    assert (tmp_path / "eval" / "metrics.csv").read_text().count("\n") > 3


def test_no_abnormal_test_slices_reports_undefined(tmp_path, synthetic_dataset):
    text = synthetic_dataset.read_text().replace("mask/sub07.nii.gz", "")
    synthetic_dataset.write_text(text)
    out = evaluate([], synthetic_dataset, tmp_path / "eval", methods=["threshold"], size=32, report=False)
    m = out.results[0].metrics
    assert np.isnan(m["pixel_auroc"]) and "pixel_auroc" in m["undefined"]
    assert m["n_abnormal_slices"] == 0 and m["n_slices"] == 12
    assert any("pixel_auroc" in note for note in out.notes)


def test_evaluate_resamples_a_manifest_of_another_size(tiny_phantom, tmp_path):
    run = fit(tiny_run_config(tiny_phantom, model="ae", max_epochs=1), run_dir=tmp_path / "run")
    bigger = build_phantom(tmp_path / "p48", PhantomConfig(size=48, n_slices=3, seed=5, n_train=2,
                                                           n_val_healthy=1, n_val_lesion=1, n_test=3,
                                                           n_test_healthy=1))
    out = evaluate([run], bigger, tmp_path / "eval", report=False)
    assert out.results[0].metrics["n_slices"] == 9
    assert 0.0 <= out.results[0].metrics["pixel_auroc"] <= 1.0


def test_predict_round_trips_geometry_with_flipped_affine(tmp_path):
    rng = np.random.default_rng(11)
    volume = np.zeros((30, 24, 5), np.float32)
    volume[5:25, 4:20, :] = 100 + rng.normal(0, 1, (20, 16, 5))
    volume[20:23, 6:9, 2] = 400.0  # a bright spot, far from the centre
    affine = np.diag([-1.5, 1.5, -3.0, 1.0])  # x and z flipped on disk
    affine[:3, 3] = [10, -20, 5]
    path = write_nifti(tmp_path / "scan.nii.gz", volume, affine)
    scorer = ThresholdScorer("intensity", size=32)
    files = predict_files(scorer, [path], tmp_path / "out")[str(path)]
    anomaly = nib.load(str(files["anomaly"]))
    assert anomaly.shape == volume.shape
    assert np.array_equal(anomaly.affine, nib.load(str(path)).affine)
    data = np.asarray(anomaly.dataobj)
    peak = np.unravel_index(np.argmax(data), data.shape)
    assert 20 <= peak[0] < 23 and 6 <= peak[1] < 9 and peak[2] == 2
    healthy = nib.load(str(files["pseudo_healthy"]))
    assert healthy.shape == volume.shape and np.array_equal(healthy.affine, affine)
    assert files["preview"].is_file()


def test_predict_png_keeps_size(tmp_path):
    from PIL import Image

    image = np.zeros((40, 50), np.uint8)
    image[5:35, 5:45] = 120
    image[10:14, 30:34] = 250
    Image.fromarray(image).save(tmp_path / "xray.png")
    files = predict_files(ThresholdScorer("intensity", size=32), [tmp_path / "xray.png"], tmp_path / "out")
    anomaly = np.asarray(Image.open(files[str(tmp_path / "xray.png")]["anomaly"]))
    assert anomaly.shape == (40, 50)
    assert anomaly[12, 32] > anomaly[25, 10]


def test_predict_checks_all_inputs_before_writing(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", np.ones((8, 8, 2), np.float32))
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b broken")
    from anomorph.errors import DataError

    with pytest.raises(DataError, match="bad.nii.gz"):
        predict_files(ThresholdScorer(size=16), [good, tmp_path / "bad.nii.gz"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_val_as_test_scores_the_val_slices_and_keeps_the_calibration_subjects(tiny_phantom):
    from anomorph.evaluation.evaluate import EvaluationData
    from anomorph.evaluation.metrics import size_tertile_edges
    from anomorph.data.slices import SliceConfig

    data = EvaluationData.load(tiny_phantom, SliceConfig(size=32, min_brain_fraction=0.0), calibration_fraction=0.5)
    on_val = data.val_as_test()
    assert on_val.val is None and on_val.test is data.val and on_val.calibration is data.calibration
    assert {m[0].split for m in on_val.test.meta} == {"val"}
    counts = data.val.masks.flatten(1).sum(1).numpy()
    assert on_val.size_edges == tuple(float(e) for e in size_tertile_edges(counts))
