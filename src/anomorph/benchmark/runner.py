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


from ..config import ConfigError, GuidanceConfig, _from_dict, load_config
from ..data.io import atomic_write
from .aggregate import dataset_seeds


@dataclass
class DatasetSpec:
    """A manifest to benchmark on; ``phantom`` (PhantomConfig fields) builds it when missing.

    A ``{seed}`` in ``manifest`` gives every benchmark seed its own data: the phantom is built
    with ``seed`` = the benchmark seed (+ ``phantom.seed`` when given, as an offset), so seeds
    vary the data as well as the initialisation.

    ``frozen_from``: the name of an earlier dataset whose val choices (``chosen.json``) this
    dataset reuses unchanged — a check on data that never chose anything; its models are
    trained anew on this dataset with the chosen training values. ``seeds`` (default: the
    benchmark's) and ``methods`` (default: all; names of the benchmark's methods) restrict
    what runs on this dataset.
    """

    name: str
    manifest: str
    phantom: dict[str, Any] | None = None
    frozen_from: str | None = None
    seeds: list[int] | None = None
    methods: list[str] | None = None

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
    ``guidance``: GuidanceConfig fields overriding the run's. ``guidance_from``: use the
    val-chosen guidance values of that method instead of this one's own (see
    :func:`chosen_values`: the estimator is copied only to a strategy that uses a mask, and the
    row's own ``guidance`` keys win) — e.g. the ``tto`` control run with exactly the optimiser
    settings cost masking chose, or cost masking with its chosen values and fewer ``map_steps``.
    ``teacher`` (kind "train"): an earlier trained method whose run of the same seed (and
    dataset) is this run's frozen field-consistency teacher (``train.consistency_teacher_run``);
    in the val search the teacher must have a single training value.
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
    guidance_from: str | None = None
    teacher: str | None = None


@dataclass
class BenchmarkConfig:
    """A study: ``seeds`` × ``datasets`` × ``methods``; ``overrides`` apply to every trained
    method (e.g. ``train.max_epochs=30``); ``report_seeds`` get an HTML report.

    ``calibration_fraction``: share of the healthy val subjects that only calibrate u (healthy
    normalisers) and never choose thresholds. ``reference``: the method every other row is
    compared with in the paired table. ``selection``: the val search that chooses every
    hyperparameter behind a reported number (:class:`.selection.SelectionSpec` fields); empty =
    no search, the configs' values are used as they are. ``uncertainty_quality``: estimator
    specs ``{name, options, mode}`` measured as u on val (:mod:`.uncertainty_quality`; needs
    ``selection``). ``head``: :class:`~anomorph.training.noncorrespondence.HeadSettings` fields
    for the learned non-correspondence heads that rows with estimator ``noncorrespondence`` need
    (trained on each such run's healthy training slices, before any val or test pass).
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
    uncertainty_quality: list[dict[str, Any]] = field(default_factory=list)
    head: dict[str, Any] = field(default_factory=dict)


KINDS = ("threshold", "train", "guided")


def dataset_methods(config: "BenchmarkConfig", dataset: DatasetSpec) -> list[MethodSpec]:
    """The methods run on ``dataset`` (its ``methods`` list, plus the runs they are based on)."""
    if dataset.methods is None:
        return list(config.methods)
    wanted = set(dataset.methods)
    wanted |= {base for m in config.methods if m.name in wanted for base in (m.run, m.teacher) if base}
    return [m for m in config.methods if m.name in wanted]


def method_uses_head(config: "BenchmarkConfig", method: MethodSpec) -> bool:
    """Whether the row can use the learned non-correspondence head (its estimator, or a value of
    its ``estimator`` grid, is ``noncorrespondence`` or a combination with it as a part)."""
    from ..uncertainty import estimator_parts

    grid = (config.selection or {}).get("guidance_grid", {}).get(method.name, {})
    names = [method.estimator, *grid.get("estimator", [])]
    return method.kind == "guided" and any("noncorrespondence" in estimator_parts(name) for name in names)


#: MethodSpec fields left out of a row's fingerprint while at their default (None), so that
#: adding such a field to the spec keeps the fingerprints — and the cached results — of every
#: row that does not use it.
OPTIONAL_FIELDS = ("guidance_from", "teacher")


def method_setup(config: "BenchmarkConfig", method: MethodSpec, chosen: dict[str, Any] | None = None) -> str:
    """A fingerprint of what a row computes (JSON): its method spec, its val-chosen values and,
    when it can use the learned head, the head's training settings."""
    import json

    spec = {k: v for k, v in dataclasses.asdict(method).items() if not (k in OPTIONAL_FIELDS and v is None)}
    head = config.head if method_uses_head(config, method) else None
    return json.dumps({**spec, "chosen": chosen or {}, **({"head": head} if head else {})}, sort_keys=True, default=str)


def uses_head(config: "BenchmarkConfig", base: str) -> bool:
    """Whether any row on the run of method ``base`` (or the u-quality table) needs the learned
    non-correspondence head."""
    from ..uncertainty import estimator_parts

    rows = [m for m in config.methods if m.kind == "guided" and (m.run == base or m.name == base)]
    return any(method_uses_head(config, m) for m in rows) or (
        base == config.reference and any("noncorrespondence" in estimator_parts(spec.get("name", ""))
                                         for spec in config.uncertainty_quality))


def ensure_head(config: "BenchmarkConfig", base: str, run_dir: Path) -> None:
    """Train the run's non-correspondence head when a row needs it and it is missing."""
    from ..runs import has_head

    if uses_head(config, base) and not has_head(run_dir):
        from ..training.noncorrespondence import HeadSettings, fit_head

        _log(f"training the non-correspondence head of {run_dir}")
        fit_head(run_dir, HeadSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.head.items()}))


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
    earlier: list[str] = []
    for d in config.datasets:
        if d.frozen_from is not None and d.frozen_from not in earlier:
            raise ConfigError(f"{path}: dataset {d.name!r}: frozen_from {d.frozen_from!r} must name an earlier dataset")
        unknown = sorted(set(d.methods or []) - set(names))
        if unknown:
            raise ConfigError(f"{path}: dataset {d.name!r}: unknown method(s) {unknown}")
        earlier.append(d.name)
    earlier_trained: list[str] = []
    for m in config.methods:
        if m.kind not in KINDS:
            raise ConfigError(f"{path}: method {m.name!r}: kind {m.kind!r} is not one of {KINDS}")
        if m.kind == "train" and not m.config:
            raise ConfigError(f"{path}: method {m.name!r}: kind 'train' needs a config")
        if m.kind == "guided" and not (m.run or m.config):
            raise ConfigError(f"{path}: method {m.name!r}: kind 'guided' needs 'run' (a trained method) or 'config'")
        if m.guidance_from is not None and m.guidance_from not in names:
            raise ConfigError(f"{path}: method {m.name!r}: guidance_from {m.guidance_from!r} is not a method of this benchmark")
        if m.kind == "guided" and m.run and m.run not in names:
            raise ConfigError(f"{path}: method {m.name!r}: run {m.run!r} is not a method of this benchmark")
        if m.teacher is not None and (m.kind != "train" or m.teacher not in earlier_trained):
            raise ConfigError(f"{path}: method {m.name!r}: teacher {m.teacher!r} must name a kind 'train' method "
                              f"listed before it (and the method itself must be kind 'train')")
        if m.kind == "train":
            earlier_trained.append(m.name)
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
    from ..uncertainty import estimator_parts
    from ..uncertainty.estimators import ESTIMATORS

    for spec in config.uncertainty_quality:
        try:
            parts = estimator_parts(spec.get("name", "")) if isinstance(spec, dict) else [None]
        except ConfigError as err:
            raise ConfigError(f"{path}: uncertainty_quality: {err}") from err
        if len(parts) > 1 and spec.get("mode") == "none":
            raise ConfigError(f"{path}: uncertainty_quality: {spec['name']} combines healthy z-scores; "
                              "mode none is not possible")
        if not isinstance(spec, dict) or any(part not in ESTIMATORS for part in parts) or \
                set(spec) - {"name", "options", "mode"} or spec.get("mode", "pixel") not in ("pixel", "tissue", "none"):
            raise ConfigError(f"{path}: uncertainty_quality: {spec!r} must be {{name: one of {sorted(ESTIMATORS)} "
                              "or a combination such as max(warped_residual,noncorrespondence), "
                              "options: {...}, mode: pixel|tissue|none}")
    if config.head:
        from ..training.noncorrespondence import HeadSettings

        unknown = sorted(set(config.head) - {f.name for f in dataclasses.fields(HeadSettings)})
        if unknown:
            raise ConfigError(f"{path}: head: unknown key(s) {unknown}; accepted: "
                              f"{[f.name for f in dataclasses.fields(HeadSettings)]}")
    if config.uncertainty_quality and not config.selection:
        raise ConfigError(f"{path}: uncertainty_quality needs a selection section (it uses the val-chosen run)")
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


def chosen_reference(config: BenchmarkConfig, chosen: dict[str, Any]) -> tuple[Path, MethodSpec, list[str]]:
    """How the val-chosen reference run of a search (``chosen``: its ``chosen.json``) was trained,
    to train twins of it: (the manifest of the choosing dataset and seed, built if missing; the
    reference method; its run-config overrides including the val-chosen training values)."""
    dataset = next(d for d in config.datasets if d.name == chosen["dataset"])
    manifest = ensure_dataset(dataset, chosen["seed"])
    method = next(m for m in config.methods if m.name == config.reference)
    return manifest, method, (method_overrides(config, method, manifest, chosen["seed"])
                              + list(chosen["train"].get(config.reference, [])))


def teacher_overrides(method: MethodSpec, teacher_run: Path | None) -> list[str]:
    """The override that makes ``teacher_run`` (the run of ``method.teacher`` for the same seed and
    data) the frozen field-consistency teacher of ``method``'s run; [] without a teacher."""
    if method.teacher is None:
        return []
    if teacher_run is None:
        raise ConfigError(f"method {method.name!r}: its teacher {method.teacher!r} has no run for this seed")
    return [f"train.consistency_teacher_run={teacher_run}"]


def method_overrides(config: BenchmarkConfig, method: MethodSpec, manifest: Path, seed: int) -> list[str]:
    """The config overrides of a trained method's run for ``seed`` (before any chosen values)."""
    overrides = [f"data.manifest={manifest}", f"seed={seed}", f"name={method.name}",
                 *config.overrides, *method.overrides]
    if method.kind == "guided":
        overrides.append(f"guidance.strategy={method.strategy}")
    return overrides


def load_seed_data(config: BenchmarkConfig, manifest: Path, runs: dict[str, Path]):
    """The seed's :class:`EvaluationData` on the model grid of its first trained run, with the
    calibration subjects set aside (``config.calibration_fraction``)."""
    from ..data.slices import SliceConfig
    from ..evaluation.evaluate import EvaluationData
    from ..runs import load_run

    trained = [m for m in config.methods if m.name in runs]
    slices = SliceConfig.from_config(load_run(runs[trained[0].name])[1].data) if trained else SliceConfig()
    return EvaluationData.load(manifest, slices, config.calibration_fraction)


def chosen_values(method: MethodSpec, chosen_guidance: dict[str, Any]) -> dict[str, Any] | None:
    """The val-chosen guidance values a row uses: its own, or (``guidance_from``) another
    method's. A copied estimator is kept only when the row's strategy cuts a mask from u
    (``STRATEGIES[strategy].uses_mask``; e.g. a cheaper variant of cost masking keeps cost
    masking's estimator, the ``tto_matched`` control drops it); a key the row sets in its own
    ``guidance`` is not copied (the row's value is what it is about, e.g. ``map_steps``)."""
    if method.guidance_from is None:
        return chosen_guidance.get(method.name)
    from ..scoring import STRATEGIES

    values = dict(chosen_guidance.get(method.guidance_from) or {})
    strategy = STRATEGIES.get(method.strategy)
    if strategy is None or not strategy.uses_mask:
        values.pop("estimator", None)
    for key in method.guidance:
        values.pop(key, None)
    return values


def build_scorers(config: BenchmarkConfig, manifest: Path, seed: int, runs: dict[str, Path], data,
                  chosen: dict[str, Any] | None = None, methods: list[MethodSpec] | None = None) -> list:
    """Every row's scorer for one seed, in the config's order (oracle twins after their method);
    ``methods`` (default: all of the config's) restricts the rows."""
    from ..data.slices import SliceDataset
    from ..evaluation.inference import ThresholdScorer
    from ..scoring import Detector

    chosen_guidance = (chosen or {}).get("guidance", {})
    scorers = []
    for method in (config.methods if methods is None else methods):
        if method.kind == "threshold":
            train = SliceDataset(manifest, ["train"], data.config, healthy_only=True)
            scorer = ThresholdScorer.fit(train, method.mode)
            scorer.name = method.name
            scorers.append(scorer)
        elif method.kind == "train":
            scorers.append(Detector.from_run(runs[method.name], guidance="none", calibration=False, name=method.name))
        else:
            scorers.extend(guided_scorers(method, runs[method.name if method.config else method.run], data, seed,
                                          chosen_values(method, chosen_guidance)))
    return scorers


def evaluate_seed(config: BenchmarkConfig, dataset: DatasetSpec, manifest: Path, seed: int,
                  runs: dict[str, Path], chosen: dict[str, Any] | None = None) -> Path:
    """Evaluate every method of one seed on one dataset; writes ``<dataset>/seed<S>/metrics.json``."""
    from ..evaluation.evaluate import MethodResult, evaluate_scorer, write_results
    from ..evaluation.inference import OracleScorer

    out = Path(config.output_dir) / dataset.name / f"seed{seed}"
    data = load_seed_data(config, manifest, runs)
    setup = seed_setup(config, dataset, chosen)
    # rows whose setup is unchanged keep their saved metrics (not on report seeds: the report
    # needs every row's curves and example panels, which metrics.json does not hold)
    kept = {} if seed in config.report_seeds else saved_rows(out / "metrics.json", setup)
    results = []
    for method in dataset_methods(config, dataset):
        if method.name in kept:
            _log(f"unchanged: {method.name} (seed {seed}, {dataset.name}), saved metrics kept")
            results.extend(MethodResult(name, False, metrics) for name, metrics in kept[method.name].items())
            continue
        for scorer in build_scorers(config, manifest, seed, runs, data, chosen, [method]):
            _log(f"evaluating {scorer.name} (seed {seed}, {dataset.name})")
            results.append(evaluate_scorer(scorer, data, config.batch_size))
    if data.has_oracle:
        if ORACLE_ROW in kept:
            results.extend(MethodResult(name, False, metrics) for name, metrics in kept[ORACLE_ROW].items())
        else:
            results.append(evaluate_scorer(OracleScorer(data.config.size), data, config.batch_size))
    context = {"benchmark": config.name, "dataset": dataset.name, "manifest": str(manifest), "seed": seed,
               "machine": f"{platform.node()} ({platform.machine()})", "chosen_on_val": chosen or {},
               "calibration_subjects": sorted({row.subject for row, _, _ in data.calibration.meta})
               if data.calibration is not None else [], "setup": setup}
    if seed in config.report_seeds:
        from ..reporting.report import write_report

        write_report(results, out, title=f"{config.name}: {dataset.name}, seed {seed}", context=context)
    write_results(results, out, extra={"context": context})
    return out / "metrics.json"


#: key of the oracle row (m = ground truth, no method behind it) in :func:`saved_rows`
ORACLE_ROW = "oracle"


def saved_rows(path: Path, setup: dict[str, str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{method: {row name: metrics}} of the rows in a saved ``metrics.json`` whose method setup
    equals today's ``setup`` (:func:`seed_setup`); the row of method M is ``M`` and its oracle-guided
    twin ``M (oracle-guided)``. The data-only ``oracle`` row is kept under :data:`ORACLE_ROW`
    whenever the file was written for the same data (any saved setup). {} when unreadable."""
    import json

    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    metrics = saved.get("methods") or {}
    saved_setup = (saved.get("context") or {}).get("setup") or {}
    kept: dict[str, dict[str, dict[str, Any]]] = {}
    for name, fingerprint in setup.items():
        if saved_setup.get(name) == fingerprint and name in metrics:
            kept[name] = {row: value for row, value in metrics.items() if row in (name, f"{name} (oracle-guided)")}
    if saved_setup and ORACLE_ROW in metrics and ORACLE_ROW not in setup:
        kept[ORACLE_ROW] = {ORACLE_ROW: metrics[ORACLE_ROW]}
    return kept


def seed_setup(config: BenchmarkConfig, dataset: DatasetSpec, chosen: dict[str, Any] | None) -> dict[str, str]:
    """{row method: :func:`method_setup`}: a seed's metrics.json is reused only while this matches."""
    guidance = (chosen or {}).get("guidance", {})
    train = (chosen or {}).get("train", {})
    return {m.name: method_setup(config, m, {"guidance": chosen_values(m, guidance), "train": train.get(m.name)})
            for m in dataset_methods(config, dataset)}


def seed_is_current(config: BenchmarkConfig, dataset: DatasetSpec, seed: int, chosen: dict[str, Any]) -> bool:
    """True when ``<dataset>/seed<S>/metrics.json`` exists and was made for today's rows and
    val choices (its ``context.setup``); otherwise the seed is evaluated again."""
    import json

    path = Path(config.output_dir) / dataset.name / f"seed{seed}" / "metrics.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text()).get("context", {}).get("setup")
    except ValueError:
        return False
    return saved == seed_setup(config, dataset, chosen)


def seed_runs(config: BenchmarkConfig, dataset: DatasetSpec, seed: int, chosen: dict[str, Any]) -> dict[str, tuple[Path, list[str]]]:
    """Per trained method of ``seed``: (run directory, the val-chosen overrides it is trained
    with). The selection seed reuses the run the val search trained with the chosen values —
    on the dataset that chose them only (``chosen["dataset"]``; never on a ``frozen_from`` check)."""
    runs = {}
    same_data = chosen.get("dataset", dataset.name) == dataset.name
    for method in dataset_methods(config, dataset):
        if method.kind == "train" or (method.kind == "guided" and method.config):
            extra = list(chosen.get("train", {}).get(method.name, []))
            reused = chosen.get("runs", {}).get(method.name) if seed == chosen.get("seed") and same_data else None
            if reused and (Path(reused) / "done").exists():
                runs[method.name] = (Path(reused), extra)
            else:
                runs[method.name] = (Path(config.output_dir) / dataset.name / method.name / f"seed{seed}", extra)
    return runs


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
    chosen_by_dataset: dict[str, dict[str, Any]] = {}
    for dataset in config.datasets:
        chosen: dict[str, Any] = {}
        if dataset.frozen_from is not None:
            chosen = chosen_by_dataset.get(dataset.frozen_from, {})
            _log(f"{dataset.name}: reusing the val choices of {dataset.frozen_from!r} unchanged")
        elif config.selection:
            from .selection import run_selection

            chosen = timed("select on val", run_selection, config, dataset)
            if config.uncertainty_quality:
                from .uncertainty_quality import uncertainty_quality

                timed("uncertainty quality", uncertainty_quality, config, dataset, chosen)
        chosen_by_dataset[dataset.name] = chosen
        for seed in dataset_seeds(config, dataset):
            if seed_is_current(config, dataset, seed, chosen):
                _log(f"{dataset.name} seed {seed}: already evaluated, skipping")
                continue
            manifest = timed("data", ensure_dataset, dataset, seed)
            runs: dict[str, Path] = {}
            methods = {m.name: m for m in config.methods}
            for name, (run_dir, extra) in seed_runs(config, dataset, seed, chosen).items():
                method = methods[name]
                teacher = teacher_overrides(method, runs.get(method.teacher))
                runs[name] = timed(f"train {name}", train_method, method.config,
                                   method_overrides(config, method, manifest, seed) + teacher + extra, run_dir)
                timed("train heads", ensure_head, config, name, runs[name])
            timed("evaluate", evaluate_seed, config, dataset, manifest, seed, runs, chosen)
        if dataset.frozen_from is None and config.report_seeds and (Path(config.output_dir) / dataset.name / f"seed{config.report_seeds[0]}"
                                    / "metrics.json").is_file():
            from .figures import guidance_figures

            timed("figures", guidance_figures, config, dataset, config.report_seeds[0], chosen)
    table = aggregate(config)
    files = write_tables(table, config, elapsed_s=time.time() - started)
    return files
