"""Weight-level pruning controls (claim C9): exact budgets, right weights, Conv1D orientation, no side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tapioca.models.base import RunOutput
from tapioca.tasks.polyreg import PolyRegTask
from tapioca.pruning.weights import (
    block_parameter_count,
    input_norms,
    magnitude_prune,
    n_prunable,
    prunable_weights,
    wanda_prune,
)

from conftest import assert_close_scaled


class Stack(nn.Module):
    """A toy BlockModel: ``blocks`` applied in sequence to a tensor batch (B, T, D)."""

    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def run(self, batch: torch.Tensor, gates=None, capture: bool = False) -> RunOutput:
        with torch.no_grad():
            h = batch
            for block in self.blocks:
                h = block(h)
        return RunOutput(h[:, -1, 0])


class LlamaBlocks(nn.Module):
    """Adapter exposing a bare Hugging Face Llama's decoder layers as ``blocks`` (no ``run``)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def blocks(self) -> nn.ModuleList:
        return self.lm.model.layers


def llama_forward(model: LlamaBlocks, ids: torch.Tensor):
    return model.lm(input_ids=ids)


def zeros_in_weights(model: nn.Module) -> dict[str, int]:
    return {name: int((m.weight == 0).sum()) for name, m in prunable_weights(model.blocks)}


def zero_pattern(model: nn.Module, block: int) -> list[list[int]]:
    return (model.blocks[block].weight == 0).int().tolist()


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


def has_hooks(model: nn.Module) -> bool:
    return any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.fixture
def icl_batch(tiny_cfg):
    return PolyRegTask(tiny_cfg.task).data("id", "select", 0, 12).slice(0, 12)


# ---------------------------------------------------------------------------------------------------------
# Structure and budget


def test_prunable_weights_are_block_linears_only(tiny_model, tiny_llama):
    names = [n for n, _ in prunable_weights(tiny_model.blocks)]
    assert names == [f"{b}.{m}" for b in range(3) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert all(isinstance(m, Conv1D) for _, m in prunable_weights(tiny_model.blocks))
    llama = prunable_weights(tiny_llama.model.layers)
    assert len(llama) == 4 * 7 and all(isinstance(m, nn.Linear) for _, m in llama)
    assert not any("norm" in n or "embed" in n or "lm_head" in n for n, _ in llama)


def test_block_parameter_count_matches_model_and_fits_budget(tiny_model):
    one = block_parameter_count(tiny_model, [1])
    assert one == tiny_model.block_parameter_count(1)
    assert block_parameter_count(tiny_model, [0, 2, 2]) == tiny_model.block_parameter_count(0) * 2
    # biases and norms count toward the budget but are not prunable: one block's budget exceeds its matrices
    block_matrices = sum(m.weight.numel() for n, m in prunable_weights(tiny_model.blocks) if n.startswith("1."))
    assert block_matrices < one < n_prunable(tiny_model)
    with pytest.raises(ValueError, match="do not exist"):
        block_parameter_count(tiny_model, [3])


def test_budget_too_large_names_both_numbers(tiny_model, icl_batch):
    total = n_prunable(tiny_model)
    for prune in (lambda n: magnitude_prune(tiny_model, n), lambda n: magnitude_prune(tiny_model, n, "layer"),
                  lambda n: wanda_prune(tiny_model, icl_batch, n)):
        with pytest.raises(ValueError, match=rf"{total + 1}.*{total}"):
            prune(total + 1)
        with pytest.raises(ValueError):
            prune(-1)
    assert magnitude_prune(tiny_model, total).n_zeroed == total  # the whole budget is allowed


# ---------------------------------------------------------------------------------------------------------
# Exact counts, input untouched


@pytest.mark.parametrize("method", ["global", "layer", "wanda"])
def test_exact_count_on_icl_model_and_original_untouched(tiny_model, icl_batch, method):
    before = state_bytes(tiny_model)
    preds = tiny_model.run(icl_batch).predictions
    budget = block_parameter_count(tiny_model, [1])
    if method == "wanda":
        result = wanda_prune(tiny_model, icl_batch, budget, chunk=5)
    else:
        result = magnitude_prune(tiny_model, budget, scope=method)
    assert result.n_zeroed == budget == sum(result.per_matrix.values())
    assert sum(zeros_in_weights(result.model).values()) == budget
    assert zeros_in_weights(result.model) == result.per_matrix
    assert result.model.n_blocks == tiny_model.n_blocks  # every layer kept, still a runnable model
    assert not torch.equal(result.model.run(icl_batch).predictions, preds)
    # biases and norms untouched
    for (k, v), (k2, v2) in zip(tiny_model.state_dict().items(), result.model.state_dict().items()):
        if not (k.endswith(".weight") and v.dim() == 2 and ".h." in k):
            assert torch.equal(v, v2), k
    assert state_bytes(tiny_model) == before and not has_hooks(tiny_model)
    assert torch.equal(tiny_model.run(icl_batch).predictions, preds)
    d = result.to_dict()
    assert "model" not in d and d["n_zeroed"] == budget
    assert d["method"] == ("wanda" if method == "wanda" else f"magnitude-{method}")


@pytest.mark.parametrize("method", ["global", "layer", "wanda"])
def test_exact_count_on_llama_and_original_untouched(tiny_llama, method):
    model = LlamaBlocks(tiny_llama)
    before = state_bytes(model)
    ids = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(0))
    budget = block_parameter_count(model, [2])
    if method == "wanda":
        result = wanda_prune(model, ids, budget, chunk=4, forward=llama_forward)
    else:
        result = magnitude_prune(model, budget, scope=method)
    assert result.n_zeroed == budget == sum(zeros_in_weights(result.model).values())
    assert len(result.model.blocks) == 4
    assert state_bytes(model) == before and not has_hooks(model)


def test_layer_scope_and_wanda_rows_share_one_fraction(tiny_model, icl_batch):
    budget = block_parameter_count(tiny_model, [0])
    p = budget / n_prunable(tiny_model)
    layer = magnitude_prune(tiny_model, budget, "layer")
    for name, module in prunable_weights(layer.model.blocks):
        assert abs(layer.per_matrix[name] - p * module.weight.numel()) < 1
    wanda = wanda_prune(tiny_model, icl_batch, budget)
    for name, module in prunable_weights(wanda.model.blocks):
        per_row = (module.weight == 0).sum(0)  # Conv1D: output rows are stored columns
        assert (per_row - p * module.weight.shape[0]).abs().max() < 1, name


def test_wanda_without_run_needs_forward(tiny_llama):
    with pytest.raises(TypeError, match="forward"):
        wanda_prune(LlamaBlocks(tiny_llama), torch.zeros(2, 3, dtype=torch.long), 1)


# ---------------------------------------------------------------------------------------------------------
# The right weights


def test_magnitude_removes_exactly_the_smallest_weights():
    a, b = nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[0.9, -0.1, 0.5], [-0.3, 0.7, 0.2]]))
        b.weight.copy_(torch.tensor([[0.05, -0.8], [0.4, -0.6]]))
    model = Stack(a, b)
    result = magnitude_prune(model, 4)
    # the 4 smallest |w|: 0.05 (b), 0.1, 0.2, 0.3 (a)
    assert zero_pattern(result.model, 0) == [[0, 1, 0], [1, 0, 1]]
    assert zero_pattern(result.model, 1) == [[1, 0], [0, 0]]
    assert torch.equal(result.model.blocks[0].weight[0, 0], a.weight[0, 0])  # kept weights unchanged
    assert result.per_matrix == {"0": 3, "1": 1}
    # layer scope: 4 / 10 of each matrix -> 2.4 of a (6) and 1.6 of b (4); remainder to b
    layer = magnitude_prune(model, 4, "layer")
    assert layer.per_matrix == {"0": 2, "1": 2}
    assert zero_pattern(layer.model, 0) == [[0, 1, 0], [0, 0, 1]]
    assert zero_pattern(layer.model, 1) == [[1, 0], [1, 0]]


def test_magnitude_ties_are_exact_and_by_flat_index():
    a = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, -0.5, 0.5, 2.0], [0.5, 3.0, -0.5, 0.1]]))
    result = magnitude_prune(Stack(a), 3)  # 0.1 then two of the four tied 0.5s, lowest flat index first
    assert result.model.blocks[0].weight.tolist() == [[1.0, 0.0, 0.0, 2.0], [0.5, 3.0, -0.5, 0.0]]


def test_wanda_keeps_weights_on_a_high_activation_input():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, 0.5, 0.6, 0.7], [0.2, 0.8, 0.9, 0.4]]))
    model = Stack(lin)
    x = torch.randn(8, 5, 4, generator=torch.Generator().manual_seed(0))
    x[..., 0] *= 100.0  # planted large input feature on the column with the smallest weights
    wanda = wanda_prune(model, x, 4, chunk=3)
    w = wanda.model.blocks[0].weight
    assert (w[:, 0] != 0).all()  # kept despite the smallest magnitudes
    assert ((w == 0).sum(1) == 2).all()  # same fraction per output row
    magnitude = magnitude_prune(model, 4).model.blocks[0].weight
    assert (magnitude[:, 0] == 0).all()  # magnitude would have removed exactly that column


def test_input_norms_chunked_equal_direct():
    lin = nn.Linear(4, 3)
    x = torch.randn(7, 5, 4, generator=torch.Generator().manual_seed(1))
    norms = input_norms(Stack(lin), x, chunk=2)
    assert_close_scaled(norms["0"], x.reshape(-1, 4).norm(dim=0))  # float32 sums per chunk vs one sum


def test_wanda_handles_conv1d_orientation():
    conv = Conv1D(nf=2, nx=2)  # weight stored (in, out)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[0.5, 0.2], [1.0, 3.0]]))  # rows = input features
        conv.bias.zero_()
    x = torch.zeros(1, 2, 2)
    x[0, :, 0], x[0, :, 1] = 10.0, 1.0  # ||X_0|| = 10 sqrt2, ||X_1|| = sqrt2
    result = wanda_prune(Stack(conv), x, 2)
    # per output o (a stored column): S = |W[i, o]| * ||X_i|| -> o=0: [5, 1] drop i=1; o=1: [2, 3] drop i=0.
    # Reading the stored weight as (out, in) would instead zero (0, 1) and (1, 1).
    zeroed = (result.model.blocks[0].weight == 0).nonzero().tolist()
    assert sorted(zeroed) == [[0, 1], [1, 0]]
    assert input_norms(Stack(conv), x)["0"].shape == (2,)


def test_input_norms_widths_on_gpt2(tiny_model, icl_batch):
    norms = input_norms(tiny_model, icl_batch)
    d = tiny_model.cfg.n_embd
    assert norms["0.attn.c_attn"].shape == (d,) and norms["0.mlp.c_proj"].shape == (4 * d,)
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in norms.values())


# ---------------------------------------------------------------------------------------------------------
# Side effects


def test_hooks_removed_after_an_exception(tiny_model, icl_batch):
    seen = []

    def failing(model, part):
        seen.append(model)
        model.run(part)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        input_norms(tiny_model, icl_batch, chunk=4, forward=failing)
    assert not has_hooks(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        wanda_prune(tiny_model, icl_batch, 10, forward=failing)
    assert seen[-1] is not tiny_model and not has_hooks(seen[-1])  # the copy was hooked, and cleaned
    assert not has_hooks(tiny_model)


def test_zero_budget_is_bit_identical(tiny_model, icl_batch):
    before = state_bytes(tiny_model)
    preds = tiny_model.run(icl_batch).predictions
    for result in (magnitude_prune(tiny_model, 0), magnitude_prune(tiny_model, 0, "layer"),
                   wanda_prune(tiny_model, icl_batch, 0)):
        assert result.n_zeroed == 0 and set(result.per_matrix.values()) == {0}
        assert state_bytes(result.model) == before
        assert torch.equal(result.model.run(icl_batch).predictions, preds)


def test_wanda_ties_go_by_column_index():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.5)
    result = wanda_prune(Stack(lin), torch.ones(3, 2, 4), 4)  # every score equal
    assert zero_pattern(result.model, 0) == [[1, 1, 0, 0], [1, 1, 0, 0]]


def test_wanda_calibrates_the_testbed_on_every_position(tiny_model, tiny_cfg):
    batch = PolyRegTask(tiny_cfg.task).data("id", "heldout", 0, 4)
    rows = []
    hook = tiny_model.blocks[-1].mlp.c_fc.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1]))
    try:
        input_norms(tiny_model, batch, chunk=4)
    finally:
        hook.remove()
    assert rows == [2 * batch.xs.shape[1] - 1]  # every token, not the query alone as in run()
    assert tiny_model.query_only
