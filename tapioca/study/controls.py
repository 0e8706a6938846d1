"""Per-seed study steps that test TALE against controls, on every shift where TALE removed blocks, for any
:class:`~tapioca.tasks.base.Workload`.

* comparisons: one-shot baselines at TALE's block count and weight-level pruning at TALE's parameter budget;
* interventions: residual-scaling sweeps (TALE's blocks vs random kept blocks) and norm matching.
Each function computes one seed and returns plain data (or an Evaluation); the study caches them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tapioca.analysis.evaluation import Evaluation, compare
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.analysis.interventions import (
    last_token_norm_matched, last_token_norms, norm_matched, position_norms, residual_scaling_sweep,
)
from tapioca.api import prune
from tapioca.config import Config
from tapioca.io import write_json
from tapioca.models.base import run_in_chunks
from tapioca.models.resumed import ResumedRuns
from tapioca.pruning.searches import PruneResult
from tapioca.pruning.weights import block_parameter_count, magnitude_prune, n_prunable, wanda_prune
from tapioca.study.rundir import cached_json
from tapioca.tasks import base
from tapioca.tasks.base import Workload

BASELINES = ("block_influence", "angular", "last_k", "random", "distortion", "sleb")
WEIGHT_METHODS = ("magnitude", "wanda")


def baseline_selections(cfg: Config, wl: Workload, seed: int, searches: dict[str, PruneResult],
                        out: Path, progress: bool = False) -> dict[str, dict[str, PruneResult]]:
    """Per shift where TALE removed blocks, each one-shot baseline selected on the shift's selection split,
    removing as many blocks as TALE did (cached as ``controls/seed<seed>/<method>-<shift>.json``). The
    shift's TALE score cache (same selection data) supplies configurations TALE already scored. ``progress``:
    bars of the searches that have rounds (SLEB)."""
    folder = out / "controls" / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, PruneResult]] = {}
    for shift, tale in searches.items():
        if shift == "id" or not tale.removed:
            continue
        score_cache = out / "pruning" / f"seed{seed}" / f".{shift}.scores.json"
        table[shift] = {method: PruneResult.from_dict(cached_json(
            folder / f"{method}-{shift}.json",
            lambda method=method: prune(wl, None, method, "target", shift, cfg=cfg.pruning, seed=seed, progress=progress,
                                        n_remove=len(tale.removed), cache_path=score_cache, workers=0,
                                        ray_address=None).to_dict()))
            for method in BASELINES}
    return table


def pending_baselines(baselines: dict[str, dict[str, PruneResult]], folder: Path) -> list[tuple[list[int], list[str]]]:
    """(removed, [shift]) of every baseline whose held-out evaluation is not cached in ``folder`` yet."""
    return [(result.removed, [shift]) for shift, methods in baselines.items() for method, result in methods.items()
            if not (folder / f"{method}-{shift}.npz").is_file()]


def comparisons(cfg: Config, wl: Workload, seed: int, searches: dict[str, PruneResult],
                baselines: dict[str, dict[str, PruneResult]], full: Evaluation, out: Path,
                runs: HeldoutRuns) -> dict[str, dict[str, Evaluation]]:
    """Per shift and control method, this seed's held-out Evaluation on that shift. Where TALE removed
    nothing the controls remove nothing too, so their result is the full model's. Baselines use their
    ``baselines`` selection through ``runs``; weight pruning is applied and evaluated here."""
    folder = out / "controls" / f"seed{seed}"
    table: dict[str, dict[str, Evaluation]] = {}
    for shift in wl.distributions:
        if shift == "id":
            continue
        tale = searches[shift]
        table[shift] = {}
        for method in (*BASELINES, *WEIGHT_METHODS):
            if not tale.removed:
                table[shift][method] = full.subset([shift])
                continue
            path = folder / f"{method}-{shift}.npz"
            if not path.is_file():
                if method in BASELINES:
                    ev = runs(baselines[shift][method].removed, [shift])
                else:
                    info, ev = weight_pruned_evaluation(wl, seed, shift, tale.removed, method)
                    write_json(folder / f"{method}-{shift}.json", info)
                ev.save(path)
            table[shift][method] = Evaluation.load(path)
    return table


def weight_pruned_evaluation(wl: Workload, seed: int, shift: str, removed: list[int],
                             method: str) -> tuple[dict, Evaluation]:
    """Zero as many individual weights as the ``removed`` blocks hold parameters, keeping every layer (C9).
    Wanda's activation norms come from the shift's selection split, the data TALE selected on."""
    blocks = block_parameter_count(wl.model, removed)
    budget = min(blocks, n_prunable(wl.model))  # removing (almost) every block can exceed the linear weights
    if method == "magnitude":
        pruned = magnitude_prune(wl.model, budget, scope="global")
    else:
        sel = wl.selection(shift, "select", seed, wl.sizes.n_select)
        pruned = wanda_prune(sel.model, sel.batch, budget, chunk=wl.sizes.eval_chunk)
    ev = base.evaluate(wl.with_model(pruned.model), None, shift, seed, wl.sizes.n_heldout)
    return pruned.to_dict() | {"block_parameters": blocks}, ev


def comparison_table(cfg: Config, wl: Workload, full: Evaluation, target: Evaluation, methods: dict[int, dict],
                     searches: dict[int, dict[str, PruneResult]]) -> dict:
    """Δ (method − full) per shift where TALE removed blocks in at least one seed, for TALE and controls, on the
    models in ``methods`` (``geometry.controls_models``); each control also carries ``vs_tale``: Δ (method −
    TALE) on the same examples."""
    ev = cfg.evaluation
    shifts = [s for s in next(iter(methods.values())) if any(searches[seed][s].removed for seed in searches)]
    if not shifts:
        return {}
    table: dict[str, dict] = {s: {} for s in shifts}
    names = ["tale", *next(iter(next(iter(methods.values())).values()))]
    full, target = full.for_seeds(methods), target.for_seeds(methods)  # the models the controls ran on
    for name in names:
        pruned = target.subset(shifts) if name == "tale" else Evaluation.concat(
            [methods[seed][s][name] for seed in methods for s in shifts])
        for shift, row in compare(full, pruned, shifts, ev.n_bootstrap, ev.confidence, wl.metrics, wl.seeds_are_models).items():
            table[shift][name] = row
        if name != "tale":  # the method against TALE itself, paired on the same held-out examples (C9)
            tale = target.subset(shifts)
            for shift, row in compare(tale, pruned, shifts, ev.n_bootstrap, ev.confidence, wl.metrics, wl.seeds_are_models).items():
                table[shift][name]["vs_tale"] = row
    return table


def interventions(cfg: Config, wl: Workload, seed: int, shift: str, removed: list[int],
                  id_profiles: dict | None = None) -> dict:
    """Residual-scaling sweeps of the ``removed`` blocks and of as many random kept blocks (control), and norm
    matching (OOD states forced to ID norms at those blocks, no pruning; and the reverse control), scored on
    the workload's intervention examples (higher is better). The ID examples depend on the seed only, so
    ``id_profiles`` (see residual_scaling_sweep) may be shared across shifts."""
    ood, ident = wl.intervention_selection(shift, seed), wl.intervention_selection("id", seed)
    chunk = wl.sizes.eval_chunk
    kept = [b for b in range(wl.model.n_blocks) if b not in removed]
    control = sorted(random.Random(seed).sample(kept, min(len(kept), len(removed))))
    ood_runs, id_runs = ResumedRuns(ood.model, ood.batch, chunk), ResumedRuns(ident.model, ident.batch, chunk)
    score = ood.score_predictions

    def sweep(blocks: list[int]) -> list[dict]:
        return [p.to_dict() for p in residual_scaling_sweep(ood.model, blocks, ood_runs, id_runs, score,
                                                              cfg.geometry.alphas, chunk, id_profiles)]

    return {"removed": list(removed), "control_blocks": control, "n": wl.sizes.n_profile,
            "metric": wl.intervention_metric, "sweep_removed": sweep(removed), "sweep_control": sweep(control) if control else [],
            "norm_matching": norm_matching(wl, ood.model, removed, ood_runs, id_runs, score, chunk)}


def norm_matching(wl: Workload, model: Any, blocks: list[int], ood_runs: ResumedRuns, id_runs: ResumedRuns,
                  score: Any, chunk: int) -> dict:
    """Mean scores of: the full model on OOD; OOD with the outputs of ``blocks`` forced to ID norms; the
    pruned model on OOD; the full model on ID; ID pushed to OOD norms at ``blocks``. Norms are matched per
    token position (``wl.norm_matching == "position"``, prompts of equal length) or at each row's last prompt
    token ("last_token")."""
    ood, ident = ood_runs.batch, id_runs.batch
    mean_of = lambda runs, gates=None: float(score(runs(gates).predictions, runs.batch).double().mean())  # noqa: E731
    mean = lambda batch: float(score(run_in_chunks(model, batch, None, False, chunk).predictions, batch).double().mean())  # noqa: E731
    out: dict[str, Any] = {"ood_full": mean_of(ood_runs), "ood_pruned": mean_of(ood_runs, {b: 0.0 for b in blocks}),
                           "id_full": mean_of(id_runs)}
    if wl.norm_matching == "last_token":
        id_norms, ood_norms = last_token_norms(model, ident, chunk), last_token_norms(model, ood, chunk)
        matched = lambda norms: last_token_norm_matched(model, {b: float(norms[b]) for b in blocks})  # noqa: E731
    else:
        id_norms, ood_norms = position_norms(model, ident), position_norms(model, ood)
        if id_norms.shape != ood_norms.shape:
            out["skipped"] = "prompt lengths differ between ID and this shift; per-position norms cannot be matched"
            return out
        matched = lambda norms: norm_matched(model, {b: norms[b] for b in blocks})  # noqa: E731
    with matched(id_norms):
        out["ood_matched"] = mean(ood)
    with matched(ood_norms):
        out["id_pushed"] = mean(ident)
    return out
