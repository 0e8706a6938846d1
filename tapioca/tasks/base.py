"""The one seam between a task and a model: a :class:`Workload`.

A workload is a task bound to one gateable model and to the sizes a study uses. Searches, held-out
evaluation, geometry, controls, interventions and the study steps are written once against it; the testbed
(:class:`tapioca.tasks.testbed.TestbedWorkload`) and text tasks on causal LMs
(:class:`tapioca.tasks.text_workload.TextWorkload`) implement it, and so can any other model kind::

    wl = TestbedWorkload.from_config(cfg, model)          # or TextWorkload.from_config(cfg, lm)
    sel = wl.selection("x_scale_3", "select", seed=0, n=wl.sizes.n_select)
    sel.scorer(removal_gates([4]))                        # per-example selection scores (B,), higher is better
    ev = wl.evaluate(removal_gates([4]), "x_scale_3", seed=0, n=wl.sizes.n_heldout)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from tapioca.analysis.evaluation import Evaluation, single_evaluation
from tapioca.models.base import BlockModel, run_in_chunks
from tapioca.models.gates import Gates
from tapioca.pruning.searches import PredictionScorer, Scorer

Measure = Callable[[Tensor], tuple[dict[str, Tensor], Tensor, Tensor]]  # predictions -> (metrics, preds, targets)


@dataclass(frozen=True)
class Sizes:
    """How many examples each step takes, and rows per forward pass."""

    n_select: int  # selection split (searches)
    n_heldout: int  # held-out split (reporting), per seed and distribution
    n_profile: int  # geometry prompts per profile (ID draws twice as many, for the noise floor)
    select_chunk: int  # rows per pass while searching
    eval_chunk: int  # rows per pass for held-out evaluation, profiles and interventions


@dataclass
class Selection:
    """One split ready for a search. ``model`` runs ``batch``; ``scorer(gates)`` gives per-example scores (B,),
    higher is better; ``score_predictions(predictions, batch)`` (when scores come from one forward pass) lets
    TALE reuse the residual stream; ``unlabelled`` scores the model's own loss on the inputs alone (no labels),
    and ``unlabelled_parts`` (model, batch, predictions -> scores), when given, lets a label-free greedy search
    reuse the residual stream the same way."""

    model: BlockModel
    batch: Any
    scorer: Scorer
    score_predictions: PredictionScorer | None = None
    unlabelled: Scorer | None = None
    unlabelled_parts: tuple[BlockModel, Any, PredictionScorer] | None = None


@dataclass
class ScoredSplit:
    """A split whose held-out metrics come from one forward pass: ``model.run(batch)`` predictions, then
    ``measure(predictions)`` -> (per-example metrics {name: (n,)}, predictions (n,), targets (n,))."""

    model: BlockModel
    batch: Any
    measure: Measure


class Workload(Protocol):
    """A task bound to one gateable model (see the module docstring)."""

    kind: str  # "testbed", "lm", ...: recorded in results.json
    name: str  # the model, for messages
    model: BlockModel  # the gateable model (profiles, weight pruning, residual scaling)
    distributions: list[str]  # "id" first, then the shifts
    metrics: dict[str, bool]  # held-out metrics a comparison reports -> higher is better
    primary_metric: str  # the held-out metric the claims are decided on
    selection_metric: str  # what searches maximise
    intervention_metric: str  # what residual-scaling sweeps and norm matching score (one forward pass)
    regression: bool  # predictions are real numbers (a prediction-shrinkage slope means something)
    norm_matching: str  # "position" (every token, equal prompt lengths) or "last_token"
    sizes: Sizes
    one_pass: bool  # every split's held-out metrics come from one forward pass (``split`` never returns None)
    seeds_are_models: bool  # each seed trains its own model (False: seeds are sampling seeds of one fixed model)

    @property
    def search_info(self) -> dict[str, Any]:
        """Extra fields a search records in ``PruneResult.info``."""
        ...

    def check_data(self, seeds: list[int], draws: int = 1) -> None:
        """Fail before any model work if some split holds fewer examples than :attr:`sizes` asks for (the
        selection split: for each of ``draws`` selection draws)."""
        ...

    def selection(self, dist: str, role: str, seed: int, n: int, metric: str | None = None) -> Selection:
        """``n`` examples of ``role`` of ``dist`` (sampling seed ``seed``), scored with ``metric``."""
        ...

    def split(self, dist: str, role: str, seed: int, n: int) -> ScoredSplit | None:
        """``n`` examples of ``role`` ("heldout", or "select" for in-sample scores) of ``dist`` with the held-out
        metrics, when they come from one forward pass; else None (e.g. scored by generation)."""
        ...

    def evaluate_generated(self, gates: Gates | None, dist: str, role: str, seed: int, n: int) -> Evaluation:
        """Evaluation (held-out metrics) of a split :meth:`split` cannot give (e.g. scored by generation)."""
        ...

    def inputs(self, dist: str, seed: int, n: int) -> Any:
        """``n`` unlabelled inputs of the "reference" role that ``model.run(..., capture=True)`` takes."""
        ...

    def intervention_selection(self, dist: str, seed: int) -> Selection:
        """The examples and metric residual-scaling sweeps and norm matching are scored on."""
        ...

    def replica(self) -> Callable[[torch.device], BlockModel] | None:
        """A picklable recipe of the selection model for Ray workers, or None when they cannot score it."""
        ...

    def with_model(self, model: Any) -> "Workload":
        """The same workload on another model of the same kind (e.g. a weight-pruned copy)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What results.json records of the model and the task."""
        ...

    def quality(self, full: Evaluation, seeds: list[int], n_bootstrap: int = 10_000,
                confidence: float = 0.95) -> dict[str, Any]:
        """The full model's quality on ID (beside reference predictors where the task has them)."""
        ...

    def extra_results(self, full: Evaluation, target: Evaluation, from_id: Evaluation) -> dict[str, Any]:
        """Task-specific results blocks (e.g. calibration for classification-like tasks)."""
        ...

    def chance(self, dist: str, role: str, seed: int, n: int) -> float | None:
        """Expected accuracy of a uniform random guess on those examples (1 / choices, 0 for free-form
        answers); None where the primary metric has no chance level (regression)."""
        ...


def evaluate(wl: Workload, gates: Gates | None, dist: str, seed: int, n: int, role: str = "heldout") -> Evaluation:
    """:class:`Evaluation` of ``wl.model`` with ``gates`` on ``n`` examples of ``role`` of ``dist`` (one seed)."""
    split = wl.split(dist, role, seed, n)
    if split is None:
        return wl.evaluate_generated(gates, dist, role, seed, n)
    preds = run_in_chunks(split.model, split.batch, gates, capture=False, chunk=wl.sizes.eval_chunk).predictions
    return measured(wl, split, preds.cpu(), dist, seed)


def measured(wl: Workload, split: ScoredSplit, preds: Tensor, dist: str, seed: int) -> Evaluation:
    """The :class:`Evaluation` of one seed's ``preds`` on ``split``."""
    metrics, predictions, targets = split.measure(preds)
    return single_evaluation(dist, seed, metrics, predictions, targets, where=f"model {wl.name}")


def chance_levels(wl: Workload, seeds: list[int]) -> dict[str, float] | None:
    """Per distribution, the accuracy of a uniform random guess on the held-out examples (mean over seeds), or
    None where the primary metric has no chance level: the claims call a model within δ of it "at floor"."""
    levels = {d: [wl.chance(d, "heldout", s, wl.sizes.n_heldout) for s in seeds] for d in wl.distributions}
    if any(v is None for vs in levels.values() for v in vs):
        return None
    return {d: sum(vs) / len(vs) for d, vs in levels.items()}
