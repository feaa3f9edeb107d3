"""Tests of anomorph.evaluation.metrics against sklearn and brute force (fresh data, fixed seeds)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from anomorph.evaluation import (
    MetricAccumulator,
    ScoreHistogram,
    UndefinedMetric,
    assign_size_bin,
    dice_at_threshold,
    folding_fraction,
    folding_terms,
    fpr_at_95_tpr,
    healthy_residual_reduction,
    healthy_residual_terms,
    lesion_preservation_ratio,
    lesion_preservation_terms,
    mean_displacement_inside_outside,
    oracle_best_dice,
    pixel_auprc,
    pixel_auroc,
    size_tertile_edges,
    slice_auprc,
    slice_auroc,
    slice_scores,
    threshold_at_fpr,
    threshold_max_dice,
)
from anomorph.evaluation.metrics import displacement_folding_fraction
from anomorph.networks.deformation import jacobian_determinant


def _separable(rng: np.random.Generator, n: int, positive_rate: float = 0.1, dtype=np.float64):
    labels = rng.random(n) < positive_rate
    scores = np.where(labels, rng.beta(5, 2, n), rng.beta(2, 5, n)).astype(dtype)
    return scores, labels


# ------------------------------------------------------------------ AUROC / AUPRC
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_auroc_auprc_match_sklearn_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n = 20_000
    labels = rng.random(n) < 0.2
    # scores on a coarse grid: thousands of ties, shifted for positives
    scores = np.round(rng.normal(size=n) + 0.8 * labels, 1)
    assert np.unique(scores).size < 200
    assert abs(pixel_auroc(scores, labels) - roc_auc_score(labels, scores)) < 1e-9
    assert abs(pixel_auprc(scores, labels) - average_precision_score(labels, scores)) < 1e-9


def test_exact_auroc_auprc_match_sklearn_continuous_float32():
    rng = np.random.default_rng(3)
    scores, labels = _separable(rng, 50_000, dtype=np.float32)
    assert abs(pixel_auroc(scores, labels) - roc_auc_score(labels, scores)) < 1e-9
    assert abs(pixel_auprc(scores, labels) - average_precision_score(labels, scores)) < 1e-9


def test_binned_matches_sklearn_on_1m_pixels_within_documented_tolerance():
    rng = np.random.default_rng(4)
    scores, labels = _separable(rng, 1_000_000, dtype=np.float32)
    histogram = ScoreHistogram(0.0, 1.0, 65536)
    for chunk in np.array_split(np.arange(scores.size), 7):
        histogram.update(scores[chunk], labels[chunk])
    points = histogram.operating_points()
    auroc_error = abs(points.auroc() - roc_auc_score(labels, scores))
    auprc_error = abs(points.average_precision() - average_precision_score(labels, scores))
    bound = histogram.auroc_tie_error_bound()
    print(f"binned (65536 bins, 1M px): |dAUROC|={auroc_error:.2e} (bound {bound:.2e}), |dAP|={auprc_error:.2e}")
    assert auroc_error <= bound + 1e-12
    assert bound < 1e-4
    assert auroc_error < 1e-5
    assert auprc_error < 1e-4


def test_binned_function_path_and_custom_edges_agree():
    rng = np.random.default_rng(5)
    scores, labels = _separable(rng, 200_000)
    uniform = ScoreHistogram(0.0, 1.0, 4096)
    custom = ScoreHistogram(edges=np.linspace(0.0, 1.0, 4097))
    np.testing.assert_array_equal(uniform.bin_index(scores), custom.bin_index(scores))
    # scores exactly on edges go to the bin below (right-closed bins)
    on_edges = uniform.edges[1:-1]
    np.testing.assert_array_equal(uniform.bin_index(on_edges), np.arange(4095))
    binned = pixel_auroc(scores, labels, n_bins=4096, score_range=(0.0, 1.0))
    assert abs(binned - roc_auc_score(labels, scores)) < 1e-3


# ------------------------------------------------------------------ Dice
def _brute_force_best_dice(scores, labels):
    best = (-1.0, None)
    for threshold in np.concatenate((np.unique(scores), [-np.inf])):
        predicted = scores > threshold
        dice = 2 * np.sum(predicted & labels) / (predicted.sum() + labels.sum())
        if dice > best[0]:
            best = (dice, threshold)
    return best


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_oracle_best_dice_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + 0.5 * labels, 2)
    dice, threshold = oracle_best_dice(scores, labels)
    brute_dice, _ = _brute_force_best_dice(scores, labels)
    assert dice == pytest.approx(brute_dice, abs=1e-12)
    # the returned threshold reproduces the best Dice under "score > threshold"
    assert dice_at_threshold(scores, labels, threshold) == pytest.approx(dice, abs=1e-12)
    assert threshold_max_dice(scores, labels) == threshold


def test_binned_best_dice_threshold_is_consistent():
    rng = np.random.default_rng(9)
    scores, labels = _separable(rng, 100_000)
    histogram = ScoreHistogram(0.0, 1.0, 1024)
    histogram.update(scores, labels)
    dice, threshold = histogram.operating_points().best_dice()
    assert dice_at_threshold(scores, labels, threshold) == pytest.approx(dice, abs=1e-12)
    exact_dice, _ = oracle_best_dice(scores, labels)
    assert dice <= exact_dice + 1e-12
    assert exact_dice - dice < 1e-3


def test_dice_at_threshold_manual_formula():
    rng = np.random.default_rng(10)
    scores, labels = _separable(rng, 5000)
    threshold = 0.6
    predicted = scores > threshold
    tp = np.sum(predicted & labels)
    fp = np.sum(predicted & ~labels)
    fn = np.sum(~predicted & labels)
    assert dice_at_threshold(scores, labels, threshold) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-15)
    # ties at the threshold are negative
    assert dice_at_threshold(np.array([0.5, 0.5]), np.array([1, 1]), 0.5) == 0.0


@pytest.mark.parametrize("seed", [11, 12])
def test_threshold_at_fpr_is_conservative_and_tight(seed):
    rng = np.random.default_rng(seed)
    healthy = np.round(rng.exponential(size=10_007), 2)  # many ties
    for fpr in (0.05, 0.01, 0.2):
        threshold = threshold_at_fpr(healthy, fpr)
        assert np.mean(healthy > threshold) <= fpr
        lower = healthy[healthy < threshold]
        if lower.size:  # the next lower candidate threshold would exceed the FPR
            assert np.mean(healthy > lower.max()) > fpr
    assert threshold_at_fpr(healthy, 1.0) == -math.inf
    assert threshold_at_fpr(healthy, 0.0) == healthy.max()


def test_binned_threshold_at_fpr_is_conservative_within_a_bin():
    rng = np.random.default_rng(13)
    healthy = rng.beta(2, 5, 200_000)
    histogram = ScoreHistogram(0.0, 1.0, 65536)
    histogram.update(healthy, np.zeros(healthy.size, dtype=bool))
    threshold = histogram.threshold_at_fpr(0.05)
    assert np.mean(healthy > threshold) <= 0.05
    assert abs(threshold - threshold_at_fpr(healthy, 0.05)) <= 1.0 / 65536


# ------------------------------------------------------------------ slice level
def test_slice_top1pct_reduction_matches_manual_computation():
    rng = np.random.default_rng(14)
    maps = rng.random((5, 32, 32))
    brain = rng.random((5, 1, 32, 32)) < 0.7
    brain[4] = False  # empty brain mask -> NaN
    result = slice_scores(maps, brain, "top1pct_mean")
    for index in range(4):
        inside = np.sort(maps[index][brain[index, 0]])[::-1]
        k = max(1, math.ceil(0.01 * inside.size))
        assert result[index] == pytest.approx(inside[:k].mean(), abs=1e-12)
        assert slice_scores(maps[index : index + 1], brain[index : index + 1], "mean")[0] == pytest.approx(inside.mean())
        assert slice_scores(maps[index : index + 1], brain[index : index + 1], "max")[0] == inside[0]
    assert math.isnan(result[4])
    top5 = slice_scores(maps[:1], brain[:1], "top5pct_mean")[0]
    inside = np.sort(maps[0][brain[0, 0]])[::-1]
    assert top5 == pytest.approx(inside[: math.ceil(0.05 * inside.size)].mean())
    with pytest.raises(ValueError):
        slice_scores(maps, brain, "median")


@pytest.mark.parametrize("seed", [15, 16, 17])
def test_fpr_at_95_tpr_matches_sklearn_roc_curve(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(400) < 0.4
    scores = np.round(rng.normal(size=400) + 1.5 * labels, 1)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    expected = fpr[np.argmax(tpr >= 0.95)]
    assert fpr_at_95_tpr(scores, labels) == pytest.approx(expected, abs=1e-15)
    assert slice_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert slice_auprc(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


# ------------------------------------------------------------------ deformation metrics
def test_lesion_preservation_ratio_extremes_and_value():
    rng = np.random.default_rng(18)
    x, recon = rng.random((2, 16, 16)), rng.random((2, 16, 16))
    lesion = rng.random((2, 16, 16)) < 0.2
    assert lesion_preservation_ratio(x, recon, recon, lesion) == pytest.approx(1.0)
    warped = np.where(lesion, x, recon)  # the deformation registered the lesion away
    assert lesion_preservation_ratio(x, warped, recon, lesion) == 0.0
    warped = rng.random((2, 16, 16))
    expected = np.abs(x - warped)[lesion].sum() / np.abs(x - recon)[lesion].sum()
    assert lesion_preservation_ratio(x, warped, recon, lesion) == pytest.approx(expected)


def test_healthy_residual_reduction_extremes():
    rng = np.random.default_rng(19)
    x, recon = rng.random((2, 16, 16)), rng.random((2, 16, 16))
    healthy = rng.random((2, 16, 16)) < 0.8
    assert healthy_residual_reduction(x, recon, recon, healthy) == pytest.approx(0.0)
    assert healthy_residual_reduction(x, np.where(healthy, x, recon), recon, healthy) == 1.0
    half_way = (x + recon) / 2
    assert healthy_residual_reduction(x, half_way, recon, healthy) == pytest.approx(0.5)


def test_deformation_metrics_undefined_with_reason():
    x = np.ones((1, 4, 4))
    empty = np.zeros((1, 4, 4), dtype=bool)
    value = lesion_preservation_ratio(x, x, x, empty)
    assert isinstance(value, UndefinedMetric) and math.isnan(value) and "empty" in value.reason
    value = lesion_preservation_ratio(x, x * 0, x, ~empty)  # x̂ = x: denominator 0
    assert isinstance(value, UndefinedMetric) and "denominator" in value.reason
    assert isinstance(healthy_residual_reduction(x, x, x, ~empty), UndefinedMetric)


def test_folding_fraction_on_known_jacobian():
    det = np.ones((2, 1, 10, 10))
    det[0, 0, :2, :5] = -0.5  # 10 folded
    det[1, 0, 0, 0] = 0.0  # det = 0 counts as folded
    brain = np.ones((2, 1, 10, 10), dtype=bool)
    assert folding_fraction(det, brain) == pytest.approx(11 / 200)
    brain[0, 0, :2, :] = False  # folds outside the brain do not count
    assert folding_fraction(det, brain) == pytest.approx(1 / 180)
    assert folding_fraction(det) == pytest.approx(11 / 200)


def _rows_field(values: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    """(1, D, *spatial) displacement whose channel 0 is ``values`` along axis 0, the rest 0."""
    field = np.zeros((1, len(spatial), *spatial))
    field[0, 0] = np.asarray(values, dtype=np.float64).reshape(-1, *[1] * (len(spatial) - 1))
    return field


def _brute_force_row_folds(positions: np.ndarray) -> np.ndarray:
    """Rows i of a map moving only along axis 0 (φ_0 = positions) that reverse orientation with
    a neighbour: φ(i + 1) − φ(i) ≤ 0 or φ(i) − φ(i − 1) ≤ 0, where that neighbour exists."""
    n = len(positions)
    return np.array([(i + 1 < n and positions[i + 1] - positions[i] <= 0)
                     or (i > 0 and positions[i] - positions[i - 1] <= 0) for i in range(n)])


@pytest.mark.parametrize("dims", [2, 3])
def test_displacement_folding_of_a_smooth_affine_field_is_zero(dims):
    matrix = np.eye(dims) + 0.08 * np.random.default_rng(7).uniform(-1, 1, (dims, dims))
    spatial = (9, 8, 7)[:dims]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in spatial], indexing="ij"))
    field = np.einsum("ij,j...->i...", matrix - np.eye(dims), grid)[None] + 0.3
    assert np.linalg.det(matrix) > 0
    assert displacement_folding_fraction(field) == 0.0


@pytest.mark.parametrize("spatial", [(8, 6), (6, 5, 4)])
def test_checkerboard_fold_counts_with_displacement_but_not_with_central_det(spatial):
    """Displacement +0.75/−0.75 px alternating between neighbouring rows (even count, phase so
    that the border rows are not folded): the old metric (central-difference det J) says 0,
    the one-sided criterion flags every interior row."""
    rows = np.arange(spatial[0])
    field = _rows_field(0.75 * (-1.0) ** (rows + 1), spatial)
    central = jacobian_determinant(torch.from_numpy(field)).numpy()
    assert (central > 0).all() and folding_fraction(central) == 0.0
    expected = _brute_force_row_folds(rows + field[0, 0].reshape(spatial[0], -1)[:, 0]).mean()
    assert expected == pytest.approx((spatial[0] - 2) / spatial[0])
    assert displacement_folding_fraction(field) == pytest.approx(expected)
    # a true 2D checkerboard d_0 = 0.75·(−1)^(i+j): inside the border ring det J (central) = 1,
    # yet every pixel there folds with a row neighbour
    if len(spatial) == 2:
        board = np.zeros((1, 2, 10, 10))
        board[0, 0] = 0.75 * (-1.0) ** np.add.outer(np.arange(10), np.arange(10))
        interior = np.zeros((1, 10, 10), dtype=bool)
        interior[0, 1:-1, 1:-1] = True
        det = jacobian_determinant(torch.from_numpy(board)).numpy()
        assert folding_fraction(det[:, 0], interior) == 0.0
        assert displacement_folding_fraction(board, interior) == 1.0


@pytest.mark.parametrize("spatial", [(24, 5), (24, 4, 3)])
def test_displacement_folding_of_a_band_that_flips_orientation(spatial):
    """φ_0(i) = i up to row 8, 16 − i on rows 8..14 (orientation reversed), i − 12 after."""
    rows = np.arange(spatial[0], dtype=np.float64)
    positions = np.where(rows <= 8, rows, np.where(rows <= 14, 16 - rows, rows - 12))
    field = _rows_field(positions - rows, spatial)
    folded_rows = _brute_force_row_folds(positions)
    assert folded_rows.nonzero()[0].tolist() == list(range(8, 15))
    assert displacement_folding_fraction(field) == pytest.approx(folded_rows.mean())
    brain = np.zeros(spatial, dtype=bool)
    brain[10:20] = True  # rows 10..19: 5 of its 10 rows are folded
    assert displacement_folding_fraction(field, brain[None]) == pytest.approx(5 / 10)


def test_accumulator_folding_uses_displacement_and_falls_back_to_jacobian_det():
    size = 8
    field = _rows_field(0.75 * (-1.0) ** (np.arange(size) + 1), (size, size))
    field = np.concatenate([field, np.zeros_like(field)])  # slice 1: identity
    central = jacobian_determinant(torch.from_numpy(field)).numpy()
    maps, masks = np.random.default_rng(8).random((2, 1, size, size)), np.zeros((2, 1, size, size))
    both = MetricAccumulator(exact=True)
    both.update(maps, None, masks, jacobian_det=central, displacement=field)
    assert both.compute()["folding_fraction"] == pytest.approx((size - 2) / (2 * size))
    det_only = MetricAccumulator(exact=True)
    det_only.update(maps, None, masks, jacobian_det=central)
    assert det_only.compute()["folding_fraction"] == 0.0


def test_mean_displacement_inside_outside():
    displacement = np.zeros((1, 2, 4, 4))
    displacement[0, 0, :2] = 3.0
    displacement[0, 1, :2] = 4.0  # norm 5 in the top half
    displacement[0, 0, 2:] = 1.0  # norm 1 in the bottom half
    lesion = np.zeros((1, 4, 4), dtype=bool)
    lesion[0, :2] = True
    inside, outside = mean_displacement_inside_outside(displacement, lesion, np.ones((1, 1, 4, 4)))
    assert (inside, outside) == (pytest.approx(5.0), pytest.approx(1.0))


def test_ratio_sums_accumulate_across_batches():
    rng = np.random.default_rng(20)
    x, warped, recon = rng.random((3, 8, 16, 16))
    lesion = rng.random((8, 16, 16)) < 0.2
    det = rng.normal(1.0, 0.7, (8, 16, 16))
    parts = [slice(0, 3), slice(3, 5), slice(5, 8)]
    lpr = sum((lesion_preservation_terms(x[p], warped[p], recon[p], lesion[p]) for p in parts[1:]),
              lesion_preservation_terms(x[parts[0]], warped[parts[0]], recon[parts[0]], lesion[parts[0]]))
    assert lpr.ratio() == pytest.approx(lesion_preservation_ratio(x, warped, recon, lesion))
    hrr = healthy_residual_terms(x[:4], warped[:4], recon[:4], ~lesion[:4]) + healthy_residual_terms(
        x[4:], warped[4:], recon[4:], ~lesion[4:])
    assert 1 - hrr.ratio() == pytest.approx(healthy_residual_reduction(x, warped, recon, ~lesion))
    folding = folding_terms(det[:4]) + folding_terms(det[4:])
    assert folding.ratio() == pytest.approx(folding_fraction(det))


# ------------------------------------------------------------------ sizes and undefined metrics
def test_size_tertiles():
    counts = np.array([0, 10, 20, 30, 40, 50, 60, 0])
    low, high = size_tertile_edges(counts)
    assert (low, high) == (pytest.approx(np.quantile(counts[counts > 0], 1 / 3)),
                           pytest.approx(np.quantile(counts[counts > 0], 2 / 3)))
    bins = assign_size_bin(counts, (low, high))
    assert list(bins) == ["none", "small", "small", "medium", "medium", "large", "large", "none"]
    assert assign_size_bin(28, (low, high)) == "medium"
    assert assign_size_bin(np.float64(low), (low, high)) == "small"
    assert all(math.isnan(edge) for edge in size_tertile_edges([0, 0]))


def test_undefined_metrics_return_nan_with_reason():
    scores = np.linspace(0, 1, 50)
    no_positives = np.zeros(50)
    for value in (pixel_auroc(scores, no_positives), pixel_auprc(scores, no_positives),
                  oracle_best_dice(scores, no_positives)[0], dice_at_threshold(scores, no_positives, 0.5),
                  fpr_at_95_tpr(scores, no_positives)):
        assert isinstance(value, UndefinedMetric) and math.isnan(value)
        assert "no anomalous" in value.reason
    no_negatives = np.ones(50)
    assert "no normal" in pixel_auroc(scores, no_negatives).reason
    assert pixel_auprc(scores, no_negatives) == pytest.approx(1.0)
    assert isinstance(threshold_at_fpr(np.zeros(0)), UndefinedMetric)
    with pytest.raises(ValueError):
        pixel_auroc(np.array([0.1, np.nan]), np.array([0, 1]))


# ------------------------------------------------------------------ accumulator
def _synthetic_split(rng: np.random.Generator, n_slices: int = 24, size: int = 32):
    """Maps, images, masks, brain masks, lesion types and deformation inputs for a fake split."""
    yy, xx = np.mgrid[:size, :size]
    brain = np.broadcast_to(((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.45 * size) ** 2,
                            (n_slices, size, size)).copy()
    masks = np.zeros((n_slices, size, size), dtype=np.float32)
    types = []
    for index in range(n_slices):
        if index % 3 == 0:
            types.append("")
            continue
        radius = 1 + index % 6
        cy, cx = rng.integers(10, size - 10, 2)
        masks[index] = ((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2
        types.append("bright" if index % 2 else "dark")
    images = rng.random((n_slices, size, size)).astype(np.float32)
    maps = np.clip(rng.normal(0.2, 0.1, images.shape) + 0.4 * masks, 0, 1).astype(np.float32)
    recon = images + rng.normal(0, 0.1, images.shape).astype(np.float32)
    warped = images + rng.normal(0, 0.05, images.shape).astype(np.float32)
    det = rng.normal(1.0, 0.5, images.shape)
    displacement = rng.normal(0, 1.0, (n_slices, 2, size, size))
    uncertainty = np.clip(rng.random(images.shape) * 0.5 + 0.5 * masks, 0, 1)
    return dict(maps=maps, images=images, masks=masks, brain=brain, types=types, recon=recon,
                warped=warped, det=det, displacement=displacement, uncertainty=uncertainty)


def _feed(accumulator: MetricAccumulator, data: dict, splits: list[slice]) -> MetricAccumulator:
    for part in splits:
        accumulator.update(
            data["maps"][part][:, None], data["images"][part][:, None], data["masks"][part][:, None],
            data["brain"][part][:, None], None, data["types"][part],
            recon=data["recon"][part], warped=data["warped"][part], jacobian_det=data["det"][part],
            displacement=data["displacement"][part], uncertainty=data["uncertainty"][part],
        )
    return accumulator


def _assert_same_metrics(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name, value in first.items():
        if isinstance(value, dict) and name != "undefined":
            _assert_same_metrics(value, second[name])
        elif isinstance(value, float):
            assert (math.isnan(value) and math.isnan(second[name])) or value == pytest.approx(
                second[name], rel=1e-12, abs=1e-12), name
        else:
            assert value == second[name], name


@pytest.mark.parametrize("exact", [True, False])
def test_accumulating_in_batches_equals_all_at_once(exact):
    data = _synthetic_split(np.random.default_rng(21))
    whole = _feed(MetricAccumulator(exact=exact), data, [slice(0, 24)]).compute(val_threshold=0.4,
                                                                                 fpr_threshold=0.35)
    batched = _feed(MetricAccumulator(exact=exact), data, [slice(0, 5), slice(5, 13), slice(13, 24)])
    _assert_same_metrics(whole, batched.compute(val_threshold=0.4, fpr_threshold=0.35))


def test_accumulator_matches_direct_functions():
    data = _synthetic_split(np.random.default_rng(22))
    result = _feed(MetricAccumulator(exact=True), data, [slice(0, 10), slice(10, 24)]).compute(
        val_threshold=0.4, fpr_threshold=0.35)
    brain = data["brain"]
    scores, labels = data["maps"][brain], data["masks"][brain] > 0
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["pixel_auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["dice_at_val"] == pytest.approx(dice_at_threshold(scores, labels, 0.4))
    assert result["dice_at_fpr"] == pytest.approx(dice_at_threshold(scores, labels, 0.35))
    assert result["oracle_best_dice"] == pytest.approx(oracle_best_dice(scores, labels)[0])
    assert result["uncertainty_auroc"] == pytest.approx(roc_auc_score(labels, data["uncertainty"][brain]))
    slice_labels = data["masks"].reshape(24, -1).max(1) > 0
    per_slice = slice_scores(data["maps"], brain)
    assert result["slice_auroc"] == pytest.approx(roc_auc_score(slice_labels, per_slice))
    assert result["slice_fpr_at_95_tpr"] == pytest.approx(fpr_at_95_tpr(per_slice, slice_labels))
    lesion = (data["masks"] > 0) & brain
    assert result["lpr"] == pytest.approx(lesion_preservation_ratio(data["images"], data["warped"],
                                                                    data["recon"], lesion))
    assert result["hrr"] == pytest.approx(healthy_residual_reduction(data["images"], data["warped"],
                                                                     data["recon"], brain & ~lesion))
    # folding comes from the displacement (one-sided criterion) when it is given
    assert result["folding_fraction"] == pytest.approx(displacement_folding_fraction(data["displacement"], brain))
    inside, outside = mean_displacement_inside_outside(data["displacement"], data["masks"], brain)
    assert (result["mean_displacement_lesion"], result["mean_displacement_healthy"]) == (
        pytest.approx(inside), pytest.approx(outside))
    # breakdown: the group's abnormal slices plus all healthy slices
    healthy_slices = ~slice_labels
    bright = np.array([t == "bright" for t in data["types"]]) & slice_labels
    chosen = brain & (bright | healthy_slices)[:, None, None]
    assert result["by_lesion_type"]["bright"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(data["masks"][chosen] > 0, data["maps"][chosen]), abs=1e-12)
    assert result["by_lesion_type"]["bright"]["n_slices"] == int((bright | healthy_slices).sum())
    edges = result["size_edges"]
    counts = data["masks"].reshape(24, -1).sum(1)
    assert edges == pytest.approx(size_tertile_edges(counts[slice_labels]))
    sizes = assign_size_bin(counts, edges)
    total = sum(result["by_size"][size]["n_abnormal_slices"] for size in ("small", "medium", "large"))
    assert total == int(slice_labels.sum())
    large = (sizes == "large") | healthy_slices
    assert result["by_size"]["large"]["slice_auroc"] == pytest.approx(
        roc_auc_score(slice_labels[large], per_slice[large]))


def test_binned_accumulator_close_to_exact_and_given_size_edges_stream():
    data = _synthetic_split(np.random.default_rng(23))
    exact = _feed(MetricAccumulator(exact=True), data, [slice(0, 24)]).compute()
    counts = data["masks"].reshape(24, -1).sum(1)
    edges = size_tertile_edges(counts[counts > 0])
    streaming = _feed(MetricAccumulator(size_edges=edges), data, [slice(0, 12), slice(12, 24)])
    assert streaming._pixels._pending == []  # nothing held back when size edges are known
    binned = streaming.compute()
    assert abs(binned["pixel_auroc"] - exact["pixel_auroc"]) <= binned["pixel_auroc_binning_error_bound"] + 1e-12
    assert abs(binned["pixel_auprc"] - exact["pixel_auprc"]) < 1e-3
    for size in ("small", "medium", "large"):
        assert binned["by_size"][size]["n_pixels"] == exact["by_size"][size]["n_pixels"]


def test_val_thresholds_transfer_exactly_between_binned_accumulators():
    rng = np.random.default_rng(24)
    val = _feed(MetricAccumulator(), _synthetic_split(rng), [slice(0, 24)])
    test_data = _synthetic_split(rng)
    test = _feed(MetricAccumulator(), test_data, [slice(0, 24)])
    val_threshold, fpr_threshold = val.max_dice_threshold(), val.fpr_threshold(0.05)
    result = test.compute(val_threshold=val_threshold, fpr_threshold=fpr_threshold)
    brain = test_data["brain"]
    scores, labels = test_data["maps"][brain], test_data["masks"][brain] > 0
    assert result["dice_at_val"] == pytest.approx(dice_at_threshold(scores, labels, val_threshold), abs=1e-12)
    assert result["dice_at_fpr"] == pytest.approx(dice_at_threshold(scores, labels, fpr_threshold), abs=1e-12)
    assert result["oracle_best_dice"] >= result["dice_at_val"]


def test_accumulator_undefined_metrics_are_reported_not_raised():
    rng = np.random.default_rng(25)
    maps = rng.random((4, 1, 16, 16))
    zeros = np.zeros((4, 1, 16, 16))
    accumulator = MetricAccumulator()
    accumulator.update(maps, None, zeros, np.ones_like(zeros), None, None)
    result = accumulator.compute()
    assert math.isnan(result["pixel_auroc"])
    assert result["undefined"]["pixel_auroc"] == "no anomalous pixels"
    assert result["undefined"]["slice_auroc"] == "no anomalous slices"
    assert "no val threshold given" in result["undefined"]["dice_at_val"]
    assert result["by_lesion_type"] == {}
    assert result["size_edges"] is None
    assert result["by_size"]["small"]["undefined"]["pixel_auroc"] == "no anomalous pixels"
    with pytest.raises(ValueError):  # optional inputs must be consistent across batches
        accumulator.update(maps, None, zeros, None, uncertainty=maps)
