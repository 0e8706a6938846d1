"""The LM study end to end on a tiny saved Llama with a planted harmful block and a local JSONL task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

from tapioca.config import load_config
from tapioca.errors import CheckpointError, ConfigError, DataError
from tapioca.io import read_json
from tapioca.tasks.text_workload import intervention_metric, load_text_task, resolve_lm_path
from tapioca.report.report import write_report
from tapioca.study.steps import run_study

from conftest import PLANTED, mc_task, plant, relabel, tiny_lm


CLAIMS = [f"C{i}" for i in range(1, 10)]


def planted_study_files(folder: Path) -> tuple[Path, Path]:
    """A tiny Llama whose block PLANTED is blown up, saved; and questions labelled with the answers of the
    same model with that block removed, as JSONL with a split column. TALE should find the block."""
    lm = tiny_lm(True)
    plant(lm, PLANTED)
    task = relabel(lm, mc_task("letters", n=120), {PLANTED: 0.0})
    rows = [{"q": ex.question, "c": list(ex.choices), "a": int(ex.answer), "s": dist}
            for dist, pool in task.source.examples.items() for ex in pool]
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = folder / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    return model_dir, data


def lm_overrides(model_dir: Path, data: Path, out: Path) -> list[str]:
    task = {"source": "jsonl", "path": str(data), "columns": {"question": "q", "choices": "c", "answer": "a",
                                                               "split": "s"},
            "splits": {"id": ["id"], "wide": ["wide"]}, "n_shots": 0}
    return [f"lm.model={model_dir}", f"lm.task={json.dumps(task)}", "lm.metric=acc", "lm.n_select=16",
            "lm.n_heldout=16", "lm.n_profile=8", "lm.batch_size=8", "evaluation.seeds=[0, 1]",
            "evaluation.n_bootstrap=200", "pruning.max_drop=2", "geometry.alphas=[0.0, 0.5, 1.0]",
            f"run.out={out}"]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> tuple[Path, dict, list[str]]:
    folder = tmp_path_factory.mktemp("lm_study")
    model_dir, data = planted_study_files(folder)
    # three sampling seeds: the draws of the one model are the units, and two (df 1) decide almost nothing
    overrides = [*lm_overrides(model_dir, data, folder / "run"), "evaluation.seeds=[0, 1, 2]", "lm.n_profile=6"]
    results = run_study(load_config(None, overrides), progress=False, log=lambda m: None)
    return folder / "run", results, overrides


def test_lm_study_finds_the_planted_block_and_decides_every_claim(planted_run) -> None:
    run, results, _ = planted_run
    assert results["kind"] == "lm" and results["primary_metric"] == "acc" and results["n_blocks"] == 4
    for dist in ("id", "wide"):
        for seed in ("0", "1", "2"):
            assert PLANTED in results["removed"]["target"][dist][seed]
    wide = results["protocols"]["target"]["delta"]["wide"]["acc"]
    assert wide["pruned"] > wide["full"] and wide["improved"]
    assert set(results["claims"]) == set(CLAIMS)
    assert {c["verdict"] for c in results["claims"].values()} <= {"supported", "refuted", "inconclusive"}
    n_choices = {len(json.loads(line)["c"]) for line in (run.parent / "items.jsonl").read_text().splitlines()}
    assert len(n_choices) == 1  # chance: a uniform guess among the choices, for the claims' floor rule
    k = n_choices.pop()
    assert results["chance"] == pytest.approx({"id": 1 / k, "wide": 1 / k})
    c2 = results["claims"]["C2"]  # the one shift improved, but one shift cannot say "consistently"
    assert c2["verdict"] == "inconclusive" and c2["numbers"]["improved"] == ["wide"] and "too few" in c2["evidence"]
    assert results["claims"]["C1"]["verdict"] == "refuted"  # ID improves too: the planted block hurts everywhere
    assert "calibration" in results and "delta_ece" in results["calibration"]["target"]["wide"]
    sweep = results["interventions"]["wide"]["sweep_removed"]["0"]
    assert [p["alpha"] for p in sweep] == [0.0, 0.5, 1.0]
    assert sweep[0]["score"] > sweep[-1]["score"]  # removing the planted block helps on the sweep prompts too
    assert set(results["geometry"]["D_mean"]) == {"noise_floor", "wide"}
    assert read_json(run / "results.json")["claims"] == json.loads(json.dumps(results["claims"]))


def test_lm_study_resumes_without_recomputing(planted_run) -> None:
    run, results, overrides = planted_run
    written = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.suffix in (".json", ".npz")
               and p.name not in ("results.json", "timings.json", "environment.json")}
    again = run_study(load_config(None, overrides), progress=False, log=lambda m: None)
    assert again["removed"] == results["removed"]
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_lm_study_report_builds_from_the_run_dir(planted_run) -> None:
    run, _, _ = planted_run
    folder = write_report(run)
    html = (folder / "report.html").read_text()
    assert "C9" in html and "acc" in html
    markdown = (folder / "report.md").read_text()
    assert "## Calibration" in markdown and "ECE" in markdown and (folder / "calibration.png").is_file()
    assert not (folder / "reliability.png").exists()  # the regression reliability plot is for the testbed
    acc_table = markdown.split("### Protocol `target` — acc\n")[1].split("###")[0]
    assert "(higher is better)" in acc_table
    assert "— confidence" not in markdown  # no comparison for confidence: it has no better side
    config_table = markdown.split("## Configuration")[1].split("## Environment")[0]
    assert "lm.n_select" in config_table and "pruning.n_select" not in config_table
    assert "−NMSE" not in markdown.split("## Interventions")[1]


def test_lm_config_errors_are_specific(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lm.model"):
        load_config(None, ["lm.metric=acc"])
    with pytest.raises(ConfigError, match="lm.metric"):
        load_config(None, ["lm.model=x", "lm.metric=nmse"])
    with pytest.raises(CheckpointError, match="not installed|neither"):
        resolve_lm_path(str(tmp_path / "missing"))
    cfg = load_config(None, ["lm.model=x", "lm.task={source: jsonl, bogus: 1}"])
    with pytest.raises(ConfigError, match="lm.task"):
        load_text_task(cfg.lm)


def test_too_few_examples_fail_before_any_model_work(tmp_path: Path) -> None:
    model_dir, data = planted_study_files(tmp_path)
    overrides = [o for o in lm_overrides(model_dir, data, tmp_path / "run") if not o.startswith("lm.n_profile")]
    cfg = load_config(None, [*overrides, "lm.n_profile=40"])  # the ID reference role has fewer than 80
    with pytest.raises(DataError, match="role 'reference'"):
        run_study(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "run" / "pruning").exists()


def test_generation_accuracy_sweeps_score_the_gold_answer_loglik() -> None:
    assert intervention_metric("short_answer", "acc") == "loglik"
    assert intervention_metric("multiple_choice", "acc") == "acc"


def test_two_lms_as_scales_decide_c6_and_report(planted_run, tmp_path: Path) -> None:
    from tapioca.report.scales_report import build_scales_report

    run, _, overrides = planted_run
    model_dir = next(o for o in overrides if o.startswith("lm.model=")).split("=", 1)[1]
    others = [o for o in overrides if not o.startswith(("lm.model=", "run.out="))]
    scales = json.dumps({"tiny_a": {"lm": {"model": model_dir}}, "tiny_b": {"lm": {"model": model_dir}}})
    cfg = load_config(None, [f"lm.model={model_dir}", *others, f"scales={scales}", f"run.out={tmp_path / 'lms'}"])
    results = run_study(cfg, progress=False, log=lambda m: None)
    assert results["kind"] == "lm" and set(results["scales"]) == {"tiny_a", "tiny_b"}
    c6 = results["claims"]["C6"]
    assert "needs at least" not in c6["evidence"]  # two LMs are enough for C6 (REFERENCE §1)
    assert c6["verdict"] == "refuted"  # C1 is refuted on both (the planted block hurts ID too)
    blocks, figures = build_scales_report(results)
    assert "scales.png" in figures and any("ID accuracy" in str(b) for b in blocks)


@pytest.mark.slow
def test_real_smollm2_arithmetic_study_smoke(tmp_path: Path) -> None:
    """SmolLM2-135M (installed with `tapioca models install SmolLM2-135M-Instruct`) through the whole LM study
    at toy sizes: one seed, one TALE round. Several minutes on 2 CPU cores."""
    from tapioca.models.install import installed_path

    if installed_path("SmolLM2-135M-Instruct") is None:
        pytest.skip("SmolLM2-135M-Instruct is not installed (tapioca models install SmolLM2-135M-Instruct)")
    pytest.importorskip("reasoning_gym")
    cfg = load_config(Path(__file__).parents[1] / "configs" / "lm-smollm2-arithmetic.yaml", [
        "evaluation.seeds=[0]", "lm.n_select=8", "lm.n_heldout=16", "lm.n_profile=8", "pruning.max_drop=1",
        "evaluation.n_bootstrap=200", "geometry.alphas=[0.0, 1.0]", f"run.out={tmp_path}"])
    results = run_study(cfg, progress=False, log=lambda m: None)
    assert results["n_blocks"] == 30 and set(results["claims"]) == set(CLAIMS)
    assert 0.0 <= results["quality"]["model_id_acc"]["mean"] <= 1.0
    assert all(len(results["removed"]["target"][d]["0"]) <= 1 for d in ("id", "more_digits", "more_terms"))
