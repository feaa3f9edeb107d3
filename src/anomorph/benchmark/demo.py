"""``anomorph demo``: the laptop-sized end-to-end run (a small phantom, one seed)."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .aggregate import to_markdown
from .runner import BenchmarkConfig, DatasetSpec, MethodSpec, run_benchmark

# Small enough for ≤ 10 minutes on 2 CPU cores (measured time in the README).
DEMO_PHANTOM = {"size": 64, "n_slices": 12, "seed": 0, "n_train": 16, "n_val_healthy": 2, "n_val_lesion": 4,
                "n_test": 12, "n_test_healthy": 3}
DEMO_EPOCHS = 25


@dataclass
class DemoResult:
    table: str
    report: Path
    results: Path
    seconds: float
    stages: dict[str, float]


def demo_config(out: str | Path, epochs: int | None = None) -> BenchmarkConfig:
    """The demo as a benchmark: threshold, AE, unguided deformable AE, and the guided row that did
    best on **val** in the full phantom benchmark, with its val-chosen values (read from the
    committed ``benchmarks/results/phantom/selection/``; without it: gating, config defaults)."""
    out = Path(out)
    epochs = epochs or DEMO_EPOCHS
    warmup = max(1, epochs // 3)
    overrides = [f"train.max_epochs={epochs}", f"train.warmup_epochs={warmup}",
                 f"train.beta_ramp_epochs={max(1, epochs - warmup)}", "data.size=64"]
    strategy, values = best_guided_on_val()
    estimator = values.pop("estimator", "residual_z")
    return BenchmarkConfig(
        name="anomorph demo", output_dir=str(out), seeds=[0], report_seeds=[0],
        datasets=[DatasetSpec("phantom", str(out / "phantom" / "manifest.csv"), dict(DEMO_PHANTOM))],
        methods=[
            MethodSpec("threshold", "threshold"),
            MethodSpec("ae", "train", config=str(_configs() / "ae.yaml")),
            MethodSpec("morphaeus", "train", config=str(_configs() / "morphaeus.yaml")),
            MethodSpec(f"morphaeus+{strategy}", "guided", run="morphaeus", strategy=strategy, estimator=estimator,
                       guidance=values),
        ],
        overrides=overrides,
    )


def best_guided_on_val(selection_dir: Path | None = None) -> tuple[str, dict[str, Any]]:
    """(strategy, chosen guidance values) of the guided row with the best val criterion in the
    phantom benchmark's committed search (strategies that need their own training excluded)."""
    from ..scoring.strategies import STRATEGIES

    folder = selection_dir or _configs().parent / "benchmarks" / "results" / "phantom" / "selection"
    search, chosen = folder / "search.csv", folder / "chosen.json"
    if not (search.is_file() and chosen.is_file()):
        return "gating", {}
    guidance = json.loads(chosen.read_text()).get("guidance", {})
    rows = [r for r in csv.DictReader(search.open()) if r["chosen"] == "True" and r["method"] in guidance
            and r["method"] in STRATEGIES and not STRATEGIES[r["method"]].needs_conditioned_model
            and r["method"] not in ("none", "tto")]
    if not rows:
        return "gating", {}
    best = max(rows, key=lambda r: float(r["pixel_auprc"] or "nan"))
    return best["method"], dict(guidance[best["method"]])


def _configs() -> Path:
    """The shipped configs folder (repository checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "configs" / "ae.yaml").is_file():
            return parent / "configs"
    return Path("configs")


def run_demo(out: str | Path = "runs/demo", epochs: int | None = None) -> DemoResult:
    """Build, train, evaluate, report; returns the overall table and the report path."""
    start = time.time()
    config = demo_config(out, epochs)
    stages: dict[str, float] = {}
    files = run_benchmark(config, stages)
    from .aggregate import aggregate

    rows = [r for r in aggregate(config) if r["group_kind"] in ("overall", "lesion_type")]
    table = to_markdown(rows)
    return DemoResult(table, Path(out) / "phantom" / "seed0" / "report.html", files["markdown"],
                      time.time() - start, stages)
