"""Tests for tapioca.models.gates on the ICL testbed model and on a tiny Llama causal LM."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from tapioca.config import Config
from tapioca.errors import ConfigError
from tapioca.models.gates import check_gates, gated, removal_gates
from tapioca.models.icl import ICLModel, prompt_tokens
from tapioca.tasks.polyreg import PolyRegTask, sample_prompts

from conftest import assert_close_scaled

ALPHAS = (0.0, 0.25, 0.5, 1.5)


@pytest.fixture
def icl_batch(tiny_cfg: Config):
    return PolyRegTask(tiny_cfg.task).data("id", "heldout", 0, 8)


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))


def assert_clean(blocks: nn.ModuleList) -> None:
    """No hooks and no instance-level forward left on any block."""
    for block in blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks
        assert not getattr(block, "_forward_hooks_with_kwargs", {})
        assert "forward" not in block.__dict__


def llama_logits(model, ids: torch.Tensor, gates=None) -> torch.Tensor:
    with torch.no_grad(), gated(model.model.layers, gates):
        return model(ids, use_cache=False).logits


def llama_without(model, removed: list[int]):
    """A copy of the Llama physically rebuilt without the ``removed`` decoder layers."""
    clone = copy.deepcopy(model)
    keep = [i for i in range(len(model.model.layers)) if i not in removed]
    clone.model.layers = nn.ModuleList([clone.model.layers[i] for i in keep])
    clone.config.num_hidden_layers = len(keep)
    for new_index, layer in enumerate(clone.model.layers):
        layer.self_attn.layer_idx = new_index
    return clone.eval()


# ---------------------------------------------------------------- ICL model


def test_icl_alpha_one_is_bit_identical(tiny_model: ICLModel, icl_batch) -> None:
    base = tiny_model.run(icl_batch).predictions
    ones = tiny_model.run(icl_batch, {i: 1.0 for i in range(tiny_model.n_blocks)}).predictions
    assert torch.equal(base, ones)
    with torch.no_grad():
        full = tiny_model(icl_batch.xs, icl_batch.ys)
        with gated(tiny_model.blocks, {0: 1.0, 2: 1.0}):
            assert torch.equal(tiny_model(icl_batch.xs, icl_batch.ys), full)
    assert_close_scaled(base, full[:, -1])  # run: the last block computes the query alone (other kernels)


@pytest.mark.parametrize("gates", [{}, {2: 0.0}, {2: 0.5}, {0: 0.0, 2: 1.5}, {1: 0.0}])
def test_icl_run_computes_the_last_block_at_the_query_only_with_the_same_results(tiny_model: ICLModel, icl_batch,
                                                                                  gates) -> None:
    last = tiny_model.blocks[-1]
    rows = []
    hook = last.mlp.register_forward_hook(lambda m, a, out: rows.append(out.shape[1]))
    try:
        got = tiny_model.run(icl_batch, gates, capture=True)
    finally:
        hook.remove()
    with torch.no_grad(), gated(tiny_model.blocks, gates, capture=True) as cap:  # every position, as in training
        want = tiny_model(icl_batch.xs, icl_batch.ys)[:, -1]
    assert_close_scaled(got.predictions, want)
    assert_close_scaled(got.states, cap.stacked())
    assert rows == ([] if gates.get(2) == 0.0 else [1])  # the MLP ran on the query alone (or not at all)
    assert_clean(tiny_model.blocks)


@pytest.mark.parametrize("removed", [[0], [1], [2], [0, 2]])
def test_icl_alpha_zero_equals_physical_removal(tiny_model: ICLModel, icl_batch, removed: list[int]) -> None:
    gated_preds = tiny_model.run(icl_batch, removal_gates(removed)).predictions
    sliced = tiny_model.slice_blocks(removed)
    assert sliced.n_blocks == tiny_model.n_blocks - len(removed)
    sliced_preds = sliced.run(icl_batch).predictions
    assert_close_scaled(gated_preds, sliced_preds)  # without block 2, block 1 runs query-only when sliced
    assert not torch.equal(gated_preds, tiny_model.run(icl_batch).predictions)


def test_icl_partial_alpha_differs_from_zero_and_one(tiny_model: ICLModel, icl_batch) -> None:
    zero = tiny_model.run(icl_batch, {1: 0.0}).predictions
    half = tiny_model.run(icl_batch, {1: 0.5}).predictions
    one = tiny_model.run(icl_batch, {1: 1.0}).predictions
    assert (half - zero).abs().max() > 1e-6
    assert (half - one).abs().max() > 1e-6


@pytest.mark.parametrize("alpha", ALPHAS)
def test_icl_alpha_scales_the_residual_contribution(tiny_model: ICLModel, icl_batch, alpha: float) -> None:
    # blocks before 1 are untouched, so block 1 sees the same input; its output must be h + alpha (B(h) - h)
    ref = tiny_model.run(icl_batch, capture=True).states
    out = tiny_model.run(icl_batch, {1: alpha}, capture=True).states
    assert torch.equal(out[:2], ref[:2])
    expected = ref[1] + alpha * (ref[2] - ref[1])
    assert torch.allclose(out[2], expected, atol=1e-5, rtol=1e-5)


def test_icl_alpha_zero_does_not_call_the_block(tiny_model: ICLModel, icl_batch) -> None:
    calls = {"attn": 0, "mlp": 0}
    block = tiny_model.blocks[1]
    h1 = block.attn.register_forward_hook(lambda *a: calls.__setitem__("attn", calls["attn"] + 1))
    h2 = block.mlp.register_forward_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1))
    try:
        tiny_model.run(icl_batch, {1: 0.0})
        assert calls == {"attn": 0, "mlp": 0}
        tiny_model.run(icl_batch, {1: 0.5})
        assert calls == {"attn": 1, "mlp": 1}
        tiny_model.run(icl_batch)
        assert calls == {"attn": 2, "mlp": 2}
    finally:
        h1.remove()
        h2.remove()


def test_icl_capture_states(tiny_model: ICLModel, icl_batch) -> None:
    out = tiny_model.run(icl_batch, {1: 0.0}, capture=True)
    L, B, D = tiny_model.n_blocks, len(icl_batch), tiny_model.cfg.n_embd
    assert out.states.shape == (L + 1, B, D)
    # states[0] is the input of block 0 at the query token (the last x token)
    with torch.no_grad():
        tokens = prompt_tokens(icl_batch.xs, icl_batch.ys)
        query = tokens.shape[1] - 1
        embedded = tiny_model.read_in(tokens)[:, query] + tiny_model.backbone.wpe.weight[query]
    assert torch.allclose(out.states[0], embedded, atol=1e-6, rtol=0)
    # a removed block passes its input through
    assert torch.equal(out.states[2], out.states[1])
    assert not torch.equal(out.states[1], out.states[0])
    # the last state is what enters the final layer norm at the query token...
    seen = []
    handle = tiny_model.backbone.ln_f.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, -1]))
    try:
        again = tiny_model.run(icl_batch, {1: 0.0}, capture=True)
    finally:
        handle.remove()
    assert torch.equal(again.states, out.states)
    assert torch.equal(out.states[-1], seen[0])
    # ...and it feeds the read-out: ln_f then read_out gives the prediction
    with torch.no_grad():
        pred = tiny_model.read_out(tiny_model.backbone.ln_f(out.states[-1])).squeeze(-1)
    assert_close_scaled(pred, out.predictions)  # read-out on (B, D) here, on every x position in the model
    assert tiny_model.run(icl_batch).states is None


def test_icl_capture_takes_the_query_position_per_example(tiny_model: ICLModel, icl_batch) -> None:
    # capturing with explicit positions picks rows independently
    positions = torch.tensor([0, 4, 10, 80, 3, 5, 7, 9])
    with torch.no_grad():
        embeds = tiny_model.read_in(prompt_tokens(icl_batch.xs, icl_batch.ys))
        with gated(tiny_model.blocks, capture=True, positions=positions) as cap:
            tiny_model(icl_batch.xs, icl_batch.ys)
    states = cap.stacked()
    expected = embeds[torch.arange(8), positions] + tiny_model.backbone.wpe.weight[positions]
    assert torch.allclose(states[0], expected, atol=1e-6, rtol=0)


def test_icl_gates_cleaned_up_after_exception(tiny_model: ICLModel, tiny_cfg: Config, icl_batch) -> None:
    base = tiny_model.run(icl_batch).predictions
    with pytest.raises(RuntimeError, match="boom"):
        with gated(tiny_model.blocks, {0: 0.0, 1: 0.5}, capture=True):
            tiny_model(icl_batch.xs, icl_batch.ys)
            raise RuntimeError("boom")
    assert_clean(tiny_model.blocks)
    assert torch.equal(tiny_model.run(icl_batch).predictions, base)
    # an error raised by the model itself inside run(): too many points for n_positions=128
    params = dataclasses.replace(tiny_cfg.task.sampler, n_points=70)
    long_batch = sample_prompts(params, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="n_positions=128"):
        tiny_model.run(long_batch, {2: 0.0, 1: 0.25}, capture=True)
    assert_clean(tiny_model.blocks)
    assert torch.equal(tiny_model.run(icl_batch).predictions, base)


def test_gated_restores_a_preexisting_instance_forward(tiny_model: ICLModel, icl_batch) -> None:
    block = tiny_model.blocks[0]
    calls = []
    original = block.forward

    def wrapper(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = wrapper
    try:
        with gated(tiny_model.blocks, {0: 0.5}):
            tiny_model.run(icl_batch)
        assert block.__dict__["forward"] is wrapper
        assert len(calls) == 1  # the gate wrapped the user's forward
    finally:
        del block.forward
    assert_clean(tiny_model.blocks)


@pytest.mark.parametrize(
    "gates, match",
    [
        ({3: 0.0}, "gate index 3"),
        ({-1: 0.0}, "gate index -1"),
        ({"0": 0.0}, "gate index '0'"),
        ({1.0: 0.0}, "gate index 1.0"),
        ({0: float("nan")}, "finite"),
        ({0: float("inf")}, "finite"),
    ],
)
def test_bad_gates_raise_value_error(tiny_model: ICLModel, icl_batch, gates, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_model.run(icl_batch, gates)
    assert_clean(tiny_model.blocks)


def test_check_gates_normalises() -> None:
    assert check_gates(None, 3) == {}
    assert check_gates({0: 1, 2: 0.5}, 3) == {0: 1.0, 2: 0.5}
    assert removal_gates([2, 0]) == {2: 0.0, 0: 0.0}


# ---------------------------------------------------------------- tiny Llama


def test_llama_alpha_one_is_bit_identical(tiny_llama, token_ids) -> None:
    with torch.no_grad():
        base = tiny_llama(token_ids, use_cache=False).logits
    assert torch.equal(llama_logits(tiny_llama, token_ids, {i: 1.0 for i in range(4)}), base)
    assert_clean(tiny_llama.model.layers)


@pytest.mark.parametrize("removed", [[0], [1], [3], [1, 2]])
def test_llama_alpha_zero_equals_physical_removal(tiny_llama, token_ids, removed: list[int]) -> None:
    gated_logits = llama_logits(tiny_llama, token_ids, removal_gates(removed))
    with torch.no_grad():
        sliced = llama_without(tiny_llama, removed)(token_ids, use_cache=False).logits
    assert_close_scaled(gated_logits, sliced)
    assert not torch.allclose(gated_logits, llama_logits(tiny_llama, token_ids), atol=1e-4)


def test_llama_partial_alpha_differs_and_scales(tiny_llama, token_ids) -> None:
    zero = llama_logits(tiny_llama, token_ids, {2: 0.0})
    half = llama_logits(tiny_llama, token_ids, {2: 0.5})
    one = llama_logits(tiny_llama, token_ids)
    assert (half - zero).abs().max() > 1e-4
    assert (half - one).abs().max() > 1e-4
    layers = tiny_llama.model.layers
    with torch.no_grad():
        with gated(layers, capture=True) as ref:
            tiny_llama(token_ids, use_cache=False)
        with gated(layers, {2: 0.5}, capture=True) as out:
            tiny_llama(token_ids, use_cache=False)
    r, o = ref.stacked(), out.stacked()
    assert torch.equal(o[:3], r[:3])
    assert torch.allclose(o[3], r[2] + 0.5 * (r[3] - r[2]), atol=1e-5, rtol=1e-5)


def test_llama_alpha_zero_does_not_call_the_layer(tiny_llama, token_ids) -> None:
    calls = []
    handle = tiny_llama.model.layers[1].self_attn.register_forward_hook(lambda *a: calls.append(1))
    try:
        llama_logits(tiny_llama, token_ids, {1: 0.0})
        assert calls == []
        llama_logits(tiny_llama, token_ids, {1: 0.75})
        assert calls == [1]
    finally:
        handle.remove()


def test_llama_capture_states(tiny_llama, token_ids) -> None:
    positions = torch.tensor([3, 5, 9])
    layers = tiny_llama.model.layers
    with torch.no_grad(), gated(layers, {2: 0.0}, capture=True, positions=positions) as cap:
        logits = tiny_llama(token_ids, use_cache=False).logits
    states = cap.stacked()
    assert states.shape == (5, 3, 32)
    rows = torch.arange(3)
    with torch.no_grad():
        embeds = tiny_llama.model.embed_tokens(token_ids)
        head = tiny_llama.lm_head(tiny_llama.model.norm(states[-1]))
    assert torch.equal(states[0], embeds[rows, positions])
    assert torch.equal(states[3], states[2])  # layer 2 removed
    assert not torch.equal(states[2], states[1])
    assert_close_scaled(head, logits[rows, positions])  # the head on (3, 32) here, on (3, 10, 32) in the model
    # default position is the last token
    with torch.no_grad(), gated(layers, capture=True) as cap:
        tiny_llama(token_ids, use_cache=False)
    assert torch.equal(cap.stacked()[0], embeds[:, -1])


def test_llama_cleanup_after_exception(tiny_llama, token_ids) -> None:
    base = llama_logits(tiny_llama, token_ids)
    with pytest.raises(KeyError):
        with torch.no_grad(), gated(tiny_llama.model.layers, {0: 0.0, 3: 1.25}, capture=True):
            tiny_llama(token_ids, use_cache=False)
            raise KeyError("inside")
    assert_clean(tiny_llama.model.layers)
    assert torch.equal(llama_logits(tiny_llama, token_ids), base)
    with pytest.raises(ValueError, match="gate index 4"):
        llama_logits(tiny_llama, token_ids, {4: 0.0})
    assert_clean(tiny_llama.model.layers)


def test_capture_without_forward_pass_errors(tiny_model: ICLModel) -> None:
    with gated(tiny_model.blocks, capture=True) as cap:
        pass
    with pytest.raises(RuntimeError, match="no hidden states captured"):
        cap.stacked()
