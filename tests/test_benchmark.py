"""Benchmark runner: aggregation math, resumability, and a tiny end-to-end study."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from anomorph.benchmark.aggregate import aggregate, to_markdown
from anomorph.benchmark.runner import BenchmarkConfig, DatasetSpec, MethodSpec, load_benchmark_config, run_benchmark
from anomorph.errors import ConfigError


def test_aggregate_mean_and_sample_std(tmp_path):
    rng = np.random.default_rng(4)
    config = BenchmarkConfig(output_dir=str(tmp_path), seeds=[0, 1, 2],
                             datasets=[DatasetSpec("d", "unused.csv")], methods=[MethodSpec("m", "threshold")])
    values = {s: rng.random(3) for s in config.seeds}
    for s, (a, b, c) in values.items():
        folder = tmp_path / "d" / f"seed{s}"
        folder.mkdir(parents=True)
        metrics = {"pixel_auprc": a, "lpr": None if s == 2 else b,
                   "by_lesion_type": {"csf_like": {"pixel_auprc": c}}, "by_size": {}}
        (folder / "metrics.json").write_text(json.dumps({"methods": {"m": metrics}}))
    rows = aggregate(config)
    overall = next(r for r in rows if r["group_kind"] == "overall")
    auprc = [values[s][0] for s in config.seeds]
    assert overall["pixel_auprc_mean"] == pytest.approx(np.mean(auprc))
    assert overall["pixel_auprc_std"] == pytest.approx(np.std(auprc, ddof=1))
    lpr = [values[s][1] for s in (0, 1)]  # undefined in seed 2: averaged where defined
    assert overall["lpr_mean"] == pytest.approx(np.mean(lpr))
    csf = next(r for r in rows if r["group"] == "csf_like")
    assert csf["pixel_auprc_mean"] == pytest.approx(np.mean([values[s][2] for s in config.seeds]))
    text = to_markdown(rows)
    assert f"{np.mean(auprc):.3f} ± {np.std(auprc, ddof=1):.3f}" in text and "lesion type: csf_like" in text


def test_benchmark_yaml_validation(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("datasets: [{name: d, manifest: m.csv}]\nmethods: [{name: g, kind: guided, run: nope}]\n")
    with pytest.raises(ConfigError, match="run 'nope' is not a method"):
        load_benchmark_config(path)
    path.write_text("datasets: [{name: d, manifest: m.csv}]\nmethods: [{name: a, kind: dance}]\n")
    with pytest.raises(ConfigError, match="kind 'dance'"):
        load_benchmark_config(path)


def test_shipped_benchmark_config_is_valid():
    config = load_benchmark_config("benchmarks/phantom.yaml")
    assert config.seeds == [0, 1, 2]
    assert {m.strategy for m in config.methods if m.kind == "guided"} == {"gating", "map", "iterative", "conditioned"}


def test_tiny_benchmark_end_to_end_and_resume(tiny_phantom, tmp_path):
    overrides = ["data.size=32", "data.batch_size=8", "data.min_brain_fraction=0.0", "model.channels=[8,16,32]",
                 "model.strides=[2,2,2]", "model.latent_dim=32", "train.max_epochs=2", "train.warmup_epochs=1",
                 "train.beta_ramp_epochs=1", "train.progress_bar=false"]
    config = BenchmarkConfig(
        name="tiny", output_dir=str(tmp_path / "bench"), seeds=[0], report_seeds=[],
        datasets=[DatasetSpec("tiny", str(tiny_phantom))],
        methods=[MethodSpec("threshold", "threshold"), MethodSpec("morphaeus", "train", config="configs/morphaeus.yaml",
                                                                  overrides=["model.head_channels=[8,16]"]),
                 MethodSpec("gating", "guided", run="morphaeus", strategy="gating", oracle_guided=True)],
        overrides=overrides)
    stages: dict[str, float] = {}
    files = run_benchmark(config, stages)
    assert {"data", "train morphaeus", "evaluate"} <= set(stages)
    metrics = json.loads((tmp_path / "bench" / "tiny" / "seed0" / "metrics.json").read_text())["methods"]
    assert set(metrics) == {"threshold", "morphaeus", "gating", "gating (oracle-guided)", "oracle"}
    for name in ("morphaeus", "gating", "gating (oracle-guided)"):
        assert 0 <= metrics[name]["hrr"] <= 1 or math.isnan(metrics[name]["hrr"])
    # oracle guidance with m = dilated lesion: the deformation cannot remove the lesion
    assert metrics["gating (oracle-guided)"]["lpr"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["gating (oracle-guided)"]["lpr"] >= metrics["morphaeus"]["lpr"] - 1e-4
    assert "pixel AUPRC" in files["markdown"].read_text()
    mtime = (tmp_path / "bench" / "tiny" / "seed0" / "metrics.json").stat().st_mtime_ns
    stages2: dict[str, float] = {}
    run_benchmark(config, stages2)  # everything done: nothing retrained or re-evaluated
    assert "train morphaeus" not in stages2 and "evaluate" not in stages2
    assert (tmp_path / "bench" / "tiny" / "seed0" / "metrics.json").stat().st_mtime_ns == mtime
