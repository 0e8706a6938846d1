"""Training the ICL testbed: curriculum, progress bar, periodic checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import pickle
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from tapioca.config import Config, GraphTrainConfig, SamplerParams, TrainConfig, to_dict
from tapioca.errors import CheckpointError
from tapioca.io import read_json, write_json
from tapioca.models.icl import ICLModel, load_model, save_model
from tapioca.tasks.polyreg import PolyRegTask, sample_prompts, split_seed, y_variance

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
BEST_FOLDER = "best"  # train.restore_best: the weights of the lowest point of the ID curve so far
CURVE_PROMPTS = 512  # fixed ID prompts scored at every checkpoint: the training curve
FLAT_FRACTION = 0.25  # curve_status looks at the last quarter of the steps so far ...
FLAT_TOLERANCE = 0.05  # ... and calls the ID error flat when it improved by less than 5 % (relative) there


def curriculum(train: TrainConfig, sampler: SamplerParams, step: int) -> SamplerParams:
    """The sampler at ``step``: prompts grow from ``curriculum_points_start`` to ``sampler.n_points`` and
    the degrees (sorted) are added one by one over ``curriculum_degree_steps`` steps."""
    grown = train.curriculum_points_start + (step // train.curriculum_interval) * train.curriculum_points_step
    n_points = min(sampler.n_points, grown)
    degrees = sorted(sampler.degrees)
    n_degrees = len(degrees)
    if train.curriculum_degree_steps > 0:
        n_degrees = min(len(degrees), 1 + step * len(degrees) // train.curriculum_degree_steps)
    return dataclasses.replace(sampler, n_points=n_points, degrees=tuple(degrees[:n_degrees]))


def curriculum_end(train: TrainConfig, sampler: SamplerParams) -> int:
    """The first step at which :func:`curriculum` gives the full sampler (prompt length and every degree)."""
    grow = max(0, sampler.n_points - train.curriculum_points_start)
    points = -(-grow // train.curriculum_points_step) * train.curriculum_interval
    return max(points, train.curriculum_degree_steps)


def curve_status(curve: list[list[float]]) -> dict[str, Any]:
    """Whether an ID validation curve ``[[step, NMSE], ...]`` stopped improving: ``flat`` when the best NMSE of
    the last FLAT_FRACTION of the steps is less than FLAT_TOLERANCE (relative) below the best before it,
    ``improving`` otherwise, ``not recorded`` without enough points. ``last_gain`` is that relative gain."""
    points = [(float(s), float(v)) for s, v in curve or []]
    if len(points) < 3:
        return {"status": "not recorded", "last_gain": None}
    cut = points[-1][0] * (1 - FLAT_FRACTION)
    before = [v for s, v in points if s <= cut]
    after = [v for s, v in points if s > cut]
    if not before or not after:
        return {"status": "not recorded", "last_gain": None}
    gain = 1.0 - min(after) / min(before) if min(before) > 0 else 0.0
    return {"status": "flat" if gain < FLAT_TOLERANCE else "improving", "last_gain": gain}


def stops_flat(train: TrainConfig, sampler: SamplerParams, curve: list[list[float]]) -> bool:
    """``train.stop_when_flat``: stop now? Counting only the curve after the curriculum, once it spans more than
    ``train.flat_patience`` steps: stop when the best NMSE of the last ``flat_patience`` steps is less than
    FLAT_TOLERANCE (relative) below the best before them, i.e. no new best in that long."""
    if not train.stop_when_flat:
        return False
    after = [(float(s), float(v)) for s, v in curve if s >= curriculum_end(train, sampler)]
    if not after:
        return False
    cut = after[-1][0] - train.flat_patience
    before = [v for s, v in after if s <= cut]
    recent = [v for s, v in after if s > cut]
    return bool(before and recent) and min(recent) > (1 - FLAT_TOLERANCE) * min(before)


def learning_rate(train: TrainConfig | GraphTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``train.lr`` (``schedule: constant``: ``train.lr``)."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return train.lr
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    return train.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _fingerprint(cfg: Config, seed: int) -> dict:
    """What must match for a checkpoint to be resumed (everything that changes the trained weights)."""
    return {"model": to_dict(cfg.model) | {"checkpoint": None}, "sampler": to_dict(cfg.task.sampler),
            "train": to_dict(cfg.train), "seed": seed}


_INIT_LOCK = threading.Lock()


def train(cfg: Config, out: str | Path | None = None, seed: int | None = None, progress: bool = True) -> ICLModel:
    """Train an ICL model on the ID sampler of ``cfg``; resume from ``out`` if it holds a checkpoint.

    Every ``train.checkpoint_every`` steps the weights (safetensors), optimizer state and step are saved to
    ``out`` atomically, so a killed run resumes where it stopped and reaches the same final weights. With
    ``train.stop_when_flat`` (and ``out``) training ends at the first checkpoint where :func:`stops_flat`; with
    ``train.restore_best`` (and ``out``) the model returned and left in ``out`` is the checkpoint of lowest ID
    validation NMSE (its step recorded as ``kept_step``), while training resumes from the last.
    """
    seed = cfg.run.seed if seed is None else seed
    device = torch.device(cfg.run.device)
    with _INIT_LOCK:  # the global RNG: seeds trained in parallel threads must not interleave their draws
        torch.manual_seed(seed)
        model = ICLModel(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    fingerprint = _fingerprint(cfg, seed)
    state = {"step": 0, "losses": [], "seconds": 0.0}
    if out is not None and (Path(out) / STATE_FILE).is_file():
        state = _resume(Path(out), fingerprint, model, opt, device)
    bar = tqdm(total=cfg.train.steps, initial=state["step"], disable=not progress, desc=f"train seed {seed}")
    model.train()
    forward = torch.compile(model) if cfg.train.compile else model
    started, running = time.perf_counter(), None
    first = cfg.train.steps if state.get("stopped_flat") else state["step"]  # a flat stop is final
    with matmul_precision(cfg.train.precision):
        for step in range(first, cfg.train.steps):
            loss = _train_step(forward, opt, cfg, seed, step)
            running = loss if running is None else 0.98 * running + 0.02 * loss
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged at step {step} (loss {loss}); lower train.lr")
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{running:.4f}")
                state["losses"].append([step, running])
            done = step + 1
            if out is not None and (done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps):
                state.update(step=done, seconds=state["seconds"] + time.perf_counter() - started)
                state["id_curve"] = state.get("id_curve", []) + [[done, validation_nmse(model, cfg, seed)]]
                if done < cfg.train.steps and stops_flat(cfg.train, cfg.task.sampler, state["id_curve"]):
                    state["stopped_flat"] = done
                started = time.perf_counter()
                if cfg.train.restore_best and best_step(state["id_curve"]) == done:
                    save_model(model, Path(out) / BEST_FOLDER, _info(state, fingerprint))
                _save(Path(out), model, opt, state, fingerprint)
                if state.get("stopped_flat"):
                    break
    bar.close()
    if out is not None and cfg.train.restore_best and state.get("id_curve"):
        _keep_best(Path(out), model, state, fingerprint, device)
    return model.eval()


def best_step(curve: list[list[float]]) -> int:
    """The step of the lowest NMSE of an ID validation curve ``[[step, NMSE], ...]`` (the earliest on ties)."""
    return int(min(curve, key=lambda point: (point[1], point[0]))[0])


def _keep_best(folder: Path, model: ICLModel, state: dict, fingerprint: dict, device: torch.device) -> None:
    """``train.restore_best``: load the best checkpoint's weights into ``model`` and make them the folder's
    model, recording ``kept_step``; the resumable ``checkpoint-<step>/`` stays the last one."""
    kept = best_step(state["id_curve"])
    if kept != state["step"]:
        model.load_state_dict(load_model(folder / BEST_FOLDER, device).state_dict())
    info = _info(state, fingerprint)
    info["training"]["kept_step"] = kept
    save_model(model, folder, info)


@torch.no_grad()
def validation_nmse(model: ICLModel, cfg: Config, seed: int, n: int = CURVE_PROMPTS) -> float:
    """ID query NMSE on ``n`` fixed prompts of the full ID sampler (their own split, never trained on): one
    point of the training curve. Leaves the model in training mode and the global RNG untouched."""
    gen = torch.Generator().manual_seed(split_seed(seed, "id", "train-curve"))
    batch = sample_prompts(cfg.task.sampler, n, gen).to(model.device)
    model.eval()
    pred = model(batch.xs, batch.ys)[:, -1]
    model.train()
    return float((pred.double() - batch.query_y.double()).square().mean() / y_variance(cfg.task.sampler))


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """``tf32``: float32 matmuls and convolutions may use TF32 (CUDA) inside the block; restored after."""
    if precision != "tf32":
        yield
        return
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, seed: int, step: int) -> float:
    """One optimiser step on a fresh batch; the batch depends only on (seed, step), so resume is exact."""
    params = curriculum(cfg.train, cfg.task.sampler, step)
    gen = torch.Generator().manual_seed(split_seed(seed, f"train-step-{step}", "train"))
    batch = sample_prompts(params, cfg.train.batch_size, gen).to(model.device)
    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg.train, step)
    with torch.autocast(batch.xs.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
        pred = model(batch.xs, batch.ys)
    loss = (pred.float() - batch.ys).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    opt.step()
    return loss.item()


def _save(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict, fingerprint: dict,
          save: Callable[..., None] = save_model) -> None:
    """Write weights + optimizer into a new ``checkpoint-<step>/`` folder, then atomically point
    ``train_state.json`` at it: a kill at any moment leaves the previous complete set in force."""
    info = _info(state, fingerprint)
    checkpoint = folder / f"checkpoint-{state['step']}"
    save(model, checkpoint, info)
    torch.save(opt.state_dict(), checkpoint / OPTIMIZER_FILE)
    write_json(folder / STATE_FILE, state | {"fingerprint": fingerprint, "checkpoint": checkpoint.name})
    save(model, folder, info)  # the latest weights, loadable by ``load(folder)``
    for old in folder.glob("checkpoint-*"):
        if old != checkpoint:
            shutil.rmtree(old, ignore_errors=True)


def _info(state: dict, fingerprint: dict) -> dict:
    """What a saved model records of its training (``model.json``'s ``training``)."""
    stopped = {"stopped_flat": state["stopped_flat"]} if state.get("stopped_flat") else {}
    return {"training": fingerprint | {"steps_done": state["step"], "seconds": state["seconds"],
                                      "id_curve": state.get("id_curve", []), "train_loss": state["losses"]}
            | stopped}


def _resume(folder: Path, fingerprint: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device,
            load: Callable[..., torch.nn.Module] = load_model) -> dict:
    try:
        state = read_json(folder / STATE_FILE)
    except ValueError as err:
        raise CheckpointError(f"training state {str(folder / STATE_FILE)!r} is corrupt: {err}") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{str(folder)!r} holds a checkpoint trained with a different config or seed; "
            "use another --out or delete it"
        )
    checkpoint = folder / str(state.get("checkpoint"))
    model.load_state_dict(load(checkpoint, device).state_dict())
    try:
        opt.load_state_dict(torch.load(checkpoint / OPTIMIZER_FILE, map_location=device, weights_only=True))
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"optimizer state in {str(checkpoint)!r} is missing or corrupt: {err}") from None
    return {k: v for k, v in state.items() if k not in ("fingerprint", "checkpoint")}


def is_trained(folder: str | Path, cfg: Config, seed: int) -> bool:
    """Whether ``folder`` holds a finished training run of exactly this config and seed."""
    return finished(folder, _fingerprint(cfg, seed), cfg.train.steps)


def finished(folder: str | Path, fingerprint: dict, steps: int) -> bool:
    """Whether ``folder`` holds a finished training run (``steps`` done, or stopped on a flat curve) with this
    fingerprint."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return False
    state = read_json(path)
    return (isinstance(state, dict) and state.get("fingerprint") == fingerprint
            and (state.get("step") == steps or bool(state.get("stopped_flat"))))


ZOO = Path(__file__).resolve().parents[1] / "zoo"  # tapioca/zoo


def find_pretrained(cfg: Config, seed: int, zoo: Path = ZOO) -> Path | None:
    """A shipped checkpoint trained with exactly this model, sampler, training config and seed, if any."""
    return find_shipped(_fingerprint(cfg, seed), cfg.train.steps, zoo)


def find_shipped(wanted: dict, steps: int, zoo: Path = ZOO) -> Path | None:
    """A shipped checkpoint folder whose recorded training has fingerprint ``wanted`` and ran ``steps`` steps (or
    stopped earlier on a flat curve)."""
    for meta_path in sorted(zoo.glob("*/model.json")):
        info = read_json(meta_path).get("training", {})
        fingerprint = {k: info.get(k) for k in wanted}
        if fingerprint == wanted and (info.get("steps_done") == steps or info.get("stopped_flat")):
            return meta_path.parent
    return None


def trained_model_folder(cfg: Config, seed: int, out: Path) -> Path | None:
    """Where replicate ``seed``'s testbed model already is: ``model.checkpoint`` (``{seed}`` substituted), a
    shipped checkpoint trained with this exact config, or a finished training in ``out/models/seed<seed>``;
    None when it must still be trained."""
    if cfg.model.checkpoint is not None:
        return Path(cfg.model.checkpoint.format(seed=seed))
    shipped = find_pretrained(cfg, seed)
    if shipped is not None:
        return shipped
    folder = out / "models" / f"seed{seed}"
    return folder if is_trained(folder, cfg, seed) else None


def training_record(folder: str | Path) -> dict | None:
    """What a checkpoint folder's ``model.json`` records of its training: steps, seconds, the ID validation
    curve ``id_curve`` ([[step, NMSE], ...]; empty for checkpoints saved before curves were recorded) and the
    running training loss; None when the folder has no training record (e.g. a hand-made checkpoint)."""
    path = Path(folder) / "model.json"
    info = read_json(path).get("training") if path.is_file() else None
    if not isinstance(info, dict):
        return None
    return {"folder": str(folder), "steps_done": info.get("steps_done"), "seconds": info.get("seconds"),
            "id_curve": info.get("id_curve", []), "train_loss": info.get("train_loss", []),
            "stopped_flat": info.get("stopped_flat"), "kept_step": info.get("kept_step")}
