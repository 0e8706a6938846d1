"""The notebook-level API: plain functions over a config, a model and a task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tapioca.config import Config, PruningConfig, from_dict, to_dict
from tapioca.errors import ConfigError
from tapioca.analysis.evaluation import check_split_size, selection_scorer
from tapioca.models.base import BlockModel
from tapioca.models.icl import ICLModel, load_model
from tapioca.pruning.parallel import ICLReplica, parallel_tale, require_ray
from tapioca.pruning.searches import NEEDS_ID_REFERENCE, PruneResult, SearchContext, check_budget, get_search
from tapioca.tasks.polyreg import PolyRegTask

PROTOCOLS = ("target", "from-id")


def load_task(cfg: Config) -> PolyRegTask:
    """The task described by ``cfg.task``."""
    return PolyRegTask(cfg.task)


def resolve_device(name: str) -> torch.device:
    """A torch device, or a clear error when it is not available here."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"run.device: {name!r} is not a device name ({err}); allowed: cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} is not available on this machine (no CUDA GPU); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"run.device: {name!r} is not available; this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device: {name!r} is not available on this machine; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"run.device: {name!r} is not supported; allowed: cpu, cuda, cuda:N, mps")
    return device


def load(path: str | Path, device: str = "cpu") -> ICLModel:
    """Load a trained testbed model folder (``model.safetensors`` + ``model.json``)."""
    return load_model(path, resolve_device(device))


def selection_distribution(protocol: str, target: str, task: PolyRegTask) -> str:
    """The distribution a search selects on: ``target`` under protocol "target", "id" under "from-id"."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"pruning.protocol: unknown protocol {protocol!r}; allowed: {list(PROTOCOLS)}")
    if target not in task.distributions:
        raise ConfigError(f"pruning.target: unknown distribution {target!r}; allowed: {task.distributions}")
    return target if protocol == "target" else "id"


def _id_reference(task: PolyRegTask, cfg: PruningConfig, dist: str, batch, seed: int):
    """ID selection inputs for searches that compare against ID (drawn only when the search needs them)."""
    if cfg.search not in NEEDS_ID_REFERENCE:
        return None
    return batch if dist == "id" else task.data("id", "select", seed, cfg.n_select)


def prune(
    model: BlockModel,
    task: PolyRegTask,
    search: str = "tale",
    protocol: str = "target",
    target: str = "id",
    *,
    cfg: PruningConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    cache_path: str | Path | None = None,
    **overrides: Any,
) -> PruneResult:
    """Search which blocks to remove, scored on the selection split of the protocol's distribution.

    ``overrides`` replace fields of ``cfg`` (e.g. ``epsilon=0.05, max_drop=2``) with the usual checks.
    The selection split (role "select") is disjoint from the held-out split used by :func:`evaluate`.
    ``workers=N`` (N >= 1) scores TALE's candidate rounds on N Ray workers (``ray_address``: join a cluster),
    with the same selection as serial; one-shot searches have no rounds and run in-process.
    """
    cfg = from_dict(PruningConfig, {**to_dict(cfg or PruningConfig()), "search": search, "protocol": protocol,
                                    "target": target, **overrides}, "pruning")
    run_search = get_search(cfg.search)
    check_budget(model.n_blocks, cfg.max_drop, cfg.n_remove)
    check_split_size(cfg.n_select, "pruning.n_select")
    dist = selection_distribution(cfg.protocol, cfg.target, task)
    batch = task.data(dist, "select", seed, cfg.n_select)
    ctx = SearchContext(
        model=model, batch=batch, scorer=selection_scorer(model, task, batch, cfg.metric, cfg.batch_size),
        score_predictions=lambda preds, b: task.score(preds, b, cfg.metric), prefix_cache=cfg.prefix_cache,
        epsilon=cfg.epsilon, max_drop=cfg.max_drop, choose=cfg.choose, n_remove=cfg.n_remove, seed=seed, chunk=cfg.batch_size,
        progress=progress, cache_path=Path(cache_path) if cache_path is not None else None,
        reference_batch=_id_reference(task, cfg, dist, batch, seed),
        racing_delta=cfg.racing_delta, racing_min=cfg.racing_min,
    )
    result = _parallel_tale(ctx, model, cfg) if cfg.workers and cfg.search == "tale" else run_search(ctx)
    result.info.update(protocol=cfg.protocol, target=cfg.target, selected_on=dist, metric=cfg.metric,
                       n_select=cfg.n_select, seed=seed)
    return result


def _parallel_tale(ctx: SearchContext, model: BlockModel, cfg: PruningConfig) -> PruneResult:
    """TALE with candidates on ``cfg.workers`` Ray workers, each holding a replica of the testbed ``model``."""
    require_ray("pruning.workers", cfg.workers)
    if not isinstance(model, ICLModel):
        raise ConfigError(f"pruning.workers: Ray workers rebuild testbed models (ICLModel), not "
                          f"{type(model).__name__}; use tapioca.pruning.parallel.parallel_tale with a factory")
    return parallel_tale(ctx, ICLReplica.of(model), workers=cfg.workers, address=cfg.ray_address)
