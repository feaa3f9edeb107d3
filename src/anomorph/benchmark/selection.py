"""Choose every hyperparameter behind a benchmark number on the **val** split, by code.

The search runs on the data of one seed (``selection.seed``), before any test pass:

1. every trained method in ``train_grid`` is trained once per combination of its override
   values (e.g. ``train.beta_end``); an unguided method keeps the combination with the best
   val ``criterion``;
2. every guided method in ``guidance_grid`` is scored on val for every combination of its
   guidance values (``threshold``, ``softness``, ``dilation``, ``map_lambda``, ...; the key
   ``estimator`` chooses the uncertainty estimator), on the run chosen in step 1 — or, for a
   method with its own training (``config:``, e.g. the conditioned head), on each of its
   trained combinations, choosing the pair jointly.

u is calibrated on the val *calibration* subjects (healthy, set aside by
``calibration_fraction``); the criterion is computed on the remaining val subjects, so the
subjects that calibrate u never choose a threshold. LPR and HRR are computed on val too, so no
choice needs the test split. Output, under ``<output_dir>/<dataset>/selection/``:
``search.csv`` / ``search.md`` (every combination with its val metrics) and ``chosen.json``
(what the benchmark then uses for every seed). An existing ``chosen.json`` is reused while its
``setup`` (the selection spec, the calibration fraction and the definition of every method in
the grids) matches the config; otherwise the search runs again, and every combination already
in ``search.csv`` with the same method definition (its ``setup`` column) is taken from there
instead of being scored again — so growing a grid scores only the new combinations.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..data.io import atomic_write

CRITERIA = ("pixel_auprc", "pixel_auroc", "oracle_best_dice")
SEARCH_COLUMNS = ("method", "run", "params", "pixel_auprc", "pixel_auroc", "oracle_best_dice", "lpr", "hrr",
                  "min_kind_lpr", "chosen", "setup")
METRIC_COLUMNS = ("pixel_auprc", "pixel_auroc", "oracle_best_dice", "lpr", "hrr", "min_kind_lpr")


@dataclass
class SelectionSpec:
    """``seed``: whose val split chooses. ``criterion``: val metric maximised (one of
    :data:`CRITERIA`; ``oracle_best_dice`` on val is the best Dice over val thresholds).
    ``train_grid``: method → {override key: [values]}. ``guidance_grid``: guided method →
    {guidance key | "estimator": [values]}. ``min_lpr`` (None = off): a guided method's values
    are chosen among the combinations whose val LPR is ≥ ``min_lpr`` on *every* lesion kind
    (``min_kind_lpr``: "do not register a lesion away" first, then the best criterion); when no
    combination qualifies, among all (``chosen.json`` records which)."""

    seed: int = 0
    criterion: str = "pixel_auprc"
    train_grid: dict[str, dict[str, list]] = field(default_factory=dict)
    guidance_grid: dict[str, dict[str, list]] = field(default_factory=dict)
    min_lpr: float | None = None

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"selection.criterion: {self.criterion!r} is not one of {CRITERIA}")
        if self.min_lpr is not None and not (isinstance(self.min_lpr, (int, float)) and 0 <= self.min_lpr <= 1):
            raise ConfigError(f"selection.min_lpr: must be a number in [0, 1] or null, got {self.min_lpr!r}")
        for kind, grid in (("train_grid", self.train_grid), ("guidance_grid", self.guidance_grid)):
            for method, values in grid.items():
                if not isinstance(values, dict) or not all(isinstance(v, list) and v for v in values.values()):
                    raise ConfigError(f"selection.{kind}.{method}: expected a mapping of key → non-empty list")


def combinations(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Cartesian product of a {key: [values]} grid, in a fixed order ([{}] for an empty grid)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _label(values: dict[str, Any]) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in values.items()) or "default"


def selection_setup(config, spec: SelectionSpec) -> str:
    """Fingerprint of everything the val search's outcome depends on in the config."""
    from .runner import method_setup

    names = list(dict.fromkeys(list(spec.train_grid) + list(spec.guidance_grid)))
    methods = {m.name: m for m in config.methods}
    selection = dataclasses.asdict(spec)
    if spec.min_lpr is None:  # the fingerprint of a search without the constraint is unchanged
        selection.pop("min_lpr")
    return json.dumps({"selection": selection, "calibration_fraction": config.calibration_fraction,
                       "methods": {n: method_setup(config, methods[n]) for n in names}}, sort_keys=True)


def read_search(path: Path) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """Rows of an earlier ``search.csv`` keyed by (method, run, params, setup); metrics as floats."""
    if not path.is_file():
        return {}
    rows = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("setup"):
                continue
            values = {k: (float(row[k]) if row.get(k) not in (None, "") else None) for k in METRIC_COLUMNS}
            rows[(row["method"], row["run"], row["params"], row["setup"])] = values
    return rows


def run_selection(config, dataset) -> dict[str, Any]:
    """Run (or reuse) the val search of ``config.selection`` on ``dataset``; returns chosen.json's
    content: {"seed", "criterion", "train": {method: [overrides]}, "runs": {method: run dir},
    "guidance": {method: {key: value}}}."""
    from ..evaluation.evaluate import EvaluationData, evaluate_scorer
    from ..evaluation.inference import ModelScorer
    from ..training import load_run
    from ..training.datamodule import slice_config
    from .runner import (_log, ensure_dataset, ensure_head, guided_scorers, method_overrides, method_setup,
                         teacher_overrides, train_method)

    spec = SelectionSpec(**config.selection)
    out = Path(config.output_dir) / dataset.name / "selection"
    chosen_path = out / "chosen.json"
    setup = selection_setup(config, spec)
    if chosen_path.is_file():
        previous = json.loads(chosen_path.read_text())
        if previous.get("setup") == setup:
            _log(f"{dataset.name}: val selection already done ({chosen_path})")
            return previous
        _log(f"{dataset.name}: the selection setup changed; searching again (known combinations reused)")
    cache = read_search(out / "search.csv")
    methods = {m.name: m for m in config.methods}
    manifest = ensure_dataset(dataset, spec.seed)

    trained: dict[str, list[tuple[dict[str, Any], Path]]] = {}

    def train_all(name: str) -> list[tuple[dict[str, Any], Path]]:
        if name not in trained:
            method = methods[name]
            teacher: list[str] = []
            if method.teacher:
                teacher_runs = train_all(method.teacher)
                if len(teacher_runs) != 1:
                    raise ConfigError(f"selection.train_grid.{method.teacher}: the teacher of {name!r} must have a "
                                      f"single training value in the val search, got {len(teacher_runs)}")
                teacher = teacher_overrides(method, teacher_runs[0][1])
            runs = []
            for values in combinations(spec.train_grid.get(name, {})):
                overrides = [f"{k}={v}" for k, v in values.items()]
                run_dir = out / name / _label(values)
                train_method(method.config, method_overrides(config, method, manifest, spec.seed) + teacher + overrides,
                             run_dir)
                runs.append((values, run_dir))
            trained[name] = runs
        return trained[name]

    needed = list(spec.train_grid) + [methods[m].run or m for m in spec.guidance_grid]
    for name in dict.fromkeys(needed):
        train_all(name)
    _, first = load_run(next(iter(trained.values()))[0][1])
    data = EvaluationData.load(manifest, slice_config(first.data), config.calibration_fraction)
    if data.val is None or not bool((data.val.labels > 0).any()):
        raise ConfigError(f"dataset {dataset.name!r}: the val search needs val slices with lesions")
    on_val = data.val_as_test()

    rows: list[dict[str, Any]] = []
    chosen: dict[str, Any] = {"seed": spec.seed, "dataset": dataset.name, "setup": setup,
                              "criterion": spec.criterion, "train": {}, "runs": {}, "guidance": {},
                              "calibration_subjects": sorted({r.subject for r, _, _ in data.calibration.meta})
                              if data.calibration is not None else []}

    def score(make_scorer, method: str, run_label: str, params: dict[str, Any]) -> float:
        key = (method, run_label, json.dumps(params, sort_keys=True), method_setup(config, methods[method]))
        if key in cache:
            metrics = cache[key]
        else:
            _log(f"val search: {method} [{run_label}] {params or ''}")
            metrics = evaluate_scorer(make_scorer(), on_val, config.batch_size).metrics
            metrics = {**metrics, "min_kind_lpr": min_kind_lpr(metrics)}
        row = {"method": method, "run": run_label, "params": key[2], "chosen": False, "setup": key[3]}
        row.update({k: metrics.get(k) for k in METRIC_COLUMNS if k in metrics})
        rows.append(row)
        value = metrics.get(spec.criterion)
        return float("-inf") if value is None else float(value)

    def eligible(row: dict[str, Any]) -> bool:
        """Whether a scored combination's val LPR met ``min_lpr`` on every lesion kind."""
        if spec.min_lpr is None:
            return True
        return row.get("min_kind_lpr") is not None and row["min_kind_lpr"] >= spec.min_lpr

    def mark(method: str, run_label: str, params: dict[str, Any]) -> None:
        for row in rows:
            if row["method"] == method and row["run"] == run_label and row["params"] == json.dumps(params, sort_keys=True):
                row["chosen"] = True

    # 1. unguided trained methods: best training combination on val
    for name in spec.train_grid:
        if methods[name].kind != "train":
            continue
        best = max(((score(lambda run_dir=run_dir: ModelScorer.from_run(run_dir), name, _label(values), {}), values, run_dir)
                    for values, run_dir in trained[name]), key=lambda t: t[0])
        chosen["train"][name] = [f"{k}={v}" for k, v in best[1].items()]
        chosen["runs"][name] = str(best[2])
        mark(name, _label(best[1]), {})

    for name, runs in trained.items():  # trained only as the base of a guided method, no grid
        if methods[name].kind == "train" and name not in chosen["runs"] and len(runs) == 1:
            chosen["runs"][name] = str(runs[0][1])

    # 2. guided methods: best guidance values on the chosen run (or jointly with their training)
    for name, grid in spec.guidance_grid.items():
        method = methods[name]
        if method.config:
            candidates = trained[name]
        else:
            base = method.run
            runs = trained[base]
            pick = chosen["runs"].get(base)
            candidates = [(v, r) for v, r in runs if pick is None or str(r) == pick][:1]
        results = []
        for values, run_dir in candidates:
            ensure_head(config, method.name if method.config else method.run, run_dir)
            for params in combinations(grid):
                def make(run_dir=run_dir, params=params):
                    return guided_scorers(method, run_dir, on_val, spec.seed, params)[0]

                value = score(make, name, _label(values), params)
                results.append((value, values, run_dir, params, eligible(rows[-1])))  # rows[-1]: the row just scored
        best = max(results, key=lambda t: (t[4], t[0]))
        chosen["guidance"][name] = best[3]
        if spec.min_lpr is not None:
            chosen.setdefault("meets_min_lpr", {})[name] = best[4]
        if method.config:
            chosen["train"][name] = [f"{k}={v}" for k, v in best[1].items()]
            chosen["runs"][name] = str(best[2])
        mark(name, _label(best[1]), best[3])

    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SEARCH_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "search.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    atomic_write(out / "search.md", lambda tmp: Path(tmp).write_text(search_markdown(rows, spec.criterion)))
    atomic_write(chosen_path, lambda tmp: Path(tmp).write_text(json.dumps(chosen, indent=2)))
    return chosen


def min_kind_lpr(metrics: dict[str, Any]) -> float | None:
    """The smallest LPR over the lesion kinds of ``metrics["by_lesion_type"]`` (None without any)."""
    values = [group.get("lpr") for group in (metrics.get("by_lesion_type") or {}).values() if isinstance(group, dict)]
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return min(values) if values else None


def search_markdown(rows: list[dict[str, Any]], criterion: str) -> str:
    """The search table as Markdown, the chosen row of each method in bold."""
    def cell(value: Any) -> str:
        return "—" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    lines = [f"Val search (criterion: val {criterion}; chosen rows in bold)\n",
             "| method | training | guidance values | val pixel AUPRC | val pixel AUROC | val best Dice | val LPR | val HRR "
             "| val LPR, worst kind |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["method"], r["run"], r["params"].replace("|", "/")] + [cell(r.get(k)) for k in
                                                                          METRIC_COLUMNS]
        if r["chosen"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
