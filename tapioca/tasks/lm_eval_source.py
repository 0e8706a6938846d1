"""lm-evaluation-harness tasks as a text source: the harness's own documents, prompt, target and choices.

Configure it in ``lm.task`` like the other sources (``splits`` maps each distribution to what forms it)::

    lm:
      task:
        source: lm_eval
        path: tests/data/lm_eval_tasks   # include path: a folder of your own lm-eval YAML tasks (optional)
        splits:                          # lm-eval task, group or tag names; a group or tag is all its subtasks
          id: [tiny_sums]
          products: [tiny_products]
        prompt: harness                  # the default here: the harness's prompt; "tapioca": Question: … Answer:
        n_shots: 2

Names are looked up in ``path`` first, then among lm-eval's own tasks (``mmlu_stem``, ``arc_easy``, …; those
read their Hugging Face dataset, which must already be in your cache: set ``HF_HUB_OFFLINE=1`` to be sure
nothing is downloaded). The default splits are MMLU's subject groups as the harness defines them
(:data:`LM_EVAL_SPLITS`). Every task of one config must have the same ``output_type``: ``multiple_choice``
(scored by choice log-likelihood) or ``generate_until`` (short answer: greedy generation, checked by tapioca's
checker, :func:`~tapioca.tasks.text_sources.check_answer`, not by the harness's filters and metrics).

What is taken from the harness, per document of a task's evaluation split (``test_split``, else
``validation_split``; the harness's ``eval_docs``), which tapioca partitions into its select / held-out /
reference roles:

* ``question``: ``doc_to_text(doc)`` verbatim (multiple choice: plus the part of ``target_delimiter`` before
  its final space, so that prompt + ``" <choice>"`` is the harness's context + continuation);
* ``choices``: ``doc_to_choice(doc)``; ``answer``: ``doc_to_target(doc)``, an index or a choice's text;
* short answer: ``answer`` is ``doc_to_target(doc)`` (the part after ``####`` when it has one);
* the task's ``description`` and, for demonstrations, its ``fewshot_config`` (doc_to_text/target/choice,
  target and few-shot delimiters) as the harness renders them.

Prompts (``prompt: harness``, the default): ``header`` + the example's task ``description`` + the
demonstrations (each ``question + target_delimiter + answer + fewshot_delimiter``) + ``doc_to_text(doc)``:
the harness's ``fewshot_context`` string. ``prompt: tapioca`` wraps ``doc_to_text(doc)`` in tapioca's
``Question: …\\nAnswer:`` format instead (no description; the choices listed when ``mc_format: letters``),
which doubles the wrapping of tasks whose ``doc_to_text`` already ends in ``Answer:``. With ``prompt:
harness`` multiple choice is always scored as the harness does, on ``" <choice text>"`` (``mc_format`` is
``cloze``).

Demonstrations come from the ID tasks only (as for every text source), ``n_shots`` of them (the task's own
``num_fewshot`` is not read): from the harness's few-shot docs (``fewshot_split``, else the training or
validation split), less any document that is also an evaluation document; a seed draws them (the
``first_n`` sampler, MMLU's: the first ones). A task whose few-shot docs are its evaluation split gets them
from tapioca's ``fewshot`` role of the ID split instead, disjoint from the other roles. Not supported (a
one-line error): tasks with several inputs per document (Winogrande), several targets, a ``gen_prefix``,
and output types other than the two above.
"""

from __future__ import annotations

import difflib
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tapioca.errors import ConfigError, DataError
from tapioca.tasks.text_sources import TableSource, TextExample, stable_hash

LM_EVAL_SPLITS: dict[str, list[str]] = {  # the harness's MMLU subject groups, as tapioca's mmlu source splits them
    "id": ["mmlu_stem"], "humanities": ["mmlu_humanities"], "social_sciences": ["mmlu_social_sciences"],
}
KINDS = {"multiple_choice": "multiple_choice", "generate_until": "short_answer"}  # harness output_type -> kind
PROMPTS = ("harness", "tapioca")


# ---------------------------------------------------------------------------------------------------------
# Config checks (no lm-eval import, no file read)


def check_splits(splits: Mapping[str, Any], path: str | None) -> None:
    """Cheap checks of ``splits`` (lists of task names, none in two distributions) and of the include ``path``."""
    owner: dict[str, str] = {}
    for dist, names in splits.items():
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise ConfigError(f"splits.{dist}: {names!r} is not allowed; give a list of lm-eval task, group or "
                              f"tag names, e.g. [{dist}_task]")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"splits.{dist}: {name!r} is not a task name; give lm-eval task names as strings")
            if name in owner:
                raise ConfigError(f"splits: task {name!r} is in both {owner[name]!r} and {dist!r}; ID and shifts "
                                  "must not share tasks")
            owner[name] = dist
    if path is not None and not Path(path).is_dir():
        raise ConfigError(f"path: {str(path)!r} is not a folder; give the folder holding your lm-eval YAML tasks "
                          "(the harness's include_path), or remove path: to use lm-eval's own tasks only")


# ---------------------------------------------------------------------------------------------------------
# Finding and loading tasks


def import_lm_eval() -> Any:
    """The ``lm_eval`` package, or a ConfigError saying how to install it."""
    try:
        import lm_eval.tasks
    except ImportError:
        raise ConfigError("the lm_eval source needs lm-evaluation-harness: pip install 'lm-eval==0.4.13'") from None
    return lm_eval


@lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """An lm-eval ``TaskManager`` (cached: indexing lm-eval's own tasks takes seconds)."""
    return import_lm_eval().tasks.TaskManager(include_path=include_path, include_defaults=include_defaults)


def find_manager(names: Iterable[str], include_path: str | None) -> Any:
    """A TaskManager that knows every name: the include path's alone when it suffices, else with lm-eval's own
    tasks too. An unknown name raises ConfigError with the closest known names."""
    names = list(names)
    folder = str(Path(include_path).resolve()) if include_path is not None else None
    if folder is not None:
        local = task_manager(folder, False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = task_manager(folder, True)
    for name in names:
        if name not in manager.all_tasks:
            raise ConfigError(_unknown(name, manager.all_tasks, include_path))
    return manager


def _unknown(name: str, known: Sequence[str], include_path: str | None) -> str:
    where = f"in {include_path!r} or " if include_path else ""
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}" if close else ""
    return (f"splits: unknown lm-eval task, group or tag {name!r} (looked {where}among lm-eval's own tasks; a YAML "
            f"file that does not parse is skipped){hint}; `lm-eval ls tasks --include_path DIR` lists them all")


def load_tasks(names: list[str], manager: Any, where: str) -> dict[str, Any]:
    """Leaf tasks (name -> ConfigurableTask) of ``names``; groups and tags expand to their subtasks."""
    try:
        return dict(manager.load(names)["tasks"])
    except Exception as err:  # the harness and datasets raise many kinds (missing file, offline, bad YAML)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"{where}: lm-eval could not load {names}: {type(err).__name__}: {first}; check the "
                        "task's dataset_path/data_files (relative paths are relative to where you run tapioca) "
                        "and, for hub datasets, that they are in your Hugging Face cache") from err


# ---------------------------------------------------------------------------------------------------------
# Harness documents -> TextExample


def output_kind(task: Any, name: str) -> str:
    """tapioca's kind of a harness task; unsupported tasks raise ConfigError."""
    cfg = task.config
    if cfg.output_type not in KINDS:
        raise ConfigError(f"splits: lm-eval task {name!r} has output_type {cfg.output_type!r}; the lm_eval source "
                          f"takes {list(KINDS)}")
    if cfg.gen_prefix or task.fewshot_cfg.gen_prefix:
        raise ConfigError(f"splits: lm-eval task {name!r} sets gen_prefix, which the lm_eval source does not support")
    if getattr(task, "multiple_input", 0):
        raise ConfigError(f"splits: lm-eval task {name!r} has several inputs per document (doc_to_text gives an "
                          "index), which the lm_eval source does not support")
    return KINDS[cfg.output_type]


def answer_index(target: Any, choices: Sequence[str], where: str) -> int:
    """The correct choice from ``doc_to_target``: an index, or the text of a choice."""
    if isinstance(target, int) and not isinstance(target, bool):
        if 0 <= target < len(choices):
            return target
    elif isinstance(target, str) and target in choices:
        return list(choices).index(target)
    raise DataError(f"{where}: doc_to_target gave {target!r}, which is neither an index 0..{len(choices) - 1} nor "
                    f"one of the choices {list(choices)}")


def short_answer(target: Any) -> str:
    """The answer tapioca checks: the target text, or its part after ``####`` (GSM8K style)."""
    text = str(target)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def split_delimiter(delimiter: str, texts: Sequence[str], where: str) -> tuple[str, list[str]]:
    """(prompt suffix, texts) such that suffix + ``" " + text`` equals the harness's ``delimiter + text``: tapioca
    scores continuations that start with one space."""
    if delimiter.endswith(" "):
        return delimiter[:-1], list(texts)
    if delimiter == "" and all(t.startswith(" ") for t in texts):
        return "", [t[1:] for t in texts]
    raise DataError(f"{where}: target_delimiter {delimiter!r} before {list(texts)[:3]} cannot be scored as "
                    "tapioca's ' <choice>'; set target_delimiter: ' ' in the task's YAML")


def shot_text(task: Any, doc: Mapping[str, Any]) -> str:
    """``doc`` as one harness demonstration: text, target delimiter, answer, few-shot delimiter (the harness's
    ``build_qa_turn`` with the task's ``fewshot_config``)."""
    fs = task.fewshot_cfg
    q = task.doc_to_text(doc, fs.doc_to_text)
    c = task.doc_to_choice(doc, fs.doc_to_choice) if fs.doc_to_choice else None
    a = task.doc_to_target(doc, fs.doc_to_target)
    answer = c[a] if (c and isinstance(a, int)) else a[0] if isinstance(a, list) else a
    return f"{q}{fs.target_delimiter}{answer}{fs.fewshot_delimiter}"


def doc_example(task: Any, name: str, doc: Mapping[str, Any], index: int, harness: bool) -> TextExample:
    """One harness document as a :class:`TextExample` (meta: task, doc index, description, demonstration text)."""
    where = f"lm-eval task {name!r}, document {index}"
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if not isinstance(text, str):
        raise DataError(f"{where}: doc_to_text gave {type(text).__name__}, not text")
    if isinstance(target, list):
        raise DataError(f"{where}: doc_to_target gave several targets {target[:3]}; the lm_eval source takes one")
    meta = {"task": name, "doc": index, "description": task.resolve_field(doc, task.config.description) or "",
            "shot": shot_text(task, doc)}
    if task.config.output_type == "generate_until":
        return TextExample(text, short_answer(target), None, meta)
    raw = [str(c) for c in task.doc_to_choice(doc)]
    answer = answer_index(target, raw, where)
    if not harness:
        return TextExample(text, answer, tuple(c.strip() for c in raw), meta)
    suffix, choices = split_delimiter(task.config.target_delimiter, raw, where)
    return TextExample(text + suffix, answer, tuple(choices), meta)


def task_docs(task: Any) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(evaluation docs, few-shot docs) of a harness task: test else validation split; the harness's
    ``fewshot_docs`` (empty when it has none)."""
    fewshot = task.fewshot_docs()
    return list(task.eval_docs), list(fewshot) if fewshot is not None else []


# ---------------------------------------------------------------------------------------------------------
# The source


class LMEvalSource(TableSource):
    """Evaluation documents of harness tasks per distribution (a fixed pool, shuffled per seed like any
    table), the ID tasks' few-shot documents as demonstrations, and the harness's prompt format."""

    def __init__(self, examples: Mapping[str, list[TextExample]], kind: str, splits: Mapping[str, Any],
                 shots: list[TextExample], first_n: bool, harness: bool, tasks: Mapping[str, list[str]]) -> None:
        super().__init__(examples, kind, splits)
        self.shots, self.first_n, self.harness = list(shots), first_n, harness
        self.tasks = {d: list(names) for d, names in tasks.items()}  # distribution -> leaf task names

    def demonstrations(self, seed: int, n: int) -> list[TextExample] | None:
        """``n`` of the ID tasks' few-shot docs (the first ``n`` under the ``first_n`` sampler, else drawn by
        ``seed``); None when the harness has none apart from evaluation docs."""
        if not self.shots:
            return None
        if n > len(self.shots):
            raise DataError(f"n_shots: {n} demonstrations asked, but the ID tasks' few-shot docs hold "
                            f"{len(self.shots)}; lower n_shots")
        if self.first_n:
            return self.shots[:n]
        order = list(self.shots)
        random.Random(stable_hash(seed, "lm_eval fewshot")).shuffle(order)
        return order[:n]

    def prompts(self, examples: list[TextExample], shots: list[TextExample], header: str) -> list[str] | None:
        """The harness's context: header, the example's task description, demonstrations, ``doc_to_text``."""
        if not self.harness:
            return None
        head = header.strip() + "\n\n" if header.strip() else ""
        demos = "".join(s.meta["shot"] for s in shots)
        return [head + ex.meta["description"] + demos + ex.question for ex in examples]


def lm_eval_source(splits: Mapping[str, list[str]], path: str | None, prompt: str) -> LMEvalSource:
    """Load the harness tasks of every distribution (offline: local files or the Hugging Face cache)."""
    include = str(path) if path is not None else None
    manager = find_manager([n for names in splits.values() for n in names], include)
    harness = prompt == "harness"
    examples: dict[str, list[TextExample]] = {}
    leaves: dict[str, list[str]] = {}
    fewshot: list[TextExample] = []
    kinds: dict[str, str] = {}
    samplers: set[str] = set()
    owner: dict[str, str] = {}
    for dist, names in splits.items():
        tasks = load_tasks(list(names), manager, f"splits.{dist}")
        examples[dist], leaves[dist] = [], list(tasks)
        for name, task in tasks.items():
            if name in owner:
                raise ConfigError(f"splits: lm-eval task {name!r} is in both {owner[name]!r} and {dist!r} (through a "
                                  "group or tag); ID and shifts must not share tasks")
            owner[name], kinds[name] = dist, output_kind(task, name)
            docs, shot_docs = task_docs(task)
            examples[dist] += [doc_example(task, name, doc, i, harness) for i, doc in enumerate(docs)]
            if dist == "id":
                fewshot += [doc_example(task, name, doc, i, harness) for i, doc in enumerate(shot_docs)]
                samplers.add(str(task.fewshot_cfg.sampler))
        if not examples[dist]:
            raise DataError(f"splits.{dist}: the lm-eval tasks {list(tasks)} have no evaluation documents")
    if len(set(kinds.values())) > 1:
        raise ConfigError(f"splits: the lm-eval tasks mix output types ({kinds}); one text task is either "
                          "multiple_choice or generate_until throughout")
    evaluated = {ex.key for pool in examples.values() for ex in pool}
    shots = [ex for ex in fewshot if ex.key not in evaluated]  # a split used both ways is never a demonstration
    return LMEvalSource(examples, next(iter(kinds.values())), splits, shots, samplers == {"first_n"}, harness,
                        leaves)
