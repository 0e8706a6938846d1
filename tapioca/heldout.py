"""Held-out evaluations of one model under many block-removal sets, exact and shared.

A study evaluates the same model on the same held-out prompts with the full model, TALE's removals and
every control's removals. :class:`HeldoutRuns` gives the numbers :func:`tapioca.evaluation.evaluate`
would give, faster: an identical removal set is run once, and a run whose lowest removed block is ``b``
resumes from the full model's residual stream at ``b`` (blocks ``0..b-1`` are untouched, so their
output is the full model's), computed in the same chunks, hence bit-identical.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tapioca.evaluation import Evaluation, check_split_size, single_evaluation
from tapioca.models.base import BlockModel
from tapioca.models.gates import Recorded, injected_input, recorded_inputs, removal_gates
from tapioca.tasks.polyreg import PolyRegTask


class HeldoutRuns:
    """``runs(removed, dists)`` -> the held-out :class:`Evaluation` of ``model`` with ``removed`` skipped,
    on ``n`` prompts of replicate ``seed`` per distribution. Keeps the full model's block inputs for the
    most recent distribution only (memory: blocks × n × tokens × width floats); group calls by
    distribution for the most reuse."""

    def __init__(self, model: BlockModel, task: PolyRegTask, seed: int, n: int, chunk: int) -> None:
        check_split_size(n, "evaluation.n_heldout")
        self.model, self.task, self.seed, self.n, self.chunk = model, task, seed, n, chunk
        self.memo: dict[tuple[str, tuple[int, ...]], Evaluation] = {}
        self.runs = 0  # forward passes over a distribution's held-out prompts (full or resumed) made
        self._dist: str | None = None
        self._batch: Any = None
        self._full_predictions = torch.empty(0)  # (n,), the full model on the current distribution
        self._inputs: list[list[Recorded]] = []  # per chunk: the input of every block, full model

    def __call__(self, removed: Sequence[int], dists: Sequence[str]) -> Evaluation:
        return Evaluation.concat([self.one(removed, d) for d in dists])

    def one(self, removed: Sequence[int], dist: str) -> Evaluation:
        key = (dist, tuple(sorted(removed)))
        if key not in self.memo:
            self._load(dist)
            preds = self._predictions(list(key[1])) if key[1] else self._full_predictions
            self.memo[key] = single_evaluation(dist, self.seed, self.task.metrics(preds, self._batch), preds,
                                               self._batch.query_y)
        return self.memo[key]

    def _load(self, dist: str) -> None:
        """Make ``dist`` current: its prompts, the full model's predictions and every block's input."""
        if dist == self._dist:
            return
        self._dist, self._inputs = None, []  # nothing stale survives a failure below
        self._batch = self.task.data(dist, "heldout", self.seed, self.n)
        preds = []
        for sub in self._chunks():
            with recorded_inputs(self.model.blocks) as inputs:
                preds.append(self.model.run(sub).predictions.cpu())
            self._inputs.append(list(inputs))
        self._full_predictions, self._dist = torch.cat(preds), dist
        self.runs += 1

    def _chunks(self) -> list[Any]:
        return [self._batch.slice(i, i + self.chunk) for i in range(0, len(self._batch), self.chunk)]

    def _predictions(self, removed: list[int]) -> torch.Tensor:
        """Query predictions (n,) with ``removed`` skipped, resumed at the lowest removed block."""
        start = min(removed)
        gates = {**removal_gates(removed), **{j: 0.0 for j in range(start)}}
        preds = []
        for sub, inputs in zip(self._chunks(), self._inputs):
            with injected_input(self.model.blocks, start, inputs[start]):
                preds.append(self.model.run(sub, gates).predictions.cpu())
        self.runs += 1
        return torch.cat(preds)
