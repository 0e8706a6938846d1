"""The study, written once for every model kind: search -> held-out evaluation -> profiles -> controls and
interventions -> results -> verdicts.

A config without ``lm`` studies the polynomial testbed (one trained model per replicate seed); one with an
``lm`` section studies that causal LM on a text task (one model; seeds are sampling seeds). Either way the
steps below see only a :class:`~tapioca.tasks.base.Workload`. Every step writes its output into the run
directory atomically and is skipped when that output exists, so a killed study loses at most the step in
flight (an interrupted TALE search resumes from its score cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tapioca.analysis.evaluation import Evaluation, compare
from tapioca.analysis.geometry import Profile, distortion, profile, query_states
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.analysis.optimism import optimism, oriented, placebo_null, robust_summary
from tapioca.api import prune, resolve_device
from tapioca.config import Config
from tapioca.errors import ConfigError
from tapioca.io import save_arrays, write_json
from tapioca.models.gates import removal_gates
from tapioca.models.icl import ICLModel, load_model
from tapioca.models.training import find_pretrained, train, trained_model_folder
from tapioca.pruning.searches import PruneResult
from tapioca.report.claims import paper_pattern, verdicts, verdicts_in_sample
from tapioca.study import controls
from tapioca.study.rundir import (
    Log, SeedThreads, StepProgress, Timer, cached_evaluation, cached_json, prepare_run_dir, seed_workers,
)
from tapioca.study.scales import run_scales
from tapioca.tasks.base import Workload, chance_levels
from tapioca.tasks.polyreg import PolyRegTask


@dataclass
class SeedOutputs:
    """Everything one replicate (or sampling) seed contributes to the results."""

    searches: dict[str, PruneResult]
    full: Evaluation
    from_id: Evaluation
    target: Evaluation
    profiles: dict
    full_in: Evaluation  # in-sample: the full model on each distribution's selection examples
    target_in: Evaluation  # in-sample: each target-pruned model on the examples it was selected on
    candidates: dict[str, np.ndarray]  # per distribution: one-block removals' in-sample gains (L, n_select)
    methods: dict[str, dict[str, Evaluation]] = field(default_factory=dict)
    causal: dict[str, dict] = field(default_factory=dict)
    edges: dict | None = None  # graphs: PrunE's evaluations and summary (tapioca.study.edges)


def run_study(cfg: Config, out: str | Path | None = None, progress: bool = True, log: Log = print,
              scales: Sequence[str] | None = None) -> dict:
    """Run the whole pipeline for ``cfg`` into ``out`` (default ``cfg.run.out``) and return results.json.
    A config with ``scales`` runs every scale's study (``scales``: only these; other scales that finished
    earlier join the results) and returns the multi-scale results instead."""
    out = Path(out if out is not None else cfg.run.out)
    if cfg.scales:
        return run_scales(cfg, out, progress, log, run_study, only=scales)
    if scales:
        raise ConfigError("--scales needs a config with a scales: section (e.g. configs/depth.yaml)")
    prepare_run_dir(cfg, out)
    seeds = SeedThreads(seed_workers(cfg))
    timer = Timer(out / "timings.json", before_step=seeds.fit)
    workload_of = open_workloads(cfg, out, timer, progress and seeds.workers == 1, log)
    steps = StepProgress(list(cfg.evaluation.seeds), seed_steps(cfg), progress, inner=seeds.workers == 1)
    try:
        per_seed = seeds.map(lambda seed: run_seed(cfg, workload_of(seed), seed, out, timer, steps, log),
                             list(cfg.evaluation.seeds))
    finally:
        torch.set_num_threads(seeds.threads)
        steps.close()
    with timer("statistics"):
        results = gather_results(cfg, workload_of(cfg.evaluation.seeds[0]), per_seed)
    results["timings_seconds"] = timer.seconds
    write_json(out / "results.json", results)
    return results


def seed_steps(cfg: Config) -> list[str]:
    """The per-seed steps, in order (the progress bar counts them)."""
    return ["model", "prune", "evaluate", "in-sample", "geometry",
            *(("comparisons", "interventions") if cfg.geometry.controls else ()),
            *(("edges",) if cfg.graph is not None else ())]


def open_workloads(cfg: Config, out: Path, timer: Timer, progress: bool, log: Log) -> Callable[[int], Workload]:
    """seed -> the study's workload for that seed: the testbed model of replicate ``seed``, or the one language
    model (loaded once, its data checked for every seed before any model work)."""
    if cfg.graph is not None:
        return graph_workloads(cfg, out, timer, progress, log)
    if cfg.lm is None:
        from tapioca.tasks.testbed import TestbedWorkload

        task = PolyRegTask(cfg.task)
        return lambda seed: TestbedWorkload.from_config(cfg, model_for_seed(cfg, seed, out, timer, progress, log), task)
    from tapioca.tasks.text_workload import TextWorkload, load_lm, load_text_task

    with timer("load"):
        wl = TextWorkload.from_config(cfg, load_lm(cfg.lm, cfg.run.device), load_text_task(cfg.lm))
    log(f"{cfg.lm.model}: {wl.model.n_blocks} blocks; task {wl.task.cfg.source} ({wl.task.kind}), "
        f"distributions {wl.distributions}")
    wl.check_data(list(cfg.evaluation.seeds))
    return lambda seed: wl


def graph_workloads(cfg: Config, out: Path, timer: Timer, progress: bool, log: Log) -> Callable[[int], Workload]:
    """seed -> the graph workload of replicate ``seed``: ``graph.checkpoint`` (``{seed}`` substituted), a shipped
    classifier trained with this exact config, or one trained now into ``out/models/seed<seed>``."""
    from tapioca.models.gnn import load_gnn
    from tapioca.models.graph_training import find_shipped_graph_model, is_graph_trained, train_graph_model
    from tapioca.tasks.graph_workload import GraphWorkload, load_graph_task

    g = cfg.graph
    assert g is not None
    task, device = load_graph_task(g), resolve_device(cfg.run.device)

    def model(seed: int) -> Any:
        if g.checkpoint is not None:
            return load_gnn(g.checkpoint.format(seed=seed), device)
        shipped = find_shipped_graph_model(g, task.cfg, seed)
        if shipped is not None:
            log(f"seed {seed}: using the shipped graph classifier {shipped.name} (trained with this exact config)")
            return load_gnn(shipped, device)
        folder = out / "models" / f"seed{seed}"
        if is_graph_trained(folder, g, task.cfg, seed):
            return load_gnn(folder, device)
        with timer("train"):
            return train_graph_model(g, task, seed, folder, progress, device)

    return lambda seed: GraphWorkload.from_config(cfg, model(seed), task)


def model_for_seed(cfg: Config, seed: int, out: Path, timer: Timer, progress: bool, log: Log) -> ICLModel:
    """The testbed model of replicate ``seed``: ``model.checkpoint`` (``{seed}`` is substituted), a shipped
    checkpoint trained with this exact config, or one trained now into ``out/models/seed<seed>``."""
    device = resolve_device(cfg.run.device)
    found = trained_model_folder(cfg, seed, out)
    if found is not None:
        if found == find_pretrained(cfg, seed):
            log(f"seed {seed}: using the shipped checkpoint {found.name} (trained with this exact config)")
        return load_model(found, device)
    with timer("train"):
        return train(cfg, out / "models" / f"seed{seed}", seed=seed, progress=progress)


def run_seed(cfg: Config, wl: Workload, seed: int, out: Path, timer: Timer, steps: StepProgress, log: Log) -> SeedOutputs:
    """Searches, held-out evaluations, profiles and controls of one seed (each cached)."""
    steps.done(seed, "model")
    with timer("prune"):
        searches = search_every_distribution(cfg, wl, seed, out / "pruning" / f"seed{seed}", steps.inner)
    steps.done(seed, "prune")
    runs = HeldoutRuns(wl, seed, wl.sizes.n_heldout)
    baselines: dict[str, dict[str, PruneResult]] = {}
    if cfg.geometry.controls:
        steps.running(seed, "selecting the controls' blocks")
        with timer("comparisons"):
            baselines = controls.baseline_selections(cfg, wl, seed, searches, out, steps.inner)
    with timer("evaluate"):
        full, from_id, target = evaluations(wl, searches, runs, out / "evaluation" / f"seed{seed}",
                                            controls.pending_baselines(baselines, out / "controls" / f"seed{seed}"))
    steps.done(seed, "evaluate")
    with timer("in-sample"):
        full_in, target_in, candidates = in_sample(cfg, wl, seed, searches, out / "evaluation" / f"seed{seed}")
    steps.done(seed, "in-sample")
    with timer("geometry"):
        profiles = cached_json(out / "geometry" / f"seed{seed}.json", lambda: seed_profiles(wl, seed, searches))
    steps.done(seed, "geometry")
    outputs = SeedOutputs(searches, full, from_id, target, profiles, full_in, target_in, candidates)
    if cfg.geometry.controls:
        with timer("comparisons"):
            outputs.methods = controls.comparisons(cfg, wl, seed, searches, baselines, full, out, runs)
        steps.done(seed, "comparisons")
        with timer("interventions"):
            id_profiles: dict = {}  # gated ID profiles, shared by every shift's sweeps of this seed
            outputs.causal = {
                t: cached_json(out / "interventions" / f"seed{seed}" / f"{t}.json",
                               lambda t=t: controls.interventions(cfg, wl, seed, t, searches[t].removed, id_profiles))
                for t in wl.distributions if t != "id" and searches[t].removed}
        steps.done(seed, "interventions")
    if cfg.graph is not None:
        from tapioca.study.edges import edge_pruning_seed

        with timer("edges"):
            outputs.edges = edge_pruning_seed(wl, cfg.graph, seed, out / "edges" / f"seed{seed}", steps.inner)  # type: ignore[arg-type]
        steps.done(seed, "edges")
    log(f"seed {seed}: ID {wl.primary_metric} {full.mean('id', wl.primary_metric):.4f}; TALE removed (target=id) "
        f"{searches['id'].removed}; " + ", ".join(f"{d} {searches[d].removed}" for d in wl.distributions if d != "id"))
    return outputs


def search_every_distribution(cfg: Config, wl: Workload, seed: int, folder: Path,
                              progress: bool = False) -> dict[str, PruneResult]:
    """``pruning.search`` selected on each distribution (target protocol; the "id" search is also the from-id
    one), each cached as ``<search>-<dist>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for dist in wl.distributions:
        compute = lambda dist=dist: prune(wl, None, cfg.pruning.search, "target", dist, cfg=cfg.pruning, seed=seed,  # noqa: E731
                                          progress=progress, cache_path=folder / f".{dist}.scores.json").to_dict()
        out[dist] = PruneResult.from_dict(cached_json(folder / f"{cfg.pruning.search}-{dist}.json", compute))
    return out


def evaluations(wl: Workload, searches: dict[str, PruneResult], runs: HeldoutRuns, folder: Path,
                also: list[tuple[list[int], list[str]]] = ()) -> tuple[Evaluation, Evaluation, Evaluation]:
    """Held-out evaluations of the full model, the from-id pruned model (every distribution) and the
    target-protocol pruned model (each on its own distribution), each cached in ``folder``. Missing ones are
    computed distribution by distribution so each distribution's full-model pass is shared, together with
    the (removed, distributions) runs in ``also`` (kept in ``runs`` for later steps)."""
    dists = wl.distributions
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


def in_sample(cfg: Config, wl: Workload, seed: int, searches: dict[str, PruneResult],
              folder: Path) -> tuple[Evaluation, Evaluation, dict[str, np.ndarray]]:
    """The paper's protocol: the full model and each target-pruned model scored (held-out metrics) on the very
    selection examples the search chose on; and, for the placebo null of the selection optimism, every
    one-block removal's per-example gain in the primary metric on them, (L, n_select) per distribution (not
    computed where a split is scored by generation, or with evaluation.placebo_draws 0). Cached in ``folder``."""
    dists, n = wl.distributions, wl.sizes.n_select
    runs = HeldoutRuns(wl, seed, n, role="select")
    full = cached_evaluation(folder / "in-sample-full.npz", lambda: runs([], dists))
    target = cached_evaluation(folder / "in-sample-target.npz",
                               lambda: Evaluation.concat([runs(searches[d].removed, [d]) for d in dists]))
    path = folder / "in-sample-candidates.npz"
    if not path.is_file():
        gains = {}
        if cfg.evaluation.placebo_draws and wl.one_pass:
            metric, up = wl.primary_metric, wl.metrics[wl.primary_metric]
            for d in dists:
                base = runs.one([], d).values[d][metric]
                gains[d] = np.stack([oriented(base, runs.one([b], d).values[d][metric], up)
                                     for b in range(wl.model.n_blocks)])
        save_arrays(path, gains)
    with np.load(path, allow_pickle=False) as data:
        candidates = {k: data[k] for k in data.files}
    return full, target, candidates


def seed_profiles(wl: Workload, seed: int, searches: dict[str, PruneResult]) -> dict:
    """Norm and pairwise-distance profiles of every distribution for the full model, the target-protocol
    pruned model (on its target and on ID) and the from-id pruned model; plus a second, disjoint ID sample
    for the noise floor. Inputs come from the "reference" role, disjoint from selection and held-out."""
    n, chunk = wl.sizes.n_profile, wl.sizes.eval_chunk
    data = {d: wl.inputs(d, seed, 2 * n if d == "id" else n) for d in wl.distributions}
    id_b = data["id"].slice(n, 2 * n)
    data["id"] = data["id"].slice(0, n)
    memo: dict[tuple, dict] = {}

    def prof(dist: str, removed: list[int]) -> dict:
        key = (dist, tuple(removed))
        if key not in memo:
            batch = id_b if dist == "id_b" else data[dist]
            memo[key] = profile(query_states(wl.model, batch, removal_gates(removed), chunk)).to_dict()
        return memo[key]

    id_removed = searches["id"].removed
    return {
        "full": {d: prof(d, []) for d in wl.distributions},
        "id_b": prof("id_b", []),
        "target": {d: {"ood": prof(d, searches[d].removed), "id": prof("id", searches[d].removed)}
                   for d in wl.distributions},
        "from-id": {"ood": {d: prof(d, id_removed) for d in wl.distributions}, "id": prof("id", id_removed)},
    }


def gather_results(cfg: Config, wl: Workload, per_seed: dict[int, SeedOutputs]) -> dict[str, Any]:
    """results.json from every seed's outputs: held-out summaries and paired deltas under both protocols,
    selections, geometry, controls, interventions, the workload's own blocks and the C1–C9 verdicts."""
    ev, dists = cfg.evaluation, wl.distributions
    full = Evaluation.concat([o.full for o in per_seed.values()])
    target = Evaluation.concat([o.target for o in per_seed.values()])
    from_id = Evaluation.concat([o.from_id for o in per_seed.values()])
    searches = {seed: o.searches for seed, o in per_seed.items()}
    seeds = [str(s) for s in per_seed]

    def summary(e: Evaluation) -> dict:
        return e.summary(ev.n_bootstrap, ev.confidence, shrinkage=wl.regression)

    def delta(pruned: Evaluation) -> dict:
        return compare(full, pruned, dists, ev.n_bootstrap, ev.confidence, wl.metrics)

    full_in = Evaluation.concat([o.full_in for o in per_seed.values()])
    target_in = Evaluation.concat([o.target_in for o in per_seed.values()])
    results: dict[str, Any] = {
        "kind": wl.kind,
        **wl.describe(),
        "primary_metric": wl.primary_metric,
        "quality": wl.quality(full, list(per_seed), ev.n_bootstrap, ev.confidence),
        "full": summary(full),
        "protocols": {"target": {"delta": delta(target), "pruned": summary(target)},
                      "from-id": {"delta": delta(from_id), "pruned": summary(from_id)},
                      "in-sample": {"delta": compare(full_in, target_in, dists, ev.n_bootstrap, ev.confidence,
                                                     wl.metrics),
                                    "pruned": summary(target_in), "full": summary(full_in)}},
        "optimism": selection_optimism(cfg, wl, per_seed, full_in, target_in, full, target),
        "smallest_effect": {"relative": ev.smallest_effect_relative, "points": ev.smallest_effect_points},
        "chance": chance_levels(wl, list(per_seed)),
        "removed": {"target": {d: {s: searches[int(s)][d].removed for s in seeds} for d in dists},
                    "from-id": {s: searches[int(s)]["id"].removed for s in seeds}},
        "selection_metric": wl.selection_metric,
        "n_blocks": wl.model.n_blocks,
        "geometry": distortion_summary({s: o.profiles for s, o in per_seed.items()}, dists),
    }
    if cfg.geometry.controls:
        results["comparisons"] = controls.comparison_table(cfg, wl, full, target,
                                                           {s: o.methods for s, o in per_seed.items()}, searches)
        results["interventions"] = intervention_table({s: o.causal for s, o in per_seed.items()})
    if wl.regression:
        results["robust"] = {d: robust_summary(full, target, d, wl.primary_metric, ev.n_bootstrap, ev.confidence)
                             for d in dists}
    results.update(wl.extra_results(full, target, from_id))
    if cfg.graph is not None:
        from tapioca.study.edges import edge_results

        results["edges"] = edge_results(cfg, wl, {s: o.edges for s, o in per_seed.items()})  # type: ignore[arg-type]
    results["claims"] = verdicts(results)
    results["claims_in_sample"] = verdicts_in_sample(results)
    results["paper_pattern"] = paper_pattern(results)
    return results


def selection_optimism(cfg: Config, wl: Workload, per_seed: dict[int, SeedOutputs], full_in: Evaluation,
                       target_in: Evaluation, full: Evaluation, target: Evaluation) -> dict[str, dict]:
    """Per distribution: in-sample and held-out gain of the target-protocol search in the primary metric, the
    optimism between them with its CI, and the placebo null (see :mod:`tapioca.analysis.optimism`)."""
    ev, metric = cfg.evaluation, wl.primary_metric
    out = {}
    for d in wl.distributions:
        diffs = [o.candidates[d] for o in per_seed.values() if d in o.candidates]
        null = placebo_null(diffs, ev.placebo_draws) if ev.placebo_draws and len(diffs) == len(per_seed) else None
        out[d] = optimism(full_in, target_in, full, target, d, metric, wl.metrics[metric], null,
                          ev.n_bootstrap, ev.confidence)
    return out


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
