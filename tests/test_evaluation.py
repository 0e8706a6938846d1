"""Evaluation: per-example results, paired comparison with Holm, save/load, shrinkage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tapioca.config import load_config
from tapioca.errors import DataError
from tapioca.analysis.evaluation import Evaluation, compare
from tapioca.api import evaluate
from tapioca.models.icl import ICLModel
from tapioca.tasks.polyreg import PolyRegTask

from conftest import assert_close_scaled


def synthetic(values_by_dist: dict[str, np.ndarray], accuracy_by_dist: dict[str, np.ndarray] | None = None) -> Evaluation:
    """An Evaluation of 2 seeds with the given per-example NMSE values."""
    ev = Evaluation({}, {}, {}, {})
    for dist, nmse in values_by_dist.items():
        acc = accuracy_by_dist[dist] if accuracy_by_dist else (nmse < 0.5).astype(float)
        ev.values[dist] = {"nmse": nmse, "tol_acc": acc}
        ev.seeds[dist] = np.repeat([0, 1], len(nmse) // 2)
        ev.targets[dist] = np.linspace(-1, 1, len(nmse))
        ev.predictions[dist] = 0.5 * ev.targets[dist]
    return ev


def test_compare_finds_a_real_improvement_and_respects_metric_direction():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 1.0, 400)
    full = synthetic({"id": base, "shift_a": base, "shift_b": base})
    pruned = synthetic({"id": base + rng.normal(0, 0.01, 400), "shift_a": base - 0.1, "shift_b": base + 0.1})
    table = compare(full, pruned, n_bootstrap=2000)
    assert table["shift_a"]["nmse"]["mean"] == pytest.approx(-0.1)
    assert table["shift_a"]["nmse"]["improved"] and not table["shift_a"]["nmse"]["worse"]  # lower NMSE is better
    assert table["shift_b"]["nmse"]["worse"] and not table["shift_b"]["nmse"]["improved"]
    assert not table["id"]["nmse"]["improved"] and not table["id"]["nmse"]["worse"]
    assert table["id"]["nmse"]["low"] < 0 < table["id"]["nmse"]["high"]


def test_holm_is_applied_across_shifts_only():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 1.0, 200)
    noise = {d: base + rng.normal(0.02, 0.2, 200) for d in ("id", "s1", "s2", "s3")}
    table = compare(synthetic({d: base for d in noise}), synthetic(noise), n_bootstrap=2000)
    raw = {d: table[d]["nmse"]["p_value"] for d in ("s1", "s2", "s3")}
    smallest = min(raw, key=raw.get)
    assert table[smallest]["nmse"]["p_holm"] == pytest.approx(min(1.0, 3 * raw[smallest]))
    assert table["id"]["nmse"]["p_holm"] == table["id"]["nmse"]["p_value"]


def test_compare_refuses_different_examples():
    full = synthetic({"id": np.ones(10)})
    pruned = synthetic({"id": np.ones(12)})
    with pytest.raises(ValueError, match="same examples"):
        compare(full, pruned)


def test_summary_and_save_load_round_trip(tmp_path):
    ev = synthetic({"id": np.linspace(0, 1, 20), "shift": np.linspace(1, 2, 20)})
    summary = ev.summary(n_bootstrap=500)
    assert summary["id"]["nmse"]["mean"] == pytest.approx(0.5)
    assert summary["id"]["nmse"]["per_seed"] == {"0": pytest.approx(np.linspace(0, 1, 20)[:10].mean()),
                                                 "1": pytest.approx(np.linspace(0, 1, 20)[10:].mean())}
    assert summary["id"]["shrinkage_slope"] == pytest.approx(0.5)
    ev.save(tmp_path / "ev.npz")
    again = Evaluation.load(tmp_path / "ev.npz")
    for dist in ev.values:
        assert np.array_equal(again.values[dist]["nmse"], ev.values[dist]["nmse"])
        assert np.array_equal(again.seeds[dist], ev.seeds[dist])
        assert np.array_equal(again.predictions[dist], ev.predictions[dist])


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    cfg = load_config(None, ["model.n_layer=2", "model.n_embd=16"])
    torch.manual_seed(0)
    return ICLModel(cfg.model).eval(), PolyRegTask(cfg.task)


def test_evaluate_pools_seeds_and_gates_change_results(tiny):
    model, task = tiny
    ev = evaluate(model, task, None, ["id", "x_scale_3"], seeds=(0, 1, 2), n=16, chunk=7)
    assert ev.values["id"]["nmse"].shape == (48,)
    assert sorted(set(ev.seeds["id"].tolist())) == [0, 1, 2]
    again = evaluate(model, task, None, ["id"], seeds=(0, 1, 2), n=16, chunk=16)
    assert_close_scaled(again.values["id"]["nmse"], ev.values["id"]["nmse"])  # chunking is invisible
    gated = evaluate(model, task, {0: 0.0}, ["id"], seeds=(0, 1, 2), n=16)
    assert not np.allclose(gated.values["id"]["nmse"], ev.values["id"]["nmse"])
    assert np.array_equal(gated.targets["id"], ev.targets["id"])  # same prompts


def test_evaluate_refuses_a_too_small_split(tiny):
    model, task = tiny
    with pytest.raises(DataError, match="too few"):
        evaluate(model, task, None, ["id"], seeds=(0,), n=3)
