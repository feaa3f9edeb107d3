"""``anomorph benchmark``: train and evaluate methods × seeds × datasets, resumably.

Layout under ``output_dir``::

    <dataset>/<method>/seed<S>/          a normal run directory per trained method and seed
    <dataset>/seed<S>/metrics.json       every method of that seed (+ report.html for the first seed)
    results.csv / results.md / results.html   mean ± std over seeds, per method and group

    selection/search.csv, selection/chosen.json   the val search (see :mod:`.selection`)
    paired.csv / paired.md                      paired per-subject bootstrap CIs vs the reference

Interrupted? Run the same command again: finished runs (a ``done`` marker) and finished
evaluations (``metrics.json``, ``selection/chosen.json``) are skipped, a half-trained run
resumes from ``last.ckpt``.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, GuidanceConfig, _from_dict, load_config
from ..data.io import atomic_write


@dataclass
class DatasetSpec:
    """A manifest to benchmark on; ``phantom`` (PhantomConfig fields) builds it when missing.

    A ``{seed}`` in ``manifest`` gives every benchmark seed its own data: the phantom is built
    with ``seed`` = the benchmark seed (+ ``phantom.seed`` when given, as an offset), so seeds
    vary the data as well as the initialisation.
    """

    name: str
    manifest: str
    phantom: dict[str, Any] | None = None

    @property
    def varies_with_seed(self) -> bool:
        return "{seed}" in self.manifest

    def manifest_for(self, seed: int) -> str:
        return self.manifest.replace("{seed}", str(seed))


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
    method (e.g. ``train.max_epochs=30``); ``report_seeds`` get an HTML report.

    ``calibration_fraction``: share of the healthy val subjects that only calibrate u (healthy
    normalisers) and never choose thresholds. ``reference``: the method every other row is
    compared with in the paired table. ``selection``: the val search that chooses every
    hyperparameter behind a reported number (:class:`.selection.SelectionSpec` fields); empty =
    no search, the configs' values are used as they are.
    """

    name: str = "benchmark"
    output_dir: str = "runs/benchmark"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    datasets: list[DatasetSpec] = field(default_factory=list)
    methods: list[MethodSpec] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    report_seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 32
    calibration_fraction: float = 0.5
    reference: str = "morphaeus"
    selection: dict[str, Any] = field(default_factory=dict)


KINDS = ("threshold", "train", "guided")


def load_benchmark_config(path: str | Path, overrides: list[str] | None = None) -> BenchmarkConfig:
    """Read and validate a benchmark YAML; ``overrides`` are appended to its ``overrides``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"benchmark config not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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
    if config.selection:
        from .selection import SelectionSpec

        try:
            config.selection = dataclasses.asdict(_from_dict(SelectionSpec, config.selection, "selection"))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
        for name in list(config.selection["train_grid"]) + list(config.selection["guidance_grid"]):
            if name not in names:
                raise ConfigError(f"{path}: selection: {name!r} is not a method of this benchmark")
    if not 0 <= config.calibration_fraction < 1:
        raise ConfigError(f"{path}: calibration_fraction must be in [0, 1), got {config.calibration_fraction}")
    if not config.datasets or not config.methods:
        raise ConfigError(f"{path}: needs at least one dataset and one method")
    return config


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_dataset(spec: DatasetSpec, seed: int = 0) -> Path:
    """The dataset's manifest for ``seed``, building the phantom first when ``phantom`` is set
    and the manifest is missing."""
    manifest = Path(spec.manifest_for(seed))
    if manifest.is_file():
        return manifest
    if spec.phantom is None:
        raise ConfigError(f"dataset {spec.name!r}: manifest {manifest} not found")
    from ..data.phantom import PhantomConfig, build_phantom

    values = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.phantom.items()}
    if spec.varies_with_seed:
        values["seed"] = int(values.get("seed", 0)) + seed
    _log(f"building phantom for {spec.name!r} (seed {values.get('seed', 0)}) in {manifest.parent}")
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


def guided_scorers(method: MethodSpec, run_dir: Path, data, seed: int,
                   guidance_values: dict[str, Any] | None = None) -> list:
    """The guided detector (and its oracle-guided twin when the strategy has one) of ``method``
    on a trained run: :meth:`Detector.from_run <anomorph.scoring.Detector.from_run>` with u
    calibrated on ``data.healthy_reference()`` (the calibration subjects, never the saved
    calibration files). ``guidance_values`` override the method's ``guidance`` (the val-chosen
    values); the key ``estimator`` overrides the method's estimator."""
    from ..scoring import STRATEGIES, Detector

    values = {**method.guidance, **(guidance_values or {})}
    estimator = values.pop("estimator", method.estimator)
    detector = Detector.from_run(run_dir, guidance={**values, "strategy": method.strategy}, estimator=estimator,
                                 healthy=data.healthy_reference(), calibration=False, seed=seed, name=method.name)
    scorers = [detector]
    if method.oracle_guided and STRATEGIES[method.strategy].oracle_twin:
        scorers.append(detector.oracle_twin(f"{method.name} (oracle-guided)"))
    return scorers


def method_overrides(config: BenchmarkConfig, method: MethodSpec, manifest: Path, seed: int) -> list[str]:
    """The config overrides of a trained method's run for ``seed`` (before any chosen values)."""
    overrides = [f"data.manifest={manifest}", f"seed={seed}", f"name={method.name}",
                 *config.overrides, *method.overrides]
    if method.kind == "guided":
        overrides.append(f"guidance.strategy={method.strategy}")
    return overrides


def evaluate_seed(config: BenchmarkConfig, dataset: DatasetSpec, manifest: Path, seed: int,
                  runs: dict[str, Path], chosen: dict[str, Any] | None = None) -> Path:
    """Evaluate every method of one seed on one dataset; writes ``<dataset>/seed<S>/metrics.json``."""
    from ..data.slices import SliceDataset
    from ..evaluation.evaluate import EvaluationData, evaluate_scorer, write_results
    from ..data.slices import SliceConfig
    from ..evaluation.inference import OracleScorer, ThresholdScorer
    from ..runs import load_run
    from ..scoring import Detector

    out = Path(config.output_dir) / dataset.name / f"seed{seed}"
    trained = [m for m in config.methods if m.name in runs]
    if trained:
        _, first = load_run(runs[trained[0].name])
        slices = SliceConfig.from_config(first.data)
    else:
        slices = SliceConfig()
    data = EvaluationData.load(manifest, slices, config.calibration_fraction)
    chosen_guidance = (chosen or {}).get("guidance", {})
    scorers = []
    for method in config.methods:
        if method.kind == "threshold":
            train = SliceDataset(manifest, ["train"], slices, healthy_only=True)
            scorer = ThresholdScorer.fit(train, method.mode)
            scorer.name = method.name
            scorers.append(scorer)
        elif method.kind == "train":
            scorers.append(Detector.from_run(runs[method.name], guidance="none", calibration=False, name=method.name))
        else:
            scorers.extend(guided_scorers(method, runs[method.name if method.config else method.run], data, seed,
                                          chosen_guidance.get(method.name)))
    results = []
    for scorer in scorers:
        _log(f"evaluating {scorer.name} (seed {seed}, {dataset.name})")
        results.append(evaluate_scorer(scorer, data, config.batch_size))
    if data.has_oracle:
        results.append(evaluate_scorer(OracleScorer(slices.size), data, config.batch_size))
    context = {"benchmark": config.name, "dataset": dataset.name, "manifest": str(manifest), "seed": seed,
               "machine": f"{platform.node()} ({platform.machine()})", "chosen_on_val": chosen or {},
               "calibration_subjects": sorted({row.subject for row, _, _ in data.calibration.meta})
               if data.calibration is not None else []}
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
        chosen: dict[str, Any] = {}
        if config.selection:
            from .selection import run_selection

            chosen = timed("select on val", run_selection, config, dataset)
        for seed in config.seeds:
            metrics = Path(config.output_dir) / dataset.name / f"seed{seed}" / "metrics.json"
            if metrics.is_file():
                _log(f"{dataset.name} seed {seed}: already evaluated, skipping")
                continue
            manifest = timed("data", ensure_dataset, dataset, seed)
            runs: dict[str, Path] = {}
            for method in config.methods:
                if method.kind == "train" or (method.kind == "guided" and method.config):
                    extra = chosen.get("train", {}).get(method.name, [])
                    reused = chosen.get("runs", {}).get(method.name) if seed == chosen.get("seed") else None
                    if reused and (Path(reused) / "done").exists():
                        runs[method.name] = Path(reused)  # the val search trained exactly this run
                        continue
                    run_dir = Path(config.output_dir) / dataset.name / method.name / f"seed{seed}"
                    runs[method.name] = timed(f"train {method.name}", train_method, method.config,
                                              method_overrides(config, method, manifest, seed) + list(extra), run_dir)
            timed("evaluate", evaluate_seed, config, dataset, manifest, seed, runs, chosen)
    table = aggregate(config)
    files = write_tables(table, config, elapsed_s=time.time() - started)
    return files
