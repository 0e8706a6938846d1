"""The notebook-level API: plain functions over a config, a model and a task (or a workload binding them).

Every function takes a :class:`~tapioca.tasks.base.Workload`, or a model and its task: a testbed model with a
:class:`~tapioca.tasks.polyreg.PolyRegTask`, or a :class:`~tapioca.models.hf.HFModel` with a
:class:`~tapioca.tasks.text.TextTask`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from tapioca.analysis.evaluation import Evaluation, check_split_size
from tapioca.config import Config, PruningConfig, from_dict, load_config, to_dict
from tapioca.errors import ConfigError
from tapioca.models.gates import Gates
from tapioca.models.icl import ICLModel, load_model
from tapioca.pruning.searches import (
    NEEDS_ID_REFERENCE, PrefixRounds, PruneResult, SearchContext, check_budget, get_search,
)
from tapioca.tasks import base
from tapioca.tasks.base import Workload
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


def workload(model: Any, task: Any = None, cfg: PruningConfig | None = None, **text_options: Any) -> Workload:
    """``model`` if it is already a workload, else ``model`` bound to ``task``. A testbed workload takes its
    selection sizes and metric from ``cfg``; a text workload takes ``text_options`` (``metric``, ``n_select``,
    ``n_heldout``, ``n_profile``, ``batch_size``, ``length_normalize``, ``max_new_tokens``, ``name``)."""
    if task is None:
        if not hasattr(model, "selection"):
            raise ConfigError(f"a {type(model).__name__} needs its task: pass a task, or a workload instead")
        return model
    if isinstance(task, PolyRegTask):
        from tapioca.tasks.testbed import TestbedWorkload

        return TestbedWorkload.from_pruning(cfg or PruningConfig(), model, task)
    from tapioca.tasks.text_workload import TextWorkload  # imports the text and Hugging Face stack only when needed

    return TextWorkload.for_model(model, task, **text_options)


TEXT_OPTIONS = ("metric", "n_select", "n_heldout", "n_profile", "batch_size", "length_normalize", "max_new_tokens",
                "name")  # what a text workload takes (TextWorkload.for_model)


def _is_text(task: Any) -> bool:
    return task is not None and not isinstance(task, PolyRegTask)


def selection_distribution(protocol: str, target: str, wl: Any) -> str:
    """The distribution a search selects on: ``target`` under protocol "target", "id" under "from-id"."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"pruning.protocol: unknown protocol {protocol!r}; allowed: {list(PROTOCOLS)}")
    if target not in wl.distributions:
        raise ConfigError(f"pruning.target: unknown distribution {target!r}; allowed: {wl.distributions}")
    return target if protocol == "target" else "id"


def prune(
    model: Any,
    task: Any = None,
    search: str = "tale",
    protocol: str = "target",
    target: str = "id",
    *,
    cfg: PruningConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    cache_path: str | Path | None = None,
    ray_options: dict[str, Any] | None = None,
    role: str = "select",
    per_example: dict | None = None,
    **overrides: Any,
) -> PruneResult:
    """Search which blocks to remove, scored on the selection split of the protocol's distribution.

    ``model``: a workload, or a model with its ``task`` (testbed or text). ``overrides`` replace fields of
    ``cfg`` (e.g. ``epsilon=0.05, max_drop=2``) with the usual checks; with a text task, the options of
    :data:`TEXT_OPTIONS` (``metric="loglik"``, ``n_select=64``, ...) describe its workload instead. The selection split (role "select") is
    disjoint from the held-out split used by :func:`evaluate`. ``workers=N`` (N >= 1) scores TALE's candidate
    rounds on N Ray workers (``ray_address``: join a cluster; ``ray_options`` go to
    :func:`~tapioca.pruning.parallel.parallel_tale`, e.g. ``{"num_gpus": 1}``), with the same selection as serial;
    one-shot searches have no rounds and run in-process. ``role``: the selection split (``"select.k"``: selection
    draw k, disjoint from the others; :mod:`tapioca.tasks.roles`). ``per_example``: a dict TALE fills with the
    per-example selection scores (B,) of every configuration it scores (key: the removed blocks, "1,3").
    """
    text_options = {k: overrides.pop(k) for k in TEXT_OPTIONS if k in overrides} if _is_text(task) else {}
    cfg = from_dict(PruningConfig, {**to_dict(cfg or PruningConfig()), "search": search, "protocol": protocol,
                                    "target": target, **overrides}, "pruning")
    wl = workload(model, task, cfg, **text_options)
    run_search = get_search(cfg.search)
    if cfg.workers and cfg.search != "tale":
        raise ConfigError(f"pruning.workers: {cfg.workers} applies only to search 'tale' (its candidate rounds); "
                          f"{cfg.search!r} runs in-process, use workers=0")
    check_budget(wl.model.n_blocks, cfg.max_drop, cfg.n_remove)
    check_split_size(wl.sizes.n_select, "pruning.n_select")
    dist = selection_distribution(cfg.protocol, cfg.target, wl)
    sel = wl.selection(dist, role, seed, wl.sizes.n_select)
    reference = None
    if cfg.search in NEEDS_ID_REFERENCE:  # ID inputs, for searches that compare against ID
        reference = sel.batch if dist == "id" else wl.selection("id", role, seed, wl.sizes.n_select).batch
    rounds = None
    if sel.unlabelled_parts is not None and cfg.prefix_cache and cfg.search == "sleb":
        model_u, batch_u, score_u = sel.unlabelled_parts
        rounds = PrefixRounds(model_u, batch_u, score_u, wl.sizes.select_chunk)
    ctx = SearchContext(
        model=sel.model, batch=sel.batch, scorer=sel.scorer, score_predictions=sel.score_predictions,
        prefix_cache=cfg.prefix_cache, epsilon=cfg.epsilon, max_drop=cfg.max_drop, choose=cfg.choose,
        n_remove=cfg.n_remove, seed=seed, chunk=wl.sizes.select_chunk, progress=progress,
        cache_path=Path(cache_path) if cache_path is not None else None, reference_batch=reference,
        racing_delta=cfg.racing_delta, racing_min=cfg.racing_min, unlabelled_scorer=sel.unlabelled, unlabelled_rounds=rounds,
        where=f"model {wl.name} on distribution {dist} (selection)", per_example=per_example,
    )
    if cfg.workers:
        result = _parallel_tale(ctx, wl, cfg, ray_options)
    else:
        result = run_search(ctx)
    result.info.update(protocol=cfg.protocol, target=cfg.target, selected_on=dist, metric=wl.selection_metric,
                       n_select=wl.sizes.n_select, seed=seed, role=role, **wl.search_info)
    return result


def _parallel_tale(ctx: SearchContext, wl: Workload, cfg: PruningConfig, ray_options: dict[str, Any] | None) -> PruneResult:
    """TALE with candidates on ``cfg.workers`` Ray workers, each holding a replica of the workload's model."""
    from tapioca.pruning.parallel import parallel_tale, require_ray

    if ctx.score_predictions is None:
        raise ConfigError(f"pruning.workers: Ray workers score a candidate from one forward pass, but selection "
                          f"metric {wl.selection_metric!r} scores by generation on the driver; use a "
                          "log-likelihood metric or workers=0")
    require_ray("pruning.workers", cfg.workers)
    return parallel_tale(ctx, wl.replica(), workers=cfg.workers, address=cfg.ray_address, **(ray_options or {}))


def evaluate(
    model: Any,
    task: Any = None,
    gates: Gates | None = None,
    distributions: Iterable[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    n: int = 2048,
    chunk: int = 1024,
    progress: bool = False,
    **text_options: Any,
) -> Evaluation:
    """Score ``model`` (a workload, or a model with its ``task``) with ``gates`` on ``n`` held-out examples per
    seed of each distribution, ``chunk`` rows per forward pass."""
    check_split_size(n, "evaluation.n_heldout")
    wl = workload(model, task, **text_options)
    wl = dataclasses.replace(wl, sizes=dataclasses.replace(wl.sizes, n_heldout=n, eval_chunk=chunk))
    dists = list(distributions) if distributions is not None else wl.distributions
    return Evaluation.concat([base.evaluate(wl, gates, dist, seed, n)
                              for dist in tqdm(dists, disable=not progress, desc="evaluate", leave=False)
                              for seed in seeds])


def save_pruned(model: Any, removed: Sequence[int] | PruneResult, path: str | Path,
                provenance: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a workload, a causal LM :class:`~tapioca.models.hf.HFModel` or a testbed model) without
    the ``removed`` blocks (a list, or a :class:`PruneResult` whose chosen blocks and search are recorded) to
    the folder ``path``. A language model becomes a normal Hugging Face folder
    (:func:`tapioca.models.hf_save.save_pruned`, with ``tapioca_pruning.json``); a testbed model a
    ``tapioca load``-able folder of its sliced blocks. Returns ``path``."""
    model = getattr(model, "model", model) if hasattr(model, "selection") else model  # a workload's model
    if isinstance(removed, PruneResult):
        provenance = {"search": removed.search, "selection_score": removed.selection_score,
                      "baseline_score": removed.baseline_score, "removed_in_order": list(removed.removed),
                      "search_info": removed.info, **(provenance or {})}
        removed = removed.removed
    if isinstance(model, ICLModel):
        from tapioca.models.icl import save_model

        from tapioca.models.hf_structure import _kept

        _kept(model.n_blocks, list(removed))  # one-line errors for bad indices or removing every block
        folder = Path(path)
        save_model(model.slice_blocks(list(removed)), folder,
                   {"pruning": {"removed": sorted(int(r) for r in removed), "n_blocks_original": model.n_blocks,
                                **(provenance or {})}})
        return folder
    from tapioca.models.hf_save import save_pruned as save_hf

    if not hasattr(model, "pruned_copy"):
        raise ConfigError(f"cannot save a pruned {type(model).__name__}: expected a causal LM (HFModel), a testbed "
                          "model or a workload of one")
    return save_hf(model, removed, path, provenance)


def check(base: Any, pruned: Any, cfg: Config | str | Path, out: str | Path | None = "runs/check",
          progress: bool = False) -> dict[str, Any]:
    """The three tests of ``tapioca check`` on two causal LMs (folders, installed names or HFModels; the pruned
    one from any tool): held-out ID accuracy, OOD accuracy per shift and calibration, with paired-bootstrap
    CIs, MDEs and a verdict per test (:mod:`tapioca.study.check`). ``cfg``: a Config or YAML path whose
    ``lm.task`` is the text task. Returns the ``check.json`` data; writes it with the report into ``out``."""
    from tapioca.study.check import run_check

    if not isinstance(cfg, Config):
        name = getattr(getattr(base, "source", None), "path", None) or (base if isinstance(base, (str, Path)) else "base")
        cfg = load_config(cfg, [f"lm.model={json.dumps(str(name))}"])
    return run_check(cfg, base, pruned, out, progress)
