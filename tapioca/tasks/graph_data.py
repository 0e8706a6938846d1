"""Graph OOD testbed modelled on GOOD-Motif: each graph is a *base* graph with one attached *motif*.

The label is the motif (label ``k`` is ``motifs[k]``); the base is spurious. A distribution (ID or a named shift)
is a :class:`GraphSamplerParams`, and a shift is a dict of overrides of its fields, as in the polynomial testbed.

Motifs (5 nodes each):

* ``house``: a 4-cycle square 0-1-2-3-0 plus a roof node 4 joined to the adjacent square nodes 0 and 1
  (6 undirected edges);
* ``cycle``: the 5-cycle 0-1-2-3-4-0 (5 edges);
* ``crane``: a 4-clique on 0..3 (6 edges) plus a pendant node 4 joined to node 0 (7 edges).

Bases, for a size ``s`` drawn uniformly from ``base_size``:

* ``path``: ``s`` nodes in a line (``s - 1`` edges);
* ``star``: a hub joined to ``s - 1`` leaves;
* ``wheel``: a hub joined to every node of a rim cycle of ``s - 1`` nodes (``2 (s - 1)`` edges);
* ``tree``: a random tree, node ``i >= 1`` joined to a uniformly drawn earlier node (``s - 1`` edges);
* ``ladder``: ``r = s // 2`` rungs joining two paths of ``r`` nodes (``2 r`` nodes, ``3 r - 2`` edges).

The motif hangs off the base by one extra edge between a random base node and a random motif node; that edge
counts as a base edge. Node ids are shuffled within each graph and every node has the constant feature 1.
Regenerated data follows GOOD-Motif's recipe but is not identical to GOOD's released splits (which are a download
and are not fetched).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tapioca.errors import ConfigError, DataError
from tapioca.tasks.polyreg import split_seed
from tapioca.tasks.roles import split_role

BASES = ("wheel", "tree", "ladder", "star", "path")
MOTIFS = ("house", "cycle", "crane")
ROLES = ("train", "select", "heldout", "reference")
MIN_BASE_SIZE = 4  # the smallest size every base supports (a wheel needs a rim of 3, a ladder 2 rungs)

Edge = tuple[int, int]

MOTIF_EDGES: dict[str, tuple[Edge, ...]] = {
    "house": ((0, 1), (1, 2), (2, 3), (3, 0), (4, 0), (4, 1)),
    "cycle": ((0, 1), (1, 2), (2, 3), (3, 4), (4, 0)),
    "crane": ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (4, 0)),
}
MOTIF_NODES = 5


# ---------------------------------------------------------------------------------------------------------
# Configuration


def _bad(path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")


def _names(path: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A non-empty tuple of distinct names from ``allowed`` (a list is converted)."""
    expected = f"a non-empty list of distinct names from {list(allowed)}"
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise _bad(path, value, expected)
    for name in value:
        if name not in allowed:
            raise ConfigError(f"{path}: unknown name {name!r}; allowed: {list(allowed)}")
    if len(set(value)) != len(value):
        raise _bad(path, value, expected)
    return tuple(value)


def _size_range(path: str, value: Any) -> tuple[int, int]:
    """``(lo, hi)`` integers with ``MIN_BASE_SIZE <= lo <= hi`` (a list is converted)."""
    expected = f"[lo, hi], integers with {MIN_BASE_SIZE} <= lo <= hi"
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise _bad(path, value, expected)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise _bad(path, value, expected)
    lo, hi = value
    if not MIN_BASE_SIZE <= lo <= hi:
        raise _bad(path, value, expected)
    return (lo, hi)


def _probability(path: str, value: Any) -> float:
    """A number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise _bad(path, value, "a number in [0, 1)")
    return float(value)


@dataclass(frozen=True)
class GraphSamplerParams:
    """Parameters of the graph sampler; a shift overrides some of them. Lists are converted to tuples."""

    bases: tuple[str, ...] = ("wheel", "tree", "ladder")  # base types, drawn uniformly unless correlation > 0
    motifs: tuple[str, ...] = MOTIFS  # label k is motifs[k]
    base_size: tuple[int, int] = (8, 16)  # base size s ~ uniform integer in [lo, hi], inclusive
    correlation: float = 0.0  # with this probability the base is bases[label % len(bases)], else uniform

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("bases", _names("bases", self.bases, BASES))
        set_("motifs", _names("motifs", self.motifs, MOTIFS))
        set_("base_size", _size_range("base_size", self.base_size))
        set_("correlation", _probability("correlation", self.correlation))


SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(GraphSamplerParams))

DEFAULT_GRAPH_SHIFTS: dict[str, dict[str, Any]] = {
    "basis": {"bases": ["star", "path"]},
    "size": {"base_size": [40, 70]},
}


@dataclass(frozen=True)
class GraphTaskConfig:
    """The graph task: ID sampler and named OOD shifts (each a dict of sampler-parameter overrides)."""

    sampler: GraphSamplerParams = field(default_factory=GraphSamplerParams)
    shifts: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_GRAPH_SHIFTS))

    def __post_init__(self) -> None:
        if isinstance(self.sampler, Mapping):
            object.__setattr__(self, "sampler", _sampler_from(dict(self.sampler), "sampler"))
        if not isinstance(self.sampler, GraphSamplerParams):
            raise _bad("sampler", self.sampler, "GraphSamplerParams or a mapping of its fields")
        if not isinstance(self.shifts, Mapping):
            raise _bad("shifts", self.shifts, "a mapping of shift name to parameter overrides")
        for name, override in self.shifts.items():
            _check_shift(self, name, override)


def _sampler_from(values: dict[str, Any], path: str) -> GraphSamplerParams:
    """Build sampler params from ``values``, errors naming ``path.field``."""
    for key in values:
        if key not in SAMPLER_FIELDS:
            raise ConfigError(f"{path}.{key}: unknown sampler parameter {key!r}; allowed: {list(SAMPLER_FIELDS)}")
    try:
        return GraphSamplerParams(**values)
    except ConfigError as err:
        raise ConfigError(f"{path}.{err}") from None


def _check_shift(task_cfg: GraphTaskConfig, name: Any, override: Any) -> None:
    if name == "id":
        raise ConfigError("shifts: 'id' is reserved for the training distribution; rename the shift")
    if not isinstance(name, str) or not name:
        raise _bad("shifts", name, "shift names that are non-empty strings")
    if not isinstance(override, Mapping):
        raise _bad(f"shifts.{name}", override, "a mapping of sampler parameters, e.g. {bases: [star, path]}")
    if graph_shift_params(task_cfg, name).motifs != task_cfg.sampler.motifs:
        raise ConfigError(f"shifts.{name}.motifs: a shift may not change the motifs (they define the labels); "
                          f"allowed keys: {[f for f in SAMPLER_FIELDS if f != 'motifs']}")


def graph_shift_params(task_cfg: GraphTaskConfig, name: str) -> GraphSamplerParams:
    """Sampler parameters of distribution ``name`` ("id" or a shift name)."""
    if name == "id":
        return task_cfg.sampler
    if name not in task_cfg.shifts:
        raise ConfigError(f"unknown distribution {name!r}; allowed: {graph_distributions(task_cfg)}")
    merged = {**{f: getattr(task_cfg.sampler, f) for f in SAMPLER_FIELDS}, **task_cfg.shifts[name]}
    return _sampler_from(merged, f"shifts.{name}")


def graph_distributions(task_cfg: GraphTaskConfig) -> list[str]:
    """All distribution names: "id" first, then the shifts in config order."""
    return ["id", *task_cfg.shifts]


# ---------------------------------------------------------------------------------------------------------
# The batch


def _ptr(counts: Tensor) -> Tensor:
    """(B,) counts -> (B + 1,) offsets starting at 0."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


@dataclass(frozen=True)
class GraphBatch:
    """B graphs packed into one disjoint union; each graph's nodes and edges are contiguous, graphs in order.

    In generated batches each undirected edge is the column pair (2k, 2k + 1), (u, v) then (v, u)."""

    x: Tensor  # (N, 1) float32 node features
    edge_index: Tensor  # (2, E) long, directed edges (each undirected edge twice), global node indices
    node_ptr: Tensor  # (B + 1,) long: graph g's nodes are node_ptr[g]:node_ptr[g + 1]
    edge_ptr: Tensor  # (B + 1,) long: graph g's edges are columns edge_ptr[g]:edge_ptr[g + 1]
    y: Tensor  # (B,) long motif label
    motif_edges: Tensor  # (E,) bool: the edge lies inside the motif (ground truth)
    base: Tensor  # (B,) long index into BASES of each graph's base type

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def graph_index(self) -> Tensor:
        """(N,) long: the graph each node belongs to."""
        return torch.repeat_interleave(torch.arange(len(self), device=self.y.device), self.node_ptr.diff())

    @property
    def edge_graph(self) -> Tensor:
        """(E,) long: the graph each edge belongs to."""
        return torch.repeat_interleave(torch.arange(len(self), device=self.y.device), self.edge_ptr.diff())

    def slice(self, start: int, stop: int) -> GraphBatch:
        """Graphs ``start..stop-1`` (clamped like Python slicing), node and edge indices re-based to 0."""
        start, stop, _ = slice(start, stop).indices(len(self))
        stop = max(start, stop)
        n0, n1 = int(self.node_ptr[start]), int(self.node_ptr[stop])
        e0, e1 = int(self.edge_ptr[start]), int(self.edge_ptr[stop])
        return GraphBatch(
            x=self.x[n0:n1],
            edge_index=self.edge_index[:, e0:e1] - n0,
            node_ptr=self.node_ptr[start:stop + 1] - n0,
            edge_ptr=self.edge_ptr[start:stop + 1] - e0,
            y=self.y[start:stop],
            motif_edges=self.motif_edges[e0:e1],
            base=self.base[start:stop],
        )

    def to(self, device: torch.device | str) -> GraphBatch:
        return GraphBatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def with_edges(self, keep: Tensor) -> GraphBatch:
        """The same graphs and nodes with only the edges where ``keep`` (E,) bool is true."""
        if keep.dtype != torch.bool or keep.shape != self.motif_edges.shape:
            raise DataError(f"with_edges: keep must be a bool tensor of shape {tuple(self.motif_edges.shape)}, "
                            f"got {keep.dtype} {tuple(keep.shape)}")
        keep = keep.to(self.edge_index.device)
        counts = torch.zeros(len(self), dtype=torch.long, device=keep.device)
        counts.index_add_(0, self.edge_graph, keep.long())
        return dataclasses.replace(self, edge_index=self.edge_index[:, keep], edge_ptr=_ptr(counts),
                                   motif_edges=self.motif_edges[keep])

    @staticmethod
    def concat(batches: list[GraphBatch]) -> GraphBatch:
        """One batch holding the graphs of ``batches`` in order, node indices offset."""
        if not batches:
            raise DataError("GraphBatch.concat: no batches given; pass at least one")
        offsets = _ptr(torch.tensor([b.x.shape[0] for b in batches], dtype=torch.long)).tolist()

        def cat(name: str) -> Tensor:
            return torch.cat([getattr(b, name) for b in batches])

        return GraphBatch(
            x=cat("x"),
            edge_index=torch.cat([b.edge_index + off for b, off in zip(batches, offsets)], 1),
            node_ptr=_ptr(torch.cat([b.node_ptr.diff() for b in batches])),
            edge_ptr=_ptr(torch.cat([b.edge_ptr.diff() for b in batches])),
            y=cat("y"),
            motif_edges=cat("motif_edges"),
            base=cat("base"),
        )


# ---------------------------------------------------------------------------------------------------------
# Sampling


def base_edges(kind: str, size: int, rng: random.Random) -> tuple[int, list[Edge]]:
    """Nodes and undirected edges of base ``kind`` of size ``size`` (nodes 0..n-1); see the module docstring."""
    if kind == "path":
        return size, [(i, i + 1) for i in range(size - 1)]
    if kind == "star":
        return size, [(0, i) for i in range(1, size)]
    if kind == "wheel":
        rim = list(range(1, size))
        return size, [(0, i) for i in rim] + [(i, i + 1) for i in rim[:-1]] + [(rim[-1], rim[0])]
    if kind == "tree":
        return size, [(rng.randrange(i), i) for i in range(1, size)]
    if kind == "ladder":
        r = size // 2
        rails = [(i, i + 1) for i in range(r - 1)] + [(r + i, r + i + 1) for i in range(r - 1)]
        return 2 * r, rails + [(i, r + i) for i in range(r)]
    raise ConfigError(f"unknown base {kind!r}; allowed: {list(BASES)}")


def sample_graph(params: GraphSamplerParams, label: int, rng: random.Random) -> tuple[int, int, list[Edge]]:
    """One graph of class ``label`` before shuffling: (base index into BASES, node count, undirected edges).

    The base's nodes come first, then the motif's 5; the edges are the base's, the link, then the motif's
    (the last ``len(MOTIF_EDGES[motif])``)."""
    bases = params.bases
    if params.correlation > 0 and rng.random() < params.correlation:
        kind = bases[label % len(bases)]
    else:
        kind = bases[rng.randrange(len(bases))]
    n_base, edges = base_edges(kind, rng.randint(*params.base_size), rng)
    edges.append((rng.randrange(n_base), n_base + rng.randrange(MOTIF_NODES)))
    edges += [(n_base + u, n_base + v) for u, v in MOTIF_EDGES[params.motifs[label]]]
    return BASES.index(kind), n_base + MOTIF_NODES, edges


def _shuffle_within(counts: Tensor, gen: torch.Generator) -> Tensor:
    """A permutation (sum(counts),) long that shuffles items only within each consecutive group of ``counts``."""
    group = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.float64), counts)
    keys = group + torch.rand(group.shape, generator=gen, dtype=torch.float64)
    return torch.sort(keys, stable=True).indices


def sample_graphs(params: GraphSamplerParams, n: int, rng: random.Random) -> GraphBatch:
    """``n`` graphs with labels drawn uniformly from ``range(len(params.motifs))``, node ids and edge order
    shuffled within each graph (see :class:`GraphBatch` for the layout)."""
    src: list[int] = []
    dst: list[int] = []
    flags: list[bool] = []
    labels, bases, node_counts, edge_counts = [], [], [], []
    offset = 0
    for _ in range(n):
        label = rng.randrange(len(params.motifs))
        base, n_nodes, edges = sample_graph(params, label, rng)
        src += [u + offset for u, _ in edges]
        dst += [v + offset for _, v in edges]
        n_motif = len(MOTIF_EDGES[params.motifs[label]])
        flags += [False] * (len(edges) - n_motif) + [True] * n_motif
        labels.append(label)
        bases.append(base)
        node_counts.append(n_nodes)
        edge_counts.append(len(edges))
        offset += n_nodes
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    nodes, undirected = torch.tensor(node_counts), torch.tensor(edge_counts)
    relabel = torch.empty(offset, dtype=torch.long)
    relabel[_shuffle_within(nodes, gen)] = torch.arange(offset)
    order = _shuffle_within(undirected, gen)
    pairs = relabel[torch.tensor([src, dst], dtype=torch.long)[:, order]]  # (2, M) undirected edges
    return GraphBatch(
        x=torch.ones((offset, 1), dtype=torch.float32),
        edge_index=torch.stack([pairs, pairs.flip(0)], 2).reshape(2, -1),  # (u, v) then (v, u)
        node_ptr=_ptr(nodes),
        edge_ptr=_ptr(2 * undirected),
        y=torch.tensor(labels, dtype=torch.long),
        motif_edges=torch.tensor(flags, dtype=torch.bool)[order].repeat_interleave(2),
        base=torch.tensor(bases, dtype=torch.long),
    )


@functools.lru_cache(maxsize=32)
def _split(params: GraphSamplerParams, dist: str, role: str, seed: int, n: int) -> GraphBatch:
    return sample_graphs(params, n, random.Random(split_seed(seed, dist, role)))


class GraphMotifTask:
    """ID sampler plus named shifts, with fixed data splits per (distribution, role, seed)."""

    def __init__(self, cfg: GraphTaskConfig) -> None:
        self.cfg = cfg

    @property
    def distributions(self) -> list[str]:
        return graph_distributions(self.cfg)

    @property
    def n_classes(self) -> int:
        return len(self.cfg.sampler.motifs)

    def params(self, dist: str) -> GraphSamplerParams:
        return graph_shift_params(self.cfg, dist)

    def data(self, dist: str, role: str, seed: int, n: int) -> GraphBatch:
        """The ``n`` graphs of one split; the same arguments always give the same graphs."""
        if dist not in self.distributions:
            raise DataError(f"unknown distribution {dist!r}; allowed: {self.distributions}")
        if split_role(role)[0] not in ROLES:
            raise DataError(f"unknown split role {role!r}; allowed: {list(ROLES)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"the {role} split of {dist!r} is empty (n={n!r}); ask for at least 1 graph")
        return _split(self.params(dist), dist, role, int(seed), n)
