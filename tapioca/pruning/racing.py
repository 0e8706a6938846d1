"""Racing for TALE rounds (optional, off by default): stop scoring candidates that cannot win.

A round's candidates are scored on a growing prefix of the selection examples — ``min_examples``, then twice
as many, and so on up to all of them. After each stage every candidate is compared with the current leader
(the highest mean so far) on the same examples: with paired differences d_i = s_c(i) − s_leader(i) over the
n examples seen, the candidate is eliminated when

    mean(d) + z · std(d) / sqrt(n) < 0,    z = Φ⁻¹(1 − δ / (K · S)),

K candidates and S stages (Bonferroni). **Error bound:** under the normal approximation of the paired mean,
the probability that any elimination in a round removes a candidate whose mean over the whole selection set
is at least the leader's is at most δ. Survivors are scored on every example, so their scores — and the
choice among them — are exactly TALE's; eliminated candidates keep their partial mean for the record only.
Each stage reuses the residual stream below each candidate (as :class:`~tapioca.pruning.searches.PrefixRounds`).
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import torch

from tapioca.models.base import BlockModel
from tapioca.models.gates import recorded_inputs, removal_gates
from tapioca.models.resumed import run_from

PredictionScorer = Any  # (predictions, batch) -> per-example scores (B,); see tapioca.pruning.searches


def stage_ends(n: int, min_examples: int) -> list[int]:
    """Cumulative example counts after each stage: min_examples, 2·min_examples, ... capped at n (last = n)."""
    ends, size = [], max(1, min_examples)
    while size < n:
        ends.append(size)
        size *= 2
    return [*ends, n]


def eliminated(scores: dict[int, torch.Tensor], z: float) -> set[int]:
    """Candidates whose paired difference to the leader is significantly negative: scores (n,) per candidate."""
    leader = max(scores, key=lambda b: (float(scores[b].mean()), -b))
    out = set()
    for b, s in scores.items():
        if b == leader:
            continue
        d = (s - scores[leader]).double()
        spread = float(d.std()) if len(d) > 1 else float("inf")
        if float(d.mean()) + z * spread / len(d) ** 0.5 < 0:
            out.add(b)
    return out


class RacingRounds:
    """A TALE round evaluator with racing. ``self.eliminated`` maps each candidate the last call eliminated
    to (its mean score on the examples it saw, how many) — those candidates are not in the returned dict."""

    def __init__(self, model: BlockModel, batch: Any, score_predictions: PredictionScorer, chunk: int,
                 delta: float = 0.05, min_examples: int = 64) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"racing delta {delta!r} is not allowed; expected 0 < delta < 1")
        self.model, self.batch, self.score_predictions, self.chunk = model, batch, score_predictions, chunk
        self.delta, self.min_examples = delta, min_examples
        self.eliminated: dict[int, tuple[float, int]] = {}
        self.example_runs = 0  # (candidate, example) pairs scored, for the record

    def __call__(self, removed: list[int], candidates: list[int]) -> dict[int, float]:
        ends = stage_ends(len(self.batch), self.min_examples)
        z = NormalDist().inv_cdf(1 - self.delta / (max(len(candidates), 1) * len(ends)))
        alive = list(candidates)
        scores: dict[int, list[torch.Tensor]] = {b: [] for b in candidates}
        self.eliminated, start = {}, 0
        for end in ends:
            for lo in range(start, end, self.chunk):
                self._score_chunk(self.batch.slice(lo, min(lo + self.chunk, end)), removed, alive, scores)
            start = end
            if end < len(self.batch) and len(alive) > 1:
                seen = {b: torch.cat(scores[b]) for b in alive}
                for b in eliminated(seen, z):
                    self.eliminated[b] = (float(seen[b].double().mean()), end)
                alive = [b for b in alive if b not in self.eliminated]
        return {b: float(torch.cat(scores[b]).double().mean()) for b in alive}

    def _score_chunk(self, sub: Any, removed: list[int], alive: list[int], scores: dict[int, list]) -> None:
        base = removal_gates(removed)
        with recorded_inputs(self.model.blocks) as inputs:
            self.model.run(sub, base)
        for b in alive:
            out = run_from(self.model, sub, inputs, b, {**base, b: 0.0})
            scores[b].append(self.score_predictions(out.predictions, sub).detach().cpu())
        self.example_runs += len(sub) * len(alive)
