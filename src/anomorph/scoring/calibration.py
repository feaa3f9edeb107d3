"""Calibration files of a run: what inference needs beyond the weights, as plain JSON + NPZ.

``anomorph calibrate --run RUN_DIR`` (:func:`anomorph.evaluation.calibrate.calibrate`, also run
at the end of ``anomorph fit`` when the manifest has val rows) writes::

    RUN_DIR/calibration/calibration.json       settings, thresholds, provenance (below)
    RUN_DIR/calibration/normaliser.npz         healthy statistics of the estimator's raw map
    RUN_DIR/calibration/residual.npz           healthy statistics of |x − x̃| (deformable runs;
                                               the iterative strategy)

``calibration.json`` keys: ``format`` (1), ``anomorph_version``, ``created`` (UTC ISO time),
``checkpoint`` and ``checkpoint_sha256`` (the weights it was fitted with), ``manifest``,
``guidance`` (every :class:`~anomorph.config.GuidanceConfig` field of the calibrated setting),
``estimator`` (``name``, ``options``), ``normaliser`` / ``residual`` (``mode``, ``z0``,
``temperature``, ``n_fit``, ``file``) or null, ``thresholds`` (one entry per target FPR:
``fpr``, ``threshold`` on the anomaly score, ``realised_fpr`` on the healthy val pixels it was
set on, ``n_healthy_pixels``), ``dice_threshold`` (the val-chosen max-Dice threshold, or null
without val lesions), ``calibration_subjects`` (fit the normalisers) and ``threshold_subjects``
(chose the thresholds; disjoint from the former unless ``note`` says otherwise).

The NPZ arrays (``mean``, ``std``, in tissue mode ``intensity_edges``, ``gradient_edges``, and
for a combined estimator such as ``max(warped_residual,noncorrespondence)`` each part's
statistics under ``estimator.part<i>.<key>``) load with ``numpy.load(allow_pickle=False)``: no code is ever run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.io import atomic_write
from ..errors import CheckpointError
from ..uncertainty.normalise import ESTIMATOR_PREFIX
from ..uncertainty import HealthyNormaliser, UncertaintyEstimator, canonical_estimator_name

CALIBRATION_DIR = "calibration"
CALIBRATION_FILE = "calibration.json"
NORMALISER_FILE = "normaliser.npz"
RESIDUAL_FILE = "residual.npz"
FORMAT = 1
DEFAULT_FPRS = (0.01, 0.02, 0.05)


def calibration_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CALIBRATION_DIR


@dataclass
class Calibration:
    """A run's calibration (see the module docstring); ``arrays`` holds the NPZ contents by file."""

    info: dict[str, Any]
    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    path: Path | None = None

    @property
    def version(self) -> str:
        """First 12 hex digits of the SHA-256 of ``calibration.json`` (changes with every refit)."""
        text = json.dumps(self.info, sort_keys=True).encode()
        return hashlib.sha256(text).hexdigest()[:12]

    @property
    def thresholds(self) -> list[dict[str, Any]]:
        return list(self.info.get("thresholds") or [])

    @property
    def estimator_name(self) -> str | None:
        estimator = self.info.get("estimator") or {}
        name = estimator.get("name")
        return None if name is None else canonical_estimator_name(name)

    def normaliser(self, estimator: UncertaintyEstimator, which: str = "normaliser") -> HealthyNormaliser | None:
        """The saved :class:`HealthyNormaliser` around ``estimator`` (``which``: "normaliser" or
        "residual"), or None when it was not saved."""
        meta = self.info.get(which)
        arrays = self.arrays.get(which)
        if not meta or arrays is None:
            return None
        state = {key: torch.from_numpy(np.asarray(value)) for key, value in arrays.items()}
        state.update({"mode": torch.tensor(["pixel", "tissue"].index(meta["mode"])),
                      "z0": torch.tensor(float(meta["z0"])), "temperature": torch.tensor(float(meta["temperature"])),
                      "n_fit": torch.tensor(int(meta.get("n_fit", 0)))})
        return HealthyNormaliser.from_state(estimator, state)

    # ------------------------------------------------------------------ files
    def save(self, run_dir: str | Path) -> Path:
        folder = calibration_dir(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for which, arrays in self.arrays.items():
            name = self.info[which]["file"]
            atomic_write(folder / name, lambda tmp, a=arrays: _save_npz(tmp, a))
        text = json.dumps(self.info, indent=2, sort_keys=False) + "\n"
        self.path = atomic_write(folder / CALIBRATION_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return self.path

    @classmethod
    def load(cls, run_dir: str | Path) -> "Calibration | None":
        """The run's calibration, or None when ``RUN_DIR/calibration/calibration.json`` is absent.
        A present but unreadable file is a :class:`CheckpointError` naming the file and field."""
        folder = calibration_dir(run_dir)
        path = folder / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable calibration file ({err})") from err
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise CheckpointError(f"{path}: field 'format' must be {FORMAT}, got "
                                  f"{info.get('format') if isinstance(info, dict) else info!r}")
        arrays: dict[str, dict[str, np.ndarray]] = {}
        for which in ("normaliser", "residual"):
            meta = info.get(which)
            if not meta:
                continue
            npz = folder / str(meta.get("file", ""))
            try:
                with np.load(npz, allow_pickle=False) as data:
                    arrays[which] = {key: np.asarray(data[key]) for key in data.files}
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{npz}: unreadable calibration arrays for field {which!r} ({err})") from err
            for key in ("mean", "std"):
                if key not in arrays[which]:
                    raise CheckpointError(f"{npz}: missing array {key!r}")
        return cls(info, arrays, path)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def normaliser_entry(normaliser: HealthyNormaliser, file: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON metadata, NPZ arrays) of a fitted normaliser."""
    meta = {"mode": normaliser.mode, "z0": normaliser.z0, "temperature": normaliser.temperature,
            "n_fit": normaliser.n_fit, "file": file}
    arrays = {"mean": normaliser.mean.numpy().astype(np.float32), "std": normaliser.std.numpy().astype(np.float32)}
    if normaliser.intensity_edges is not None and normaliser.gradient_edges is not None:
        arrays["intensity_edges"] = normaliser.intensity_edges.numpy()
        arrays["gradient_edges"] = normaliser.gradient_edges.numpy()
    arrays.update({key: value.numpy() for key, value in normaliser.state_dict().items()
                   if key.startswith(ESTIMATOR_PREFIX)})  # a combination's part statistics
    return meta, arrays
