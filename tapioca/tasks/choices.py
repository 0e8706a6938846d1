"""Text tasks on Hugging Face causal LMs as batches a search can gate: choice batches, selection scorers.

Multiple choice is scored by log-likelihood. The (prompt, choice) pairs of a split are tokenized once into a
:class:`ChoiceBatch` and reused for every gate configuration. When every continuation is one token (``" A"``
... in the letters format) a row is one prompt and the choice scores are read off the next-token
distribution, one forward pass per example instead of one per choice; otherwise a row is one (prompt, choice)
pair. :class:`ChoiceModel` shows an :class:`~tapioca.models.hf.HFModel` through such batches as a
``BlockModel`` whose ``predictions`` are choice log-likelihoods, so TALE's prefix-reusing rounds
(:class:`tapioca.pruning.searches.PrefixRounds`) and the state-based baselines work unchanged::

    lm = HFModel.load(folder)
    task = TextTask(TextTaskConfig(source="mmlu"))
    result = tapioca.prune(lm, task, "tale", protocol="target", target="humanities", max_drop=2, n_select=64)
    full, pruned = (tapioca.evaluate(lm, task, g, n=100) for g in (None, result.gates))

Short answer is scored by greedy generation (``metric="acc"``) or by the log-likelihood of the gold answer
(``metric="loglik"``); multiple choice by generation too when the task's ``answer_rule`` is ``first_letter``
(TALE's protocol). Generation-scored prompts are a :class:`GenerationBatch`: with one new token the answer is
the argmax of the next-token logits, read off the same packed, prefix-reusing pass as log-likelihoods
(``HFModel.run``'s ``next_token``); with several, :func:`tapioca.models.decoding.greedy_decode` decodes all
rows at once with the KV cache, and TALE's candidates resume the prompt from the recorded pass below their
block (:meth:`ChoiceModel.recorded_run` / :meth:`ChoiceModel.resumed_run`). Either way the generated ids are
greedy generation's, scored by the task's answer rule (:mod:`tapioca.tasks.answers`).

``prune(..., workers=N)`` scores TALE candidates on N Ray workers (log-likelihood metrics): each worker
loads the model again from its folder (:class:`~tapioca.pruning.parallel.HFReplica`) and wraps it in a
:class:`ChoiceModel`, as the search does on the driver (:class:`ChoiceReplica`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from tapioca.errors import ConfigError, DataError
from tapioca.models.base import BlockModel, RunOutput, run_in_chunks
from tapioca.models.decoding import greedy_decode
from tapioca.models.gates import Gates, Recorded
from tapioca.models.hf import HFModel, TokenBatch, common_prefix
from tapioca.pruning.parallel import HFReplica
from tapioca.pruning.searches import (
    PredictionScorer, PruneResult, Scorer, plain_recorded_run, plain_resumed_run,
)
from tapioca.tasks.answers import get_rule, rule_for
from tapioca.tasks.text import TextExample, TextTask, continuations

__all__ = [
    "SELECTION_METRICS", "ChoiceBatch", "ChoiceModel", "ChoiceReplica", "GenerationBatch", "LMSelection",
    "choice_batch", "choice_metrics", "choice_table", "generation_batch", "generation_scores", "lm_selection",
    "prompt_batch", "prompt_loglik_scorer", "prune_lm", "task_choices",
]

# task kind -> selection metrics it supports (all: higher is better)
SELECTION_METRICS = {
    "multiple_choice": ("acc", "prob", "loglik"),  # correct top choice, p(correct), log p(correct) over choices
    "short_answer": ("acc", "loglik"),  # greedy generation is correct, log-likelihood of the gold answer
}


# ---------------------------------------------------------------------------------------------------------
# Choice batches


@dataclass
class ChoiceBatch:
    """Continuations of N prompts (C choices at most), tokenized once, as R rows sorted longest first.

    tokens: the rows. example (R,): the example of each row. choice (R,): the choice a row scores, or -1 in
    token mode, where a row is a whole prompt and choice_ids (R, C) holds each choice's single token (-1: the
    example has fewer choices). labels (N,): correct choice. divisor (N, C) float64: what each choice's
    log-likelihood is divided by (1, or its UTF-8 length when length-normalised).
    """

    tokens: TokenBatch
    example: Tensor
    choice: Tensor
    choice_ids: Tensor | None
    labels: Tensor
    divisor: Tensor

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_examples(self) -> int:
        return len(self.labels)

    @property
    def token_mode(self) -> bool:
        return self.choice_ids is not None

    def spans(self, chunk: int) -> list[tuple[int, int]]:
        """Row ranges that bound padding (:meth:`TokenBatch.spans`)."""
        return self.tokens.spans(chunk)

    def slice(self, i: int, j: int) -> "ChoiceBatch":
        """Rows ``i:j`` (trimmed to their longest); the per-example fields are shared."""
        ids = self.choice_ids[i:j] if self.choice_ids is not None else None
        return ChoiceBatch(self.tokens.slice(i, j), self.example[i:j], self.choice[i:j], ids, self.labels,
                           self.divisor)


@dataclass
class GenerationBatch:
    """N prompts scored by greedy generation, tokenized once as N rows sorted longest first.

    tokens: the prompts (a prompt-only :class:`TokenBatch`). example (N,): each row's example. max_new_tokens:
    tokens to generate. rule: the answer rule's name (:mod:`tapioca.tasks.answers`), whose ``done`` lets a row
    stop once its answer cannot change.
    """

    tokens: TokenBatch
    example: Tensor
    max_new_tokens: int
    rule: str = "checker"

    def __len__(self) -> int:
        return len(self.tokens)

    def spans(self, chunk: int) -> list[tuple[int, int]]:
        """Row ranges that bound padding (:meth:`TokenBatch.spans`)."""
        return self.tokens.spans(chunk)

    def slice(self, i: int, j: int) -> "GenerationBatch":
        """Rows ``i:j`` (trimmed to their longest)."""
        return GenerationBatch(self.tokens.slice(i, j), self.example[i:j], self.max_new_tokens, self.rule)

    @property
    def decodes(self) -> bool:
        """More than one new token: a run decodes step by step (else one forward pass gives the answer)."""
        return self.max_new_tokens > 1


def generation_batch(model: HFModel, prompts: Sequence[str], max_new_tokens: int,
                     rule: str = "checker") -> GenerationBatch:
    """``prompts`` tokenized as greedy generation reads them (chat template, special tokens), rows sorted
    longest first; each prompt plus ``max_new_tokens`` must fit the model's window."""
    window = model.window - max_new_tokens if model.window else None
    tokens = model.tokenize(prompts, max_length=window)
    order = torch.argsort(tokens.attention_mask.sum(1), descending=True, stable=True)
    return GenerationBatch(tokens.take(order), order, max_new_tokens, rule)


def generated_text(tokenizer: Any, ids: Sequence[int], eos: Sequence[int]) -> str:
    """Generated ids (-1: none) decoded as :meth:`HFModel.generate` decodes them: up to the first EOS."""
    cut = next((k for k, t in enumerate(ids) if t < 0 or t in eos), len(ids))
    return tokenizer.decode(list(ids[:cut]), skip_special_tokens=True)


def generation_scores(predictions: Tensor, batch: GenerationBatch, *, examples: Sequence[TextExample],
                      tokenizer: Any, eos: Sequence[int], rule: str) -> Tensor:
    """Selection scores of generated ids ``predictions`` (R, S) (rows of ``batch``, any slice of it): 1.0 where the
    answer rule scores the decoded text correct (score 1), else 0.0, (R,) float64 in example order."""
    check = get_rule(rule).check
    rows = batch.example.tolist()
    texts = [generated_text(tokenizer, ids, eos) for ids in predictions.tolist()]
    scores = torch.tensor([float(check(examples[e], text)[1] >= 1.0) for e, text in zip(rows, texts)],
                          dtype=torch.float64)
    return scores[torch.argsort(batch.example)]


def _single_token_ids(model: HFModel, texts: Sequence[str]) -> dict[str, int] | None:
    """Token id of each continuation if every one is exactly one token (encoded as HFModel.tokenize does)."""
    unique = sorted(set(texts))
    encoded = model.tokenizer(unique, add_special_tokens=False)["input_ids"]
    if any(len(ids) != 1 for ids in encoded):
        return None
    return {text: ids[0] for text, ids in zip(unique, encoded)}


def choice_batch(
    model: HFModel, prompts: Sequence[str], conts: Sequence[Sequence[str]], labels: Sequence[int],
    length_normalize: bool = False,
) -> ChoiceBatch:
    """Tokenize prompt i with each continuation in ``conts[i]`` once; ``labels[i]`` indexes the correct one.

    ``length_normalize`` divides each choice's log-likelihood by its UTF-8 byte length (lm-eval's acc_norm).
    """
    n, width = len(prompts), max(len(c) for c in conts)
    single = _single_token_ids(model, [c for cs in conts for c in cs])
    if single is not None:
        window = model.window - 1 if model.window else None  # room for the one continuation token
        tokens = model.tokenize(prompts, max_length=window)
        example, choice = torch.arange(n), torch.full((n,), -1)
        choice_ids = torch.full((n, width), -1, dtype=torch.long)
        for i, cs in enumerate(conts):
            choice_ids[i, :len(cs)] = torch.tensor([single[c] for c in cs])
    else:
        tokens = model.tokenize([p for p, cs in zip(prompts, conts) for _ in cs], [c for cs in conts for c in cs])
        example = torch.repeat_interleave(torch.arange(n), torch.tensor([len(cs) for cs in conts]))
        choice, choice_ids = torch.cat([torch.arange(len(cs)) for cs in conts]), None
    divisor = torch.ones((n, width), dtype=torch.float64)
    if length_normalize:
        for i, cs in enumerate(conts):
            divisor[i, :len(cs)] = torch.tensor([max(len(c.encode()), 1) for c in cs], dtype=torch.float64)
    order = torch.argsort(tokens.attention_mask.sum(1), descending=True, stable=True)
    return ChoiceBatch(tokens.take(order), example[order], choice[order],
                       choice_ids[order] if choice_ids is not None else None,
                       torch.tensor([int(y) for y in labels]), divisor)


def task_choices(examples: Sequence[TextExample], mc_format: str) -> tuple[list[list[str]], list[int]]:
    """(continuations per example, correct index): the choices of multiple choice, or the gold answer alone
    (``" <answer>"``, as in the few-shot demonstrations) for short answer."""
    if all(ex.choices is not None for ex in examples):
        return [continuations(ex, mc_format) for ex in examples], [int(ex.answer) for ex in examples]
    if any(ex.choices is not None for ex in examples):
        raise ValueError("examples mix multiple-choice and short-answer questions")
    return [[f" {ex.answer}"] for ex in examples], [0] * len(examples)


class ChoiceModel:
    """An :class:`HFModel` run on :class:`ChoiceBatch` es: a ``BlockModel`` whose predictions are choice
    log-likelihoods, (R, C) in token mode or (R,) per (prompt, choice) row, and whose states (L + 1, B, D)
    at the last prompt token are taken once per example (the first choice's row). On a
    :class:`GenerationBatch` the predictions are greedy token ids (R, S), and its runs record and resume
    themselves (:meth:`recorded_run`, :meth:`resumed_run`) for TALE's prefix-reusing rounds."""

    def __init__(self, lm: HFModel) -> None:
        self.lm = lm

    @property
    def blocks(self) -> nn.ModuleList:
        return self.lm.blocks

    @property
    def n_blocks(self) -> int:
        return self.lm.n_blocks

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def block_parameter_count(self, index: int) -> int:
        return self.lm.block_parameter_count(index)

    def run(self, batch: ChoiceBatch | GenerationBatch, gates: Gates | None = None, capture: bool = False) -> RunOutput:
        if isinstance(batch, GenerationBatch):
            return self._generate(batch, gates, capture)
        out = self.lm.run(batch.tokens, gates, capture)
        if batch.choice_ids is None:
            states = out.states[:, (batch.choice == 0).to(out.states.device)] if capture else None
            return RunOutput(out.predictions, states)
        ids = batch.choice_ids.to(out.query_logprobs.device)
        picked = out.query_logprobs.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, -math.inf)
        return RunOutput(picked, out.states)

    def _generate(self, batch: GenerationBatch, gates: Gates | None, capture: bool) -> RunOutput:
        """Greedy ids (R, S) of a :class:`GenerationBatch`; states (L + 1, R, D) at the last prompt token. One
        new token: the argmax of one (packed, prefix-sharing) pass's next-token logits; more: greedy decoding
        (states from a separate pass when asked for)."""
        if not batch.decodes:
            out = self.lm.run(batch.tokens, gates, capture)
            return RunOutput(out.next_token[:, None].cpu(), out.states)
        done = get_rule(batch.rule).done
        tokens = greedy_decode(self.lm, batch.tokens, gates, batch.max_new_tokens, done=done).tokens
        return RunOutput(tokens, self.lm.run(batch.tokens, gates, capture=True).states if capture else None)

    def recorded_run(self, batch: Any, gates: Gates) -> tuple[RunOutput, list[Recorded]]:
        """``run(batch, gates)`` with a record that :meth:`resumed_run` can resume from: every block's input
        (one forward pass), or every block's prompt input and KV-cache entries (greedy decoding)."""
        if not (isinstance(batch, GenerationBatch) and batch.decodes):
            return plain_recorded_run(self, batch, gates)
        decoded = greedy_decode(self.lm, batch.tokens, gates, batch.max_new_tokens, record=True,
                                done=get_rule(batch.rule).done)
        return RunOutput(decoded.tokens), decoded.record  # type: ignore[return-value]

    def resumed_run(self, batch: Any, inputs: list[Recorded], start: int, gates: Gates,
                    record: bool = True) -> tuple[RunOutput, list[Recorded]]:
        """``run(batch, gates)`` resumed at block ``start`` from the record of a run that agrees with ``gates``
        below it, and (with ``record``) its own record (see :meth:`recorded_run`)."""
        if not (isinstance(batch, GenerationBatch) and batch.decodes):
            return plain_resumed_run(self, batch, inputs, start, gates, record)
        decoded = greedy_decode(self.lm, batch.tokens, gates, batch.max_new_tokens, record=record,
                                done=get_rule(batch.rule).done, inputs=inputs, start=start)  # type: ignore[arg-type]
        return RunOutput(decoded.tokens), decoded.record or []  # type: ignore[return-value]


@dataclass(frozen=True)
class ChoiceReplica:
    """A picklable recipe for the model an LM search runs on: ``ChoiceModel(lm(device))``. A Ray worker
    built from it scores ``ChoiceBatch`` es and ``GenerationBatch`` es exactly as the driver's
    :class:`ChoiceModel` does."""

    lm: HFReplica

    def __call__(self, device: torch.device) -> ChoiceModel:
        return ChoiceModel(self.lm(device))


def choice_table(predictions: Tensor, batch: ChoiceBatch) -> Tensor:
    """Run predictions ((R, C) or (R,)) -> (N, C) float64 choice log-likelihoods in example order, divided by
    ``batch.divisor``; missing choices are -inf."""
    preds = predictions.detach().double().cpu()
    if torch.isnan(preds).any() or torch.isposinf(preds).any():
        raise ValueError("the model gave NaN or +inf log-likelihoods")
    table = torch.full(batch.divisor.shape, -math.inf, dtype=torch.float64)
    if batch.token_mode:
        table[batch.example] = preds
    else:
        table[batch.example, batch.choice] = preds
    return table / batch.divisor


def choice_metrics(table: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per-example metrics (N,) float64 of a (N, C) log-likelihood table: acc (top choice correct; ties ->
    first), prob_correct, log_prob_correct (softmax over choices), confidence (top-choice probability) and
    brier (sum over choices of (p - onehot)^2)."""
    if torch.isinf(table.max(1).values).any():
        raise ValueError("every choice of some example has log-likelihood -inf; its probabilities are undefined")
    rows = torch.arange(len(labels))
    logp = table.log_softmax(1)
    probs = logp.exp()
    onehot = torch.zeros_like(probs)
    onehot[rows, labels] = 1.0
    return {"acc": (probs.argmax(1) == labels).double(), "prob_correct": probs[rows, labels],
            "log_prob_correct": logp[rows, labels], "confidence": probs.max(1).values,
            "brier": ((probs - onehot) ** 2).sum(1)}


def _choice_scores(predictions: Tensor, batch: ChoiceBatch, metric: str) -> Tensor:
    """Selection scores (N,) of multiple choice: ``acc``, ``prob`` or ``loglik`` of the correct choice."""
    key = {"acc": "acc", "prob": "prob_correct", "loglik": "log_prob_correct"}[metric]
    return choice_metrics(choice_table(predictions, batch), batch.labels)[key]


def _answer_loglik(predictions: Tensor, batch: ChoiceBatch) -> Tensor:
    """Selection scores (N,) of short answer: the log-likelihood of the gold answer."""
    return choice_table(predictions, batch)[:, 0]


# ---------------------------------------------------------------------------------------------------------
# Selection


@dataclass
class LMSelection:
    """What a search needs from one split: a ``BlockModel``, its batch, a ``scorer`` (gates -> per-example
    scores (N,), higher is better) and, for log-likelihood scoring, ``score_predictions`` (prefix reuse)."""

    model: BlockModel
    batch: Any
    scorer: Scorer
    score_predictions: PredictionScorer | None
    examples: list[TextExample]
    prompts: list[str]


def check_metric(kind: str, metric: str) -> None:
    allowed = SELECTION_METRICS[kind]
    if metric not in allowed:
        raise ConfigError(f"pruning.metric: {metric!r} is not a selection metric for {kind.replace('_', ' ')} "
                          f"tasks; allowed: {list(allowed)}")


def lm_selection(
    model: HFModel, task: TextTask, distribution: str, role: str = "select", seed: int = 0, n: int = 64,
    metric: str = "acc", *, chunk: int = 16, length_normalize: bool = False, max_new_tokens: int = 32,
) -> LMSelection:
    """Scorer for ``n`` examples of ``role`` of ``distribution`` (seed ``seed``), tokenized once.

    Multiple choice: ``acc`` (1 if the top choice is correct; with the task's ``answer_rule`` "first_letter":
    1 if greedy generation of ``max_new_tokens`` names the correct letter), ``prob`` / ``loglik``
    (probability / log-probability of the correct choice, softmax over choices). Short answer: ``acc`` (greedy
    generation of ``max_new_tokens``, scored by the task's answer rule) or ``loglik`` (log-likelihood of the
    gold answer). Every scorer has ``score_predictions``, so TALE reuses the prefix of every recorded pass.
    """
    check_metric(task.kind, metric)
    rule = getattr(task.cfg, "answer_rule", "checker")
    if rule != "checker":
        rule_for(rule, task.kind)
    examples = task.data(distribution, role, seed, n)
    prompts = task.prompts(examples, seed)
    wrapped = ChoiceModel(model)
    batch: ChoiceBatch | GenerationBatch
    if metric == "acc" and (task.kind == "short_answer" or rule == "first_letter"):
        batch = generation_batch(model, prompts, max_new_tokens, rule)
        score_predictions: PredictionScorer = partial(generation_scores, examples=examples, tokenizer=model.tokenizer,
                                                      eos=model.eos_ids(), rule=rule)
    else:
        conts, labels = task_choices(examples, task.cfg.mc_format)
        batch = choice_batch(model, prompts, conts, labels, length_normalize and task.kind == "multiple_choice")
        score_predictions = (partial(_choice_scores, metric=metric) if task.kind == "multiple_choice"
                             else _answer_loglik)

    def scorer(gates: Gates) -> Tensor:
        return score_predictions(run_in_chunks(wrapped, batch, gates, capture=False, chunk=chunk).predictions, batch)

    return LMSelection(wrapped, batch, scorer, score_predictions, examples, prompts)


# ---------------------------------------------------------------------------------------------------------
# Pruning


def prune_lm(
    model: HFModel,
    task: TextTask,
    search: str = "tale",
    protocol: str = "target",
    target: str = "id",
    *,
    epsilon: float = 0.08,
    max_drop: int | None = None,
    n_remove: int = 1,
    choose: str = "best",
    metric: str = "acc",
    seed: int = 0,
    n_select: int = 64,
    batch_size: int = 16,
    prefix_cache: bool = True,
    length_normalize: bool = False,
    max_new_tokens: int = 32,
    progress: bool = True,
    cache_path: str | Path | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    ray_options: dict[str, Any] | None = None,
) -> PruneResult:
    """:func:`tapioca.api.prune` on a text workload of ``model`` and ``task`` with these sizes and selection
    ``metric`` (multiple choice: acc, prob, loglik; short answer: acc by greedy generation, or loglik of the
    gold answer). ``batch_size`` is rows per forward pass (and prompts per generate call)."""
    from tapioca.api import prune, workload  # the API sits above the tasks

    wl = workload(model, task, metric=metric, n_select=n_select, batch_size=batch_size,
                  length_normalize=length_normalize, max_new_tokens=max_new_tokens)
    return prune(wl, None, search, protocol, target, epsilon=epsilon, max_drop=max_drop, n_remove=n_remove,
                 choose=choose, seed=seed, prefix_cache=prefix_cache, progress=progress, cache_path=cache_path,
                 workers=workers, ray_address=ray_address, ray_options=ray_options)


# ---------------------------------------------------------------------------------------------------------
# Label-free scoring (SLEB-style searches)


def prompt_batch(model: HFModel, prompts: Sequence[str]) -> tuple[TokenBatch, Tensor]:
    """The prompts' own tokens as targets: a :class:`TokenBatch` whose query is each row's first token after
    the tokens every prompt shares (few-shot demonstrations, which come from ID, not from the distribution
    whose unlabelled text is scored) and whose targets are the tokens after it, rows sorted longest first; and
    the row of each prompt, (N,). Prompts that share nothing are scored from their second token on."""
    tokens = model.tokenize(prompts)
    lengths = tokens.attention_mask.sum(1)
    short = (lengths < 2).nonzero().flatten().tolist()
    if short:
        raise DataError(f"prompts {short} have fewer than 2 tokens; a prompt's log-likelihood needs a token to "
                         "condition on and one to score")
    rows = [ids[:n].tolist() for ids, n in zip(tokens.input_ids, lengths)]
    shared = common_prefix(rows) if len(rows) > 1 else 0
    query = torch.clamp(torch.full((len(tokens),), shared), max=lengths - 2)  # every row keeps one target
    target = (torch.arange(tokens.input_ids.shape[1])[None, :] > query[:, None]) & tokens.attention_mask.bool()
    order = torch.argsort(lengths, descending=True, stable=True)
    batch = TokenBatch(tokens.input_ids, tokens.attention_mask, query, target).take(order)
    return batch, torch.argsort(order)


def prompt_loglik_parts(model: HFModel, prompts: list[str]) -> tuple[TokenBatch, PredictionScorer]:
    """The prompts' own tokens as one batch and ``predictions -> (N,)`` mean log-likelihood per token of each
    prompt (in the batch's row order): what a search resuming from recorded block inputs needs."""
    batch, _ = prompt_batch(model, prompts)
    counts = batch.target_mask.sum(1).double()
    return batch, lambda predictions, b: predictions.double().cpu() / counts


def prompt_loglik_scorer(model: HFModel, prompts: list[str], chunk: int) -> Scorer:
    """Label-free scorer (gates -> (N,) float64, higher is better): the mean log-likelihood per token of each
    prompt text under the gated model, every token after the first scored (no answer is used; SLEB's
    perplexity criterion, as log-perplexity negated). Tokenized once; ``chunk`` rows per pass."""
    batch, rows = prompt_batch(model, prompts)
    counts = batch.target_mask.sum(1).double()

    def scorer(gates: Gates) -> Tensor:
        summed = run_in_chunks(model, batch, gates, capture=False, chunk=chunk).predictions.double().cpu()
        return (summed / counts)[rows]

    return scorer
