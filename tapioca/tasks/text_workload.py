"""Text tasks on a Hugging Face causal LM as a :class:`~tapioca.tasks.base.Workload`.

The model is fixed; seeds are sampling seeds (which examples and demonstrations). Multiple choice is scored by
choice log-likelihood (one forward pass: held-out runs resume from recorded block inputs like the testbed's);
short answer by greedy generation and the task's checker. Held-out metrics: ``acc`` (the primary one),
``prob_correct``, ``confidence`` and ``brier`` (multiple choice) or ``acc``, ``score``, ``confidence`` and
``brier`` (short answer; confidence = the model's probability of its own greedy answer line).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tapioca.analysis.calibration import calibration_change
from tapioca.analysis.evaluation import LM_METRICS, Evaluation, single_evaluation
from tapioca.config import Config, LMConfig
from tapioca.errors import CheckpointError, ConfigError
from tapioca.models.gates import Gates
from tapioca.models.hf import HFModel
from tapioca.tasks.roles import selection_role
from tapioca.models.install import MODELS, installed_path
from tapioca.tasks.base import ScoredSplit, Selection, Sizes
from tapioca.tasks.choices import (
    ChoiceModel, ChoiceReplica, check_metric, choice_batch, choice_metrics, choice_table, lm_selection,
    prompt_loglik_parts, prompt_loglik_scorer, task_choices,
)
from tapioca.tasks.text import TextTask, TextTaskConfig, score_short_answer

MC_METRICS = ("acc", "prob_correct", "confidence", "brier")
SHORT_METRICS = ("acc", "score", "confidence", "brier")


def intervention_metric(kind: str, metric: str) -> str:
    """A selection metric computable from one forward pass (sweeps need scores and states of the same run):
    short-answer generation accuracy becomes the gold answer's log-likelihood."""
    return "loglik" if kind == "short_answer" and metric == "acc" else metric


@dataclass
class TextWorkload:
    """``task`` bound to the causal LM ``model`` (see :class:`~tapioca.tasks.base.Workload`)."""

    model: HFModel
    task: TextTask
    sizes: Sizes
    selection_metric: str = "loglik"
    length_normalize: bool = False
    max_new_tokens: int = 12
    name: str = "language model"
    dtype: str = "float32"
    kind: str = "lm"
    primary_metric: str = "acc"
    regression: bool = False
    seeds_are_models: bool = False  # one fixed model: every (sampling seed, draw) is a selection draw of it
    norm_matching: str = "last_token"

    def __post_init__(self) -> None:
        check_metric(self.task.kind, self.selection_metric)

    @classmethod
    def from_config(cls, cfg: Config, model: HFModel, task: TextTask) -> "TextWorkload":
        lmc: LMConfig = cfg.lm  # type: ignore[assignment]
        sizes = Sizes(lmc.n_select, lmc.n_heldout, lmc.n_profile, lmc.batch_size, lmc.batch_size)
        return cls(model, task, sizes, lmc.metric, lmc.length_normalize, lmc.max_new_tokens, lmc.model, lmc.dtype)

    @classmethod
    def for_model(cls, model: HFModel, task: TextTask, *, metric: str = "loglik", n_select: int = 64,
                  n_heldout: int = 100, n_profile: int = 48, batch_size: int = 16, length_normalize: bool = False,
                  max_new_tokens: int = 32, name: str = "language model") -> "TextWorkload":
        """A workload of ``model`` on ``task`` with these sizes (``batch_size``: rows per pass, and prompts per
        generate call)."""
        sizes = Sizes(n_select, n_heldout, n_profile, batch_size, batch_size)
        return cls(model, task, sizes, metric, length_normalize, max_new_tokens, name)

    @property
    def distributions(self) -> list[str]:
        return self.task.distributions

    @property
    def one_pass(self) -> bool:
        return self.task.kind == "multiple_choice"  # short answers are scored by generation

    @property
    def search_info(self) -> dict[str, Any]:
        return {"task_kind": self.task.kind, "mc_format": self.task.cfg.mc_format,
                "length_normalize": self.length_normalize}

    def check_data(self, seeds: list[int], draws: int = 1) -> None:
        """Fail before any model work if some distribution, role and seed has fewer examples than a study takes
        (selection, held-out, and the geometry's reference prompts: twice ``n_profile`` on ID, for the noise
        floor; every one of ``draws`` selection draws); the task's error names the split, the role and what to
        change."""
        s = self.sizes
        for dist in self.distributions:
            needs = {selection_role(draws - 1): s.n_select, "heldout": s.n_heldout,
                     "reference": 2 * s.n_profile if dist == "id" else s.n_profile}
            for role, n in needs.items():
                for seed in seeds:
                    self.task.data(dist, role, seed, n)

    @property
    def metrics(self) -> dict[str, bool]:
        present = MC_METRICS if self.task.kind == "multiple_choice" else SHORT_METRICS
        return {m: up for m, up in LM_METRICS.items() if m in present}

    def selection(self, dist: str, role: str, seed: int, n: int, metric: str | None = None) -> Selection:
        sel = lm_selection(self.model, self.task, dist, role, seed, n, metric or self.selection_metric,
                           chunk=self.sizes.select_chunk, length_normalize=self.length_normalize,
                           max_new_tokens=self.max_new_tokens)
        return Selection(sel.model, sel.batch, sel.scorer, sel.score_predictions,
                         unlabelled=prompt_loglik_scorer(self.model, sel.prompts, self.sizes.select_chunk),
                         unlabelled_parts=(self.model, *prompt_loglik_parts(self.model, sel.prompts)))

    def split(self, dist: str, role: str, seed: int, n: int) -> ScoredSplit | None:
        if not self.one_pass:
            return None
        examples = self.task.data(dist, role, seed, n)
        conts, labels = task_choices(examples, self.task.cfg.mc_format)
        batch = choice_batch(self.model, self.task.prompts(examples, seed), conts, labels, self.length_normalize)

        def measure(preds: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
            table = choice_table(preds, batch)
            values = choice_metrics(table, batch.labels)
            return {k: values[k] for k in MC_METRICS}, table.argmax(1), batch.labels

        return ScoredSplit(ChoiceModel(self.model), batch, measure)

    def evaluate_generated(self, gates: Gates | None, dist: str, role: str, seed: int, n: int) -> Evaluation:
        """Short answer: greedy generation checked by the task; predictions / targets are the extracted / gold
        answers as numbers (NaN when not a number)."""
        examples = self.task.data(dist, role, seed, n)
        confidences: list[np.ndarray] = []

        def generate(texts: list[str], max_new_tokens: int) -> list[str]:
            responses, confidence = self.model.generate_with_confidence(texts, gates, max_new_tokens,
                                                                        self.sizes.eval_chunk)
            confidences.append(confidence.numpy())
            return responses

        scores = score_short_answer(generate, examples, self.task.prompts(examples, seed),
                                    max_new_tokens=self.max_new_tokens, check=self.task.check)
        correct = scores.correct.astype(np.float64)
        confidence = np.concatenate(confidences)
        values = {"acc": correct, "score": scores.score, "confidence": confidence,
                  "brier": (confidence - correct) ** 2}
        predicted = np.array([_as_number(p) if p else math.nan for p in scores.predicted])
        targets = np.array([_as_number(ex.answer) for ex in examples])
        return single_evaluation(dist, seed, {k: torch.from_numpy(np.asarray(v, dtype=np.float64))
                                              for k, v in values.items()},
                                 torch.from_numpy(predicted), torch.from_numpy(targets), where=f"model {self.name}")

    def inputs(self, dist: str, seed: int, n: int) -> Any:
        examples = self.task.data(dist, "reference", seed, n)
        return self.model.tokenize(self.task.prompts(examples, seed))

    @property
    def intervention_metric(self) -> str:
        return intervention_metric(self.task.kind, self.selection_metric)

    def intervention_selection(self, dist: str, seed: int) -> Selection:
        return self.selection(dist, "reference", seed, self.sizes.n_profile, self.intervention_metric)

    def replica(self) -> Any:
        from tapioca.pruning.parallel import HFReplica

        return ChoiceReplica(HFReplica.of(self.model))

    def with_model(self, model: Any) -> "TextWorkload":
        return dataclasses.replace(self, model=model.lm if isinstance(model, ChoiceModel) else model)

    def describe(self) -> dict[str, Any]:
        cfg = self.task.cfg
        return {"model": {"name": self.name, "n_blocks": self.model.n_blocks, "dtype": self.dtype,
                          "chat": self.model.chat},
                "task": {"source": cfg.source, "kind": self.task.kind, "splits": cfg.splits, "n_shots": cfg.n_shots}}

    def quality(self, full: Evaluation, seeds: list[int], n_bootstrap: int = 10_000,
                confidence: float = 0.95) -> dict[str, Any]:
        return {"model_id_acc": full.summary(n_bootstrap, confidence, shrinkage=False)["id"][self.primary_metric]}

    def chance(self, dist: str, role: str, seed: int, n: int) -> float | None:
        """Multiple choice: the mean of 1 / (number of choices); short answer: 0 (a guess is almost never right)."""
        if self.task.kind != "multiple_choice":
            return 0.0
        examples = self.task.data(dist, role, seed, n)
        return float(np.mean([1.0 / len(ex.choices) for ex in examples]))

    def extra_results(self, full: Evaluation, target: Evaluation, from_id: Evaluation) -> dict[str, Any]:
        return {"calibration": {"target": calibration_change(full, target),
                                "from-id": calibration_change(full, from_id)}}


def _as_number(text: Any) -> float:
    try:
        value = float(str(text).replace(",", ""))
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def resolve_lm_path(name: str) -> Path:
    """An installed model's folder (by ``tapioca models list`` name), or ``name`` as a local path."""
    if name in MODELS:
        path = installed_path(name)
        if path is None:
            raise CheckpointError(f"lm.model: {name!r} is not installed; run `tapioca models install {name}`")
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(f"lm.model: {name!r} is neither an installed model ({', '.join(MODELS)}) nor an "
                              "existing folder or .gguf file")
    return path


def load_lm(cfg: LMConfig, device: str) -> HFModel:
    return HFModel.load(resolve_lm_path(cfg.model), dtype=cfg.dtype, device=device, chat=cfg.chat)


def load_text_task(cfg: LMConfig) -> TextTask:
    """The text task of ``lm.task`` (errors name the ``lm.task`` key)."""
    try:
        return TextTask(TextTaskConfig(**cfg.task))
    except TypeError as err:
        raise ConfigError(f"lm.task: {err}; allowed keys: {list(TextTaskConfig.__dataclass_fields__)}") from None
    except ConfigError as err:
        raise ConfigError(f"lm.task.{err}") from None
