"""Per-seed study steps that test TALE against controls, on every shift where TALE removed blocks.

* comparisons: one-shot baselines at TALE's block count and weight-level pruning at TALE's parameter budget;
* interventions: residual-scaling sweeps (TALE's blocks vs random kept blocks) and norm matching.
Each function computes one seed and returns plain data (or an Evaluation); the study caches them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tapioca.api import prune
from tapioca.config import Config
from tapioca.analysis.evaluation import Evaluation, evaluate
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.analysis.interventions import norm_matched, position_norms, residual_scaling_sweep
from tapioca.models.base import run_in_chunks
from tapioca.models.resumed import ResumedRuns
from tapioca.pruning.searches import PruneResult
from tapioca.tasks.polyreg import PolyRegTask
from tapioca.pruning.weights import block_parameter_count, magnitude_prune, n_prunable, wanda_prune

BASELINES = ("block_influence", "angular", "last_k", "random", "distortion")
WEIGHT_METHODS = ("magnitude", "wanda")


def baseline_selection(cfg: Config, task: PolyRegTask, model: Any, seed: int, shift: str, tale: PruneResult,
                       method: str, score_cache: Path | None = None) -> PruneResult:
    """A one-shot baseline selected on the shift's selection inputs, removing as many blocks as TALE did.
    ``score_cache``: the shift's TALE score cache (same selection data), so configurations TALE scored (the
    full model, every single block) are read, not recomputed."""
    return prune(model, task, method, "target", shift, cfg=cfg.pruning, seed=seed, progress=False,
                 n_remove=len(tale.removed), cache_path=score_cache)


def weight_pruned_evaluation(cfg: Config, task: PolyRegTask, model: Any, seed: int, shift: str, tale: PruneResult,
                             method: str) -> tuple[dict, Evaluation]:
    """Zero as many individual weights as TALE's removed blocks hold parameters, keeping every layer (C9).
    Wanda's activation norms come from the shift's selection inputs, the data TALE selected on."""
    budget = block_parameter_count(model, tale.removed)
    budget = min(budget, n_prunable(model))  # removing (almost) every block can exceed the linear weights
    if method == "magnitude":
        pruned = magnitude_prune(model, budget, scope="global")
    else:
        batch = task.data(shift, "select", seed, cfg.pruning.n_select)
        pruned = wanda_prune(model, batch, budget, chunk=cfg.evaluation.batch_size)
    ev = evaluate(pruned.model, task, None, [shift], [seed], cfg.evaluation.n_heldout, cfg.evaluation.batch_size)
    return pruned.to_dict() | {"block_parameters": block_parameter_count(model, tale.removed)}, ev


def interventions(cfg: Config, task: PolyRegTask, model: Any, seed: int, shift: str, tale: PruneResult,
                  id_profiles: dict | None = None) -> dict:
    """Residual-scaling sweeps of TALE's blocks and of as many random kept blocks (control), and norm
    matching: OOD states forced to ID norms at TALE's blocks (no pruning), and ID states pushed to OOD norms
    (reverse control). Scores are mean -NMSE on reference-role prompts (higher is better). The ID prompts
    depend on the seed only, so ``id_profiles`` (see residual_scaling_sweep) may be shared across shifts."""
    n, chunk = cfg.geometry.n_prompts, cfg.evaluation.batch_size
    ood = task.data(shift, "reference", seed + 7919, n)
    ident = task.data("id", "reference", seed + 7919, n)
    score = lambda preds, batch: task.score(preds, batch, "nmse")
    kept = [b for b in range(model.n_blocks) if b not in tale.removed]
    control = sorted(random.Random(seed).sample(kept, min(len(kept), len(tale.removed))))
    ood_runs, id_runs = ResumedRuns(model, ood, chunk), ResumedRuns(model, ident, chunk)  # shared by all below
    sweep = lambda blocks: [p.to_dict() for p in residual_scaling_sweep(model, blocks, ood_runs, id_runs, score,
                                                                          cfg.geometry.alphas, chunk, id_profiles)]
    return {"removed": list(tale.removed), "control_blocks": control, "n": n,
            "sweep_removed": sweep(tale.removed), "sweep_control": sweep(control) if control else [],
            "norm_matching": norm_matching(model, tale.removed, ood_runs, id_runs, score, chunk)}


def norm_matching(model: Any, blocks: list[int], ood_runs: ResumedRuns, id_runs: ResumedRuns, score: Any,
                  chunk: int) -> dict:
    """Mean scores of: the full model on OOD; OOD with the outputs of ``blocks`` forced to ID per-position
    norms; the pruned model on OOD; the full model on ID; ID pushed to OOD norms at ``blocks``."""
    ood, ident = ood_runs.batch, id_runs.batch
    mean_of = lambda runs, gates=None: float(score(runs(gates).predictions, runs.batch).double().mean())
    mean = lambda batch: float(score(run_in_chunks(model, batch, None, False, chunk).predictions, batch).double().mean())
    out: dict[str, Any] = {"ood_full": mean_of(ood_runs), "ood_pruned": mean_of(ood_runs, {b: 0.0 for b in blocks}),
                           "id_full": mean_of(id_runs)}
    if ood.xs.shape != ident.xs.shape:
        out["skipped"] = "prompt lengths differ between ID and this shift; per-position norms cannot be matched"
        return out
    id_norms, ood_norms = position_norms(model, ident), position_norms(model, ood)
    with norm_matched(model, {b: id_norms[b] for b in blocks}):
        out["ood_matched"] = mean(ood)
    with norm_matched(model, {b: ood_norms[b] for b in blocks}):
        out["id_pushed"] = mean(ident)
    return out
