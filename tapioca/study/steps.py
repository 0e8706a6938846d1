"""The study, written once for every model kind: search -> held-out evaluation -> profiles -> controls and
interventions -> results -> verdicts.

A config without ``lm`` studies the polynomial testbed (one trained model per replicate seed); one with an
``lm`` section studies that causal LM on a text task (one model; seeds are sampling seeds). Either way the
steps below see only a :class:`~tapioca.tasks.base.Workload`. Every step writes its output into the run
directory atomically and is skipped when that output exists, so a killed study loses at most the step in
flight (an interrupted TALE search resumes from its score cache).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tapioca.analysis.evaluation import Evaluation, compare
from tapioca.analysis.geometry import Profile, distortion, profile, query_states
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.analysis.optimism import RecordedSearch, optimism, replayed_gain, robust_summary, search_null
from tapioca.api import prune, resolve_device
from tapioca.config import Config
from tapioca.errors import ConfigError
from tapioca.io import write_json
from tapioca.models.gates import removal_gates
from tapioca.models.icl import ICLModel, load_model
from tapioca.models.training import find_pretrained, train, trained_model_folder
from tapioca.pruning.searches import PruneResult
from tapioca.analysis.stats import shrinkage_slope
from tapioca.report.claims import paper_pattern, rules_of, verdicts, verdicts_in_sample
from tapioca.study import controls
from tapioca.study.rundir import (
    Log, SeedThreads, StepProgress, Timer, cached_evaluation, cached_json, prepare_run_dir, seed_workers,
)
from tapioca.study.replay import cached_recorded, load_search_scores, record_rounds, rule_of, save_search_scores
from tapioca.study.scales import run_scales
from tapioca.tasks.base import Workload, chance_levels
from tapioca.tasks.roles import selection_role
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
    rounds: dict[str, list[RecordedSearch]]  # per distribution, per selection draw: every TALE round's candidates
    draw_searches: list[dict[str, PruneResult]] = field(default_factory=list)  # per selection draw (0: ``searches``)
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


def controlled_seeds(cfg: Config) -> list[int]:
    """The seeds whose models get the controls and interventions: the first ``geometry.controls_models``."""
    seeds = list(cfg.evaluation.seeds)
    return seeds if cfg.geometry.controls_models is None else seeds[: cfg.geometry.controls_models]


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
    wl.check_data(list(cfg.evaluation.seeds), cfg.evaluation.selection_draws)
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
    draws = range(cfg.evaluation.selection_draws)
    with timer("prune"):
        draw_searches = [search_every_distribution(cfg, wl, seed, draw_folder(out / "pruning" / f"seed{seed}", k),
                                                   steps.inner, k) for k in draws]
    searches = draw_searches[0]  # geometry, controls and interventions study the first draw's selection
    steps.done(seed, "prune")
    runs = HeldoutRuns(wl, seed, wl.sizes.n_heldout)
    baselines: dict[str, dict[str, PruneResult]] = {}
    controlled = cfg.geometry.controls and seed in controlled_seeds(cfg)
    if controlled:
        steps.running(seed, "selecting the controls' blocks")
        with timer("comparisons"):
            baselines = controls.baseline_selections(cfg, wl, seed, searches, out, steps.inner)
    folder = out / "evaluation" / f"seed{seed}"
    with timer("evaluate"):
        full, from_id, target = evaluations(wl, searches, runs, folder,
                                            controls.pending_baselines(baselines, out / "controls" / f"seed{seed}"))
        for k in draws[1:]:  # every further draw: its pruned models on the same held-out examples
            _, more_id, more_target = evaluations(wl, draw_searches[k], runs, draw_folder(folder, k))
            from_id, target = (Evaluation.concat([a, b.with_draw(k)]) for a, b in ((from_id, more_id),
                                                                                  (target, more_target)))
    steps.done(seed, "evaluate")
    with timer("in-sample"):
        parts = [in_sample(cfg, wl, seed, draw_searches[k], draw_folder(folder, k), selection_role(k),
                           draw_folder(out / "pruning" / f"seed{seed}", k)) for k in draws]
        full_in, target_in = (Evaluation.concat([p[i].with_draw(k) if len(draws) > 1 else p[i]
                                                 for k, p in enumerate(parts)]) for i in (0, 1))
        rounds = {d: [p[2][d] for p in parts] for d in parts[0][2]}
    steps.done(seed, "in-sample")
    with timer("geometry"):
        profiles = cached_json(out / "geometry" / f"seed{seed}.json", lambda: seed_profiles(wl, seed, searches,
                                                                                  cfg.geometry.random_removals))
    steps.done(seed, "geometry")
    outputs = SeedOutputs(searches, full, from_id, target, profiles, full_in, target_in, rounds, draw_searches)
    if cfg.geometry.controls and not controlled:  # a model beyond geometry.controls_models: no controls
        steps.done(seed, "comparisons")
        steps.done(seed, "interventions")
    if controlled:
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


def draw_folder(folder: Path, draw: int) -> Path:
    """Where selection draw ``draw`` of a seed keeps its files: ``folder`` itself for draw 0, else
    ``folder/draw<k>``."""
    return folder if draw == 0 else folder / f"draw{draw}"


def search_every_distribution(cfg: Config, wl: Workload, seed: int, folder: Path,
                              progress: bool = False, draw: int = 0) -> dict[str, PruneResult]:
    """``pruning.search`` selected on each distribution (target protocol; the "id" search is also the from-id
    one) on selection draw ``draw`` (:func:`tapioca.tasks.roles.selection_role`), each cached as
    ``<search>-<dist>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for dist in wl.distributions:
        def compute(dist: str = dist) -> dict:
            kept: dict = {}  # every configuration's per-example scores, for the whole-search null (in_sample)
            result = prune(wl, None, cfg.pruning.search, "target", dist, cfg=cfg.pruning, seed=seed, progress=progress,
                           cache_path=folder / f".{dist}.scores.json", role=selection_role(draw), per_example=kept)
            if kept:
                save_search_scores(folder / f".{dist}.examples.npz", kept)
            return result.to_dict()

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
              folder: Path, role: str = "select", search_folder: Path | None = None,
              ) -> tuple[Evaluation, Evaluation, dict[str, RecordedSearch]]:
    """The paper's protocol: the full model and each target-pruned model scored (held-out metrics) on the very
    selection examples the search chose on; and, for the whole-search null of the selection optimism, every
    recorded TALE round's candidates' per-example gains in the search's own metric on them
    (:func:`tapioca.study.replay.record_rounds`; not computed with evaluation.placebo_draws 0). Cached in
    ``folder``. ``role``: the selection draw's split; ``search_folder``: where the searches kept their per-example
    scores (then nothing is run again)."""
    dists, n = wl.distributions, wl.sizes.n_select
    runs = HeldoutRuns(wl, seed, n, role=role)
    full = cached_evaluation(folder / "in-sample-full.npz", lambda: runs([], dists))
    target = cached_evaluation(folder / "in-sample-target.npz",
                               lambda: Evaluation.concat([runs(searches[d].removed, [d]) for d in dists]))
    if not cfg.evaluation.placebo_draws or cfg.pruning.search != "tale":
        return full, target, {}
    rounds = cached_recorded(folder / "in-sample-rounds.npz",
                             lambda: {d: record_rounds(wl, seed, searches[d], d, n, role, known=load_search_scores(
                                 search_folder / f".{d}.examples.npz") if search_folder else None) for d in dists})
    return full, target, rounds


def seed_profiles(wl: Workload, seed: int, searches: dict[str, PruneResult], random_sets: int = 4) -> dict:
    """Norm and pairwise-distance profiles of every distribution for the full model, the target-protocol
    pruned model (on its target and on ID), the from-id pruned model and, per shift where TALE removed k blocks,
    ``random_sets`` models with k random blocks removed; plus a second, disjoint ID sample for the noise floor.
    Inputs come from the "reference" role, disjoint from selection and held-out."""
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
        "random": {d: [{"removed": blocks, "ood": prof(d, blocks), "id": prof("id", blocks)}
                       for blocks in random_block_sets(wl.model.n_blocks, len(searches[d].removed), seed, d,
                                                       random_sets)]
                   for d in wl.distributions if d != "id" and searches[d].removed},
    }


def random_block_sets(n_blocks: int, k: int, seed: int, dist: str, count: int) -> list[list[int]]:
    """``count`` sets of ``k`` blocks drawn uniformly from all ``n_blocks`` (seeded by seed and distribution):
    C4's reference, D after removing as many blocks as TALE did, but at random."""
    rng = random.Random(seed * 1_000_003 + zlib.crc32(dist.encode()))
    return [sorted(rng.sample(range(n_blocks), k)) for _ in range(count)]


def gather_results(cfg: Config, wl: Workload, per_seed: dict[int, SeedOutputs]) -> dict[str, Any]:
    """results.json from every seed's outputs: held-out summaries and paired deltas under both protocols,
    selections, geometry, controls, interventions, the workload's own blocks and the C1–C9 verdicts."""
    ev, dists = cfg.evaluation, wl.distributions
    full = Evaluation.concat([o.full for o in per_seed.values()])
    target = Evaluation.concat([o.target for o in per_seed.values()])
    from_id = Evaluation.concat([o.from_id for o in per_seed.values()])
    searches = {seed: o.searches for seed, o in per_seed.items()}
    replicates = {replicate_key(seed, k): found for seed, o in per_seed.items()
                  for k, found in enumerate(o.draw_searches or [o.searches])}

    def summary(e: Evaluation) -> dict:
        return e.summary(ev.n_bootstrap, ev.confidence, shrinkage=wl.regression)

    def delta(pruned: Evaluation, before: Evaluation = full) -> dict:
        return compare(before, pruned, dists, ev.n_bootstrap, ev.confidence, wl.metrics, wl.seeds_are_models)

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
                      "in-sample": {"delta": delta(target_in, full_in),
                                    "pruned": summary(target_in), "full": summary(full_in)}},
        "optimism": selection_optimism(cfg, wl, per_seed, full_in, target_in, full, target),
        "smallest_effect": {"relative": ev.smallest_effect_relative, "points": ev.smallest_effect_points},
        "rules": rules_of(ev),
        "chance": chance_levels(wl, list(per_seed)),
        "removed": {"target": {d: {r: found[d].removed for r, found in replicates.items()} for d in dists},
                    "from-id": {r: found["id"].removed for r, found in replicates.items()}},
        "replicates": {"models": len(per_seed) if wl.seeds_are_models else 1,
                       "sampling_seeds": len(per_seed), "selection_draws": ev.selection_draws,
                       "unit": "model" if wl.seeds_are_models and len(per_seed) > 1 else "draw"},
        "selection_metric": wl.selection_metric,
        "n_blocks": wl.model.n_blocks,
        "geometry": distortion_summary({s: o.profiles for s, o in per_seed.items()}, dists),
    }
    if cfg.geometry.controls:
        controlled = {s: o.methods for s, o in per_seed.items() if s in controlled_seeds(cfg)}
        results["comparisons"] = controls.comparison_table(cfg, wl, full, target, controlled, searches)
        results["interventions"] = intervention_table({s: o.causal for s, o in per_seed.items()})
    if wl.regression:
        results["robust"] = {d: robust_summary(full, target, d, wl.primary_metric, ev.n_bootstrap, ev.confidence)
                             for d in dists}
        results["shrinkage_change"] = per_model_change(full, target, dists, shrinkage_slope_of)
    elif all("confidence" in full.values[d] and "confidence" in target.values[d] for d in dists):
        results["confidence_change"] = per_model_change(full, target, dists, mean_confidence)
    results.update(wl.extra_results(full, target, from_id))
    if cfg.graph is not None:
        from tapioca.study.edges import edge_results

        results["edges"] = edge_results(cfg, wl, {s: o.edges for s, o in per_seed.items()})  # type: ignore[arg-type]
    results["claims"] = verdicts(results)
    results["claims_in_sample"] = verdicts_in_sample(results)
    results["paper_pattern"] = paper_pattern(results)
    return results


def replicate_key(seed: int, draw: int) -> str:
    """How results.json names a replicate: the seed for draw 0, "<seed>.<draw>" for the others."""
    return str(seed) if draw == 0 else f"{seed}.{draw}"


def selection_optimism(cfg: Config, wl: Workload, per_seed: dict[int, SeedOutputs], full_in: Evaluation,
                       target_in: Evaluation, full: Evaluation, target: Evaluation) -> dict[str, dict]:
    """Per distribution: in-sample and held-out gain of the target-protocol search in the primary metric, the
    optimism between them with its CI, and the whole-search null (:func:`tapioca.analysis.optimism.search_null`,
    in the selection metric: ``null_metric``) with the search's own in-sample gain it is compared with."""
    ev, metric = cfg.evaluation, wl.primary_metric
    out = {}
    for d in wl.distributions:
        recorded = [r for o in per_seed.values() for r in o.rounds.get(d, [])]
        null, observed = None, None
        if ev.placebo_draws and recorded and len(recorded) == len(per_seed) * ev.selection_draws:
            rule = rule_of(next(iter(per_seed.values())).searches[d])
            null = search_null(recorded, rule, ev.placebo_draws, harmful_z=ev.placebo_harmful_z)
            observed = replayed_gain(recorded, rule)
        out[d] = optimism(full_in, target_in, full, target, d, metric, wl.metrics[metric], null,
                          ev.n_bootstrap, ev.confidence, observed)
        if null is not None:
            out[d]["null_metric"] = wl.selection_metric
    return out


def shrinkage_slope_of(ev: Evaluation, dist: str, mask: np.ndarray) -> float:
    """The prediction-shrinkage slope of the examples ``mask`` (n,) of ``dist``."""
    return shrinkage_slope(ev.predictions[dist][mask], ev.targets[dist][mask])


def mean_confidence(ev: Evaluation, dist: str, mask: np.ndarray) -> float:
    """The mean top-choice confidence of the examples ``mask`` (n,) of ``dist``."""
    return float(ev.values[dist]["confidence"][mask].mean())


def per_model_change(full: Evaluation, pruned: Evaluation, dists: list[str],
                     measure: Callable[[Evaluation, str, np.ndarray], float]) -> dict[str, dict[str, float]]:
    """Per shift and model seed (the unit), ``measure`` of the pruned model minus the full model's on the same
    held-out examples, averaged over the seed's selection draws (C7)."""
    out: dict[str, dict[str, float]] = {}
    for d in dists:
        if d == "id":
            continue
        seeds, draws = pruned.seeds[d], pruned.draw_labels(d)
        for seed in np.unique(seeds):
            before = measure(full, d, full.seeds[d] == seed)
            after = [measure(pruned, d, (seeds == seed) & (draws == k)) for k in np.unique(draws[seeds == seed])]
            out.setdefault(d, {})[str(int(seed))] = float(np.mean(after)) - before
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
            if p.get("random", {}).get(dist):  # C4's reference: as many random blocks removed (mean D over sets)
                rows[dist]["random_pruned"] = float(np.mean([d(r["ood"], r["id"]) for r in p["random"][dist]]))
        per_seed[str(seed)] = rows
        attribution[str(seed)] = {
            dist: distortion(_as_profile(p["full"][dist]), _as_profile(full_id)).attribution for dist in shifts}
    first = next(iter(per_seed.values()))
    mean = {row: {col: float(np.mean([per_seed[s][row][col] for s in per_seed if col in per_seed[s][row]]))
                  for col in {c for s in per_seed for c in per_seed[s][row]}}
            for row in first}
    return {"D_mean": mean, "D_per_seed": per_seed, "attribution_full": attribution}
