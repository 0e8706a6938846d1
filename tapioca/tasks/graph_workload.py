"""The motif graph-OOD testbed on a GIN classifier as a :class:`~tapioca.tasks.base.Workload`.

One trained :class:`~tapioca.models.gnn.GraphNet` per replicate seed; graphs from
:class:`~tapioca.tasks.graph_data.GraphMotifTask`; held-out metrics accuracy (the primary one), probability of
the true class, top-class confidence and Brier score, as for multiple-choice text. The geometry reads the
pooled graph embedding after each block. Each seed also trains PrunE's edge pruning from the same classifier
(see :mod:`tapioca.study.edges`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from tapioca.analysis.calibration import calibration_change
from tapioca.analysis.evaluation import Evaluation
from tapioca.config import Config, GraphConfig
from tapioca.errors import ConfigError
from tapioca.models.base import run_in_chunks
from tapioca.models.gates import Gates
from tapioca.models.gnn import GraphNet
from tapioca.tasks.base import ScoredSplit, Selection, Sizes
from tapioca.tasks.choices import choice_metrics
from tapioca.tasks.graph_data import GraphBatch, GraphMotifTask, GraphTaskConfig
from tapioca.tasks.text_workload import MC_METRICS

GRAPH_METRICS = {"acc": True, "prob_correct": True, "brier": False}
SELECTION_SCORES = ("acc", "prob", "loglik")
INTERVENTION_SEED_OFFSET = 7919  # sweep graphs: the reference role under another seed, disjoint from the profiles'


def class_scores(logits: Tensor, labels: Tensor, metric: str) -> Tensor:
    """Per-graph selection scores (B,) float64 of class logits (B, C), higher is better: acc (top class is the
    true one), prob or loglik of the true class."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    rows = torch.arange(len(labels))
    if metric == "acc":
        return (logits.argmax(-1).cpu() == labels.cpu()).double()
    if metric == "prob":
        return logp[rows, labels].exp().cpu()
    if metric == "loglik":
        return logp[rows, labels].cpu()
    raise ValueError(f"unknown graph selection metric {metric!r}; allowed: {list(SELECTION_SCORES)}")


def load_graph_task(cfg: GraphConfig) -> GraphMotifTask:
    """The graph task of ``graph.task`` (errors name the ``graph.task`` key)."""
    from tapioca.config import from_dict

    try:
        return GraphMotifTask(from_dict(GraphTaskConfig, cfg.task, "graph.task"))
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith("graph.task") else f"graph.task: {message}") from None


@dataclass
class GraphWorkload:
    """``task`` bound to the graph classifier ``model`` (see :class:`~tapioca.tasks.base.Workload`)."""

    model: GraphNet
    task: GraphMotifTask
    sizes: Sizes
    selection_metric: str = "acc"
    kind: str = "graph"
    name: str = "graph classifier"
    primary_metric: str = "acc"
    regression: bool = False
    intervention_metric: str = "acc"
    one_pass: bool = True
    seeds_are_models: bool = True
    norm_matching: str = "position"  # every node's state scaled to the ID mean node norm of the block

    @classmethod
    def from_config(cls, cfg: Config, model: GraphNet, task: GraphMotifTask,
                    name: str = "graph classifier") -> "GraphWorkload":
        g: GraphConfig = cfg.graph  # type: ignore[assignment]
        sizes = Sizes(g.n_select, g.n_heldout, g.n_profile, g.batch_size, g.batch_size)
        return cls(model, task, sizes, g.metric, name=name)

    @property
    def distributions(self) -> list[str]:
        return self.task.distributions

    @property
    def metrics(self) -> dict[str, bool]:
        return dict(GRAPH_METRICS)

    @property
    def search_info(self) -> dict[str, Any]:
        return {}

    def check_data(self, seeds: list[int], draws: int = 1) -> None:
        """Graphs are generated: every split has as many as asked."""

    def selection(self, dist: str, role: str, seed: int, n: int, metric: str | None = None) -> Selection:
        metric = metric or self.selection_metric
        batch = self.task.data(dist, role, seed, n)
        chunk = self.sizes.select_chunk
        score = lambda preds, b: class_scores(preds, b.y, metric)  # noqa: E731
        own = self.own_labels(batch)
        own_score = lambda preds, b: class_scores(preds, b.y, "loglik")  # noqa: E731
        return Selection(self.model, batch,
                         lambda gates: score(run_in_chunks(self.model, batch, gates, False, chunk).predictions, batch),
                         score,
                         unlabelled=lambda gates: own_score(
                             run_in_chunks(self.model, own, gates, False, chunk).predictions, own),
                         unlabelled_parts=(self.model, own, own_score))

    def own_labels(self, batch: GraphBatch) -> GraphBatch:
        """``batch`` relabelled with the full model's predicted classes: SLEB's label-free target on graphs (a
        pruned model is scored by the log-probability it gives the full model's own predictions)."""
        preds = run_in_chunks(self.model, batch, None, False, self.sizes.select_chunk).predictions
        return dataclasses.replace(batch, y=preds.argmax(-1).cpu())

    def split(self, dist: str, role: str, seed: int, n: int) -> ScoredSplit:
        batch = self.task.data(dist, role, seed, n)
        return ScoredSplit(self.model, batch, lambda preds: graph_measure(preds, batch.y))

    def evaluate_generated(self, gates: Gates | None, dist: str, role: str, seed: int, n: int) -> Evaluation:
        raise NotImplementedError("every graph split is scored from one forward pass (split)")

    def inputs(self, dist: str, seed: int, n: int) -> GraphBatch:
        return self.task.data(dist, "reference", seed, n)

    def intervention_selection(self, dist: str, seed: int) -> Selection:
        return self.selection(dist, "reference", seed + INTERVENTION_SEED_OFFSET, self.sizes.n_profile,
                              self.intervention_metric)

    def replica(self) -> Callable[[torch.device], Any] | None:
        return None

    def with_model(self, model: Any) -> "GraphWorkload":
        return dataclasses.replace(self, model=model)

    def describe(self) -> dict[str, Any]:
        cfg = self.task.cfg
        return {"model": {"name": self.name, "n_blocks": self.model.n_blocks, **dataclasses.asdict(self.model.cfg)},
                "task": {"sampler": dataclasses.asdict(cfg.sampler), "shifts": dict(cfg.shifts)}}

    def quality(self, full: Evaluation, seeds: list[int], n_bootstrap: int = 10_000,
                confidence: float = 0.95) -> dict[str, Any]:
        return {"model_id_acc": full.summary(n_bootstrap, confidence, shrinkage=False)["id"]["acc"]}

    def chance(self, dist: str, role: str, seed: int, n: int) -> float | None:
        return 1.0 / self.model.cfg.n_classes

    def extra_results(self, full: Evaluation, target: Evaluation, from_id: Evaluation) -> dict[str, Any]:
        return {"calibration": {"target": calibration_change(full, target),
                                "from-id": calibration_change(full, from_id)}}


def graph_measure(logits: Tensor, labels: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Per-graph held-out metrics of class logits (B, C): acc, prob_correct, confidence, brier (float64), with
    the predicted and the true classes."""
    table = torch.log_softmax(logits.double().cpu(), dim=-1)
    values = choice_metrics(table, labels.cpu())
    return {k: values[k] for k in MC_METRICS}, table.argmax(1), labels.cpu()
