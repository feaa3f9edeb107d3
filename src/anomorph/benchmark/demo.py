"""``anomorph demo``: the laptop-sized end-to-end run (a small phantom, one seed)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

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
    """The demo as a benchmark: threshold, AE, unguided deformable AE, and the guided strategy that
    did best on val in the full benchmark (iterative, threshold 0.99; docs/results.md)."""
    out = Path(out)
    epochs = epochs or DEMO_EPOCHS
    warmup = max(1, epochs // 3)
    overrides = [f"train.max_epochs={epochs}", f"train.warmup_epochs={warmup}",
                 f"train.beta_ramp_epochs={max(1, epochs - warmup)}", "data.size=64"]
    return BenchmarkConfig(
        name="anomorph demo", output_dir=str(out), seeds=[0], report_seeds=[0],
        datasets=[DatasetSpec("phantom", str(out / "phantom" / "manifest.csv"), dict(DEMO_PHANTOM))],
        methods=[
            MethodSpec("threshold", "threshold"),
            MethodSpec("ae", "train", config=str(_configs() / "ae.yaml")),
            MethodSpec("morphaeus", "train", config=str(_configs() / "morphaeus.yaml")),
            MethodSpec("morphaeus+iterative", "guided", run="morphaeus", strategy="iterative",
                       estimator="residual_z"),
        ],
        overrides=overrides,
    )


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
