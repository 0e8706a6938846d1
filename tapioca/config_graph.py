"""The graph study's config sections (``graph:`` in a YAML file): the GIN classifier, its ERM training and PrunE
edge pruning. :mod:`tapioca.config` re-exports them beside the other sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tapioca.config_data import _added_later, _range


@dataclass(frozen=True)
class GNNConfig:
    """The graph classifier (:mod:`tapioca.models.gnn`): ``n_layer`` residual GIN blocks of ``width`` features."""

    n_layer: int = _range(6, ge=1)
    width: int = _range(64, ge=2)
    mlp_ratio: int = _range(2, ge=1)  # hidden features of each block's MLP = mlp_ratio * width
    pool: Literal["mean", "sum"] = "mean"
    in_dim: int = _range(1, ge=1)  # node feature size (the motif testbed: one constant feature)
    n_classes: int = _range(3, ge=2)


@dataclass(frozen=True)
class GraphTrainConfig:
    """ERM training of the graph classifier on a fixed set of ID graphs (minibatches drawn with replacement)."""

    n_train: int = _range(3000, ge=8)  # ID training graphs (the "train" role)
    steps: int = _range(2000, ge=1)
    batch_size: int = _range(64, ge=1)
    lr: float = _range(1e-3, gt=0)
    weight_decay: float = _range(0.0, ge=0)
    warmup_steps: int = _range(100, ge=0)
    grad_clip: float = _range(1.0, gt=0)
    checkpoint_every: int = _range(500, ge=1)
    schedule: Literal["cosine", "constant"] = _added_later("cosine")  # after warm-up, as train.schedule


@dataclass(frozen=True)
class EdgePruningConfig:
    """PrunE (Yao et al., NeurIPS 2025): an edge selector GNN learns hard Gumbel-softmax edge masks that feed
    the classifier, under a graph-size constraint (kept-edge ratio toward ``eta``) and an epsilon-probability
    alignment of each graph's ``align_fraction`` lowest-probability edges, after ERM (a study starts PrunE from
    the seed's ERM-trained classifier; ``warmup_steps`` of ERM run only without one). Defaults: the authors'
    GOOD-Motif settings (eta 0.85, K 90 %, lambda_1 10, lambda_2 0.001, tau 0.2, epsilon 1/|E|, 2-layer
    selector, lr 1e-3). ``readout``: which edges a trained selector keeps at test time ("threshold": keep probability
    > 0.5, the deterministic counterpart of the sampled masks the classifier was trained on; "top_eta": each
    graph's top eta share by keep probability). The default was chosen for the classifier's own ID accuracy:
    on the motif testbed the top-eta readout fed the classifier graphs it was not trained on (ID accuracy 0.68
    against 1.00); the study reports both readouts either way."""

    warmup_steps: int = _range(200, ge=0)  # ERM steps before the edge selector is trained (no ERM classifier given)
    steps: int = _range(1500, ge=1)  # PrunE steps after the warm-up
    eta: float = _range(0.85, gt=0, le=1)  # target share of kept edges (graph-size constraint)
    epsilon: float | None = _range(None, gt=0, le=0.5)  # alignment target probability (None: 1/|E_g| per graph)
    align_fraction: float = _range(0.9, gt=0, le=1)  # share K of each graph's edges aligned to epsilon
    lambda_size: float = _range(10.0, ge=0)  # weight of the graph-size constraint
    lambda_align: float = _range(0.001, ge=0)  # weight of the epsilon-probability alignment
    tau: float = _range(0.2, gt=0)  # Gumbel-softmax temperature
    selector_layers: int = _range(2, ge=1)  # message-passing layers of the edge selector
    lr: float = _range(1e-3, gt=0)
    readout: Literal["threshold", "top_eta"] = "threshold"


@dataclass(frozen=True)
class GraphConfig:
    """A study on a graph classifier and the motif graph-OOD testbed (:mod:`tapioca.tasks.graph_data`) instead
    of the polynomial testbed. ``task``: :class:`~tapioca.tasks.graph_data.GraphTaskConfig` fields (sampler and
    named shifts). One classifier is trained per replicate seed (``evaluation.seeds``); ``checkpoint`` (with
    ``{seed}``) loads one instead. ``metric``: TALE's selection score (acc, prob or loglik of the true class)."""

    task: dict[str, Any] = field(default_factory=dict)
    model: GNNConfig = field(default_factory=GNNConfig)
    train: GraphTrainConfig = field(default_factory=GraphTrainConfig)
    edges: EdgePruningConfig = field(default_factory=EdgePruningConfig)
    checkpoint: str | None = None
    metric: Literal["acc", "prob", "loglik"] = "acc"
    n_select: int = _range(256, ge=8)
    n_heldout: int = _range(1000, ge=8)
    n_profile: int = _range(256, ge=4)
    batch_size: int = _range(256, ge=1)  # graphs per forward pass
