"""The paper's protocol beside the held-out one: selection optimism, its null reference, and robust summaries.

TALE selects and reports on the same examples. Its in-sample gain is biased upward: the best of L noisy
candidate scores exceeds its true value (the winner's curse), and every further greedy round adds another
such choice. Here

* **optimism** = in-sample gain − held-out gain (same metric, oriented so that positive = looks better), with
  a bootstrap CI (the two samples are independent: selection and held-out examples are disjoint);
* its **null reference** is :func:`search_null`, a *placebo search* that replays TALE's whole rule (rounds,
  epsilon, ``max_drop``, ``choose``; :class:`SearchRule`) on the per-example gains of every candidate of every
  recorded round (:class:`RecordedSearch`, built by :func:`tapioca.study.replay.record_rounds`) after making
  them null: each candidate's per-example gain over the configuration before its round is centred (true
  effect set to zero; a clearly harmful removal keeps its harmful mean) and averaged over one bootstrap
  resample of the examples, shared by every candidate and round of a replicate (which keeps the candidates'
  correlation, each example's spread and the skew of a removal's gains). The statistic of a draw is the mean
  over replicates of the in-sample gain of the configuration the replayed rule picks, like
  :func:`replayed_gain` on the real data; :func:`p_null` compares them. A resample, not random signs: a
  removal's per-example gain is bounded above by the full model's error and has a long tail of losses, which
  signs would mirror into gains no removal can make (on the default study the sign-flip null's mean ID gain was
  ten times the largest ID gain possible). Resampling needs no extra search, unlike cross-fitting.
* the null of the first round alone (``SearchRule(inf, 1, "final")``) is anti-conservative for deeper
  searches: on the simulated searches of ``tests/test_optimism.py`` (additive block effects, no block helping)
  with 2, 3 or ~5 rounds it gives p < 0.05 in about a third to a half of the studies; :func:`search_null`
  stays within Monte-Carlo error of 5 % (the test prints the rates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from tapioca.analysis import stats
from tapioca.analysis.evaluation import Evaluation, paired_full
from tapioca.config import EvaluationConfig
from tapioca.errors import ConfigError, DataError


def oriented(full: np.ndarray, pruned: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Per-example gain (n,): pruned − full where higher is better, full − pruned where lower is better."""
    return pruned - full if higher_is_better else full - pruned


HARMFUL_Z = EvaluationConfig().placebo_harmful_z  # default: a candidate this many SEs below 0 keeps its mean


def _null_means(x: np.ndarray, signs: np.ndarray, harmful_z: float = HARMFUL_Z) -> np.ndarray:
    """Null mean gains (D, K) of K candidates from their per-example gains ``x`` (K, n) and per-example weights
    (D, n) — random signs, or a bootstrap resample's counts minus one (:func:`_resample_weights`): each
    candidate centred on its mean, except that a clearly harmful one (mean more than :data:`HARMFUL_Z` standard
    errors below 0, e.g. removing an essential block) keeps its mean: "no block helps" does not make a
    destructive removal harmless, and its large spread would otherwise dominate the maximum."""
    n = x.shape[1]
    mean = x.mean(1)
    se = x.std(1, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(mean)
    truth = np.where(mean < -harmful_z * se, mean, 0.0)  # (K,)
    return truth[None, :] + signs @ (x - mean[:, None]).T / n


CHOOSE = ("best", "bsba", "final")  # TALE's rules for which accepted configuration is the pruned model


@dataclass(frozen=True)
class SearchRule:
    """TALE's rule as the search ran it: accept a round's best candidate while the configuration's selection
    score is >= baseline − ``epsilon``; at most ``max_drop`` removals (None: no limit); then ``choose`` among
    the depths of the accepted path: "best" (highest score, ties -> fewer blocks), "bsba" (deepest with score
    >= baseline) or "final" (deepest)."""

    epsilon: float
    max_drop: int | None = None
    choose: str = "best"

    def __post_init__(self) -> None:
        if not np.isfinite(self.epsilon):
            raise ConfigError(f"SearchRule.epsilon must be finite, got {self.epsilon}")
        if self.max_drop is not None and (int(self.max_drop) != self.max_drop or self.max_drop < 0):
            raise ConfigError(f"SearchRule.max_drop must be None or an integer >= 0, got {self.max_drop!r}")
        if self.choose not in CHOOSE:
            raise ConfigError(f"SearchRule.choose: unknown rule {self.choose!r}; allowed: {list(CHOOSE)}")


@dataclass(frozen=True, eq=False, repr=False)
class RecordedSearch:
    """One replicate (one model x one selection draw) of a greedy search: ``gains`` (R, L, n), the
    per-example selection-score gain over the full model, score_i(removed_before_r + [b]) − score_i(full), of
    candidate block b in round r on example i; NaN where b was not a candidate of round r (already removed).
    Each round's candidates are the previous round's minus one block, the one that round removed (``path``,
    R − 1 blocks); R = 0 for a search without rounds (its in-sample gain is 0 in every null draw)."""

    gains: np.ndarray
    path: list[int] = field(init=False)

    def __post_init__(self) -> None:
        g = np.asarray(self.gains, dtype=np.float64)
        if g.ndim != 3:
            raise DataError(f"RecordedSearch.gains must be (rounds, blocks, examples), got shape {g.shape}")
        n_rounds, n_blocks, n = g.shape
        if n_rounds and (n_blocks == 0 or n == 0):
            raise DataError(f"RecordedSearch.gains {g.shape}: a search with rounds needs blocks and examples")
        if np.isinf(g).any():
            raise DataError("RecordedSearch.gains holds inf; the scores it came from are damaged")
        missing = np.isnan(g)
        candidate = ~missing.all(2)  # (R, L)
        partial = missing.any(2) & candidate
        if partial.any():
            r, b = map(int, np.argwhere(partial)[0])
            raise DataError(f"RecordedSearch.gains: block {b} in round {r} is NaN on some examples only; a "
                            "candidate's gains must be finite on every example (NaN on all: not a candidate)")
        path = []
        for r in range(n_rounds):
            if not candidate[r].any():
                raise DataError(f"RecordedSearch.gains: round {r} has no candidate (all NaN)")
            if r + 1 < n_rounds:
                gone = np.flatnonzero(candidate[r] & ~candidate[r + 1])
                if len(gone) != 1 or (candidate[r + 1] & ~candidate[r]).any():
                    raise DataError(f"RecordedSearch.gains: round {r + 1}'s candidates must be round {r}'s minus "
                                    f"the one block round {r} removed; got removed {gone.tolist()}")
                path.append(int(gone[0]))
        object.__setattr__(self, "gains", g)
        object.__setattr__(self, "path", path)

    def __repr__(self) -> str:
        return f"RecordedSearch(shape={np.shape(self.gains)}, path={getattr(self, 'path', None)})"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(rounds R, blocks L, examples n)."""
        return self.gains.shape  # type: ignore[return-value]

    @classmethod
    def from_scores(cls, full: np.ndarray, rounds: Sequence[Mapping[int, np.ndarray]],
                    n_blocks: int) -> "RecordedSearch":
        """From per-example scores (higher is better): ``full`` (n,) of the full model and, per round, {block:
        scores (n,) with that round's removed blocks plus ``block`` removed}."""
        full = np.asarray(full, dtype=np.float64)
        if full.ndim != 1:
            raise DataError(f"RecordedSearch.from_scores: full must be (examples,), got shape {full.shape}")
        gains = np.full((len(rounds), n_blocks, len(full)), np.nan)
        for r, candidates in enumerate(rounds):
            for b, scores in candidates.items():
                scores = np.asarray(scores, dtype=np.float64)
                if scores.shape != full.shape or not 0 <= int(b) < n_blocks:
                    raise DataError(f"RecordedSearch.from_scores: round {r}, block {b}: scores of shape "
                                    f"{scores.shape} for {n_blocks} blocks; expected block in [0, {n_blocks}) "
                                    f"and shape {full.shape}")
                gains[r, int(b)] = scores - full
        return cls(gains)

    def steps(self) -> tuple[np.ndarray, np.ndarray]:
        """The search as increments: ``rows`` (K, n), one per (round, candidate), its per-example gain over the
        path configuration before that round (gains[r, b] − gains[r − 1, path[r − 1]]); and ``source`` (R, L),
        the row that stands for block b in round r (−1: none). A block the recorded search removed before round
        r stands in with the row of the round that removed it (its increment then)."""
        g, (n_rounds, n_blocks, n) = self.gains, self.shape
        source = np.full((n_rounds, n_blocks), -1)
        rows = []
        for r in range(n_rounds):
            before = g[r - 1, self.path[r - 1]] if r else np.zeros(n)
            for b in np.flatnonzero(~np.isnan(g[r, :, 0])):
                source[r, b] = len(rows)
                rows.append(g[r, b] - before)
            for k in range(r):  # removed by the recorded path before round r
                source[r, self.path[k]] = source[k, self.path[k]]
        return (np.stack(rows) if rows else np.zeros((0, n))), source


def _replay(steps: np.ndarray, rule: SearchRule) -> np.ndarray:
    """TALE's rule on ``steps`` (D, R, L), the mean gain increment of block b in round r (−inf: not a
    candidate), in D draws at once -> the in-sample gain (D,) of the configuration ``rule.choose`` picks (0 for
    the full model). Each round takes the largest increment among blocks this draw has not removed yet (ties
    -> lowest index) and accepts it while the running gain stays >= −epsilon."""
    draws, n_rounds, n_blocks = steps.shape
    limit = n_rounds if rule.max_drop is None else min(n_rounds, int(rule.max_drop))
    every = np.arange(draws)
    taken = np.zeros((draws, n_blocks), dtype=bool)
    alive = np.ones(draws, dtype=bool)
    level, best, bsba = np.zeros(draws), np.zeros(draws), np.zeros(draws)
    for r in range(limit):
        step = np.where(taken, -np.inf, steps[:, r])
        chosen = step.argmax(1)
        top = step[every, chosen]
        candidate = level + top
        alive &= np.isfinite(top) & (candidate >= -rule.epsilon)
        if not alive.any():
            break
        level = np.where(alive, candidate, level)
        taken[every[alive], chosen[alive]] = True
        best = np.maximum(best, level)
        bsba = np.where(alive & (level >= 0), level, bsba)
    return {"best": best, "bsba": bsba, "final": level}[rule.choose]


def _check(replicates: Sequence[RecordedSearch], rule: SearchRule) -> None:
    if not isinstance(rule, SearchRule):
        raise ConfigError(f"rule must be a SearchRule, got {type(rule).__name__}")
    if not replicates or not all(isinstance(r, RecordedSearch) for r in replicates):
        raise DataError("replicates must be a non-empty list of RecordedSearch")


def replayed_gain(replicates: Sequence[RecordedSearch], rule: SearchRule) -> float:
    """The observed statistic :func:`search_null` is the null of: the mean over replicates of the in-sample
    gain of the configuration ``rule`` picks on the recorded gains (TALE's own ``selection_score −
    baseline_score`` per replicate, up to float rounding at a tie or at the epsilon border)."""
    _check(replicates, rule)
    total = 0.0
    for rec in replicates:
        if rec.shape[0]:
            rows, source = rec.steps()
            steps = np.where(source >= 0, rows.mean(1)[source], -np.inf)
            total += float(_replay(steps[None], rule)[0])
    return total / len(replicates)


def _resample_weights(rng: np.random.Generator, draws: int, n: int) -> np.ndarray:
    """(draws, n): how often each example appears in a bootstrap resample of n, minus 1. With these weights a
    centred candidate's null mean is its mean over the resample (centred), which keeps the skew of its
    per-example gains (a removal's gain is bounded above by the full model's error and has a long tail of
    losses; random signs would mirror those losses into gains no removal can make)."""
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64)
    return counts - 1.0


def search_null(replicates: Sequence[RecordedSearch], rule: SearchRule, draws: int = 2000,
                seed: int = 0, harmful_z: float = HARMFUL_Z) -> np.ndarray:
    """Null distribution (draws,) of :func:`replayed_gain` when no configuration truly helps: the whole greedy
    search replayed with ``rule`` on null gains, in every draw.

    Per replicate, each recorded candidate's per-example gain over the path configuration before its round
    (:meth:`RecordedSearch.steps`) is centred on its mean (a clearly harmful one keeps its mean, see
    :data:`HARMFUL_Z`) and averaged over one bootstrap resample of the examples, shared by all candidates and
    rounds of the replicate (:func:`_resample_weights`); :func:`_replay` then runs TALE's rounds on the null
    means. The statistic of a draw is the
    mean over replicates (equal weights) of each replicate's in-sample gain.

    Approximation: rounds after the first were recorded along the *actual* path. A draw whose replay removed
    other blocks uses the recorded rounds anyway, as increments over the recorded path configuration (the
    blocks it removed leave the candidates; a block the recorded search removed earlier stands in with its
    increment from the round that removed it). This is exact when block effects add up; with strong
    interactions between removals it is mildly anti-conservative (see ``tests/test_optimism.py``). Replaying
    the levels gains[r, b] themselves instead is strongly anti-conservative (their shared path part is never
    re-chosen)."""
    _check(replicates, rule)
    if int(draws) < 1:
        raise ConfigError(f"search_null: draws must be >= 1, got {draws}")
    rng = np.random.default_rng(seed)
    total = np.zeros(int(draws))
    for rec in replicates:
        if not rec.shape[0]:
            continue  # no rounds: the full model, gain 0
        rows, source = rec.steps()
        weights = _resample_weights(rng, int(draws), rows.shape[1])  # shared by every candidate and round
        null = _null_means(rows, weights, harmful_z)  # (draws, K)
        total += _replay(np.where(source >= 0, null[:, np.maximum(source, 0)], -np.inf), rule)
    return total / len(replicates)


def p_null(null: np.ndarray, observed: float) -> float:
    """Share of null draws at least as large as ``observed``, counting the observation: (#{null >= observed}
    + 1) / (draws + 1)."""
    null = np.asarray(null, dtype=np.float64)
    if null.ndim != 1 or not len(null):
        raise DataError(f"p_null: null must be a non-empty 1-d array of draws, got shape {null.shape}")
    return float((np.sum(null >= observed) + 1) / (len(null) + 1))


def optimism(full_in: Evaluation, pruned_in: Evaluation, full_out: Evaluation, pruned_out: Evaluation,
             dist: str, metric: str, higher_is_better: bool, null: np.ndarray | None,
             n_bootstrap: int, confidence: float, observed: float | None = None) -> dict[str, Any]:
    """In-sample gain, held-out gain and optimism (in-sample − held-out) on ``dist``: a Student-t interval over
    replicates (models, or draws of one model), and the bootstrap over examples of these models as ``examples``;
    with the placebo
    null's mean, 95 % quantile and the share of null draws at least as large as ``observed`` (the search's own
    statistic: :func:`replayed_gain` in the selection metric; default the in-sample gain in ``metric``)."""
    gain_in = oriented(paired_full(full_in, pruned_in, dist, metric), pruned_in.values[dist][metric], higher_is_better)
    gain_out = oriented(paired_full(full_out, pruned_out, dist, metric), pruned_out.values[dist][metric],
                        higher_is_better)
    ci = stats.difference_of_means(gain_in, gain_out, groups_a=pruned_in.seeds[dist], groups_b=pruned_out.seeds[dist],
                                   n_resamples=n_bootstrap, confidence=confidence)
    per_in, unit = stats.unit_means(gain_in, pruned_in.seeds[dist], pruned_in.draw_labels(dist))
    per_out, _ = stats.unit_means(gain_out, pruned_out.seeds[dist], pruned_out.draw_labels(dist))
    units = per_in - per_out  # (k,) optimism per model (or per draw of one model)
    sd = float(units.std(ddof=1)) if len(units) > 1 else float("nan")
    low, high = stats.t_interval(float(units.mean()), sd, len(units), confidence)
    row: dict[str, Any] = {"metric": metric, "in_sample": float(gain_in.mean()), "held_out": float(gain_out.mean()),
                           "mean": float(units.mean()), "low": low, "high": high, "n": len(units), "unit": unit,
                           "examples": {"mean": ci.mean, "low": ci.low, "high": ci.high},
                           "n_in_sample": len(gain_in), "n_held_out": len(gain_out)}
    if null is not None:
        seen = float(gain_in.mean()) if observed is None else float(observed)
        row.update(null_mean=float(null.mean()), null_q95=float(np.quantile(null, 0.95)), null_observed=seen,
                   p_null=p_null(null, seen))
    return row


def robust_summary(full: Evaluation, pruned: Evaluation, dist: str, metric: str, n_bootstrap: int,
                   confidence: float, top: int = 5, eps: float = 1e-12) -> dict[str, Any]:
    """For a heavy-tailed error metric (e.g. NMSE): medians of the full and pruned model, the mean log ratio
    log(pruned / full) per example with a paired bootstrap CI (< 0: pruning lowers the typical error), and the
    ``top`` examples that dominate the full model's mean (seed, index within the seed, share of the sum)."""
    a, b = paired_full(full, pruned, dist, metric), pruned.values[dist][metric]
    seeds = pruned.seeds[dist]
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
