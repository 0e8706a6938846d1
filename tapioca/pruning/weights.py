"""Weight-level pruning controls for claim C9: zero individual weights, keep every layer.

TALE removes whole blocks. C9 asks whether the OOD gain needs *whole-layer* removal, so the control removes
the same number of parameters as individual weights spread over all blocks, and the pruned model is then
scored like any other model (it keeps its class, its ``run`` and all of its blocks).

Prunable weights are the 2-D weight matrices of the linear layers inside ``model.blocks``:
``torch.nn.Linear`` (weight stored as (out, in)) and ``transformers.pytorch_utils.Conv1D`` as used by GPT-2
(weight stored as (in, out)). Biases, norms and everything outside the blocks (embeddings, read-in,
read-out, LM head) are never pruned. Structure is detected by ``isinstance``, never by model name.

- :func:`magnitude_prune`: zero the ``n_params`` weights of smallest |w|, with one global threshold over
  all prunable matrices (``scope="global"``) or the same fraction of every matrix (``scope="layer"``).
- :func:`wanda_prune`: Wanda (Sun et al. 2023), score S_ij = |W_ij| * ||X_j||_2 with X_j input feature j of
  the layer over every token of a calibration batch; the same fraction of every output row is removed.

Both count exactly: precisely ``n_params`` weights are zeroed (ties broken by flat index, rounding
remainders handed out by the largest-remainder rule in a fixed order), and both work on a deep copy.

Language models: an :class:`~tapioca.models.hf.HFModel` (or a wrapper holding one as ``.lm``, such as
:class:`~tapioca.tasks.choices.ChoiceModel`) is pruned the same way; its copy shares the tokenizer and forgets
its load source (the copy's weights are not those on disk). Wanda calibrates on a ``TokenBatch`` (or a batch
holding one as ``.tokens``, e.g. a ``ChoiceBatch``) counting every real token of every row once: no padding,
and a prompt prefix shared by the rows counted per row (see :func:`_token_forward`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

Forward = Callable[[nn.Module, Any], Any]  # (model, batch slice) -> anything; only its side effects count


@dataclass
class WeightPruneResult:
    """A weight-pruned copy of a model and what was zeroed.

    model: the pruned deep copy (the input model is left untouched).
    n_zeroed: number of weights set to zero (always the requested budget).
    per_matrix: ``{qualified name inside model.blocks: weights zeroed}`` for every prunable matrix.
    method: "magnitude-global", "magnitude-layer" or "wanda".
    n_prunable: number of prunable weights (the 2-D linear weights of the blocks).
    info: extra settings (e.g. Wanda's calibration size).
    """

    model: nn.Module
    n_zeroed: int
    per_matrix: dict[str, int]
    method: str
    n_prunable: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Fraction of the prunable weights that were zeroed."""
        return self.n_zeroed / self.n_prunable if self.n_prunable else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, JSON-ready."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        out["per_matrix"] = dict(self.per_matrix)
        out["info"] = dict(self.info)
        out["fraction"] = self.fraction
        return out


# ---------------------------------------------------------------------------------------------------------
# Structure


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no `blocks` nn.ModuleList; weight pruning works on a BlockModel "
            "(wrap a bare Hugging Face model so that `.blocks` returns its decoder layers)"
        )
    return blocks


def prunable_weights(blocks: nn.ModuleList) -> list[tuple[str, nn.Module]]:
    """The linear layers whose 2-D weights may be pruned, ``(qualified name, module)`` in block order.

    Names are relative to ``blocks`` (e.g. ``"0.attn.c_attn"``). ``nn.Linear`` (and subclasses) and
    GPT-2's ``Conv1D`` qualify; a module reached twice (shared) is listed once.
    """
    return [(name, module) for name, module in blocks.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and module.weight.dim() == 2]


def _out_in(module: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` (or a tensor shaped like it) seen as (out, in): Conv1D stores (in, out)."""
    return weight.t() if isinstance(module, Conv1D) else weight


def in_features(module: nn.Module) -> int:
    """Input width of a prunable module (Linear: weight.shape[1]; Conv1D: weight.shape[0])."""
    return _out_in(module, module.weight).shape[1]


def n_prunable(model: nn.Module) -> int:
    """Number of prunable weights in ``model.blocks``."""
    return sum(m.weight.numel() for _, m in prunable_weights(_blocks(model)))


def block_parameter_count(model: nn.Module, removed: Sequence[int]) -> int:
    """Number of parameters (all of them: weights, biases, norms) in the blocks ``removed``.

    This is the size of TALE's removal and the budget for the weight-pruning control: pass it as
    ``n_params`` to :func:`magnitude_prune` / :func:`wanda_prune`. The budget is then taken from the
    prunable matrices only, since biases and norm parameters are never pruned — the weight-pruned model
    loses exactly as many parameters as the block-pruned one, all of them from linear weights.
    Each block counts once even if listed twice.
    """
    blocks = _blocks(model)
    bad = [i for i in removed if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"removed blocks {bad} do not exist; allowed: integers 0..{len(blocks) - 1}")
    return sum(p.numel() for i in sorted(set(removed)) for p in blocks[i].parameters())


def _token_model(model: Any) -> Any:
    """The causal-LM adapter behind ``model`` (itself or its ``.lm``: anything with ``tokenizer``, ``run`` and
    ``pack_tokens``, i.e. an HFModel), or None."""
    for candidate in (model, getattr(model, "lm", None)):
        if all(hasattr(candidate, name) for name in ("tokenizer", "run", "pack_tokens", "share_prefix")):
            return candidate
    return None


def _deep_copy(model: Any) -> Any:
    """A deep copy of ``model`` for pruning; an LM adapter's tokenizer is shared, not copied, and its load
    ``source`` is dropped (it would reload the unpruned weights, e.g. on Ray workers)."""
    lm = _token_model(model)
    memo = {id(lm.tokenizer): lm.tokenizer} if lm is not None else {}
    clone = copy.deepcopy(model, memo)
    clone_lm = _token_model(clone)
    if clone_lm is not None and getattr(clone_lm, "source", None) is not None:
        clone_lm.source = None
    return clone


def _check_budget(n_params: int, total: int) -> int:
    if isinstance(n_params, bool) or not isinstance(n_params, int):
        raise TypeError(f"n_params must be an int, got {type(n_params).__name__}")
    if n_params < 0:
        raise ValueError(f"n_params must be >= 0, got {n_params}")
    if n_params > total:
        raise ValueError(f"cannot zero {n_params} weights: the model has only {total} prunable weights "
                         "(2-D linear weights inside its blocks)")
    return n_params


# ---------------------------------------------------------------------------------------------------------
# Exact selection helpers


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` smallest entries of 1-D ``scores``; ties -> lower index first. Exact."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= scores.numel():
        return ~mask
    threshold = torch.kthvalue(scores, k).values
    mask = scores < threshold
    missing = k - int(mask.sum())
    ties = torch.nonzero(scores == threshold).squeeze(1)[:missing]
    mask[ties] = True
    return mask


def _apportion(n: int, sizes: Sequence[int]) -> list[int]:
    """Split ``n`` over groups in proportion to ``sizes`` (same fraction n/total each), summing to ``n``.

    Each group gets floor(n * size / total); the remainder goes one each to the groups with the largest
    fractional part, ties -> earlier group (largest-remainder rule, deterministic).
    """
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    base = [n * s // total for s in sizes]
    frac = [n * s % total for s in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-frac[i], i))
    for i in order[: n - sum(base)]:
        base[i] += 1
    return base


@torch.no_grad()
def _apply(blocks: nn.ModuleList, masks: dict[str, Tensor]) -> dict[str, int]:
    """Zero the masked weights in place (only masked entries are written) -> zeroed per matrix."""
    per_matrix = {}
    for name, module in prunable_weights(blocks):
        mask = masks[name]
        if mask.any():
            module.weight.masked_fill_(mask.to(module.weight.device), 0.0)
        per_matrix[name] = int(mask.sum())
    return per_matrix


# ---------------------------------------------------------------------------------------------------------
# Magnitude


def magnitude_prune(model: nn.Module, n_params: int,
                    scope: Literal["global", "layer"] = "global") -> WeightPruneResult:
    """Zero the ``n_params`` prunable weights of smallest |w| in a deep copy of ``model``.

    scope="global": one threshold over all prunable matrices of all blocks. scope="layer": every matrix
    loses the same fraction n_params / n_prunable (rounded by the largest-remainder rule, so the total is
    exact). Ties in |w| are broken by flat index (block order, then the stored row-major layout).
    Raises ValueError when ``n_params`` exceeds the number of prunable weights.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    pruned = _deep_copy(model)
    blocks = _blocks(pruned)
    layers = prunable_weights(blocks)
    sizes = [m.weight.numel() for _, m in layers]
    total = sum(sizes)
    n = _check_budget(n_params, total)
    masks: dict[str, Tensor] = {}
    if scope == "global":
        if layers:
            flat = torch.cat([m.weight.detach().abs().reshape(-1).float().cpu() for _, m in layers])
            for (name, module), part in zip(layers, torch.split(_lowest(flat, n), sizes)):
                masks[name] = part.view_as(module.weight)
    else:
        for (name, module), k in zip(layers, _apportion(n, sizes)):
            scores = module.weight.detach().abs().reshape(-1).float().cpu()
            masks[name] = _lowest(scores, k).view_as(module.weight)
    per_matrix = _apply(blocks, masks)
    return WeightPruneResult(pruned, sum(per_matrix.values()), per_matrix, f"magnitude-{scope}", total,
                             {"scope": scope})


# ---------------------------------------------------------------------------------------------------------
# Wanda


def _token_forward(lm: Any, tokens: Any) -> None:
    """Run the LM adapter ``lm`` on the token batch ``tokens`` so that its blocks see every real token of every
    row exactly once: rows packed end to end without padding and without a separately run shared prefix
    (``share_prefix`` off, packing on for the call); a model that cannot pack runs one row at a time."""
    saved = lm.share_prefix, lm.pack_tokens
    lm.share_prefix, lm.pack_tokens = False, lm.pack_tokens or 512
    try:
        if lm.packs(tokens) or len(tokens) == 1:
            lm.run(tokens)
        else:
            for i in range(len(tokens)):
                lm.run(tokens.slice(i, i + 1))  # one row: trimmed to its own length
    finally:
        lm.share_prefix, lm.pack_tokens = saved


def _default_forward(model: nn.Module, batch: Any) -> Any:
    """``model.run(batch)`` at every position (a model whose run may skip positions, ``query_only``, is told
    not to for the call: calibration needs every token's activations); an LM on a token batch (or a batch
    holding one as ``.tokens``) runs its real tokens only (:func:`_token_forward`)."""
    lm = _token_model(model)
    tokens = batch if hasattr(batch, "attention_mask") else getattr(batch, "tokens", None)
    if lm is not None and hasattr(tokens, "attention_mask"):
        return _token_forward(lm, tokens)
    run = getattr(model, "run", None)
    if run is None:
        raise TypeError(f"{type(model).__name__} has no `run` method; pass forward=(model, batch) -> output")
    if not getattr(model, "query_only", False):
        return run(batch)
    model.query_only = False
    try:
        return run(batch)
    finally:
        model.query_only = True


def _slice(batch: Any, start: int, stop: int) -> Any:
    return batch.slice(start, stop) if hasattr(batch, "slice") else batch[start:stop]


def _chunks(batch: Any, chunk: int) -> Iterator[Any]:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = len(batch)
    if n < 1:
        raise ValueError("the calibration batch is empty; Wanda needs at least one example")
    for start in range(0, n, chunk):
        yield _slice(batch, start, start + chunk)


def _module_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    return kwargs["input"] if "input" in kwargs else next(iter(kwargs.values()))


@torch.no_grad()
def input_norms(model: nn.Module, batch: Any, chunk: int = 1024,
                forward: Forward | None = None) -> dict[str, Tensor]:
    """||X_j||_2 per input feature j of every prunable layer, over all tokens of ``batch``.

    Runs ``forward(model, batch_slice)`` (default ``model.run(batch_slice)``) on slices of ``chunk``
    examples (``batch.slice(i, j)`` if it has one, else ``batch[i:j]``) with a forward pre-hook on each
    prunable module summing squared inputs per feature (in float64). Hooks are removed on exit, also on
    error. The model's weights are not changed. Returns ``{name: (in_features,) float32 tensor}``;
    a layer the forward pass never reached raises RuntimeError.
    """
    layers = prunable_weights(_blocks(model))
    forward = forward or _default_forward
    sums: dict[str, Tensor | None] = {name: None for name, _ in layers}

    def hook_for(name: str, width: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _module_input(args, kwargs).detach()
            sq = x.reshape(-1, width).float().square().sum(0).double()
            sums[name] = sq if sums[name] is None else sums[name] + sq
        return hook

    handles = []
    try:
        for name, module in layers:
            handles.append(module.register_forward_pre_hook(hook_for(name, in_features(module)), with_kwargs=True))
        for part in _chunks(batch, chunk):
            forward(model, part)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, s in sums.items() if s is None]
    if missing:
        raise RuntimeError(f"the forward pass never reached the prunable layers {missing}; check `forward`")
    return {name: s.sqrt().float() for name, s in sums.items()}  # type: ignore[union-attr]


def wanda_prune(model: nn.Module, batch: Any, n_params: int, chunk: int = 1024,
                forward: Forward | None = None) -> WeightPruneResult:
    """Wanda: zero ``n_params`` weights of lowest |W_ij| * ||X_j||_2, per output row, in a deep copy.

    ``batch`` is the calibration data, run in slices of ``chunk`` examples by ``forward(model, slice)``
    — by default ``model.run(slice)`` (any BlockModel); give ``forward`` for a model without ``run``,
    e.g. ``lambda m, ids: m.lm(input_ids=ids)``. The pass runs on the copy before any weight is zeroed,
    so the input model never carries a hook. Norms X_j are over every token of the batch (an LM on a token
    batch: its real tokens only, each row's shared prefix included; a custom ``forward`` decides for itself).

    As in Wanda, weights compete within an output row: every row loses the same fraction
    p = n_params / n_prunable of its weights, floor(p * in_features) each, with the remainder handed out
    one per row (largest fractional part first, then block / matrix / row order) so the total is exactly
    ``n_params``; within a row, ties go by column index. Conv1D rows are columns of the stored weight.
    """
    pruned = _deep_copy(model)
    blocks = _blocks(pruned)
    layers = prunable_weights(blocks)
    total = sum(m.weight.numel() for _, m in layers)
    n = _check_budget(n_params, total)
    norms = input_norms(pruned, batch, chunk, forward)
    # rows of one matrix share a width, so apportion per matrix over all of its rows
    shapes = [tuple(_out_in(m, m.weight).shape) for _, m in layers]  # (out, in)
    row_quota = _row_quotas(n, shapes)
    masks = {}
    for (name, module), (rows, width), quota in zip(layers, shapes, row_quota):
        weight = _out_in(module, module.weight.detach()).float()
        scores = weight.abs() * norms[name].to(weight.device)[None, :]
        order = torch.sort(scores, dim=1, stable=True).indices
        rank_ok = torch.arange(width, device=weight.device)[None, :] < quota.to(weight.device)[:, None]
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, rank_ok)
        masks[name] = _out_in(module, mask)  # back to the stored layout
    per_matrix = _apply(blocks, masks)
    return WeightPruneResult(pruned, sum(per_matrix.values()), per_matrix, "wanda", total,
                             {"calibration_examples": len(batch), "chunk": chunk})


def _row_quotas(n: int, shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Weights to zero in each output row (one (out,) long tensor per matrix), summing exactly to ``n``.

    Row r of a matrix of width w gets floor(n * w / total); the remainder goes one per row to the rows with
    the largest fractional part n * w mod total (ties -> earlier matrix, then earlier row).
    """
    total = sum(r * w for r, w in shapes)
    base = [n * w // total if total else 0 for _, w in shapes]
    frac = [n * w % total if total else 0 for _, w in shapes]
    left = n - sum(b * r for b, (r, _) in zip(base, shapes))
    quotas = [torch.full((r,), b, dtype=torch.long) for b, (r, _) in zip(base, shapes)]
    for i in sorted(range(len(shapes)), key=lambda i: (-frac[i], i)):
        if left <= 0:
            break
        extra = min(left, shapes[i][0])
        quotas[i][:extra] += 1
        left -= extra
    return quotas


__all__ = [
    "WeightPruneResult", "prunable_weights", "in_features", "n_prunable", "block_parameter_count",
    "magnitude_prune", "input_norms", "wanda_prune",
]
