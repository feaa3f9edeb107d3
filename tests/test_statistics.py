"""Paired bootstrap statistics against brute-force reference loops (fixed seeds)."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from anomorph.benchmark.statistics import paired_bootstrap, paired_table


def reference_bootstrap(values, groups, n_resamples, confidence, seed):
    """Plain-Python loop over resamples with the documented draws: groups in np.unique order,
    rng.integers(0, n_g, (n_resamples, n_g)) per group; resample mean over all n subjects."""
    values = [float(v) for v in values]
    labels = [0] * len(values) if groups is None else list(groups)
    members = {g: [v for v, label in zip(values, labels) if label == g] for g in np.unique(labels).tolist()}
    rng = np.random.default_rng(seed)
    draws = {g: rng.integers(0, len(m), size=(n_resamples, len(m))) for g, m in members.items()}
    means = []
    for r in range(n_resamples):
        total, count = 0.0, 0
        for g, m in members.items():
            for position in draws[g][r]:
                total += m[int(position)]
                count += 1
        assert count == len(values)  # every resample keeps every group's size
        means.append(total / count)
    means.sort()

    def quantile(q):  # numpy's default "linear" method, written out
        h = (len(means) - 1) * q
        lo = math.floor(h)
        return means[lo] + (h - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])

    alpha = 1 - confidence
    return (sum(values) / len(values), quantile(alpha / 2), quantile(1 - alpha / 2),
            sum(m > 0 for m in means) / n_resamples)


def test_constant_differences_collapse_the_interval():
    result = paired_bootstrap(np.full(30, 0.125), n_resamples=2000)
    assert result["mean"] == result["ci_low"] == result["ci_high"] == pytest.approx(0.125, abs=1e-15)
    assert result["p_positive"] == 1.0 and result["n"] == 30 and result["n_dropped"] == 0
    negative = paired_bootstrap(np.full(5, -2.0), groups=[0, 0, 1, 1, 1], n_resamples=500)
    assert negative["ci_low"] == negative["ci_high"] == pytest.approx(-2.0) and negative["p_positive"] == 0.0


@pytest.mark.parametrize("stratified", [False, True])
def test_matches_a_brute_force_loop_with_the_same_draws(stratified):
    rng = np.random.default_rng(5)
    values = rng.normal(0.02, 0.1, 23)
    groups = rng.integers(0, 3, 23) if stratified else None
    result = paired_bootstrap(values, groups, n_resamples=400, confidence=0.9, seed=11)
    mean, low, high, p_positive = reference_bootstrap(values, groups, 400, 0.9, 11)
    assert result["mean"] == pytest.approx(mean, rel=1e-12)
    assert result["ci_low"] == pytest.approx(low, rel=1e-12, abs=1e-15)
    assert result["ci_high"] == pytest.approx(high, rel=1e-12, abs=1e-15)
    assert result["p_positive"] == p_positive
    assert result["n_groups"] == (3 if stratified else 1)
    assert result["ci_low"] < result["mean"] < result["ci_high"]


def test_stratification_keeps_group_sizes_and_narrows_the_interval():
    """Two seeds whose differences sit around 0 and 1: resampling across seeds lets the
    seed mix vary (wide interval); within seeds the mix is fixed at 20/20 (narrow)."""
    rng = np.random.default_rng(6)
    values = np.concatenate([rng.normal(0.0, 0.05, 20), rng.normal(1.0, 0.05, 20)])
    groups = ["seed0"] * 20 + ["seed1"] * 20
    plain = paired_bootstrap(values, n_resamples=4000, seed=1)
    stratified = paired_bootstrap(values, groups, n_resamples=4000, seed=1)
    assert plain["mean"] == stratified["mean"] == pytest.approx(values.mean())
    width_plain = plain["ci_high"] - plain["ci_low"]
    width_stratified = stratified["ci_high"] - stratified["ci_low"]
    assert width_stratified < 0.25 * width_plain
    # analytic check: stratified resample mean = (mean_0* + mean_1*) / 2 with fixed halves,
    # sd ≈ sqrt(0.05² / 20 / 4 · 2) ≈ 0.0079, so the 95 % width ≈ 2·1.96·0.0079 ≈ 0.031
    assert width_stratified == pytest.approx(2 * 1.96 * math.sqrt(2 * 0.05**2 / 20 / 4), rel=0.25)
    # and exactly the brute-force loop, which asserts the group sizes of every resample
    _, low, high, _ = reference_bootstrap(values, groups, 300, 0.95, 2)
    small = paired_bootstrap(values, groups, n_resamples=300, seed=2)
    assert (small["ci_low"], small["ci_high"]) == (pytest.approx(low), pytest.approx(high))


def test_nan_differences_are_dropped_and_counted():
    values = np.array([0.1, np.nan, 0.3, 0.2, np.nan, 0.4])
    groups = np.array([0, 0, 1, 1, 1, 0])
    result = paired_bootstrap(values, groups, n_resamples=300, seed=4)
    assert result["n"] == 4 and result["n_dropped"] == 2
    clean = paired_bootstrap(values[~np.isnan(values)], groups[~np.isnan(values)], n_resamples=300, seed=4)
    assert {k: result[k] for k in ("mean", "ci_low", "ci_high", "p_positive")} == {
        k: clean[k] for k in ("mean", "ci_low", "ci_high", "p_positive")}
    assert result["mean"] == pytest.approx(0.25)
    one = paired_bootstrap([np.nan, 0.5, np.nan])
    assert one["ci_low"] is None and one["ci_high"] is None and one["mean"] == 0.5
    assert one["n"] == 1 and one["n_dropped"] == 2 and "at least 2" in one["reason"]
    none = paired_bootstrap([])
    assert none["mean"] is None and none["ci_low"] is None and none["reason"]


def test_deterministic_given_the_seed_and_fast():
    values = np.random.default_rng(7).normal(0.01, 0.05, 50)
    start = time.perf_counter()
    first = paired_bootstrap(values, n_resamples=10000, seed=3)
    elapsed = time.perf_counter() - start
    assert first == paired_bootstrap(values, n_resamples=10000, seed=3)
    assert first["ci_low"] != paired_bootstrap(values, n_resamples=10000, seed=4)["ci_low"]
    assert elapsed < 0.5, f"10 000 resamples of 50 values took {elapsed:.2f} s"
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(values, confidence=1.0)
    with pytest.raises(ValueError, match="groups"):
        paired_bootstrap(values, groups=[0, 1])


def test_paired_table_rows_are_bootstraps_of_b_minus_a():
    rng = np.random.default_rng(8)
    a, b = {}, {}
    for seed in range(2):
        for subject in range(6):
            key = f"seed{seed}/sub-{subject:02d}"
            kind = "bright" if subject % 2 else "dark"
            value = float(rng.random())
            a[key] = {"lesion_type": kind, "dice": value}
            b[key] = {"lesion_type": kind, "dice": value + 0.1 * (1 + seed) + (0.05 if kind == "dark" else 0.0)}
    rows = paired_table(a, b, "dice", n_resamples=500, seed=9)
    assert [row["group"] for row in rows] == ["overall", "bright", "dark"]
    keys = sorted(a)
    diffs = np.array([b[k]["dice"] - a[k]["dice"] for k in keys])
    dark = np.array([a[k]["lesion_type"] == "dark" for k in keys])
    assert rows[0] == {"group": "overall", "by": "lesion_type", "metric": "dice",
                       **paired_bootstrap(diffs, n_resamples=500, seed=9)}
    assert rows[2]["mean"] == pytest.approx(diffs[dark].mean()) and rows[2]["n"] == 6
    assert rows[1]["mean"] == pytest.approx(0.15) and rows[2]["mean"] == pytest.approx(0.20)
    seeds = [k.split("/")[0] for k in keys]
    by_seed = paired_table(a, b, "dice", stratify=lambda key: key.split("/")[0], n_resamples=500, seed=9)
    assert by_seed[0]["ci_low"] == paired_bootstrap(diffs, seeds, n_resamples=500, seed=9)["ci_low"]
    del b["seed1/sub-05"]
    with pytest.raises(ValueError, match="keys differ"):
        paired_table(a, b, "dice")
