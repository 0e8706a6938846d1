"""The plain TALE loop, as the original runs it: every candidate scored from scratch, one example at a time.

No batching, no prefix reuse, no score cache. It shares tapioca's per-example scorer (the same
``selection_scorer`` run with chunk 1) and tapioca's acceptance rule (best candidate, ties to the lowest index,
accepted while >= baseline - epsilon, at most ``max_drop`` removals), and returns the same
:class:`~tapioca.pruning.searches.PruneResult`, so its selection can be compared with ``tale_search`` one to one.
"""

from __future__ import annotations

from typing import Any

from tapioca.models.gates import removal_gates
from tapioca.pruning.searches import PruneResult, Scorer, _tale_outputs


def mean_score(scorer: Scorer, removed: list[int]) -> float:
    """Mean selection score of the model with ``removed`` blocks skipped (the scorer loops over examples)."""
    return float(scorer(removal_gates(removed)).double().mean())


def naive_round(scorer: Scorer, removed: list[int], n_blocks: int) -> dict[int, float]:
    """Score ``removed + [b]`` for every block b not yet removed, each from scratch."""
    return {b: mean_score(scorer, [*removed, b]) for b in range(n_blocks) if b not in removed}


def naive_tale(scorer: Scorer, n_blocks: int, epsilon: float = 0.08, max_drop: int | None = None,
               choose: str = "best") -> PruneResult:
    """Greedy TALE with ``scorer`` (gates -> per-example scores (B,), batch size 1 for the naive timing)."""
    baseline = mean_score(scorer, [])
    floor, limit = baseline - epsilon, n_blocks if max_drop is None else max_drop
    removed: list[int] = []
    path_scores: list[float] = []
    rounds: list[dict[str, Any]] = []
    evaluated = 1
    while len(removed) < min(limit, n_blocks):
        candidates = naive_round(scorer, removed, n_blocks)
        evaluated += len(candidates)
        chosen = max(candidates, key=lambda b: (candidates[b], -b))
        accepted = candidates[chosen] >= floor
        rounds.append({"removed_before": list(removed), "candidates": {str(b): s for b, s in candidates.items()},
                       "chosen": chosen, "score": candidates[chosen], "accepted": accepted})
        if not accepted:
            break
        removed.append(chosen)
        path_scores.append(candidates[chosen])
    best, bsba, final = _tale_outputs(removed, path_scores, baseline)
    picked = {"best": best, "bsba": bsba, "final": final}[choose]
    depth_scores = [baseline, *path_scores]  # the chosen configuration is a path prefix: its score is known
    return PruneResult(
        search="naive_tale", n_blocks=n_blocks, baseline_score=baseline, removed=picked, best=best, final=final,
        bsba=bsba, path=removed, path_scores=path_scores, rounds=rounds, selection_score=depth_scores[len(picked)],
        info={"epsilon": epsilon, "max_drop": max_drop, "choose": choose, "configurations_evaluated": evaluated,
              "prefix_cache": False},
    )
