"""``anomorph evaluate``: score methods on a manifest's val/test splits (SPEC §4).

Per method: a val pass picks the Dice@val threshold (max Dice on val) and the Dice@5%FPR
threshold (5% false positives on healthy val brain pixels); a test pass streams every test
slice through a binned :class:`MetricAccumulator` (65 536 bins over [0, 1]; memory does not
grow with the number of pixels; AUROC error bound reported as ``pixel_auroc_binning_error_bound``).
Lesion-size tertile edges come from the per-slice lesion pixel counts of the test split.
Whenever every test slice has a ``healthy`` counterpart, an ``oracle`` row scores |x − healthy|.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..data.io import atomic_write
from ..data.manifest import read_manifest
from ..data.slices import SliceConfig, SliceDataset
from ..errors import DataError
from .inference import OracleScorer, Prediction, Scorer
from .metrics import MetricAccumulator, pixel_auprc, ScoreHistogram, size_tertile_edges

EXAMPLES_PER_TYPE = 2
CURVE_POINTS = 200
TABLE_METRICS = ("pixel_auroc", "pixel_auprc", "dice_at_val", "dice_at_fpr", "oracle_best_dice",
                 "slice_auroc", "slice_auprc", "slice_fpr_at_95_tpr", "lpr", "hrr", "folding_fraction")


@dataclass
class Example:
    """One test slice for the report panels; arrays are ``(H, W)`` float32 (displacement (2, H, W))."""

    subject: str
    lesion_type: str
    slice_index: int
    image: np.ndarray
    mask: np.ndarray
    brain_mask: np.ndarray
    prediction: dict[str, np.ndarray | None]


@dataclass
class MethodResult:
    """Metrics (overall + ``by_lesion_type`` + ``by_size``), ROC/PR curves, example panels."""

    name: str
    deformable: bool
    metrics: dict[str, Any]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)


@dataclass
class EvaluationData:
    """The val and test slices of a manifest, loaded once and shared by every method.

    ``calibration`` (optional): healthy val subjects set aside for fitting the statistics that
    calibrate u (healthy normalisers); they are removed from ``val``, so the subjects that
    calibrate u never choose a threshold (SPEC §4, selection and statistics).
    """

    manifest: Path
    config: SliceConfig
    val: SliceDataset | None
    test: SliceDataset
    size_edges: tuple[float, float] | None
    example_indices: list[int]
    calibration: SliceDataset | None = None

    @classmethod
    def load(cls, manifest: str | Path, config: SliceConfig, calibration_fraction: float = 0.0) -> "EvaluationData":
        """``calibration_fraction`` ∈ [0, 1): that fraction (rounded up, at least one, never all)
        of the healthy val subjects, first by sorted subject id, becomes ``calibration``."""
        rows = read_manifest(manifest)
        if not any(r.split == "test" for r in rows):
            raise DataError(f"{manifest}: no test rows to evaluate")
        val = (SliceDataset(manifest, ["val"], config, rows=rows) if any(r.split == "val" for r in rows) else None)
        calibration = None
        if calibration_fraction > 0 and val is not None:
            reserved = set(calibration_subjects(val, calibration_fraction))
            if reserved:
                calibration = SliceDataset(manifest, ["val"], config, rows=[r for r in rows if r.subject in reserved])
                val = SliceDataset(manifest, ["val"], config,
                                   rows=[r for r in rows if r.split == "val" and r.subject not in reserved])
        test = SliceDataset(manifest, ["test"], config, rows=rows)
        counts = test.masks.flatten(1).sum(1).numpy()
        size_edges = size_tertile_edges(counts) if (counts > 0).any() else None
        return cls(Path(manifest), config, val, test,
                   None if size_edges is None else tuple(float(e) for e in size_edges),
                   _pick_examples(test, counts), calibration)

    def val_as_test(self) -> "EvaluationData":
        """The val slices in the place of the test slices (the calibration subjects kept for u), so
        that :func:`evaluate_scorer` scores val: how every val choice and val-only check reads its
        metrics. Lesion-size tertile edges come from the val lesions."""
        if self.val is None:
            raise DataError(f"{self.manifest}: no val split to score")
        counts = self.val.masks.flatten(1).sum(1).numpy()
        edges = tuple(float(e) for e in size_tertile_edges(counts)) if (counts > 0).any() else None
        return EvaluationData(self.manifest, self.config, None, self.val, edges, [], self.calibration)

    @property
    def has_oracle(self) -> bool:
        return bool(self.test.has_healthy.all()) and (self.val is None or bool(self.val.has_healthy.all()))

    def healthy_reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, brain masks) of the healthy slices that calibrate u: ``calibration`` when it
        was set aside, else the label-0 val slices."""
        source = self.calibration if self.calibration is not None else self.val
        if source is None:
            raise DataError(f"{self.manifest}: no val split: nothing to fit healthy statistics on")
        healthy = source.labels == 0
        if not bool(healthy.any()):
            raise DataError(f"{self.manifest}: no healthy val slices to fit healthy statistics on")
        return source.images[healthy], source.brain_masks[healthy]


def calibration_subjects(val: SliceDataset, fraction: float) -> list[str]:
    """Healthy val subjects (every slice label 0) reserved for calibration: the first
    ceil(fraction · n) by sorted id, at least one, and never all of them."""
    if not 0 <= fraction < 1:
        raise ValueError(f"calibration fraction must be in [0, 1), got {fraction}")
    abnormal: dict[str, bool] = {}
    for (row, _, label) in val.meta:
        abnormal[row.subject] = abnormal.get(row.subject, False) or bool(label)
    healthy = sorted(s for s, a in abnormal.items() if not a)
    if fraction == 0 or len(healthy) < 2:
        return []
    return healthy[:min(len(healthy) - 1, max(1, math.ceil(fraction * len(healthy))))]


def _pick_examples(test: SliceDataset, counts: np.ndarray) -> list[int]:
    """Per lesion type, the slices with the largest lesions (deterministic), plus one healthy slice."""
    picked: list[int] = []
    types = np.array([row.lesion_type for row, _, _ in test.meta], dtype=object)
    for lesion_type in sorted(set(types[counts > 0])):
        candidates = np.flatnonzero((types == lesion_type) & (counts > 0))
        picked.extend(candidates[np.argsort(-counts[candidates], kind="stable")][:EXAMPLES_PER_TYPE].tolist())
    healthy = np.flatnonzero(counts == 0)
    if healthy.size:
        picked.append(int(healthy[healthy.size // 2]))
    return picked


def _batches(dataset: SliceDataset, batch_size: int) -> Iterable[slice]:
    for start in range(0, len(dataset), batch_size):
        yield slice(start, min(start + batch_size, len(dataset)))


def _score(scorer: Scorer, dataset: SliceDataset, s: slice) -> Prediction:
    """Run ``scorer`` on a slice range; only oracle scorers are handed ground truth."""
    kwargs = {"lesion_masks": dataset.masks[s]} if getattr(scorer, "oracle", False) else {}
    return scorer(dataset.images[s], dataset.brain_masks[s], dataset.healthy[s], **kwargs)


def _update(acc: MetricAccumulator, dataset: SliceDataset, s: slice, pred: Prediction, deformable: bool) -> None:
    types = [row.lesion_type for row, _, _ in dataset.meta[s]]
    extra: dict[str, Any] = {}
    if deformable:
        extra = dict(recon=pred.reconstruction.numpy(), warped=pred.warped.numpy(),
                     jacobian_det=None if pred.jacobian is None else pred.jacobian.numpy(),
                     displacement=None if pred.displacement is None else pred.displacement.numpy())
    if pred.uncertainty is not None:
        extra["uncertainty"] = pred.uncertainty.numpy()
    acc.update(pred.anomaly_map.numpy(), dataset.images[s].numpy(), dataset.masks[s].numpy(),
               dataset.brain_masks[s].numpy(), dataset.labels[s].numpy(), types, **extra)


def _curves(histogram: ScoreHistogram) -> dict[str, dict[str, list[float]]]:
    """ROC and PR curve points (at most ``CURVE_POINTS`` each) from a pixel histogram."""
    if histogram.n_positive == 0 or histogram.n_negative == 0:
        return {}
    ops = histogram.operating_points()
    tp = np.concatenate([[0], np.asarray(ops.true_positives, float)])
    fp = np.concatenate([[0], np.asarray(ops.false_positives, float)])
    keep = np.unique(np.linspace(0, tp.size - 1, min(tp.size, CURVE_POINTS)).round().astype(int))
    tpr, fpr = tp / ops.n_positive, fp / ops.n_negative
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    return {"roc": {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()},
            "pr": {"recall": tpr[keep].tolist(), "precision": precision[keep].tolist()}}


class PerSubjectMetrics:
    """Pixel AUPRC (exact, = scikit-learn's average precision) and Dice at the val threshold per
    test subject with a lesion, over its brain pixels: the unit of the paired comparisons.

    Slices of one subject are contiguous in a :class:`SliceDataset`, so a subject's pixels are
    held only until its last slice has been seen (memory: one subject).
    """

    def __init__(self, val_threshold: float | None) -> None:
        self.val_threshold = val_threshold
        self.results: dict[str, dict[str, Any]] = {}
        self._current: str | None = None
        self._lesion_type = ""
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, dataset: SliceDataset, s: slice, maps: np.ndarray, inside: np.ndarray) -> None:
        masks = dataset.masks[s].numpy() > 0
        for i, (row, _, _) in enumerate(dataset.meta[s]):
            if row.subject != self._current:
                self._flush()
                self._current, self._lesion_type = row.subject, row.lesion_type or "healthy"
            self._scores.append(maps[i][inside[i]].astype(np.float64))
            self._labels.append(masks[i][inside[i]])

    def _flush(self) -> None:
        if self._current is not None and self._scores:
            labels = np.concatenate(self._labels)
            if labels.any():
                scores = np.concatenate(self._scores)
                entry: dict[str, Any] = {"lesion_type": self._lesion_type, "n_lesion_pixels": int(labels.sum()),
                                         "pixel_auprc": float(pixel_auprc(scores, labels))}
                if self.val_threshold is not None:
                    predicted = scores > self.val_threshold  # the rule of every Dice here
                    overlap = 2 * np.sum(predicted & labels)
                    entry["dice_at_val"] = float(overlap / (predicted.sum() + labels.sum()))
                self.results[self._current] = entry
        self._scores, self._labels = [], []

    def compute(self) -> dict[str, dict[str, Any]]:
        self._flush()
        self._current = None
        return dict(self.results)


def evaluate_scorer(scorer: Scorer, data: EvaluationData, batch_size: int = 32) -> MethodResult:
    """Run ``scorer`` over val then test of ``data``; all SPEC §4 metrics with breakdowns."""
    thresholds: dict[str, float | None] = {"val_threshold": None, "fpr_threshold": None}
    if data.val is not None:
        val_acc = MetricAccumulator(size_edges=data.size_edges)
        for s in _batches(data.val, batch_size):
            _update(val_acc, data.val, s, _score(scorer, data.val, s), False)
        if int(data.val.labels.sum()) > 0:
            thresholds["val_threshold"] = val_acc.max_dice_threshold()
        thresholds["fpr_threshold"] = val_acc.fpr_threshold(0.05)
    test_acc = MetricAccumulator(size_edges=data.size_edges)
    histogram = ScoreHistogram(0.0, 1.0, 4096)
    examples: list[Example] = []
    wanted = set(data.example_indices)
    subjects = PerSubjectMetrics(thresholds["val_threshold"])
    for s in _batches(data.test, batch_size):
        pred = _score(scorer, data.test, s)
        brains = data.test.brain_masks[s]
        _update(test_acc, data.test, s, pred, scorer.deformable)
        inside = brains.numpy() > 0
        histogram.update(pred.anomaly_map.numpy()[inside], data.test.masks[s].numpy()[inside])
        subjects.update(data.test, s, pred.anomaly_map.numpy(), inside)
        for index in sorted(wanted.intersection(range(s.start, s.stop))):
            examples.append(_example(data.test, index, pred, index - s.start))
    metrics = test_acc.compute(val_threshold=thresholds["val_threshold"],
                               fpr_threshold=thresholds["fpr_threshold"])
    if data.val is None:
        metrics.setdefault("undefined", {}).update(
            {"dice_at_val": "no val split", "dice_at_fpr": "no val split"})
    elif thresholds["val_threshold"] is None:
        metrics.setdefault("undefined", {})["dice_at_val"] = "no abnormal val slices to tune the threshold on"
    metrics["thresholds"] = thresholds
    metrics["per_subject"] = subjects.compute()
    return MethodResult(scorer.name, scorer.deformable, metrics, _curves(histogram), examples)


def _example(dataset: SliceDataset, index: int, pred: Prediction, i: int) -> Example:
    row, geometry, _ = dataset.meta[index]

    def take(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t[i].numpy().astype(np.float32)

    return Example(row.subject, row.lesion_type or "healthy", geometry.slice_index,
                   dataset.images[index, 0].numpy(), dataset.masks[index, 0].numpy(),
                   dataset.brain_masks[index, 0].numpy(),
                   {"anomaly_map": take(pred.anomaly_map)[0], "reconstruction": take(pred.reconstruction)[0],
                    "warped": take(pred.warped)[0], "displacement": take(pred.displacement),
                    "jacobian": None if pred.jacobian is None else take(pred.jacobian)[0],
                    "uncertainty": None if pred.uncertainty is None else take(pred.uncertainty)[0]})


def evaluate_methods(scorers: Sequence[Scorer], manifest: str | Path, config: SliceConfig,
                     batch_size: int = 32, oracle: bool = True,
                     data: EvaluationData | None = None) -> tuple[EvaluationData, list[MethodResult]]:
    """Evaluate several scorers on one manifest (data loaded once, or ``data`` if given); adds the
    oracle row when the manifest has ``healthy`` for every val/test slice and ``oracle`` is True."""
    if data is None:
        data = EvaluationData.load(manifest, config)
    results = [evaluate_scorer(s, data, batch_size) for s in scorers]
    if oracle and data.has_oracle:
        results.append(evaluate_scorer(OracleScorer(config.size), data, batch_size))
    return data, results


# ---------------------------------------------------------------------------- outputs
def _non_finite_reason(value: float) -> str:
    if math.isnan(value):
        return "NaN (undefined)"
    return f"{'+' if value > 0 else '-'}inf (JSON has no infinity; a -inf threshold predicts every pixel anomalous)"


def _clean(value: Any, sink: dict[str, str] | None = None, key: str = "") -> Any:
    """JSON-safe copy: numpy → Python; NaN and ±inf → ``null`` with an explicit reason.

    Every non-finite number becomes ``None`` and, unless a reason is already recorded, its
    dotted key is added to the ``undefined`` map of the nearest enclosing metrics dict (one
    that has an ``undefined`` map, else the dict holding the value), e.g.
    ``by_lesion_type/ms/undefined/oracle_best_dice_threshold = "-inf (...)"``. ``json.dumps``
    with ``allow_nan=False`` would otherwise fail on them after all the work is done.
    """
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        own = "undefined" in value or sink is None
        undefined = {str(k): str(v) for k, v in (value.get("undefined") or {}).items()} if own else sink
        for k, v in value.items():
            if str(k) == "undefined" and own:
                continue
            out[str(k)] = _clean(v, undefined, str(k) if own else f"{key}.{k}")
        if own and (undefined or "undefined" in value):
            out["undefined"] = undefined
        return out
    if isinstance(value, (list, tuple)):
        return [_clean(v, sink, key) for v in value]
    if isinstance(value, (np.floating, float)):
        number = float(value)
        if not math.isfinite(number):
            if sink is not None and key and key not in sink:
                sink[key] = _non_finite_reason(number)
            return None
        return number
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def flat_rows(results: Sequence[MethodResult]) -> list[dict[str, Any]]:
    """One row per (method, breakdown group): overall, each lesion type, each size tertile."""
    rows = []
    for result in results:
        groups = [("overall", "all", result.metrics)]
        groups += [("lesion_type", k, v) for k, v in result.metrics.get("by_lesion_type", {}).items()]
        groups += [("size", k, v) for k, v in result.metrics.get("by_size", {}).items()]
        for kind, name, metrics in groups:
            row: dict[str, Any] = {"method": result.name, "group_kind": kind, "group": name}
            for key in TABLE_METRICS + ("mean_displacement_lesion", "mean_displacement_healthy",
                                        "n_slices", "n_abnormal_slices"):
                value = metrics.get(key)
                row[key] = None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value
            rows.append(row)
    return rows


def format_table(results: Sequence[MethodResult], group_kind: str = "overall") -> str:
    """A fixed-width text table of the headline metrics (DICE* is an oracle: best Dice on test)."""
    headers = {"pixel_auroc": "AUROC", "pixel_auprc": "AUPRC", "dice_at_val": "Dice@val",
               "dice_at_fpr": "Dice@5%FPR", "oracle_best_dice": "DICE*(oracle)", "slice_auroc": "sl.AUROC",
               "slice_auprc": "sl.AUPRC", "slice_fpr_at_95_tpr": "FPR@95TPR", "lpr": "LPR", "hrr": "HRR",
               "folding_fraction": "folding"}
    rows = [r for r in flat_rows(results) if r["group_kind"] == group_kind]
    name_width = max([len("method / group")] + [len(f"{r['method']} / {r['group']}") for r in rows])
    lines = ["method / group".ljust(name_width) + "".join(f"{h:>14}" for h in headers.values())]
    for r in rows:
        label = r["method"] if group_kind == "overall" else f"{r['method']} / {r['group']}"
        cells = "".join(f"{'—' if r[k] is None else format(r[k], '.4f'):>14}" for k in headers)
        lines.append(label.ljust(name_width) + cells)
    return "\n".join(lines)


def write_results(results: Sequence[MethodResult], out_dir: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``metrics.json`` (full, nested) and ``metrics.csv`` (flat) atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(".tmp-*"), *(out_dir / "figures").glob(".tmp-*")]:
        if stale.is_file():  # hidden temporaries of a killed evaluate (atomic_write names)
            stale.unlink(missing_ok=True)
    payload = {"methods": {r.name: _clean(r.metrics) for r in results}, **_clean(extra or {})}
    json_path = atomic_write(out_dir / "metrics.json",
                             lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, allow_nan=False)))
    rows = flat_rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    csv_path = atomic_write(out_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    return {"json": json_path, "csv": csv_path}
