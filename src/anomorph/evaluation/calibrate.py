"""``anomorph calibrate --run RUN_DIR``: fit and save what inference needs (SPEC §4).

On the val split of the run's manifest (or ``--data``): the healthy val subjects are split by
:func:`~anomorph.evaluation.evaluate.calibration_subjects` into *calibration* subjects, on whose
slices the healthy normaliser of the chosen estimator (and, for deformable runs, of the
registered residual |x − x̃|, used by the iterative strategy) is fitted, and the remaining val
subjects, on whose pixels the detector (with the calibrated guidance setting) sets anomaly-score
thresholds at 1%, 2% and 5% FPR on healthy (mask = 0) brain pixels, and the max-Dice threshold
when they hold lesions. With fewer than two healthy val subjects both steps use the same
subjects and ``calibration.json`` says so in ``note``. Files: see
:mod:`anomorph.scoring.calibration`.
"""
from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import __version__
from ..data.manifest import read_manifest
from ..data.slices import SliceConfig, SliceDataset
from ..errors import DataError
from ..runs import checkpoint_path, file_sha256, load_run, resolve_run_dir
from ..scoring.calibration import (DEFAULT_FPRS, FORMAT, NORMALISER_FILE, RESIDUAL_FILE, Calibration,
                                   normaliser_entry)
from ..scoring.detector import Detector, GuidanceArg, resolve_guidance
from ..uncertainty import canonical_estimator_name
from ..scoring.sources import fit_residual_statistics
from .evaluate import calibration_subjects
from .metrics import MetricAccumulator, threshold_at_fpr


def calibrate(run_dir: str | Path, manifest: str | Path | None = None, guidance: GuidanceArg = None,
              estimator: str | None = None, estimator_options: Mapping[str, Any] | None = None,
              which: str = "best", calibration_fraction: float = 0.5, fprs: Sequence[float] = DEFAULT_FPRS,
              batch_size: int = 32, seed: int = 0) -> Calibration:
    """Fit and save the run's calibration (``RUN_DIR/calibration/``); returns it.

    ``guidance``/``estimator``: the setting to calibrate (default: the run's config; see
    :func:`~anomorph.scoring.detector.resolve_guidance`); the saved setting's
    ``guidance.estimator`` is ``estimator``, so later detectors use it by default. ``manifest``: default the run's
    ``data.manifest``.
    """
    run_dir = Path(run_dir)
    member = resolve_run_dir(run_dir)
    network, config = load_run(member, which)
    setting = resolve_guidance(config, guidance, None)
    name_u = canonical_estimator_name(estimator or setting.estimator)
    # the saved setting is the calibrated one: `predict --run RUN` then uses this estimator by default
    setting = dataclasses.replace(setting, estimator=name_u)
    manifest = Path(manifest) if manifest is not None else Path(config.data.manifest)
    rows = read_manifest(manifest)
    if not any(r.split == "val" for r in rows):
        raise DataError(f"{manifest}: no val rows: calibration needs healthy val scans")
    slices = SliceConfig.from_config(config.data)
    val = SliceDataset(manifest, ["val"], slices, rows=rows)
    reserved = set(calibration_subjects(val, calibration_fraction))
    note = None
    if reserved:
        calibration_set = SliceDataset(manifest, ["val"], slices, rows=[r for r in rows if r.subject in reserved])
        threshold_set = SliceDataset(manifest, ["val"], slices,
                                     rows=[r for r in rows if r.split == "val" and r.subject not in reserved])
    else:
        calibration_set = threshold_set = val
        note = "fewer than two healthy val subjects: the same subjects fit the normalisers and set the thresholds"
    healthy = calibration_set.labels == 0
    if not bool(healthy.any()):
        raise DataError(f"{manifest}: no healthy val slices to calibrate on")
    reference = (calibration_set.images[healthy], calibration_set.brain_masks[healthy])
    detector = Detector.assemble(network, config, setting, name_u, estimator_options, reference, None, seed,
                                 run_dir=run_dir)
    residual = detector.residual
    if residual is None and config.model.name == "morphaeus":
        residual = fit_residual_statistics(network, *reference)

    # thresholds on the other val subjects' healthy brain pixels
    healthy_scores: list[np.ndarray] = []
    accumulator = MetricAccumulator()
    has_lesions = int(threshold_set.labels.sum()) > 0
    for start in range(0, len(threshold_set), batch_size):
        s = slice(start, min(start + batch_size, len(threshold_set)))
        pred = detector(threshold_set.images[s], threshold_set.brain_masks[s], threshold_set.healthy[s])
        maps = pred.anomaly_map.numpy()
        inside = threshold_set.brain_masks[s].numpy() > 0
        normal = inside & (threshold_set.masks[s].numpy() == 0)
        healthy_scores.append(maps[normal].astype(np.float64))
        if has_lesions:
            types = [row.lesion_type for row, _, _ in threshold_set.meta[s]]
            accumulator.update(maps, threshold_set.images[s].numpy(), threshold_set.masks[s].numpy(),
                               threshold_set.brain_masks[s].numpy(), threshold_set.labels[s].numpy(), types)
    scores = np.concatenate(healthy_scores)
    thresholds = []
    for fpr in fprs:
        t = float(threshold_at_fpr(scores, fpr))
        thresholds.append({"fpr": float(fpr), "threshold": t, "realised_fpr": float(np.mean(scores > t)),
                           "n_healthy_pixels": int(scores.size)})
    dice = None
    if has_lesions:
        dice = {"threshold": float(accumulator.max_dice_threshold())}

    info: dict[str, Any] = {
        "format": FORMAT, "anomorph_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": which, "checkpoint_sha256": file_sha256(checkpoint_path(member, which)),
        "manifest": str(manifest), "guidance": _plain(setting),
        "estimator": {"name": name_u, "options": {"seed": seed, **dict(estimator_options or {})}},
        "normaliser": None, "residual": None, "thresholds": thresholds, "dice_threshold": dice,
        "calibration_subjects": sorted({row.subject for row, _, _ in calibration_set.meta}),
        "threshold_subjects": sorted({row.subject for row, _, _ in threshold_set.meta}),
    }
    if note:
        info["note"] = note
    arrays: dict[str, dict[str, np.ndarray]] = {}
    from ..uncertainty import HealthyNormaliser

    if isinstance(detector.estimator_model, HealthyNormaliser):
        info["normaliser"], arrays["normaliser"] = normaliser_entry(detector.estimator_model, NORMALISER_FILE)
    if residual is not None:
        info["residual"], arrays["residual"] = normaliser_entry(residual, RESIDUAL_FILE)
    result = Calibration(info, arrays)
    result.save(member)
    return result


def _plain(setting) -> dict[str, Any]:
    import dataclasses

    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in dataclasses.asdict(setting).items()}

