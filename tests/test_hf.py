"""Tests for tapioca.models.hf on tiny random causal LMs of five families and a tiny character tokenizer."""

from __future__ import annotations

import math
import string

import pytest
import torch
import transformers
from torch import nn

from tapioca.errors import CheckpointError, ConfigError, DataError
from tapioca.models.base import chunk_spans, run_in_chunks
from tapioca.models.gates import gated, removal_gates
from tapioca.models.hf import (
    ChatTemplateError, ContextTooLongError, HFModel, UnsupportedModelError, blocks_removed, find_blocks,
    load_causal_lm, remove_blocks, resolve_dtype,
)

from conftest import (
    BLOCK_PATHS, CONFIGS, CONTINUATIONS, PROMPTS, WINDOW, assert_close_scaled, build, char_tokenizer,
)

@pytest.fixture(params=list(CONFIGS))
def lm(request) -> HFModel:
    return build(request.param)


@pytest.fixture
def gemma() -> HFModel:
    return build("gemma3")


@pytest.fixture
def llama() -> HFModel:
    return build("llama")


def logits(lm: HFModel, ids: torch.Tensor, gates=None) -> torch.Tensor:
    with torch.no_grad(), gated(lm.blocks, gates):
        return lm.model(ids, use_cache=False).logits


def ids_of(lm: HFModel, text: str) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def greedy_uncached(lm: HFModel, prompt: str, gates, steps: int) -> str:
    """Reference decoding: a full forward pass per new token, no cache."""
    ids = ids_of(lm, prompt)
    new = []
    for _ in range(steps):
        token = int(logits(lm, ids, gates)[0, -1].argmax())
        if token == lm.tokenizer.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return lm.tokenizer.decode(new, skip_special_tokens=True)


LONG = "the quick brown fox jumps over the lazy dog"  # longer than the sliding window of 4


# ---------------------------------------------------------------- blocks


@pytest.mark.parametrize("family", list(CONFIGS))
def test_find_blocks_by_structure(family: str) -> None:
    lm = build(family)
    assert find_blocks(lm.model) is lm.model.get_submodule(BLOCK_PATHS[family])
    assert lm.n_blocks == 4 and lm.device == torch.device("cpu")
    assert lm.block_parameter_count(1) == sum(p.numel() for p in lm.blocks[1].parameters()) > 0


def test_find_blocks_unsupported_structure() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = transformers.LlamaConfig(num_hidden_layers=3)
            self.body = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
            self.heads = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])

    with pytest.raises(UnsupportedModelError, match=r"nn.ModuleList of config.num_hidden_layers=3.*heads \(2\)"):
        find_blocks(Flat())
    with pytest.raises(UnsupportedModelError, match="no .config"):
        find_blocks(nn.Linear(2, 2))


def test_alpha_one_is_bit_identical(lm: HFModel) -> None:
    ids = ids_of(lm, LONG)
    assert torch.equal(logits(lm, ids, {i: 1.0 for i in range(4)}), logits(lm, ids))
    batch = lm.tokenize(PROMPTS, CONTINUATIONS)
    base, ones = lm.run(batch, capture=True), lm.run(batch, {0: 1.0, 3: 1.0}, capture=True)
    assert torch.equal(base.predictions, ones.predictions) and torch.equal(base.states, ones.states)


@pytest.mark.parametrize("removed", [[0], [1, 2], [3], [0, 2]])
def test_pruned_logits_equal_gated_logits(lm: HFModel, removed: list[int]) -> None:
    ids = ids_of(lm, LONG)
    pruned = lm.pruned_copy(removed)
    assert pruned.n_blocks == 4 - len(removed) and lm.n_blocks == 4  # the original is untouched
    expected = logits(lm, ids, removal_gates(removed))
    assert_close_scaled(logits(pruned, ids), expected)
    assert not torch.allclose(logits(lm, ids), expected, atol=1e-3)
    for new_index, layer in enumerate(pruned.blocks):
        assert all(m.layer_idx == new_index for m in layer.modules() if hasattr(m, "layer_idx"))
    assert pruned.model.config.num_hidden_layers == 4 - len(removed)
    layer_types = getattr(lm.model.config, "layer_types", None)
    if layer_types is not None:
        assert pruned.model.config.layer_types == [t for i, t in enumerate(layer_types) if i not in removed]


def test_gemma_untrimmed_layer_types_would_break_pruning(gemma: HFModel) -> None:
    ids = ids_of(gemma, LONG)
    pruned = gemma.pruned_copy([0])  # every later layer changes between sliding and full attention
    assert pruned.model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    expected = logits(gemma, ids, {0: 0.0})
    assert_close_scaled(logits(pruned, ids), expected)
    pruned.model.config.layer_types = gemma.model.config.layer_types[:3]
    assert not torch.allclose(logits(pruned, ids), expected, atol=1e-3)


def test_gpt2_config_counts_follow() -> None:
    lm = build("gpt2").pruned_copy([1])
    assert lm.model.config.n_layer == 3 and lm.model.config.num_hidden_layers == 3


def test_blocks_removed_restores_everything(gemma: HFModel) -> None:
    ids = ids_of(gemma, LONG)
    before, blocks, types = logits(gemma, ids), gemma.blocks, list(gemma.model.config.layer_types)
    with blocks_removed(gemma.model, [1]):
        assert gemma.n_blocks == 3 and gemma.blocks[1].self_attn.layer_idx == 1
    assert gemma.blocks is blocks and gemma.model.config.layer_types == types
    assert [b.layer_idx for b in gemma.blocks] == [0, 1, 2, 3] and gemma.model.config.num_hidden_layers == 4
    assert torch.equal(logits(gemma, ids), before)


def test_remove_blocks_rejects_bad_requests(llama: HFModel) -> None:
    with pytest.raises(ConfigError, match="allowed: integers 0..3"):
        remove_blocks(llama.model, [4])
    with pytest.raises(ConfigError, match="cannot remove all 4 blocks"):
        remove_blocks(llama.model, [0, 1, 2, 3])
    torch.manual_seed(0)
    scaled = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=3, n_head=4, scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ConfigError, match="layer_idx"):
        remove_blocks(scaled, [0])
    assert len(remove_blocks(scaled, [2]).transformer.h) == 2  # removing the last block renumbers nothing


def test_save_reload_gives_the_same_logits(lm: HFModel, tmp_path) -> None:
    ids = ids_of(lm, LONG)
    pruned = lm.pruned_copy([1])
    folder = pruned.save(tmp_path / "pruned")
    assert (folder / "model.safetensors").is_file() and not (tmp_path / ".pruned.tmp").exists()
    model, tokenizer = load_causal_lm(folder)
    reloaded = HFModel(model, tokenizer)
    assert reloaded.n_blocks == 3 and model.dtype == torch.float32 and not model.training
    assert torch.equal(logits(reloaded, ids), logits(pruned, ids))
    assert pruned.save(folder) == folder  # overwriting an existing folder works


# ---------------------------------------------------------------- generation


def test_cached_generation_equals_uncached_greedy(lm: HFModel) -> None:
    # a skipped block 0 inside a left-padded batch is the case where gating alone breaks the KV cache
    outputs = []
    for gates in ({}, {0: 0.0, 2: 0.5}):
        got = lm.generate(PROMPTS, gates, max_new_tokens=6, batch_size=3)
        assert got == [greedy_uncached(lm, p, gates, 6) for p in PROMPTS]
        assert lm.n_blocks == 4 and all("forward" not in b.__dict__ for b in lm.blocks)
        outputs.append(got)
    assert outputs[0] != outputs[1]


def test_generation_confidence_is_the_probability_of_the_greedy_answer_line(llama: HFModel) -> None:
    gates = {1: 0.0, 2: 0.5}
    texts, confidence = llama.generate_with_confidence(PROMPTS, gates, max_new_tokens=5, batch_size=2, stop="a")
    assert texts == llama.generate(PROMPTS, gates, max_new_tokens=5, batch_size=2)
    for prompt, conf in zip(PROMPTS, confidence.tolist()):
        ids, total = ids_of(llama, prompt), 0.0
        for _ in range(5):  # uncached reference: sum log p of greedy tokens before EOS or a token with "a"
            logprobs = logits(llama, ids, gates)[0, -1].double().log_softmax(-1)
            token = int(logprobs.argmax())
            if token == llama.tokenizer.eos_token_id or "a" in llama.tokenizer.decode([token]):
                break
            total += float(logprobs[token])
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert_close_scaled(math.log(conf), total)
        assert 0 < conf <= 1


def test_gated_generation_equals_pruned_model(gemma: HFModel) -> None:
    got = gemma.generate([LONG], {1: 0.0}, max_new_tokens=8)
    assert got == gemma.pruned_copy([1]).generate([LONG], max_new_tokens=8)


# ---------------------------------------------------------------- tokenize, run, loglik


def test_tokenize_right_pads_and_marks_targets(llama: HFModel) -> None:
    batch = llama.tokenize(["ab", "abcd"], ["x", "yz"])
    assert batch.input_ids.tolist() == [[1, 3, 4, 26, 2, 2, 2], [1, 3, 4, 5, 6, 27, 28]]  # pad = </s>
    assert batch.attention_mask[0].tolist() == [1] * 4 + [0] * 3 and batch.attention_mask[1].all()
    assert batch.query.tolist() == [2, 4]
    assert batch.target_mask.tolist() == [[False] * 3 + [True] + [False] * 3, [False] * 5 + [True, True]]
    assert llama.tokenizer.pad_token == "</s>" and len(llama.tokenizer) == 48  # no new token
    part = batch.slice(0, 1)
    assert len(part) == 1 and part.input_ids.shape == (1, 4)  # trailing padding dropped
    with pytest.raises(DataError, match="2 prompts but 1 continuations"):
        llama.tokenize(["a", "b"], ["c"])
    with pytest.raises(DataError, match="continuation 0"):
        llama.tokenize(["a"], [""])


def test_too_long_context_raises(llama: HFModel) -> None:
    with pytest.raises(ContextTooLongError, match="is 66 tokens but the model window is 64"):
        llama.tokenize(["a" * 60], ["b" * 5])
    with pytest.raises(ContextTooLongError, match="is 11 tokens but the model window is 10"):
        llama.tokenize(["a" * 10], max_length=10)
    with pytest.raises(ContextTooLongError, match="prompt \\+ 40 new tokens is 71 tokens"):
        llama.generate(["a" * 30], max_new_tokens=40)


def test_loglik_equals_manual_log_softmax(lm: HFModel) -> None:
    got = lm.loglik(PROMPTS, CONTINUATIONS, batch_size=2)
    manual = []
    for prompt, cont in zip(PROMPTS, CONTINUATIONS):
        ctx = lm.tokenizer(prompt)["input_ids"]
        tgt = lm.tokenizer(cont, add_special_tokens=False)["input_ids"]
        logprobs = logits(lm, torch.tensor([ctx + tgt]))[0].log_softmax(-1)
        manual.append(sum(float(logprobs[len(ctx) - 1 + j, t]) for j, t in enumerate(tgt)))
    assert_close_scaled(got, manual)
    pruned = lm.pruned_copy([2])
    assert_close_scaled(lm.loglik(PROMPTS, CONTINUATIONS, {2: 0.0}), pruned.loglik(PROMPTS, CONTINUATIONS))


def test_run_in_chunks_matches_one_batch(llama: HFModel) -> None:
    batch = llama.tokenize(PROMPTS, CONTINUATIONS)
    whole = llama.run(batch, {1: 0.5}, capture=True)
    chunks = run_in_chunks(llama, batch, {1: 0.5}, True, 2)
    assert_close_scaled(chunks.predictions, whole.predictions)
    assert_close_scaled(chunks.states, whole.states)


def test_spans_bound_padding_and_keep_equal_rows_together(llama: HFModel) -> None:
    ragged = llama.tokenize(["a" * n for n in (40, 30, 9, 8, 8, 7, 6, 5)])
    spans = ragged.spans(2)
    lengths = ragged.attention_mask.sum(1).tolist()
    budget = 2 * math.ceil(sum(lengths) / len(lengths))
    assert spans[0][0] == 0 and spans[-1][1] == len(ragged)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(j - i == 1 or (j - i) * max(lengths[i:j]) <= budget for i, j in spans)
    assert spans[0] == (0, 1) and spans[-1][1] - spans[-1][0] > 2  # long rows alone, short rows packed
    equal = llama.tokenize(["abc"] * 7)
    assert equal.spans(3) == [(0, 3), (3, 6), (6, 7)] and chunk_spans(equal, 3) == equal.spans(3)
    run = run_in_chunks(llama, ragged, {1: 0.5}, True, 2)
    whole = llama.run(ragged, {1: 0.5}, capture=True)
    assert_close_scaled(run.states, whole.states)


def test_the_head_runs_only_at_the_query_and_the_target_predictors(lm: HFModel) -> None:
    calls = []
    handle = lm.model.get_output_embeddings().register_forward_hook(lambda m, a, out: calls.append(out.shape))
    try:
        prompt_only = lm.run(lm.tokenize(PROMPTS), {1: 0.5})
    finally:
        handle.remove()
    with_targets = lm.run(lm.tokenize(PROMPTS, CONTINUATIONS), {1: 0.5})
    assert calls[-1][:2] == (len(PROMPTS), 1)
    handle = lm.model.get_output_embeddings().register_forward_hook(lambda m, a, out: calls.append(out.shape))
    try:
        lm.run(lm.tokenize(PROMPTS, CONTINUATIONS))
    finally:
        handle.remove()
    longest = max(len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in CONTINUATIONS)
    assert calls[-1][:2] == (len(PROMPTS), longest + 1)  # not every position after the shortest prompt
    assert_close_scaled(prompt_only.query_logprobs, with_targets.query_logprobs)
    assert (prompt_only.predictions == 0).all() and (prompt_only.token_logprobs == 0).all()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_run_captures_states_at_the_query(family: str) -> None:
    lm = build(family)
    batch = lm.tokenize(PROMPTS, CONTINUATIONS)
    out = lm.run(batch, {1: 0.0}, capture=True)
    assert out.states.shape == (5, 3, 32) and out.predictions.shape == (3,)
    rows = torch.arange(3)
    with torch.no_grad():
        embedded = lm.model.get_input_embeddings()(batch.input_ids)[rows, batch.query]
        head = lm.model.lm_head(lm.model.model.norm(out.states[-1])).log_softmax(-1)
    assert torch.allclose(out.states[0], embedded, atol=1e-6, rtol=0)
    assert torch.equal(out.states[2], out.states[1])  # block 1 skipped
    assert_close_scaled(head, out.query_logprobs)
    assert lm.run(batch).states is None
    assert torch.equal(out.token_logprobs.sum(1), out.predictions)
    assert (out.token_logprobs[~batch.target_mask] == 0).all() and (out.token_logprobs[batch.target_mask] < 0).all()


SHARED = "shared demos: 1 2 3. "  # longer than the sliding windows (4) of qwen2 and gemma3


def unshared(lm: HFModel):
    """The same adapter with prompt-prefix sharing and row packing off: one right-padded pass."""
    plain = HFModel(lm.model, lm.tokenizer)
    plain.share_prefix, plain.pack_tokens = False, 0
    return plain


def assert_same_run(got, want) -> None:
    for name in ("predictions", "states", "token_logprobs", "query_logprobs"):
        assert_close_scaled(getattr(got, name), getattr(want, name))


@pytest.mark.parametrize("gates", [{}, {0: 0.0}, {1: 0.5, 3: 0.0}, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}])
def test_a_shared_prompt_prefix_is_run_once_with_the_same_results(lm: HFModel, gates) -> None:
    batch = lm.tokenize([SHARED + p for p in PROMPTS], CONTINUATIONS)
    assert lm.shared_prefix(batch) == len(lm.tokenizer(SHARED)["input_ids"])  # characters, with <s>
    assert unshared(lm).shared_prefix(batch) == 0 and lm.shared_prefix(batch.slice(0, 1)) == 0
    calls = [0]
    counter = lm.blocks[3].register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        got = lm.run(batch, gates, capture=True)
    finally:
        counter.remove()
    want = unshared(lm).run(batch, gates, capture=True)
    assert calls[0] == 2  # the prefix once, then every row's rest (a skipped block is called, and passes through)
    assert_same_run(got, want)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("gates", [{}, {1: 0.5, 3: 0.0}])
def test_packed_rows_give_the_padded_results_in_one_or_several_packs(lm: HFModel, shared, gates) -> None:
    prompts = [SHARED * shared + p for p in PROMPTS + ["x", "why not?"]]
    batch = lm.tokenize(prompts, CONTINUATIONS + [" y", " ok"])
    want = unshared(lm).run(batch, gates, capture=True)
    sliding = lm.model.config.model_type in ("qwen2", "gemma3_text")  # their masks are not packed
    assert lm.packs(batch) == (not sliding) and not lm.packs(batch.slice(0, 1)) and not unshared(lm).packs(batch)
    rest = int((batch.attention_mask.sum(1) - lm.shared_prefix(batch)).max())
    for budget in (512, rest):  # every row in one pass; a row or two per pass
        lm.pack_tokens = budget
        calls = []
        counter = lm.blocks[2].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
        try:
            got = lm.run(batch, gates, capture=True)
        finally:
            counter.remove()
        assert_same_run(got, want)
        if not sliding:
            assert set(calls) == {1} and (len(calls) > 2 + shared) == (budget == rest)  # packs are single rows


@pytest.mark.parametrize("gates", [{}, {0: 0.0, 2: 0.5}])
def test_generation_with_a_shared_prompt_prefix_equals_plain_generation(lm: HFModel, gates) -> None:
    prompts = [SHARED + p for p in PROMPTS]
    texts, confidence = lm.generate_with_confidence(prompts, gates, max_new_tokens=6, batch_size=3)
    plain_texts, plain_confidence = unshared(lm).generate_with_confidence(prompts, gates, max_new_tokens=6,
                                                                         batch_size=3)
    assert texts == plain_texts == [greedy_uncached(lm, p, gates, 6) for p in prompts]
    assert_close_scaled(confidence.log(), plain_confidence.log())  # log space: sums of log-probabilities
    assert lm.n_blocks == 4
    rows = lm._encode(prompts, special=True)
    sliding = lm.model.config.model_type in ("qwen2", "gemma3_text")  # window 4: no sharing, padding would fill it
    assert (lm._generation_inputs(rows, 6)[2] is None) == sliding


def test_resuming_from_recorded_inputs_works_with_a_shared_prefix(llama: HFModel) -> None:
    from tapioca.models.gates import injected_input, recorded_inputs

    batch = llama.tokenize([SHARED + p for p in PROMPTS], CONTINUATIONS)
    with recorded_inputs(llama.blocks) as inputs:
        llama.run(batch, {0: 0.5})
    rest = int((batch.attention_mask.sum(1) - llama.shared_prefix(batch)).sum())
    assert [tuple(t.shape[:2]) for t in inputs[2]] == [(1, llama.shared_prefix(batch)), (1, rest)]  # prefix; rows packed
    with injected_input(llama.blocks, 2, inputs[2]):
        resumed = llama.run(batch, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.5}).predictions
    assert_close_scaled(resumed, unshared(llama).run(batch, {0: 0.5, 2: 0.0, 3: 0.5}).predictions)


# ---------------------------------------------------------------- chat template, loading errors


def test_chat_template(llama: HFModel) -> None:
    with pytest.raises(ChatTemplateError, match="no chat template"):
        HFModel(llama.model, llama.tokenizer, chat=True)
    tokenizer = char_tokenizer()
    tokenizer.chat_template = "<s>{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    chat = HFModel(llama.model, tokenizer, chat=True)
    assert chat.format(["hi"]) == ["<s><hi>"]
    assert chat.tokenize(["hi"]).input_ids.tolist() == [[1, 45, 10, 11, 46]]  # one <s>, from the template


def test_load_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a folder.*config.json"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="expected config.json"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="expected one of model.safetensors"):
        load_causal_lm(tmp_path)
    with pytest.raises(CheckpointError, match="GGUF file .*x.gguf"):
        load_causal_lm(tmp_path, gguf_file="x.gguf")
    with pytest.raises(ConfigError, match="allowed: float32, bfloat16, float16"):
        load_causal_lm(tmp_path, dtype="float64")
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16


def test_load_with_dtype(llama: HFModel, tmp_path) -> None:
    llama.save(tmp_path / "m")
    model, _ = load_causal_lm(tmp_path / "m", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert HFModel.load(tmp_path / "m", dtype=torch.float16).model.dtype == torch.float16


def write_tiny_gguf(path, n_layers: int = 2, width: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
    """A float32 Llama GGUF with random weights and a 48-token sentencepiece-style vocabulary."""
    import gguf
    import numpy as np

    tokens = ["<unk>", "<s>", "</s>", "\u2581", *string.ascii_lowercase]
    tokens += [f"<0x{i:02X}>" for i in range(48 - len(tokens))]
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(writer.add_block_count, n_layers), (writer.add_context_length, WINDOW),
                       (writer.add_embedding_length, width), (writer.add_feed_forward_length, 2 * width),
                       (writer.add_head_count, heads), (writer.add_head_count_kv, kv_heads),
                       (writer.add_layer_norm_rms_eps, 1e-6), (writer.add_rope_freq_base, 1e4),
                       (writer.add_tokenizer_model, "llama"), (writer.add_token_list, tokens),
                       (writer.add_token_scores, [0.0] * len(tokens)),
                       (writer.add_token_types, [2, 3, 3] + [1] * (len(tokens) - 3)),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2), (writer.add_unk_token_id, 0)]:
        add(value)
    rng = np.random.default_rng(0)
    kv = kv_heads * width // heads
    shapes = {"token_embd": (len(tokens), width), "output": (len(tokens), width)}
    for i in range(n_layers):
        shapes |= {f"blk.{i}.attn_q": (width, width), f"blk.{i}.attn_k": (kv, width), f"blk.{i}.attn_v": (kv, width),
                   f"blk.{i}.attn_output": (width, width), f"blk.{i}.ffn_gate": (2 * width, width),
                   f"blk.{i}.ffn_up": (2 * width, width), f"blk.{i}.ffn_down": (width, 2 * width),
                   f"blk.{i}.attn_norm": (width,), f"blk.{i}.ffn_norm": (width,)}
    shapes["output_norm"] = (width,)
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.2
        writer.add_tensor(f"{name}.weight", values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_is_dequantised_and_serialisable(tmp_path) -> None:
    pytest.importorskip("gguf")
    write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = load_causal_lm(tmp_path / "tiny.gguf", dtype="float32")
    assert model.hf_quantizer is None and getattr(model.config, "quantization_config", None) is None
    lm = HFModel(model, tokenizer)
    assert lm.n_blocks == 2 and model.dtype == torch.float32
    ids = ids_of(lm, "hello world")
    pruned = lm.pruned_copy([0])
    reloaded, _ = load_causal_lm(pruned.save(tmp_path / "pruned"))
    assert torch.equal(logits(HFModel(reloaded, tokenizer), ids), logits(lm, ids, {0: 0.0}))
    same, _ = load_causal_lm(tmp_path, gguf_file="tiny.gguf")
    assert torch.equal(logits(HFModel(same, tokenizer), ids), logits(lm, ids))
