"""Selection optimism and its placebo null on planted cases where the true gain is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tapioca.analysis.evaluation import Evaluation
from tapioca.analysis.optimism import optimism, oriented, placebo_null, robust_summary


def expected_max_of_normals(c: int, draws: int = 200_000) -> float:
    return float(np.random.default_rng(1).standard_normal((draws, c)).max(1).mean())


def test_the_null_is_the_winners_curse_of_the_best_of_c_candidates_without_effects():
    rng = np.random.default_rng(0)
    c, n = 8, 400
    diffs = rng.standard_normal((c, n))  # independent candidates, sd 1, no true effect
    null = placebo_null([diffs], draws=4000, seed=3)
    assert null.mean() == pytest.approx(expected_max_of_normals(c) / math.sqrt(n), rel=0.1)


def test_a_planted_gain_exceeds_the_null_and_pure_noise_mostly_does_not():
    rng = np.random.default_rng(1)
    c, n = 8, 256
    planted = rng.standard_normal((c, n))
    planted[3] += 0.5  # one block truly helps by 0.5 sd
    null = placebo_null([planted], draws=2000)
    assert planted.mean(1).max() > np.quantile(null, 0.99)  # far beyond what picking the best of 8 explains
    exceed = 0
    for trial in range(40):  # no block helps: the best candidate's in-sample gain is within the null ~95 %
        noise = np.random.default_rng(100 + trial).standard_normal((c, n))
        exceed += noise.mean(1).max() > np.quantile(placebo_null([noise], draws=1000, seed=trial), 0.95)
    assert exceed <= 8


def test_the_null_pools_seeds_by_their_example_counts():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 100)), rng.standard_normal((4, 300))
    pooled = placebo_null([a, b], draws=3000)
    assert pooled.mean() == pytest.approx(expected_max_of_normals(4) * (0.25 / 10 + 0.75 / math.sqrt(300)), rel=0.15)


def evaluation(values: np.ndarray, seeds: np.ndarray) -> Evaluation:
    return Evaluation({"d": {"nmse": values}}, {"d": seeds}, {"d": values}, {"d": values})


def test_optimism_is_in_sample_minus_held_out_gain_in_one_unit():
    seeds = np.repeat([0, 1], 50)
    full_in, pruned_in = evaluation(np.full(100, 1.0), seeds), evaluation(np.full(100, 0.6), seeds)
    full_out, pruned_out = evaluation(np.full(100, 1.0), seeds), evaluation(np.full(100, 0.9), seeds)
    row = optimism(full_in, pruned_in, full_out, pruned_out, "d", "nmse", False, np.zeros(10), 500, 0.95)
    assert row["in_sample"] == pytest.approx(0.4) and row["held_out"] == pytest.approx(0.1)
    assert row["mean"] == pytest.approx(0.3) and row["low"] == pytest.approx(0.3)
    assert row["p_null"] == pytest.approx(1 / 11)  # no null draw reaches the in-sample gain
    assert np.array_equal(oriented(np.array([1.0]), np.array([0.5]), False), np.array([0.5]))


def test_robust_summary_names_the_prompts_that_dominate_the_mean():
    seeds = np.repeat([0, 1], 10)
    full = np.full(20, 0.1)
    full[13] = 100.0  # one prompt (seed 1, index 3) holds nearly the whole sum
    row = robust_summary(evaluation(full, seeds), evaluation(full * 0.5, seeds), "d", "nmse", 500, 0.95)
    assert row["dominant"][0] == {"seed": 1, "index": 3, "share": pytest.approx(100 / 101.9)}
    assert row["median_full"] == pytest.approx(0.1) and row["mean_log_ratio"]["mean"] == pytest.approx(math.log(0.5))


def test_a_destructive_candidate_keeps_its_harm_and_does_not_inflate_the_null():
    rng = np.random.default_rng(5)
    c, n = 6, 300
    diffs = rng.standard_normal((c, n)) * 0.1
    plain = placebo_null([diffs], draws=2000)
    diffs_with_destroyer = np.vstack([diffs, -5.0 + 20.0 * rng.standard_normal((1, n))])  # removing block 0
    assert placebo_null([diffs_with_destroyer], draws=2000).mean() == pytest.approx(plain.mean(), rel=0.05)
