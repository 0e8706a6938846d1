"""The one study pipeline on a graph classifier: every step, PrunE's block, G1, the report and resume."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e

import tapioca.study.steps as study
from tapioca.config import load_config
from tapioca.errors import ConfigError
from tapioca.report.report import write_report

TINY = ["graph.model.n_layer=3", "graph.model.width=16", "graph.train.n_train=96", "graph.train.steps=40",
        "graph.train.batch_size=16", "graph.train.warmup_steps=4", "graph.edges.steps=20", "graph.edges.warmup_steps=0",
        "graph.n_select=32", "graph.n_heldout=40", "graph.n_profile=16", "graph.batch_size=64",
        "graph.task={sampler: {base_size: [6, 9]}, shifts: {basis: {bases: [star, path]}, size: {base_size: [20, 30]}}}",
        "evaluation.n_bootstrap=200", "evaluation.seeds=[0,1]", "evaluation.placebo_draws=50",
        "pruning.epsilon=5.0", "pruning.choose=final", "geometry.alphas=[0.0, 0.5, 1.0]"]


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph-study")
    cfg = load_config(None, TINY)
    return cfg, out, study.run_study(cfg, out, progress=False, log=quiet)


def test_graph_study_runs_every_step_on_the_one_pipeline(finished):
    cfg, out, results = finished
    assert results["kind"] == "graph" and results["primary_metric"] == "acc"
    assert results["chance"] == pytest.approx({d: 1 / 3 for d in ("id", "basis", "size")})  # three motifs
    assert set(results["protocols"]) == {"target", "from-id", "in-sample"}
    assert set(results["protocols"]["target"]["delta"]) == {"id", "basis", "size"}
    for seed in (0, 1):
        assert (out / "models" / f"seed{seed}" / "model.safetensors").is_file()
        assert (out / "edges" / f"seed{seed}" / "prune.npz").is_file()
        assert (out / "pruning" / f"seed{seed}" / "tale-size.json").is_file()
    assert {"C1", "C2", "C3", "C8", "G1"} <= set(results["claims"])
    assert results["claims"]["G1"]["verdict"] in ("supported", "refuted", "inconclusive")
    assert "calibration" in results and "geometry" in results


def test_edges_block_compares_prune_with_erm_on_the_same_graphs(finished):
    _, _, results = finished
    edges = results["edges"]
    assert edges["methods"][0] == "erm"
    for dist in ("id", "basis", "size"):
        row = edges["delta_vs_erm"]["prune"][dist]["acc"]
        assert row["low"] <= row["mean"] <= row["high"]
        assert row["pruned"] == pytest.approx(edges["summary"]["prune"][dist]["acc"]["mean"])
        for who in ("prune", "random"):
            kept = edges["retention"][dist][who]
            assert 0.0 <= kept["motif"] <= 1.0 and 0.0 <= kept["base"] <= 1.0
        # random masks keep as many edges per graph as PrunE
        assert edges["retention"][dist]["random"]["kept"] == pytest.approx(edges["retention"][dist]["prune"]["kept"])
    # the ERM row is the layer study's full model on the very same held-out graphs
    full = results["full"]["id"]["acc"]["mean"]
    assert edges["summary"]["erm"]["id"]["acc"]["mean"] == pytest.approx(full)
    assert set(edges["geometry"]) == {"erm", "prune", "erm_on_kept"}


def test_rerun_skips_finished_steps_and_the_report_renders(finished):
    cfg, out, results = finished
    again = study.run_study(cfg, out, progress=False, log=quiet)
    assert again["edges"]["summary"] == results["edges"]["summary"]
    assert again["timings_seconds"]["train"] == results["timings_seconds"]["train"]  # nothing retrained
    folder = write_report(out)
    text = (folder / "report.md").read_text()
    assert "G1 — edge pruning (PrunE)" in text and "motif edges kept" in text
    assert (folder / "edges.png").is_file()


def test_graph_configs_reject_keys_they_would_ignore():
    with pytest.raises(ConfigError, match="model: not used by a study on a graph classifier"):
        load_config(None, ["graph.n_select=64", "model.n_layer=3"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["graph.n_select=64", "lm.model=x"])
    with pytest.raises(ConfigError, match="graph.task"):
        from tapioca.tasks.graph_workload import load_graph_task

        load_graph_task(load_config(None, ["graph.task={shifts: {basis: {colour: 1}}}"]).graph)
    assert json.dumps(load_config(None, ["graph.n_select=64"]).graph.n_select) == "64"
