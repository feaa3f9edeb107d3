"""Issue 16 (reliability, round two): metric files with non-finite values, checkpoints that are the
latest state and survive a failed write, run-directory locks, output collisions, memory bombs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

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
