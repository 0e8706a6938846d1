"""The study pipeline: train (or load) -> prune (TALE, per protocol and target) -> evaluate -> results.

Every step writes its output into the run directory atomically and is skipped when that output exists, so
a killed study loses at most the step in flight (an interrupted TALE search resumes from its score cache).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from tapioca.study import controls
from tapioca.report.claims import verdicts
from tapioca.api import load_task, prune, resolve_device
from tapioca.config import Config, read_yaml, to_dict
from tapioca.errors import CheckpointError, TapiocaError
from tapioca.analysis.evaluation import Evaluation, compare, evaluate_references
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.analysis.geometry import Profile, distortion, profile, query_states
from tapioca.io import environment, read_json, write_json, write_yaml
from tapioca.models.gates import removal_gates
from tapioca.models.icl import ICLModel, load_model
from tapioca.pruning.searches import PruneResult
from tapioca.study.scales import run_scales
from tapioca.tasks.polyreg import PolyRegTask
from tapioca.models.training import find_pretrained, is_trained, train

Log = Callable[[str], None]
T = TypeVar("T")


class StudyStopped(TapiocaError):
    """A seed stopped because another seed of the same study failed."""


class Timer:
    """Wall seconds per named step, summed (over seeds, also when seeds run in parallel threads), persisted to
    ``timings.json``. ``before_step`` runs in the calling thread as each step starts."""

    def __init__(self, path: Path, before_step: Callable[[], None] | None = None) -> None:
        self.path, self.before_step = path, before_step
        self.seconds: dict[str, float] = read_json(path) if path.is_file() else {}
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.before_step is not None:
            self.before_step()
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                write_json(self.path, self.seconds)


class SeedThreads:
    """Runs replicate seeds in parallel threads and shares this process's torch CPU threads among the seeds
    running at once: each seed sets its own thread's count as each of its steps starts (:meth:`fit`), so a
    seed left alone at the end gets every thread back. Per-example results do not depend on it (the kernels
    give the same numbers with 1 or 2 threads; tests check the parallel study against the serial one).
    After an error in one seed the others stop at their next step."""

    def __init__(self, workers: int, threads: int | None = None, progress: bool = False) -> None:
        self.workers, self.progress = workers, progress
        self.threads = threads if threads is not None else torch.get_num_threads()
        self._running = 0
        self._lock = threading.Lock()
        self._failed = threading.Event()

    def fit(self) -> None:
        """Called at a step boundary by the seed's own thread."""
        if self._failed.is_set():
            raise StudyStopped("another seed failed; this one stops at a step boundary")
        if self.workers > 1:
            torch.set_num_threads(max(1, self.threads // max(1, self._running)))

    def map(self, run: Callable[[int], T], seeds: list[int]) -> dict[int, T]:
        """``{seed: run(seed)}``, ``workers`` seeds at a time (in order when ``workers`` is 1)."""
        if self.workers <= 1 or len(seeds) <= 1:
            return {seed: run(seed) for seed in seeds}

        def one(seed: int) -> T:
            with self._lock:
                self._running += 1
            try:
                return run(seed)
            except BaseException:
                self._failed.set()
                raise
            finally:
                with self._lock:
                    self._running -= 1

        pool = ThreadPoolExecutor(min(self.workers, len(seeds)), thread_name_prefix="tapioca-seed")
        try:
            futures = {seed: pool.submit(one, seed) for seed in seeds}
            bar = tqdm(total=len(seeds), disable=not self.progress, desc=f"seeds ({self.workers} at once)")
            for _ in as_completed(futures.values()):
                bar.update(1)
            bar.close()
            errors = [e for f in futures.values() if (e := f.exception()) is not None]
            if errors:  # the error that stopped the study, not the stops it caused
                raise next((e for e in errors if not isinstance(e, StudyStopped)), errors[0])
            return {seed: future.result() for seed, future in futures.items()}
        except BaseException:
            self._failed.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def seed_workers(cfg: Config) -> int:
    """``run.seed_workers``, or (None) on a CPU device one per seed, up to twice the CPU threads (3 seeds on 2
    cores all run at once, one thread each, and finish together instead of leaving the last one alone), else 1."""
    if cfg.run.seed_workers is not None:
        return cfg.run.seed_workers
    if resolve_device(cfg.run.device).type != "cpu":
        return 1
    return max(1, min(len(cfg.evaluation.seeds), 2 * torch.get_num_threads()))


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


@dataclass
class SeedOutputs:
    """Everything one replicate seed contributes to the results."""

    searches: dict[str, PruneResult]
    full: Evaluation
    from_id: Evaluation
    target: Evaluation
    profiles: dict
    methods: dict[str, dict[str, Evaluation]] = field(default_factory=dict)
    causal: dict[str, dict] = field(default_factory=dict)


def run_study(cfg: Config, out: str | Path | None = None, progress: bool = True, log: Log = print) -> dict:
    """Run the whole pipeline for ``cfg`` into ``out`` (default ``cfg.run.out``) and return results.json.
    A config with ``scales`` runs every scale's study and returns the multi-scale results instead; one with
    an ``lm`` section runs the study on that causal LM and text task (:mod:`tapioca.study.lm_steps`)."""
    out = Path(out if out is not None else cfg.run.out)
    if cfg.scales:
        return run_scales(cfg, out, progress, log)
    if cfg.lm is not None:
        from tapioca.study.lm_steps import run_lm_study  # imports the text and Hugging Face stack only when needed

        return run_lm_study(cfg, out, progress, log)
    prepare_run_dir(cfg, out)
    task = load_task(cfg)
    seeds = SeedThreads(seed_workers(cfg), progress=progress)
    timer = Timer(out / "timings.json", before_step=seeds.fit)
    try:
        per_seed = seeds.map(lambda seed: _run_seed(cfg, task, seed, out, timer, progress and seeds.workers == 1, log),
                             list(cfg.evaluation.seeds))
    finally:
        torch.set_num_threads(seeds.threads)
    with timer("statistics"):
        searches = {seed: o.searches for seed, o in per_seed.items()}
        full = Evaluation.concat([o.full for o in per_seed.values()])
        target = Evaluation.concat([o.target for o in per_seed.values()])
        results = _results(cfg, task, full, target, Evaluation.concat([o.from_id for o in per_seed.values()]),
                           searches)
        results["geometry"] = distortion_summary({s: o.profiles for s, o in per_seed.items()}, task.distributions)
        if cfg.geometry.controls:
            results["comparisons"] = _comparison_table(cfg, full, target, {s: o.methods for s, o in per_seed.items()},
                                                       searches)
            results["interventions"] = intervention_table({s: o.causal for s, o in per_seed.items()})
        results["claims"] = verdicts(results)
    results["timings_seconds"] = timer.seconds
    write_json(out / "results.json", results)
    return results


def _run_seed(cfg: Config, task: PolyRegTask, seed: int, out: Path, timer: Timer, progress: bool, log: Log) -> SeedOutputs:
    """Model, searches, held-out evaluations, profiles and controls of one replicate seed (each cached)."""
    n, chunk = cfg.evaluation.n_heldout, cfg.evaluation.batch_size
    model = model_for_seed(cfg, seed, out, timer, progress, log)
    with timer("prune"):
        searches = _searches(cfg, task, model, seed, out / "pruning" / f"seed{seed}", progress)
    runs = HeldoutRuns(model, task, seed, n, chunk)
    baselines: dict[str, dict[str, PruneResult]] = {}
    if cfg.geometry.controls:
        with timer("comparisons"):
            baselines = _baseline_selections(cfg, task, model, seed, searches, out)
    with timer("evaluate"):
        full, from_id, target = _evaluations(task, searches, runs, out / "evaluation" / f"seed{seed}",
                                             _pending_baselines(baselines, out / "controls" / f"seed{seed}"))
    with timer("geometry"):
        profiles = cached_json(out / "geometry" / f"seed{seed}.json",
                               lambda: _profiles(cfg, task, model, seed, searches))
    outputs = SeedOutputs(searches, full, from_id, target, profiles)
    if cfg.geometry.controls:
        with timer("comparisons"):
            outputs.methods = _comparisons(cfg, task, model, seed, searches, baselines, full, out, runs)
        with timer("interventions"):
            id_profiles: dict = {}  # gated ID profiles, shared by every shift's sweeps of this seed
            outputs.causal = {
                t: cached_json(out / "interventions" / f"seed{seed}" / f"{t}.json",
                               lambda: controls.interventions(cfg, task, model, seed, t, searches[t], id_profiles))
                for t in task.distributions if t != "id" and searches[t].removed}
    log(f"seed {seed}: ID query NMSE {full.mean('id', 'nmse'):.4f}; TALE removed (target=id) {searches['id'].removed}")
    return outputs


def _evaluations(task: PolyRegTask, searches: dict[str, PruneResult], runs: HeldoutRuns, folder: Path,
                 also: list[tuple[list[int], list[str]]] = ()) -> tuple[Evaluation, Evaluation, Evaluation]:
    """Held-out evaluations of the full model, the from-id pruned model (every distribution) and the
    target-protocol pruned model (each on its own distribution), each cached in ``folder``. Missing ones are
    computed distribution by distribution so each distribution's full-model pass is shared, together with
    the (removed, distributions) runs in ``also`` (kept in ``runs`` for later steps)."""
    dists = task.distributions
    plan = {"full.npz": ([], dists), "from-id.npz": (searches["id"].removed, dists),
            **{f"target-{d}.npz": (searches[d].removed, [d]) for d in dists}}
    todo = [(removed, ds) for name, (removed, ds) in plan.items() if not (folder / name).is_file()]
    todo += list(also)
    for dist in dists:
        for removed, ds in todo:
            if dist in ds:
                runs.one(removed, dist)
    ev = {name: cached_evaluation(folder / name, lambda removed=removed, ds=ds: runs(removed, ds))
          for name, (removed, ds) in plan.items()}
    return ev["full.npz"], ev["from-id.npz"], Evaluation.concat([ev[f"target-{d}.npz"] for d in dists])


def _searches(cfg: Config, task: PolyRegTask, model: ICLModel, seed: int, folder: Path, progress: bool) -> dict[str, PruneResult]:
    """TALE selected on each distribution (target protocol; the "id" search is also the from-id one)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for dist in task.distributions:
        compute = lambda: prune(model, task, cfg.pruning.search, "target", dist, cfg=cfg.pruning, seed=seed,
                                progress=progress, cache_path=folder / f".{dist}.scores.json").to_dict()
        out[dist] = PruneResult.from_dict(cached_json(folder / f"{cfg.pruning.search}-{dist}.json", compute))
    return out


def _profiles(cfg: Config, task: PolyRegTask, model: ICLModel, seed: int, searches: dict[str, PruneResult]) -> dict:
    """Norm and pairwise-distance profiles of every distribution for the full model, the target-protocol
    pruned model (on its target and on ID) and the from-id pruned model; plus a second, disjoint ID sample
    for the noise floor. Prompts come from the "reference" role, disjoint from selection and held-out."""
    n, chunk = cfg.geometry.n_prompts, cfg.evaluation.batch_size
    data = {d: task.data(d, "reference", seed, 2 * n if d == "id" else n) for d in task.distributions}
    id_a, id_b = data["id"].slice(0, n), data["id"].slice(n, 2 * n)
    data["id"] = id_a
    memo: dict[tuple, dict] = {}

    def prof(dist: str, removed: list[int], batch=None) -> dict:
        key = (dist if batch is None else "id_b", tuple(removed))
        if key not in memo:
            states = query_states(model, data[dist] if batch is None else batch, removal_gates(removed), chunk)
            memo[key] = profile(states).to_dict()
        return memo[key]

    id_removed = searches["id"].removed
    return {
        "full": {d: prof(d, []) for d in task.distributions},
        "id_b": prof("id", [], id_b),
        "target": {d: {"ood": prof(d, searches[d].removed), "id": prof("id", searches[d].removed)}
                   for d in task.distributions},
        "from-id": {"ood": {d: prof(d, id_removed) for d in task.distributions}, "id": prof("id", id_removed)},
    }


def _baseline_selections(cfg: Config, task: PolyRegTask, model: ICLModel, seed: int,
                         searches: dict[str, PruneResult], out: Path) -> dict[str, dict[str, PruneResult]]:
    """Per shift where TALE removed blocks, each one-shot baseline's selection (cached as
    ``controls/seed<seed>/<method>-<shift>.json``), scored with the shift's TALE score cache."""
    folder = out / "controls" / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, PruneResult]] = {}
    for shift, tale in searches.items():
        if shift == "id" or not tale.removed:
            continue
        score_cache = out / "pruning" / f"seed{seed}" / f".{shift}.scores.json"
        table[shift] = {method: PruneResult.from_dict(cached_json(
            folder / f"{method}-{shift}.json",
            lambda method=method: controls.baseline_selection(cfg, task, model, seed, shift, tale, method,
                                                              score_cache).to_dict()))
            for method in controls.BASELINES}
    return table


def _pending_baselines(baselines: dict[str, dict[str, PruneResult]], folder: Path) -> list[tuple[list[int], list[str]]]:
    """(removed, [shift]) of every baseline whose held-out evaluation is not cached in ``folder`` yet."""
    return [(result.removed, [shift]) for shift, methods in baselines.items() for method, result in methods.items()
            if not (folder / f"{method}-{shift}.npz").is_file()]


def _comparisons(cfg: Config, task: PolyRegTask, model: ICLModel, seed: int, searches: dict[str, PruneResult],
                 baselines: dict[str, dict[str, PruneResult]], full: Evaluation, out: Path,
                 runs: HeldoutRuns) -> dict[str, dict[str, Evaluation]]:
    """Per shift and control method, this seed's held-out Evaluation on that shift. Where TALE removed
    nothing the controls remove nothing too, so their result is the full model's. Baselines use their
    ``baselines`` selection through ``runs``; weight pruning is applied and evaluated here."""
    folder = out / "controls" / f"seed{seed}"
    table: dict[str, dict[str, Evaluation]] = {}
    for shift in task.distributions:
        if shift == "id":
            continue
        tale = searches[shift]
        table[shift] = {}
        for method in (*controls.BASELINES, *controls.WEIGHT_METHODS):
            if not tale.removed:
                table[shift][method] = full.subset([shift])
                continue
            path = folder / f"{method}-{shift}.npz"
            if not path.is_file():
                if method in controls.BASELINES:
                    ev = runs(baselines[shift][method].removed, [shift])
                else:
                    info, ev = controls.weight_pruned_evaluation(cfg, task, model, seed, shift, tale, method)
                    write_json(folder / f"{method}-{shift}.json", info)
                ev.save(path)
            table[shift][method] = Evaluation.load(path)
    return table


def _comparison_table(cfg: Config, full: Evaluation, target: Evaluation, methods: dict[int, dict],
                      searches: dict[int, dict[str, PruneResult]]) -> dict:
    """Δ (method − full) per shift where TALE removed blocks in at least one seed, for TALE and controls."""
    ev = cfg.evaluation
    shifts = [s for s in next(iter(methods.values())) if any(searches[seed][s].removed for seed in searches)]
    if not shifts:
        return {}
    table: dict[str, dict] = {s: {} for s in shifts}
    names = ["tale", *next(iter(next(iter(methods.values())).values()))]
    for name in names:
        pruned = target.subset(shifts) if name == "tale" else Evaluation.concat(
            [methods[seed][s][name] for seed in methods for s in shifts])
        for shift, row in compare(full, pruned, shifts, ev.n_bootstrap, ev.confidence).items():
            table[shift][name] = row
    return table


def intervention_table(causal: dict[int, dict[str, dict]]) -> dict:
    """Regroup per-seed interventions by shift: {shift: {sweep_removed: {seed: points}, ...}}."""
    table: dict[str, dict] = {}
    for seed, per_shift in causal.items():
        for shift, result in per_shift.items():
            row = table.setdefault(shift, {"sweep_removed": {}, "sweep_control": {}, "norm_matching": {}})
            for key in row:
                row[key][str(seed)] = result[key]
    return table


def _as_profile(data: dict) -> Profile:
    return Profile(data["norm"], data["pairwise"], data["n"])


def distortion_summary(profiles: dict[int, dict], dists: list[str]) -> dict:
    """Distortion D per shift, per seed and averaged: of the full model (OOD vs ID), of the pruned models
    against their own ID profile and against the full model's ID profile; the ID-vs-ID noise floor; and
    the full model's per-block attribution a_l per shift."""
    def d(p: dict, ref: dict) -> float:
        return distortion(_as_profile(p), _as_profile(ref)).D

    per_seed: dict[str, dict[str, dict[str, float]]] = {}
    attribution: dict[str, dict[str, list[float]]] = {}
    shifts = [dist for dist in dists if dist != "id"]
    for seed, p in profiles.items():
        full_id = p["full"]["id"]
        rows = {"noise_floor": {"full": d(p["id_b"], full_id)}}
        for dist in shifts:
            rows[dist] = {
                "full": d(p["full"][dist], full_id),
                "target_pruned": d(p["target"][dist]["ood"], p["target"][dist]["id"]),
                "target_pruned_vs_full_id": d(p["target"][dist]["ood"], full_id),
                "from_id_pruned": d(p["from-id"]["ood"][dist], p["from-id"]["id"]),
            }
        per_seed[str(seed)] = rows
        attribution[str(seed)] = {
            dist: distortion(_as_profile(p["full"][dist]), _as_profile(full_id)).attribution for dist in shifts}
    first = next(iter(per_seed.values()))
    mean = {row: {col: float(np.mean([per_seed[s][row][col] for s in per_seed])) for col in cols}
            for row, cols in first.items()}
    return {"D_mean": mean, "D_per_seed": per_seed, "attribution_full": attribution}


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
