"""LM controls for TALE: SLEB-style label-free search, weight pruning of causal LMs, last-token norm matching."""

from __future__ import annotations

import pytest
import torch

from tapioca.analysis.geometry import profile
from tapioca.analysis.interventions import last_token_norm_matched, last_token_norms
from tapioca.errors import ConfigError, DataError
from tapioca.models.icl import ICLModel
from tapioca.models.packing import pack_spans
from tapioca.models.gates import gated, removal_gates
from tapioca.models.hf import HFModel, common_prefix, TokenBatch
from tapioca.pruning.searches import SearchContext, get_search
from tapioca.pruning.sleb import sleb_search
from tapioca.pruning.weights import (block_parameter_count, input_norms, magnitude_prune, n_prunable,
                                     prunable_weights, wanda_prune)
from tapioca.tasks.choices import (ChoiceModel, choice_batch, lm_selection, prompt_batch, prompt_loglik_scorer,
                                   task_choices)
from tapioca.tasks.polyreg import PolyBatch, PolyRegTask, context_error_scorer, context_errors
from test_pruning import NoisyBlock, trained  # noqa: F401  (module-scoped fixture)

from conftest import PLANTED, build, mc_task, plant, tiny_lm

SHARED = "shared demos: 1 2 3. "  # 22 tokens with <s>: a prefix every row shares (HFModel.min_shared is 8)
PROMPTS = ["the cat sat", "a dog", "owls fly at night, or so", "yak"]
CONTINUATIONS = [" on a mat", " ran", " ok", " eats grass"]


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Equal up to ``rtol`` relative to each entry and to the values' scale (different batch shapes)."""
    got, want = got.double(), want.double()
    return torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max().clamp_min(1e-12)))


def layout(lm: HFModel, name: str) -> HFModel:
    """``lm`` set to run its rows right-padded, after a shared prefix, packed in one pass or in several."""
    lm.share_prefix, lm.pack_tokens = {"padded": (False, 0), "shared": (True, 0), "packed": (True, 512),
                                       "packs": (False, 32)}[name]
    return lm


def token_batch(lm: HFModel, shared: bool = True) -> TokenBatch:
    return lm.tokenize([SHARED * shared + p for p in PROMPTS], CONTINUATIONS)


def manual_mean_loglik(lm: HFModel, prompt: str, gates=None, start: int = 0) -> float:
    """Mean log p of each token after position ``start`` (the first token of the prompt's own text, after what
    every prompt shares) of one prompt, from a plain forward pass."""
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    with torch.no_grad(), gated(lm.blocks, gates):
        logp = lm.model(input_ids=ids).logits.float().log_softmax(-1)
    return float(logp[0, start:-1].gather(-1, ids[0, start + 1:, None]).mean())


def state_bytes(module: torch.nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in module.state_dict().items()}


def no_hooks(model) -> bool:
    return all(not b._forward_hooks and not b._forward_pre_hooks for b in model.blocks)


# ---------------------------------------------------------------------------------------------------------
# Label-free scorers


@pytest.mark.parametrize("name", ["padded", "shared", "packed", "packs"])
def test_prompt_loglik_is_each_prompts_mean_token_loglik_in_every_layout(name: str) -> None:
    lm = layout(tiny_lm(False), name)
    prompts = [SHARED + p for p in PROMPTS]
    for gates in ({}, {1: 0.0, 2: 0.5}):
        got = prompt_loglik_scorer(lm, prompts, chunk=3)(gates)
        rows = [lm.tokenizer(p)["input_ids"] for p in prompts]
        shared = common_prefix(rows)  # the demonstrations every prompt shares are not the prompt's own text
        assert shared >= len(lm.tokenizer(SHARED)["input_ids"]) - 1
        want = torch.tensor([manual_mean_loglik(lm, p, gates, min(shared, len(r) - 2)) for p, r in zip(prompts, rows)],
                            dtype=torch.float64)
        assert got.dtype == torch.float64 and got.shape == (4,) and close(got, want)


def test_prompt_loglik_needs_two_tokens_and_reads_no_answers() -> None:
    lm, task = tiny_lm(False), mc_task("cloze")
    examples = task.data("wide", "select", 0, 8)
    relabelled = [type(ex)(ex.question, (int(ex.answer) + 1) % 4, ex.choices) for ex in examples]
    prompts, other = task.prompts(examples, 0), task.prompts(relabelled, 0)
    assert prompts == other  # answers are never part of a zero-shot prompt; the scorer takes prompts only
    assert torch.equal(prompt_loglik_scorer(lm, prompts, 4)({}), prompt_loglik_scorer(lm, other, 4)({}))
    with pytest.raises(DataError, match=r"prompts \[1\] have fewer than 2 tokens"):
        prompt_loglik_scorer(lm, ["ab", ""], 4)  # "" is <s> alone


@pytest.fixture
def testbed(tiny_model, tiny_cfg):
    task = PolyRegTask(tiny_cfg.task)
    return tiny_model, task, task.data("id", "select", 0, 24)


def test_context_errors_use_the_context_pairs_and_never_the_query_label(testbed) -> None:
    model, task, batch = testbed
    scorer = context_error_scorer(model, batch, chunk=7)
    base = scorer({})
    with torch.no_grad():
        preds = model(batch.xs, batch.ys)[:, :-1]
    assert close(base, -(preds.double() - batch.ys[:, :-1].double()).square().mean(1))
    queried = batch.ys.clone()
    queried[:, -1] += 100.0
    assert torch.equal(context_error_scorer(model, PolyBatch(batch.xs, queried, batch.degrees), 7)({}), base)
    context = batch.ys.clone()
    context[:, 0] += 1.0
    assert not torch.equal(context_error_scorer(model, PolyBatch(batch.xs, context, batch.degrees), 7)({}), base)
    pruned = model.slice_blocks([1])
    assert close(context_errors(model, batch, {1: 0.0}, chunk=5), context_errors(pruned, batch), 1e-5)
    assert model.query_only and no_hooks(model)  # run's query-only mode untouched


# ---------------------------------------------------------------------------------------------------------
# SLEB


def fitted_lm(prompts: list[str], steps: int = 40) -> HFModel:
    """A tiny LM fitted to ``prompts`` without block PLANTED, then with that block planted: the one block
    whose removal makes the model explain the texts well again (a random LM explains no text better)."""
    lm = tiny_lm(False)
    batch, _ = prompt_batch(lm, prompts)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.Adam(lm.model.parameters(), lr=3e-3)
    for _ in range(steps):
        with gated(lm.blocks, {PLANTED: 0.0}):
            loss = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    lm.model.requires_grad_(False)
    plant(lm, PLANTED)
    return lm


def test_sleb_removes_a_planted_block_on_text_by_prompt_loglik() -> None:
    task = mc_task("cloze")
    lm = fitted_lm(task.prompts(task.data("wide", "select", 0, 10), 0))
    sel = lm_selection(lm, task, "wide", n=10, metric="prob", chunk=8)
    free = prompt_loglik_scorer(lm, sel.prompts, chunk=4)
    ctx = SearchContext(model=sel.model, batch=sel.batch, scorer=sel.scorer, n_remove=2, progress=False,
                        unlabelled_scorer=free)
    result = get_search("sleb")(ctx)
    assert get_search("sleb") is sleb_search and result.search == "sleb"
    assert result.removed[0] == PLANTED and result.removed == result.path == result.best and len(result.removed) == 2
    first = result.rounds[0]["candidates"]
    second = result.rounds[1]["candidates"]
    assert len(first) == 4 and len(second) == 3 and str(PLANTED) not in second
    assert first[str(PLANTED)] == max(first.values()) > result.info["label_free_scores"][0]
    assert result.block_scores == {int(b): s for b, s in first.items()}
    assert first[str(PLANTED)] == pytest.approx(float(free(removal_gates([PLANTED])).mean()))
    assert result.baseline_score == pytest.approx(float(sel.scorer({}).mean()))  # labels: reported, not used
    assert result.selection_score == pytest.approx(float(sel.scorer(result.gates).mean()))


def test_sleb_removes_a_planted_noise_block_on_the_testbed(trained) -> None:  # noqa: F811
    cfg, model, task = trained  # an untrained model predicts about 0 everywhere: no block matters
    planted = ICLModel(cfg.model)
    planted.load_state_dict(model.state_dict())
    planted.backbone.h[2] = NoisyBlock(planted.backbone.h[2], scale=3.0)
    planted.eval()
    batch = task.data("id", "select", 0, 64)
    labelled = lambda gates: task.score(planted.run(batch, gates).predictions, batch, "nmse")  # noqa: E731
    ctx = SearchContext(model=planted, batch=batch, scorer=labelled, n_remove=2, progress=False,
                        unlabelled_scorer=context_error_scorer(planted, batch, 32))
    result = sleb_search(ctx)
    assert result.removed[0] == 2 and len(result.removed) == 2 and 2 not in map(int, result.rounds[1]["candidates"])
    first = result.rounds[0]["candidates"]
    assert first["2"] > max(v for b, v in first.items() if b != "2")
    assert result.selection_score == pytest.approx(float(labelled(result.gates).double().mean()))


def test_sleb_needs_a_label_free_scorer_and_a_possible_budget(testbed) -> None:
    model, task, batch = testbed
    ctx = SearchContext(model=model, batch=batch, scorer=lambda g: torch.zeros(3), progress=False)
    with pytest.raises(ConfigError, match="'sleb' needs a label-free scorer.*unlabelled_scorer"):
        sleb_search(ctx)
    ctx.unlabelled_scorer, ctx.n_remove = ctx.scorer, 4
    with pytest.raises(ConfigError, match=r"n_remove: 4.*1\.\.3"):
        sleb_search(ctx)


# ---------------------------------------------------------------------------------------------------------
# Weight pruning of LMs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_magnitude_prune_of_an_lm_and_its_choice_model(family: str) -> None:
    lm = build(family)
    lm.source = "a folder"  # a loaded model's source must not follow its pruned copy
    batch = token_batch(lm)
    before, preds = state_bytes(lm.model), lm.run(batch).predictions
    budget = block_parameter_count(lm, [1])
    assert budget == lm.block_parameter_count(1) == block_parameter_count(ChoiceModel(lm), [1])
    zeros = lambda m: sum(int((w.weight == 0).sum()) for _, w in prunable_weights(m.blocks))  # noqa: E731
    for model in (lm, ChoiceModel(lm)):
        result = magnitude_prune(model, budget)
        pruned = result.model
        copy = pruned.lm if isinstance(pruned, ChoiceModel) else pruned
        assert type(pruned) is type(model) and isinstance(copy, HFModel) and copy.model is not lm.model
        assert result.n_zeroed == budget == zeros(pruned) - zeros(lm) and result.n_prunable == n_prunable(lm)
        assert copy.tokenizer is lm.tokenizer and copy.source is None and lm.source == "a folder"
        assert copy.share_prefix == lm.share_prefix and copy.pack_tokens == lm.pack_tokens
        got = copy.run(batch).predictions
        assert got.shape == preds.shape and not torch.allclose(got, preds)
    assert state_bytes(lm.model) == before and torch.equal(lm.run(batch).predictions, preds)


def row_norms(lm: HFModel, batch: TokenBatch) -> dict[str, torch.Tensor]:
    """Input norms summed over single-row runs: every real token once, no padding, no shared prefix pass."""
    parts = [input_norms(lm, batch.slice(i, i + 1)) for i in range(len(batch))]
    return {name: sum(p[name].double().square() for p in parts).sqrt() for name in parts[0]}


@pytest.mark.parametrize("packs", [True, False])
def test_wanda_calibration_counts_every_real_token_once(monkeypatch, packs: bool) -> None:
    lm = build("llama")
    batch = token_batch(lm)
    assert lm.shared_prefix(batch) > 0 and (batch.attention_mask == 0).any() and lm.packs(batch)
    if not packs:  # a model that cannot pack (sliding windows, other attention): one row at a time
        monkeypatch.setattr(HFModel, "packs", lambda self, b: False)
    want = row_norms(lm, batch)
    lm.pack_tokens = 0  # calibration packs anyway, then restores the settings
    got = input_norms(lm, batch, chunk=3)
    assert (lm.share_prefix, lm.pack_tokens) == (True, 0) and lm.query_positions is None and no_hooks(lm)
    assert set(got) == set(want) and all(close(got[n], want[n]) for n in want)
    padded = input_norms(layout(lm, "padded"), batch, forward=lambda m, b: m.run(b))  # pads and all, as before
    assert not all(close(padded[n], want[n]) for n in want)


def test_wanda_prune_of_a_choice_model_on_its_choice_batch() -> None:
    lm, task = tiny_lm(False), mc_task("cloze")
    examples = task.data("wide", "select", 0, 6)
    conts, labels = task_choices(examples, "cloze")
    batch = choice_batch(lm, task.prompts(examples, 0), conts, labels)
    model = ChoiceModel(lm)
    norms = input_norms(model, batch, chunk=5)
    direct = input_norms(lm, batch.tokens, chunk=5)
    assert all(close(norms[n], direct[n]) for n in norms)
    before, preds = state_bytes(lm.model), model.run(batch).predictions
    budget = block_parameter_count(model, [0, 3])
    result = wanda_prune(model, batch, budget, chunk=5)
    assert result.n_zeroed == budget and result.info["calibration_examples"] == len(batch)
    assert isinstance(result.model, ChoiceModel) and result.model.lm.tokenizer is lm.tokenizer
    got = result.model.run(batch).predictions
    assert got.shape == preds.shape and not torch.allclose(got, preds)
    assert state_bytes(lm.model) == before and no_hooks(lm) and no_hooks(result.model)
    for name, module in prunable_weights(result.model.blocks):  # Wanda: every output row of a matrix alike
        per_row = (module.weight == 0).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1, name
    token_result = wanda_prune(lm, token_batch(lm), budget, chunk=2)
    assert token_result.n_zeroed == budget and isinstance(token_result.model, HFModel)


# ---------------------------------------------------------------------------------------------------------
# Norm matching at the last prompt token


def test_last_token_norms_are_the_state_norm_profile() -> None:
    lm = tiny_lm(False)
    batch = token_batch(lm)
    states = lm.run(batch, capture=True).states
    norms = last_token_norms(lm, batch, chunk=2)
    assert norms.shape == (lm.n_blocks,) and close(norms, torch.tensor(profile(states).norm[1:]))
    task = mc_task("cloze")
    examples = task.data("wide", "select", 0, 5)
    conts, labels = task_choices(examples, "cloze")
    choices = choice_batch(lm, task.prompts(examples, 0), conts, labels)
    plain = last_token_norms(lm, lm.tokenize(task.prompts(examples, 0)), chunk=5)
    assert close(last_token_norms(ChoiceModel(lm), choices, chunk=7), plain)  # one state per example


@pytest.mark.parametrize("name", ["padded", "shared", "packed", "packs"])
@pytest.mark.parametrize("gates", [{}, {1: 0.0, 2: 0.5}])
def test_matching_sets_the_last_prompt_token_norms_in_every_layout(name: str, gates) -> None:
    lm = layout(build("llama"), name)
    batch = token_batch(lm, shared=name in ("shared", "packed"))
    assert (lm.shared_prefix(batch) > 0) == (name in ("shared", "packed"))
    assert lm.packs(batch) == (name in ("packed", "packs"))
    full = lm.run(batch, gates, capture=True)
    targets = {1: 3.0, 3: 8.0}
    with last_token_norm_matched(lm, targets):
        got = lm.run(batch, gates, capture=True)
    for block, norm in targets.items():
        assert close(got.states[block + 1].norm(dim=-1), torch.full((len(batch),), norm))
    assert torch.equal(got.states[:2], full.states[:2])  # below the first matched block: untouched
    cos = torch.nn.functional.cosine_similarity(got.states[2], full.states[2], dim=-1)
    assert close(cos, torch.ones_like(cos), 1e-5)  # block 1's own output: rescaled, same direction
    assert not close(got.states[3], full.states[3], 1e-3)  # block 2 sees the rescaled query
    padded = layout(build("llama"), "padded")
    with last_token_norm_matched(padded, targets):
        want = padded.run(batch, gates, capture=True)
    assert close(got.states, want.states, 1e-4) and close(got.predictions, want.predictions, 1e-4)
    assert no_hooks(lm) and lm.query_positions is None


def block_outputs(lm: HFModel, batch: TokenBatch, block: int) -> list[torch.Tensor]:
    """Every output tensor of ``block`` during one run (hooked after any hook already registered)."""
    seen: list[torch.Tensor] = []
    handle = lm.blocks[block].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple)
                                                                                  else out))
    try:
        lm.run(batch)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", ["padded", "shared", "packs"])
def test_matching_only_touches_the_last_prompt_token(name: str) -> None:
    lm = layout(build("llama"), name)
    batch = token_batch(lm, shared=name == "shared")
    shared = lm.shared_prefix(batch)
    full = block_outputs(lm, batch, 1)
    with last_token_norm_matched(lm, {1: 5.0}):
        got = block_outputs(lm, batch, 1)
    lengths = batch.attention_mask.sum(1)
    spans = pack_spans(lengths.tolist(), lm.pack_tokens)  # "packs": rows end to end, a few per pass
    assert len(got) == len(full) == (2 if shared else len(spans) if name == "packs" else 1)
    changed = [(g - f).abs().amax(-1) > 0 for g, f in zip(got, full)]  # (b, T) per call
    if shared:
        assert not changed[0].any()  # the shared prefix holds no query
    if name == "packs":
        assert max(j - i for i, j in spans) > 1  # a pack of several rows
        for c, (i, j) in zip(changed, spans):
            starts = torch.cumsum(lengths[i:j], 0) - lengths[i:j]
            assert set(c[0].nonzero().flatten().tolist()) == set((starts + batch.query[i:j]).tolist())
    else:
        want = torch.zeros_like(changed[-1])
        want[torch.arange(len(batch)), batch.query - shared] = True
        assert torch.equal(changed[-1], want)
        rows = torch.arange(len(batch))
        assert close(got[-1][rows, batch.query - shared].norm(dim=-1), torch.full((len(batch),), 5.0))
    with last_token_norm_matched(lm, {0: 5.0}):  # generation has no prompt query: left alone
        assert lm.generate(PROMPTS[:2], max_new_tokens=3) == layout(build("llama"), name).generate(PROMPTS[:2],
                                                                                                  max_new_tokens=3)


def test_matching_through_a_choice_model_and_on_the_testbed(testbed) -> None:
    lm, task = tiny_lm(False), mc_task("cloze")
    examples = task.data("wide", "select", 0, 5)
    conts, labels = task_choices(examples, "cloze")
    choices = choice_batch(lm, task.prompts(examples, 0), conts, labels)
    model = ChoiceModel(lm)
    with last_token_norm_matched(model, {2: 4.0}):
        states = model.run(choices, capture=True).states
        assert close(last_token_norms(model, choices, chunk=6)[2:3], torch.tensor([4.0]))
    assert close(states[3].norm(dim=-1), torch.full((5,), 4.0))
    icl, _, batch = testbed
    with last_token_norm_matched(icl, {0: 2.0, 2: 6.0}):
        got = icl.run(batch, capture=True).states
    assert close(got[1].norm(dim=-1), torch.full((len(batch),), 2.0))
    assert close(got[3].norm(dim=-1), torch.full((len(batch),), 6.0))


def test_matching_hooks_are_removed_after_an_error() -> None:
    lm = tiny_lm(False)
    batch = token_batch(lm)
    before = lm.run(batch).predictions
    with pytest.raises(RuntimeError, match="boom"):
        with last_token_norm_matched(lm, {0: 1.0, 3: 1.0}):
            assert not no_hooks(lm)
            raise RuntimeError("boom")
    assert no_hooks(lm) and torch.equal(lm.run(batch).predictions, before)


def test_sleb_with_prefix_rounds_selects_and_scores_as_plain_passes() -> None:
    """SLEB through tapioca.prune resumes candidates from recorded block inputs (PrefixRounds over the prompts'
    own tokens): the same label-free scores and the same blocks as scoring every candidate from scratch."""
    import tapioca

    lm, task = tiny_lm(True), mc_task(n=40)
    kw = dict(target="wide", metric="loglik", n_select=12, batch_size=4, n_remove=2, progress=False)
    fast = tapioca.prune(lm, task, "sleb", **kw)
    plain = tapioca.prune(lm, task, "sleb", prefix_cache=False, **kw)
    assert fast.removed == plain.removed
    for a, b in zip(fast.rounds, plain.rounds):
        assert a["candidates"].keys() == b["candidates"].keys()
        for k in a["candidates"]:
            assert a["candidates"][k] == pytest.approx(b["candidates"][k], rel=1e-4, abs=1e-5)
