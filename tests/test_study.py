"""The study pipeline on a tiny config: outputs, skip-on-rerun and resume after a kill."""

from __future__ import annotations

import json

import numpy as np
import yaml

import pytest

pytestmark = pytest.mark.e2e

import tapioca.study.steps as study
from tapioca.config import load_config
from tapioca.errors import CheckpointError
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.report.summary import format_summary

TINY = ["model.n_layer=3", "model.n_embd=16", "train.steps=20", "train.warmup_steps=2", "pruning.n_select=32",
        "evaluation.n_heldout=32", "evaluation.n_bootstrap=200", "evaluation.seeds=[0,1]",
        "task.shifts={x_scale_3: {x_scale: 3.0}, degree_4: {degrees: [4]}}", "pruning.epsilon=5.0", "pruning.choose=final",
        "geometry.n_prompts=32", "geometry.alphas=[0.0, 0.5, 1.0]"]


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg = load_config(None, TINY)
    return cfg, out, study.run_study(cfg, out, progress=False, log=quiet)


def test_study_writes_every_step_and_the_results(finished):
    cfg, out, results = finished
    for seed in (0, 1):
        assert (out / "models" / f"seed{seed}" / "model.safetensors").is_file()
        for dist in ("id", "x_scale_3", "degree_4"):
            assert (out / "pruning" / f"seed{seed}" / f"tale-{dist}.json").is_file()
            assert (out / "evaluation" / f"seed{seed}" / f"target-{dist}.npz").is_file()
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert set(results["protocols"]) == {"target", "from-id", "in-sample"}
    assert results["chance"] is None  # NMSE has no chance level: no floor rule on the testbed
    assert set(results["protocols"]["target"]["delta"]) == {"id", "x_scale_3", "degree_4"}
    assert set(results["quality"]["references_id_nmse"]) == {"least_squares", "knn", "mean"}
    assert results["quality"]["references_id_nmse"]["least_squares"] < 1e-6
    assert {"prune", "evaluate", "train"} <= set(results["timings_seconds"])
    assert "protocol target" in format_summary(results)


def test_from_id_and_target_on_id_share_one_search(finished):
    _, _, results = finished
    assert results["removed"]["from-id"] == results["removed"]["target"]["id"]
    target_id = results["protocols"]["target"]["delta"]["id"]["nmse"]
    from_id = results["protocols"]["from-id"]["delta"]["id"]["nmse"]
    assert target_id["mean"] == from_id["mean"]


def test_rerun_skips_finished_steps(finished, monkeypatch):
    cfg, out, results = finished
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step ran again")
    monkeypatch.setattr(study, "train", must_not_run)
    monkeypatch.setattr(study, "prune", must_not_run)
    monkeypatch.setattr(HeldoutRuns, "one", must_not_run)
    again = study.run_study(cfg, out, progress=False, log=quiet)
    assert again["protocols"] == json.loads(json.dumps(results["protocols"]))


def test_a_killed_study_resumes_to_the_same_results(finished, tmp_path, monkeypatch):
    cfg, _, results = finished
    real_one, calls = HeldoutRuns.one, []

    def killed_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_one(*args, **kwargs)

    monkeypatch.setattr(HeldoutRuns, "one", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(cfg, tmp_path, progress=False, log=quiet)
    monkeypatch.setattr(HeldoutRuns, "one", real_one)
    resumed = study.run_study(cfg, tmp_path, progress=False, log=quiet)
    assert resumed["protocols"] == results["protocols"]
    assert resumed["removed"] == results["removed"]


def test_seeds_in_parallel_threads_give_the_serial_results(finished, tmp_path):
    cfg, out, results = finished
    assert study.seed_workers(cfg) == min(2, 2 * study.torch.get_num_threads())  # auto: one per seed, up to 2x threads
    serial = study.run_study(load_config(None, [*TINY, "run.seed_workers=1"]), tmp_path / "serial", progress=False,
                             log=quiet)
    parallel = study.run_study(load_config(None, [*TINY, "run.seed_workers=2"]), tmp_path / "parallel",
                               progress=False, log=quiet)
    for key in ("protocols", "removed", "full", "geometry", "comparisons", "interventions", "claims"):
        assert parallel[key] == serial[key], key
    for seed in ("0", "1"):  # the trained models too
        a, b = ((tmp_path / run / "models" / f"seed{seed}" / "model.safetensors").read_bytes() for run in ("serial", "parallel"))
        assert a == b


def test_a_failing_seed_stops_the_others_and_its_error_is_raised():
    threads = study.SeedThreads(2)
    ran = []

    def run(seed: int) -> int:
        if seed == 1:
            raise ValueError("seed 1 broke")
        threads._failed.wait(timeout=10)
        threads.fit()  # the next step boundary after seed 1 failed
        ran.append(seed)
        return seed

    with pytest.raises(ValueError, match="seed 1 broke"):
        threads.map(run, [1, 0, 2, 3])
    assert ran == []  # every other seed stopped at its next step boundary


def test_a_run_dir_of_another_config_is_refused(finished):
    cfg, out, _ = finished
    other = load_config(None, [*TINY, "train.steps=21"])
    with pytest.raises(CheckpointError, match="different config"):
        study.run_study(other, out, progress=False, log=quiet)


def test_a_run_dir_takes_more_seeds(finished):
    cfg, out, _ = finished
    saved = yaml.safe_load((out / "config.yaml").read_text())
    more = load_config(None, [*TINY, "evaluation.seeds=[0, 1, 2]"])
    try:
        study.prepare_run_dir(more, out)  # no "different config" error: seed 2 gets folders of its own
        assert yaml.safe_load((out / "config.yaml").read_text())["evaluation"]["seeds"] == [0, 1, 2]
    finally:
        (out / "config.yaml").write_text(yaml.safe_dump(saved))


def test_geometry_step_reports_distortion_for_full_and_pruned_models(finished):
    _, out, results = finished
    geometry = results["geometry"]
    assert set(geometry["D_mean"]) == {"noise_floor", "x_scale_3", "degree_4"}
    for seed, rows in geometry["D_per_seed"].items():
        assert (out / "geometry" / f"seed{seed}.json").is_file()
        for dist in ("x_scale_3", "degree_4"):
            if not results["removed"]["target"][dist][seed]:  # nothing removed: the pruned model is the full one
                assert rows[dist]["target_pruned"] == rows[dist]["full"]
            assert rows[dist]["full"] > 0
    assert len(geometry["attribution_full"]["0"]["x_scale_3"]) == 3  # one value per block
    assert "distortion D" in format_summary(results)


def test_controls_and_interventions_are_consistent(finished):
    _, out, results = finished
    comparisons, interventions = results["comparisons"], results["interventions"]
    assert comparisons, "with epsilon=5 and choose=final TALE removes blocks"
    for shift, methods in comparisons.items():
        assert set(methods) == {"tale", "block_influence", "angular", "last_k", "random", "distortion", "sleb",
                                "magnitude", "wanda"}
        assert methods["tale"]["nmse"] == results["protocols"]["target"]["delta"][shift]["nmse"]
    for shift, row in interventions.items():
        for seed, points in row["sweep_removed"].items():
            by_alpha = {p["alpha"]: p for p in points}
            matching = row["norm_matching"][seed]
            assert by_alpha[1.0]["score"] == pytest.approx(matching["ood_full"], rel=1e-6)  # alpha=1: full model
            assert by_alpha[0.0]["score"] == pytest.approx(matching["ood_pruned"], rel=1e-6)  # alpha=0: pruned
            assert (out / "interventions" / f"seed{seed}" / f"{shift}.json").is_file()


def test_step_progress_counts_every_seeds_steps_across_threads():
    from tapioca.study.rundir import StepProgress

    steps = StepProgress([0, 1, 2], ["model", "prune", "evaluate"], enabled=True)
    assert steps.bar.total == 9
    threads = study.SeedThreads(3)
    threads.map(lambda seed: [steps.done(seed, s) for s in ("model", "prune", "evaluate")], [0, 1, 2])
    assert steps.bar.n == 9
    steps.running(2, "selecting the controls' blocks")  # names the work in flight without counting a step
    assert steps.bar.n == 9 and steps.bar.postfix == "seed 2: selecting the controls' blocks…"


def test_both_protocols_optimism_and_robust_summaries_are_reported(finished):
    _, out, results = finished
    inside, held = results["protocols"]["in-sample"]["delta"], results["protocols"]["target"]["delta"]
    assert set(inside) == set(held) == {"id", "x_scale_3", "degree_4"}
    for dist, row in results["optimism"].items():
        assert row["metric"] == "nmse" and row["n_in_sample"] == 2 * 32 and row["n_held_out"] == 2 * 32
        # optimism = in-sample gain − held-out gain; the gains are −Δ NMSE (lower is better)
        assert row["in_sample"] == pytest.approx(-inside[dist]["nmse"]["mean"])
        assert row["held_out"] == pytest.approx(-held[dist]["nmse"]["mean"])
        assert row["mean"] == pytest.approx(row["in_sample"] - row["held_out"])
        assert row["low"] <= row["mean"] <= row["high"] and row["null_q95"] >= row["null_mean"]
    for dist, row in results["robust"].items():
        assert row["median_full"] > 0 and len(row["dominant"]) == 5
        assert sum(d["share"] for d in row["dominant"]) <= 1.0 + 1e-9
    assert set(results["claims_in_sample"]) == {"C1", "C2"}
    assert results["paper_pattern"]["sentence"].startswith("Under the paper's protocol")
    for claim in ("C1", "C2"):
        assert "mde" in results["claims"][claim] and "n_needed" in results["claims"][claim]
    rounds = np.load(out / "evaluation" / "seed0" / "in-sample-rounds.npz")
    search = json.loads((out / "pruning" / "seed0" / "tale-degree_4.json").read_text())
    # every recorded round of the search, one row per block (NaN: not a candidate), one column per example
    assert rounds["degree_4"].shape == (len(search["rounds"]), 3, 32)
    for dist, row in results["optimism"].items():
        assert row["null_metric"] == "nmse" and 0 < row["p_null"] <= 1 and row["unit"] == "model" and row["n"] == 2


def test_a_run_dir_written_before_a_config_key_existed_still_resumes(finished):
    cfg, out, _ = finished
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["evaluation"]["placebo_draws"]  # as written by a tapioca without that key
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    study.prepare_run_dir(cfg, out)  # no "different config" error: the missing key takes its default


def test_selection_draws_make_replicates_of_one_model(tmp_path):
    """One model, two selection draws: each draw searches its own selection examples, both pruned models are
    scored on the same held-out examples, and the draws are the units of the method-level statistics."""
    cfg = load_config(None, [*TINY, "evaluation.seeds=[0]", "evaluation.selection_draws=2", "geometry.controls=false"])
    results = study.run_study(cfg, tmp_path, progress=False, log=quiet)
    assert (tmp_path / "pruning" / "seed0" / "draw1" / "tale-id.json").is_file()
    assert (tmp_path / "evaluation" / "seed0" / "draw1" / "in-sample-rounds.npz").is_file()
    assert set(results["removed"]["target"]["id"]) == {"0", "0.1"}
    assert results["replicates"] == {"models": 1, "sampling_seeds": 1, "selection_draws": 2, "unit": "draw"}
    row = results["protocols"]["target"]["delta"]["id"]["nmse"]
    assert row["unit"] == "draw" and row["n"] == 2 and row["replicates"] == 2
    assert row["examples"]["n"] == 2 * cfg.evaluation.n_heldout  # each draw's pruned model on the same examples
    first = json.loads((tmp_path / "pruning" / "seed0" / "tale-id.json").read_text())
    second = json.loads((tmp_path / "pruning" / "seed0" / "draw1" / "tale-id.json").read_text())
    assert first["info"]["role"] == "select" and second["info"]["role"] == "select.1"
    assert first["baseline_score"] != second["baseline_score"]  # other selection examples
    more = load_config(None, [*TINY, "evaluation.seeds=[0]", "evaluation.selection_draws=3", "geometry.controls=false"])
    study.prepare_run_dir(more, tmp_path)  # a run may gain draws and resume


def test_controls_run_on_the_first_models_only(tmp_path):
    cfg = load_config(None, [*TINY, "geometry.controls_models=1", "pruning.epsilon=1e6"])
    results = study.run_study(cfg, tmp_path, progress=False, log=quiet)
    assert (tmp_path / "controls" / "seed0").is_dir() and not (tmp_path / "controls" / "seed1").exists()
    assert not (tmp_path / "interventions" / "seed1").exists()
    for shift, rows in results["comparisons"].items():
        assert rows["tale"]["nmse"]["n"] == 1 and rows["tale"]["nmse"]["examples"]["n"] == cfg.evaluation.n_heldout
        assert set(results["interventions"][shift]["sweep_removed"]) == {"0"}
