"""A GIN-style graph classifier whose message-passing layers are residual blocks behind the block-gate adapter.

read-in (node features -> width) -> L residual blocks ``h <- h + f(h, graph)`` -> final norm -> mean (or sum)
pool per graph -> linear read-out to class logits. Each block is ``f(h) = MLP(z + sum_{j -> i} w_ji z_j)`` with
``z = LayerNorm(h)`` (GIN with eps = 0, pre-norm), messages summed over incoming edges and optionally weighted
per edge (``edge_weight``: the hard edge masks of PrunE). Written in plain torch with ``index_add_`` scatter
sums: the model needs one scatter op, so a graph library would add a dependency and nothing else.

Blocks are called ``block(h, graph, edge_weight)`` with the node states first, so the gates of
:mod:`tapioca.models.gates` apply unchanged: alpha = 1 is the ungated model, alpha = 0 skips the block
(identical to removing it). The "query state" the geometry reads is the pooled graph embedding after each
block: ``run(..., capture=True).states`` is (L + 1, B, D).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tapioca.config import GNNConfig
from tapioca.models.base import RunOutput
from tapioca.models.gates import Gates, gated
from tapioca.models.icl import load_checked, save_checked
from tapioca.tasks.graph_data import GraphBatch

FORMAT = "tapioca-gnn"


class GINBlock(nn.Module):
    """``h + MLP(z + A_w z)``, ``z = LayerNorm(h)``: h (N, D) node states, A_w the edge-weighted adjacency."""

    def __init__(self, width: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, h: Tensor, graph: GraphBatch, edge_weight: Tensor | None = None) -> Tensor:
        z = self.norm(h)
        src, dst = graph.edge_index[0], graph.edge_index[1]
        messages = z[src] if edge_weight is None else z[src] * edge_weight[:, None].to(z.dtype)
        return h + self.mlp(z + torch.zeros_like(z).index_add_(0, dst, messages))


def pool_nodes(h: Tensor, graph: GraphBatch, how: str = "mean") -> Tensor:
    """Per-graph pooled node states: h (N, D) -> (B, D)."""
    out = torch.zeros(len(graph), h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, graph.graph_index, h)
    if how == "sum":
        return out
    counts = (graph.node_ptr[1:] - graph.node_ptr[:-1]).clamp_min(1).to(h)
    return out / counts[:, None]


class GraphNet(nn.Module):
    """GIN graph classifier (see the module docstring)."""

    def __init__(self, cfg: GNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.read_in = nn.Linear(cfg.in_dim, cfg.width)
        self.blocks = nn.ModuleList([GINBlock(cfg.width, cfg.mlp_ratio) for _ in range(cfg.n_layer)])
        self.norm = nn.LayerNorm(cfg.width)
        self.read_out = nn.Linear(cfg.width, cfg.n_classes)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        return self.read_out.weight.device

    def node_states(self, graph: GraphBatch, edge_weight: Tensor | None = None,
                    pooled: list[Tensor] | None = None) -> Tensor:
        """Node states after the last block (before the final norm), (N, D); appends the pooled state of the
        read-in and of every block output, (B, D) each, to ``pooled`` when given."""
        h = self.read_in(graph.x)
        if pooled is not None:
            pooled.append(pool_nodes(h, graph, self.cfg.pool))
        for block in self.blocks:
            h = block(h, graph, edge_weight)
            if pooled is not None:
                pooled.append(pool_nodes(h, graph, self.cfg.pool))
        return h

    def forward(self, graph: GraphBatch, edge_weight: Tensor | None = None) -> Tensor:
        """Class logits (B, C); ``edge_weight`` (E,) scales each edge's message (None: every edge 1)."""
        return self.read_out(pool_nodes(self.norm(self.node_states(graph, edge_weight)), graph, self.cfg.pool))

    @torch.no_grad()
    def run(self, batch: GraphBatch, gates: Gates | None = None, capture: bool = False) -> RunOutput:
        """Class logits (B, C) with block gates; pooled graph states (L + 1, B, D) if ``capture``."""
        batch = batch.to(self.device)
        pooled: list[Tensor] | None = [] if capture else None
        with gated(self.blocks, gates):
            h = self.node_states(batch, pooled=pooled)
            logits = self.read_out(pool_nodes(self.norm(h), batch, self.cfg.pool))
        return RunOutput(logits, torch.stack(pooled) if pooled is not None else None)

    def block_parameter_count(self, index: int) -> int:
        return sum(p.numel() for p in self.blocks[index].parameters())

    def slice_blocks(self, removed: list[int]) -> "GraphNet":
        """A new model physically without the ``removed`` blocks (the kept blocks' weights shared)."""
        keep = [i for i in range(self.n_blocks) if i not in set(removed)]
        clone = GraphNet(dataclasses.replace(self.cfg, n_layer=max(1, len(keep))))
        clone.load_state_dict(self.state_dict(), strict=False)
        clone.blocks = nn.ModuleList([self.blocks[i] for i in keep])
        return clone.to(self.device).eval()


def save_gnn(model: GraphNet, folder: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``model.json`` (format, the :class:`GNNConfig` as ``model``, ``info`` and
    the weights' sha256) atomically into ``folder``."""
    save_checked(model, folder, FORMAT, info)


def load_gnn(folder: str | Path, device: str | torch.device = "cpu") -> GraphNet:
    """A :class:`GraphNet` saved by :func:`save_gnn` (safetensors only, sha256 checked)."""
    return load_checked(folder, FORMAT, GNNConfig, GraphNet, device)


__all__ = ["GNNConfig", "GINBlock", "GraphNet", "pool_nodes", "save_gnn", "load_gnn"]
