"""Benchmark runner: aggregation math, resumability, and a tiny end-to-end study."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from pathlib import Path

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
    assert {m.strategy for m in config.methods if m.kind == "guided"} == {
        "gating", "map", "cost_masking", "tto", "iterative"}
    assert config.datasets[0].varies_with_seed and config.selection["seed"] == 0


def test_tiny_benchmark_end_to_end_and_resume(tiny_phantom, tmp_path, monkeypatch):
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

    # a new row and a changed row: only those are evaluated, the others keep their saved metrics
    import anomorph.evaluation.evaluate as evaluate_module

    scored = []
    original = evaluate_module.evaluate_scorer
    monkeypatch.setattr(evaluate_module, "evaluate_scorer",
                        lambda scorer, *a, **k: scored.append(scorer.name) or original(scorer, *a, **k))
    config.methods.append(MethodSpec("tto", "guided", run="morphaeus", strategy="tto", guidance={"map_steps": 2}))
    config.methods[2].guidance = {"threshold": 2.5}
    run_benchmark(config)
    assert scored == ["gating", "gating (oracle-guided)", "tto"]
    again = json.loads((tmp_path / "bench" / "tiny" / "seed0" / "metrics.json").read_text())
    assert set(again["methods"]) == set(metrics) | {"tto"}
    for name in ("threshold", "morphaeus", "oracle"):
        assert again["methods"][name] == metrics[name]
    # a report seed is always evaluated whole (its report needs every row's curves)
    scored.clear()
    config.methods[3].guidance = {"map_steps": 3}
    config.report_seeds = [0]
    run_benchmark(config)
    assert scored == ["threshold", "morphaeus", "gating", "gating (oracle-guided)", "tto", "oracle"]


TINY = ["data.size=32", "data.batch_size=8", "data.min_brain_fraction=0.0", "model.channels=[8,16,32]",
        "model.strides=[2,2,2]", "model.latent_dim=32", "train.max_epochs=2", "train.warmup_epochs=1",
        "train.beta_ramp_epochs=1", "train.progress_bar=false", "model.head_channels=[8,16]"]


def _selection_config(out: Path) -> BenchmarkConfig:
    phantom = {"size": 32, "n_slices": 4, "n_train": 4, "n_val_healthy": 2, "n_val_lesion": 2, "n_test": 3,
               "n_test_healthy": 1}
    return BenchmarkConfig(
        name="tiny", output_dir=str(out / "bench"), seeds=[0, 1], report_seeds=[], calibration_fraction=0.5,
        datasets=[DatasetSpec("tiny", str(out / "data" / "seed{seed}" / "manifest.csv"), phantom)],
        methods=[MethodSpec("morphaeus", "train", config="configs/morphaeus.yaml"),
                 MethodSpec("gating", "guided", run="morphaeus", strategy="gating", oracle_guided=True),
                 MethodSpec("tto", "guided", run="morphaeus", strategy="tto", guidance={"map_steps": 2})],
        overrides=TINY,
        selection={"seed": 0, "criterion": "pixel_auprc", "train_grid": {"morphaeus": {"train.beta_end": [0.01, 1.0]}},
                   "guidance_grid": {"gating": {"threshold": [1.0, 3.0], "dilation": [0, 1]}}},
        uncertainty_quality=[{"name": "residual_z"}, {"name": "deformation", "options": {"quantity": "displacement"}},
                             {"name": "noncorrespondence", "mode": "none"}],
        head={"steps": 2, "batch_size": 4, "draws": 1, "channels": [4, 8]})


def test_selection_on_val_only_and_seeds_vary_the_data(tmp_path, monkeypatch):
    from anomorph.data.manifest import read_manifest

    config = _selection_config(tmp_path)
    config.report_seeds = [0]
    files = run_benchmark(config)
    root = tmp_path / "bench" / "tiny"
    assert sorted(p.name for p in (root / "figures").glob("guidance_*.png"))  # the explanatory panels
    assert (root / "figures" / "uncertainty_panels.png").is_file()
    quality = list(csv.DictReader((root / "uncertainty" / "quality.csv").open()))
    overall = [r for r in quality if r["group"] == "overall"]
    assert [r["estimator"] for r in overall] == ["residual_z", "deformation[quantity=displacement]",
                                                 "noncorrespondence (raw u)"]
    assert all(0 <= float(r["u_auroc"]) <= 1 and 0 <= float(r["healthy_false_alarm"]) <= 1 for r in overall)
    assert "paired_markdown" in files and "tto" in files["paired_markdown"].read_text()
    chosen = json.loads((root / "selection" / "chosen.json").read_text())
    search = (root / "selection" / "search.csv").read_text().splitlines()
    assert len(search) == 1 + 2 + 4  # header, two trained β, 2×2 gating values
    assert chosen["train"]["morphaeus"][0].startswith("train.beta_end=")
    assert set(chosen["guidance"]["gating"]) == {"threshold", "dilation"}
    # the calibration subject (healthy, val) is not among the subjects that choose thresholds
    seed0 = json.loads((root / "seed0" / "metrics.json").read_text())
    calibration = seed0["context"]["calibration_subjects"]
    assert len(calibration) == 1 and calibration == chosen["calibration_subjects"]
    # seed 0 reuses the run the search trained; seed 1 has its own phantom and its own run
    assert (root / "selection" / "morphaeus").is_dir() and not (root / "morphaeus" / "seed0").exists()
    assert (root / "morphaeus" / "seed1" / "done").exists()
    images = [{r.image.name: r.image.read_bytes() for r in read_manifest(tmp_path / "data" / f"seed{s}" / "manifest.csv")}
              for s in (0, 1)]
    assert images[0].keys() == images[1].keys() and all(images[0][k] != images[1][k] for k in images[0])
    assert set(seed0["methods"]) == {"morphaeus", "gating", "gating (oracle-guided)", "tto", "oracle"}
    assert all("per_subject" in m for m in seed0["methods"].values())
    # poison the TEST split of the selection seed: the search, redone, chooses exactly the same
    for row in read_manifest(tmp_path / "data" / "seed0" / "manifest.csv"):
        if row.split == "test":
            import nibabel as nib
            import numpy as np

            img = nib.load(row.image)
            noise = np.random.default_rng(0).uniform(0, 1000, img.shape).astype(np.float32)
            nib.save(nib.Nifti1Image(noise, img.affine), row.image)
    before = (root / "selection" / "search.csv").read_text()
    (root / "selection" / "chosen.json").unlink()
    (root / "selection" / "search.csv").unlink()  # else its rows would be reused, not recomputed
    assert json.loads(json.dumps(run_selection_only(config))) == chosen
    assert (root / "selection" / "search.csv").read_text() == before

    # growing a grid scores only the new combinations (the others come from search.csv)
    import anomorph.evaluation.evaluate as evaluate_module

    scored = []
    original = evaluate_module.evaluate_scorer
    monkeypatch.setattr(evaluate_module, "evaluate_scorer",
                        lambda scorer, *a, **k: scored.append(scorer.name) or original(scorer, *a, **k))
    config.selection["guidance_grid"]["gating"]["threshold"] = [1.0, 3.0, 5.0]
    grown = run_selection_only(config)
    assert scored == ["gating", "gating"]  # threshold 5 × dilation 0, 1
    rows = list(csv.DictReader((root / "selection" / "search.csv").open()))
    assert len(rows) == 2 + 6 and sum(r["chosen"] == "True" for r in rows) == 2
    old = {(r["method"], r["run"], r["params"]): r["pixel_auprc"] for r in csv.DictReader(io.StringIO(before))}
    assert all(old[(r["method"], r["run"], r["params"])] == r["pixel_auprc"] for r in rows
               if (r["method"], r["run"], r["params"]) in old)
    scored.clear()
    assert run_selection_only(config) == grown and scored == []  # unchanged setup: chosen.json reused

    # a second dataset checked with the FROZEN choices: its own data and its own trainings
    monkeypatch.undo()
    phantom = dict(config.datasets[0].phantom, seed=50)
    config.datasets.append(DatasetSpec("tiny2", str(tmp_path / "data2" / "seed{seed}" / "manifest.csv"), phantom,
                                       frozen_from="tiny", seeds=[0], methods=["gating"]))
    run_benchmark(config)
    second = json.loads((tmp_path / "bench" / "tiny2" / "seed0" / "metrics.json").read_text())
    assert set(second["methods"]) == {"morphaeus", "gating", "gating (oracle-guided)", "oracle"}
    assert second["context"]["chosen_on_val"]["guidance"] == grown["guidance"]
    assert (tmp_path / "bench" / "tiny2" / "morphaeus" / "seed0" / "done").exists()
    assert not (tmp_path / "bench" / "tiny2" / "selection").exists()



def test_min_lpr_chooses_among_values_that_keep_every_lesion_kind_then_by_the_criterion(tmp_path, monkeypatch):
    """selection.min_lpr: values whose val LPR is below it on some kind lose to any that meet it,
    whatever their AUPRC; with none meeting it, the criterion alone chooses (and chosen.json says so)."""
    import anomorph.evaluation.evaluate as evaluate_module
    from anomorph.evaluation.evaluate import MethodResult

    # synthetic val metrics per threshold: AUPRC rises with it, the worst kind's LPR falls
    table = {1.0: (0.30, {"csf_like": 0.99, "large": 0.97}), 2.0: (0.40, {"csf_like": 0.99, "large": 0.96}),
             3.0: (0.50, {"csf_like": 0.98, "large": 0.80})}

    def fake(scorer, data, batch_size=32):
        auprc, lpr = table[scorer.guidance.threshold]
        metrics = {"pixel_auprc": auprc, "lpr": sum(lpr.values()) / 2,
                   "by_lesion_type": {k: {"lpr": v} for k, v in lpr.items()} | {"none": {"lpr": float("nan")}}}
        return MethodResult(scorer.name, True, metrics)

    monkeypatch.setattr(evaluate_module, "evaluate_scorer", fake)
    picks = {}
    for min_lpr in (None, 0.95, 0.999):
        config = _selection_config(tmp_path)
        config.output_dir = str(tmp_path / f"bench{min_lpr}")
        config.selection = {"seed": 0, "criterion": "pixel_auprc", "train_grid": {}, "min_lpr": min_lpr,
                            "guidance_grid": {"gating": {"threshold": [1.0, 2.0, 3.0]}}}
        chosen = run_selection_only(config)
        picks[min_lpr] = (chosen["guidance"]["gating"]["threshold"], chosen.get("meets_min_lpr"))
        rows = list(csv.DictReader((Path(config.output_dir) / "tiny" / "selection" / "search.csv").open()))
        assert sorted(float(r["min_kind_lpr"]) for r in rows) == [0.80, 0.96, 0.97]
    assert picks == {None: (3.0, None), 0.95: (2.0, {"gating": True}), 0.999: (3.0, {"gating": False})}
    with pytest.raises(ConfigError, match="min_lpr"):
        from anomorph.benchmark.selection import SelectionSpec
        SelectionSpec(min_lpr=1.5)

def run_selection_only(config):
    from anomorph.benchmark.selection import run_selection

    return run_selection(config, config.datasets[0])


def test_paired_differences_pool_seeds_and_match_a_direct_bootstrap(tmp_path):
    from anomorph.benchmark.aggregate import paired_differences, paired_markdown
    from anomorph.benchmark.statistics import paired_bootstrap

    config = BenchmarkConfig(name="t", output_dir=str(tmp_path), seeds=[0, 1], reference="base",
                             datasets=[DatasetSpec("d", "unused.csv")], methods=[MethodSpec("base", "threshold")])
    rng = np.random.default_rng(0)
    expected_diffs, groups = [], []
    for seed in (0, 1):
        base, guided = {}, {}
        for i in range(5):
            kind = "a" if i % 2 else "b"
            a, b = rng.uniform(0, 0.5), rng.uniform(0, 0.5) + 0.2 * seed
            base[f"s{i}"] = {"lesion_type": kind, "pixel_auprc": a, "dice_at_val": a}
            guided[f"s{i}"] = {"lesion_type": kind, "pixel_auprc": b, "dice_at_val": b}
        out = tmp_path / "d" / f"seed{seed}"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"methods": {"base": {"per_subject": base},
                                                                  "guided": {"per_subject": guided}}}))
        for key in sorted(base):
            expected_diffs.append(guided[key]["pixel_auprc"] - base[key]["pixel_auprc"])
            groups.append(f"seed{seed}")
    rows = paired_differences(config, n_resamples=2000)
    overall = [r for r in rows if r["metric"] == "pixel_auprc" and r["group"] == "overall"][0]
    direct = paired_bootstrap(expected_diffs, groups, n_resamples=2000)
    assert overall["n"] == 10 and overall["mean"] == pytest.approx(np.mean(expected_diffs))
    assert (overall["ci_low"], overall["ci_high"]) == pytest.approx((direct["ci_low"], direct["ci_high"]))
    assert {r["group"] for r in rows} == {"overall", "a", "b"}
    assert "guided" in paired_markdown(rows) and "[" in paired_markdown(rows)


def test_demo_takes_the_guided_row_that_was_best_on_val(tmp_path):
    from anomorph.benchmark.demo import best_guided_on_val

    assert best_guided_on_val(tmp_path) == ("gating", {})  # no committed search: defaults
    (tmp_path / "chosen.json").write_text(json.dumps({"guidance": {
        "gating": {"threshold": 3.0, "estimator": "deformation"}, "map": {"threshold": 2.0, "map_lambda": 0.1},
        "tto": {"map_lambda": 1.0}}}))
    (tmp_path / "search.csv").write_text(
        "method,run,params,pixel_auprc,chosen\n"
        "gating,x,{},0.30,True\ngating,x,{},0.50,False\nmap,x,{},0.40,True\ntto,x,{},0.90,True\n")
    assert best_guided_on_val(tmp_path) == ("map", {"threshold": 2.0, "map_lambda": 0.1})


def test_row_fingerprint_includes_the_head_settings_only_for_rows_that_use_the_head(tmp_path):
    from anomorph.benchmark.runner import method_setup

    config = _selection_config(tmp_path)
    config.selection["guidance_grid"]["gating"]["estimator"] = ["residual_z", "noncorrespondence"]
    gating, tto = config.methods[1], config.methods[2]
    before = method_setup(config, gating), method_setup(config, tto)
    config.head = {**config.head, "steps": 3}
    assert method_setup(config, gating) != before[0]  # a re-trained head: its rows are scored again
    assert method_setup(config, tto) == before[1]


def test_a_combination_with_the_head_as_a_part_trains_the_head(tmp_path):
    from anomorph.benchmark.runner import method_uses_head, uses_head

    config = _selection_config(tmp_path)
    gating = config.methods[1]
    config.selection["guidance_grid"]["gating"]["estimator"] = ["residual_z", "max(warped_residual,deformation)"]
    assert not method_uses_head(config, gating)
    config.selection["guidance_grid"]["gating"]["estimator"] = ["residual_z", "max(warped_residual,noncorrespondence)"]
    assert method_uses_head(config, gating) and uses_head(config, gating.run)
    path = tmp_path / "bad.yaml"
    for spec, message in [("{name: 'max(warped_residual,nope)'}", "must be"),
                          ("{name: 'max(warped_residual,deformation)', mode: none}", "mode none"),
                          ("{name: 'prod(warped_residual,deformation)'}", "rule")]:
        path.write_text("datasets: [{name: d, manifest: m.csv}]\nmethods: [{name: t, kind: threshold}]\n"
                        f"selection: {{seed: 0}}\nuncertainty_quality: [{spec}]\n")
        with pytest.raises(ConfigError, match=message):
            load_benchmark_config(path)


def test_the_committed_val_search_is_in_the_repository():
    """The demo's guided row comes from the committed val search; a clean clone must have it
    (it was once hidden by a `phantom/` ignore pattern)."""
    from anomorph.benchmark.demo import _configs, best_guided_on_val

    folder = _configs().parent / "benchmarks" / "results" / "phantom" / "selection"
    assert (folder / "chosen.json").is_file() and (folder / "search.csv").is_file()
    strategy, values = best_guided_on_val()
    assert values, "the demo fell back to config defaults"


#: tto_matched's fingerprint in the phantom benchmark's metrics.json (context.setup) of the run
#: that produced the README numbers: it must not change when guidance_from learns new cases
TTO_MATCHED_SETUP = ('{"chosen": {"guidance": {"map_lambda": 0.1, "softness": 1.0, "threshold": 6.0}, "train": null}, '
                     '"config": null, "estimator": "residual_z", "guidance": {}, "guidance_from": "cost_masking", '
                     '"kind": "guided", "mode": "deviation", "name": "tto_matched", "oracle_guided": false, '
                     '"overrides": [], "run": "morphaeus", "strategy": "tto"}')


def test_guidance_from_keeps_the_estimator_of_a_masked_strategy_and_the_rows_own_values():
    from anomorph.benchmark.runner import chosen_values, seed_setup

    chosen = {"cost_masking": {"estimator": "warped_residual", "map_lambda": 0.1, "threshold": 6.0, "map_steps": 30}}
    fast = MethodSpec("cost_masking_fast", "guided", run="morphaeus", strategy="cost_masking",
                      guidance_from="cost_masking", guidance={"map_steps": 10})
    # cost masking cuts its mask from u: the chosen estimator is part of what was chosen
    assert chosen_values(fast, chosen) == {"estimator": "warped_residual", "map_lambda": 0.1, "threshold": 6.0}
    matched = MethodSpec("tto_matched", "guided", run="morphaeus", strategy="tto", guidance_from="cost_masking")
    assert chosen_values(matched, chosen) == {"map_lambda": 0.1, "threshold": 6.0, "map_steps": 30}
    # the shipped config with the committed val choices: tto_matched's fingerprint is unchanged
    config = load_benchmark_config("benchmarks/phantom.yaml")
    committed = json.loads(Path("benchmarks/results/phantom/selection/chosen.json").read_text())
    phantom = next(d for d in config.datasets if d.name == "phantom")
    assert seed_setup(config, phantom, committed)["tto_matched"] == TTO_MATCHED_SETUP


def test_a_guidance_from_row_reaches_the_detector_with_its_own_steps(tiny_calibrated_run, tiny_phantom):
    """A row like ``{name: cost_masking_fast, strategy: cost_masking, guidance_from: cost_masking,
    guidance: {map_steps: N}}``, built as the benchmark builds it: cost masking's val-chosen values
    (estimator included) and the row's own map_steps, and the loop really runs that many steps.
    (The committed val check chose no such N; the row is not in phantom.yaml.)"""
    from anomorph.benchmark.runner import chosen_values, guided_scorers
    from anomorph.data.slices import SliceConfig
    from anomorph.evaluation.evaluate import EvaluationData
    from anomorph.runs import load_run

    config = load_benchmark_config("benchmarks/phantom.yaml")
    full = next(m for m in config.methods if m.name == "cost_masking")
    steps = 3
    fast = MethodSpec("cost_masking_fast", "guided", run="morphaeus", strategy="cost_masking",
                      guidance_from="cost_masking", guidance={"map_steps": steps})
    chosen = {"cost_masking": {"estimator": "warped_residual", "threshold": 6.0, "softness": 1.0, "map_lambda": 0.1,
                               "map_steps": 30}}
    data = EvaluationData.load(tiny_phantom, SliceConfig.from_config(load_run(tiny_calibrated_run)[1].data), 0.5)
    scorers = {m.name: guided_scorers(m, tiny_calibrated_run, data, 0, chosen_values(m, chosen))[0]
               for m in (fast, full)}
    for name, scorer in scorers.items():
        g = scorer.guidance
        assert (g.strategy, g.threshold, g.softness, g.map_lambda) == ("cost_masking", 6.0, 1.0, 0.1)
        assert scorer.estimator_model.name == "warped_residual"
    assert scorers["cost_masking_fast"].guidance.map_steps == steps
    assert scorers["cost_masking"].guidance.map_steps == 30
    images, brains = data.test.images[:4], data.test.brain_masks[:4]
    calls: dict[str, int] = {}
    maps = {}
    for name, detector in scorers.items():
        impl = detector.scorer.strategy_impl
        objective = impl.objective

        def counted(*args, name=name, objective=objective, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return objective(*args, **kwargs)

        impl.objective = counted
        maps[name] = detector(images, brains).anomaly_map
    # one objective per Adam step, plus the final evaluation at the optimised v
    assert calls == {"cost_masking_fast": steps + 1, "cost_masking": 31}
    assert float((maps["cost_masking_fast"] - maps["cost_masking"]).abs().max()) > 1e-6


def test_the_committed_steps_check_follows_its_rule():
    """benchmarks/results/speed/tto_steps_val.json: every row's verdict is the docstring's rule
    applied to its numbers, and the chosen steps are the fewest passing ones."""
    result = json.loads(Path("benchmarks/results/speed/tto_steps_val.json").read_text())
    rule = result["rule"]
    for row in result["rows"]:
        paired = row["paired_per_subject"]
        expected = row["map_steps"] == result["reference_steps"] or (
            row["pooled_auprc_difference_mean"] >= rule["pooled_auprc_difference_mean_min"]
            and paired["mean"] >= rule["paired_mean_min"] and paired["ci_low"] >= rule["paired_ci_low_min"])
        assert row["passes"] == expected, row["map_steps"]
        assert paired["n"] == 4 * len(result["seeds"])  # the lesion val subjects of every seed
    assert result["chosen_steps"] == min(r["map_steps"] for r in result["rows"] if r["passes"])
    assert not any("test" in key for seed in result["per_seed"].values()
                   for step in seed["steps"].values() for key in step["per_subject_auprc"])


def test_guidance_from_copies_another_rows_choices_without_its_estimator(tmp_path):
    from anomorph.benchmark.runner import chosen_values, method_setup

    matched = MethodSpec("tto_matched", "guided", run="morphaeus", strategy="tto", guidance_from="cost_masking")
    chosen = {"cost_masking": {"estimator": "warped_residual", "map_lambda": 0.1, "threshold": 6.0},
              "tto": {"map_lambda": 1.0}}
    assert chosen_values(matched, chosen) == {"map_lambda": 0.1, "threshold": 6.0}
    assert chosen_values(MethodSpec("tto", "guided", run="morphaeus", strategy="tto"), chosen) == {"map_lambda": 1.0}
    # an unused optional field does not change a row's fingerprint (cached results stay valid)
    config = _selection_config(tmp_path)
    plain = MethodSpec("tto", "guided", run="morphaeus", strategy="tto")
    assert "guidance_from" not in method_setup(config, plain) and "guidance_from" in method_setup(config, matched)
    path = tmp_path / "bad.yaml"
    path.write_text("datasets: [{name: d, manifest: m.csv}]\nmethods:\n"
                    "  - {name: t, kind: guided, run: t, strategy: tto, guidance_from: nowhere}\n")
    with pytest.raises(ConfigError, match="guidance_from 'nowhere'"):
        load_benchmark_config(path)


def test_uncertainty_quality_spec_reads_its_own_ensemble_directory(tiny_phantom, tiny_calibrated_run, tmp_path):
    """``{name: ensemble, options: {run_dir: ENSEMBLE}}`` scores the val-chosen run with u from
    ENSEMBLE's members (it once collided with the scored run's directory: TypeError)."""
    import torch
    import yaml

    from anomorph.benchmark.uncertainty_quality import spec_source
    from anomorph.scoring.sources import uncertainty_source
    from anomorph.training import fit, load_run
    from conftest import tiny_run_config

    second = fit(tiny_run_config(tiny_phantom, max_epochs=1), run_dir=tmp_path / "second")
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    (ensemble / "ensemble.yaml").write_text(yaml.safe_dump({"members": [str(tiny_calibrated_run), str(second)]}))
    network, _ = load_run(tiny_calibrated_run)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 32, 32, generator=generator)
    brains = torch.ones(6, 1, 32, 32)
    spec = {"name": "ensemble", "options": {"run_dir": str(ensemble)}}
    got = spec_source(spec, network, images[:4], brains[:4], 0, tiny_calibrated_run)(network, images[4:], brains[4:])
    direct, _ = uncertainty_source("ensemble", network, images[:4], brains[:4], True, 0, "pixel", ensemble)
    want = direct(network, images[4:], brains[4:])
    assert torch.allclose(got.score, want.score) and torch.allclose(got.uncertainty, want.uncertainty)
    assert float(got.uncertainty.max()) > 0  # two different members: a spread
    with pytest.raises(ConfigError, match="ensemble"):  # the scored run itself is no ensemble
        spec_source({"name": "ensemble"}, network, images[:4], brains[:4], 0, tiny_calibrated_run)


def test_guided_targets_takes_the_row_that_met_min_lpr_on_val_before_the_best_auprc(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("guided_targets", Path("scripts/guided_targets.py"))
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    selection = tmp_path / "selection"
    selection.mkdir()
    with open(selection / "search.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "run", "params", "pixel_auprc", "min_kind_lpr", "chosen"])
        writer.writeheader()
        for method, auprc, lpr, chosen in (("gating", 0.43, 0.96, True), ("gating", 0.47, 0.9, False),
                                           ("cost_masking", 0.52, 0.9, True), ("tto", 0.60, 0.8, True),
                                           ("aware", 0.50, 0.97, True), ("aware", 0.55, 0.90, False),
                                           ("aware_control", 0.70, 0.99, True)):
            writer.writerow({"method": method, "run": "default", "params": "{}", "pixel_auprc": auprc,
                             "min_kind_lpr": lpr, "chosen": chosen})
    chosen = {"criterion": "pixel_auprc", "guidance": {"gating": {}, "cost_masking": {}, "tto": {}},
              "setup": json.dumps({"selection": {"min_lpr": 0.95}})}
    (selection / "chosen.json").write_text(json.dumps(chosen))
    # trained rows count only when named; their val LPR is read from the row (0.97 ≥ 0.95)
    assert targets.best_real_u_row(selection, ["aware", "cost_masking"]) == ("aware", 0.50)
    chosen["setup"] = json.dumps({"selection": {}})  # no min_lpr: the best val AUPRC of the candidates
    (selection / "chosen.json").write_text(json.dumps(chosen))
    assert targets.best_real_u_row(selection, ["aware", "cost_masking"]) == ("cost_masking", 0.52)
    assert targets.best_real_u_row(selection) == ("cost_masking", 0.52)  # the control tto never counts
    chosen["meets_min_lpr"] = {"gating": True, "cost_masking": False, "tto": False}
    (selection / "chosen.json").write_text(json.dumps(chosen))
    assert targets.best_real_u_row(selection) == ("gating", 0.43)


def test_a_teacher_row_is_trained_with_the_run_of_its_teacher_for_the_same_seed_and_data(tmp_path):
    """``teacher: morphaeus``: the val search's run and every seed's run get the unguided run of
    the same seed (and dataset) as their frozen teacher; config errors name the row."""
    import yaml

    phantom = {"size": 32, "n_slices": 4, "n_train": 4, "n_val_healthy": 2, "n_val_lesion": 2, "n_test": 2,
               "n_test_healthy": 1}
    distilled = ["train.synthetic_anomalies=true", "guidance.alpha=0.0", "guidance.anchor_weight=0.0"]
    config = BenchmarkConfig(
        name="tiny", output_dir=str(tmp_path / "bench"), seeds=[0, 1], report_seeds=[], calibration_fraction=0.5,
        datasets=[DatasetSpec("tiny", str(tmp_path / "data" / "seed{seed}" / "manifest.csv"), phantom)],
        methods=[MethodSpec("morphaeus", "train", config="configs/morphaeus.yaml"),
                 MethodSpec("distilled", "train", config="configs/morphaeus.yaml", overrides=distilled,
                            teacher="morphaeus")],
        overrides=TINY,
        selection={"seed": 0, "criterion": "pixel_auprc", "train_grid": {
            "morphaeus": {"train.beta_end": [0.1]}, "distilled": {"train.field_consistency_weight": [1.0, 10.0]}}})
    run_benchmark(config)
    root = tmp_path / "bench" / "tiny"

    def teacher_of(run: Path) -> str:
        return yaml.safe_load((run / "config.yaml").read_text())["train"]["consistency_teacher_run"]

    search_teacher = root / "selection" / "morphaeus" / "beta_end=0.1"
    assert {teacher_of(root / "selection" / "distilled" / w) for w in
            ("field_consistency_weight=1.0", "field_consistency_weight=10.0")} == {str(search_teacher)}
    assert teacher_of(root / "distilled" / "seed1") == str(root / "morphaeus" / "seed1")
    assert yaml.safe_load((root / "morphaeus" / "seed1" / "config.yaml").read_text())["train"].get(
        "consistency_teacher_run") is None
    seed1 = json.loads((root / "seed1" / "metrics.json").read_text())
    assert set(seed1["methods"]) >= {"morphaeus", "distilled"}

    # a teacher with two training values in the search cannot be one run
    config.selection["train_grid"]["morphaeus"]["train.beta_end"] = [0.1, 1.0]
    (root / "selection" / "chosen.json").unlink()
    with pytest.raises(ConfigError, match=r"selection\.train_grid\.morphaeus: the teacher of 'distilled'"):
        run_benchmark(config)


@pytest.mark.parametrize("methods", [
    "  - {name: s, kind: train, config: configs/morphaeus.yaml, teacher: t}\n"
    "  - {name: t, kind: train, config: configs/morphaeus.yaml}\n",
    "  - {name: t, kind: train, config: configs/morphaeus.yaml}\n"
    "  - {name: s, kind: guided, run: t, strategy: gating, teacher: t}\n",
])
def test_a_teacher_must_be_an_earlier_trained_row(tmp_path, methods):
    path = tmp_path / "b.yaml"
    path.write_text("name: b\noutput_dir: out\ndatasets:\n  - {name: d, manifest: m.csv}\nmethods:\n" + methods)
    with pytest.raises(ConfigError, match="teacher 't' must name a kind 'train' method listed before it"):
        load_benchmark_config(path)
