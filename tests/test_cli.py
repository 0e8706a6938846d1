"""The CLI end to end on a tiny model, and a one-line error for every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tapioca.cli import main

TINY = ["--set", "model.n_layer=3", "--set", "model.n_embd=16", "--set", "train.steps=20",
        "--set", "train.warmup_steps=2", "--set", "pruning.n_select=32", "--set", "evaluation.n_heldout=32",
        "--set", "evaluation.n_bootstrap=200", "--set", "run.threads=1", "--quiet"]


def run_cli(*args: str) -> int:
    return main([*args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    assert run_cli("train", "--out", str(out), *TINY) == 0
    return out


def test_train_prune_evaluate_write_their_json(trained, tmp_path):
    assert (trained / "model.safetensors").is_file() and (trained / "config.yaml").is_file()
    assert json.loads((trained / "train_result.json").read_text())["id_query_nmse"] > 0
    prune_dir = tmp_path / "prune"
    assert run_cli("prune", "--model", str(trained), "--out", str(prune_dir), "--set", "pruning.target=x_scale_2",
                   *TINY) == 0
    pruning = json.loads((prune_dir / "pruning.json").read_text())
    assert {"removed", "rounds", "baseline_score", "best", "final", "bsba"} <= set(pruning)
    assert pruning["info"]["selected_on"] == "x_scale_2"
    assert len(pruning["rounds"][0]["candidates"]) == 3
    eval_dir = tmp_path / "eval"
    assert run_cli("evaluate", "--model", str(trained), "--pruning", str(prune_dir / "pruning.json"),
                   "--out", str(eval_dir), *TINY) == 0
    result = json.loads((eval_dir / "evaluation.json").read_text())
    assert set(result["full"]) == {"id", "x_scale_2", "x_scale_3", "x_shift_1", "uniform_x", "coef_scale_3",
                                   "degree_4", "degree_5", "noise_0.5", "more_points", "fewer_points"}
    assert {"mean", "low", "high", "p_value", "p_holm"} <= set(result["delta"]["x_scale_3"]["nmse"])
    assert sorted(result["full"]["id"]["nmse"]["per_seed"]) == ["0", "1", "2", "3", "4"]  # the default seeds


def one_line_error(capsys, *args: str) -> str:
    code = run_cli(*args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("args, message", [
    (["--set", "train.stepz=3"], "train.stepz: unknown key; allowed: ["),
    (["--set", "train.steps=abc"], "train.steps: 'abc' is not allowed; expected an integer"),
    (["--set", "train.lr=0"], "train.lr: 0.0 is not allowed; expected a value > 0"),
    (["--set", "pruning.metric=f1"], "pruning.metric: 'f1' is not allowed; expected one of ['nmse', 'tol_acc']"),
    (["--set", "task.shifts.bad.x_scal=3"], "task.shifts.bad.x_scal: unknown sampler parameter 'x_scal'; allowed:"),
    (["--set", "pruning.n_select=2"], "pruning.n_select: 2 is not allowed; expected a value >= 8"),
    (["--set", "evaluation.n_heldout=0"], "evaluation.n_heldout: 0 is not allowed"),
    (["--device", "cuda"], "run.device: 'cuda' is not available"),
    (["--device", "tpu9"], "run.device: 'tpu9'"),
    (["--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
])
def test_config_errors_are_one_line(capsys, trained, tmp_path, args, message):
    err = one_line_error(capsys, "prune", "--model", str(trained), "--out", str(tmp_path), *args)
    assert message in err


def test_missing_and_corrupt_checkpoints_are_one_line_errors(capsys, trained, tmp_path):
    assert "does not exist" in one_line_error(capsys, "prune", "--model", str(tmp_path / "nope"), "--quiet")
    assert "no model given" in one_line_error(capsys, "evaluate", "--out", str(tmp_path / "e"), "--quiet")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.json", "model.safetensors"):
        (broken / name).write_bytes((trained / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "corrupt" in one_line_error(capsys, "prune", "--model", str(broken), "--out", str(tmp_path / "p"), "--quiet")
    (broken / "model.json").write_text("{ half")
    assert "corrupt" in one_line_error(capsys, "prune", "--model", str(broken), "--out", str(tmp_path / "p"), "--quiet")


def test_removing_more_blocks_than_exist_is_an_error(capsys, trained, tmp_path):
    err = one_line_error(capsys, "prune", "--model", str(trained), "--out", str(tmp_path), *TINY,
                         "--set", "pruning.max_drop=7")
    assert "max_drop: 7 is more blocks than the model has (3)" in err


def test_non_finite_data_is_an_error(capsys, trained, tmp_path):
    err = one_line_error(capsys, "evaluate", "--model", str(trained), "--out", str(tmp_path), *TINY,
                         "--set", "task.shifts.huge.x_scale=1e300")
    assert "huge/heldout" in err and "non-finite" in err


def test_debug_shows_the_traceback(trained, tmp_path):
    with pytest.raises(Exception, match="unknown key"):
        run_cli("prune", "--model", str(trained), "--out", str(tmp_path), "--debug", "--set", "train.stepz=1")


def test_report_of_a_missing_run_is_a_one_line_error(capsys, tmp_path):
    assert "results.json" in one_line_error(capsys, "report", str(tmp_path / "nope"))


GOLDEN = Path(__file__).parent / "data" / "golden"


def lm_config(folder: Path) -> Path:
    """A YAML config of the tiny Llama (planted harmful block) and its JSONL task stored in tests/data/golden."""
    task = {"source": "jsonl", "path": str(GOLDEN / "items.jsonl"), "n_shots": 0,
            "columns": {"question": "q", "choices": "c", "answer": "a", "split": "s"},
            "splits": {"id": ["id"], "wide": ["wide"]}}
    cfg = {"lm": {"model": str(GOLDEN / "tiny-llama"), "task": task, "metric": "acc", "n_select": 16,
                  "n_heldout": 16, "batch_size": 8},
           "pruning": {"max_drop": 2}, "evaluation": {"seeds": [0, 1], "n_bootstrap": 200}}
    path = folder / "lm.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_prune_and_evaluate_a_language_model_from_its_config(tmp_path):
    config = lm_config(tmp_path)
    prune_dir, eval_dir = tmp_path / "prune", tmp_path / "eval"
    assert run_cli("prune", "--config", str(config), "--out", str(prune_dir), "--set", "pruning.target=wide",
                   "--quiet") == 0
    pruning = json.loads((prune_dir / "pruning.json").read_text())
    assert pruning["info"]["selected_on"] == "wide" and 2 in pruning["removed"]  # the planted block
    assert pruning["info"]["task_kind"] == "multiple_choice" and len(pruning["rounds"][0]["candidates"]) == 4
    assert run_cli("evaluate", "--config", str(config), "--pruning", str(prune_dir / "pruning.json"),
                   "--out", str(eval_dir), "--quiet") == 0
    result = json.loads((eval_dir / "evaluation.json").read_text())
    assert result["kind"] == "lm" and result["primary_metric"] == "acc"
    assert set(result["full"]) == {"id", "wide"} and "shrinkage_slope" not in result["full"]["id"]
    assert result["delta"]["wide"]["acc"]["mean"] > 0  # removing the planted block helps


def test_a_key_a_language_model_study_ignores_is_a_one_line_error(capsys, tmp_path):
    config = lm_config(tmp_path)
    err = one_line_error(capsys, "prune", "--config", str(config), "--set", "pruning.n_select=64", "--quiet")
    assert "pruning.n_select: not used by a study on a language model" in err and "lm.n_select" in err
