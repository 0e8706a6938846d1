"""Held-out evaluations of one model under many block-removal sets, exact and shared.

A study evaluates the same model on the same held-out prompts with the full model, TALE's removals and
every control's removals. :class:`HeldoutRuns` gives the numbers :func:`tapioca.analysis.evaluation.evaluate`
would give, faster: an identical removal set is run once, and a run whose lowest removed block is ``b``
resumes from the full model's residual stream at ``b`` (blocks ``0..b-1`` are untouched, so their
output is the full model's), computed in the same chunks, hence bit-identical.
"""

from __future__ import annotations

from typing import Sequence

from tapioca.analysis.evaluation import Evaluation, check_split_size, single_evaluation
from tapioca.models.base import BlockModel
from tapioca.models.gates import removal_gates
from tapioca.models.resumed import ResumedRuns
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
        self._dist: str | None = None
        self._current: ResumedRuns | None = None  # the current distribution's runs (full model recorded)
        self._earlier_passes = 0

    @property
    def runs(self) -> int:
        """Forward passes over a distribution's held-out prompts (full or resumed) made so far."""
        return self._earlier_passes + (self._current.passes if self._current is not None else 0)

    def __call__(self, removed: Sequence[int], dists: Sequence[str]) -> Evaluation:
        return Evaluation.concat([self.one(removed, d) for d in dists])

    def one(self, removed: Sequence[int], dist: str) -> Evaluation:
        key = (dist, tuple(sorted(removed)))
        if key not in self.memo:
            runs = self._load(dist)
            preds = runs(removal_gates(key[1])).predictions.cpu()
            self.memo[key] = single_evaluation(dist, self.seed, self.task.metrics(preds, runs.batch), preds,
                                               runs.batch.query_y)
        return self.memo[key]

    def _load(self, dist: str) -> ResumedRuns:
        """The runs of ``dist``'s held-out prompts (only the most recent distribution is kept)."""
        if dist != self._dist:
            self._earlier_passes = self.runs
            self._dist, self._current = None, None  # nothing stale survives a failure below
            self._current = ResumedRuns(self.model, self.task.data(dist, "heldout", self.seed, self.n), self.chunk)
            self._dist = dist
        return self._current
