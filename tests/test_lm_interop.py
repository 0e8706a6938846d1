"""A tapioca-pruned model is a normal PreTrainedModel: lm-evaluation-harness scores it on a local
multiple-choice task exactly as tapioca does (same prompts, same log-likelihoods, same accuracy and Brier)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tapioca.tasks.choices import ChoiceModel, choice_batch, choice_table, prune_lm, task_choices
from tapioca.analysis.calibration import evaluate_lm
from tapioca.models.base import run_in_chunks
from tapioca.models.hf import HFModel
from tapioca.tasks.text import TextTask

from conftest import PLANTED, assert_close_scaled, mc_task, plant, relabel, tiny_lm

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval==0.4.13 (pip install 'lm-eval==0.4.13')")

TASK = "tapioca_tiny_mc"
N = 12


def write_lm_eval_task(folder: Path, prompts: list[str], conts: list[list[str]], labels: list[int]) -> None:
    """A local lm-eval task: JSONL items (prompt, choices, label) and a YAML that reads them with the json
    builder. lm-eval scores context + " " + choice, so choices are tapioca's continuations minus the space."""
    assert all(c.startswith(" ") for cs in conts for c in cs)
    with open(folder / "items.jsonl", "w") as f:
        for p, cs, y in zip(prompts, conts, labels):
            f.write(json.dumps({"prompt": p, "choices": [c[1:] for c in cs], "label": y}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {folder / 'items.jsonl'}\n"
        f"  cache_dir: {folder / 'hf-cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: prompt\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "target_delimiter: ' '\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: brier_score\n    aggregation: brier_score\n    higher_is_better: false\n"
    )


def run_lm_eval(lm: HFModel, folder: Path) -> tuple[dict, np.ndarray]:
    """lm-eval's results and its per-item choice log-likelihoods (N, C), in item order."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    harness = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=8, device="cpu")
    out = simple_evaluate(model=harness, tasks=[TASK], num_fewshot=0, log_samples=True, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    lls = np.array([[ll for ll, _ in s["filtered_resps"]] for s in samples])
    return out["results"][TASK], lls


@pytest.mark.parametrize("letter_tokens, mc_format", [(True, "letters"), (False, "cloze")])
def test_lm_eval_scores_a_pruned_model_like_tapioca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    letter_tokens: bool, mc_format: str) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = tiny_lm(letter_tokens)
    task: TextTask = relabel(lm, mc_task(mc_format, n_shots=1), {PLANTED: 0.0})
    plant(lm, PLANTED)
    result = prune_lm(lm, task, target="wide", max_drop=1, n_select=8, progress=False)
    assert result.removed == [PLANTED]
    pruned = lm.pruned_copy(result.removed)
    assert pruned.model.config.num_hidden_layers == 3 and len(pruned.blocks) == 3

    examples = task.data("wide", "heldout", 0, N)
    prompts = task.prompts(examples, 0)
    conts, labels = task_choices(examples, mc_format)
    write_lm_eval_task(tmp_path, prompts, conts, labels)
    results, harness_lls = run_lm_eval(pruned, tmp_path)

    batch = choice_batch(pruned, prompts, conts, labels)
    assert batch.token_mode is letter_tokens  # one pass per prompt vs lm-eval's one per (prompt, choice)
    ours = choice_table(run_in_chunks(ChoiceModel(pruned), batch, None, False, 8).predictions, batch).numpy()
    assert_close_scaled(ours, harness_lls)  # lm-eval's own batches, one pass per (prompt, choice)

    heldout = evaluate_lm(pruned, task, None, ["wide"], seeds=[0], n=N)  # the same items, through the task
    gated = evaluate_lm(lm, task, result.gates, ["wide"], seeds=[0], n=N)  # the unpruned model, block skipped
    assert results["acc,none"] == pytest.approx(heldout.mean("wide", "acc"), abs=1e-12)
    assert_close_scaled(results["brier_score,none"], heldout.mean("wide", "brier"))
    np.testing.assert_array_equal(np.argmax(harness_lls, 1), heldout.predictions["wide"])
    assert_close_scaled(gated.values["wide"]["prob_correct"], heldout.values["wide"]["prob_correct"])
    probs = torch.softmax(torch.from_numpy(harness_lls), 1).numpy()
    assert_close_scaled(heldout.values["wide"]["prob_correct"], probs[np.arange(N), labels])
