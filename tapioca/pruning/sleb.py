"""SLEB-style label-free greedy block removal (Song et al. 2024), a control for TALE.

Like TALE it removes blocks one at a time, but each round keeps the removal under which the model best
explains unlabelled inputs (SLEB: lowest perplexity): ``SearchContext.unlabelled_scorer`` maps gates to
per-example label-free scores (B,), higher is better, e.g.
:func:`tapioca.tasks.choices.prompt_loglik_scorer` (text) or :func:`tapioca.tasks.polyreg.context_error_scorer`
(testbed). Labels are read only to report the chosen configuration's selection score, as the one-shot
baselines do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from tapioca.errors import ConfigError
from tapioca.models.gates import removal_gates

if TYPE_CHECKING:  # searches registers this search, so it is imported inside the function
    from tapioca.pruning.searches import PruneResult, SearchContext


def sleb_search(ctx: SearchContext) -> PruneResult:
    """Remove ``ctx.n_remove`` blocks greedily: each round, the block whose removal (with the blocks already
    removed) gives the highest mean ``unlabelled_scorer`` score (ties -> lowest index). Every round's
    label-free candidate scores go to ``rounds``, the first round's to ``block_scores``; ``baseline_score``
    and ``selection_score`` are the labelled ``ctx.scorer``'s (through the shared score cache)."""
    from tapioca.pruning.searches import PruneResult, ScoreCache

    if ctx.unlabelled_scorer is None:
        raise ConfigError("pruning.search: 'sleb' needs a label-free scorer (SearchContext.unlabelled_scorer: "
                          "gates -> per-example scores on unlabelled inputs, e.g. prompt_loglik_scorer or "
                          "context_error_scorer)")
    n_blocks = ctx.model.n_blocks
    if isinstance(ctx.n_remove, bool) or not isinstance(ctx.n_remove, int) or not 1 <= ctx.n_remove <= n_blocks:
        raise ConfigError(f"pruning.n_remove: {ctx.n_remove!r} is not allowed; expected 1..{n_blocks}")
    prefix = ctx.unlabelled_rounds  # PrefixRounds over the unlabelled inputs: the same means, less compute
    mean = lambda removed: float(ctx.unlabelled_scorer(removal_gates(removed)).double().mean())  # noqa: E731
    label_free = [prefix.base([]) if prefix is not None else mean([])]  # before any removal, then after each
    removed: list[int] = []
    rounds: list[dict[str, Any]] = []
    for _ in tqdm(range(ctx.n_remove), disable=not ctx.progress, desc="SLEB rounds", leave=False):
        todo = [b for b in range(n_blocks) if b not in removed]
        candidates = prefix(removed, todo) if prefix is not None else {b: mean([*removed, b]) for b in todo}
        chosen = max(candidates, key=lambda b: (candidates[b], -b))
        rounds.append({"removed_before": list(removed), "candidates": {str(b): s for b, s in candidates.items()},
                       "chosen": chosen, "score": candidates[chosen]})
        removed.append(chosen)
        label_free.append(candidates[chosen])
    score = ScoreCache(ctx.scorer, ctx.cache_path, where=ctx.where)  # e.g. TALE's cache on the same selection data
    return PruneResult(
        search="sleb", n_blocks=n_blocks, baseline_score=score(frozenset()), removed=removed, best=removed,
        final=removed, bsba=removed, path=removed, rounds=rounds,
        block_scores={int(b): s for b, s in rounds[0]["candidates"].items()},
        selection_score=score(frozenset(removed)),
        info={"n_remove": ctx.n_remove, "seed": ctx.seed, "label_free_scores": label_free},
    )


__all__ = ["sleb_search"]
