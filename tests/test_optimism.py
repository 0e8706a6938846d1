"""Selection optimism and its null references (the whole-search :func:`search_null` and the one-round
:func:`placebo_null`) on planted cases where the true gain is known, including simulated TALE searches."""

from __future__ import annotations

import contextlib
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tapioca.analysis.evaluation import Evaluation
from tapioca.analysis.optimism import (RecordedSearch, SearchRule, optimism, oriented, p_null, 
                                       replayed_gain, robust_summary, search_null)
from tapioca.errors import ConfigError, DataError
from tapioca.pruning.searches import PruneResult, SearchContext, tale_search

try:  # many small matrix products: BLAS threads only add overhead (15x on a loaded 2-core machine)
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    def threadpool_limits(limits: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def one_round_null(diffs: list[np.ndarray], draws: int = 2000, seed: int = 0) -> np.ndarray:
    """The null of the first greedy round alone (the best one-block removal, whatever ε): per replicate the
    candidates' per-example gains (C, n)."""
    return search_null([RecordedSearch(d[None]) for d in diffs], SearchRule(1e9, 1, "final"), draws=draws, seed=seed)


def expected_max_of_normals(c: int, draws: int = 200_000) -> float:
    return float(np.random.default_rng(1).standard_normal((draws, c)).max(1).mean())


def test_the_null_is_the_winners_curse_of_the_best_of_c_candidates_without_effects():
    rng = np.random.default_rng(0)
    c, n = 8, 400
    diffs = rng.standard_normal((c, n))  # independent candidates, sd 1, no true effect
    null = one_round_null([diffs], draws=4000, seed=3)
    assert null.mean() == pytest.approx(expected_max_of_normals(c) / math.sqrt(n), rel=0.1)


def test_a_planted_gain_exceeds_the_null_and_pure_noise_mostly_does_not():
    rng = np.random.default_rng(1)
    c, n = 8, 256
    planted = rng.standard_normal((c, n))
    planted[3] += 0.5  # one block truly helps by 0.5 sd
    null = one_round_null([planted], draws=2000)
    assert planted.mean(1).max() > np.quantile(null, 0.99)  # far beyond what picking the best of 8 explains
    exceed = 0
    for trial in range(40):  # no block helps: the best candidate's in-sample gain is within the null ~95 %
        noise = np.random.default_rng(100 + trial).standard_normal((c, n))
        exceed += noise.mean(1).max() > np.quantile(one_round_null([noise], draws=1000, seed=trial), 0.95)
    assert exceed <= 8


def test_the_null_weighs_replicates_equally():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 100)), rng.standard_normal((4, 300))
    pooled = one_round_null([a, b], draws=3000)
    assert pooled.mean() == pytest.approx(expected_max_of_normals(4) * (0.5 / 10 + 0.5 / math.sqrt(300)), rel=0.15)


def test_skewed_losses_do_not_inflate_the_null():
    """A removal's gain is bounded above by the full model's error: per-example gains with a long tail of losses.
    A resample keeps that skew; mirrored (random signs) the losses would become gains no removal can make."""
    rng = np.random.default_rng(7)
    c, n = 6, 400
    losses = rng.lognormal(0.0, 2.0, (c, n))
    skewed = 0.01 - losses + losses.mean(1, keepdims=True)  # mean 0.01, at most ~0.01 + mean loss, long left tail
    null = one_round_null([skewed], draws=2000)
    mirrored = (skewed - skewed.mean(1, keepdims=True)) * rng.choice([-1.0, 1.0], (1, n))
    assert np.quantile(null, 0.95) < mirrored.mean(1).max() + 0.5 * skewed.std(1).max() / math.sqrt(n) * 4
    assert np.quantile(null, 0.5) < np.quantile(np.abs(skewed - skewed.mean(1, keepdims=True)).mean(1), 0.5)


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
    plain = one_round_null([diffs], draws=2000)
    diffs_with_destroyer = np.vstack([diffs, -5.0 + 20.0 * rng.standard_normal((1, n))])  # removing block 0
    assert one_round_null([diffs_with_destroyer], draws=2000).mean() == pytest.approx(plain.mean(), rel=0.05)


# ---------------------------------------------------------------------------------------------------------
# The whole-search null on simulated TALE searches


def simulated_blocks(rng: np.random.Generator, n: int, n_blocks: int = 8, essential: tuple[int, ...] = (0, 5),
                     planted: int | None = None, df: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """A model whose every configuration has a per-example score: base_i + sum_{b removed} g_ib (additive
    block effects). g_ib = mu_b + scale_i * noise_ib, noise heavy-tailed (t, ``df``), correlated across blocks
    (a shared per-example part) and unit variance; mu_b = 0 (no block helps), −2 for ``essential`` blocks,
    +0.5 for ``planted``. Returns base (n,) and g (L, n)."""
    mu = np.zeros(n_blocks)
    mu[list(essential)] = -2.0
    if planted is not None:
        mu[planted] = 0.5
    scale = np.exp(0.5 * rng.standard_normal(n) - 0.25)  # heteroscedastic examples, E[scale^2] = 1
    noise = (0.5 * rng.standard_t(df, n)[None] + rng.standard_t(df, (n_blocks, n))) / math.sqrt(1.25 * df / (df - 2))
    return rng.standard_normal(n), mu[:, None] + scale * noise


def simulated_tale(base: np.ndarray, g: np.ndarray, rule: SearchRule) -> tuple[PruneResult, RecordedSearch]:
    """The real :func:`tale_search` on the additive simulated model, and its rounds recorded from it."""
    return tale_on(lambda removed: base + g[sorted(removed)].sum(0), len(g), rule)


def tale_on(scores, n_blocks: int, rule: SearchRule) -> tuple[PruneResult, RecordedSearch]:
    """The real :func:`tale_search` on a model whose per-example scores with the blocks ``removed`` removed are
    ``scores(removed)`` (n,), and its rounds recorded from ``scores``."""
    ctx = SearchContext(model=SimpleNamespace(n_blocks=n_blocks), batch=None,
                        scorer=lambda gates: torch.from_numpy(scores(list(gates))), prefix_cache=False,
                        epsilon=rule.epsilon, max_drop=rule.max_drop, choose=rule.choose, progress=False)
    result = tale_search(ctx)
    rounds = [{int(b): scores([*rd["removed_before"], int(b)]) for b in rd["candidates"]} for rd in result.rounds]
    return result, RecordedSearch.from_scores(scores([]), rounds, n_blocks)


def false_positive_rates(rule: SearchRule, studies: int, replicates: int = 2, n: int = 100,
                         draws: int = 500) -> tuple[float, float, float]:
    """Share of simulated studies (``replicates`` searches each, pooled, no block truly helping) with
    p < 0.05 under the whole-search null and under the one-round null; and the mean number of rounds
    accepted."""
    new = old = 0
    depth = []
    for study in range(studies):
        rng = np.random.default_rng([2024, study, rule.max_drop or 0, int(1000 * rule.epsilon)])
        recorded, observed = [], []
        for _ in range(replicates):
            result, rec = simulated_tale(*simulated_blocks(rng, n), rule)
            observed.append(result.selection_score - result.baseline_score)
            recorded.append(rec)
            depth.append(len(result.path))
        gain = float(np.mean(observed))  # equal n: equal and example weights agree
        assert replayed_gain(recorded, rule) == pytest.approx(gain, abs=1e-9)  # the replay is TALE's own rule
        new += p_null(search_null(recorded, rule, draws=draws, seed=study), gain - 1e-12) < 0.05
        old += p_null(one_round_null([r.gains[0] for r in recorded], draws=draws, seed=study), gain - 1e-12) < 0.05
    return new / studies, old / studies, float(np.mean(depth))


@pytest.mark.parametrize("rule", [SearchRule(0.5, 1), SearchRule(0.5, 2), SearchRule(0.5, 3),
                                  SearchRule(0.1, None, "final")],
                         ids=["1-round", "2-rounds", "3-rounds", "until-rejected"])
def test_the_search_null_keeps_the_false_positive_rate_of_a_greedy_search_at_5_percent(rule):
    studies = 400
    with threadpool_limits(1):
        new, old, depth = false_positive_rates(rule, studies)
    se = math.sqrt(0.05 * 0.95 / studies)
    print(f"{rule}: {depth:.2f} rounds accepted on average; P(p < 0.05) = {new:.3f} (whole-search null), "
          f"{old:.3f} (one-round null); MC se {se:.3f}")
    if rule.max_drop is not None:
        assert depth == rule.max_drop  # the generous epsilon accepts every round up to max_drop
    assert 0.01 <= new <= 0.05 + 3 * se
    if rule.max_drop != 1:
        assert old > 0.05 + 3 * se  # the one-round null is anti-conservative once the search goes deeper


def test_a_planted_gain_is_found_by_the_search_null():
    rule = SearchRule(0.5, 2)
    small = 0
    with threadpool_limits(1):
        for study in range(40):
            rng = np.random.default_rng([7, study])
            recorded = [simulated_tale(*simulated_blocks(rng, 100, planted=3), rule)[1] for _ in range(2)]
            small += p_null(search_null(recorded, rule, draws=500, seed=study), replayed_gain(recorded, rule)) < 0.01
    print(f"planted +0.5 sd: p < 0.01 in {small} of 40 studies")
    assert small >= 36


# ---------------------------------------------------------------------------------------------------------
# The replayed rule on hand-made searches


def constant_search(path_levels: list[float], others: float = -1.0, n_blocks: int = 4, n: int = 6) -> RecordedSearch:
    """Rounds whose chosen block (block r in round r) reaches ``path_levels[r]``, every other candidate
    ``others``; every example equal (no noise)."""
    gains = np.full((len(path_levels), n_blocks, n), np.nan)
    for r, level in enumerate(path_levels):
        gains[r, r:] = others
        gains[r, r] = level
    return RecordedSearch(gains)


@pytest.mark.parametrize("rule, expected", [
    (SearchRule(0.1, None, "best"), 0.3), (SearchRule(0.1, None, "bsba"), 0.1), (SearchRule(0.1, None, "final"), -0.05),
    (SearchRule(0.01, None, "final"), 0.1),  # the third round (−0.05 < −0.01) is rejected
    (SearchRule(0.1, 1, "final"), 0.3), (SearchRule(0.1, 2, "best"), 0.3), (SearchRule(0.1, 0, "best"), 0.0),
])
def test_the_replay_applies_choose_epsilon_and_max_drop_like_tale(rule, expected):
    rec = constant_search([0.3, 0.1, -0.05])
    assert rec.path == [0, 1]
    assert replayed_gain([rec], rule) == pytest.approx(expected)
    levels = [0.0, 0.3, 0.1, -0.05, -0.5]  # the same model for TALE: removing blocks 0..d-1 reaches levels[d]

    def scores(removed: list[int]) -> np.ndarray:
        return np.full(6, levels[len(removed)] if sorted(removed) == list(range(len(removed))) else -1.0)

    result, recorded = tale_on(scores, 4, rule)
    assert result.selection_score - result.baseline_score == pytest.approx(expected)
    assert replayed_gain([recorded], rule) == pytest.approx(expected)


def test_epsilon_accepts_a_round_exactly_at_the_floor():
    rec = constant_search([0.25, -0.25])
    assert replayed_gain([rec], SearchRule(0.25, None, "final")) == -0.25
    assert replayed_gain([rec], SearchRule(0.125, None, "final")) == 0.25


def test_ties_go_to_the_lowest_index_and_removed_blocks_leave_the_candidates():
    g = np.zeros((4, 5))
    g[1] = g[2] = 0.2  # a tie: TALE removes block 1, then block 2
    result, rec = simulated_tale(np.zeros(5), g, SearchRule(0.5, 3))
    assert result.path[:2] == [1, 2] and rec.path == [1, 2]
    assert replayed_gain([rec], SearchRule(0.5, 3)) == pytest.approx(0.4)
    assert np.isnan(rec.gains[1, 1]).all() and np.isnan(rec.gains[2, [1, 2]]).all()


def test_best_may_keep_the_full_model_and_final_may_not():
    rng = np.random.default_rng(3)
    gains = rng.standard_normal((1, 6, 50))
    gains[0, 0] -= 5.0  # a destructive removal keeps its harm
    final = search_null([RecordedSearch(gains)], SearchRule(1e9, 1, "final"), draws=500, seed=4)
    best = search_null([RecordedSearch(gains)], SearchRule(1e9, 1, "best"), draws=500, seed=4)
    assert np.allclose(best, np.maximum(final, 0.0))


def test_replicates_count_equally_and_a_search_without_rounds_adds_zero():
    rng = np.random.default_rng(5)
    gains = rng.standard_normal((2, 4, 30))
    gains[:, 3] = gains[1, 0] = np.nan  # block 3 never a candidate; block 0 removed in round 0
    rec = RecordedSearch(gains)
    rule = SearchRule(0.5, None)
    null = search_null([rec], rule, draws=300, seed=1)
    assert null.shape == (300,) and (null >= 0).all()  # "best": never below the full model
    assert np.allclose(search_null([rec, RecordedSearch(np.zeros((0, 4, 30)))], rule, draws=300, seed=1), null / 2)
    assert np.array_equal(null, search_null([rec], rule, draws=300, seed=1))  # reproducible


def test_only_harmful_candidates_leave_the_full_model_in_every_draw():
    rng = np.random.default_rng(6)
    rec = RecordedSearch(-3.0 + 0.1 * rng.standard_normal((1, 5, 40)))
    assert (search_null([rec], SearchRule(0.5, None), draws=200) == 0).all()
    assert replayed_gain([rec], SearchRule(0.5, None)) == 0.0


def test_p_null_counts_the_observation():
    assert p_null(np.array([0.0, 1.0, 2.0, 3.0]), 2.0) == pytest.approx(3 / 5)
    assert p_null(np.zeros(9), 1.0) == pytest.approx(0.1)


@pytest.mark.parametrize("gains, message", [
    (np.zeros((3, 4)), "must be (rounds, blocks, examples)"),
    (np.array([[[0.0, np.nan]]]), "NaN on some examples only"),
    (np.full((1, 2, 3), np.nan), "round 0 has no candidate"),
    (np.zeros((2, 3, 4)), "minus the one block round 0 removed"),
    (np.array([[[np.inf]]]), "inf"),
])
def test_malformed_recorded_searches_are_clear_errors(gains, message):
    with pytest.raises(DataError, match=re.escape(message)):
        RecordedSearch(gains)


def test_bad_rules_and_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="choose"):
        SearchRule(0.1, None, "deepest")
    with pytest.raises(ConfigError, match="max_drop"):
        SearchRule(0.1, -1)
    with pytest.raises(DataError, match="non-empty list"):
        search_null([], SearchRule(0.1))
    with pytest.raises(ConfigError, match="draws"):
        search_null([RecordedSearch(np.zeros((1, 2, 3)))], SearchRule(0.1), draws=0)
    with pytest.raises(DataError, match="shape"):
        RecordedSearch.from_scores(np.zeros(3), [{0: np.zeros(4)}], n_blocks=2)
    with pytest.raises(DataError, match="non-empty"):
        p_null(np.array([]), 0.0)


# ---------------------------------------------------------------------------------------------------------
# Recording the rounds of a real search


def test_record_rounds_recomputes_every_candidate_of_a_tiny_testbed_search(tiny_cfg, tiny_model, tmp_path):
    from conftest import assert_close_scaled

    from tapioca.api import prune
    from tapioca.config import PruningConfig
    from tapioca.study.replay import load_recorded, record_rounds, rule_of, save_recorded
    from tapioca.tasks.polyreg import PolyRegTask
    from tapioca.tasks.testbed import TestbedWorkload

    wl = TestbedWorkload.from_pruning(PruningConfig(n_select=16, batch_size=8), tiny_model, PolyRegTask(tiny_cfg.task))
    search = prune(wl, epsilon=1e6, max_drop=2, progress=False)  # prefix reuse on: scores by another path
    rec = record_rounds(wl, 0, search, "id", 16)
    assert rec.shape == (2, 3, 16) and rec.path == search.path[:1]
    for r, rd in enumerate(search.rounds):
        means = {int(b): float(rec.gains[r, int(b)].mean()) + search.baseline_score for b in rd["candidates"]}
        assert_close_scaled(list(means.values()), [rd["candidates"][str(b)] for b in means])
        assert set(np.flatnonzero(np.isnan(rec.gains[r, :, 0]))) == set(rd["removed_before"])
    assert replayed_gain([rec], rule_of(search)) == pytest.approx(search.selection_score - search.baseline_score,
                                                                  rel=1e-4, abs=1e-6)
    save_recorded(tmp_path / "rounds.npz", {"id": rec, "none": RecordedSearch(np.zeros((0, 3, 16)))})
    back = load_recorded(tmp_path / "rounds.npz")
    assert np.array_equal(back["id"].gains, rec.gains, equal_nan=True) and back["none"].shape == (0, 3, 16)
    with pytest.raises(DataError, match="baseline"):
        record_rounds(wl, 1, search, "id", 16)  # other examples than the search's


def test_the_search_keeps_the_scores_the_null_needs(tiny_cfg, tiny_model, tmp_path):
    """TALE keeps every configuration's per-example scores as it runs, so recording its rounds runs nothing
    again, and gives what recomputing them gives."""
    from conftest import assert_close_scaled

    from tapioca.api import prune
    from tapioca.config import PruningConfig
    from tapioca.study.replay import load_search_scores, record_rounds, save_search_scores
    from tapioca.tasks.polyreg import PolyRegTask
    from tapioca.tasks.testbed import TestbedWorkload

    wl = TestbedWorkload.from_pruning(PruningConfig(n_select=16, batch_size=8), tiny_model, PolyRegTask(tiny_cfg.task))
    kept: dict = {}
    search = prune(wl, epsilon=1e6, max_drop=2, progress=False, per_example=kept)
    assert "" in kept and all(v.shape == (16,) for v in kept.values())
    save_search_scores(tmp_path / "scores.npz", kept)
    known = load_search_scores(tmp_path / "scores.npz")
    again = record_rounds(wl, 0, search, "id", 16)
    fast = record_rounds(wl, 0, search, "id", 16, known=known)
    assert fast.shape == again.shape and np.array_equal(np.isnan(fast.gains), np.isnan(again.gains))
    assert_close_scaled(fast.gains[~np.isnan(fast.gains)], again.gains[~np.isnan(again.gains)])
    assert load_search_scores(tmp_path / "missing.npz") is None
