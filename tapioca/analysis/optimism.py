"""The paper's protocol beside the held-out one: selection optimism, its null reference, and robust summaries.

TALE selects and reports on the same examples. Its in-sample gain is biased upward: the best of L noisy
candidate scores exceeds its true value (the winner's curse). Here

* **optimism** = in-sample gain − held-out gain (same metric, oriented so that positive = looks better), with
  a bootstrap CI (the two samples are independent: selection and held-out examples are disjoint);
* its **null reference** is a *placebo search*: the in-sample gain that picking the best of the candidates
  produces when no block truly helps. Each candidate's per-example differences on the selection examples
  (removal of one block − full model) are centred (true effect set to zero; a clearly harmful removal keeps
  its harmful mean), multiplied by one shared random sign per example (which keeps the candidates'
  correlation and each example's spread), and the best candidate's mean is taken; repeated ``draws`` times,
  pooled over seeds like the real gain. Sign flips are
  chosen over cross-fitting because they need no extra search: the one-block removals are one resumed pass
  each, and the null is exact for TALE's first round (deeper rounds only add choices, so it is a lower bound
  of the full search's optimism under the null).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tapioca.analysis import stats
from tapioca.analysis.evaluation import Evaluation


def oriented(full: np.ndarray, pruned: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Per-example gain (n,): pruned − full where higher is better, full − pruned where lower is better."""
    return pruned - full if higher_is_better else full - pruned


HARMFUL_Z = 1.96  # a candidate whose mean gain lies this many standard errors below 0 keeps its (harmful) mean


def placebo_null(diffs: list[np.ndarray], draws: int = 2000, seed: int = 0) -> np.ndarray:
    """Null distribution (draws,) of the seed-pooled in-sample gain of the best candidate when no candidate
    truly helps. ``diffs``: per seed, the candidates' per-example gains (C, n_seed) on that seed's selection
    examples. Each candidate's true gain is set to 0, except that a clearly harmful one (mean more than
    :data:`HARMFUL_Z` standard errors below 0, e.g. removing an essential block) keeps its mean: "no block
    helps" does not make a destructive removal harmless, and its large spread would otherwise dominate the
    maximum. The pooled gain of a draw is the example-weighted mean over seeds of each seed's best candidate."""
    rng = np.random.default_rng(seed)
    total = sum(d.shape[1] for d in diffs)
    null = np.zeros(draws)
    for d in diffs:
        n = d.shape[1]
        mean = d.mean(1)
        se = d.std(1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(mean)
        truth = np.where(mean < -HARMFUL_Z * se, mean, 0.0)  # (C,)
        centred = d - mean[:, None]  # (C, n)
        signs = rng.choice([-1.0, 1.0], size=(draws, n))  # (draws, n), shared by the candidates
        null += (truth[None, :] + signs @ centred.T / n).max(1) * (n / total)  # best candidate per draw
    return null


def optimism(full_in: Evaluation, pruned_in: Evaluation, full_out: Evaluation, pruned_out: Evaluation,
             dist: str, metric: str, higher_is_better: bool, null: np.ndarray | None,
             n_bootstrap: int, confidence: float) -> dict[str, Any]:
    """In-sample gain, held-out gain and optimism (in-sample − held-out, CI) on ``dist``, with the placebo
    null's mean, 95 % quantile and the share of null draws at least as large as the in-sample gain."""
    gain_in = oriented(full_in.values[dist][metric], pruned_in.values[dist][metric], higher_is_better)
    gain_out = oriented(full_out.values[dist][metric], pruned_out.values[dist][metric], higher_is_better)
    ci = stats.difference_of_means(gain_in, gain_out, groups_a=full_in.seeds[dist], groups_b=full_out.seeds[dist],
                                   n_resamples=n_bootstrap, confidence=confidence)
    row: dict[str, Any] = {"metric": metric, "in_sample": float(gain_in.mean()), "held_out": float(gain_out.mean()),
                           "mean": ci.mean, "low": ci.low, "high": ci.high, "n_in_sample": len(gain_in),
                           "n_held_out": len(gain_out)}
    if null is not None:
        row.update(null_mean=float(null.mean()), null_q95=float(np.quantile(null, 0.95)),
                   p_null=float((np.sum(null >= gain_in.mean()) + 1) / (len(null) + 1)))
    return row


def robust_summary(full: Evaluation, pruned: Evaluation, dist: str, metric: str, n_bootstrap: int,
                   confidence: float, top: int = 5, eps: float = 1e-12) -> dict[str, Any]:
    """For a heavy-tailed error metric (e.g. NMSE): medians of the full and pruned model, the mean log ratio
    log(pruned / full) per example with a paired bootstrap CI (< 0: pruning lowers the typical error), and the
    ``top`` examples that dominate the full model's mean (seed, index within the seed, share of the sum)."""
    a, b = full.values[dist][metric], pruned.values[dist][metric]
    seeds = full.seeds[dist]
    log_ratio = np.log(b + eps) - np.log(a + eps)
    ci = stats.paired_bootstrap(log_ratio, np.zeros_like(log_ratio), groups=seeds, n_resamples=n_bootstrap,
                                confidence=confidence)
    index, seen = np.zeros(len(seeds), dtype=int), {}  # each example's position within its seed
    for i, s in enumerate(seeds.tolist()):
        index[i] = seen[s] = seen.get(s, -1) + 1
    order = np.argsort(-a, kind="stable")[:top]
    total = float(a.sum()) or 1.0
    return {"median_full": float(np.median(a)), "median_pruned": float(np.median(b)),
            "mean_log_ratio": ci.to_dict(),
            "dominant": [{"seed": int(seeds[i]), "index": int(index[i]), "share": float(a[i] / total)} for i in order]}
