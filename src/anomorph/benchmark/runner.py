"""``anomorph benchmark``: train and evaluate methods × seeds × datasets, resumably.

Layout under ``output_dir``::

    <dataset>/<method>/seed<S>/          a normal run directory per trained method and seed
    <dataset>/seed<S>/metrics.json       every method of that seed (+ report.html for the first seed)
    results.csv / results.md / results.html   mean ± std over seeds, per method and group

Interrupted? Run the same command again: finished runs (a ``done`` marker) and finished
evaluations (``metrics.json``) are skipped, a half-trained run resumes from ``last.ckpt``.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..config import ConfigError, GuidanceConfig, _from_dict, load_config
from ..data.io import atomic_write


@dataclass
class DatasetSpec:
    """A manifest to benchmark on; ``phantom`` (PhantomConfig fields) builds it when missing."""

    name: str
    manifest: str
    phantom: dict[str, Any] | None = None


@dataclass
class MethodSpec:
    """One table row (or a family of rows).

    kind "threshold": the intensity baseline (``mode`` deviation|intensity).
    kind "train": a model trained from ``config`` (+ ``overrides``).
    kind "guided": the run of method ``run`` (or its own ``config`` when the strategy needs its
    own training, e.g. "conditioned") scored with ``strategy`` and ``estimator``;
    ``oracle_guided`` adds the same strategy with m = the dilated ground truth.
    ``guidance``: GuidanceConfig fields overriding the run's.
    """

    name: str
    kind: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    run: str | None = None
    strategy: str = "none"
    estimator: str = "residual_z"
    oracle_guided: bool = False
    guidance: dict[str, Any] = field(default_factory=dict)
    mode: str = "deviation"


@dataclass
class BenchmarkConfig:
    """A study: ``seeds`` × ``datasets`` × ``methods``; ``overrides`` apply to every trained
    method (e.g. ``train.max_epochs=30``); ``report_seeds`` get an HTML report."""

    name: str = "benchmark"
    output_dir: str = "runs/benchmark"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    datasets: list[DatasetSpec] = field(default_factory=list)
    methods: list[MethodSpec] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    report_seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 32


KINDS = ("threshold", "train", "guided")


def load_benchmark_config(path: str | Path, overrides: list[str] | None = None) -> BenchmarkConfig:
    """Read and validate a benchmark YAML; ``overrides`` are appended to its ``overrides``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark config not found: {path}")
    from ..config import read_yaml

    data = read_yaml(path)
    try:
        config = _from_dict(BenchmarkConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    config.datasets = [d if isinstance(d, DatasetSpec) else _from_dict(DatasetSpec, d, "datasets") for d in config.datasets]
    config.methods = [m if isinstance(m, MethodSpec) else _from_dict(MethodSpec, m, "methods") for m in config.methods]
    config.overrides = list(config.overrides) + list(overrides or [])
    names = [m.name for m in config.methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: method names must be unique, got {names}")
    for m in config.methods:
        if m.kind not in KINDS:
            raise ConfigError(f"{path}: method {m.name!r}: kind {m.kind!r} is not one of {KINDS}")
        if m.kind == "train" and not m.config:
            raise ConfigError(f"{path}: method {m.name!r}: kind 'train' needs a config")
        if m.kind == "guided" and not (m.run or m.config):
            raise ConfigError(f"{path}: method {m.name!r}: kind 'guided' needs 'run' (a trained method) or 'config'")
        if m.kind == "guided" and m.run and m.run not in names:
            raise ConfigError(f"{path}: method {m.name!r}: run {m.run!r} is not a method of this benchmark")
        unknown = set(m.guidance) - {f.name for f in dataclasses.fields(GuidanceConfig)}
        if unknown:
            raise ConfigError(f"{path}: method {m.name!r}: unknown guidance key(s) {sorted(unknown)}")
    if not config.datasets or not config.methods:
        raise ConfigError(f"{path}: needs at least one dataset and one method")
    return config


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_dataset(spec: DatasetSpec) -> Path:
    """The dataset's manifest, building the phantom first when ``phantom`` is set and missing."""
    manifest = Path(spec.manifest)
    if manifest.is_file():
        return manifest
    if spec.phantom is None:
        raise ConfigError(f"dataset {spec.name!r}: manifest {manifest} not found")
    from ..data.phantom import PhantomConfig, build_phantom

    _log(f"building phantom for {spec.name!r} in {manifest.parent}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.phantom.items()}
    return build_phantom(manifest.parent, PhantomConfig(**values), progress=True)


def train_method(config_path: str, overrides: list[str], run_dir: Path) -> Path:
    """Train (or resume, or skip when ``done``) one run; returns its directory."""
    from ..training import fit

    if (run_dir / "done").exists():
        return run_dir
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        _log(f"resuming {run_dir}")
        fit(load_config(run_dir / "config.yaml"), run_dir=run_dir, resume=True)
    else:
        _log(f"training {run_dir}")
        fit(load_config(config_path, overrides), run_dir=run_dir)
    atomic_write(run_dir / "done", lambda tmp: Path(tmp).write_text("finished\n"))
    return run_dir


def _guided_scorers(method: MethodSpec, run_dir: Path, data, seed: int) -> list:
    """The guided scorer (and its oracle-guided twin) of ``method`` on a trained run."""
    from ..guidance.scorer import GuidedScorer
    from ..guidance.sources import residual_normaliser, uncertainty_source
    from ..training import load_run

    network, config = load_run(run_dir)
    guidance = dataclasses.replace(config.guidance, **method.guidance)
    healthy = data.val.labels == 0 if data.val is not None else None
    if healthy is None or not bool(healthy.any()):
        raise ConfigError(f"method {method.name!r}: guided scoring needs healthy val slices to normalise u")
    images, brains = data.val.images[healthy], data.val.brain_masks[healthy]
    source, _ = uncertainty_source(method.estimator, network, images, brains, guidance.normalise, seed)
    residual = residual_normaliser(network, images, brains) if method.strategy == "iterative" else None
    scorers = [GuidedScorer(network, config, method.strategy, source, guidance=guidance, name=method.name,
                            residual_normaliser=residual)]
    if method.oracle_guided:
        scorers.append(GuidedScorer(network, config, method.strategy, oracle=True, guidance=guidance,
                                    name=f"{method.name} (oracle-guided)"))
    return scorers


def evaluate_seed(config: BenchmarkConfig, dataset: DatasetSpec, manifest: Path, seed: int,
                  runs: dict[str, Path]) -> Path:
    """Evaluate every method of one seed on one dataset; writes ``<dataset>/seed<S>/metrics.json``."""
    from ..data.slices import SliceDataset
    from ..evaluation.evaluate import EvaluationData, evaluate_scorer, write_results
    from ..evaluation.inference import ModelScorer, OracleScorer, ThresholdScorer
    from ..training import load_run
    from ..training.datamodule import slice_config

    out = Path(config.output_dir) / dataset.name / f"seed{seed}"
    trained = [m for m in config.methods if m.name in runs]
    if trained:
        _, first = load_run(runs[trained[0].name])
        slices = slice_config(first.data)
    else:
        from ..data.slices import SliceConfig

        slices = SliceConfig()
    data = EvaluationData.load(manifest, slices)
    scorers = []
    for method in config.methods:
        if method.kind == "threshold":
            train = SliceDataset(manifest, ["train"], slices, healthy_only=True)
            scorer = ThresholdScorer.fit(train, method.mode)
            scorer.name = method.name
            scorers.append(scorer)
        elif method.kind == "train":
            scorers.append(ModelScorer.from_run(runs[method.name]))
            scorers[-1].name = method.name
        else:
            scorers.extend(_guided_scorers(method, runs[method.name if method.config else method.run], data, seed))
    results = []
    for scorer in scorers:
        _log(f"evaluating {scorer.name} (seed {seed}, {dataset.name})")
        results.append(evaluate_scorer(scorer, data, config.batch_size))
    if data.has_oracle:
        results.append(evaluate_scorer(OracleScorer(slices.size), data, config.batch_size))
    context = {"benchmark": config.name, "dataset": dataset.name, "manifest": str(manifest), "seed": seed,
               "machine": f"{platform.node()} ({platform.machine()})"}
    if seed in config.report_seeds:
        from ..reporting.report import write_report

        write_report(results, out, title=f"{config.name}: {dataset.name}, seed {seed}", context=context)
    write_results(results, out, extra={"context": context})
    return out / "metrics.json"


def run_benchmark(config: BenchmarkConfig, stages: dict[str, float] | None = None) -> dict[str, Path]:
    """Run (or resume) the whole study and write the aggregated tables; returns their paths.

    ``stages`` (optional) receives wall seconds per stage: "data", "train <method>", "evaluate".
    """
    from .aggregate import aggregate, write_tables

    stages = {} if stages is None else stages

    def timed(stage: str, function, *args):
        start = time.time()
        result = function(*args)
        stages[stage] = stages.get(stage, 0.0) + time.time() - start
        return result

    started = time.time()
    for dataset in config.datasets:
        manifest = timed("data", ensure_dataset, dataset)
        for seed in config.seeds:
            metrics = Path(config.output_dir) / dataset.name / f"seed{seed}" / "metrics.json"
            if metrics.is_file():
                _log(f"{dataset.name} seed {seed}: already evaluated, skipping")
                continue
            runs: dict[str, Path] = {}
            for method in config.methods:
                if method.kind == "train" or (method.kind == "guided" and method.config):
                    overrides = [f"data.manifest={manifest}", f"seed={seed}", f"name={method.name}",
                                 *config.overrides, *method.overrides]
                    if method.kind == "guided":
                        overrides.append(f"guidance.strategy={method.strategy}")
                    run_dir = Path(config.output_dir) / dataset.name / method.name / f"seed{seed}"
                    runs[method.name] = timed(f"train {method.name}", train_method, method.config, overrides, run_dir)
            timed("evaluate", evaluate_seed, config, dataset, manifest, seed, runs)
    table = aggregate(config)
    files = write_tables(table, config, elapsed_s=time.time() - started)
    return files
