"""Replicate-level inference: the run (model × selection draw) is the unit, examples are nested in it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tapioca.analysis import stats
from tapioca.analysis.evaluation import Evaluation, compare, paired_full
from tapioca.tasks.roles import selection_role, split_role

scipy_stats = pytest.importorskip("scipy.stats")


def test_replicate_delta_is_a_t_test_on_model_means():
    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 1.0, 600)
    models, draws = np.repeat([0, 1, 2], 200), np.tile(np.repeat([0, 1], 100), 3)
    got = stats.replicate_delta(d, models, draws)
    means = np.array([d[models == m].mean() for m in range(3)])  # equal draws: the model mean of draw means
    low, high = scipy_stats.t.interval(0.95, 2, loc=means.mean(), scale=scipy_stats.sem(means))
    assert got.unit == "model" and got.n == 3 and got.n_examples == 600
    assert got.mean == pytest.approx(means.mean(), rel=1e-9, abs=1e-12)
    assert (got.low, got.high) == pytest.approx((low, high), rel=1e-7)
    assert got.p_value == pytest.approx(scipy_stats.ttest_1samp(means, 0.0).pvalue, rel=1e-7)
    low_t, high_t = scipy_stats.t.interval(0.90, 2, loc=means.mean(), scale=scipy_stats.sem(means))
    assert (got.low_tost, got.high_tost) == pytest.approx((low_t, high_t), rel=1e-7)


def test_one_model_makes_its_draws_the_units():
    d = np.concatenate([np.full(50, 0.1), np.full(50, 0.3), np.full(50, 0.2)])
    got = stats.replicate_delta(d, np.zeros(150, int), np.repeat([0, 1, 2], 50))
    assert got.unit == "draw" and got.n == 3 and got.mean == pytest.approx(0.2)
    one = stats.replicate_delta(d, np.zeros(150, int))  # one model, one draw: nothing to infer
    assert one.n == 1 and math.isnan(one.low) and one.p_value == 1.0


def test_mde_and_units_needed_come_from_the_noncentral_t():
    power = pytest.importorskip("statsmodels.stats.power").TTestPower()
    assert stats.units_mde(2.0, 5) == pytest.approx(2.0 * power.solve_power(nobs=5, alpha=0.05, power=0.8), rel=1e-6)
    k = stats.units_needed(1.0, 0.5)
    assert power.power(effect_size=0.5, nobs=k, alpha=0.05) >= 0.8 > power.power(effect_size=0.5, nobs=k - 1, alpha=0.05)
    assert stats.units_needed(0.01, 1.0) == 2 and stats.units_needed(0.0, 1.0) is None


def test_one_sided_p_and_ratio_of_means():
    x = np.array([0.3, 0.5, 0.4, 0.6])
    p = stats.t_p_beyond(x.mean(), x.std(ddof=1), 4, 0.2, "above")
    assert p == pytest.approx(scipy_stats.ttest_1samp(x, 0.2, alternative="greater").pvalue, rel=1e-7)
    assert stats.t_p_beyond(0.3, 0.0, 4, 0.2, "above") == 0.0 and stats.t_p_beyond(0.3, 0.1, 1, 0.2, "above") == 1.0
    r, low, high = stats.ratio_of_means([0.5, 0.6, 0.4], [1.0, 1.1, 0.9])
    assert r == pytest.approx(0.5) and low < 0.5 < high
    with pytest.raises(ValueError, match="side"):
        stats.t_p_beyond(0.0, 1.0, 3, 0.0, "up")


def test_replicates_keep_the_false_positive_rate_that_examples_inflate():
    """No true effect, models that differ (between-model sd 0.05, 3 models × 512 examples): a bootstrap over
    examples that treats the models as fixed rejects far too often; the replicate-level test stays near 5 %."""
    rng = np.random.default_rng(1)
    replicate = example = 0
    trials = 200
    for _ in range(trials):
        shift = rng.normal(0, 0.05, 3)
        d = (shift[:, None] + rng.normal(0, 0.3, (3, 512))).ravel()
        models = np.repeat([0, 1, 2], 512)
        replicate += stats.replicate_delta(d, models).p_value < 0.05
        example += stats.paired_bootstrap(d, np.zeros_like(d), groups=models, n_resamples=300).p_value < 0.05
    assert replicate / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert example / trials > 0.3


def evaluation(values: np.ndarray, seeds: np.ndarray, draws: np.ndarray | None = None) -> Evaluation:
    ev = Evaluation({"d": {"nmse": values}}, {"d": seeds}, {"d": values}, {"d": values})
    if draws is not None:
        ev.draws["d"] = draws
    return ev


def test_each_draw_of_a_seed_is_paired_with_that_seeds_full_model():
    seeds = np.repeat([0, 1], 4)
    full = evaluation(np.arange(8.0), seeds)
    pruned = Evaluation.concat([evaluation(np.arange(8.0) - 1, seeds), evaluation(np.arange(8.0) - 3, seeds).with_draw(1)])
    assert np.array_equal(paired_full(full, pruned, "d", "nmse"), np.concatenate([np.arange(8.0)] * 2))
    row = compare(full, pruned, ["d"], n_bootstrap=100, metrics={"nmse": False})["d"]["nmse"]
    assert row["mean"] == pytest.approx(-2.0) and row["replicates"] == 4 and row["unit"] == "model" and row["n"] == 2
    assert row["examples"]["n"] == 16
    with pytest.raises(ValueError, match="not on the same examples"):
        paired_full(evaluation(np.arange(6.0), np.repeat([0, 1], 3)), pruned, "d", "nmse")


def test_in_sample_draws_pair_by_seed_and_draw():
    seeds = np.repeat([0], 4)
    full = Evaluation.concat([evaluation(np.full(4, 1.0), seeds), evaluation(np.full(4, 5.0), seeds).with_draw(1)])
    pruned = Evaluation.concat([evaluation(np.full(4, 0.5), seeds), evaluation(np.full(4, 4.0), seeds).with_draw(1)])
    assert np.array_equal(paired_full(full, pruned, "d", "nmse"), np.array([1.0] * 4 + [5.0] * 4))


def test_draws_survive_a_save_and_load(tmp_path):
    ev = evaluation(np.arange(4.0), np.zeros(4, int)).with_draw(2)
    ev.save(tmp_path / "e.npz")
    assert np.array_equal(Evaluation.load(tmp_path / "e.npz").draw_labels("d"), np.full(4, 2))


def test_selection_roles():
    assert selection_role(0) == "select" and selection_role(3) == "select.3"
    assert split_role("select.3") == ("select", 3) and split_role("heldout") == ("heldout", 0)
    assert split_role("select.x") == ("select.x", 0)
    with pytest.raises(ValueError, match=">= 0"):
        selection_role(-1)


def test_testbed_draws_are_independent_prompts():
    from tapioca.config import TaskConfig
    from tapioca.tasks.polyreg import PolyRegTask

    task = PolyRegTask(TaskConfig())
    a, b = task.data("id", "select", 0, 16), task.data("id", "select.1", 0, 16)
    assert not np.allclose(a.xs.numpy(), b.xs.numpy())
    assert np.allclose(a.xs.numpy(), task.data("id", "select", 0, 16).xs.numpy())
    with pytest.raises(ValueError, match="unknown split role"):
        task.data("id", "selection", 0, 16)
