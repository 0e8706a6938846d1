"""PrunE (Yao et al., "Pruning Spurious Subgraphs for Graph Out-of-Distribution Generalization", NeurIPS 2025).

An edge selector ``t`` (a small GNN) gives every edge two logits (drop, keep); a hard 0/1 mask is sampled with
the straight-through Gumbel-softmax and scales each edge's message in the classifier. Both are trained jointly on

    L = CE(f(G masked), y) + lambda_1 L_e + lambda_2 L_s

* graph-size constraint ``L_e = E_G[(sum_e A~_e / |E| - eta)^2]`` (A~ the sampled hard mask): keep about ``eta``
  of each graph's edges;
* epsilon-probability alignment ``L_s = E_G[mean_{e in E_s} |p_e - epsilon|]``, ``E_s`` the ``K`` lowest keep
  probabilities of the graph (``K`` a share of its edges): push the likely-spurious edges toward probability
  ``epsilon``;

after an ERM warm-up of the classifier (the same Adam optimiser runs through both phases). Choices of ours: one
Gumbel draw per undirected edge (both directions share it; the logits are symmetric anyway), and at evaluation an
edge is kept when its keep probability is above 0.5 (deterministic; the authors' code samples a mask instead).

Everything per graph is vectorised over the packed batch (segment sums with ``index_add_``, within-graph ranks from
two stable sorts): on 64 graphs these cost about 2 ms on one CPU thread, the GNN passes the rest. Training
checkpoints every ``train.checkpoint_every`` steps and resumes exactly (minibatches and Gumbel noise depend only on
(seed, step)).
"""

from __future__ import annotations

import copy
import hashlib
import math
import pickle
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from tapioca.config import EdgePruningConfig, GNNConfig, GraphTrainConfig, from_dict, to_dict
from tapioca.errors import CheckpointError, ConfigError, DataError
from tapioca.io import read_json, write_json
from tapioca.models.gnn import GINBlock, GraphNet
from tapioca.models.icl import sha256_of
from tapioca.models.training import _INIT_LOCK
from tapioca.tasks.graph_data import GraphBatch
from tapioca.tasks.polyreg import split_seed

FORMAT = "tapioca-edge-pruner"
STATE_FILE = "prune_state.json"
WEIGHTS_FILE = "pruner.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
KEEP_THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------------------
# Per-graph helpers on packed batches


def _ptr(counts: Tensor) -> Tensor:
    """(B,) counts -> (B + 1,) offsets starting at 0."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _segment_sum(values: Tensor, segment: Tensor, n: int) -> Tensor:
    """Sum of ``values`` (E,) per segment id ``segment`` (E,) -> (n,)."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, segment, values)


def _ranks_within(values: Tensor, segment: Tensor, n: int) -> Tensor:
    """Rank (0 = smallest, ties by position) of each value (E,) among those of its segment -> (E,) long."""
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(segment[order], stable=True)]
    starts = _ptr(torch.bincount(segment, minlength=n))
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device) - starts[segment[order]]
    return ranks


def _edge_counts(graph: GraphBatch) -> Tensor:
    """(B,) long: directed edges per graph."""
    return graph.edge_ptr.diff()


def reverse_edges(graph: GraphBatch) -> Tensor:
    """(E,) long: the column of each edge's reverse (v, u); an edge without a reverse maps to itself."""
    src, dst = graph.edge_index[0], graph.edge_index[1]
    own = torch.arange(src.numel(), device=src.device)
    if src.numel() == 0:
        return own
    n = max(int(graph.x.shape[0]), 1)
    key, wanted = src * n + dst, dst * n + src
    order = torch.argsort(key)
    found = order[torch.searchsorted(key[order], wanted).clamp_max(key.numel() - 1)]
    return torch.where(key[found] == wanted, found, own)


def canonical_edges(graph: GraphBatch) -> Tensor:
    """(E,) long: one shared column per undirected edge (the smaller of the edge's and its reverse's)."""
    return torch.minimum(torch.arange(graph.edge_index.shape[1], device=graph.edge_index.device),
                         reverse_edges(graph))


def _positions(old_starts: Tensor, new_ptr: Tensor, counts: Tensor) -> Tensor:
    """Old index of every new position when segments (R,) of ``counts`` starting at ``old_starts`` are packed."""
    total = int(new_ptr[-1])
    return torch.arange(total, device=new_ptr.device) + torch.repeat_interleave(old_starts - new_ptr[:-1], counts)


def take_graphs(graphs: GraphBatch, rows: Tensor) -> GraphBatch:
    """Graphs ``rows`` (R,) long of ``graphs`` (repeats allowed) as one batch, without a loop over graphs."""
    rows = rows.to(graphs.node_ptr.device)
    n_nodes, n_edges = graphs.node_ptr.diff()[rows], graphs.edge_ptr.diff()[rows]
    node_ptr, edge_ptr = _ptr(n_nodes), _ptr(n_edges)
    old_nodes = _positions(graphs.node_ptr[rows], node_ptr, n_nodes)
    old_edges = _positions(graphs.edge_ptr[rows], edge_ptr, n_edges)
    shift = torch.repeat_interleave(node_ptr[:-1] - graphs.node_ptr[rows], n_edges)
    return GraphBatch(x=graphs.x[old_nodes], edge_index=graphs.edge_index[:, old_edges] + shift,
                      node_ptr=node_ptr, edge_ptr=edge_ptr, y=graphs.y[rows],
                      motif_edges=graphs.motif_edges[old_edges], base=graphs.base[rows])


# ---------------------------------------------------------------------------------------------------------
# The edge selector and the two regularisers


class EdgeSelector(nn.Module):
    """Small GNN over node embeddings -> two logits (drop, keep) per edge, (E, 2).

    read-in -> ``n_layer`` GIN blocks -> LayerNorm -> MLP on ``[h_u + h_v, h_u * h_v]``: the edge features are
    symmetric in (u, v), so both directions of an undirected edge get bitwise identical logits."""

    def __init__(self, in_dim: int, width: int, n_layer: int) -> None:
        super().__init__()
        self.dims = {"in_dim": in_dim, "width": width, "n_layer": n_layer}
        self.read_in = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList([GINBlock(width, 2) for _ in range(n_layer)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 2))

    def forward(self, graph: GraphBatch) -> Tensor:
        """Edge logits (E, 2): column 0 drop, column 1 keep."""
        h = self.read_in(graph.x)
        for block in self.blocks:
            h = block(h, graph)
        h = self.norm(h)
        u, v = h[graph.edge_index[0]], h[graph.edge_index[1]]
        return self.head(torch.cat([u + v, u * v], dim=1))

    def keep_probability(self, graph: GraphBatch) -> Tensor:
        """(E,) softmax probability of "keep"."""
        return torch.softmax(self(graph), dim=1)[:, 1]


def hard_gumbel_mask(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """Straight-through Gumbel-softmax over (drop, keep) logits (E, 2) -> (E,) mask: exactly 0/1 forward,
    the gradient of the soft keep probability ``softmax((logits + g) / tau)[:, 1]`` backward. The noise is drawn
    from ``generator`` (on its device, then moved) so it is reproducible."""
    device = generator.device if generator is not None else logits.device
    uniform = torch.rand(logits.shape, generator=generator, device=device).to(logits.device, logits.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
    soft = torch.softmax((logits + gumbel) / tau, dim=1)[:, 1]
    hard = (soft > 0.5).to(soft.dtype)  # argmax of two classes
    return hard + (soft - soft.detach())  # exactly 0/1 forward: soft - soft.detach() is exactly 0


def size_constraint(keep_prob: Tensor, graph: GraphBatch, eta: float) -> Tensor:
    """``L_e``: mean over graphs (with edges) of ``(sum of kept edge weights / |E_g| - eta)^2``.

    keep_prob (E,): edge weights in [0, 1], the sampled hard mask in training (the paper's A~) or probabilities."""
    counts = _edge_counts(graph)
    has = counts > 0
    if not bool(has.any()):
        return keep_prob.sum() * 0.0
    kept = _segment_sum(keep_prob, graph.edge_graph, len(graph))
    ratio = kept[has] / counts[has].to(kept.dtype)
    return (ratio - eta).square().mean()


def alignment_counts(graph: GraphBatch, fraction: float) -> Tensor:
    """(B,) long: ``K_g = max(1, floor(fraction * |E_g|))`` edges aligned per graph (0 for a graph without edges)."""
    counts = _edge_counts(graph)
    k = torch.floor(counts.to(torch.float64) * fraction + 1e-6).long().clamp_min(1)
    return torch.where(counts > 0, k, torch.zeros_like(k))


def lowest_edges(keep_prob: Tensor, graph: GraphBatch, fraction: float) -> Tensor:
    """(E,) bool: each graph's ``K_g`` lowest-probability edges (ties by column order)."""
    ranks = _ranks_within(keep_prob.detach(), graph.edge_graph, len(graph))
    return ranks < alignment_counts(graph, fraction)[graph.edge_graph]


def probability_alignment(keep_prob: Tensor, graph: GraphBatch, epsilon: float | None, fraction: float) -> Tensor:
    """``L_s``: mean over graphs (with edges) of ``mean |p_e - epsilon|`` over the graph's ``K_g`` lowest keep
    probabilities (see :func:`alignment_counts`). keep_prob (E,); ``epsilon`` None: ``1 / |E_g|`` per graph."""
    counts = _edge_counts(graph)
    has = counts > 0
    if not bool(has.any()):
        return keep_prob.sum() * 0.0
    chosen = lowest_edges(keep_prob, graph, fraction)
    per_graph = graph.edge_graph
    target = 1.0 / counts.clamp_min(1).to(keep_prob.dtype)[per_graph] if epsilon is None else epsilon
    gap = (keep_prob - target).abs() * chosen.to(keep_prob.dtype)
    mean = _segment_sum(gap, per_graph, len(graph))[has] / alignment_counts(graph, fraction)[has].to(gap.dtype)
    return mean.mean()


# ---------------------------------------------------------------------------------------------------------
# The trained pair


@dataclass
class EdgePruner:
    """A PrunE classifier and its edge selector."""

    classifier: GraphNet
    selector: EdgeSelector
    budget: float | None = None  # None: keep edges with p > 0.5; else each graph's top ``budget`` share by p

    @property
    def device(self) -> torch.device:
        return self.classifier.device

    @torch.no_grad()
    def keep_mask(self, graph: GraphBatch, chunk: int = 1024) -> Tensor:
        """(E,) bool on ``graph``'s device, deterministic and symmetric, in chunks of graphs: keep probability
        > 0.5, or with :attr:`budget` the top share of each graph's edges (:func:`top_share_mask`)."""
        parts = []
        for i in range(0, len(graph), chunk):
            sub = graph.slice(i, i + chunk).to(self.device)
            p = self.selector.keep_probability(sub)
            parts.append(p > KEEP_THRESHOLD if self.budget is None else top_share_mask(sub, p, self.budget))
        mask = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
        return mask.to(graph.edge_index.device)

    @torch.no_grad()
    def logits(self, graph: GraphBatch, chunk: int = 1024) -> Tensor:
        """Class logits (B, C) of the classifier on ``graph.with_edges(keep_mask)``, on ``graph``'s device."""
        parts = []
        for i in range(0, len(graph), chunk):
            sub = graph.slice(i, i + chunk).to(self.device)
            parts.append(self.classifier(sub.with_edges(self.keep_mask(sub))))
        out = torch.cat(parts) if parts else torch.zeros(0, self.classifier.cfg.n_classes)
        return out.to(graph.edge_index.device)

    def eval(self) -> EdgePruner:
        self.classifier.eval()
        self.selector.eval()
        return self


# ---------------------------------------------------------------------------------------------------------
# Training


def _digest_tensors(tensors: dict[str, Tensor]) -> str:
    """Hex SHA-256 of named tensors (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _graphs_digest(graphs: GraphBatch) -> str:
    return _digest_tensors({"x": graphs.x, "edge_index": graphs.edge_index, "node_ptr": graphs.node_ptr,
                            "edge_ptr": graphs.edge_ptr, "y": graphs.y})


def fingerprint(cfg: EdgePruningConfig, train: GraphTrainConfig, model_cfg: GNNConfig, graphs: GraphBatch,
                seed: int, init: GraphNet | None) -> dict[str, Any]:
    """What must match for a PrunE checkpoint to be resumed (everything that changes the trained weights)."""
    used = {k: getattr(train, k) for k in ("batch_size", "weight_decay", "grad_clip")}
    edges = {k: v for k, v in to_dict(cfg).items() if k != "readout"}  # the readout does not change the weights
    return {"kind": "prune", "edges": edges, "train": used, "model": to_dict(model_cfg), "seed": seed,
            "init": None if init is None else _digest_tensors(init.state_dict()), "data": _graphs_digest(graphs)}


def _build(cfg: EdgePruningConfig, model_cfg: GNNConfig, seed: int, init: GraphNet | None,
           device: torch.device) -> EdgePruner:
    """Fresh (seeded) or copied classifier plus a seeded selector, on ``device``."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = GraphNet(model_cfg) if init is None else copy.deepcopy(init)
        torch.manual_seed(split_seed(seed, "edge-selector", "init"))
        selector = EdgeSelector(model_cfg.in_dim, model_cfg.width, cfg.selector_layers)
    return EdgePruner(classifier.to(device), selector.to(device))


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(split_seed(seed, f"edge-step-{step}", "train"))


def _train_step(pruner: EdgePruner, opt: torch.optim.Optimizer, cfg: EdgePruningConfig, train: GraphTrainConfig,
                graphs: GraphBatch, seed: int, step: int, erm: bool) -> dict[str, float]:
    """One optimiser step on a minibatch drawn from (seed, step): ERM when ``erm``, else the PrunE objective."""
    gen = _step_generator(seed, step)
    rows = torch.randint(len(graphs), (train.batch_size,), generator=gen)
    batch = take_graphs(graphs, rows).to(pruner.device)
    if erm:
        ce = F.cross_entropy(pruner.classifier(batch), batch.y)
        loss, record = ce, {"ce": ce.item(), "size": 0.0, "align": 0.0, "kept": 1.0}
    else:
        logits = pruner.selector(batch)
        mask = hard_gumbel_mask(logits, cfg.tau, gen)[canonical_edges(batch)]  # one draw per undirected edge
        ce = F.cross_entropy(pruner.classifier(batch, edge_weight=mask), batch.y)
        size = size_constraint(mask, batch, cfg.eta)
        align = probability_alignment(torch.softmax(logits, dim=1)[:, 1], batch, cfg.epsilon, cfg.align_fraction)
        loss = ce + cfg.lambda_size * size + cfg.lambda_align * align
        record = {"ce": ce.item(), "size": size.item(), "align": align.item(), "kept": mask.detach().mean().item()}
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [*pruner.classifier.parameters(), *pruner.selector.parameters()]
    torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
    opt.step()
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"PrunE training diverged at step {step} (loss {value}); lower graph.edges.lr")
    return {"step": step, "phase": "erm" if erm else "prune", "loss": value, **record}


def _optimizer(pruner: EdgePruner, cfg: EdgePruningConfig, train: GraphTrainConfig) -> torch.optim.Optimizer:
    params = [*pruner.classifier.parameters(), *pruner.selector.parameters()]
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=train.weight_decay)


def train_edge_pruning(cfg: EdgePruningConfig, train: GraphTrainConfig, model_cfg: GNNConfig, graphs: GraphBatch,
                       seed: int, init: GraphNet | None = None, out: str | Path | None = None,
                       progress: bool = True, device: str | torch.device | None = None,
                       erm_only: bool = False) -> EdgePruner:
    """Train PrunE on ``graphs`` (the ID training set); return the pruner in eval mode.

    ``init``: an ERM-trained classifier to start from (copied, not modified; its training is the warm-up);
    None: ``cfg.warmup_steps`` of ERM from a seeded fresh classifier first. Minibatches of ``train.batch_size``
    graphs are drawn with replacement, and the Gumbel noise too, from (seed, step). ``out``: checkpoints every
    ``train.checkpoint_every`` steps; a run with the same settings resumes there (a finished one loads without
    training), one with other settings raises :class:`CheckpointError`. ``device``: default ``init``'s, else CPU.
    ``erm_only``: the control that trains the classifier by plain ERM through the same steps, optimiser and
    minibatches (no masks, no penalties): what continued training alone does to it."""
    if init is not None and init.cfg != model_cfg:
        raise ConfigError(f"train_edge_pruning: init's model config {init.cfg} differs from model_cfg {model_cfg}")
    if len(graphs) == 0:
        raise DataError("train_edge_pruning: no training graphs given")
    device = torch.device(device if device is not None else (init.device if init is not None else "cpu"))
    warm = 0 if init is not None else cfg.warmup_steps
    total = warm + cfg.steps
    wanted = fingerprint(cfg, train, model_cfg, graphs, seed, init) | ({"objective": "erm"} if erm_only else {})
    pruner = _build(cfg, model_cfg, seed, init, device)
    opt = _optimizer(pruner, cfg, train)
    state: dict[str, Any] = {"step": 0, "history": [], "seconds": 0.0}
    if out is not None and (Path(out) / STATE_FILE).is_file():
        state = _resume(Path(out), wanted, pruner, opt)
    graphs = graphs.to("cpu")
    bar = tqdm(total=total, initial=state["step"], disable=not progress, desc=f"PrunE seed {seed}")
    pruner.classifier.train()
    pruner.selector.train()
    started = time.perf_counter()
    for step in range(state["step"], total):
        record = _train_step(pruner, opt, cfg, train, graphs, seed, step, erm=erm_only or step < warm)
        state["history"].append(record)
        bar.update(1)
        if step % 10 == 0 or step + 1 == total:
            bar.set_postfix(loss=f"{record['loss']:.4f}", kept=f"{record['kept']:.3f}")
        done = step + 1
        if out is not None and (done % train.checkpoint_every == 0 or done == total):
            state.update(step=done, seconds=state["seconds"] + time.perf_counter() - started)
            started = time.perf_counter()
            _save(Path(out), pruner, opt, state, wanted, finished=done == total)
    bar.close()
    return pruner.eval()


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _state_tensors(pruner: EdgePruner) -> dict[str, Tensor]:
    state = {f"classifier.{k}": v for k, v in pruner.classifier.state_dict().items()}
    state |= {f"selector.{k}": v for k, v in pruner.selector.state_dict().items()}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _save(folder: Path, pruner: EdgePruner, opt: torch.optim.Optimizer, state: dict[str, Any],
          wanted: dict[str, Any], finished: bool) -> None:
    """Write weights and optimizer into a new ``checkpoint-<step>/``, then atomically point the state file at it:
    a kill at any moment leaves the previous complete checkpoint in force."""
    checkpoint = folder / f"checkpoint-{state['step']}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    save_file(_state_tensors(pruner), str(checkpoint / WEIGHTS_FILE))
    torch.save(opt.state_dict(), checkpoint / OPTIMIZER_FILE)
    write_json(folder / STATE_FILE, {
        "format": FORMAT, "finished": finished, **state, "fingerprint": wanted, "selector": pruner.selector.dims,
        "checkpoint": checkpoint.name, "sha256": sha256_of(checkpoint / WEIGHTS_FILE)})
    for old in folder.glob("checkpoint-*"):
        if old != checkpoint:
            shutil.rmtree(old, ignore_errors=True)


def _read_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    try:
        state = read_json(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"PrunE state {str(path)!r} is missing or corrupt: {err}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a PrunE training state (format {FORMAT!r})")
    return state


def _load_weights(folder: Path, state: dict[str, Any], pruner: EdgePruner) -> None:
    """Load the checkpoint named by ``state`` (sha256 checked) into ``pruner``."""
    weights = folder / str(state.get("checkpoint")) / WEIGHTS_FILE
    if not weights.is_file() or sha256_of(weights) != state.get("sha256"):
        raise CheckpointError(f"PrunE weights {str(weights)!r} are missing or do not match {STATE_FILE}")
    try:
        tensors = load_file(str(weights))
        for prefix, module in (("classifier.", pruner.classifier), ("selector.", pruner.selector)):
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"PrunE weights {str(weights)!r} are corrupt: {err}") from None


def _resume(folder: Path, wanted: dict[str, Any], pruner: EdgePruner, opt: torch.optim.Optimizer) -> dict[str, Any]:
    state = _read_state(folder)
    if state.get("fingerprint") != wanted:
        raise CheckpointError(f"{str(folder)!r} holds PrunE training with a different config, seed, classifier or "
                              "training graphs; use another output folder or delete it")
    _load_weights(folder, state, pruner)
    optimizer = folder / str(state["checkpoint"]) / OPTIMIZER_FILE
    try:
        opt.load_state_dict(torch.load(optimizer, map_location=pruner.device, weights_only=True))
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"optimizer state {str(optimizer)!r} is missing or corrupt: {err}") from None
    return {"step": int(state["step"]), "history": list(state.get("history", [])),
            "seconds": float(state.get("seconds", 0.0))}


def load_edge_pruner(out: str | Path, device: str | torch.device = "cpu") -> EdgePruner:
    """The finished :class:`EdgePruner` saved in ``out`` by :func:`train_edge_pruning` (eval mode)."""
    folder = Path(out)
    state = _read_state(folder)
    if not state.get("finished"):
        raise CheckpointError(f"PrunE training in {str(folder)!r} is not finished (step {state.get('step')}); "
                              "run it to the end first")
    try:
        model_cfg = from_dict(GNNConfig, state["fingerprint"]["model"], "model")
        dims = state["selector"]
        selector = EdgeSelector(int(dims["in_dim"]), int(dims["width"]), int(dims["n_layer"]))
    except (ConfigError, KeyError, TypeError) as err:
        raise CheckpointError(f"PrunE state in {str(folder)!r} has an invalid model description: {err}") from None
    pruner = EdgePruner(GraphNet(model_cfg), selector)
    _load_weights(folder, state, pruner)
    pruner.classifier.to(device)
    pruner.selector.to(device)
    return pruner.eval()


def training_history(out: str | Path) -> list[dict[str, Any]]:
    """Per-step records (step, phase, loss, ce, size, align, kept) of the PrunE run in ``out``."""
    return list(_read_state(Path(out)).get("history", []))


# ---------------------------------------------------------------------------------------------------------
# Controls and measures


def random_edge_mask(graph: GraphBatch, kept: Tensor, seed: int) -> Tensor:
    """(E,) bool on ``kept``'s device: in every graph, as many undirected edges as ``kept`` (E,) bool keeps there
    (an undirected edge counts as kept when either direction is), drawn uniformly at random; both directions of
    a drawn edge are kept together."""
    cpu = graph.to("cpu")
    keep = kept.to("cpu", torch.bool)
    if keep.shape != cpu.motif_edges.shape:
        raise DataError(f"random_edge_mask: kept must have shape {tuple(cpu.motif_edges.shape)}, "
                        f"got {tuple(keep.shape)}")
    reverse = reverse_edges(cpu)
    canon = torch.minimum(torch.arange(reverse.numel()), reverse)
    is_canon = canon == torch.arange(canon.numel())
    pair_kept = keep | keep[reverse]
    owner = cpu.edge_graph[is_canon]
    budget = _segment_sum(pair_kept[is_canon].long(), owner, len(cpu))
    scores = torch.rand(int(is_canon.sum()), generator=torch.Generator().manual_seed(int(seed) % (1 << 63)))
    chosen_canon = _ranks_within(scores, owner, len(cpu)) < budget[owner]
    chosen = torch.zeros(canon.numel(), dtype=torch.bool)
    chosen[is_canon] = chosen_canon
    return chosen[canon].to(kept.device)


def top_share_mask(graph: GraphBatch, keep_prob: Tensor, share: float) -> Tensor:
    """(E,) bool: in every graph the ``ceil(share * n)`` of its ``n`` undirected edges with the highest keep
    probability (ties by column order), both directions together. keep_prob (E,), symmetric."""
    canon = canonical_edges(graph)
    is_canon = canon == torch.arange(canon.numel(), device=canon.device)
    owner = graph.edge_graph[is_canon]
    n = _segment_sum(torch.ones_like(owner), owner, len(graph))
    budget = torch.ceil(n.to(torch.float64) * share - 1e-9).long()
    chosen = _ranks_within(-keep_prob[is_canon].detach(), owner, len(graph)) < budget[owner]
    out = torch.zeros(canon.numel(), dtype=torch.bool, device=canon.device)
    out[is_canon] = chosen
    return out[canon]


def retention(graph: GraphBatch, keep: Tensor) -> dict[str, float]:
    """Shares kept by ``keep`` (E,) bool: {"motif": of motif (invariant) edges, "base": of the other edges,
    "kept": of all edges} (NaN where there are none)."""
    keep = keep.to("cpu", torch.bool)
    motif = graph.motif_edges.to("cpu")

    def share(where: Tensor) -> float:
        n = int(where.sum())
        return float(keep[where].sum()) / n if n else float("nan")

    return {"motif": share(motif), "base": share(~motif), "kept": share(torch.ones_like(motif))}


__all__ = ["EdgeSelector", "EdgePruner", "hard_gumbel_mask", "size_constraint", "probability_alignment",
           "alignment_counts", "lowest_edges", "top_share_mask", "reverse_edges", "canonical_edges", "take_graphs",
           "train_edge_pruning", "load_edge_pruner", "training_history", "fingerprint", "random_edge_mask",
           "retention"]
