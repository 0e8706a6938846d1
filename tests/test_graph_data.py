"""Tests for tapioca.tasks.graph_data: the GOOD-Motif-style graph OOD testbed."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest
import torch

from tapioca.errors import ConfigError, DataError
from tapioca.tasks.graph_data import (
    BASES,
    MOTIF_EDGES,
    MOTIFS,
    ROLES,
    GraphBatch,
    GraphMotifTask,
    GraphSamplerParams,
    GraphTaskConfig,
    base_edges,
    graph_distributions,
    graph_shift_params,
    sample_graphs,
)
from tapioca.tasks.polyreg import split_seed

N = 300
MOTIF_SIZES = {"house": (5, 6), "cycle": (5, 5), "crane": (5, 7)}  # (nodes, undirected edges)


@pytest.fixture(scope="module")
def task() -> GraphMotifTask:
    return GraphMotifTask(GraphTaskConfig())


@pytest.fixture(scope="module")
def batch(task: GraphMotifTask) -> GraphBatch:
    return task.data("id", "train", 0, N)


def graph_edges(batch: GraphBatch, g: int) -> tuple[int, list[tuple[int, int]], list[bool]]:
    """Node count, local directed edges and motif flags of graph ``g``."""
    n0, n1 = int(batch.node_ptr[g]), int(batch.node_ptr[g + 1])
    e0, e1 = int(batch.edge_ptr[g]), int(batch.edge_ptr[g + 1])
    edges = [(u - n0, v - n0) for u, v in batch.edge_index[:, e0:e1].t().tolist()]
    return n1 - n0, edges, batch.motif_edges[e0:e1].tolist()


def degrees(edges: list[tuple[int, int]]) -> list[int]:
    """Sorted degree sequence of an undirected edge list (one direction per edge)."""
    return sorted(Counter(v for e in edges for v in e).values())


def connected(n: int, edges: list[tuple[int, int]]) -> bool:
    adj: dict[int, list[int]] = {v: [] for v in range(n)}
    for u, v in edges:
        adj[u].append(v)
    seen, queue = {0}, deque([0])
    while queue:
        for w in adj[queue.popleft()]:
            if w not in seen:
                seen.add(w)
                queue.append(w)
    return len(seen) == n


def signature(batch: GraphBatch, g: int) -> tuple:
    _, edges, _ = graph_edges(batch, g)
    return tuple(sorted(edges)), int(batch.y[g])


# ---------------------------------------------------------------------------------------------------------
# Motifs and bases


@pytest.mark.parametrize("name", MOTIFS)
def test_motif_sizes(name: str) -> None:
    edges = MOTIF_EDGES[name]
    assert (len({v for e in edges for v in e}), len(edges)) == MOTIF_SIZES[name]
    assert len({frozenset(e) for e in edges}) == len(edges) and all(u != v for u, v in edges)
    assert connected(5, [*edges, *[(v, u) for u, v in edges]])


@pytest.mark.parametrize("kind, size, nodes, n_edges", [
    ("path", 9, 9, 8), ("star", 9, 9, 8), ("wheel", 9, 9, 16), ("tree", 9, 9, 8), ("ladder", 9, 8, 10),
])
def test_base_sizes(kind: str, size: int, nodes: int, n_edges: int) -> None:
    n, edges = base_edges(kind, size, random.Random(0))
    assert (n, len(edges)) == (nodes, n_edges)
    assert len({frozenset(e) for e in edges}) == n_edges
    assert connected(n, [*edges, *[(v, u) for u, v in edges]])


# ---------------------------------------------------------------------------------------------------------
# Batches


def test_batch_layout(batch: GraphBatch) -> None:
    n_nodes, n_edges = batch.x.shape[0], batch.edge_index.shape[1]
    assert len(batch) == N and batch.x.shape == (n_nodes, 1) and batch.x.dtype == torch.float32
    assert bool((batch.x == 1).all())
    assert batch.edge_index.dtype == batch.node_ptr.dtype == batch.edge_ptr.dtype == batch.y.dtype == torch.long
    assert batch.motif_edges.shape == (n_edges,) and batch.motif_edges.dtype == torch.bool
    assert batch.node_ptr.shape == batch.edge_ptr.shape == (N + 1,)
    assert int(batch.node_ptr[0]) == int(batch.edge_ptr[0]) == 0
    assert (int(batch.node_ptr[-1]), int(batch.edge_ptr[-1])) == (n_nodes, n_edges)
    assert bool((batch.node_ptr.diff() > 0).all()) and bool((batch.edge_ptr.diff() > 0).all())
    assert batch.graph_index.shape == (n_nodes,) and batch.edge_graph.shape == (n_edges,)
    # edges stay within their graph
    assert torch.equal(batch.graph_index[batch.edge_index[0]], batch.edge_graph)
    assert torch.equal(batch.graph_index[batch.edge_index[1]], batch.edge_graph)


def test_edges_symmetric(batch: GraphBatch) -> None:
    forward, backward = batch.edge_index[:, 0::2], batch.edge_index[:, 1::2]
    assert torch.equal(forward, backward.flip(0))
    assert torch.equal(batch.motif_edges[0::2], batch.motif_edges[1::2])
    assert bool((batch.edge_index[0] != batch.edge_index[1]).all())
    pairs = set(map(tuple, batch.edge_index.t().tolist()))
    assert len(pairs) == batch.edge_index.shape[1]  # no duplicate edges
    assert all((v, u) in pairs for u, v in pairs)


def test_labels(batch: GraphBatch, task: GraphMotifTask) -> None:
    assert task.n_classes == 3
    assert set(batch.y.tolist()) == {0, 1, 2}
    assert set(batch.base.tolist()) <= {BASES.index(b) for b in GraphSamplerParams().bases}


def test_every_graph_has_its_motif(batch: GraphBatch) -> None:
    for g in range(len(batch)):
        n, edges, flags = graph_edges(batch, g)
        motif = MOTIFS[int(batch.y[g])]
        inside = [e for e, f in zip(edges, flags) if f]
        assert len(inside) == 2 * len(MOTIF_EDGES[motif])
        assert len({v for e in inside for v in e}) == 5
        assert degrees([(u, v) for u, v in inside if u < v]) == degrees(list(MOTIF_EDGES[motif]))
        assert connected(n, edges)


def test_motif_nodes_are_shuffled(batch: GraphBatch) -> None:
    last_five = 0
    for g in range(50):
        n, edges, flags = graph_edges(batch, g)
        last_five += {v for e, f in zip(edges, flags) if f for v in e} == set(range(n - 5, n))
    assert last_five < 5


# ---------------------------------------------------------------------------------------------------------
# Shifts


def test_distributions(task: GraphMotifTask) -> None:
    assert task.distributions == graph_distributions(task.cfg) == ["id", "basis", "size"]
    assert graph_shift_params(task.cfg, "id") == task.cfg.sampler
    assert graph_shift_params(task.cfg, "basis").bases == ("star", "path")
    assert graph_shift_params(task.cfg, "size").base_size == (40, 70)


def test_basis_shift(task: GraphMotifTask) -> None:
    shifted = task.data("basis", "heldout", 0, N)
    assert set(shifted.base.tolist()) == {BASES.index("star"), BASES.index("path")}
    sizes = shifted.node_ptr.diff()
    assert int(sizes.min()) >= 8 + 5 and int(sizes.max()) <= 16 + 5


def test_size_shift(task: GraphMotifTask, batch: GraphBatch) -> None:
    shifted = task.data("size", "heldout", 0, N)
    sizes, id_sizes = shifted.node_ptr.diff(), batch.node_ptr.diff()
    assert int(sizes.min()) >= 40 + 5 and int(sizes.max()) <= 70 + 5  # a ladder rounds down to an even size
    assert int(id_sizes.min()) >= 8 + 5 and int(id_sizes.max()) <= 16 + 5


def test_combined_overrides() -> None:
    cfg = GraphTaskConfig(shifts={"both": {"bases": ["path"], "base_size": [40, 70]}})
    params = graph_shift_params(cfg, "both")
    assert params.bases == ("path",) and params.base_size == (40, 70)
    shifted = GraphMotifTask(cfg).data("both", "select", 1, 50)
    assert set(shifted.base.tolist()) == {BASES.index("path")}
    assert int(shifted.node_ptr.diff().min()) >= 45


def test_correlation() -> None:
    params = GraphSamplerParams(correlation=0.9)
    data = GraphMotifTask(GraphTaskConfig(sampler=params)).data("id", "train", 0, 2000)
    expected = torch.tensor([BASES.index(params.bases[k % 3]) for k in data.y.tolist()])
    rate = float((data.base == expected).float().mean())
    assert abs(rate - (0.9 + 0.1 / 3)) < 0.03
    uncorrelated = GraphMotifTask(GraphTaskConfig()).data("id", "train", 0, 2000)
    expected = torch.tensor([BASES.index(params.bases[k % 3]) for k in uncorrelated.y.tolist()])
    assert abs(float((uncorrelated.base == expected).float().mean()) - 1 / 3) < 0.05


# ---------------------------------------------------------------------------------------------------------
# Determinism and splits


def test_deterministic(task: GraphMotifTask) -> None:
    a = task.data("basis", "select", 3, 40)
    assert GraphMotifTask(GraphTaskConfig()).data("basis", "select", 3, 40) is a  # memoised
    fresh = sample_graphs(task.params("basis"), 40, random.Random(split_seed(3, "basis", "select")))
    assert_same(fresh, a)  # regenerated without the cache


def test_roles_seeds_and_dists_differ(task: GraphMotifTask) -> None:
    batches = [task.data("id", role, 0, 20) for role in ROLES]
    batches += [task.data("id", "train", 1, 20), task.data("basis", "train", 0, 20)]
    firsts = {signature(b, 0) for b in batches}
    assert len(firsts) == len(batches)
    for i, a in enumerate(batches):
        for b in batches[i + 1:]:
            assert a.edge_index.shape != b.edge_index.shape or not torch.equal(a.edge_index, b.edge_index)


# ---------------------------------------------------------------------------------------------------------
# Batch operations


def assert_same(a: GraphBatch, b: GraphBatch) -> None:
    for name in ("x", "edge_index", "node_ptr", "edge_ptr", "y", "motif_edges", "base"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_slice_concat_round_trip(batch: GraphBatch) -> None:
    parts = [batch.slice(0, 7), batch.slice(7, 100), batch.slice(100, 10_000)]
    assert [len(p) for p in parts] == [7, 93, N - 100]
    assert_same(GraphBatch.concat(parts), batch)
    one = batch.slice(5, 6)
    n, edges, flags = graph_edges(batch, 5)
    assert one.x.shape[0] == n and one.edge_index.t().tolist() == [list(e) for e in edges]
    assert one.motif_edges.tolist() == flags and int(one.node_ptr[0]) == 0
    assert len(batch.slice(10, 10)) == 0


def test_with_edges(batch: GraphBatch) -> None:
    keep = ~batch.motif_edges
    pruned = batch.with_edges(keep)
    assert torch.equal(pruned.edge_index, batch.edge_index[:, keep])
    assert not bool(pruned.motif_edges.any()) and torch.equal(pruned.x, batch.x)
    assert torch.equal(pruned.node_ptr, batch.node_ptr)
    counts = torch.tensor([len(MOTIF_EDGES[MOTIFS[k]]) * 2 for k in batch.y.tolist()])
    assert torch.equal(pruned.edge_ptr.diff(), batch.edge_ptr.diff() - counts)
    assert torch.equal(pruned.graph_index[pruned.edge_index[0]], pruned.edge_graph)
    assert_same(batch.with_edges(torch.ones_like(keep)), batch)
    with pytest.raises(DataError, match="keep"):
        batch.with_edges(keep[:-1])


def test_to_cpu(batch: GraphBatch) -> None:
    assert_same(batch.to("cpu"), batch)
    assert batch.to(torch.device("cpu")).edge_index.device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("kwargs, words", [
    ({"bases": ("wheel", "cube")}, ["bases", "'cube'", "wheel"]),
    ({"bases": ()}, ["bases", "non-empty"]),
    ({"bases": "path"}, ["bases", "'path'"]),
    ({"motifs": ("house", "house")}, ["motifs", "distinct"]),
    ({"motifs": ("square",)}, ["motifs", "'square'", "crane"]),
    ({"base_size": (3, 10)}, ["base_size", "(3, 10)", "lo <= hi"]),
    ({"base_size": (12, 10)}, ["base_size", "(12, 10)"]),
    ({"base_size": (8,)}, ["base_size", "(8,)"]),
    ({"base_size": (8.0, 10)}, ["base_size", "integers"]),
    ({"correlation": 1.0}, ["correlation", "1.0", "[0, 1)"]),
    ({"correlation": -0.1}, ["correlation", "-0.1"]),
])
def test_bad_sampler(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        GraphSamplerParams(**kwargs)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_lists_become_tuples() -> None:
    params = GraphSamplerParams(bases=["star"], motifs=["cycle", "house"], base_size=[5, 6], correlation=0)
    assert params.bases == ("star",) and params.motifs == ("cycle", "house") and params.base_size == (5, 6)
    assert isinstance(params.correlation, float) and hash(params) == hash(GraphSamplerParams(
        bases=("star",), motifs=("cycle", "house"), base_size=(5, 6)))


@pytest.mark.parametrize("shifts, words", [
    ({"id": {"bases": ["path"]}}, ["'id'", "reserved"]),
    ({"big": {"size": [40, 70]}}, ["shifts.big.size", "bases", "base_size", "correlation"]),
    ({"odd": {"bases": ["path", "cube"]}}, ["shifts.odd.bases", "'cube'", "star"]),
    ({"small": {"base_size": [2, 3]}}, ["shifts.small.base_size", "[2, 3]"]),
    ({"bad": ["bases"]}, ["shifts.bad", "mapping"]),
    ({"labels": {"motifs": ["cycle"]}}, ["shifts.labels.motifs"]),
])
def test_bad_shifts(shifts: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        GraphTaskConfig(shifts=shifts)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_sampler_from_mapping() -> None:
    cfg = GraphTaskConfig(sampler={"bases": ["tree"], "base_size": [6, 6]})
    assert cfg.sampler == GraphSamplerParams(bases=("tree",), base_size=(6, 6))
    assert graph_shift_params(cfg, "size").bases == ("tree",)
    with pytest.raises(ConfigError, match="sampler.colour: unknown sampler parameter"):
        GraphTaskConfig(sampler={"colour": 1})
    with pytest.raises(ConfigError, match="sampler.base_size"):
        GraphTaskConfig(sampler={"base_size": [1, 2]})


def test_default_shifts_not_shared() -> None:
    cfg = GraphTaskConfig()
    cfg.shifts["basis"]["bases"].append("wheel")
    assert GraphTaskConfig().shifts["basis"] == {"bases": ["star", "path"]}


@pytest.mark.parametrize("args, words", [
    (("ood", "train", 0, 10), ["'ood'", "id", "basis", "size"]),
    (("id", "test", 0, 10), ["'test'", "train", "select", "heldout", "reference"]),
    (("id", "train", 0, 0), ["n=0", "train"]),
])
def test_bad_data_args(task: GraphMotifTask, args: tuple, words: list[str]) -> None:
    with pytest.raises(DataError) as err:
        task.data(*args)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    with pytest.raises(ConfigError, match="'ood'"):
        graph_shift_params(task.cfg, "ood")
