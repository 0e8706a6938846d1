"""Edge pruning beside layer pruning on graph classifiers: PrunE, its controls, retention and geometry (G1).

Per replicate seed (each cached in ``<run>/edges/seed<seed>/``):

* PrunE is trained from the seed's ERM classifier (that training is PrunE's ERM warm-up);
* held-out evaluation, on the very graphs the layer study evaluates, of: ``erm`` (the classifier on whole
  graphs), ``prune`` (PrunE's classifier on the graphs its selector keeps: keep probability > 0.5, the
  deterministic counterpart of the sampled masks it was trained on; ``graph.edges.readout``), ``prune_at_eta``
  (the same classifier on each graph's top eta share of edges by keep probability), ``erm_continued`` (the ERM
  classifier trained on by plain ERM through PrunE's steps, optimiser and minibatches: what continued training
  alone does), ``prune_random`` (PrunE's classifier
  with as many edges per graph kept at random), ``erm_random`` (the ERM classifier on those random graphs) and
  ``erm_on_kept`` (the ERM classifier on PrunE's kept edges);
* invariant-edge retention: the share of motif edges and of base edges PrunE keeps, and random keeps;
* profiles for claim G1 ("edge pruning realigns OOD geometry"): the distortion D of OOD against ID of the ERM
  classifier on whole graphs (before) and of PrunE on its kept edges (after), each with its ID-vs-ID noise floor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tapioca.analysis.evaluation import Evaluation, compare, single_evaluation
from tapioca.analysis.geometry import distortion, profile, query_states
from tapioca.config import Config, GraphConfig
from tapioca.models.base import BlockModel, run_in_chunks
from tapioca.models.graph_training import training_graphs
from tapioca.pruning.edges import EdgePruner, random_edge_mask, retention, train_edge_pruning, training_history
from tapioca.study.rundir import cached_evaluation, cached_json
from tapioca.tasks.graph_data import GraphBatch
from tapioca.tasks.graph_workload import GraphWorkload, graph_measure

METHODS = ("erm", "prune", "prune_at_eta", "prune_random", "erm_random", "erm_on_kept", "erm_continued")
RANDOM_SEED_OFFSET = 104_729  # random edge masks: their own stream, per seed


def edge_pruning_seed(wl: GraphWorkload, g: GraphConfig, seed: int, folder: Path, progress: bool = False) -> dict:
    """PrunE trained, evaluated and profiled for replicate ``seed``: {"evaluations": {method: Evaluation},
    "summary": JSON-ready retention, geometry and training record}. Every part is cached in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    pruner = train_edge_pruning(g.edges, g.train, g.model, training_graphs(wl.task, g, seed), seed, init=wl.model,
                                out=folder / "prune", progress=progress)
    continued = train_edge_pruning(g.edges, g.train, g.model, training_graphs(wl.task, g, seed), seed, init=wl.model,
                                   out=folder / "erm-continued", progress=progress, erm_only=True).classifier
    pruner.eval()
    pruner.budget = g.edges.eta if g.edges.readout == "top_eta" else None
    views = graph_views(wl.model, pruner, seed, g.edges.eta) | {"erm_continued": (continued, lambda batch: batch)}
    chunk = wl.sizes.eval_chunk
    evaluations = {}
    for method in METHODS:
        model, view = views[method]
        evaluations[method] = cached_evaluation(folder / f"{method}.npz", lambda model=model, view=view: Evaluation.concat(
            [evaluate_view(model, view(wl.task.data(d, "heldout", seed, wl.sizes.n_heldout)), d, seed, chunk)
             for d in wl.distributions]))
    summary = cached_json(folder / "edges.json", lambda: {
        "retention": {d: seed_retention(pruner, wl.task.data(d, "heldout", seed, wl.sizes.n_heldout), seed, chunk,
                              g.edges.eta)
                      for d in wl.distributions},
        "geometry": edge_geometry(wl, views, seed),
        "training": training_record(folder / "prune"),
    })
    return {"evaluations": evaluations, "summary": summary}


View = Callable[[GraphBatch], GraphBatch]


def graph_views(erm: BlockModel, pruner: EdgePruner, seed: int, eta: float) -> dict[str, tuple[BlockModel, View]]:
    """Each method's (classifier, graphs it sees)."""
    at_eta = dataclasses.replace(pruner, budget=eta)

    def kept(batch: GraphBatch) -> GraphBatch:
        return batch.with_edges(pruner.keep_mask(batch))

    def kept_at_eta(batch: GraphBatch) -> GraphBatch:
        return batch.with_edges(at_eta.keep_mask(batch))

    def random(batch: GraphBatch) -> GraphBatch:
        return batch.with_edges(random_edge_mask(batch, pruner.keep_mask(batch), seed + RANDOM_SEED_OFFSET))

    whole: View = lambda batch: batch  # noqa: E731
    return {"erm": (erm, whole), "prune": (pruner.classifier, kept), "prune_at_eta": (pruner.classifier, kept_at_eta),
            "prune_random": (pruner.classifier, random),
            "erm_random": (erm, random), "erm_on_kept": (erm, kept)}


def evaluate_view(model: BlockModel, batch: GraphBatch, dist: str, seed: int, chunk: int) -> Evaluation:
    """Held-out metrics of ``model`` on ``batch`` (one seed, one distribution)."""
    logits = run_in_chunks(model, batch, None, capture=False, chunk=chunk).predictions
    metrics, preds, targets = graph_measure(logits, batch.y)
    return single_evaluation(dist, seed, metrics, preds, targets, where="graph classifier")


def seed_retention(pruner: EdgePruner, batch: GraphBatch, seed: int, chunk: int,
                   eta: float) -> dict[str, dict[str, float]]:
    """Share of motif (invariant) edges, of base edges and of all edges kept by PrunE (its readout), by PrunE's
    top ``eta`` share of each graph's edges, and by random masks at PrunE's per-graph budget, over ``batch``."""
    at_eta = dataclasses.replace(pruner, budget=eta)
    masks: dict[str, list[torch.Tensor]] = {"prune": [], "prune_at_eta": [], "random": []}
    for i in range(0, len(batch), chunk):
        sub = batch.slice(i, min(i + chunk, len(batch)))
        keep = pruner.keep_mask(sub).cpu()
        masks["prune"].append(keep)
        masks["prune_at_eta"].append(at_eta.keep_mask(sub).cpu())
        masks["random"].append(random_edge_mask(sub, keep, seed + RANDOM_SEED_OFFSET).cpu())
    return {name: retention(batch, torch.cat(parts)) for name, parts in masks.items()}


def training_record(folder: Path, last: int = 100) -> dict[str, float]:
    """PrunE's training at its end: mean kept-edge share, classification loss and both penalties over the last
    ``last`` steps (the size constraint pulls the kept share toward eta; this says how close it got)."""
    rows = [r for r in training_history(folder) if r.get("phase") == "prune"][-last:]
    if not rows:
        return {}
    return {k: float(np.mean([r[k] for r in rows])) for k in ("kept", "ce", "size", "align") if k in rows[0]}


def edge_geometry(wl: GraphWorkload, views: dict[str, tuple[BlockModel, View]], seed: int) -> dict[str, Any]:
    """Per view: D(OOD vs ID) per shift and the ID-vs-ID noise floor, on the geometry's reference graphs."""
    n, chunk = wl.sizes.n_profile, wl.sizes.eval_chunk
    data = {d: wl.inputs(d, seed, 2 * n if d == "id" else n) for d in wl.distributions}
    id_b = data["id"].slice(n, 2 * n)
    data["id"] = data["id"].slice(0, n)
    out: dict[str, Any] = {}
    for method in ("erm", "prune", "erm_on_kept"):
        model, view = views[method]
        prof = {d: profile(query_states(model, view(batch), None, chunk)) for d, batch in data.items()}
        floor = distortion(profile(query_states(model, view(id_b), None, chunk)), prof["id"]).D
        out[method] = {"noise_floor": floor,
                       **{d: distortion(prof[d], prof["id"]).D for d in wl.distributions if d != "id"}}
    return out


def edge_results(cfg: Config, wl: GraphWorkload, extras: dict[int, dict]) -> dict[str, Any]:
    """results.json's ``edges`` block: per method the held-out summary and Δ against ERM with paired-bootstrap
    CIs (seeds as groups); Δ of PrunE against continued ERM (what the objective adds to the same training);
    retention and G1 geometry per seed and averaged."""
    ev = cfg.evaluation
    merged = {m: Evaluation.concat([x["evaluations"][m] for x in extras.values()]) for m in METHODS}
    erm = merged["erm"]
    summaries = {m: e.summary(ev.n_bootstrap, ev.confidence, shrinkage=False) for m, e in merged.items()}
    deltas = {m: compare(erm, merged[m], wl.distributions, ev.n_bootstrap, ev.confidence, wl.metrics)
              for m in METHODS if m != "erm"}
    per_seed = {str(s): x["summary"] for s, x in extras.items()}
    objective = compare(merged["erm_continued"], merged["prune"], wl.distributions, ev.n_bootstrap, ev.confidence,
                        wl.metrics)  # PrunE's objective against the same steps of plain ERM
    return {"methods": list(METHODS), "summary": summaries, "delta_vs_erm": deltas,
            "prune_vs_erm_continued": objective,
            "retention": _mean_over_seeds({s: v["retention"] for s, v in per_seed.items()}),
            "geometry": _mean_over_seeds({s: v["geometry"] for s, v in per_seed.items()}),
            "training": _mean_over_seeds({s: v.get("training", {}) for s, v in per_seed.items()}),
            "per_seed": per_seed, "settings": dataclasses.asdict(cfg.graph.edges) if cfg.graph else {}}


def _mean_over_seeds(tree: dict[str, Any]) -> Any:
    """The leaf-wise mean of identically shaped nested dicts of numbers, keyed by seed."""
    first = next(iter(tree.values()))
    if isinstance(first, dict):
        return {k: _mean_over_seeds({s: v[k] for s, v in tree.items()}) for k in first}
    return float(np.mean([float(v) for v in tree.values()]))
