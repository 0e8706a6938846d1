"""The GIN classifier behind the block-gate adapter: gates, capture, resumed runs, checkpoints and training."""

from __future__ import annotations

import json

import pytest
import torch

from tapioca.config import GNNConfig, GraphConfig, GraphTrainConfig
from tapioca.errors import CheckpointError
from tapioca.models.gnn import GraphNet, load_gnn, pool_nodes, save_gnn
from tapioca.models.graph_training import is_graph_trained, train_graph_model
from tapioca.models.resumed import ResumedRuns
from tapioca.tasks.graph_data import GraphMotifTask, GraphTaskConfig


@pytest.fixture(scope="module")
def task() -> GraphMotifTask:
    return GraphMotifTask(GraphTaskConfig())


@pytest.fixture(scope="module")
def model() -> GraphNet:
    torch.manual_seed(0)
    return GraphNet(GNNConfig(n_layer=4, width=16)).eval()


def test_run_shapes_and_pooled_states(model: GraphNet, task: GraphMotifTask) -> None:
    batch = task.data("id", "select", 0, 12)
    out = model.run(batch, capture=True)
    assert out.predictions.shape == (12, 3)
    assert out.states.shape == (5, 12, 16)
    assert torch.allclose(out.predictions, model(batch), atol=1e-6)
    h = torch.ones(batch.x.shape[0], 2)
    assert torch.allclose(pool_nodes(h, batch), torch.ones(12, 2))
    sizes = (batch.node_ptr[1:] - batch.node_ptr[:-1]).float()
    assert torch.allclose(pool_nodes(h, batch, "sum")[:, 0], sizes)


def test_alpha_one_is_exact_and_alpha_zero_removes_the_block(model: GraphNet, task: GraphMotifTask) -> None:
    batch = task.data("basis", "select", 0, 20)
    plain = model.run(batch, capture=True)
    ones = model.run(batch, {b: 1.0 for b in range(4)}, capture=True)
    assert torch.equal(plain.predictions, ones.predictions) and torch.equal(plain.states, ones.states)
    removed = model.run(batch, {1: 0.0, 2: 0.0}).predictions
    sliced = model.slice_blocks([1, 2]).run(batch).predictions
    assert torch.allclose(removed, sliced, atol=1e-5 * max(1.0, float(sliced.abs().max())))
    half = model.run(batch, {2: 0.5}).predictions
    assert not torch.allclose(half, plain.predictions) and not torch.allclose(half, model.run(batch, {2: 0.0}).predictions)


def test_resumed_runs_match_plain_gated_runs(model: GraphNet, task: GraphMotifTask) -> None:
    batch = task.data("size", "heldout", 1, 30)
    runs = ResumedRuns(model, batch, chunk=7)
    for gates in ({2: 0.0}, {1: 0.5, 3: 0.0}, {3: 1.5}):
        resumed = runs(gates, capture=True)
        plain = model.run(batch, gates, capture=True)
        scale = max(1.0, float(plain.predictions.abs().max()))
        assert torch.allclose(resumed.predictions, plain.predictions, atol=1e-5 * scale)
        assert torch.allclose(resumed.states, plain.states, atol=1e-5 * max(1.0, float(plain.states.abs().max())))


def test_checkpoint_round_trip_and_corruption(model: GraphNet, task: GraphMotifTask, tmp_path) -> None:
    save_gnn(model, tmp_path / "m", info={"note": 1})
    loaded = load_gnn(tmp_path / "m")
    batch = task.data("id", "heldout", 0, 10)
    assert torch.equal(loaded.run(batch).predictions, model.run(batch).predictions)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["format"] == "tapioca-gnn" and meta["note"] == 1
    (tmp_path / "m" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_gnn(tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gnn(tmp_path / "missing")


def _cfg(steps: int) -> GraphConfig:
    return GraphConfig(model=GNNConfig(n_layer=2, width=16),
                       train=GraphTrainConfig(n_train=64, steps=steps, batch_size=16, checkpoint_every=4, warmup_steps=2))


def test_training_resumes_exactly_and_refuses_another_config(task: GraphMotifTask, tmp_path, monkeypatch) -> None:
    from tapioca.models import graph_training

    full = train_graph_model(_cfg(12), task, seed=0, out=tmp_path / "a", progress=False)
    assert is_graph_trained(tmp_path / "a", _cfg(12), task.cfg, 0)
    assert not is_graph_trained(tmp_path / "a", _cfg(13), task.cfg, 0)
    real = graph_training.minibatch

    def killed_at_9(graphs, size, seed, step):
        if step == 9:
            raise KeyboardInterrupt
        return real(graphs, size, seed, step)

    monkeypatch.setattr(graph_training, "minibatch", killed_at_9)
    with pytest.raises(KeyboardInterrupt):
        train_graph_model(_cfg(12), task, seed=0, out=tmp_path / "b", progress=False)
    monkeypatch.setattr(graph_training, "minibatch", real)
    assert json.loads((tmp_path / "b" / "train_state.json").read_text())["step"] == 8
    resumed = train_graph_model(_cfg(12), task, seed=0, out=tmp_path / "b", progress=False)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="different config"):
        train_graph_model(_cfg(12), task, seed=1, out=tmp_path / "b", progress=False)


def test_training_reduces_the_loss(task: GraphMotifTask) -> None:
    cfg = GraphConfig(model=GNNConfig(n_layer=3, width=32),
                      train=GraphTrainConfig(n_train=256, steps=150, batch_size=32, lr=3e-3, warmup_steps=10))
    model = train_graph_model(cfg, task, seed=0, out=None, progress=False)
    batch = task.data("id", "heldout", 0, 200)
    acc = float((model.run(batch).predictions.argmax(-1) == batch.y).float().mean())
    assert acc > 0.45  # three balanced classes: chance is 1/3 (200 graphs: sd 0.033)
