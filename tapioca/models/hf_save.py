"""Pruned Hugging Face models as ordinary model folders, and which original blocks a pruned model kept.

:func:`save_pruned` writes a copy of a causal LM without some decoder blocks as a normal ``save_pretrained``
folder (safetensors weights, tokenizer, a config whose layer count and per-layer lists match the blocks), plus
``tapioca_pruning.json`` recording where it came from. The folder loads with
``AutoModelForCausalLM.from_pretrained`` and generates with the KV cache like the gated model.

:func:`match_blocks` works the other way, for a model pruned by any tool (ShortGPT-style block removal, a
mergekit passthrough slice, SLEB): it finds, by comparing weights, which original block each of the pruned
model's blocks is, or says it cannot.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from tapioca.errors import CheckpointError
from tapioca.models.hf_structure import PER_LAYER_CONFIG_KEYS, _kept, find_blocks, text_config

PROVENANCE_FILE = "tapioca_pruning.json"
NOT_PER_LAYER = ("architectures", "token", "label")  # config keys holding lists that are never per-layer
MATCH_RTOL = 1e-6  # a block matches when ||a - b|| <= MATCH_RTOL * ||b|| for every parameter (float64)


# ---------------------------------------------------------------- saving


def _per_layer_keys(config: Any, n_blocks: int) -> list[str]:
    """Keys of ``config`` whose value is a list with one entry per block (length ``n_blocks``), besides the
    ones :mod:`hf_structure` trims itself; token-id, label and architecture lists are never per-layer."""
    return [k for k, v in vars(config).items()
            if isinstance(v, (list, tuple)) and len(v) == n_blocks and k not in PER_LAYER_CONFIG_KEYS
            and not any(word in k for word in NOT_PER_LAYER)]


def save_pruned(lm: Any, removed: Sequence[int], path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``lm`` (an :class:`~tapioca.models.hf.HFModel`) without the ``removed`` blocks to the folder ``path``.

    The copy has the kept decoder layers only, ``num_hidden_layers`` and every per-layer config list
    (``layer_types`` and any other list of the old layer count) cut to the kept blocks, and each kept
    attention module's ``layer_idx`` (its KV-cache slot) renumbered to its new position. ``lm`` is untouched.
    ``tapioca_pruning.json`` in the folder records the original path, the removed and kept blocks (original
    indices), the config lists that were cut, and ``provenance`` (e.g. the search). Replaces ``path``
    atomically; returns it."""
    n_old = lm.n_blocks
    keep = _kept(n_old, list(removed))
    removed = sorted({int(r) for r in removed})
    pruned = lm.pruned_copy(removed)
    config = text_config(pruned.model)
    trimmed = _per_layer_keys(config, n_old) if removed else []
    for key in trimmed:
        values = getattr(config, key)
        setattr(config, key, type(values)(values[i] for i in keep))
    cut_here = [k for k in PER_LAYER_CONFIG_KEYS if removed and isinstance(getattr(config, k, None), (list, tuple))]
    record = {
        "format": "tapioca-pruned-hf",
        "original": lm.source.path if getattr(lm, "source", None) is not None else None,
        "n_blocks_original": n_old,
        "removed": removed,
        "kept": keep,
        "config_lists_trimmed": cut_here + trimmed,
    }
    record.update({k: v for k, v in (provenance or {}).items() if k not in record})  # the facts above win
    return pruned.save(path, extra_json={PROVENANCE_FILE: record})


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The ``tapioca_pruning.json`` of a model folder saved by :func:`save_pruned`, or None (other tools)."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {err}") from None


# ---------------------------------------------------------------- matching blocks


@dataclass
class BlockMatch:
    """Which original block each block of a pruned model is.

    kept: original index of each pruned block, in the pruned model's order (None when some block matches no
    original block); removed: original blocks not kept; message: one sentence saying what was inferred, or
    why it cannot be; ambiguous: pruned blocks that matched several original blocks (the first one in order
    was taken); rest_equal: whether the parameters outside the blocks (embeddings, final norm, head) are equal.
    """

    kept: list[int] | None
    removed: list[int] | None
    n_original: int
    n_pruned: int
    message: str
    ambiguous: list[int] = field(default_factory=list)
    rest_equal: bool | None = None

    @property
    def ok(self) -> bool:
        return self.kept is not None

    @property
    def in_order(self) -> bool:
        """The kept blocks are distinct and in their original order (a profile can be indexed by original block)."""
        return self.kept is not None and all(a < b for a, b in zip(self.kept, self.kept[1:]))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "in_order": self.in_order}


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every floating-point parameter and buffer of a module, by name (detached, where they are)."""
    items = [*module.named_parameters(), *module.named_buffers()]
    return {name: t.detach() for name, t in items if t.is_floating_point()}


def _fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], float, float]]:
    """Per tensor: shape, sum and norm (float64): cheap to compare for every pair of blocks."""
    out = {}
    for name, t in tensors.items():
        x = t.to(torch.float64)
        out[name] = (tuple(t.shape), float(x.sum()), float(x.norm()))
    return out


def _may_match(a: dict, b: dict, rtol: float) -> bool:
    """A necessary condition for :func:`_same` from fingerprints: ||a - b|| <= rtol ||b|| implies
    | ||a|| - ||b|| | <= rtol ||b|| and |sum a - sum b| <= sqrt(n) rtol ||b|| (Cauchy-Schwarz)."""
    if a.keys() != b.keys():
        return False
    for name, (shape, total, norm) in a.items():
        shape_b, total_b, norm_b = b[name]
        slack = rtol * norm_b + 1e-12 * (1.0 + norm_b)
        n = max(1, math.prod(shape))
        if shape != shape_b or abs(norm - norm_b) > slack or abs(total - total_b) > n ** 0.5 * slack:
            return False
    return True


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> bool:
    """Same names and shapes, and each tensor of ``a`` equal to ``b``'s or within ``rtol`` of it (relative, in
    norm, float64)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return False
    for k in a:
        x, y = a[k].to("cpu", torch.float64), b[k].to("cpu", torch.float64)
        if not (torch.equal(x, y) or float((x - y).norm()) <= rtol * float(y.norm())):
            return False
    return True


def _rest(model: nn.Module, blocks: nn.ModuleList) -> dict[str, torch.Tensor]:
    """Parameters outside the block list (embeddings, final norm, output head), by name."""
    inside = {id(p) for p in blocks.parameters()}
    return {n: p.detach() for n, p in model.named_parameters() if id(p) not in inside}


def match_blocks(base: nn.Module, pruned: nn.Module, rtol: float = MATCH_RTOL) -> BlockMatch:
    """For each block of the causal LM ``pruned``, the block of ``base`` with the same weights (equal, or
    within ``rtol`` relative in norm per tensor). Blocks are found structurally in both models. A pruned
    block that matches no original block (fine-tuned or merged after pruning, or another model) makes the
    result say so with ``kept`` = None; a block matching several originals takes the first one after the
    previous match (so order-preserving removals come out in order)."""
    original, mine = find_blocks(base), find_blocks(pruned)
    weights = [_tensors(b) for b in original]
    prints = [_fingerprint(w) for w in weights]
    kept: list[int] = []
    ambiguous: list[int] = []
    for k, block in enumerate(mine):
        tensors = _tensors(block)
        mine_print = _fingerprint(tensors)
        candidates = [i for i, (w, p) in enumerate(zip(weights, prints))
                      if _may_match(mine_print, p, rtol) and _same(tensors, w, rtol)]
        if not candidates:
            return BlockMatch(None, None, len(original), len(mine),
                              f"cannot infer: layer {k} of the pruned model matches no original layer "
                              f"(weights differ beyond {rtol:g} relative; fine-tuned after pruning, or another model)")
        if len(candidates) > 1:
            ambiguous.append(k)
        after = [i for i in candidates if not kept or i > kept[-1]]
        kept.append(after[0] if after else candidates[0])
    base_rest, pruned_rest = _rest(base, original), _rest(pruned, mine)
    rest_equal = _same(pruned_rest, base_rest, rtol)
    removed = [i for i in range(len(original)) if i not in kept]
    message = f"inferred from block weights: the pruned model keeps original blocks {kept} and removed {removed}"
    if len(set(kept)) < len(kept) or kept != sorted(kept):
        message += " (blocks repeated or reordered: a profile cannot be indexed by original block)"
    if ambiguous:
        message += f"; pruned blocks {ambiguous} matched several original blocks"
    if not rest_equal:
        message += "; embeddings, final norm or head differ from the base model's"
    return BlockMatch(kept, removed, len(original), len(mine), message, ambiguous, rest_equal)


def by_original_block(states: torch.Tensor, kept: Sequence[int], n_original: int) -> torch.Tensor:
    """Hidden states of a pruned model, (len(kept) + 1, ...), re-indexed by original block, (n_original + 1, ...):
    entry 0 is the input of the first block, entry l + 1 the output of original block l, which for a removed
    block is its input passed through (as a gated model with that block at alpha = 0 gives)."""
    if len(kept) + 1 != states.shape[0]:
        raise ValueError(f"{states.shape[0]} states for {len(kept)} kept blocks; expected {len(kept) + 1}")
    out = [states[0]]
    position = {block: j for j, block in enumerate(kept)}
    for block in range(n_original):
        out.append(states[position[block] + 1] if block in position else out[-1])
    return torch.stack(out)
