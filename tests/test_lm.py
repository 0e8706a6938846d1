"""Tests for tapioca.tasks.choices and tapioca.analysis.calibration on a tiny random Llama and in-memory text tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tapioca.analysis import stats
from tapioca.errors import ConfigError
from tapioca.tasks.choices import ChoiceModel, choice_batch, choice_table, lm_selection, prune_lm, task_choices
from tapioca.analysis.calibration import calibration, calibration_change, compare_lm, evaluate_lm, _top_choice_table
from tapioca.models.base import run_in_chunks
from tapioca.pruning.searches import SEARCHES
from tapioca.tasks.text import score_multiple_choice

from conftest import PLANTED, assert_close_scaled, mc_task, plant, relabel, sa_task, tiny_lm

@pytest.mark.parametrize("letter_tokens, mc_format, token_mode", [(True, "letters", True), (False, "letters", False),
                                                                   (True, "cloze", False)])
def test_choice_scores_match_score_multiple_choice(letter_tokens: bool, mc_format: str, token_mode: bool) -> None:
    lm, task = tiny_lm(letter_tokens), mc_task(mc_format, n_shots=1)
    examples = task.data("wide", "heldout", 0, 12)
    prompts = task.prompts(examples, 0)
    for normalize in (False, True):
        ref = score_multiple_choice(lm.loglik, examples, prompts, length_normalize=normalize, mc_format=mc_format)
        conts, labels = task_choices(examples, mc_format)
        batch = choice_batch(lm, prompts, conts, labels, normalize)
        assert batch.token_mode is token_mode and len(batch) == 12 * (1 if token_mode else 4)
        table = choice_table(run_in_chunks(ChoiceModel(lm), batch, None, False, 5).predictions, batch)
        assert_close_scaled(torch.softmax(table, 1), ref.probs)  # chunks of 5 vs loglik's own batches
        ev = evaluate_lm(lm, task, None, ["wide"], seeds=[0], n=12, batch_size=5, length_normalize=normalize)
        np.testing.assert_array_equal(ev.values["wide"]["acc"], ref.correct.astype(float))
        assert_close_scaled(ev.values["wide"]["prob_correct"], ref.probs[np.arange(12), ref.labels])
        np.testing.assert_array_equal(ev.targets["wide"], ref.labels)


def test_rows_sorted_by_length_and_states_once_per_example() -> None:
    lm, task = tiny_lm(False), mc_task("cloze")
    sel = lm_selection(lm, task, "id", n=10, chunk=7)
    lengths = sel.batch.tokens.attention_mask.sum(1)
    assert torch.all(lengths[:-1] >= lengths[1:]) and len(sel.batch) == 40
    states = run_in_chunks(sel.model, sel.batch, None, capture=True, chunk=7).states
    plain = lm.run(lm.tokenize(sel.prompts), capture=True).states
    assert states.shape == plain.shape == (5, 10, 32)
    # same set of per-example states (row order differs): compare sorted norms at the last block
    assert_close_scaled(np.sort(states[-1].norm(dim=-1).numpy()), np.sort(plain[-1].norm(dim=-1).numpy()))


# ---------------------------------------------------------------- TALE on a planted bad block


@pytest.mark.parametrize("letter_tokens, mc_format, metric", [(True, "letters", "acc"), (False, "cloze", "prob"),
                                                              (True, "letters", "loglik")])
def test_tale_prefix_rounds_equal_naive_and_find_the_planted_block(letter_tokens: bool, mc_format: str,
                                                                   metric: str) -> None:
    lm = tiny_lm(letter_tokens)
    task = relabel(lm, mc_task(mc_format), {PLANTED: 0.0})  # correct = what the model says without the block
    plant(lm, PLANTED)
    kwargs = dict(search="tale", target="wide", max_drop=2, epsilon=0.0, metric=metric, n_select=12, batch_size=5,
                  progress=False)
    cached, naive = prune_lm(lm, task, **kwargs), prune_lm(lm, task, prefix_cache=False, **kwargs)
    assert cached.info["prefix_cache"] and not naive.info["prefix_cache"]
    assert cached.rounds == naive.rounds  # bit-identical candidate scores, every round
    assert cached.baseline_score == naive.baseline_score
    assert cached.path[0] == PLANTED and cached.removed[0] == PLANTED
    assert cached.rounds[0]["candidates"][str(PLANTED)] > cached.baseline_score
    if metric == "acc":
        assert cached.rounds[0]["candidates"][str(PLANTED)] == 1.0 > cached.baseline_score
    assert cached.info["selected_on"] == "wide" and cached.info["metric"] == metric


def test_from_id_protocol_selects_on_id_and_evaluation_shows_the_gain() -> None:
    lm = tiny_lm(True)
    task = relabel(lm, mc_task(), {PLANTED: 0.0})
    plant(lm, PLANTED)
    result = prune_lm(lm, task, protocol="from-id", target="wide", max_drop=1, n_select=12, progress=False)
    assert result.info["selected_on"] == "id" and result.removed == [PLANTED]
    full = evaluate_lm(lm, task, None, seeds=(0, 1), n=10)
    pruned = evaluate_lm(lm, task, result.gates, seeds=(0, 1), n=10)
    assert set(full.values["wide"]) == {"acc", "prob_correct", "confidence", "brier"}
    assert pruned.mean("wide", "acc") == 1.0 > full.mean("wide", "acc")
    physical = evaluate_lm(lm.pruned_copy(result.removed), task, None, seeds=(0, 1), n=10)
    assert_close_scaled(physical.values["wide"]["prob_correct"], pruned.values["wide"]["prob_correct"])
    table = compare_lm(full, pruned, n_bootstrap=500)
    assert set(table) == {"id", "wide"} and set(table["wide"]) == {"acc", "prob_correct", "brier"}
    assert table["wide"]["acc"]["mean"] > 0 and "p_holm" in table["wide"]["acc"]
    change = calibration_change(full, pruned)
    assert change["wide"]["delta_brier"] == pytest.approx(
        change["wide"]["pruned"]["brier"] - change["wide"]["full"]["brier"])


@pytest.mark.parametrize("search", ["block_influence", "angular", "last_k", "random", "distortion"])
def test_one_shot_baselines_run_on_lm_states(search: str) -> None:
    lm, task = tiny_lm(False), mc_task("cloze")
    result = prune_lm(lm, task, search, target="wide", n_remove=2, n_select=10, progress=False)
    assert result.search == search and len(result.removed) == 2 and 0 <= result.baseline_score <= 1
    if search == "block_influence":
        states = lm.run(lm.tokenize(task.prompts(task.data("wide", "select", 0, 10), 0)), capture=True).states
        cos = torch.nn.functional.cosine_similarity(states[:-1].double(), states[1:].double(), dim=-1).mean(-1)
        assert_close_scaled([result.block_scores[b] for b in range(4)], 1 - cos)  # sorted, chunked rows there
    assert set(SEARCHES) >= {search}


# ---------------------------------------------------------------- short answer


def test_short_answer_loglik_selection_reuses_prefix_and_generation_selection_runs() -> None:
    lm, task = tiny_lm(False), sa_task()
    plant(lm, PLANTED)
    kw = dict(target="big", metric="loglik", max_drop=1, n_select=8, batch_size=3, progress=False)
    cached, naive = prune_lm(lm, task, **kw), prune_lm(lm, task, prefix_cache=False, **kw)
    assert cached.info["prefix_cache"] and cached.rounds == naive.rounds
    sel = lm_selection(lm, task, "big", n=8, metric="loglik")
    ref = lm.loglik(sel.prompts, [f" {ex.answer}" for ex in sel.examples]).double()
    assert_close_scaled(sel.scorer({}), ref)
    generated = prune_lm(lm, task, target="big", metric="acc", max_drop=1, n_select=8, max_new_tokens=3,
                         progress=False)
    assert generated.info["prefix_cache"] and len(generated.rounds[0]["candidates"]) == 4  # resumed decoding


def test_short_answer_evaluation_has_confidence_and_calibration() -> None:
    lm, task = tiny_lm(False), sa_task()
    ev = evaluate_lm(lm, task, {1: 0.0}, ["id"], seeds=[0], n=8, max_new_tokens=3)
    values = ev.values["id"]
    assert set(values) == {"acc", "score", "confidence", "brier"} and ev.predictions["id"].shape == (8,)
    assert np.all(np.isfinite(ev.targets["id"]))
    assert np.all((values["confidence"] > 0) & (values["confidence"] <= 1))
    np.testing.assert_allclose(values["brier"], (values["confidence"] - values["acc"]) ** 2)
    got = calibration(ev)["id"]
    assert got["n"] == 8 and sum(got["reliability"]["count"]) == 8
    assert got["confidence"] == pytest.approx(values["confidence"].mean())
    ev.values["id"] = {"acc": values["acc"], "score": values["score"]}
    with pytest.raises(ValueError, match="needs per-example confidence"):
        calibration(ev)


# ---------------------------------------------------------------- calibration


def test_calibration_equals_text_scores_calibration() -> None:
    lm, task = tiny_lm(True), mc_task(n_shots=1)
    examples = task.data("id", "heldout", 0, 16)
    ref = score_multiple_choice(lm.loglik, examples, task.prompts(examples, 0)).calibration()
    got = calibration(evaluate_lm(lm, task, None, ["id"], seeds=[0], n=16))["id"]
    assert got["ece"] == pytest.approx(ref["ece"], abs=1e-5) and got["brier"] == pytest.approx(ref["brier"], abs=1e-5)
    assert got["reliability"]["count"] == ref["reliability"]["count"] and got["n"] == 16


def test_top_choice_table_reproduces_ece_and_reliability_exactly() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(3, 0.7), size=200)
    probs[:5] = 1 / 3  # exact ties at the lowest possible confidence
    probs[5] = [1.0, 0.0, 0.0]
    labels = rng.integers(0, 3, size=200)
    correct = (probs.argmax(1) == labels).astype(float)
    table, surrogate = _top_choice_table(probs.max(1), correct)
    assert stats.ece(table, surrogate) == stats.ece(probs, labels)
    np.testing.assert_equal(stats.reliability_curve(table, surrogate), stats.reliability_curve(probs, labels))


# ---------------------------------------------------------------- errors


def test_clear_errors() -> None:
    lm, task = tiny_lm(True), mc_task()
    with pytest.raises(ConfigError, match=r"allowed: \['acc', 'prob', 'loglik'\]"):
        prune_lm(lm, task, metric="nmse", progress=False)
    with pytest.raises(ConfigError, match=r"allowed: \['acc', 'loglik'\]"):
        prune_lm(lm, sa_task(), metric="prob", progress=False)
    with pytest.raises(ConfigError, match="unknown search"):
        prune_lm(lm, task, search="magic", progress=False)
    with pytest.raises(ConfigError, match=r"pruning.protocol: 'oracle' is not allowed"):
        prune_lm(lm, task, protocol="oracle", progress=False)
    with pytest.raises(ConfigError, match="unknown distribution"):
        prune_lm(lm, task, target="nowhere", progress=False)
    with pytest.raises(ConfigError, match="choose"):
        prune_lm(lm, task, choose="worst", progress=False)
    with pytest.raises(ConfigError, match="max_drop"):
        prune_lm(lm, task, max_drop=9, progress=False)
    with pytest.raises(ValueError, match="too few"):
        prune_lm(lm, task, n_select=4, progress=False)
    assert math.isfinite(prune_lm(lm, task, "last_k", n_select=8, progress=False).selection_score)
