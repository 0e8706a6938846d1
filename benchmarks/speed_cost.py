"""The search benchmark's cost model: analytic FLOPs of the forwards and decoding a TALE search actually
executes (skipped blocks cost nothing; prefix reuse resumes below a candidate's block), and a measured float32
matmul peak to compare achieved FLOP/s against. Used by ``search_speed.py``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from tapioca.models.base import BlockModel
from tapioca.pruning.searches import PruneResult


@dataclass(frozen=True)
class CostModel:
    """Analytic FLOPs of one example's forward. ``block_params``: matmul weights per block; ``seq_len``: T."""

    block_params: tuple[int, ...]
    d_model: int
    seq_len: int
    other_params: int = 0  # matmul weights outside the blocks, applied to every token (read-in/out, LM head)
    last_kv_params: int | None = None  # set when the last block computes the last position only: its K, V weights

    def block_flops(self, block: int) -> float:
        """One block on one sequence: 2·params·T for the matmuls plus 4·T²·D for QKᵀ and AV (unmasked); a
        last block that computes the last position alone: keys and values for T tokens, the rest for one."""
        t, params = self.seq_len, self.block_params[block]
        if self.last_kv_params is not None and block == len(self.block_params) - 1:
            return 2.0 * self.last_kv_params * t + 2.0 * (params - self.last_kv_params) + 4.0 * t * self.d_model
        return 2.0 * params * t + 4.0 * t * t * self.d_model

    def forward_flops(self, blocks: Sequence[int]) -> float:
        """One example through ``blocks`` (the others skipped) plus the parts outside the blocks."""
        return sum(self.block_flops(b) for b in blocks) + 2.0 * self.other_params * self.seq_len


def matmul_params(module: torch.nn.Module) -> int:
    """Parameters of the matrices multiplied in ``module``: 2-D weights outside embedding tables (lookups)."""
    return sum(p.numel() for m in module.modules() if not isinstance(m, torch.nn.Embedding)
               for p in m.parameters(recurse=False) if p.dim() == 2)


def model_cost(model: BlockModel, d_model: int, seq_len: int, other_params: int | None = None) -> CostModel:
    """Cost model of any BlockModel: per-block matmul parameters from ``model.blocks``; ``other_params``
    defaults to the model's matmul parameters outside the blocks (when it is an ``nn.Module``)."""
    block = tuple(matmul_params(b) for b in model.blocks)
    if other_params is None:
        total = matmul_params(model) if isinstance(model, torch.nn.Module) else sum(block)
        other_params = max(total - sum(block), 0)
    return CostModel(block, d_model, seq_len, other_params)


def executed_forwards(result: PruneResult, prefix: bool, record_passes: int = 1) -> Iterator[list[int]]:
    """The blocks each forward of a search actually computed.

    Naive (or ``prefix=False``): the baseline, then every candidate configuration from scratch. Prefix reuse:
    the passes ``result.info["passes"]`` lists (removed blocks, first block computed); without that list, the
    baseline, ``record_passes`` passes per round under the current gates, and candidate b from block b + 1.
    """
    n = result.n_blocks
    passes = result.info.get("passes") if prefix else None
    if passes is not None:
        for removed, first in passes:
            yield [j for j in range(first, n) if j not in removed]
        return
    yield list(range(n))  # baseline
    for rnd in result.rounds:
        removed = set(rnd["removed_before"])
        kept = [j for j in range(n) if j not in removed]
        if prefix:
            for _ in range(record_passes):
                yield kept
        for b in map(int, rnd["candidates"]):
            yield [j for j in kept if j > b] if prefix else [j for j in kept if j != b]


def search_flops(result: PruneResult, cost: CostModel, n_examples: int, prefix: bool, record_passes: int = 1) -> float:
    """Estimated FLOPs a search executed on ``n_examples`` examples."""
    return n_examples * sum(cost.forward_flops(f) for f in executed_forwards(result, prefix, record_passes))


@dataclass(frozen=True)
class DecodeCost:
    """Greedy decoding's work beyond the prompt pass, per example: ``steps`` tokens decoded after the first
    (nominal: max_new_tokens - 1; rows that stop early do less), each through every kept block with a cache of
    about ``context`` tokens, and the LM head (``head_params`` matmul weights) at every new token."""

    steps: int
    context: int
    head_params: int


def executed_passes(result: PruneResult, prefix: bool) -> Iterator[tuple[list[int], int]]:
    """(removed blocks, first block whose prompt pass was computed) of every pass a search ran: its logged
    ``info["passes"]`` with prefix reuse, else the baseline and every candidate from block 0."""
    passes = result.info.get("passes") if prefix else None
    if passes is not None:
        yield from ((list(removed), int(first)) for removed, first in passes)
        return
    yield [], 0
    for rnd in result.rounds:
        for b in map(int, rnd["candidates"]):
            yield [*rnd["removed_before"], b], 0


def generation_flops(result: PruneResult, cost: CostModel, decode: DecodeCost, prompt_examples: float,
                     n_examples: int, prefix: bool) -> float:
    """Estimated FLOPs of a search scored by greedy generation: per pass, the prompt through the blocks it
    computed (``prompt_examples`` examples' worth of tokens, see :meth:`Case.flop_examples`), then every decode
    step through every kept block (resumed prompts still decode through the blocks below), and the head."""
    total = 0.0
    for removed, first in executed_passes(result, prefix):
        kept = [j for j in range(result.n_blocks) if j not in removed]
        prompt = sum(cost.block_flops(j) for j in kept if j >= first)
        step = sum(2.0 * cost.block_params[j] + 4.0 * decode.context * cost.d_model for j in kept)
        total += prompt_examples * prompt + n_examples * (decode.steps * step
                                                          + 2.0 * (decode.steps + 1) * decode.head_params)
    return total


@dataclass(frozen=True)
class Peak:
    """Measured float32 matmul FLOP/s, per wall second and per CPU second of this process."""

    wall: float
    cpu: float


def matmul_peak(threads: int, size: int = 2048, repeats: int = 3) -> Peak:
    """Best of ``repeats`` (size × size) float32 matmuls on ``threads`` CPU threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    wall = cpu = math.inf
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        a @ b
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return Peak(2.0 * size**3 / wall, 2.0 * size**3 / max(cpu, 1e-9))
