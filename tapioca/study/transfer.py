"""Transfer: does pruning for one task help or harm another task, in distribution and out of it?

For each task t of ``transfer.tasks`` (one model serves them all: on the testbed one model per seed of
``evaluation.seeds``, trained on the top-level ``task.sampler``, e.g. a mixture of function families; a language
model is loaded once and its seeds are sampling seeds), ``pruning.search`` (TALE) selects on t's
``transfer.target`` distribution (protocol target; "id" by default). The full model and every pruned model are then
scored on the held-out split of every task's ID and shifts, and each pruned model in-sample on the very examples
its search chose on (the paper's protocol). A cell of the matrix is Δ = pruned-for-t − full in the primary metric
on (task u, distribution d), with a paired bootstrap CI stratified by seed, Holm-corrected across every cell, its
minimal detectable effect and a verdict: "helps", "harms", "no effect" (the TOST interval lies within ±δ, the
smallest effect of interest of ``evaluation.smallest_effect_*``), "not enough data" (otherwise) or "nothing
removed" (the search kept every block in every seed, so Δ is 0 by construction).

Outputs in ``out`` (every step written atomically and skipped on a rerun): ``config.yaml``, ``environment.json``,
``models/seed<s>/`` (testbed, when trained here), ``pruning/seed<s>/<task>.json``, held-out evaluations
``evaluation/seed<s>/<task>/full.npz`` and ``pruned-for-<task>.npz``, in-sample ones
``evaluation/seed<s>/<task>/in-sample-{full,pruned}.npz``, ``timings.json``, ``transfer.json`` (see
:func:`gather`) and ``report/`` (:mod:`tapioca.report.transfer_report`).

Measured: see ``docs/transfer.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from tapioca.analysis import stats
from tapioca.analysis.evaluation import HIGHER_IS_BETTER, Evaluation, compare
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.analysis.optimism import optimism
from tapioca.api import prune
from tapioca.config import Config, TaskConfig, config_from_tree, load_config, transfer_config
from tapioca.errors import ConfigError, DataError
from tapioca.io import write_json
from tapioca.pruning.searches import PruneResult
from tapioca.report.claims import gain_interval, room_of
from tapioca.study.rundir import (
    Log, SeedThreads, StepProgress, Timer, cached_evaluation, cached_json, prepare_run_dir, seed_workers,
)
from tapioca.tasks.base import Workload, chance_levels
from tapioca.tasks.polyreg import ROLES, PolyBatch, PolyRegTask, check_finite, sample_prompts, split_seed

HELPS, HARMS, NO_EFFECT, NOT_ENOUGH, AT_LIMIT, NOTHING_REMOVED = (
    "helps", "harms", "no effect", "not enough data", "floor or ceiling", "nothing removed")
VERDICTS = (HELPS, HARMS, NO_EFFECT, NOT_ENOUGH, AT_LIMIT, NOTHING_REMOVED)

# The built-in default (`tapioca transfer` with no --config; the same as configs/transfer.yaml): one small
# testbed model per seed trained on a 50/50 mixture of polynomials and sinusoids; two tasks, one per family, each
# with its own shifts. TALE keeps its deepest configuration within epsilon of the task's full score
# (choose: final): on ID its best-scoring configuration is almost always the full model. About 7 minutes on the
# 2-core CPU, nearly all of it training (docs/transfer.md has the timings).
DEFAULT_TREE: dict[str, Any] = {
    "model": {"n_layer": 6, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "task": {"sampler": {"families": ["polynomial", "sinusoid"], "degrees": [1, 2], "n_points": 31}, "shifts": {}},
    "train": {"steps": 2000, "lr": 0.003, "curriculum_interval": 50, "curriculum_degree_steps": 400,
              "checkpoint_every": 250},
    "pruning": {"n_select": 256, "choose": "final"},
    "evaluation": {"seeds": [0, 1, 2], "n_heldout": 1024},
    "run": {"out": "runs/transfer"},
    "transfer": {"target": "id", "tasks": {
        "polynomial": {"task": {"sampler": {"families": ["polynomial"]},
                                "shifts": {"x_scale_2": {"x_scale": 2.0}, "degree_3": {"degrees": [3]}}}},
        "sinusoid": {"task": {"sampler": {"families": ["sinusoid"]},
                              "shifts": {"x_scale_2": {"x_scale": 2.0}, "harmonic_3": {"degrees": [3]}}}},
    }},
}


def load_transfer_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """The transfer config: the YAML file at ``path`` (or the built-in :data:`DEFAULT_TREE`), then ``key=value``
    overrides; a config without a ``transfer`` section is a one-line error."""
    cfg = load_config(path, overrides) if path is not None else config_from_tree(DEFAULT_TREE, overrides)
    if cfg.transfer is None:
        raise ConfigError(f"transfer: {str(path)!r} has no transfer section; give transfer.tasks (see "
                          "configs/transfer.yaml) or run without --config for the built-in testbed default")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Workloads: every task over one model


class TransferTask(PolyRegTask):
    """A testbed task of a transfer: :class:`PolyRegTask` whose prompts are drawn from seeds that also name the
    task, so two tasks' distributions of the same name ("id") never share random draws."""

    def __init__(self, cfg: TaskConfig, name: str) -> None:
        super().__init__(cfg)
        self.name = name

    def data(self, distribution: str, role: str, seed: int, n: int) -> PolyBatch:
        """``n`` prompts of one split of this task, xs and ys (n, n_points); the same arguments give the same."""
        if role not in ROLES:
            raise ValueError(f"unknown split role {role!r}; allowed: {list(ROLES)}")
        if n < 1:
            raise DataError(f"the {role} split of {self.name}/{distribution} is empty (n={n}); ask for at least 1")
        gen = torch.Generator().manual_seed(split_seed(seed, f"{self.name}/{distribution}", role))
        return check_finite(sample_prompts(self.params(distribution), n, gen), f"{self.name}/{distribution}/{role}")


WorkloadsOf = Callable[[int], dict[str, Workload]]  # seed -> {task: workload}, all over one model


def task_configs(cfg: Config) -> dict[str, Config]:
    """Each transfer task's own config (``transfer_config``), in the order of ``transfer.tasks``."""
    assert cfg.transfer is not None
    return {name: transfer_config(cfg, name) for name in cfg.transfer.tasks}


def open_transfer_workloads(cfg: Config, out: Path, timer: Timer, progress: bool, log: Log) -> WorkloadsOf:
    """seed -> every task's workload over the seed's model: the testbed model of replicate ``seed`` (shipped,
    loaded or trained into ``out/models/seed<s>`` with the top-level config), or the one language model."""
    subs = task_configs(cfg)
    if cfg.lm is None:
        from tapioca.models.training import find_pretrained, is_trained
        from tapioca.study.steps import model_for_seed
        from tapioca.tasks.testbed import TestbedWorkload

        tasks = {name: TransferTask(sub.task, name) for name, sub in subs.items()}

        def testbed(seed: int) -> dict[str, Workload]:
            folder = out / "models" / f"seed{seed}"
            if cfg.model.checkpoint is None and find_pretrained(cfg, seed) is None and not is_trained(folder, cfg, seed):
                log(f"seed {seed}: training the model ({cfg.train.steps} steps, families "
                    f"{', '.join(cfg.task.sampler.families)}) into {folder}")
            model = model_for_seed(cfg, seed, out, timer, progress, log)
            return {name: TestbedWorkload.from_config(sub, model, tasks[name], name=f"testbed seed {seed}")
                    for name, sub in subs.items()}

        return testbed
    from tapioca.tasks.text_workload import TextWorkload, load_lm, load_text_task

    with timer("load"):
        lm = load_lm(cfg.lm, cfg.run.device)
        wls: dict[str, Workload] = {name: TextWorkload.from_config(sub, lm, load_text_task(sub.lm))  # type: ignore[arg-type]
                                    for name, sub in subs.items()}
    log(f"{cfg.lm.model}: {lm.n_blocks} blocks; tasks " + "; ".join(
        f"{name} ({wl.task.cfg.source}: {', '.join(wl.distributions)})" for name, wl in wls.items()))  # type: ignore[attr-defined]
    check_text_data(wls, list(cfg.evaluation.seeds))
    return lambda seed: wls


def check_text_data(wls: Mapping[str, Workload], seeds: list[int]) -> None:
    """Fail before any model work when a text task has too few selection or held-out examples for a seed."""
    for name, wl in wls.items():
        for dist in wl.distributions:
            for role, n in (("select", wl.sizes.n_select), ("heldout", wl.sizes.n_heldout)):
                for seed in seeds:
                    try:
                        wl.task.data(dist, role, seed, n)  # type: ignore[attr-defined]
                    except DataError as err:
                        raise DataError(f"transfer task {name!r}: {err}") from None


def check_target(cfg: Config, wls: Mapping[str, Workload]) -> None:
    """``transfer.target`` must be a distribution of every task (text tasks are known only once built)."""
    assert cfg.transfer is not None
    for name, wl in wls.items():
        if cfg.transfer.target not in wl.distributions:
            raise ConfigError(f"transfer.target: {cfg.transfer.target!r} is not a distribution of task {name!r}; "
                              f"allowed: {wl.distributions}")


# ---------------------------------------------------------------------------------------------------------
# One seed: searches, held-out evaluations, in-sample evaluations (each cached)


@dataclass
class SeedOutputs:
    """One seed's searches and evaluations. ``heldout[u]["full"]`` and ``heldout[u][t]``: the full model and the
    model pruned for task t on every distribution of task u (held-out, per example); ``in_sample[t]``: (full,
    pruned-for-t) on t's selection examples of the target."""

    searches: dict[str, PruneResult]
    heldout: dict[str, dict[str, Evaluation]]
    in_sample: dict[str, tuple[Evaluation, Evaluation]]


def seed_steps(tasks: Sequence[str]) -> list[str]:
    """The per-seed steps, in order (the progress bar counts them)."""
    return ["model", *(f"prune {t}" for t in tasks), "evaluate", "in-sample"]


def run_seed(cfg: Config, wls: dict[str, Workload], seed: int, out: Path, timer: Timer, steps: StepProgress) -> SeedOutputs:
    """Every task's search, then the held-out and in-sample evaluations of one seed."""
    assert cfg.transfer is not None
    steps.done(seed, "model")
    searches = {}
    for name, wl in wls.items():
        with timer("prune"):
            searches[name] = search(cfg, wl, name, seed, out / "pruning" / f"seed{seed}", steps.inner)
        steps.done(seed, f"prune {name}")
    with timer("evaluate"):
        heldout = {u: heldout_evaluations(wl, seed, searches, out / "evaluation" / f"seed{seed}" / u)
                   for u, wl in wls.items()}
    steps.done(seed, "evaluate")
    with timer("in-sample"):
        in_sample = {t: in_sample_evaluations(wl, seed, cfg.transfer.target, searches[t].removed,
                                              out / "evaluation" / f"seed{seed}" / t) for t, wl in wls.items()}
    steps.done(seed, "in-sample")
    return SeedOutputs(searches, heldout, in_sample)


def search(cfg: Config, wl: Workload, name: str, seed: int, folder: Path, progress: bool = False) -> PruneResult:
    """``pruning.search`` for task ``name`` selected on ``transfer.target`` (protocol target), cached as
    ``<folder>/<name>.json`` (an interrupted TALE resumes from ``.<name>.scores.json``)."""
    assert cfg.transfer is not None
    folder.mkdir(parents=True, exist_ok=True)
    p = transfer_config(cfg, name).pruning
    compute = lambda: prune(wl, None, p.search, "target", cfg.transfer.target, cfg=p, seed=seed,  # noqa: E731
                            progress=progress, cache_path=folder / f".{name}.scores.json").to_dict()
    return PruneResult.from_dict(cached_json(folder / f"{name}.json", compute))


def heldout_evaluations(wl: Workload, seed: int, searches: Mapping[str, PruneResult],
                        folder: Path) -> dict[str, Evaluation]:
    """The full model and every task's pruned model on every distribution of ``wl``'s task (held-out), cached
    as ``full.npz`` and ``pruned-for-<task>.npz`` in ``folder``. Missing ones are computed distribution by
    distribution so the full model's pass over a distribution is shared (and identical removals run once)."""
    plan = {"full": [], **{t: r.removed for t, r in searches.items()}}
    path = {key: folder / ("full.npz" if key == "full" else f"pruned-for-{key}.npz") for key in plan}
    runs = HeldoutRuns(wl, seed, wl.sizes.n_heldout)
    todo = [removed for key, removed in plan.items() if not path[key].is_file()]
    for dist in wl.distributions if todo else ():
        for removed in todo:
            runs.one(removed, dist)
    return {key: cached_evaluation(path[key], lambda removed=removed: runs(removed, wl.distributions))
            for key, removed in plan.items()}


def in_sample_evaluations(wl: Workload, seed: int, target: str, removed: list[int],
                          folder: Path) -> tuple[Evaluation, Evaluation]:
    """The full model and the model pruned for this task, scored (held-out metrics) on the selection examples of
    ``target`` its search chose on: the paper's in-sample protocol. Cached in ``folder``."""
    runs = HeldoutRuns(wl, seed, wl.sizes.n_select, role="select")
    return (cached_evaluation(folder / "in-sample-full.npz", lambda: runs([], [target])),
            cached_evaluation(folder / "in-sample-pruned.npz", lambda: runs(removed, [target])))


# ---------------------------------------------------------------------------------------------------------
# The matrix, its statistics and verdicts


def smallest_effect(metric: str, full_mean: float, relative: float, points: float) -> float:
    """δ: ``points`` on accuracy-type metrics, ``relative`` × the full model's mean on error metrics."""
    return points if HIGHER_IS_BETTER[metric] else relative * abs(full_mean)


def cell_verdict(row: Mapping[str, Any], metric: str, delta: float, removed_any: bool,
                 confidence: float, chance: float | None = None) -> tuple[str, str]:
    """(verdict, evidence) of one cell's replicate-level Δ row (pruned − full, with ``p_holm`` and
    ``p_equivalence_holm``). Rules, in order: nothing removed in any seed -> "nothing removed"; the CI of the gain
    excludes 0 and the Holm p is below 1 − confidence -> "helps" / "harms"; the equivalence (TOST) p-value for
    (−δ, +δ), Holm-adjusted across the matrix as the gains are, is below 1 − confidence -> "no effect";
    otherwise "not enough data" (with the MDE and the replicates that would detect δ). Where the full model's
    accuracy is within δ of ``chance`` (floor), "harms" and "no effect" become "floor or ceiling", as does "no
    effect" within δ of 1 (ceiling): the model cannot show what pruning does there."""
    gain = gain_interval(dict(row), metric)
    ci = f"gain {gain['mean']:+.4g} [{gain['low']:+.4g}, {gain['high']:+.4g}]"
    if not removed_any:
        return NOTHING_REMOVED, "the search kept every block in every seed: Δ is 0 by construction, nothing was tested"
    significant = row["p_holm"] < 1 - confidence
    if significant and gain["low"] > 0:
        size = " (smaller than δ)" if gain["high_tost"] < delta else ""
        return HELPS, f"{ci}, Holm p {row['p_holm']:.3g}{size}"
    limit = room_of(metric, row.get("full", math.nan), chance, delta)
    equivalent = row.get("p_equivalence_holm", 1.0) < 1 - confidence
    if limit == "floor" and (equivalent or (significant and gain["high"] < 0)):
        return AT_LIMIT, (f"floor: the full model is within δ of chance (acc {row['full']:.4g}, chance {chance:.4g}); "
                          f"{ci} says nothing about pruning")
    if limit == "ceiling" and equivalent:
        return AT_LIMIT, f"ceiling: the full model's acc {row['full']:.4g} leaves no room for a gain of δ; {ci}"
    if significant and gain["high"] < 0:
        size = " (smaller than δ)" if gain["low_tost"] > -delta else ""
        return HARMS, f"{ci}, Holm p {row['p_holm']:.3g}{size}"
    if equivalent:
        return NO_EFFECT, (f"{100 * (2 * confidence - 1):.0f} % interval [{gain['low_tost']:+.4g}, "
                           f"{gain['high_tost']:+.4g}] lies within ±δ = {delta:.4g} (equivalence Holm p "
                           f"{row['p_equivalence_holm']:.3g})")
    needed = stats.units_needed(row.get("sd"), delta, confidence)
    unit = row.get("unit", "replicate")
    return NOT_ENOUGH, (f"{ci} neither excludes 0 (Holm p {row['p_holm']:.3g}) nor is shown within ±δ = "
                        f"{delta:.4g}; MDE {row.get('mde', float('nan')):.4g} at {row.get('n')} {unit}s"
                        + (f", ≈{needed} {unit}s would detect δ" if needed else ""))


def column_key(task: str, dist: str) -> str:
    return f"{task}/{dist}"


def gather(cfg: Config, wls: Mapping[str, Workload], per_seed: Mapping[int, SeedOutputs]) -> dict[str, Any]:
    """transfer.json (without timings) from every seed's outputs.

    Keys: ``kind``, ``model``, ``primary_metric``, ``higher_is_better``, ``seeds``, ``target``, ``tasks`` (name
    -> distributions, selection metric, n_select, n_heldout, pruning epsilon/max_drop/choose), ``rows`` (task
    names), ``columns`` (``[task, dist]`` pairs), ``cells`` (row -> "task/dist" -> the paired Δ of the primary
    metric: mean, low, high, p_value, p_holm, low_tost, high_tost, sd, mde, n, full, pruned, sesoi, n_needed,
    own, verdict, evidence, other_metrics), ``in_sample`` (row -> Δ on the target's selection examples, and
    the optimism in-sample − held-out gain with its CI), ``full`` (task -> dist -> the full model's mean and
    CI), ``removed`` (row -> seed -> blocks), ``counts`` and ``summary`` (the answer in words)."""
    assert cfg.transfer is not None
    ev, target = cfg.evaluation, cfg.transfer.target
    first = next(iter(wls.values()))
    metric = first.primary_metric
    up = first.metrics[metric]
    seeds = list(per_seed)
    rows = list(wls)
    columns = [(u, d) for u, wl in wls.items() for d in wl.distributions]
    full = {u: Evaluation.concat([o.heldout[u]["full"] for o in per_seed.values()]) for u in rows}
    removed = {t: {str(s): per_seed[s].searches[t].removed for s in seeds} for t in rows}
    cells: dict[str, dict[str, dict]] = {t: {} for t in rows}
    pruned_on = {(t, u): Evaluation.concat([o.heldout[u][t] for o in per_seed.values()]) for t in rows for u in rows}
    for t in rows:
        for u, wl in wls.items():
            pruned = pruned_on[t, u]
            table = compare(full[u], pruned, wl.distributions, ev.n_bootstrap, ev.confidence, wl.metrics,
                            wl.seeds_are_models)
            for d in wl.distributions:
                cell = dict(table[d][metric])
                cell["other_metrics"] = {m: {k: table[d][m][k] for k in ("mean", "low", "high", "full", "pruned")}
                                         for m in table[d] if m != metric}
                cell["own"] = u == t
                cells[t][column_key(u, d)] = cell
    for t in rows:
        for cell in cells[t].values():
            cell["sesoi"] = smallest_effect(metric, cell["full"], ev.smallest_effect_relative, ev.smallest_effect_points)
            cell["p_equivalence"] = max(stats.t_p_beyond(cell["mean"], cell["sd"], cell["n"], cell["sesoi"], "below"),
                                        stats.t_p_beyond(cell["mean"], cell["sd"], cell["n"], -cell["sesoi"], "above"))
    holm_all(cells, ev.confidence, up)
    chance = {u: chance_levels(wl, [int(s) for s in seeds]) for u, wl in wls.items()}
    against_own(cells, pruned_on, metric, ev.n_bootstrap, ev.confidence)
    for t in rows:
        removed_any = any(removed[t].values())
        for key, cell in cells[t].items():
            cell["n_needed"] = stats.units_needed(cell.get("sd"), cell["sesoi"], ev.confidence)
            u, d = key.split("/", 1)
            cell["verdict"], cell["evidence"] = cell_verdict(cell, metric, cell["sesoi"], removed_any, ev.confidence,
                                                             (chance[u] or {}).get(d))
    in_sample = {t: in_sample_summary(cfg, t, metric, wls[t].metrics, per_seed, full[t], seeds, wls[t].seeds_are_models)
                 for t in rows}
    full_summary = {u: {d: {k: v[metric][k] for k in ("mean", "low", "high")}
                        for d, v in full[u].summary(ev.n_bootstrap, ev.confidence, shrinkage=False).items()}
                    for u in rows}
    results: dict[str, Any] = {
        "kind": first.kind, "model": model_description(cfg), "primary_metric": metric, "higher_is_better": up,
        "seeds": seeds, "target": target,
        "tasks": {t: task_description(cfg, t, wl) for t, wl in wls.items()},
        "rows": rows, "columns": [list(c) for c in columns], "cells": cells, "in_sample": in_sample,
        "full": full_summary, "removed": removed, "chance": chance,
        "smallest_effect": {"relative": ev.smallest_effect_relative, "points": ev.smallest_effect_points},
        "confidence": ev.confidence, "n_bootstrap": ev.n_bootstrap,
        "holm": f"across all {sum(len(c) for c in cells.values())} cells of the matrix",
    }
    results["counts"] = verdict_counts(results)
    results["summary"] = summarize(results)
    return results


def holm_all(cells: dict[str, dict[str, dict]], confidence: float, higher_is_better: bool) -> None:
    """Replace each cell's ``p_holm`` (and set ``p_equivalence_holm``) by the Holm correction across every cell
    of the matrix, and recompute ``improved`` / ``worse`` with it (in place)."""
    keys = [(t, c) for t, row in cells.items() for c in row]
    adjusted = stats.holm({f"{t}|{c}": cells[t][c]["p_value"] for t, c in keys})
    equivalence = stats.holm({f"{t}|{c}": cells[t][c].get("p_equivalence", 1.0) for t, c in keys})
    for t, c in keys:
        cell = cells[t][c]
        cell["p_holm"] = adjusted[f"{t}|{c}"]
        cell["p_equivalence_holm"] = equivalence[f"{t}|{c}"]
        significant = cell["p_holm"] < 1 - confidence
        up, down = cell["low"] > 0 and significant, cell["high"] < 0 and significant
        cell["improved"], cell["worse"] = (up, down) if higher_is_better else (down, up)


def against_own(cells: dict[str, dict[str, dict]], pruned_on: Mapping[tuple[str, str], Evaluation], metric: str,
                n_bootstrap: int, confidence: float) -> None:
    """Add ``vs_own`` to every cross-task cell (row t, column u/d): the model pruned for t minus the model pruned
    for u itself on the same examples (paired, stratified by seed; Holm across the cross-task cells): is pruning
    for another task worse for u than pruning for u? Positive on an error metric = worse. In place."""
    keys = [(t, key) for t, row in cells.items() for key, cell in row.items() if not cell["own"]]
    for t, key in keys:
        u, d = key.split("/", 1)
        a, b = pruned_on[t, u], pruned_on[u, u]
        ci = stats.paired_bootstrap(a.values[d][metric], b.values[d][metric], groups=a.seeds[d],
                                    n_resamples=n_bootstrap, confidence=confidence)
        cells[t][key]["vs_own"] = {k: getattr(ci, k) for k in ("mean", "low", "high", "p_value")}
    adjusted = stats.holm({f"{t}|{key}": cells[t][key]["vs_own"]["p_value"] for t, key in keys}) if keys else {}
    for t, key in keys:
        cells[t][key]["vs_own"]["p_holm"] = adjusted[f"{t}|{key}"]


def in_sample_summary(cfg: Config, t: str, metric: str, metrics: Mapping[str, bool],
                      per_seed: Mapping[int, SeedOutputs], full_out: Evaluation, seeds: list[int],
                      seeds_are_models: bool = True) -> dict[str, Any]:
    """Row ``t``'s in-sample Δ on the target's selection examples (the paper's protocol) and the selection
    optimism (in-sample − held-out gain in ``metric``, with its CI)."""
    assert cfg.transfer is not None
    ev, target = cfg.evaluation, cfg.transfer.target
    full_in = Evaluation.concat([per_seed[s].in_sample[t][0] for s in seeds])
    pruned_in = Evaluation.concat([per_seed[s].in_sample[t][1] for s in seeds])
    pruned_out = Evaluation.concat([per_seed[s].heldout[t][t] for s in seeds]).subset([target])
    row = compare(full_in, pruned_in, [target], ev.n_bootstrap, ev.confidence, metrics, seeds_are_models)[target][metric]
    return {"column": column_key(t, target), "delta": row,
            "optimism": optimism(full_in, pruned_in, full_out.subset([target]), pruned_out, target, metric,
                                 metrics[metric], None, ev.n_bootstrap, ev.confidence)}


def model_description(cfg: Config) -> dict[str, Any]:
    if cfg.lm is not None:
        return {"name": cfg.lm.model, "dtype": cfg.lm.dtype}
    m, s = cfg.model, cfg.task.sampler
    return {"name": f"testbed {m.n_layer} blocks × {m.n_embd}", "n_layer": m.n_layer, "n_embd": m.n_embd,
            "n_head": m.n_head, "train_steps": cfg.train.steps, "families": list(s.families),
            "degrees": list(s.degrees), "n_points": s.n_points, "checkpoint": m.checkpoint}


def task_description(cfg: Config, name: str, wl: Workload) -> dict[str, Any]:
    sub = transfer_config(cfg, name)
    out: dict[str, Any] = {"distributions": wl.distributions, "selection_metric": wl.selection_metric,
                           "n_select": wl.sizes.n_select, "n_heldout": wl.sizes.n_heldout,
                           "pruning": {k: getattr(sub.pruning, k) for k in ("search", "epsilon", "max_drop", "choose")}}
    if cfg.lm is None:
        out["sampler"] = {"families": list(sub.task.sampler.families), "degrees": list(sub.task.sampler.degrees)}
        out["shifts"] = sub.task.shifts
    else:
        out["source"] = wl.task.cfg.source  # type: ignore[attr-defined]
    return out


def verdict_counts(results: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Verdict counts over the cross-task cells (another task's shifts: ``cross_ood``; its ID: ``cross_id``) and
    the own task's cells (``own``)."""
    counts = {group: {v: 0 for v in VERDICTS} for group in ("cross_ood", "cross_id", "own")}
    for t, row in results["cells"].items():
        for key, cell in row.items():
            group = "own" if cell["own"] else "cross_id" if key.endswith("/id") else "cross_ood"
            counts[group][cell["verdict"]] += 1
    return counts


def _listing(c: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {v}" for v, n in c.items() if n) or "none"


def _undecided(counts: Mapping[str, int]) -> str:
    """The undecided cells of a group in words: too few examples, or a full model at chance (or at 1)."""
    parts = [f"{counts[NOT_ENOUGH]} have not enough data"] if counts[NOT_ENOUGH] else []
    if counts[AT_LIMIT]:
        verb = "sits" if counts[AT_LIMIT] == 1 else "sit"
        parts.append(f"{counts[AT_LIMIT]} {verb} where the full model is at chance or at 1 (floor or ceiling)")
    return " and ".join(parts) or "none is left"


def summarize(results: Mapping[str, Any]) -> dict[str, str]:
    """The answer (one sentence) and a paragraph: does pruning for one task help or harm another task's OOD?"""
    ood, cid, own = (results["counts"][g] for g in ("cross_ood", "cross_id", "own"))
    n_ood = sum(ood.values())
    tested = n_ood - ood[NOTHING_REMOVED]
    if tested == 0:
        answer = ("Not tested: TALE removed no block for any task in any seed, so no pruned model differs from "
                  "the full one.")
    elif ood[HARMS] and not ood[HELPS]:
        answer = f"Pruning for one task harms another task's OOD: {ood[HARMS]} of {tested} cross-task shift cells got worse."
    elif ood[HELPS] and not ood[HARMS]:
        answer = f"Pruning for one task helps another task's OOD: {ood[HELPS]} of {tested} cross-task shift cells improved."
    elif ood[HELPS] and ood[HARMS]:
        answer = (f"Mixed: pruning for one task helps another task's OOD in {ood[HELPS]} and harms it in "
                  f"{ood[HARMS]} of {tested} cross-task shift cells.")
    elif ood[NO_EFFECT] == tested:
        answer = "No effect: pruning for one task changes no other task's OOD by as much as the smallest effect of interest."
    elif ood[NO_EFFECT]:
        answer = (f"No effect where the data can tell ({ood[NO_EFFECT]} of {tested} cross-task shift cells within ±δ); "
                  f"of the others, {_undecided(ood)}.")
    else:
        answer = (f"Not decided: none of the {tested} cross-task shift cells shows a significant change or lies within "
                  f"±δ ({_undecided(ood)}).")
    own_tested = sum(own.values()) - own[NOTHING_REMOVED]
    if tested and own_tested:
        if own[HARMS]:
            answer += f" It harms the task it was pruned for too ({own[HARMS]} of {own_tested} own-task cells worse)."
        elif own[HELPS]:
            answer += f" On the task it was pruned for it helps in {own[HELPS]} of {own_tested} own-task cells."
    target = results["target"]
    own_rows = []
    for t, s in results["in_sample"].items():
        cell = results["cells"][t][s["column"]]
        own_rows.append(f"{t} {gain_interval(cell, results['primary_metric'])['mean']:+.3g} held out "
                        f"({gain_interval(s['delta'], results['primary_metric'])['mean']:+.3g} in-sample)")
    vs_own = _against_own_sentence(results)
    paragraph = (f"Each task's model was pruned by TALE selecting on its own {target} split; gains below are in "
                 f"{results['primary_metric']} with positive = better, δ = the smallest effect of interest. "
                 f"Cross-task shift cells ({n_ood}): {_listing(ood)}. Cross-task ID cells ({sum(cid.values())}): "
                 f"{_listing(cid)}. Own-task cells ({sum(own.values())}): {_listing(own)}. Own {target} gain: "
                 + "; ".join(own_rows) + f". {vs_own}Holm correction {results['holm']}.")
    return {"answer": answer, "paragraph": paragraph}


def _against_own_sentence(results: Mapping[str, Any]) -> str:
    """How the cross-task models compare with the model pruned for the evaluated task itself."""
    metric, up = results["primary_metric"], results["higher_is_better"]
    better = worse = same = 0
    for row in results["cells"].values():
        for cell in row.values():
            v = cell.get("vs_own")
            if v is None:
                continue
            significant = v["p_holm"] < 1 - results["confidence"] and (v["low"] > 0 or v["high"] < 0)
            if not significant:
                same += 1
            elif (v["mean"] > 0) == up:
                better += 1
            else:
                worse += 1
    n = better + worse + same
    if not n:
        return ""
    return (f"Against the model pruned for the evaluated task itself (same examples, Holm across the {n} cross-task "
            f"cells), the model pruned for another task is worse in {worse}, better in {better} and not "
            f"distinguishable in {same} ({metric}). ")


# ---------------------------------------------------------------------------------------------------------
# The run


def run_transfer(cfg: Config, out: str | Path | None = None, progress: bool = True, log: Log = print) -> dict:
    """Every task's search and every evaluation (each cached in ``out``, default ``run.out``), then
    ``transfer.json`` and the report in ``out/report``. Returns the transfer.json data."""
    if cfg.transfer is None:
        raise ConfigError("transfer: the config has no transfer section; give transfer.tasks (configs/transfer.yaml)")
    out = Path(out if out is not None else cfg.run.out)
    prepare_run_dir(cfg, out)
    threads = SeedThreads(seed_workers(cfg))
    timer = Timer(out / "timings.json", before_step=threads.fit)
    workloads_of = open_transfer_workloads(cfg, out, timer, progress and threads.workers == 1, log)
    seeds = list(cfg.evaluation.seeds)
    tasks = list(cfg.transfer.tasks)
    steps = StepProgress(seeds, seed_steps(tasks), progress, inner=threads.workers == 1)
    first: dict[int, dict[str, Workload]] = {}

    def one(seed: int) -> SeedOutputs:
        wls = workloads_of(seed)
        check_target(cfg, wls)
        first.setdefault(seed, wls)
        result = run_seed(cfg, wls, seed, out, timer, steps)
        log(f"seed {seed}: removed " + "; ".join(f"for {t} {r.removed}" for t, r in result.searches.items()))
        return result

    try:
        per_seed = threads.map(one, seeds)
    finally:
        torch.set_num_threads(threads.threads)
        steps.close()
    with timer("statistics"):
        results = gather(cfg, first[seeds[0]], per_seed)
    results["timings_seconds"] = dict(timer.seconds)
    write_json(out / "transfer.json", results)
    from tapioca.report.transfer_report import write_transfer_report

    write_transfer_report(out)
    return results
