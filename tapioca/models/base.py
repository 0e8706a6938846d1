"""The one interface every analysis uses: run a model with block gates, optionally capturing states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from tapioca.models.gates import Gates


@dataclass
class RunOutput:
    """What a gated forward pass returns.

    predictions: task outputs, (B, ...) (ICL: the prediction at the query, (B,)).
    states: hidden states at the query position by original block index, (L + 1, B, D), or None.
    """

    predictions: Tensor
    states: Tensor | None = None


class BlockModel(Protocol):
    """A model whose transformer blocks can be gated: the ICL testbed or a causal LM."""

    n_blocks: int
    device: torch.device
    blocks: nn.ModuleList  # the transformer blocks, in order

    def run(self, batch: Any, gates: Gates | None = None, capture: bool = False) -> RunOutput:
        """Forward ``batch`` with residual gates ``{block: alpha}``; capture per-block states if asked."""
        ...

    def block_parameter_count(self, index: int) -> int:
        """Number of parameters in block ``index``."""
        ...


def chunk_spans(batch: Any, chunk: int) -> list[tuple[int, int]]:
    """Row ranges ``(i, j)`` that cover ``batch`` in order: the batch's own ``spans(chunk)`` when it has one
    (token batches bound their padding that way), else ``chunk`` rows each."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    spans = getattr(batch, "spans", None)
    if spans is not None:
        return spans(chunk)
    return [(i, min(i + chunk, len(batch))) for i in range(0, len(batch), chunk)]


def chunks(batch: Any, chunk: int) -> list[Any]:
    """``batch`` cut into the slices of :func:`chunk_spans`."""
    return [batch.slice(i, j) for i, j in chunk_spans(batch, chunk)]


def run_in_chunks(model: BlockModel, batch: Any, gates: Gates | None, capture: bool, chunk: int) -> RunOutput:
    """:meth:`BlockModel.run` over ``batch`` in the chunks of :func:`chunk_spans`, concatenated."""
    return concat_outputs([model.run(sub, gates, capture) for sub in chunks(batch, chunk)])


def concat_outputs(outputs: list[RunOutput]) -> RunOutput:
    """Chunk outputs joined along the example axis (states too, when every chunk has them)."""
    states = [o.states for o in outputs]
    joined = torch.cat(states, dim=1) if all(s is not None for s in states) else None  # type: ignore[arg-type]
    return RunOutput(torch.cat([o.predictions for o in outputs]), joined)
