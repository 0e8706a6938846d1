"""Generation-scored selection without the generation loop's cost (tapioca.models.decoding, GenerationBatch).

Every test compares generated token ids exactly: greedy decoding is an argmax, so batched, packed, cached and
resumed runs must pick the very tokens an uncached batch-1 loop picks (their logits differ by float rounding
only, far below the gaps between the top tokens of these models)."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

import tapioca
from tapioca.models.base import run_in_chunks
from tapioca.models.decoding import PROFILE, BlockRecord, greedy_decode
from tapioca.models.gates import gated, recorded_inputs, removal_gates
from tapioca.models.hf import HFModel
from tapioca.pruning.searches import PrefixRounds
from tapioca.tasks.choices import (
    ChoiceModel, GenerationBatch, generated_text, generation_batch, lm_selection, prune_lm,
)
from tapioca.tasks.text import TextExample, TextTask, score_short_answer

from conftest import CONFIGS, PLANTED, PROMPTS, build, make_task, mc_task, plant, sa_task, tiny_lm

SHARED = "one two three: "  # 16 tokens with <s>: a prefix every row shares, run once
GATES = [{}, {0: 0.0, 2: 0.5}, {1: 0.0, 3: 1.5}]  # full, skipped + scaled below, skipped + amplified


def uncached_greedy(lm: HFModel, prompt: str, gates, steps: int) -> list[int]:
    """The reference: one full forward pass (no cache) per new token at batch 1, up to and including EOS."""
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    new: list[int] = []
    for _ in range(steps):
        with torch.no_grad(), gated(lm.blocks, gates):
            token = int(lm.model(ids, use_cache=False).logits[0, -1].argmax())
        new.append(token)
        if token in lm.eos_ids():
            break
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return new


def ids_of(tokens: torch.Tensor) -> list[list[int]]:
    """Generated rows (R, S) without the -1 after each row stopped."""
    return [[t for t in row if t >= 0] for row in tokens.tolist()]


def prompt_sets() -> list[list[str]]:
    return [PROMPTS + ["x", "why not?"], [SHARED + p for p in PROMPTS + ["x", "why not?"]]]  # ragged; shared prefix


# ---------------------------------------------------------------- first-token answers: one forward pass


@pytest.mark.parametrize("family", list(CONFIGS))
def test_first_token_answers_are_greedy_generations_first_token(family: str) -> None:
    lm = build(family)
    for prompts in prompt_sets():
        batch = generation_batch(lm, prompts, 1)
        assert not batch.decodes and lm.shared_prefix(batch.tokens) == (16 if prompts[0].startswith(SHARED) else 0)
        for gates in GATES:
            got = run_in_chunks(ChoiceModel(lm), batch, gates, capture=False, chunk=2).predictions  # packed rows
            assert got.shape == (len(prompts), 1)
            want = [uncached_greedy(lm, prompts[e], gates, 1) for e in batch.example.tolist()]
            assert ids_of(got) == want, (family, gates)


def test_first_token_scores_equal_generate_and_answer_rule() -> None:
    lm, task = tiny_lm(True), mc_task(n_shots=1)
    task = TextTask(dataclasses.replace(task.cfg, answer_rule="first_letter"), source=task.source)
    plant(lm, PLANTED)
    sel = lm_selection(lm, task, "wide", n=12, metric="acc", max_new_tokens=1, chunk=5)
    assert isinstance(sel.batch, GenerationBatch) and sel.score_predictions is not None
    for gates in ({}, {PLANTED: 0.0}, {0: 0.0, 3: 0.5}):
        texts = lm.generate(sel.prompts, gates, max_new_tokens=1, batch_size=1)
        want = [task.check(ex, text)[1] for ex, text in zip(sel.examples, texts)]
        np.testing.assert_array_equal(sel.scorer(gates).numpy(), want)


# ---------------------------------------------------------------- several tokens: cached, batched decoding


@pytest.mark.parametrize("family", list(CONFIGS))
def test_batched_cached_decoding_equals_the_uncached_batch1_loop(family: str) -> None:
    lm = build(family)
    outputs = []
    for prompts in prompt_sets():
        batch = generation_batch(lm, prompts, 6)
        for gates in GATES:
            got = ids_of(greedy_decode(lm, batch.tokens, gates, 6).tokens)
            assert got == [uncached_greedy(lm, prompts[e], gates, 6) for e in batch.example.tolist()], (family, gates)
            outputs.append(got)
            assert lm.n_blocks == 4 and all("forward" not in b.__dict__ for b in lm.blocks)
    assert outputs[0] != outputs[1] != outputs[2]  # the gates change the generations


def test_decoding_stops_rows_when_the_answer_is_decided_with_the_same_scores() -> None:
    lm, task = tiny_lm(False), sa_task()
    sel = lm_selection(lm, task, "big", n=10, metric="acc", max_new_tokens=8, chunk=4)
    batch = sel.batch
    full = greedy_decode(lm, batch.tokens, {}, 8).tokens
    early = greedy_decode(lm, batch.tokens, {}, 8, done=lambda text: "x" in text).tokens
    for row, cut in zip(full.tolist(), early.tolist()):
        kept = [t for t in cut if t >= 0]
        assert row[: len(kept)] == kept  # a prefix of the full generation
        text = generated_text(lm.tokenizer, kept, lm.eos_ids())
        assert "x" in text or len(kept) == 8 or kept[-1] in lm.eos_ids()
    for gates in ({}, {PLANTED: 0.0}, {1: 0.0, 2: 0.5}):
        reference = score_short_answer(lambda ps, max_new_tokens: lm.generate(ps, gates, max_new_tokens, 1),
                                       sel.examples, sel.prompts, max_new_tokens=8)
        np.testing.assert_array_equal(sel.scorer(gates).numpy(), reference.correct.astype(float))


def mlp_calls(lm: HFModel) -> tuple[list[int], list]:
    """Per block, how often its MLP ran (a skipped block's does not); the handles to remove."""
    calls = [0] * lm.n_blocks
    handles = [block.mlp.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(lm.blocks)]
    return calls, handles


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_resumed_prompt_gives_the_same_generations_and_skips_the_blocks_below(family: str) -> None:
    lm = build(family)
    prompts = prompt_sets()[1]
    batch = generation_batch(lm, prompts, 5).tokens
    prompt_calls = 2 if lm.generation_prefix([lm.tokenizer(p)["input_ids"] for p in prompts], 5) else 1
    base = greedy_decode(lm, batch, removal_gates([1]), 5, record=True)
    assert base.record is not None and len(base.record) == 4 and base.record[1].updates == ()
    assert base.record[1].inputs[-1] is base.record[2].inputs[-1]  # a removed block passes the stream on
    for c, alpha in ((0, 0.0), (2, 0.0), (2, 0.5), (3, 2.0)):
        gates = {1: 0.0, c: alpha}
        scratch = greedy_decode(lm, batch, gates, 5).tokens
        calls, handles = mlp_calls(lm)
        PROFILE.reset()
        try:
            resumed = greedy_decode(lm, batch, gates, 5, record=True, inputs=base.record, start=c)
        finally:
            for handle in handles:
                handle.remove()
        assert torch.equal(resumed.tokens, scratch), (c, alpha)
        steps = PROFILE.steps  # decode steps run every kept block
        assert steps > 0
        assert all(calls[b] == steps for b in range(c) if b != 1)  # no prompt pass below the resumed block
        assert all(calls[b] == steps + prompt_calls for b in range(c, 4) if gates.get(b, 1.0) != 0.0)
        for c2 in range(c + 1, 4):  # a resumed run's record is a base too (TALE's next round)
            deeper = {**gates, c2: 0.0}
            assert torch.equal(greedy_decode(lm, batch, deeper, 5, inputs=resumed.record, start=c2).tokens,
                               greedy_decode(lm, batch, deeper, 5).tokens)


def test_a_record_of_another_configuration_or_batch_is_refused() -> None:
    lm = build("llama")
    batch = generation_batch(lm, prompt_sets()[1], 3).tokens
    base = greedy_decode(lm, batch, removal_gates([1]), 3, record=True)
    with pytest.raises(ValueError, match="no cache entries for kept blocks \\[1\\]"):
        greedy_decode(lm, batch, {}, 3, inputs=base.record, start=2)
    with pytest.raises(ValueError, match="prompt call"):
        greedy_decode(lm, generation_batch(lm, prompt_sets()[0], 3).tokens, removal_gates([1, 2]), 3,
                      inputs=base.record, start=2)
    copy = pickle.loads(pickle.dumps(base.record[2]))
    assert isinstance(copy, BlockRecord) and len(copy) == len(base.record[2]) == 2 + 4  # 2 inputs, 2 x (K, V)
    assert all(torch.equal(a, b) for a, b in zip(copy, base.record[2]))


def test_decoding_refuses_generic_recording_and_injection() -> None:
    lm = build("llama")
    batch = generation_batch(lm, PROMPTS, 3)
    with recorded_inputs(lm.blocks), pytest.raises(RuntimeError, match="pre-hooks"):
        run_in_chunks(ChoiceModel(lm), batch, {}, capture=False, chunk=8)
    with recorded_inputs(lm.blocks) as inputs:  # one new token is one forward pass: generic resumption works
        ChoiceModel(lm).run(generation_batch(lm, PROMPTS, 1), {})
    assert all(inputs)


# ---------------------------------------------------------------- TALE's rounds


@pytest.mark.parametrize("max_new_tokens, keep_bytes", [(1, 2**31), (4, 2**31), (4, 1)])
def test_prefix_rounds_give_every_candidate_the_plain_runs_generations(max_new_tokens: int, keep_bytes: int) -> None:
    lm, task = tiny_lm(False), sa_task()
    plant(lm, PLANTED)
    sel = lm_selection(lm, task, "big", n=9, metric="acc", max_new_tokens=max_new_tokens, chunk=4)
    seen: list[torch.Tensor] = []

    def score(predictions: torch.Tensor, batch: GenerationBatch) -> torch.Tensor:
        seen.append(predictions)
        return -predictions[:, 0].double()  # varies by candidate, so the winners differ by round

    rounds = PrefixRounds(sel.model, sel.batch, score, chunk=4, keep_bytes=keep_bytes)
    removed: list[int] = []
    rounds.base([])
    for _ in range(3):
        candidates = [b for b in range(4) if b not in removed]
        scores = rounds(removed, candidates)
        got = seen[-len(candidates):]
        for b, preds in zip(candidates, got):
            want = run_in_chunks(sel.model, sel.batch, removal_gates([*removed, b]), capture=False, chunk=4)
            assert torch.equal(preds, want.predictions), (removed, b)
        removed.append(max(scores, key=lambda b: (scores[b], -b)))
    assert any(first > 0 for _, first in rounds.passes)  # candidates resumed above block 0


def relabelled(lm: HFModel, task: TextTask, gates, max_new_tokens: int) -> TextTask:
    """The short-answer questions with the model's own generation under ``gates`` as the gold answer."""
    pools = {}
    for dist, pool in task.source.examples.items():
        texts = lm.generate(task.prompts(pool, 0), gates, max_new_tokens=max_new_tokens, batch_size=16)
        pools[dist] = [TextExample(ex.question, text) for ex, text in zip(pool, texts)]
    return make_task(pools)


def test_tale_on_generation_scores_equals_the_plain_loop_and_reuses_the_prefix() -> None:
    lm, task = tiny_lm(False), sa_task()
    plant(lm, PLANTED)
    task = relabelled(lm, task, {PLANTED: 0.0}, 4)
    kw = dict(target="big", metric="acc", max_drop=2, n_select=12, batch_size=4, max_new_tokens=4, progress=False)
    fast, plain = prune_lm(lm, task, **kw), prune_lm(lm, task, prefix_cache=False, **kw)
    assert fast.info["prefix_cache"] and not plain.info["prefix_cache"]
    assert fast.rounds == plain.rounds and fast.removed == plain.removed
    assert fast.rounds[0]["chosen"] == PLANTED and fast.rounds[0]["score"] == 1.0 > fast.baseline_score
    assert any(first > 0 for _, first in fast.info["passes"])
    mc = mc_task(n_shots=1)
    lettered = TextTask(dataclasses.replace(mc.cfg, answer_rule="first_letter"), source=mc.source)
    letters_lm = tiny_lm(True)
    plant(letters_lm, PLANTED)
    for max_new_tokens in (1, 3):
        kw = dict(target="wide", metric="acc", max_drop=2, n_select=12, batch_size=4, max_new_tokens=max_new_tokens,
                  progress=False, epsilon=1.0)
        fast, plain = prune_lm(letters_lm, lettered, **kw), prune_lm(letters_lm, lettered, prefix_cache=False, **kw)
        assert fast.rounds == plain.rounds and fast.info["prefix_cache"]
    with pytest.raises(RuntimeError, match="racing"):  # racing resumes by generic hooks: refused, not wrong
        tapioca.prune(lm, task, "tale", "target", "big", metric="acc", n_select=12, batch_size=4, max_new_tokens=3,
                      max_drop=1, racing_delta=0.05, racing_min=4, progress=False)


def test_benchmark_generation_case_times_the_batch1_generate_loop_against_tale() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import search_speed as bench
    import speed_cases

    lm, task = tiny_lm(False), sa_task()
    plant(lm, PLANTED)
    task = relabelled(lm, task, {PLANTED: 0.0}, 3)
    case = speed_cases.lm_generation_case("tiny-gen", lm, task, "big", 6, 3)
    rows = bench.compare(case, 0.08, 1, 4, ablation=False)
    assert bench.verdict(rows) == f"model=tiny-gen speedup_vs_naive={rows[0].seconds / rows[1].seconds:.2f} " \
                                  "identical_selection=true"
    assert rows[0].result.removed == rows[1].result.removed == [PLANTED]
    assert 0 < rows[1].flops < rows[0].flops  # resumed prompts compute fewer blocks
    assert "decode sharing (tiny-gen)" in bench.decode_sharing_line(case, rows[1])
