"""anomorph: unsupervised anomaly detection in medical images with uncertainty-guided
deformable auto-encoders.

The public Python API mirrors the CLI one-to-one (heavy modules load on first use)::

    import anomorph
    manifest = anomorph.build_phantom("phantom")                       # anomorph phantom
    anomorph.check_manifest(manifest)                                  # anomorph data check
    run = anomorph.fit(anomorph.load_config("configs/morphaeus.yaml")) # anomorph fit
    anomorph.evaluate(runs=[run], manifest=manifest)                   # anomorph evaluate
    anomorph.calibrate(run)                                            # anomorph calibrate
    anomorph.predict_files(anomorph.Detector.from_run(run), ["scan.nii.gz"], "pred")  # anomorph predict
    anomorph.run_benchmark(anomorph.load_benchmark_config("benchmarks/phantom.yaml"))
    anomorph.run_demo("runs/demo")                                     # anomorph demo
"""
from __future__ import annotations

import importlib

# First, before anything imports torch: passive OpenMP waiting and a thread count that fits the
# CPUs this process may use (anomorph.runtime; OpenMP reads its environment at `import torch`).
from . import runtime as _runtime

_runtime.prepare()

__version__ = "0.1.0"

from .config import RunConfig, load_config
from .data import SliceBatch, SliceConfig, SliceDataset, read_manifest
from .data.summary import check_manifest
from .errors import AnomorphError, CheckpointError, ConfigError, DataError

_LAZY = {
    "build_phantom": "anomorph.data.phantom",
    "PhantomConfig": "anomorph.data.phantom",
    "fit": "anomorph.training.fit",
    "load_run": "anomorph.training.fit",
    "evaluate": "anomorph.evaluation.api",
    "ModelScorer": "anomorph.evaluation.inference",
    "ThresholdScorer": "anomorph.evaluation.inference",
    "predict_files": "anomorph.evaluation.predict",
    "GuidedScorer": "anomorph.scoring.strategies",
    "Detector": "anomorph.scoring.detector",
    "calibrate": "anomorph.evaluation.calibrate",
    "run_benchmark": "anomorph.benchmark.runner",
    "load_benchmark_config": "anomorph.benchmark.runner",
    "run_demo": "anomorph.benchmark.demo",
    "configure_threads": "anomorph.runtime",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'anomorph' has no attribute {name!r}")


__all__ = [
    "__version__", "RunConfig", "load_config", "SliceBatch", "SliceConfig", "SliceDataset", "read_manifest",
    "check_manifest", "AnomorphError", "CheckpointError", "ConfigError", "DataError", *_LAZY,
]
