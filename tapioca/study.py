"""The study pipeline: train (or load) -> prune (TALE, per protocol and target) -> evaluate -> results.

Every step writes its output into the run directory atomically and is skipped when that output exists, so
a killed study loses at most the step in flight (an interrupted TALE search resumes from its score cache).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tapioca.api import load_task, prune, resolve_device
from tapioca.config import Config, read_yaml, to_dict
from tapioca.errors import CheckpointError
from tapioca.evaluation import Evaluation, compare, evaluate, evaluate_references
from tapioca.io import environment, read_json, write_json, write_yaml
from tapioca.models.icl import ICLModel, load_model
from tapioca.pruning import PruneResult
from tapioca.tasks.polyreg import PolyRegTask
from tapioca.training import find_pretrained, is_trained, train

Log = Callable[[str], None]


class Timer:
    """Wall seconds per named step, summed, persisted to ``timings.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = read_json(path) if path.is_file() else {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            write_json(self.path, self.seconds)


def prepare_run_dir(cfg: Config, out: Path) -> None:
    """Create ``out`` with the resolved config and environment; refuse a run dir of another config."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    resolved = to_dict(cfg)
    if config_path.is_file():
        previous = read_yaml(config_path)
        if {k: v for k, v in previous.items() if k != "run"} != {k: v for k, v in resolved.items() if k != "run"}:
            raise CheckpointError(f"{str(out)!r} holds a run with a different config; use another --out or delete it")
    write_yaml(config_path, resolved)
    write_json(out / "environment.json", environment())


def model_for_seed(cfg: Config, seed: int, out: Path, timer: Timer, progress: bool, log: Log) -> ICLModel:
    """The model of replicate ``seed``: ``model.checkpoint`` (``{seed}`` is substituted), a shipped checkpoint
    trained with this exact config, or one trained now into ``out/models/seed<seed>``."""
    device = resolve_device(cfg.run.device)
    if cfg.model.checkpoint is not None:
        return load_model(cfg.model.checkpoint.format(seed=seed), device)
    shipped = find_pretrained(cfg, seed)
    if shipped is not None:
        log(f"seed {seed}: using the shipped checkpoint {shipped.name} (trained with this exact config)")
        return load_model(shipped, device)
    folder = out / "models" / f"seed{seed}"
    if is_trained(folder, cfg, seed):
        return load_model(folder, device)
    with timer("train"):
        return train(cfg, folder, seed=seed, progress=progress)


def cached_json(path: Path, compute: Callable[[], dict]) -> dict:
    """Read ``path`` if it exists, else compute, write atomically and return."""
    if path.is_file():
        return read_json(path)
    result = compute()
    write_json(path, result)
    return result


def cached_evaluation(path: Path, compute: Callable[[], Evaluation]) -> Evaluation:
    if path.is_file():
        return Evaluation.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = compute()
    result.save(path)
    return result


def run_study(cfg: Config, out: str | Path | None = None, progress: bool = True, log: Log = print) -> dict:
    """Run the whole pipeline for ``cfg`` into ``out`` (default ``cfg.run.out``) and return results.json."""
    out = Path(out if out is not None else cfg.run.out)
    prepare_run_dir(cfg, out)
    task = load_task(cfg)
    timer = Timer(out / "timings.json")
    seeds, n = list(cfg.evaluation.seeds), cfg.evaluation.n_heldout
    full, target, from_id, searches, quality = [], [], [], {}, {}
    for seed in seeds:
        model = model_for_seed(cfg, seed, out, timer, progress, log)
        with timer("prune"):
            searches[seed] = _searches(cfg, task, model, seed, out / "pruning" / f"seed{seed}", progress)
        with timer("evaluate"):
            ev_dir = out / "evaluation" / f"seed{seed}"
            run_eval = lambda gates, dists: evaluate(model, task, gates, dists, [seed], n, cfg.evaluation.batch_size)
            full.append(cached_evaluation(ev_dir / "full.npz", lambda: run_eval(None, task.distributions)))
            from_id.append(cached_evaluation(ev_dir / "from-id.npz",
                                             lambda: run_eval(searches[seed]["id"].gates, task.distributions)))
            for dist in task.distributions:
                target.append(cached_evaluation(ev_dir / f"target-{dist}.npz",
                                                lambda: run_eval(searches[seed][dist].gates, [dist])))
            quality[seed] = full[-1].mean("id", "nmse")
        log(f"seed {seed}: ID query NMSE {quality[seed]:.4f}; TALE removed (target=id) {searches[seed]['id'].removed}")
    with timer("statistics"):
        results = _results(cfg, task, Evaluation.concat(full), Evaluation.concat(target),
                           Evaluation.concat(from_id), searches)
    results["timings_seconds"] = timer.seconds
    write_json(out / "results.json", results)
    return results


def _searches(cfg: Config, task: PolyRegTask, model: ICLModel, seed: int, folder: Path, progress: bool) -> dict[str, PruneResult]:
    """TALE selected on each distribution (target protocol; the "id" search is also the from-id one)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for dist in task.distributions:
        compute = lambda: prune(model, task, cfg.pruning.search, "target", dist, cfg=cfg.pruning, seed=seed,
                                progress=progress, cache_path=folder / f".{dist}.scores.json").to_dict()
        out[dist] = PruneResult.from_dict(cached_json(folder / f"{cfg.pruning.search}-{dist}.json", compute))
    return out


def _results(cfg: Config, task: PolyRegTask, full: Evaluation, target: Evaluation, from_id: Evaluation,
             searches: dict[int, dict[str, PruneResult]]) -> dict:
    ev = cfg.evaluation
    seeds = list(ev.seeds)
    refs = evaluate_references(task, ["id"], seeds, ev.n_heldout)
    return {
        "quality": {
            "model_id_nmse": full.summary(ev.n_bootstrap, ev.confidence)["id"]["nmse"],
            "references_id_nmse": {name.split("/")[1]: float(v["nmse"].mean()) for name, v in refs.values.items()},
        },
        "full": full.summary(ev.n_bootstrap, ev.confidence),
        "protocols": {
            "target": {"delta": compare(full, target, task.distributions, ev.n_bootstrap, ev.confidence),
                       "pruned": target.summary(ev.n_bootstrap, ev.confidence)},
            "from-id": {"delta": compare(full, from_id, task.distributions, ev.n_bootstrap, ev.confidence),
                        "pruned": from_id.summary(ev.n_bootstrap, ev.confidence)},
        },
        "removed": {
            "target": {d: {str(s): searches[s][d].removed for s in seeds} for d in task.distributions},
            "from-id": {str(s): searches[s]["id"].removed for s in seeds},
        },
        "selection_metric": cfg.pruning.metric,
        "n_blocks": int(np.unique([r.n_blocks for per in searches.values() for r in per.values()])[0]),
    }
