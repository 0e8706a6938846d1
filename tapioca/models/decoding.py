"""Greedy decoding with the KV cache, batched over rows, that resumes the prompt from a recorded pass.

TALE scores a candidate by greedy generation. For a configuration whose lowest removed (or scaled) block is
``s``, the blocks below ``s`` see exactly the prompt tokens they saw in a configuration that agrees with it
below ``s``, so their hidden states and their keys and values are that pass's. :func:`greedy_decode` with
``record=True`` keeps, per block, the prompt's hidden-state input and the (keys, values) its attention put into
the cache (:class:`BlockRecord`); a later call with ``inputs=record, start=s`` skips the blocks below ``s`` in
the prompt pass (their cache entries are replayed from the record, no compute), resumes at block ``s`` from
its recorded input, and then decodes every new token through all kept blocks with the cache::

    base = greedy_decode(lm, prompts, removal_gates([3]), 8, record=True)          # one full prompt pass
    cand = greedy_decode(lm, prompts, removal_gates([3, 17]), 8, inputs=base.record, start=17)

Why replay recorded keys and values rather than recompute them from the recorded block inputs: recomputing
needs each architecture's input norm, projections and rotary embedding (or the whole block), replaying is
exact and free, and costs 2·H_kv·D_head floats per token and block (SmolLM2-135M: 384, against the 576 of
the block input the record holds anyway).

Rows are laid out as :meth:`HFModel.generate` lays them out: the prompt prefix all rows share (few-shot
demonstrations; :meth:`HFModel.generation_prefix`) runs once as a (1, P) pass whose cache is repeated per row,
and the rows' rest is left-padded after it, positions following the attention mask. Removed blocks (gate 0)
are removed physically for the duration (a skipped block would leave its cache layer empty), scaled blocks
are gated. The generated ids equal greedy generation's (tested against an uncached batch-1 loop).

``PROFILE`` accumulates wall time in prompt passes and in decode steps (for benchmarks).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from tapioca.models.gates import Gates, check_gates, gated, injected_input, recorded_inputs
from tapioca.models.hf import HFModel, TokenBatch, _pad, blocks_removed

__all__ = ["BlockRecord", "Decoded", "DecodeProfile", "PROFILE", "greedy_decode", "prompt_rows"]


class BlockRecord(tuple):
    """One block's share of a recorded prompt pass, iterable as its tensors (so the memory a record holds is
    counted like recorded block inputs, :func:`tapioca.models.resumed.nbytes`).

    ``inputs``: the hidden states entering the block, one per prompt call: (1, P, D) shared prefix then
    (B, T', D) left-padded rows, or the rows alone. ``updates``: the (keys, values) the block's attention put
    into the KV cache in those calls, ((1, H, P, Dh), (1, H, P, Dh)) then ((B, H, T', Dh), ...); empty for a
    removed block, whose ``inputs`` are those of the next kept block (the stream passing it).
    """

    inputs: tuple[Tensor, ...]
    updates: tuple[tuple[Tensor, Tensor], ...]

    def __new__(cls, inputs: Sequence[Tensor] = (), updates: Sequence[tuple[Tensor, Tensor]] = ()) -> "BlockRecord":
        self = super().__new__(cls, (*inputs, *(t for kv in updates for t in kv)))
        self.inputs, self.updates = tuple(inputs), tuple(tuple(kv) for kv in updates)  # type: ignore[misc]
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # pickling (Ray workers)
        return self.inputs, self.updates


@dataclass
class Decoded:
    """tokens (B, S) long: each row's greedy ids, S = max_new_tokens, -1 after the row stopped (after its EOS,
    or once ``done`` said its answer cannot change); record: per original block, when asked for."""

    tokens: Tensor
    record: list[BlockRecord] | None = None


@dataclass
class DecodeProfile:
    """Wall seconds spent in prompt passes and in decode steps, and the decode steps run (all rows at once)."""

    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0

    def reset(self) -> None:
        self.prompt_seconds, self.decode_seconds, self.steps = 0.0, 0.0, 0


PROFILE = DecodeProfile()


def prompt_rows(batch: TokenBatch) -> list[list[int]]:
    """Each row's prompt tokens (up to and including its query, the last prompt token)."""
    return [ids[: int(q) + 1].tolist() for ids, q in zip(batch.input_ids, batch.query)]


@torch.no_grad()
def greedy_decode(
    lm: HFModel, batch: TokenBatch, gates: Gates | None = None, max_new_tokens: int = 1, *,
    done: Callable[[str], bool] | None = None, record: bool = False, inputs: list[BlockRecord] | None = None,
    start: int = 0,
) -> Decoded:
    """Greedy continuations of ``batch``'s prompts (rows of a prompt-only :class:`TokenBatch`) with block
    ``gates``: the ids :meth:`HFModel.generate` would produce, all rows decoded at once with the KV cache.

    A row stops at an EOS token or, with ``done``, once ``done(text so far)`` is true; decoding stops when
    every row has stopped or after ``max_new_tokens``. ``record``: also return every block's
    :class:`BlockRecord`. ``inputs`` / ``start``: the record of an earlier call on the same batch whose gates
    agree with ``gates`` below block ``start``; the prompt pass then resumes at ``start`` (blocks below it are
    not recomputed). Refuses to run while hooks sit on the blocks (a resumption or recording meant for one
    forward pass would also see every decode step: use this function's own ``inputs``/``record`` instead).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    hooked = [i for i, block in enumerate(lm.blocks) if block._forward_pre_hooks]
    if hooked:
        raise RuntimeError(f"blocks {hooked} carry forward pre-hooks (recorded or injected inputs?); greedy decoding "
                           "of several tokens cannot be resumed that way: score with one forward pass "
                           "(max_new_tokens=1, a log-likelihood metric) or without racing / residual sweeps")
    gates = check_gates(gates, lm.n_blocks)
    removed = sorted(i for i, a in gates.items() if a == 0.0)
    keep = [i for i in range(lm.n_blocks) if i not in removed]
    rows = prompt_rows(batch)
    shared = lm.generation_prefix(rows, max_new_tokens)
    if inputs is None or not any(i >= start for i in keep):  # nothing computed at or above start: run it all
        inputs, start = None, 0
    else:
        _check_record(inputs, keep, start, 2 if shared else 1, lm.n_blocks)
    with blocks_removed(lm.model, removed):
        scaled = {n: gates[i] for n, i in enumerate(keep) if gates.get(i, 1.0) != 1.0}
        clock = time.perf_counter()
        cache, logits, mask, got, updates = _prompt_pass(lm, rows, shared, keep, scaled, inputs, start, record)
        PROFILE.prompt_seconds += time.perf_counter() - clock
        clock = time.perf_counter()
        with gated(lm.blocks, scaled):
            tokens = _decode_steps(lm, cache, logits, mask, max_new_tokens, done)
        PROFILE.decode_seconds += time.perf_counter() - clock
    records = _records(lm.n_blocks, keep, got, updates, inputs, start) if record else None
    return Decoded(tokens, records)


def _check_record(inputs: list[BlockRecord], keep: list[int], start: int, calls: int, n_blocks: int) -> None:
    """A record to resume from must cover every block, hold the input at ``start`` and the cache entries of
    every kept block below it, one per prompt call."""
    if len(inputs) != n_blocks or not 0 <= start < n_blocks:
        raise ValueError(f"a record of {len(inputs)} blocks cannot resume block {start} of {n_blocks}")
    if len(inputs[start].inputs) != calls:
        raise ValueError(f"the record holds {len(inputs[start].inputs)} prompt call(s) at block {start}, this batch "
                         f"needs {calls}: was it recorded on another batch?")
    missing = [i for i in keep if i < start and len(inputs[i].updates) != calls]
    if missing:
        raise ValueError(f"the record has no cache entries for kept blocks {missing} below block {start}: its "
                         "gates do not agree with these below the resumed block")


@contextmanager
def _recorded_updates(cache: Any) -> Iterator[dict[int, list[tuple[Tensor, Tensor]]]]:
    """While active, every (keys, values) put into ``cache``, by cache layer, in call order."""
    updates: dict[int, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    update = cache.update

    def recording(key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        updates[layer_idx].append((key_states, value_states))
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = recording
    try:
        yield updates
    finally:
        del cache.update


def _prompt_pass(
    lm: HFModel, rows: list[list[int]], shared: int, keep: list[int], scaled: dict[int, float],
    inputs: list[BlockRecord] | None, start: int, record: bool,
) -> tuple[Any, Tensor, Tensor, list | None, dict[int, list[tuple[Tensor, Tensor]]]]:
    """The prompt pass under physically removed blocks (``lm.blocks`` are the kept ones, new index n is
    original block ``keep[n]``): the shared prefix (1, P), its cache repeated per row, then the left-padded
    rest (B, T'). Resumed (``inputs``): kept blocks below ``start`` are skipped and their recorded cache
    entries replayed after each call; the first kept block at or above ``start`` takes the recorded input of
    ``start``. Returns the cache, the next-token logits (B, V) float32, the attention mask (B, P + T'), the
    blocks' recorded inputs (by new index; when ``record``) and every cache update (by new index)."""
    from transformers import DynamicCache

    device = lm.device
    reused = [n for n, i in enumerate(keep) if i < start]
    first = next(n for n, i in enumerate(keep) if i >= start)
    rest, rest_mask = _pad([r[shared:] for r in rows], lm.pad_id, left=True)
    mask = torch.cat([torch.ones(len(rows), shared, dtype=torch.long), rest_mask], 1).to(device)
    positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=lm.model.config)

    def replay(call: int) -> None:
        for n in reused:
            cache.update(*inputs[keep[n]].updates[call], n)  # type: ignore[index]

    with ExitStack() as stack:
        updates = stack.enter_context(_recorded_updates(cache))
        if inputs is not None:  # registered before the recorder: it records the injected input
            stack.enter_context(injected_input(lm.blocks, first, inputs[start].inputs))
        got = stack.enter_context(recorded_inputs(lm.blocks)) if record else None
        stack.enter_context(gated(lm.blocks, {**scaled, **{n: 0.0 for n in reused}}))
        if shared:
            prefix = torch.tensor([rows[0][:shared]], dtype=torch.long, device=device)
            lm.model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True,
                     **lm._cache_arg(cache), **lm._keep_logits(1))
            replay(0)
            cache.batch_repeat_interleave(len(rows))
        out = lm.model(input_ids=rest.to(device), attention_mask=mask, position_ids=positions[:, shared:],
                       use_cache=True, **lm._cache_arg(cache), **lm._keep_logits(1))
        replay(-1)
    return cache, out.logits[:, -1].float().to(device), mask, got, updates


def _decode_steps(lm: HFModel, cache: Any, logits: Tensor, mask: Tensor, steps: int,
                  done: Callable[[str], bool] | None) -> Tensor:
    """Greedy tokens (B, steps) from the prompt's next-token ``logits`` (B, V) and its ``cache`` / attention
    ``mask`` (B, T): each step feeds every row's last token at its next position; -1 after a row stopped."""
    device = lm.device
    eos = torch.tensor(lm.eos_ids(), dtype=torch.long, device=device)
    rows = logits.shape[0]
    out = torch.full((rows, steps), -1, dtype=torch.long)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(rows)]
    position = (mask.sum(1) - 1)[:, None]  # (B, 1): each row's last position
    for t in range(steps):
        token = logits.argmax(-1)  # (B,)
        out[:, t] = torch.where(finished, -1, token).cpu()
        finished |= torch.isin(token, eos)
        if done is not None:
            for b in (~finished).nonzero().flatten().tolist():
                generated[b].append(int(token[b]))
                if done(lm.tokenizer.decode(generated[b], skip_special_tokens=True)):
                    finished[b] = True
        if t == steps - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
        position = position + 1
        logits = lm.model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                          **lm._cache_arg(cache), **lm._keep_logits(1)).logits[:, -1].float().to(device)
        PROFILE.steps += 1
    return out


def _records(n_blocks: int, keep: list[int], got: list | None, updates: dict[int, list[tuple[Tensor, Tensor]]],
             inputs: list[BlockRecord] | None, start: int) -> list[BlockRecord]:
    """Every original block's :class:`BlockRecord` from a prompt pass: kept blocks below ``start`` (resumed) take
    their inputs from the record resumed from; removed blocks the inputs of the next kept block."""
    records: list[BlockRecord] = [BlockRecord() for _ in range(n_blocks)]
    assert got is not None
    kept = set(keep)
    for n, i in enumerate(keep):
        block_inputs = inputs[i].inputs if inputs is not None and i < start else got[n]
        records[i] = BlockRecord(block_inputs, updates.get(n, []))
    following: tuple[Tensor, ...] = ()
    for i in reversed(range(n_blocks)):
        if i in kept:
            following = records[i].inputs
        else:
            records[i] = BlockRecord(following)
    return records
