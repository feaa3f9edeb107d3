"""The bookkeeping of benchmarks/end_to_end.py and benchmarks/thread_setup.py (no timing asserted),
and of the analysis scripts rim_residual.py and field_terms.py."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str, folder: Path = BENCHMARKS):
    spec = importlib.util.spec_from_file_location(f"{folder.name}_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_epoch_timer_splits_wall_time_into_batches_data_validation_and_rest():
    e2e = load("end_to_end")
    timer = e2e.EpochTimer()
    clock = Clock()
    timer._now = clock
    for epoch in range(2):
        clock.t = 100.0 * epoch
        timer.on_train_epoch_start(None, None)
        for _ in range(3):
            clock.t += 0.5                       # data fetch
            timer.on_train_batch_start(None, None, None, 0)
            clock.t += 2.0                       # step
            timer.on_train_batch_end(None, None, None, [0] * 4, 0)
        clock.t += 1.0
        timer.on_validation_epoch_start(None, None)
        clock.t += 3.0
        timer.on_validation_epoch_end(None, None)
        clock.t += 0.25                          # checkpoints, logs
    timer.on_train_end(None, None)
    rows = timer.summary()
    assert len(rows) == 2
    last = rows[1]
    assert last["wall_s"] == 3 * 2.5 + 1.0 + 3.0 + 0.25
    assert (last["batches_s"], last["data_s"], last["validation_s"]) == (6.0, 1.5, 3.0)
    assert last["other_s"] == 1.25 and last["images"] == 12 and last["steps"] == 3


def test_thread_setup_table_and_ratios():
    setup = load("thread_setup")
    row = {"images_per_s": 10.0, "steps_per_min": 37.5, "torch_threads": 2, "omp_wait_policy": "PASSIVE"}
    results = {"settings": {"model": "ae", "size": 64, "batch_size": 16},
               "load_average": {"start": [1, 1, 1], "end": [1, 1, 1]},
               "rows": {"idle/without": {**row, "omp_wait_policy": None, "images_per_s": 5.0}, "idle/with": row,
                        "busy/without": {**row, "omp_wait_policy": None, "images_per_s": 1.0},
                        "busy/with": {**row, "images_per_s": 8.0}},
               "ratios": {"busy_with_vs_without": 8.0, "idle_with_vs_without": 2.0, "with_busy_vs_idle": 0.8,
                          "without_busy_vs_idle": 0.2}}
    table = setup.format_table(results)
    assert "| 1 spinner | with | 2 | PASSIVE | unset | 8.00 |" in table
    assert "| none | without | 2 | unset | unset | 5.00 |" in table
    assert "busy: with / without = 8.00x" in table
    # spin-count rows: their GOMP_SPINCOUNT column and their busy / idle ratio
    results["rows"].update({"idle/spin=10000": {**row, "gomp_spincount": "10000", "images_per_s": 9.0},
                            "busy/spin=10000": {**row, "gomp_spincount": "10000", "images_per_s": 3.0}})
    results["ratios"]["spin=10000_busy_vs_idle"] = 3.0 / 9.0
    table = setup.format_table(results)
    assert "| 1 spinner | spin=10000 | 2 | PASSIVE | 10000 | 3.00 |" in table and "spin=10000 0.33" in table


def test_end_to_end_tables_have_guided_predict_ratios_and_evaluate_rows():
    e2e = load("end_to_end")
    results = {
        "environment": {"torch": "x", "threads": 2, "omp_wait_policy": "PASSIVE"},
        "load_average": {"start": [1, 1, 1], "end": [2, 2, 2]},
        "fit": [],
        "predict": [{"model": "morphaeus (128²)", "scan_shape": [128, 128, 12], "strategy": "unguided",
                     "seconds_per_scan": 2.0, "scans_per_min": 30.0, "vs_unguided": 1.0,
                     "vs_unguided_min": 1.0, "vs_unguided_max": 1.0},
                    {"model": "morphaeus (128²)", "scan_shape": [128, 128, 12], "strategy": "map",
                     "seconds_per_scan": 8.0, "scans_per_min": 7.5, "vs_unguided": 4.0,
                     "vs_unguided_min": 3.5, "vs_unguided_max": 4.5}],
        "evaluate": [{"model": "ae", "size": 64, "test_slices": 48, "seconds": 2.0, "slices_per_s": 24.0}],
        "stages_s": {"fit": 1.0},
    }
    table = e2e.format_tables(results)
    assert "| morphaeus (128²) | 128×128×12 | map | 8.00 | 7.5 | 4.00x [3.50–4.50] |" in table
    assert "| ae | 64² | 48 | 2.00 | 24.0 |" in table
    assert "conditioned" not in e2e.guided_strategies()          # needs a model trained for it
    assert {"none", "gating", "map", "cost_masking", "tto", "iterative"} <= set(e2e.guided_strategies())
    args = e2e.parse_args(["--strategies", "map"])
    assert args.strategies == ["none", "map"]                    # the unguided reference is always timed


def test_end_to_end_strategies_take_guidance_overrides():
    import pytest

    e2e = load("end_to_end")
    assert e2e.strategy_spec("cost_masking") == ("cost_masking", {})
    assert e2e.strategy_spec("cost_masking:map_steps=10,estimator=warped_residual,map_lambda=0.1") == (
        "cost_masking", {"map_steps": 10, "estimator": "warped_residual", "map_lambda": 0.1})
    with pytest.raises(ValueError, match="unknown guidance key"):
        e2e.strategy_spec("cost_masking:steps=10")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        e2e.strategy_spec("cost_masking:10")
    args = e2e.parse_args(["--strategies", "cost_masking", "cost_masking:map_steps=10"])
    assert args.strategies == ["none", "cost_masking", "cost_masking:map_steps=10"]
    with pytest.raises(SystemExit):
        e2e.parse_args(["--strategies", "warp_speed:map_steps=10"])
    assert e2e._folder("cost_masking:map_steps=10,threshold=6") == "cost_masking_map_steps_10_threshold_6"


def test_rim_residual_bands_match_a_brute_force_distance():
    import math

    import numpy as np

    rim = load("rim_residual", SCRIPTS)
    lesion = np.zeros((1, 24, 24), bool)
    lesion[0, 10:13, 10:13] = True
    brain = np.ones((1, 24, 24))
    values = np.random.default_rng(0).random((1, 24, 24))
    healthy = np.random.default_rng(1).random((1, 24, 24))
    got = rim.band_means(np.concatenate([values, healthy]), np.concatenate([lesion, np.zeros_like(lesion)]),
                         np.concatenate([brain, brain]))
    points = np.argwhere(lesion[0])
    expected = {name: [0.0, 0] for name, _, _ in rim.BANDS}
    for (i, j), v in np.ndenumerate(values[0]):
        d = min(math.dist((i, j), p) for p in points)
        for name, low, high in rim.BANDS:
            if (low is None and d == 0) or (low is not None and low < d <= high):
                expected[name][0] += v
                expected[name][1] += 1
    for name, (total, count) in expected.items():
        assert got[name][1] == count and got[name][0] == pytest.approx(total)
    assert got["no lesion on the slice"] == (pytest.approx(float(healthy.sum())), 24 * 24)


def test_field_terms_reads_the_last_logged_value_of_each_epoch_and_finds_finished_runs(tmp_path):
    """Synthetic Lightning CSV rows: the last value per term, one value per epoch (the last
    logged), missing terms as None; only runs with a ``done`` marker are listed, the val
    search's first; the figure shows every search run and the selection seed's run of rows
    that had no search."""
    terms = load("field_terms", SCRIPTS)
    rows = [{"epoch": "0", "val/smooth": "0.5", "val/residual": ""},
            {"epoch": "0", "val/smooth": "0.25", "train/consistency_epoch": ""},
            {"epoch": "1", "val/smooth": "0.125", "val/residual": "0.07"},
            {"epoch": "1", "train/consistency_epoch": "1e-4"}]
    assert terms.last_values(rows) == {"val/smooth": 0.125, "val/residual": 0.07, "val/ncc": None,
                                       "train/consistency_epoch": 1e-4}
    assert terms.per_epoch(rows, "val/smooth") == ([0, 1], [0.25, 0.125])
    for path in ("phantom/selection/tied/w=1", "phantom/selection/tied/w=10", "phantom/tied/seed1",
                 "phantom/control/seed0", "phantom/control/seed1", "phantom/selection/tied/unfinished"):
        (tmp_path / path).mkdir(parents=True)
        if not path.endswith("unfinished"):
            (tmp_path / path / "done").write_text("finished\n")
    found = [(row, label) for row, label, _ in terms.runs_of(tmp_path, "phantom", [0, 1, 2])]
    assert found == [("tied", "val search: w=1"), ("tied", "val search: w=10"), ("control", "seed 0"),
                     ("control", "seed 1"), ("tied", "seed 1")]
    assert terms.curves_to_plot(terms.runs_of(tmp_path, "phantom", [0, 1]), 0) == {
        ("tied", "val search: w=1"), ("tied", "val search: w=10"), ("control", "seed 0")}


def test_field_terms_averages_the_overall_displacement_rows_over_seeds(tmp_path):
    """Brute force on two synthetic seeds: only ``overall`` rows count, NaN rows (no field) are
    left out, a method present in one seed is averaged over that seed only."""
    terms = load("field_terms", SCRIPTS)
    header = "method,group_kind,group,mean_displacement_lesion,mean_displacement_healthy\n"
    seed0 = header + ("a,overall,all,0.6,0.4\na,lesion_type,large,9,9\nb,overall,all,0.3,0.3\n"
                      "oracle,overall,all,nan,nan\n")
    seed1 = header + "a,overall,all,0.4,0.2\n"
    for seed, text in ((0, seed0), (1, seed1)):
        (tmp_path / "phantom" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "phantom" / f"seed{seed}" / "metrics.csv").write_text(text)
    rows = terms.displacement_rows(tmp_path, "phantom", [0, 1, 2])
    assert [(m, n) for m, _, _, n in rows] == [("a", 2), ("b", 1)]
    assert rows[0][1:3] == pytest.approx((0.5, 0.3)) and rows[1][1:3] == pytest.approx((0.3, 0.3))


def test_u_quality_splits_puts_each_estimators_val_and_test_rows_side_by_side():
    splits = load("u_quality_splits", SCRIPTS)

    def row(estimator, group, auroc, auprc, alarms=None):
        return {"estimator": estimator, "group": group, "u_auroc": auroc, "u_auprc": auprc,
                "healthy_false_alarm": alarms}

    rows = {"val": [row("a", "overall", 0.9, 0.5, 0.01), row("a", "csf_like", 0.95, 0.7),
                    row("b", "overall", 0.8, 0.4, 0.02), row("b", "large", 0.7, 0.3)],
            "test": [row("a", "overall", 0.7, 0.1, 0.03), row("a", "csf_like", 0.6, 0.05),
                     row("b", "overall", 0.75, 0.2, 0.02)]}
    lines = splits.split_table(rows)
    assert lines[0] == ("| estimator | split | u AUROC | u AUPRC | healthy false alarms | "
                        "u AUROC / AUPRC: csf_like | u AUROC / AUPRC: large |")
    assert lines[2:] == ["| a | val | 0.900 | 0.500 | 0.010 | 0.950 / 0.700 | — |",
                         "| a | test | 0.700 | 0.100 | 0.030 | 0.600 / 0.050 | — |",
                         "| b | val | 0.800 | 0.400 | 0.020 | — | 0.700 / 0.300 |",
                         "| b | test | 0.750 | 0.200 | 0.020 | — | — |"]


def test_u_quality_splits_ties_only_the_field_disagreement_specs_to_the_seeds_run():
    splits = load("u_quality_splits", SCRIPTS)
    specs = [{"name": "warped_residual"},
             {"name": "field_disagreement", "options": {"tied_run": "runs/seed0/distilled", "seed": 3}}]
    tied = splits.with_tied_run(specs, "runs/seed1/distilled")
    assert tied[0] == {"name": "warped_residual"}
    assert tied[1] == {"name": "field_disagreement", "options": {"tied_run": "runs/seed1/distilled", "seed": 3}}
    assert specs[1]["options"]["tied_run"] == "runs/seed0/distilled"  # the yaml's specs are not changed
    assert splits.with_tied_run(specs, None) is specs
