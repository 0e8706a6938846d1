"""Reliability: non-finite outputs stop a run with a one-line error, and checkpoints carry a sha256 of their weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tapioca
from tapioca.analysis.evaluation import single_evaluation
from tapioca.api import load_task, prune
from tapioca.cli import main
from tapioca.config import load_config, scale_config
from tapioca.errors import CheckpointError, DataError, check_finite
from tapioca.io import write_json
from tapioca.models.gnn import load_gnn
from tapioca.models.icl import load_model, save_model, sha256_of
from tapioca.models.training import find_pretrained
from tapioca.pruning.searches import ScoreCache, SearchContext, _tale_outputs, get_search

from test_cli import TINY, one_line_error
from test_pruning import FakeModel

ZOO = Path(tapioca.__file__).resolve().parent / "zoo"  # the shipped checkpoints

# ---------------------------------------------------------------- non-finite outputs


def test_check_finite_counts_rows_and_names_where():
    check_finite(torch.ones(4, 3), "anything")  # finite: no error
    check_finite(torch.zeros(0), "anything")
    values = torch.ones(5, 3)
    values[1, 0], values[3, 2] = float("nan"), float("inf")
    with pytest.raises(DataError, match=r"^model m on distribution d \(selection\): 2 of 5 rows are non-finite "
                                        r"\(NaN or inf\); the weights may be damaged$"):
        check_finite(values, "model m on distribution d (selection)")
    with pytest.raises(DataError, match=r"^1 of 2 rows are non-finite"):
        check_finite(np.array([1.0, np.nan]), "")


def nan_rows(n_bad: int, n: int = 8):
    """A scorer whose ``n`` per-example scores hold ``n_bad`` NaN rows, whatever the gates."""
    def scorer(gates):
        values = torch.zeros(n)
        values[:n_bad] = float("nan")
        return values
    return scorer


@pytest.mark.parametrize("search", ["tale", "last_k", "random"])
def test_searches_name_where_and_count_the_non_finite_scores(search):
    ctx = SearchContext(model=FakeModel(4), batch=None, scorer=nan_rows(3), progress=False,
                        where="model runs/m0 on distribution x_scale_3 (selection)")
    with pytest.raises(DataError, match=r"^model runs/m0 on distribution x_scale_3 \(selection\): 3 of 8 rows"):
        get_search(search)(ctx)


def test_a_non_finite_mean_from_prefix_reuse_is_counted_by_a_plain_run(tmp_path):
    prefix = type("Prefix", (), {"base": lambda self, removed: float("nan")})()
    cache = ScoreCache(nan_rows(2), tmp_path / "scores.json", prefix, where="model m")
    with pytest.raises(DataError, match=r"^model m: 2 of 8 rows are non-finite"):
        cache(frozenset())
    assert not (tmp_path / "scores.json").exists()  # nothing non-finite is stored


def test_non_finite_scores_left_in_a_cache_file_are_run_again(tmp_path):
    write_json(tmp_path / "scores.json", {"": float("nan"), "1": 0.5})  # e.g. from a crashed older version
    cache = ScoreCache(nan_rows(0), tmp_path / "scores.json")
    assert cache.scores == {"1": 0.5} and cache(frozenset()) == 0.0


def test_tale_outputs_never_take_the_max_of_nothing():
    assert _tale_outputs([], [], float("nan")) == ([], [], [])
    assert _tale_outputs([2], [float("nan")], 0.0) == ([], [], [2])


@pytest.mark.parametrize("search", ["tale", "block_influence"])
def test_prune_with_a_nan_weight_is_a_data_error(tiny_cfg, tiny_model, search):
    with torch.no_grad():
        tiny_model.blocks[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match=r"32 of 32 rows are non-finite \(NaN or inf\); the weights may be damaged"):
        prune(tiny_model, load_task(tiny_cfg), search, target="x_scale_3", n_select=32, progress=False)


def test_single_evaluation_checks_the_metrics_and_names_the_model():
    preds = torch.tensor([0.0, float("nan"), 1.0])
    metrics = {"nmse": torch.tensor([0.1, float("nan"), 0.2]), "tol_acc": torch.tensor([1.0, 0.0, 0.0])}
    with pytest.raises(DataError, match=r"^model runs/m0 on distribution id \(held-out, seed 2\): 1 of 3 rows"):
        single_evaluation("id", 2, metrics, preds, torch.zeros(3), where="model runs/m0")
    # a prediction may be NaN by design (a short answer that is not a number) when its metrics are finite
    ok = single_evaluation("id", 2, {"acc": torch.zeros(3)}, preds, torch.zeros(3))
    assert np.isnan(ok.predictions["id"][1])


# ---------------------------------------------------------------- checkpoint checksums


def test_save_records_the_sha256_and_load_checks_it(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    digest = sha256_of(tmp_path / "m" / "model.safetensors")
    assert meta["sha256"] == digest and len(digest) == 64
    load_model(tmp_path / "m")
    damage(tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "m")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "model.safetensors" in message and "corrupt" in message
    assert f"expected sha256 {digest[:12]}" in message
    assert f"got {sha256_of(tmp_path / 'm' / 'model.safetensors')[:12]}" in message


def test_folders_without_a_checksum_still_load(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "old")
    drop_checksum(tmp_path / "old")
    loaded = load_model(tmp_path / "old")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny_model.state_dict().values()))


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in ZOO.glob("*/model.json")))
def test_every_shipped_checkpoint_has_a_checksum_and_loads(folder):
    meta = json.loads((ZOO / folder / "model.json").read_text())
    assert meta["sha256"] == sha256_of(ZOO / folder / "model.safetensors")
    load = load_gnn if meta["format"] == "tapioca-gnn" else load_model  # graph classifiers or testbed models
    model = load(ZOO / folder)  # verifies the checksum again, then the weights against model.json
    assert model.n_blocks == meta["model"]["n_layer"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_shipped_graph_classifiers_are_found_for_the_graph_config():
    from tapioca.models.graph_training import find_shipped_graph_model
    from tapioca.tasks.graph_workload import load_graph_task

    cfg = load_config("configs/graph-motif.yaml", [])
    task = load_graph_task(cfg.graph)
    assert find_shipped_graph_model(cfg.graph, task.cfg, 1) == ZOO / "graph-motif-seed1"
    other = load_config("configs/graph-motif.yaml", ["graph.train.steps=1999"])
    assert find_shipped_graph_model(other.graph, task.cfg, 1) is None
    assert find_pretrained(load_config(None, []), 1) == ZOO / "testbed-L8-D64-seed1"  # graphs never match the testbed


def test_the_zoo_is_not_empty_and_found_by_default():
    assert len(list(ZOO.glob("*/model.json"))) >= 7
    assert find_pretrained(load_config(None, []), 0) == ZOO / "testbed-L8-D64-seed0"


# ---------------------------------------------------------------- damaged weights through the CLI


def damage(weights: Path) -> None:
    """Overwrite 64 bytes in the middle of a file with 0xFF: the file still parses, those floats become NaN."""
    raw = bytearray(weights.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = b"\xff" * 64
    weights.write_bytes(bytes(raw))


def drop_checksum(folder: Path) -> None:
    meta = json.loads((folder / "model.json").read_text())
    del meta["sha256"]
    (folder / "model.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    """A tiny trained model whose model.safetensors has 64 damaged bytes in the middle (block 1's weights)."""
    out = tmp_path_factory.mktemp("damaged")
    assert main(["train", "--out", str(out), *TINY]) == 0
    damage(out / "model.safetensors")
    return out


def test_damaged_weights_are_caught_by_the_checksum(capsys, damaged, tmp_path):
    err = one_line_error(capsys, "prune", "--model", str(damaged), "--out", str(tmp_path), *TINY)
    assert "model.safetensors" in err and "are corrupt: expected sha256" in err


def test_damaged_weights_without_a_checksum_stop_at_the_non_finite_outputs(capsys, damaged, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("model.json", "model.safetensors"):
        (folder / name).write_bytes((damaged / name).read_bytes())
    drop_checksum(folder)
    err = one_line_error(capsys, "prune", "--model", str(folder), "--out", str(tmp_path / "p"), *TINY,
                         "--set", "pruning.target=x_scale_3")
    assert "32 of 32 rows are non-finite (NaN or inf); the weights may be damaged" in err
    err = one_line_error(capsys, "evaluate", "--model", str(folder), "--out", str(tmp_path / "e"), *TINY)
    assert "distribution id (held-out, seed 0): 32 of 32 rows are non-finite" in err


SHIPPED_LADDERS = ["configs/depth.yaml", "configs/scales.yaml", "configs/depth-flat.yaml"]  # every scale and seed ships


@pytest.mark.parametrize("path", SHIPPED_LADDERS)
def test_every_shipped_rung_loads_from_the_zoo(path):
    """Every scale and seed of a shipped ladder matches a shipped checkpoint exactly: nothing trains."""
    cfg = load_config(path, [])
    for name in cfg.scales:
        sub = scale_config(cfg, name)
        for seed in sub.evaluation.seeds:
            assert find_pretrained(sub, seed) is not None, f"{path}: scale {name} seed {seed} would train"
