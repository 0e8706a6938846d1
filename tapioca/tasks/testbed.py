"""The polynomial in-context regression testbed as a :class:`~tapioca.tasks.base.Workload`.

One trained :class:`~tapioca.models.icl.ICLModel` per replicate seed; prompts from
:class:`~tapioca.tasks.polyreg.PolyRegTask`; held-out metrics NMSE (the primary one) and tolerance accuracy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tapioca.analysis.evaluation import METRICS, Evaluation, selection_scorer, single_evaluation
from tapioca.config import Config, PruningConfig
from tapioca.models.gates import Gates
from tapioca.models.icl import ICLModel
from tapioca.tasks.base import ScoredSplit, Selection, Sizes
from tapioca.tasks.polyreg import PolyRegTask, context_error_scorer
from tapioca.tasks.references import REFERENCES

INTERVENTION_SEED_OFFSET = 7919  # sweep prompts: the reference role under another seed, disjoint from the profiles'


@dataclass
class TestbedWorkload:
    """``task`` bound to the testbed ``model`` (see :class:`~tapioca.tasks.base.Workload`)."""

    __test__ = False  # not a pytest class

    model: ICLModel
    task: PolyRegTask
    sizes: Sizes
    selection_metric: str = "nmse"
    kind: str = "testbed"
    name: str = "testbed model"
    primary_metric: str = "nmse"
    regression: bool = True
    intervention_metric: str = "nmse"
    one_pass: bool = True
    seeds_are_models: bool = True
    norm_matching: str = "position"

    @classmethod
    def from_config(cls, cfg: Config, model: ICLModel, task: PolyRegTask | None = None,
                    name: str = "testbed model") -> "TestbedWorkload":
        return cls.from_pruning(cfg.pruning, model, task or PolyRegTask(cfg.task), cfg.evaluation.n_heldout,
                                cfg.geometry.n_prompts, cfg.evaluation.batch_size, name)

    @classmethod
    def from_pruning(cls, p: PruningConfig, model: ICLModel, task: PolyRegTask, n_heldout: int = 2048,
                     n_profile: int = 256, eval_chunk: int = 128, name: str = "testbed model") -> "TestbedWorkload":
        sizes = Sizes(p.n_select, n_heldout, n_profile, p.batch_size, eval_chunk)
        return cls(model, task, sizes, p.metric, name=name)

    @property
    def distributions(self) -> list[str]:
        return self.task.distributions

    @property
    def search_info(self) -> dict[str, Any]:
        return {}

    def check_data(self, seeds: list[int], draws: int = 1) -> None:
        """Prompts are sampled: every split has as many as asked."""

    @property
    def metrics(self) -> dict[str, bool]:
        return dict(METRICS)

    def selection(self, dist: str, role: str, seed: int, n: int, metric: str | None = None) -> Selection:
        metric = metric or self.selection_metric
        batch = self.task.data(dist, role, seed, n)
        chunk = self.sizes.select_chunk
        return Selection(self.model, batch, selection_scorer(self.model, self.task, batch, metric, chunk),
                         lambda preds, b: self.task.score(preds, b, metric),
                         unlabelled=context_error_scorer(self.model, batch, chunk))

    def split(self, dist: str, role: str, seed: int, n: int) -> ScoredSplit:
        batch = self.task.data(dist, role, seed, n)
        return ScoredSplit(self.model, batch, lambda preds: (self.task.metrics(preds, batch), preds, batch.query_y))

    def evaluate_generated(self, gates: Gates | None, dist: str, role: str, seed: int, n: int) -> Evaluation:
        raise NotImplementedError("every testbed split is scored from one forward pass (split)")

    def inputs(self, dist: str, seed: int, n: int) -> Any:
        return self.task.data(dist, "reference", seed, n)

    def intervention_selection(self, dist: str, seed: int) -> Selection:
        return self.selection(dist, "reference", seed + INTERVENTION_SEED_OFFSET, self.sizes.n_profile,
                              self.intervention_metric)

    def replica(self) -> Any:
        from tapioca.pruning.parallel import ICLReplica  # Ray support is optional

        return ICLReplica.of(self.model)

    def with_model(self, model: Any) -> "TestbedWorkload":
        return dataclasses.replace(self, model=model)

    def describe(self) -> dict[str, Any]:
        return {}

    def quality(self, full: Evaluation, seeds: list[int], n_bootstrap: int = 10_000,
                confidence: float = 0.95) -> dict[str, Any]:
        refs = references(self.task, ["id"], seeds, self.sizes.n_heldout)
        return {"model_id_nmse": full.summary(n_bootstrap, confidence)["id"]["nmse"],
                "references_id_nmse": {name.split("/")[1]: float(v["nmse"].mean()) for name, v in refs.values.items()}}

    def chance(self, dist: str, role: str, seed: int, n: int) -> float | None:
        return None  # NMSE has no chance level

    def extra_results(self, full: Evaluation, target: Evaluation, from_id: Evaluation) -> dict[str, Any]:
        return {}


def references(task: PolyRegTask, distributions: list[str], seeds: list[int], n: int) -> Evaluation:
    """The reference predictors (least squares, kNN, mean) on the held-out prompts, as an Evaluation whose
    distribution keys are ``"<dist>/<predictor>"``."""
    parts = []
    for dist in distributions:
        for seed in seeds:
            batch = task.data(dist, "heldout", seed, n)
            for name, predict in REFERENCES.items():
                preds = predict(batch)
                parts.append(single_evaluation(f"{dist}/{name}", seed, task.metrics(preds, batch), preds,
                                               batch.query_y))
    return Evaluation.concat(parts)
