"""End-to-end speed: what a user waits for in ``anomorph fit`` and ``anomorph predict``.

In one process, on a small phantom (default 64², the demo's subject counts):

- **fit**: ``anomorph.fit`` of ``configs/<model>.yaml`` (``ae`` and ``morphaeus``; registration on
  from the first epoch, ``train.warmup_epochs=0``, so every epoch pays for it) for a few epochs,
  with data loading, validation, logging and checkpoints as in a real run. A timing callback
  records each epoch's wall time and splits it into training batches (forward, loss, backward,
  optimizer, per-step logging), data fetching between batches, validation, and the rest
  (checkpoints, epoch-end logging, figures). Epoch 0 is warm-up; later epochs are reported.
- **raw training step**: the step of ``benchmarks/throughput.py`` (same model, size and batch
  size, fixed random batch), timed in the same process right after each fit: the ceiling the
  epoch rate is compared with (``epoch_vs_step``; target ≥ 0.8).
- **predict**: ``anomorph.predict_files`` of the trained AE on a 128×128×N NIfTI (a phantom test
  volume resampled in-plane to 128²), unguided, outputs written as the CLI does; scans/min.
- **guided predict**: the deformable run of the largest size, calibrated, with ``none`` and every
  strategy a plain deformable run can use (or ``--strategies``, each ``NAME`` or
  ``NAME:KEY=VALUE,...`` with GuidanceConfig overrides, e.g. ``cost_masking:map_steps=10``),
  interleaved; cost vs unguided per round.
- **evaluate**: ``anomorph.evaluate`` of every run on the phantom's test split; slices/s.

Writes a markdown table to stdout and, with ``--json PATH``, one JSON object. Default run: about
2–3 minutes on 2 CPU cores. Nothing here is a test: speed is never asserted.

Usage::

    python benchmarks/end_to_end.py --json /tmp/end_to_end.json
    python benchmarks/end_to_end.py --models ae --epochs 3 --out /tmp/e2e
    python benchmarks/end_to_end.py --models morphaeus --sizes 128 --strategies cost_masking \\
        cost_masking:map_steps=10 --json /tmp/steps.json     # guidance overrides per strategy
"""
from __future__ import annotations

import anomorph  # noqa: F401,I001 - first: the threading setup before torch loads (anomorph.runtime)

import argparse
import dataclasses
import datetime as _dt
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from anomorph.data.io import write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from throughput import Workload, cpu_flags  # noqa: E402  (the sibling script's step and CPU flags)

SCHEMA = "anomorph.end_to_end/1"
PHANTOM = {"n_slices": 12, "seed": 0, "n_train": 16, "n_val_healthy": 2, "n_val_lesion": 4,
           "n_test": 4, "n_test_healthy": 1}


class EpochTimer(L.Callback):
    """Wall time of every training epoch, split into batches, data fetching, validation and rest."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._now = time.perf_counter

    def on_train_epoch_start(self, trainer, module) -> None:
        now = self._now()
        if self.epochs:
            self.epochs[-1]["wall_s"] = now - self.epochs[-1]["_start"]
        self.epochs.append({"_start": now, "batches_s": 0.0, "data_s": 0.0, "validation_s": 0.0,
                            "images": 0, "steps": 0, "_last_end": now})

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        epoch = self.epochs[-1]
        now = self._now()
        epoch["data_s"] += now - epoch["_last_end"]
        epoch["_batch_start"] = now

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        epoch = self.epochs[-1]
        now = self._now()
        epoch["batches_s"] += now - epoch["_batch_start"]
        epoch["_last_end"] = now
        epoch["images"] += len(batch)
        epoch["steps"] += 1

    def on_validation_epoch_start(self, trainer, module) -> None:
        if self.epochs:
            self.epochs[-1]["_val_start"] = self._now()

    def on_validation_epoch_end(self, trainer, module) -> None:
        if self.epochs and "_val_start" in self.epochs[-1]:
            self.epochs[-1]["validation_s"] += self._now() - self.epochs[-1].pop("_val_start")

    def on_train_end(self, trainer, module) -> None:
        if self.epochs and "wall_s" not in self.epochs[-1]:
            self.epochs[-1]["wall_s"] = self._now() - self.epochs[-1]["_start"]

    def summary(self) -> list[dict[str, float]]:
        rows = []
        for epoch in self.epochs:
            row = {k: v for k, v in epoch.items() if not k.startswith("_")}
            if "wall_s" in row:
                row["other_s"] = row["wall_s"] - row["batches_s"] - row["data_s"] - row["validation_s"]
                rows.append(row)
        return rows


def build_data(out: Path, size: int) -> Path:
    from anomorph.data.phantom import PhantomConfig, build_phantom

    return build_phantom(out / f"phantom{size}", PhantomConfig(size=size, **PHANTOM), progress=False)


def raw_step_rate(model: str, size: int, batch_size: int, seconds: float) -> dict[str, float]:
    """Training steps/s of throughput.py's step (fixed random batch), median over ``seconds``."""

    workload = Workload(model, size, batch_size, torch.device("cpu"))
    workload.train_step()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t0 = time.perf_counter()
        workload.train_step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"images_per_s": batch_size / median, "seconds_per_step": median, "steps": len(times)}


def measure_fit(model: str, manifest: Path, size: int, epochs: int, out: Path,
                overrides: Sequence[str]) -> tuple[dict[str, Any], Path]:
    from anomorph.config import load_config
    from anomorph.training.fit import fit

    config = load_config(REPO / "configs" / f"{model}.yaml", [
        f"data.manifest={manifest}", f"data.size={size}", f"train.max_epochs={epochs}",
        "train.warmup_epochs=0", "train.beta_ramp_epochs=1", "train.progress_bar=false",
        f"name={model}-{size}", *overrides])
    timer = EpochTimer()
    run_dir = out / "runs" / f"{model}-{size}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    fit(config, run_dir=run_dir, callbacks=[timer])
    total = time.perf_counter() - start
    epochs_rows = timer.summary()
    measured = epochs_rows[1:] or epochs_rows      # epoch 0 is warm-up
    wall = statistics.median(e["wall_s"] for e in measured)
    images = statistics.median(e["images"] for e in measured)
    parts = {k: statistics.median(e[k] for e in measured) for k in ("batches_s", "data_s", "validation_s", "other_s")}
    return {
        "model": model, "size": size, "batch_size": config.data.batch_size, "epochs": epochs,
        "train_images_per_epoch": images, "steps_per_epoch": statistics.median(e["steps"] for e in measured),
        "seconds_per_epoch": wall, "images_per_s": images / wall,
        "batch_images_per_s": images / parts["batches_s"] if parts["batches_s"] else None,
        "split_s": parts, "fit_total_s": total, "per_epoch": epochs_rows,
    }, run_dir


def make_nifti(manifest: Path, out: Path, size: int = 128) -> tuple[Path, tuple[int, ...]]:
    """A phantom test volume resampled in-plane to ``size``² (linear), saved as NIfTI."""
    import csv

    import nibabel as nib
    import numpy as np
    from scipy.ndimage import zoom

    with manifest.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("split") == "test"]
    source = manifest.parent / rows[0]["image"]
    image = nib.load(str(source))
    data = np.asarray(image.dataobj, dtype=np.float32)
    factors = (size / data.shape[0], size / data.shape[1], 1.0)
    resampled = zoom(data, factors, order=1).astype(np.float32)
    affine = image.affine.copy()
    affine[:3, 0] /= factors[0]
    affine[:3, 1] /= factors[1]
    path = out / f"scan_{size}x{size}x{resampled.shape[2]}.nii.gz"
    nib.save(nib.Nifti1Image(resampled, affine), str(path))
    return path, tuple(int(s) for s in resampled.shape)


def _predict(scorer, scan: Path, out: Path) -> None:
    """``predict_files`` into a fresh folder: a folder with complete outputs would be skipped
    (predict never replaces outputs without ``overwrite``) and time nothing."""
    from anomorph.evaluation.predict import predict_files

    skipped: list[str] = []
    predict_files(scorer, [scan], out, skipped=skipped)
    if skipped:
        raise RuntimeError(f"end_to_end: {out} already held the outputs of {skipped}; use a fresh --out")


def measure_predict(run_dir: Path, scan: Path, out: Path, repeats: int) -> dict[str, Any]:
    from anomorph.evaluation.inference import ModelScorer

    scorer = ModelScorer.from_run(run_dir)
    _predict(scorer, scan, out / "predict_warmup")
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        _predict(scorer, scan, out / f"predict{index}")
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"strategy": "unguided", "seconds_per_scan": median, "scans_per_min": 60.0 / median,
            "samples_s": [round(t, 3) for t in times]}


#: guided predict: every strategy of anomorph.scoring.strategies.STRATEGIES a plain deformable
#: run can score with ("conditioned" needs a model trained for it)
def guided_strategies() -> list[str]:
    from anomorph.scoring.strategies import STRATEGIES

    return [name for name, cls in STRATEGIES.items() if not cls.needs_conditioned_model]


def strategy_spec(label: str) -> tuple[str, dict[str, Any]]:
    """``"cost_masking:map_steps=10,estimator=warped_residual"`` → ("cost_masking", {"map_steps":
    10, "estimator": "warped_residual"}): a strategy and GuidanceConfig overrides (values as YAML)."""
    import dataclasses

    import yaml

    from anomorph.config import GuidanceConfig

    name, _, rest = label.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{label!r}: expected NAME:KEY=VALUE,..., got {item!r}")
        overrides[key.strip()] = yaml.safe_load(raw)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(GuidanceConfig)} - {"strategy"})
    if unknown or "strategy" in overrides:
        raise ValueError(f"{label!r}: unknown guidance key(s) {unknown or ['strategy']}")
    return name, overrides


def _folder(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def measure_guided_predict(run_dir: Path, scan: Path, out: Path, repeats: int,
                           strategies: Sequence[str], manifest: Path | None = None) -> list[dict[str, Any]]:
    """``predict_files`` of the deformable run with each strategy (``none`` = unguided), after
    ``anomorph.calibrate`` of the run (healthy statistics of u and of the registered residual;
    the run's guidance values otherwise: estimator residual_z, threshold 3, map_steps 30, rounds 2).
    A strategy ``NAME:KEY=VALUE,...`` (:func:`strategy_spec`) overrides those values; with another
    ``estimator`` its healthy normaliser is fitted on the calibration subjects of ``manifest``
    (the ones ``calibrate`` uses), as the benchmark does.
    The strategies are timed interleaved (one call of each per repeat, after one warm-up call
    each), so every cost ratio vs ``none`` is taken per repeat, under the same load."""
    from anomorph.evaluation.calibrate import calibrate
    from anomorph.scoring.detector import Detector

    start = time.perf_counter()
    calibrate(run_dir)
    calibrate_s = time.perf_counter() - start
    detectors = {}
    healthy = None
    for label in strategies:
        name, overrides = strategy_spec(label)
        estimator = overrides.pop("estimator", None)
        if estimator is not None and healthy is None:
            from anomorph.data.slices import SliceConfig
            from anomorph.evaluation.evaluate import EvaluationData
            from anomorph.runs import load_run

            if manifest is None:
                raise ValueError(f"{label!r}: another estimator needs the manifest of its calibration subjects")
            healthy = EvaluationData.load(manifest, SliceConfig.from_config(load_run(run_dir)[1].data),
                                          0.5).healthy_reference()
        detectors[label] = Detector.from_run(run_dir, guidance={**overrides, "strategy": name}, estimator=estimator,
                                             healthy=healthy if estimator is not None else None)
    for label, detector in detectors.items():
        _predict(detector, scan, out / f"guided_warmup_{_folder(label)}")
    times: dict[str, list[float]] = {label: [] for label in strategies}
    for index in range(repeats):
        for label, detector in detectors.items():
            t0 = time.perf_counter()
            _predict(detector, scan, out / f"guided{index}_{_folder(label)}")
            times[label].append(time.perf_counter() - t0)
    rows = []
    for label in strategies:
        name = strategy_spec(label)[0]
        median = statistics.median(times[label])
        ratios = [t / u for t, u in zip(times[label], times["none"])] if "none" in times else []
        detector = detectors[label]
        g = detector.guidance
        u_model = detector.estimator_model
        rows.append({"strategy": "unguided" if label == "none" else label, "seconds_per_scan": median,
                     "scans_per_min": 60.0 / median, "samples_s": [round(t, 3) for t in times[label]],
                     "vs_unguided": statistics.median(ratios) if ratios else None,
                     "vs_unguided_min": min(ratios) if ratios else None,
                     "vs_unguided_max": max(ratios) if ratios else None,
                     "estimator": (u_model.name if u_model is not None else g.estimator) if name != "none" else None,
                     "map_steps": g.map_steps if name in ("map", "cost_masking", "tto") else None,
                     "rounds": g.rounds if name == "iterative" else None,
                     "guidance": dataclasses.asdict(g) if name != "none" else None,
                     "calibrate_s": calibrate_s})
    return rows


def measure_evaluate(run_dir: Path, manifest: Path, out: Path, repeats: int) -> dict[str, Any]:
    """``anomorph.evaluate`` of one run on the phantom's test split (no oracle rows, no report):
    test slices per second, median of ``repeats`` calls after one warm-up call (data loading,
    scoring, metrics and the metrics files included)."""
    from anomorph.evaluation.api import evaluate

    def once(index: int):
        return evaluate(runs=[run_dir], manifest=manifest, out_dir=out / f"evaluate{index}", oracle=False,
                        report=False)

    result = once(0)
    n_slices = int(result.results[0].metrics.get("n_slices", 0))
    times = []
    for index in range(repeats):
        t0 = time.perf_counter()
        once(index + 1)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"test_slices": n_slices, "seconds": median, "slices_per_s": n_slices / median if median else None,
            "samples_s": [round(t, 3) for t in times]}


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="anomorph_e2e_"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/end_to_end.py", *sys.argv[1:]]),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": cpu_flags()},
        "settings": {"models": list(args.models), "sizes": list(args.sizes), "epochs": args.epochs,
                     "step_seconds": args.step_seconds, "predict_repeats": args.predict_repeats,
                     "guided_repeats": args.guided_repeats, "strategies": list(args.strategies),
                     "evaluate_repeats": args.evaluate_repeats,
                     "overrides": list(args.overrides), "phantom": PHANTOM, "out": str(out)},
        "load_average": {"start": load_average()},
        "fit": [], "predict": [], "evaluate": [],
    }
    stages: dict[str, float] = {}
    for size in args.sizes:
        start = time.perf_counter()
        manifest = build_data(out, size)
        stages[f"phantom {size}"] = time.perf_counter() - start
        for model in args.models:
            start = time.perf_counter()
            figures, run_dir = measure_fit(model, manifest, size, args.epochs, out, args.overrides)
            step = raw_step_rate(model, size, figures["batch_size"], args.step_seconds)
            figures["step"] = step
            figures["epoch_vs_step"] = figures["images_per_s"] / step["images_per_s"]
            results["fit"].append(figures)
            stages[f"fit+step {model} {size}"] = time.perf_counter() - start
            print(f"  {model} {size}²: {figures['seconds_per_epoch']:.2f} s/epoch, {figures['images_per_s']:.1f} img/s "
                  f"vs step {step['images_per_s']:.1f} img/s (load {load_average()})", file=sys.stderr, flush=True)
            if args.evaluate_repeats > 0:
                start = time.perf_counter()
                entry = measure_evaluate(run_dir, manifest, out / f"eval-{model}-{size}", args.evaluate_repeats)
                entry.update(model=model, size=size, load_average=load_average())
                results["evaluate"].append(entry)
                stages[f"evaluate {model} {size}"] = time.perf_counter() - start
            if model == "ae" and args.predict_repeats > 0:
                start = time.perf_counter()
                scan, shape = make_nifti(manifest, out)
                entry = measure_predict(run_dir, scan, out / f"predict-{model}-{size}", args.predict_repeats)
                entry.update(model=f"{model} ({size}²)", scan_shape=list(shape), load_average=load_average())
                results["predict"].append(entry)
                stages[f"predict {model} {size}"] = time.perf_counter() - start
            if model == "morphaeus" and args.guided_repeats > 0 and size == max(args.sizes):
                start = time.perf_counter()
                scan, shape = make_nifti(manifest, out)
                for entry in measure_guided_predict(run_dir, scan, out / f"guided-{model}-{size}", args.guided_repeats,
                                                    args.strategies, manifest):
                    entry.update(model=f"{model} ({size}²)", scan_shape=list(shape), load_average=load_average())
                    results["predict"].append(entry)
                stages[f"guided predict {model} {size}"] = time.perf_counter() - start
    results["stages_s"] = stages
    results["load_average"]["end"] = load_average()
    return results


def format_tables(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"torch {env['torch']}, {env['threads']} threads, OMP_WAIT_POLICY={env['omp_wait_policy']}, "
             f"load average start {results['load_average']['start']}, end {results['load_average']['end']}", "",
             "| model | size | s/epoch | epoch img/s | step img/s | epoch / step | batches | data | validation | other |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in results["fit"]:
        s = f["split_s"]
        lines.append(f"| {f['model']} | {f['size']}² | {f['seconds_per_epoch']:.2f} | {f['images_per_s']:.1f} | "
                     f"{f['step']['images_per_s']:.1f} | {f['epoch_vs_step']:.2f} | {s['batches_s']:.2f} s | "
                     f"{s['data_s']:.2f} s | {s['validation_s']:.2f} s | {s['other_s']:.2f} s |")
    if results["predict"]:
        lines += ["", "| predict | scan | strategy | s/scan | scans/min | vs unguided (median [min–max]) |",
                  "|---|---|---|---|---|---|"]
        for p in results["predict"]:
            shape = "×".join(str(s) for s in p["scan_shape"])
            ratio = "—" if p.get("vs_unguided") is None else (
                f"{p['vs_unguided']:.2f}x [{p['vs_unguided_min']:.2f}–{p['vs_unguided_max']:.2f}]")
            lines.append(f"| {p['model']} | {shape} | {p['strategy']} | {p['seconds_per_scan']:.2f} | "
                         f"{p['scans_per_min']:.1f} | {ratio} |")
    if results.get("evaluate"):
        lines += ["", "| evaluate | size | test slices | s | slices/s |", "|---|---|---|---|---|"]
        for e in results["evaluate"]:
            lines.append(f"| {e['model']} | {e['size']}² | {e['test_slices']} | {e['seconds']:.2f} | "
                         f"{e['slices_per_s']:.1f} |")
    lines += ["", "stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["stages_s"].items())]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ae", "morphaeus"], choices=("ae", "vae", "morphaeus"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[64], help="phantom/model sizes (default 64)")
    parser.add_argument("--epochs", type=int, default=3, help="fit epochs; the first is warm-up (default 3)")
    parser.add_argument("--step-seconds", type=float, default=6.0, help="timed seconds of raw steps (default 6)")
    parser.add_argument("--predict-repeats", type=int, default=2, help="timed predict calls (default 2; 0 = skip)")
    parser.add_argument("--guided-repeats", type=int, default=2,
                        help="timed guided predict calls per strategy, deformable run of the largest size "
                             "(default 2; 0 = skip)")
    parser.add_argument("--strategies", nargs="+", default=None, metavar="NAME[:KEY=VALUE,...]",
                        help="guided predict strategies, each optionally with GuidanceConfig overrides, e.g. "
                             "cost_masking:map_steps=10,estimator=warped_residual (default: none and every strategy "
                             "a plain deformable run can score with)")
    parser.add_argument("--evaluate-repeats", type=int, default=2, help="timed evaluate calls per run (default 2; 0 = skip)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every fit")
    args = parser.parse_args(argv)
    known = guided_strategies()
    if args.strategies is None:
        args.strategies = known
    try:
        names = [strategy_spec(label)[0] for label in args.strategies]
    except ValueError as err:
        parser.error(str(err))
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {known}")
    if len(set(args.strategies)) != len(args.strategies):
        parser.error("--strategies: each strategy once")
    if "none" not in args.strategies:
        args.strategies = ["none", *args.strategies]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(format_tables(results))
    if args.json is not None:
        print(f"wrote {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
