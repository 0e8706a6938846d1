"""Held-out evaluations of one model under many block-removal sets, exact and shared.

A study evaluates the same model on the same held-out examples with the full model, TALE's removals and
every control's removals. :class:`HeldoutRuns` gives the numbers :func:`tapioca.tasks.base.evaluate` would
give, faster: an identical removal set is run once, and where the workload scores a split from one forward
pass, a run whose lowest removed block is ``b`` resumes from the full model's residual stream at ``b``
(:class:`~tapioca.models.resumed.ResumedRuns`; same chunks, so the same numbers). Splits scored by generation
go through the workload's own evaluation.
"""

from __future__ import annotations

from typing import Any, Sequence

from tapioca.analysis.evaluation import Evaluation, check_split_size
from tapioca.models.gates import removal_gates
from tapioca.models.resumed import ResumedRuns
from tapioca.tasks.base import measured


class HeldoutRuns:
    """``runs(removed, dists)`` -> the :class:`Evaluation` of ``wl.model`` with ``removed`` skipped, on ``n``
    examples of ``role`` (default the held-out split; "select" gives in-sample scores) of sampling seed ``seed``
    per distribution. Keeps the full model's block inputs for the
    most recent distribution only (memory: blocks × n × tokens × width floats, capped by ResumedRuns); group
    calls by distribution for the most reuse."""

    def __init__(self, wl: Any, seed: int, n: int, role: str = "heldout") -> None:
        check_split_size(n, "pruning.n_select" if role == "select" else "evaluation.n_heldout")
        self.wl, self.seed, self.n, self.role = wl, seed, n, role
        self.memo: dict[tuple[str, tuple[int, ...]], Evaluation] = {}
        self._dist: str | None = None
        self._split: Any = None
        self._current: ResumedRuns | None = None  # the current distribution's runs (full model recorded)
        self._earlier_passes = 0

    @property
    def runs(self) -> int:
        """Forward passes over a distribution's held-out examples (full or resumed) made so far."""
        return self._earlier_passes + (self._current.passes if self._current is not None else 0)

    def __call__(self, removed: Sequence[int], dists: Sequence[str]) -> Evaluation:
        return Evaluation.concat([self.one(removed, d) for d in dists])

    def one(self, removed: Sequence[int], dist: str) -> Evaluation:
        key = (dist, tuple(sorted(removed)))
        if key not in self.memo:
            gates = removal_gates(key[1])
            runs = self._load(dist)
            if runs is None:
                self.memo[key] = self.wl.evaluate_generated(gates or None, dist, self.role, self.seed, self.n)
            else:
                self.memo[key] = measured(self.wl, self._split, runs(gates).predictions.cpu(), dist, self.seed)
        return self.memo[key]

    def _load(self, dist: str) -> ResumedRuns | None:
        """The runs of ``dist``'s held-out split (only the most recent distribution is kept); None when the
        workload scores it by generation."""
        if dist != self._dist:
            self._earlier_passes = self.runs
            self._dist, self._split, self._current = None, None, None  # nothing stale survives a failure below
            self._split = self.wl.split(dist, self.role, self.seed, self.n)
            if self._split is not None:
                self._current = ResumedRuns(self._split.model, self._split.batch, self.wl.sizes.eval_chunk)
            self._dist = dist
        return self._current
