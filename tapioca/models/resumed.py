"""Many gated runs of one model on one batch, each resumed from the full model's residual stream.

Gates change nothing below the lowest block whose alpha is not 1, so a run gated at blocks ``>= b`` can start
at block ``b`` from the full model's input to ``b``, computed once. The chunks are the full pass's chunks,
so predictions and captured states are the numbers a plain gated :func:`~tapioca.models.base.run_in_chunks`
gives, for a fraction of the compute when the gated blocks are deep::

    runs = ResumedRuns(model, batch, chunk=256)
    for alpha in (0.0, 0.5, 1.0):
        out = runs({5: alpha, 6: alpha}, capture=True)   # blocks 0..4 are not recomputed
"""

from __future__ import annotations

from typing import Any

import torch

from tapioca.models.base import BlockModel, RunOutput, chunks, concat_outputs
from tapioca.models.gates import Gates, Recorded, check_gates, injected_input, recorded_inputs, removal_gates


MAX_BYTES = 2 * 2**30  # block inputs a ResumedRuns may keep


def nbytes(inputs: list[Recorded]) -> int:
    """Bytes held by one chunk's recorded block inputs (a tensor shared by several blocks counted once)."""
    tensors = {id(t): t for rec in inputs for t in rec}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_from(model: BlockModel, batch: Any, inputs: list[Recorded], start: int, gates: Gates,
             capture: bool = False) -> RunOutput:
    """``model.run(batch, gates)`` resumed at block ``start`` from ``inputs`` (every block's recorded input of a
    pass that agrees with ``gates`` below ``start``): blocks below ``start`` are skipped, not recomputed; block
    ``start`` runs with its own gate. The one mechanism every resumed run uses (held-out runs, residual-scaling
    sweeps, TALE's prefix-reusing and racing rounds)."""
    with injected_input(model.blocks, start, inputs[start]):
        return model.run(batch, {**gates, **removal_gates(range(start))}, capture=capture)


class ResumedRuns:
    """``runs(gates, capture)`` -> the :class:`RunOutput` of ``model`` on ``batch`` with ``gates``.

    The first call records every block's input (B, T, D) of the ungated model, per chunk (memory: blocks x
    batch x tokens x width floats); states (L + 1, B, D) are always captured on that pass. When the first
    chunk's inputs show that the whole batch's would exceed ``max_bytes``, nothing is kept and every call is a
    plain gated pass over the chunks (same numbers, no reuse).
    """

    def __init__(self, model: BlockModel, batch: Any, chunk: int, max_bytes: int = MAX_BYTES) -> None:
        self.model, self.batch = model, batch
        self.chunks = chunks(batch, chunk)
        self.max_bytes = max_bytes
        self._inputs: list[list[Recorded]] | None = []  # per chunk: every block's input, ungated model; None: off
        self._full: RunOutput | None = None
        self.passes = 0  # forward passes over the batch made (the recorded one included)

    @property
    def full(self) -> RunOutput:
        """The ungated model's predictions and states, recorded on first use."""
        if self._full is None:
            outputs = []
            for sub in self.chunks:
                with recorded_inputs(self.model.blocks) as inputs:
                    outputs.append(self.model.run(sub, None, capture=True))
                if self._inputs is not None and not self._inputs and nbytes(inputs) * len(self.chunks) > self.max_bytes:
                    self._inputs = None
                if self._inputs is not None:
                    self._inputs.append(list(inputs))
            self._full = concat_outputs(outputs)
            self.passes += 1
        return self._full

    def __call__(self, gates: Gates | None = None, capture: bool = False) -> RunOutput:
        gates = check_gates(gates, self.model.n_blocks)
        full = self.full
        active = [b for b, alpha in gates.items() if alpha != 1.0]
        if not active:
            return full if capture else RunOutput(full.predictions)
        if self._inputs is None:
            self.passes += 1
            return concat_outputs([self.model.run(sub, gates, capture=capture) for sub in self.chunks])
        start = min(active)
        outputs = [run_from(self.model, sub, inputs, start, gates, capture)
                   for sub, inputs in zip(self.chunks, self._inputs)]
        self.passes += 1
        out = concat_outputs(outputs)
        if capture:
            assert out.states is not None and full.states is not None
            out.states[: start + 1] = full.states[: start + 1]  # below the resumed block: the full model's
        return out

