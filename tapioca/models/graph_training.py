"""ERM training of the graph classifier: minibatches from a fixed set of ID graphs, progress bar, periodic
checkpoints and exact resume (the checkpoint machinery of :mod:`tapioca.models.training`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tapioca.config import GraphConfig, to_dict
from tapioca.models.gnn import GraphNet, load_gnn, save_gnn
from tapioca.models.training import (
    STATE_FILE, ZOO, _INIT_LOCK, _resume, _save, find_shipped, finished, learning_rate,
)
from tapioca.pruning.edges import take_graphs
from tapioca.tasks.graph_data import GraphBatch, GraphMotifTask, GraphTaskConfig
from tapioca.tasks.polyreg import split_seed

TRAIN_DATA_SEED_OFFSET = 0  # the training graphs of replicate seed s are the "train" role of ID under seed s


def fingerprint(cfg: GraphConfig, task: GraphTaskConfig, seed: int) -> dict:
    """What must match for a checkpoint to be resumed or reused (everything that changes the trained weights)."""
    return {"kind": "graph", "model": to_dict(cfg.model), "sampler": to_dict(task.sampler),
            "train": to_dict(cfg.train), "seed": seed}


def training_graphs(task: GraphMotifTask, cfg: GraphConfig, seed: int) -> GraphBatch:
    """The fixed ID training set of replicate ``seed``: ``train.n_train`` graphs of the "train" role."""
    return task.data("id", "train", seed + TRAIN_DATA_SEED_OFFSET, cfg.train.n_train)


def minibatch(graphs: GraphBatch, size: int, seed: int, step: int) -> GraphBatch:
    """``size`` graphs drawn with replacement; they depend only on (seed, step), so a resumed run is exact."""
    gen = torch.Generator().manual_seed(split_seed(seed, f"graph-step-{step}", "train"))
    return take_graphs(graphs, torch.randint(len(graphs), (size,), generator=gen))


def train_graph_model(cfg: GraphConfig, task: GraphMotifTask, seed: int, out: str | Path | None = None,
                      progress: bool = True, device: str | torch.device = "cpu") -> GraphNet:
    """Train a :class:`GraphNet` by cross-entropy on the ID training graphs of ``seed``; resume from ``out``
    when it holds a checkpoint of the same config and seed (a different one is a :class:`CheckpointError`)."""
    device = torch.device(device)
    with _INIT_LOCK:
        torch.manual_seed(seed)
        model = GraphNet(cfg.model).to(device)
    tc = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    wanted = fingerprint(cfg, task.cfg, seed)
    state = {"step": 0, "losses": [], "seconds": 0.0}
    if out is not None and (Path(out) / STATE_FILE).is_file():
        state = _resume(Path(out), wanted, model, opt, device, load=load_gnn)
    graphs = training_graphs(task, cfg, seed)
    bar = tqdm(total=tc.steps, initial=state["step"], disable=not progress, desc=f"train GNN seed {seed}")
    model.train()
    started, running = time.perf_counter(), None
    for step in range(state["step"], tc.steps):
        batch = minibatch(graphs, tc.batch_size, seed, step).to(device)
        for group in opt.param_groups:
            group["lr"] = learning_rate(tc, step)
        loss = F.cross_entropy(model(batch), batch.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"graph training diverged at step {step} (loss {value}); lower graph.train.lr")
        running = value if running is None else 0.98 * running + 0.02 * value
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
            state["losses"].append([step, running])
        done = step + 1
        if out is not None and (done % tc.checkpoint_every == 0 or done == tc.steps):
            state.update(step=done, seconds=state["seconds"] + time.perf_counter() - started)
            started = time.perf_counter()
            _save(Path(out), model, opt, state, wanted, save=save_gnn)
    bar.close()
    return model.eval()


def is_graph_trained(folder: str | Path, cfg: GraphConfig, task: GraphTaskConfig, seed: int) -> bool:
    """Whether ``folder`` holds a finished training run of exactly this config and seed."""
    return finished(folder, fingerprint(cfg, task, seed), cfg.train.steps)


def find_shipped_graph_model(cfg: GraphConfig, task: GraphTaskConfig, seed: int, zoo: Path = ZOO) -> Path | None:
    """A shipped classifier trained with exactly this model, sampler, training config and seed, if any."""
    return find_shipped(fingerprint(cfg, task, seed), cfg.train.steps, zoo)
