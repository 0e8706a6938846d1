"""The ``lm_eval`` text source: lm-evaluation-harness tasks (local YAML + JSONL under tests/data/lm_eval_tasks)
give tapioca's pools, prompts, targets, choices and demonstrations exactly as the harness defines them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from tapioca import api
from tapioca.config import LMConfig, from_dict, to_dict
from tapioca.errors import ConfigError, DataError
from tapioca.tasks import lm_eval_source as les
from tapioca.tasks.text import ROLES, TextTask, TextTaskConfig
from tapioca.tasks.text_workload import load_text_task

from conftest import assert_close_scaled, tiny_lm

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval==0.4.13 (pip install 'lm-eval==0.4.13')")

ROOT = Path(__file__).resolve().parents[1]
TASKS = "tests/data/lm_eval_tasks"  # the YAMLs' data_files are relative to the repository root
MC = {"id": ["tiny_sums"], "products": ["tiny_products"]}
GEN = {"id": ["tiny_add_gen"], "products": ["tiny_mul_gen"]}
N_DOCS = 80  # evaluation docs per task (tiny_sums also has 8 training docs)


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run from the repository root with a private, offline datasets cache."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield


def text_task(splits: dict[str, list[str]], **fields: Any) -> TextTask:
    return TextTask(TextTaskConfig(source="lm_eval", path=TASKS, splits=splits, **fields))


def harness_task(name: str) -> Any:
    """The harness's own ConfigurableTask of ``name``."""
    return les.load_tasks([name], les.find_manager([name], TASKS), "test")[name]


def all_roles(task: TextTask, dist: str, seed: int = 0) -> dict[str, list]:
    """Every example of every role (asks for more than exist, then reads what the partition holds)."""
    part = task._partition(dist, seed)
    part.take("select", 10**6)
    return part.roles


@pytest.fixture(scope="module")
def mc() -> TextTask:
    return text_task(MC, n_shots=2)


@pytest.fixture(scope="module")
def gen() -> TextTask:
    return text_task(GEN, n_shots=1)


def test_multiple_choice_pools_choices_and_targets(mc: TextTask) -> None:
    assert mc.kind == "multiple_choice" and mc.distributions == ["id", "products"]
    assert (mc.cfg.prompt, mc.cfg.mc_format) == ("harness", "cloze")  # the source's default prompt
    assert from_dict(TextTaskConfig, to_dict(mc.cfg)) == mc.cfg  # a saved (resolved) config loads back unchanged
    for dist, name in (("id", "tiny_sums"), ("products", "tiny_products")):
        harness = harness_task(name)
        docs = list(harness.eval_docs)
        pool = mc.source.examples[dist]
        assert len(pool) == len(docs) == N_DOCS
        assert sum(len(v) for v in all_roles(mc, dist).values()) == N_DOCS
        for ex in pool:
            doc = docs[ex.meta["doc"]]
            assert ex.meta["task"] == name
            assert ex.question == harness.doc_to_text(doc)
            assert list(ex.choices) == harness.doc_to_choice(doc)
            assert ex.choices[ex.answer] == str(doc["a"] + doc["b"] if dist == "id" else doc["a"] * doc["b"])
    sums = harness_task("tiny_sums")
    assert [ex.answer for ex in mc.source.examples["id"]] == [d["label"] for d in sums.eval_docs]  # an index
    # tiny_products' target is the answer's text: mapped to its index among the choices
    assert all(isinstance(ex.answer, int) for ex in mc.source.examples["products"])


def test_roles_are_disjoint_and_demonstrations_come_from_the_harness_training_split(mc: TextTask) -> None:
    train = [harness_task("tiny_sums").doc_to_text(d) for d in harness_task("tiny_sums").training_docs()]
    for seed in (0, 1):
        shots = mc.fewshot(seed)
        assert len(shots) == 2 and all(s.question in train for s in shots)
        assert shots == mc.fewshot(seed)  # deterministic
        used = {s.key for s in shots}
        for dist in mc.distributions:
            roles = all_roles(mc, dist, seed)
            keys = [ex.key for role in ROLES for ex in roles[role]]
            assert len(keys) == len(set(keys)) == N_DOCS  # every doc has exactly one role
            assert not used & set(keys)  # demonstrations never double as evaluation docs
    assert {s.key for s in mc.fewshot(0)} != {s.key for s in mc.fewshot(1)}  # a seed draws them
    assert len(mc.source.shots) == 8


def test_harness_prompts_equal_the_harness_context(mc: TextTask, monkeypatch: pytest.MonkeyPatch) -> None:
    """prompt: harness gives lm-eval's own fewshot_context string (description, demonstrations, doc_to_text)."""
    sums, products = harness_task("tiny_sums"), harness_task("tiny_products")
    train, docs = list(sums.training_docs()), list(sums.eval_docs)
    shots = mc.fewshot(0)
    monkeypatch.setattr(sums.sampler, "sample", lambda n, eval_doc=None, **kw: [train[s.meta["doc"]] for s in shots])
    examples = mc.data("id", "heldout", 0, 5)
    for ex, prompt in zip(examples, mc.prompts(examples, 0)):
        assert prompt == sums.fewshot_context(doc=docs[ex.meta["doc"]], num_fewshot=2)
    zero = text_task(MC, n_shots=0)
    examples = zero.data("products", "heldout", 0, 5)
    assert zero.prompts(examples, 0) == [products.doc_to_text(list(products.eval_docs)[ex.meta["doc"]])
                                         for ex in examples]  # doc_to_text verbatim


def test_generate_until_tasks_are_short_answer(gen: TextTask) -> None:
    assert gen.kind == "short_answer" and gen.source.shots == []  # test-only tasks: no separate few-shot docs
    add, mul = harness_task("tiny_add_gen"), harness_task("tiny_mul_gen")
    for dist, harness in (("id", add), ("products", mul)):
        docs = list(harness.eval_docs)
        assert len(gen.source.examples[dist]) == N_DOCS
        for ex in gen.source.examples[dist]:
            doc = docs[ex.meta["doc"]]
            assert ex.choices is None and ex.question == harness.doc_to_text(doc)
            assert ex.answer == str(doc["a"] + doc["b"] if dist == "id" else doc["a"] * doc["b"])
    first = gen.source.examples["products"][0]
    assert first.meta["shot"].endswith(f"#### {first.answer}\n\n")  # demonstrations keep the whole solution
    shot = gen.fewshot(0)  # from tapioca's fewshot role of the ID pool, disjoint from the other roles
    assert shot == gen.data("id", "fewshot", 0, 1)
    examples = gen.data("products", "heldout", 0, 3)
    assert gen.prompts(examples, 0) == [shot[0].meta["shot"] + ex.question for ex in examples]
    assert shot[0].meta["shot"] == f"{shot[0].question} {shot[0].answer}\n\n"
    assert gen.check(examples[0], f" {examples[0].answer}\n")[1] == 1.0


def test_tapioca_prompts_wrap_doc_to_text() -> None:
    task = text_task(MC, n_shots=1, prompt="tapioca", mc_format="letters")
    assert task.cfg.mc_format == "letters"
    ex = task.data("products", "heldout", 0, 1)[0]
    prompt = task.prompts([ex], 0)[0]
    assert prompt.endswith(f"Question: {ex.question}\nA. {ex.choices[0]}\nB. {ex.choices[1]}\n"
                           f"C. {ex.choices[2]}\nD. {ex.choices[3]}\nAnswer:")
    assert prompt.startswith("Question: Question: What is")  # the task's own "Question:" is wrapped again


def test_a_group_expands_to_its_tasks() -> None:
    task = text_task({"id": ["tiny_arithmetic"]}, n_shots=0)
    assert task.source.tasks == {"id": ["tiny_sums", "tiny_products"]}
    assert len(task.source.examples["id"]) == 2 * N_DOCS


def test_harness_scores_the_same_as_tapioca_on_the_source() -> None:
    """A tiny LM through lm-eval's HFLM on the same tasks (0 shots): the same choice log-likelihoods, so the
    same predictions and probabilities as tapioca's held-out evaluation of the lm_eval source."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = tiny_lm(letter_tokens=False)
    task = text_task(MC, n_shots=0)
    n = 8
    ours = api.evaluate(lm, task, seeds=(0,), n=n, batch_size=4)
    harness = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=8, device="cpu")
    out = simple_evaluate(model=harness, tasks=["tiny_sums", "tiny_products"], num_fewshot=0, log_samples=True,
                          bootstrap_iters=0, task_manager=les.find_manager(["tiny_sums"], TASKS))
    for dist, name in (("id", "tiny_sums"), ("products", "tiny_products")):
        lls = {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in out["samples"][name]}
        examples = task.data(dist, "heldout", 0, n)
        table = np.array([lls[ex.meta["doc"]] for ex in examples])
        labels = np.array([ex.answer for ex in examples])
        np.testing.assert_array_equal(ours.predictions[dist], table.argmax(1))
        probs = torch.softmax(torch.from_numpy(table), 1).numpy()
        assert_close_scaled(ours.values[dist]["prob_correct"], probs[np.arange(n), labels])


def test_evaluate_end_to_end_on_both_kinds(mc: TextTask, gen: TextTask) -> None:
    lm = tiny_lm(letter_tokens=False)
    for task, metric in ((mc, "prob_correct"), (gen, "score")):
        result = api.evaluate(lm, task, seeds=(0, 1), n=8, batch_size=4, max_new_tokens=3)
        assert result.distributions == ["id", "products"]
        for dist in result.distributions:
            assert result.values[dist]["acc"].shape == (16,)
            assert 0.0 <= result.mean(dist, metric) <= 1.0


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^lm\.task\.path: 'no/such/folder' is not a folder"):
        load_text_task(LMConfig(task={"source": "lm_eval", "path": "no/such/folder", "splits": MC}))
    with pytest.raises(ConfigError, match=r"^splits: task 'tiny_sums' is in both 'id' and 'again'"):
        TextTaskConfig(source="lm_eval", path=TASKS, splits={"id": ["tiny_sums"], "again": ["tiny_sums"]})
    with pytest.raises(ConfigError, match=r"^splits\.id: 'tiny_sums' is not allowed; give a list"):
        TextTaskConfig(source="lm_eval", path=TASKS, splits={"id": "tiny_sums"})
    with pytest.raises(ConfigError, match=r"^prompt: 'harness' is not allowed for the jsonl source"):
        TextTaskConfig(source="jsonl", path="x.jsonl", columns={"question": "q", "answer": "a"}, prompt="harness")
    with pytest.raises(ConfigError, match=r"is in both 'id' and 'products' \(through a group or tag\)"):
        text_task({"id": ["tiny_arithmetic"], "products": ["tiny_products"]})
    with pytest.raises(ConfigError, match=r"^splits: the lm-eval tasks mix output types"):
        text_task({"id": ["tiny_sums"], "products": ["tiny_mul_gen"]})
    with pytest.raises(DataError, match=r"^n_shots: 9 demonstrations asked, but the ID tasks' few-shot docs hold 8"):
        text_task(MC, n_shots=9).fewshot(0)


def test_unknown_task_name_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown name is looked up in the include path, then among lm-eval's own tasks (their index takes
    seconds to build, so here it is the include path's alone; the slow test below uses the real one)."""
    local = les.task_manager(str(ROOT / TASKS), False)
    monkeypatch.setattr(les, "task_manager", lambda path, defaults: local)
    with pytest.raises(ConfigError, match=r"^splits: unknown lm-eval task, group or tag 'tiny_sum' \(looked in "
                                          r"'tests/data/lm_eval_tasks' or among lm-eval's own tasks.*did you mean "
                                          r"'tiny_sums'") as err:
        text_task({"id": ["tiny_sum"]})
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_unknown_task_name_with_lm_evals_own_index() -> None:
    with pytest.raises(ConfigError, match=r"unknown lm-eval task, group or tag 'tiny_sums_nope'"):
        text_task({"id": ["tiny_sums_nope"]})
    manager = les.find_manager(["tiny_sums", "mmlu_stem"], TASKS)  # local and lm-eval's own names together
    assert "mmlu_stem" in manager.all_groups and "tiny_sums" in manager.all_tasks


def test_the_guides_jsonl_file_holds_the_same_questions(mc: TextTask) -> None:
    """docs/own-model.md runs the same data as a JSONL task: same choices and answers, one row per document."""
    table = TextTask(TextTaskConfig(source="jsonl", path=f"{TASKS}/arithmetic_mc.jsonl", mc_format="cloze",
                                    columns={"question": "question", "choices": "choices", "answer": "answer",
                                             "split": "split"}, splits={"id": ["sums"], "products": ["products"]}))
    for dist in mc.distributions:
        assert ([(ex.choices, ex.answer) for ex in table.source.examples[dist]]
                == [(ex.choices, ex.answer) for ex in mc.source.examples[dist]])
