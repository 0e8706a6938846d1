"""results.json of a tiny testbed study and a tiny-LM study, before and after the pipeline was written once.

``tests/data/golden/results-db3a827-*.json`` were written by tapioca at commit db3a827 (two pipelines, one per
model kind) from the inputs stored beside them: two tiny trained testbed checkpoints and a tiny Llama with a
planted harmful block plus its JSONL task. The one pipeline must give the same results (timings aside) up to
float rounding; the only differences are the ones listed in ``CHANGED``, each made on purpose.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tapioca.config import load_config
from tapioca.study import run_study

from test_lm_study import lm_overrides

pytestmark = pytest.mark.e2e

GOLDEN = Path(__file__).parent / "data" / "golden"
TESTBED = ["model.n_layer=3", "model.n_embd=16", "train.steps=20", "train.warmup_steps=2", "pruning.n_select=32",
           "evaluation.n_heldout=32", "evaluation.n_bootstrap=200", "evaluation.seeds=[0,1]",
           "task.shifts={x_scale_3: {x_scale: 3.0}, degree_4: {degrees: [4]}}", "pruning.epsilon=5.0",
           "pruning.choose=final", "geometry.n_prompts=32", "geometry.alphas=[0.0, 0.5, 1.0]"]
N_BOOTSTRAP = 200
MISSING = object()
# path prefixes whose value may differ from db3a827, and why
DECISIVE = {
    "/claims/C1": "C1 and C2 need evidence (an equivalence bound against the smallest effect of interest, or a "
                  "significant opposite effect) to be refuted; otherwise inconclusive with the detectable effect",
    "/claims/C2": "as C1",
    "/claims/C5": "C5 tests the cause of a held-out gain: without one it is inconclusive, as C7 and C9",
    "/claims/C4": "C4 is decided by a sign test over the (shift, seed) pairs, not by a bare majority of them",
    "/claims/C9": "C9 says why it cannot decide and where weight pruning improved on its own; MDE on its line",
    # issue 33: the run (model × selection draw) is the unit; every claim decides on an interval over replicates
    "/claims": "every claim is decided at the replicate level, on an interval, with thresholds from the config",
    "/claims_in_sample": "as /claims",
    "/paper_pattern": "the pattern sentence follows C1 and C2",
    "/optimism": "the optimism interval is over replicates; the null replays the whole greedy search",
    "p_holm": "Holm over the replicate-level p-values (the example-level numbers are compared under examples)",
    "improved": "as p_holm",
    "worse": "as p_holm",
}
CHANGED = {
    "lm": {**DECISIVE,
        "/model/name": "the model folder's path is the test's temporary folder",
        "/claims/C5": "norm matching at the last prompt token now runs on text (C5 had only its sweep half)",
        "/interventions/wide/norm_matching": "norm matching at the last prompt token now runs on text",
        "shrinkage_slope": "a regression slope means nothing for multiple-choice answers; no longer reported",
    },
    "testbed": DECISIVE,
}


def differences(before, after, path: str, changed: dict[str, str]) -> list[str]:
    """Paths where ``after`` lacks or changes a value of ``before`` (floats: relative 1e-4, plus the bootstrap's
    resolution for its p-values and CIs), outside the ``changed`` prefixes; keys new in ``after`` are fine."""
    if any(path.startswith(p) or path.endswith(p) for p in changed):
        return []
    if isinstance(before, dict):
        if not isinstance(after, dict):
            return [path]
        return [d for k in before for d in differences(before[k], after.get(k, MISSING), f"{path}/{k}", changed)]
    if isinstance(before, list):
        if not isinstance(after, list) or len(before) != len(after):
            return [path]
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in differences(b, a, f"{path}[{i}]", changed)]
    if after is MISSING:
        return [f"{path} (missing)"]
    if isinstance(before, float) and isinstance(after, (int, float)):
        if math.isnan(before) and math.isnan(after):
            return []
        scale = max(1.0, abs(before), abs(after))
        return [] if abs(before - after) <= 1e-4 * scale + 2.0 / N_BOOTSTRAP else [f"{path}: {before} -> {after}"]
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def example_rows(tree):
    """``tree`` with every delta row replaced by its example-level view (``row["examples"]``): the numbers the
    golden files hold, which the replicate-level rows keep under ``examples``."""
    if isinstance(tree, dict):
        if "examples" in tree and "p_value" in tree:
            return {**tree, **tree["examples"]}
        return {k: example_rows(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [example_rows(v) for v in tree]
    return tree


def golden(kind: str) -> dict:
    return json.loads((GOLDEN / f"results-db3a827-{kind}.json").read_text())


def test_the_testbed_study_gives_the_results_of_the_two_pipeline_version(tmp_path) -> None:
    models = GOLDEN / "testbed-models" / "seed{seed}"
    cfg = load_config(None, [*TESTBED, f"model.checkpoint={models}"])
    after = run_study(cfg, tmp_path, progress=False, log=lambda m: None)
    assert differences(golden("testbed"), example_rows(json.loads(json.dumps(after))), "", CHANGED["testbed"]) == []
    assert after["kind"] == "testbed" and after["primary_metric"] == "nmse"
    assert "sleb" in after["comparisons"]["degree_4"] or not after["comparisons"]


def test_the_lm_study_gives_the_results_of_the_two_pipeline_version(tmp_path) -> None:
    cfg = load_config(None, lm_overrides(GOLDEN / "tiny-llama", GOLDEN / "items.jsonl", tmp_path))
    after = run_study(cfg, progress=False, log=lambda m: None)
    assert differences(golden("lm"), example_rows(json.loads(json.dumps(after))), "", CHANGED["lm"]) == []
    assert after["kind"] == "lm" and after["primary_metric"] == "acc"
    # what the LM study gains: every control, so C5 and C9 are decided on text too
    assert {"block_influence", "sleb", "magnitude", "wanda"} <= set(after["comparisons"]["wide"])
    matching = after["interventions"]["wide"]["norm_matching"]["0"]
    assert "ood_matched" in matching and "skipped" not in matching
    assert "vs_tale" in after["comparisons"]["wide"]["magnitude"]  # C9 compares TALE with weight pruning directly
