"""Tests for tapioca.analysis.stats with known answers."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from scipy import stats as sps

from tapioca.analysis import stats
from tapioca.analysis.stats import (
    DeltaCI,
    bootstrap_mean_ci,
    brier,
    ece,
    holm,
    paired_bootstrap,
    reliability_curve,
    shrinkage_slope,
    spearman,
)

# ---------------------------------------------------------------- holm


def test_holm_list_hand_computed() -> None:
    # sorted: 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    out = holm([0.01, 0.04, 0.03])
    assert isinstance(out, list)
    np.testing.assert_allclose(out, [0.03, 0.06, 0.06], rtol=0, atol=1e-15)


def test_holm_mapping_preserves_keys_and_order_and_clips() -> None:
    out = holm({"z": 0.5, "a": 0.001, "m": 0.2})
    assert isinstance(out, dict)
    assert list(out) == ["z", "a", "m"]
    # sorted: a 0.003, m 0.4, z min(1, max(0.4, 0.5)) = 0.5
    assert out["a"] == pytest.approx(0.003)
    assert out["m"] == pytest.approx(0.4)
    assert out["z"] == pytest.approx(0.5)
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_holm_array_monotone_in_sorted_order() -> None:
    p = np.random.default_rng(3).uniform(0, 0.2, size=20)
    adj = holm(p)
    assert isinstance(adj, np.ndarray)
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= p) and np.all(adj <= 1.0)


def test_holm_empty_and_invalid() -> None:
    assert holm([]) == []
    assert holm({}) == {}
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        holm([0.1, 1.5])
    with pytest.raises(ValueError, match="NaN"):
        holm([0.1, float("nan")])


# ---------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_constant_shift_is_degenerate() -> None:
    a = np.arange(50, dtype=float)
    res = paired_bootstrap(a, a + 1, n_resamples=999)
    assert isinstance(res, DeltaCI)
    assert (res.mean, res.low, res.high) == (-1.0, -1.0, -1.0)
    assert res.p_value == pytest.approx(2 / 1000)
    assert res.n == 50


def test_paired_bootstrap_constant_shift_random_floats() -> None:
    a = np.random.default_rng(0).random(100)
    res = paired_bootstrap(a, a + 1, n_resamples=500)
    assert res.mean == pytest.approx(-1.0, abs=1e-12)
    assert res.low == pytest.approx(-1.0, abs=1e-12)
    assert res.high == pytest.approx(-1.0, abs=1e-12)
    assert res.p_value < 0.01


def test_paired_bootstrap_all_zero_deltas() -> None:
    a = np.array([0.2, 0.5, 0.9])
    res = paired_bootstrap(a, a.copy())
    assert res.to_dict() == {"mean": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "n": 3, "low_tost": 0.0,
                             "high_tost": 0.0, "sd": 0.0, "mde": 0.0}


def test_tost_interval_is_the_narrower_one_and_mde_follows_the_formula() -> None:
    rng = np.random.default_rng(4)
    d = rng.normal(0.1, 1.0, 400)
    res = paired_bootstrap(d, np.zeros(400), n_resamples=4000)
    assert res.low < res.low_tost < res.mean < res.high_tost < res.high  # 90 % inside 95 %
    assert res.mde == pytest.approx((1.959964 + 0.841621) * d.std(ddof=1) / np.sqrt(400), rel=1e-5)


def test_paired_bootstrap_clear_shift_covers_truth() -> None:
    rng = np.random.default_rng(1)
    b = rng.normal(size=400)
    a = b + 0.3 + rng.normal(scale=1.0, size=400)
    res = paired_bootstrap(a, b, n_resamples=2000, seed=5)
    assert res.mean == pytest.approx(float(np.mean(a - b)))
    assert res.low < 0.3 < res.high
    assert res.low < res.mean < res.high
    assert res.p_value < 0.05
    # Width close to the normal approximation 2 * 1.96 * sd / sqrt(n).
    expected = 2 * 1.96 * np.std(a - b) / math.sqrt(400)
    assert (res.high - res.low) == pytest.approx(expected, rel=0.15)


def test_paired_bootstrap_no_shift_not_significant() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=400)
    b = rng.normal(size=400)
    res = paired_bootstrap(a, b, n_resamples=2000, seed=0)
    assert res.low < 0.0 < res.high
    assert res.p_value > 0.05


def test_paired_bootstrap_seed_determinism() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=100), rng.normal(size=100)
    r1 = paired_bootstrap(a, b, n_resamples=500, seed=11)
    r2 = paired_bootstrap(a, b, n_resamples=500, seed=11)
    r3 = paired_bootstrap(a, b, n_resamples=500, seed=12)
    assert r1 == r2
    assert (r1.low, r1.high) != (r3.low, r3.high)
    assert r1.mean == r3.mean


def test_stratified_keeps_group_sizes_exactly() -> None:
    # x is the group indicator: if group sizes are kept, every resample has
    # exactly 30 ones out of 100, so the bootstrap distribution is a point mass.
    g = np.r_[np.zeros(70, dtype=int), np.ones(30, dtype=int)]
    rng = np.random.default_rng(0)
    perm = rng.permutation(100)
    x, g = g[perm].astype(float), g[perm]
    mean, low, high = bootstrap_mean_ci(x, groups=g, n_resamples=300)
    assert mean == low == high == pytest.approx(0.3)
    _, low_u, high_u = bootstrap_mean_ci(x, n_resamples=300)
    assert high_u - low_u > 0.1


def test_stratified_ci_narrower_with_group_mean_differences() -> None:
    rng = np.random.default_rng(7)
    groups = np.repeat([3, 8, 42], [60, 100, 40])
    shift = np.select([groups == 3, groups == 8], [0.0, 5.0], 10.0)
    b = rng.normal(size=200)
    a = b + shift + rng.normal(scale=0.5, size=200)
    strat = paired_bootstrap(a, b, groups=groups, n_resamples=2000, seed=1)
    plain = paired_bootstrap(a, b, n_resamples=2000, seed=1)
    assert strat.mean == pytest.approx(plain.mean)
    assert (strat.high - strat.low) < 0.5 * (plain.high - plain.low)
    assert strat.low < strat.mean < strat.high


def test_single_group_equals_unstratified() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=60)
    assert bootstrap_mean_ci(x, groups=np.full(60, 5), n_resamples=400, seed=3) == bootstrap_mean_ci(
        x, n_resamples=400, seed=3
    )


@pytest.mark.parametrize("stratified", [False, True])
def test_count_matrix_and_chunked_draws_give_the_same_resamples(stratified: bool, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_cauchy(3000), rng.random(3000)
    groups = rng.integers(0, 3, size=3000) if stratified else None
    fast = paired_bootstrap(a, b, groups=groups, n_resamples=500, seed=4)
    monkeypatch.setattr(stats, "_MAX_COUNT_ELEMENTS", 0)
    stats._resample_counts.cache_clear()
    slow = paired_bootstrap(a, b, groups=groups, n_resamples=500, seed=4)
    assert fast.p_value == slow.p_value and fast.mean == slow.mean
    assert fast.low == pytest.approx(slow.low, rel=1e-12) and fast.high == pytest.approx(slow.high, rel=1e-12)


@pytest.mark.parametrize("stratified", [False, True])
def test_bootstrap_memory_is_chunked(stratified: bool, monkeypatch) -> None:
    monkeypatch.setattr(stats, "_MAX_COUNT_ELEMENTS", 0)  # above the cap, resamples are drawn in chunks
    n = 50_000
    rng = np.random.default_rng(0)
    a, b = rng.random(n), rng.random(n)
    groups = rng.integers(0, 5, size=n) if stratified else None
    tracemalloc.start()
    try:
        paired_bootstrap(a, b, groups=groups, n_resamples=200, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # An unchunked (200, 50_000) int64 index matrix alone would be 80 MB,
    # and the gathered values another 80 MB.
    assert peak < 100e6


def test_bootstrap_mean_ci_basic() -> None:
    x = np.random.default_rng(9).normal(loc=2.0, size=500)
    mean, low, high = bootstrap_mean_ci(x, n_resamples=2000, confidence=0.9)
    assert mean == pytest.approx(float(x.mean()))
    assert low < 2.0 < high
    expected = 2 * 1.645 * x.std() / math.sqrt(500)
    assert (high - low) == pytest.approx(expected, rel=0.15)
    assert bootstrap_mean_ci([4.0, 4.0, 4.0]) == (4.0, 4.0, 4.0)


def test_bootstrap_input_errors() -> None:
    with pytest.raises(ValueError, match="length mismatch"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="NaN/inf"):
        paired_bootstrap([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN/inf"):
        bootstrap_mean_ci([1.0, float("inf")])
    with pytest.raises(ValueError, match=r"confidence must be in the open interval \(0, 1\)"):
        paired_bootstrap([1.0, 2.0], [0.0, 0.0], confidence=1.0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_ci([1.0, 2.0], confidence=0.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_mean_ci([1.0, 2.0], n_resamples=0)
    with pytest.raises(ValueError, match=r"groups must have shape \(2,\)"):
        paired_bootstrap([1.0, 2.0], [0.0, 0.0], groups=[0, 1, 1])
    with pytest.raises(ValueError, match="integer labels"):
        bootstrap_mean_ci([1.0, 2.0], groups=[0.5, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_mean_ci([[1.0, 2.0]])


# ---------------------------------------------------------------- shrinkage slope


def test_shrinkage_slope_known() -> None:
    y = np.random.default_rng(0).normal(size=50)
    assert shrinkage_slope(0.5 * y, y) == pytest.approx(0.5, abs=1e-12)
    assert shrinkage_slope(3.0 - 2.0 * y, y) == pytest.approx(-2.0, abs=1e-12)
    pred = 0.7 * y + np.random.default_rng(1).normal(size=50)
    assert shrinkage_slope(pred, y) == pytest.approx(np.polyfit(y, pred, 1)[0], rel=1e-10)


def test_shrinkage_slope_errors() -> None:
    with pytest.raises(ValueError, match="zero variance"):
        shrinkage_slope([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="length mismatch"):
        shrinkage_slope([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        shrinkage_slope([1.0], [1.0])


# ---------------------------------------------------------------- calibration


def test_ece_perfectly_calibrated_is_small() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    conf = rng.uniform(0.5, 1.0, size=n)
    probs = np.stack([conf, 1.0 - conf], axis=1)
    labels = np.where(rng.random(n) < conf, 0, 1)
    assert ece(probs, labels) < 0.01


def test_ece_overconfident_classifier() -> None:
    n = 1000
    pred = np.zeros(n, dtype=int)
    labels = np.where(np.arange(n) < 700, 0, 1)  # 70% correct
    probs = np.eye(3)[pred]
    assert ece(probs, labels) == pytest.approx(0.3, abs=1e-12)


def test_ece_hand_computed_and_bin_edges() -> None:
    # n_bins=2: bin0=(0,0.5], bin1=(0.5,1]. conf 0.5 must land in bin0.
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.8, 0.2], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    # bin0: conf 0.5 (correct) -> acc 1, conf 0.5; bin1: 0.9 wrong, 0.8 right, 0.6 right
    # ece = 1/4*|1-0.5| + 3/4*|2/3 - 2.3/3| = 0.125 + 0.075
    assert ece(probs, labels, n_bins=2) == pytest.approx(0.2, abs=1e-12)
    curve = reliability_curve(probs, labels, n_bins=2)
    assert curve["count"] == [1, 3]
    assert curve["bin_lower"] == [0.0, 0.5] and curve["bin_upper"] == [0.5, 1.0]
    np.testing.assert_allclose(curve["confidence"], [0.5, 2.3 / 3])
    np.testing.assert_allclose(curve["accuracy"], [1.0, 2 / 3])


def test_reliability_curve_counts_and_empty_bins() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 4, size=500)
    curve = reliability_curve(probs, labels, n_bins=10)
    assert sum(curve["count"]) == 500
    assert all(len(v) == 10 for v in curve.values())
    # top confidence with 4 classes is >= 0.25, so the first two bins are empty.
    assert curve["count"][:2] == [0, 0]
    assert math.isnan(curve["confidence"][0]) and math.isnan(curve["accuracy"][1])
    counts = np.array(curve["count"])
    gaps = np.abs(np.array(curve["accuracy"]) - np.array(curve["confidence"]))
    assert ece(probs, labels, n_bins=10) == pytest.approx(np.nansum(counts / 500 * gaps))


def test_brier_known_values() -> None:
    labels = np.array([0, 2, 1])
    assert brier(np.eye(3)[labels], labels) == 0.0
    assert brier(np.full((4, 2), 0.5), np.array([0, 1, 1, 0])) == pytest.approx(0.5)
    assert brier(np.eye(2)[[1, 0]], np.array([0, 1])) == pytest.approx(2.0)


def test_calibration_input_errors() -> None:
    good = np.array([[0.3, 0.7], [0.6, 0.4]])
    with pytest.raises(ValueError, match="sum to 1 within 0.0001; row 1"):
        ece(np.array([[0.3, 0.7], [0.6, 0.5]]), [0, 1])
    with pytest.raises(ValueError, match=r"shape \(n, C\)"):
        brier([0.3, 0.7], [0])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        ece(good, [0, 2])
    with pytest.raises(ValueError, match="labels must have shape"):
        brier(good, [0])
    with pytest.raises(ValueError, match="integer class indices"):
        brier(good, [0.0, 1.0])
    with pytest.raises(ValueError, match="n_bins must be an integer >= 1"):
        ece(good, [0, 1], n_bins=0)
    with pytest.raises(ValueError, match="NaN/inf"):
        reliability_curve(np.array([[np.nan, 1.0], [0.5, 0.5]]), [0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        brier(np.array([[-0.5, 1.5], [0.5, 0.5]]), [0, 1])


# ---------------------------------------------------------------- spearman


def test_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, size=200)
    y = x + rng.integers(0, 8, size=200)
    expected = sps.spearmanr(x, y).statistic
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    x2, y2 = rng.normal(size=50), rng.normal(size=50)
    assert spearman(x2, y2) == pytest.approx(sps.spearmanr(x2, y2).statistic, abs=1e-12)


def test_spearman_monotone_and_errors() -> None:
    x = np.array([1.0, 2.0, 5.0, 9.0])
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 3"):
        spearman([1.0, 2.0], [2.0, 1.0])
    with pytest.raises(ValueError, match="constant"):
        spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="length mismatch"):
        spearman([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="NaN/inf"):
        spearman([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])


def test_examples_needed_sizes_a_run_only_from_differences_that_vary() -> None:
    assert stats.examples_needed(0.02, 0.005) == stats.n_needed(0.02, 0.005) > 100
    for sd in (0.0, float("nan"), None):
        assert stats.examples_needed(sd, 0.005) is None
