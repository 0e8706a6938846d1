"""Verdicts on the study's claims C1–C9 (REFERENCE §1), computed from results.json data alone.

Each verdict is "supported", "refuted" or "inconclusive", with the numbers behind it and a one-line
evidence string. Every rule decides on an interval or a test at the replicate level (the run, model ×
selection draw, is the unit: :func:`tapioca.analysis.stats.replicate_delta`), never on a point estimate or on
the absence of evidence: "supported" needs an interval that excludes the claim's negation, "refuted" needs
evidence against the claim (an equivalence bound, or a significant opposite effect), and anything else is
"inconclusive" with the reason. One α (1 − ``evaluation.confidence``) serves every decision; equivalence is
the TOST at α. Every threshold is an ``evaluation.*`` setting recorded in results.json (``rules``), fixed
before any result; the README tabulates claim → rule → thresholds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tapioca.analysis import stats
from tapioca.analysis.evaluation import HIGHER_IS_BETTER
from tapioca.config import EvaluationConfig

SUPPORTED, REFUTED, INCONCLUSIVE = "supported", "refuted", "inconclusive"
SCALE_CLAIMS = ("C1", "C2", "C3", "C4")  # C6: the claims that must hold at every scale
RULE_KEYS = ("confidence", "smallest_effect_relative", "smallest_effect_points", "distortion_factor",
             "realign_margin", "recovered_share_min", "slope_tolerance", "confidence_tolerance", "min_shifts",
             "min_scales", "min_lms")


def rules_of(cfg: EvaluationConfig) -> dict[str, Any]:
    """The verdict thresholds of an evaluation config, as results.json records them (``rules``)."""
    return {k: getattr(cfg, k) for k in RULE_KEYS}


def rules(results: dict) -> dict[str, Any]:
    """The thresholds a run's verdicts use: its recorded ``rules`` over the defaults (run directories written
    before a setting existed use its default); ``alpha`` = 1 − confidence."""
    out = rules_of(EvaluationConfig())
    out.update(results.get("rules") or {})
    if results.get("smallest_effect"):
        out["smallest_effect_relative"] = results["smallest_effect"]["relative"]
        out["smallest_effect_points"] = results["smallest_effect"]["points"]
    out["alpha"] = 1.0 - out["confidence"]
    return out


def _verdict(verdict: str, evidence: str, **numbers: Any) -> dict[str, Any]:
    return {"verdict": verdict, "evidence": evidence, "numbers": numbers, "settle_case": None}


def primary_metric(results: dict) -> str:
    """The held-out metric the claims are decided on: NMSE on the testbed, accuracy on text tasks."""
    return results.get("primary_metric", "nmse")


def _shifts(results: dict) -> list[str]:
    return [d for d in results["protocols"]["target"]["delta"] if d != "id"]


def _removed_any(results: dict, shift: str) -> bool:
    return any(results["removed"]["target"][shift].values())


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):  # average ranks for ties
        ranks[x == value] = ranks[x == value].mean()
    return ranks


def spearman_with_p(x: list[float], y: list[float], n_perm: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Spearman rho and a two-sided permutation p-value (exact over all orders up to 7 points); NaN and 1 when
    either input is constant."""
    rx, ry = _rank(np.asarray(x, float)), _rank(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan"), 1.0
    rho = float(np.corrcoef(rx, ry)[0, 1])
    if len(rx) <= 7:
        from itertools import permutations

        perms = np.array([np.corrcoef(rx, ry[list(p)])[0, 1] for p in permutations(range(len(ry)))])
        return rho, float(np.mean(np.abs(perms) >= abs(rho) - 1e-12))
    rng = np.random.default_rng(seed)
    perms = np.array([np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(n_perm)])
    return rho, float((np.sum(np.abs(perms) >= abs(rho) - 1e-12) + 1) / (n_perm + 1))


def smallest_effect(results: dict, metric: str, full_mean: float) -> float:
    """The smallest effect of interest on ``metric``: a share of the full model's mean for error metrics
    (``evaluation.smallest_effect_relative``), points for accuracy-type ones (``..._points``); fixed in the
    config before any result."""
    r = rules(results)
    return r["smallest_effect_points"] if HIGHER_IS_BETTER[metric] else r["smallest_effect_relative"] * abs(full_mean)


def room(results: dict, dist: str, metric: str, full_mean: float) -> str | None:
    """"floor" when the full model's accuracy on ``dist`` is within δ of chance (a random guess:
    ``results["chance"]``), "ceiling" when it is within δ of 1, else None. At a floor, evidence against a gain
    (a loss, or an equivalence bound) says the model cannot do the task, not that pruning does not help; at a
    ceiling no gain of δ is possible. Either way such evidence is inconclusive. Only accuracy has these bounds."""
    chance = (results.get("chance") or {}).get(dist)
    return room_of(metric, full_mean, chance, smallest_effect(results, metric, full_mean))


def room_of(metric: str, full_mean: float, chance: float | None, delta: float) -> str | None:
    """:func:`room` from the numbers: "floor" (accuracy within ``delta`` of ``chance``), "ceiling" (within
    ``delta`` of 1) or None (other metrics, or no chance level)."""
    if metric != "acc" or chance is None:
        return None
    if full_mean <= chance + delta:
        return "floor"
    return "ceiling" if full_mean >= 1 - delta else None


def _room_text(results: dict, dist: str, full_mean: float, limit: str) -> str:
    if limit == "floor":
        return (f"floor: the full model is within δ of chance on {dist} (acc {full_mean:.4f}, chance "
                f"{results['chance'][dist]:.4f}), so the absence of a gain says nothing about pruning")
    return f"ceiling: the full model's acc on {dist} ({full_mean:.4f}) leaves no room for a gain of δ"


def gain_interval(row: dict, metric: str) -> dict[str, float]:
    """A delta row (pruned − full) as a *gain* (positive = better): mean, CI and TOST interval, negated for
    lower-is-better metrics (rows without a TOST interval fall back to the CI, which is wider)."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    low, high = sorted((sign * row["low"], sign * row["high"]))
    low_t, high_t = sorted((sign * row.get("low_tost", row["low"]), sign * row.get("high_tost", row["high"])))
    return {"mean": sign * row["mean"], "low": low, "high": high, "low_tost": low_t, "high_tost": high_t}


class GainTest:
    """The replicate-level tests of one delta row as a gain (positive = better) against the smallest effect of
    interest δ at level α: ``significant`` (two-sided, p from the row or Holm-adjusted by the caller),
    ``p_below_delta`` (one-sided: the gain is smaller than δ — the equivalence half that matters) and
    ``p_above_delta`` (the gain exceeds δ)."""

    def __init__(self, row: dict, metric: str, delta: float) -> None:
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        self.mean, self.sd, self.n = sign * row["mean"], row.get("sd", float("nan")), int(row.get("n") or 0)
        self.delta, self.p_value = delta, float(row.get("p_value", 1.0))
        self.p_below_delta = stats.t_p_beyond(self.mean, self.sd, self.n, delta, "below")
        self.p_above_delta = stats.t_p_beyond(self.mean, self.sd, self.n, delta, "above")


def gain_outcome(test: GainTest, p_two: float, p_below_delta: float, alpha: float) -> str:
    """One shift's outcome from its (Holm-adjusted, where several shifts are judged) p-values at level α — the
    one convention of claims, ``tapioca check`` and transfer: "worse" (significant, on the bad side), "gain"
    (significant and at least δ), "no gain ≥ δ" (the gain is shown below δ: the equivalence half), "gain < δ"
    (significant, smaller than δ, not shown below it) or "undecided"."""
    if p_two < alpha and test.mean < 0:
        return "worse"
    if p_two < alpha and test.mean >= test.delta:
        return "gain"
    if p_below_delta < alpha:
        return "no gain ≥ δ"
    return "gain < δ" if p_two < alpha else "undecided"


def holm_outcomes(tests: dict[str, GainTest], alpha: float) -> dict[str, str]:
    """:func:`gain_outcome` per name, Holm's correction applied across ``tests`` to both p-values."""
    if not tests:
        return {}
    p_two = stats.holm({s: t.p_value for s, t in tests.items()})
    p_eq = stats.holm({s: t.p_below_delta for s, t in tests.items()})
    return {s: gain_outcome(t, p_two[s], p_eq[s], alpha) for s, t in tests.items()}


def _power(row: dict, delta: float, confidence: float = 0.95) -> dict[str, Any]:
    """The replicate-level MDE at 80 % power for the row's units, and the units that would detect the smallest
    effect of interest (none when the replicate means never vary, e.g. no block was removed)."""
    sd, n = row.get("sd", float("nan")), row.get("n")
    return {"mde": row.get("mde"), "n": n, "unit": row.get("unit", "replicate"), "sesoi": delta,
            "n_needed": stats.units_needed(sd, delta, confidence) if n else None}


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and x == x else "n/a"


def _units(power: dict[str, Any]) -> str:
    n, unit = power.get("n"), power.get("unit", "replicate")
    return f"{n} {unit}{'s' if n != 1 else ''}"


def _sizing(power: dict[str, Any]) -> str:
    needed = power.get("n_needed")
    return (f"MDE {_fmt(power['mde'])} at {_units(power)}; "
            + (f"≈{needed} {power.get('unit', 'replicate')}s needed for δ" if needed else "no replicate variance"))


def _verdict_with_power(verdict: str, evidence: str, power: dict[str, Any], **numbers: Any) -> dict[str, Any]:
    out = _verdict(verdict, evidence, **numbers)
    out.update(power)
    return out


def c1_no_id_benefit(results: dict, protocol: str = "target") -> dict:
    """"Task-aware pruning gives no ID benefit", with the ID-selected search under ``protocol`` (held-out
    "target", or "in-sample": the paper's protocol). Let δ be the smallest effect of interest. At the replicate
    level: supported when the data exclude a gain as large as δ (one-sided t-test of gain < δ at α: the upper
    TOST bound is below +δ; a significant loss also means no benefit); refuted when a gain above δ is
    significant (one-sided at α); otherwise inconclusive, with the replicate-level MDE and the replicates a
    decision needs."""
    metric = primary_metric(results)
    r = rules(results)
    row = results["protocols"][protocol]["delta"]["id"][metric]
    delta = smallest_effect(results, metric, row["full"])
    gain, test, power = gain_interval(row, metric), GainTest(row, metric, delta), _power(row, delta, r["confidence"])
    ci = (f"ID gain in {metric} {gain['mean']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}] over "
          f"{_units(power)} (full {row['full']:.4f}; δ {delta:.4f}; MDE {_fmt(power['mde'])})")
    numbers = dict(row, margin=delta)
    numbers.pop("unit_means", None)
    if not _removed_any(results, "id"):
        return _verdict_with_power(INCONCLUSIVE, "the ID search removed no block in any replicate (every removal "
                                   f"cost more than ε): Δ is 0 by construction, so pruning's effect on ID was never "
                                   f"tested: {ci}", power, **numbers)
    if test.n < 2:
        return _verdict_with_power(INCONCLUSIVE, f"fewer than 2 replicates: no replicate-level interval: {ci}",
                                   power, **numbers)
    if test.p_above_delta < r["alpha"]:
        return _verdict_with_power(REFUTED, f"selecting on ID improves ID by more than δ: {ci}", power, **numbers)
    limit = room(results, "id", metric, row["full"])
    if limit is not None:
        return _verdict_with_power(INCONCLUSIVE, f"{_room_text(results, 'id', row['full'], limit)}: {ci}", power,
                                   room=limit, **numbers)
    if test.p_below_delta < r["alpha"]:
        return _verdict_with_power(SUPPORTED, f"no ID gain as large as δ: {ci}", power, **numbers)
    if test.mean > 0 and test.p_value < r["alpha"]:
        return _verdict_with_power(INCONCLUSIVE, f"a significant ID gain whose CI straddles δ: whether it is as "
                                   f"large as δ is undecided ({_sizing(power)}): {ci}", power, **numbers)
    return _verdict_with_power(INCONCLUSIVE, f"cannot exclude an ID gain of δ (underpowered: {_sizing(power)}): "
                               f"{ci}", power, **numbers)


def shift_outcomes(results: dict, protocol: str = "target") -> dict[str, str]:
    """Per shift under ``protocol``, at the replicate level with Holm's correction across the shifts where the
    search removed blocks: "nothing removed" (Δ is 0 by construction); "gain" (the two-sided test of Δ = 0 is
    significant after Holm and the estimate is at least δ); "worse" (significant on the bad side); "no gain ≥ δ"
    (the one-sided test of gain < δ is significant after Holm: the equivalence bound excludes δ); "gain < δ"
    (significant but smaller than δ, and not shown below δ); "at floor" / "at ceiling" (evidence against a gain
    where the full model is within δ of chance or of 1: see :func:`room`); else "undecided"."""
    metric, alpha = primary_metric(results), rules(results)["alpha"]
    delta_rows = results["protocols"][protocol]["delta"]
    tested = [s for s in _shifts(results) if _removed_any(results, s)]
    tests = {s: GainTest(delta_rows[s][metric], metric, smallest_effect(results, metric, delta_rows[s][metric]["full"]))
             for s in tested}
    decided = holm_outcomes(tests, alpha)
    out = {}
    for s in _shifts(results):
        if s not in tests:
            out[s] = "nothing removed"
            continue
        out[s] = decided[s]
        limit = room(results, s, metric, delta_rows[s][metric]["full"])
        if (limit == "floor" and out[s] in ("worse", "no gain ≥ δ")) or (
                limit == "ceiling" and out[s] == "no gain ≥ δ"):
            out[s] = f"at {limit}"  # a loss from the top is still a loss; nothing else here is evidence
    return out


def c2_ood_improves(results: dict, protocol: str = "target") -> dict:
    """"Task-aware pruning improves OOD", target-selected searches under ``protocol``, per shift by
    :func:`shift_outcomes` (replicate level, Holm). Supported when a majority of the tested shifts gain by at
    least δ significantly. Refuted when a majority show evidence against a gain (a significant loss, or the
    equivalence bound excludes δ) and none gains. Shifts where the search removed no block are not counted; fewer
    than ``min_shifts`` counted shifts is inconclusive. Otherwise inconclusive, naming the undecided shifts with
    the replicate-level MDE and the replicates a decision needs. from-ID counts are reported beside."""
    metric, r = primary_metric(results), rules(results)
    outcomes = shift_outcomes(results, protocol)
    rows = results["protocols"][protocol]["delta"]
    better = [s for s, o in outcomes.items() if o == "gain"]
    against = [s for s, o in outcomes.items() if o in ("worse", "no gain ≥ δ")]
    undecided = [s for s, o in outcomes.items() if o in ("undecided", "gain < δ")]
    untested = [s for s, o in outcomes.items() if o == "nothing removed"]
    bounded = [s for s, o in outcomes.items() if o.startswith("at ")]  # at floor or ceiling: no evidence either way
    shifts = [s for s in outcomes if s not in untested]
    from_id = results["protocols"]["from-id"]["delta"]
    from_id_alpha = {s: from_id[s][metric].get("p_value", 1.0) for s in shifts}
    adjusted = stats.holm(from_id_alpha) if from_id_alpha else {}
    better_from_id = [s for s in shifts if adjusted[s] < r["alpha"] and GainTest(from_id[s][metric], metric, 0).mean > 0]
    mdes = [rows[s][metric].get("mde") for s in shifts if rows[s][metric].get("mde") is not None]
    first = rows[shifts[0]][metric] if shifts else {}
    power = {"mde": float(np.median(mdes)) if mdes else None, "n": first.get("n"), "unit": first.get("unit", "replicate"),
             "sesoi": None, "n_needed": None}
    if undecided:
        needed = [_power(rows[s][metric], smallest_effect(results, metric, rows[s][metric]["full"]),
                         r["confidence"])["n_needed"] for s in undecided]
        power["n_needed"] = max((n for n in needed if n), default=None)
    if not shifts:
        return _verdict_with_power(INCONCLUSIVE, f"the search removed no block on any shift ({', '.join(untested)}): "
                                   "every removal cost more than ε on the shift's own selection split, so pruning's "
                                   "effect on OOD was never tested", power, untested=untested, outcomes=outcomes)
    # one tested shift cannot say "consistently", whatever it shows
    verdict = majority_verdict(better, against, len(shifts)) if len(shifts) >= r["min_shifts"] else INCONCLUSIVE
    small = [s for s, o in outcomes.items() if o == "gain < δ"]
    evidence = (f"gain ≥ δ on {len(better)}/{len(shifts)} shifts ({', '.join(better) or 'none'}); evidence against a "
                f"gain on {len(against)} ({sum(o == 'worse' for o in outcomes.values())} significantly worse); "
                f"undecided {len(undecided)}"
                + (f" (of which significant but below δ: {', '.join(small)})" if small else "")
                + (f" (median MDE {power['mde']:.4f} at {_units(power)}; ≈{power['n_needed']} "
                   f"{power['unit']}s needed for δ)" if undecided and mdes else "")
                + f"; from-ID selection gained on {len(better_from_id)}/{len(shifts)}"
                + (f"; no block removed (not counted) on {', '.join(untested)}" if untested else "")
                + (f"; the full model is at chance or at 1 (no evidence either way) on {', '.join(bounded)}"
                   if bounded else "")
                + (f"; fewer than {r['min_shifts']} shifts had blocks removed, too few to decide 'consistently'"
                   if len(shifts) < r["min_shifts"] else ""))
    return _verdict_with_power(verdict, evidence, power, improved=better, against=against, undecided=undecided,
                               untested=untested, bounded=bounded, small=small,
                               outcomes=outcomes, improved_from_id=better_from_id, n_shifts=len(shifts))


def majority_verdict(for_: list[str], against: list[str], total: int) -> str:
    """Supported when most of ``total`` shifts show the effect (``for_``), refuted when most show evidence against
    it and none shows it, else inconclusive."""
    if len(for_) > total / 2:
        return SUPPORTED
    return REFUTED if not for_ and len(against) > total / 2 else INCONCLUSIVE


def _per_seed_units(values: dict[str, float]) -> np.ndarray:
    return np.array([v for v in values.values() if math.isfinite(v)], dtype=float)


def _one_sample(x: np.ndarray, bound: float, confidence: float) -> dict[str, float]:
    """Mean of units ``x`` (k,), its t-interval and the one-sided p-values of lying above / below ``bound``."""
    k = len(x)
    mean = float(x.mean()) if k else float("nan")
    sd = float(x.std(ddof=1)) if k > 1 else float("nan")
    low, high = stats.t_interval(mean, sd, k, confidence)
    return {"mean": mean, "low": low, "high": high, "n": k,
            "p_above": stats.t_p_beyond(mean, sd, k, bound, "above"),
            "p_below": stats.t_p_beyond(mean, sd, k, bound, "below")}


def c3_ood_distorts(results: dict) -> dict:
    """"OOD inputs distort the profiles": per shift, the log of D(OOD vs ID) / ID-vs-ID noise floor per model
    (the unit), one-sided t-tests of lying above / below log ``distortion_factor``, Holm across shifts. A shift is
    distorted when above is significant, undistorted when below is. Supported when a majority of shifts are
    distorted; refuted when a majority are undistorted and none is distorted; otherwise (or with fewer than 2
    models) inconclusive."""
    r = rules(results)
    per_seed = results["geometry"]["D_per_seed"]
    factor = r["distortion_factor"]
    tests, ratios = {}, {}
    for s in _shifts(results):
        logs = {seed: math.log(max(rows[s]["full"], 1e-300) / max(rows["noise_floor"]["full"], 1e-300))
                for seed, rows in per_seed.items()}
        tests[s] = _one_sample(_per_seed_units(logs), math.log(factor), r["confidence"])
        ratios[s] = float(math.exp(tests[s]["mean"]))
    above = stats.holm({s: t["p_above"] for s, t in tests.items()}) if tests else {}
    below = stats.holm({s: t["p_below"] for s, t in tests.items()}) if tests else {}
    distorted = [s for s in tests if above[s] < r["alpha"]]
    flat = [s for s in tests if below[s] < r["alpha"]]
    n_units = min((t["n"] for t in tests.values()), default=0)
    intervals = {s: [float(math.exp(t["low"])), float(math.exp(t["high"]))] if t["n"] > 1 else [float("nan")] * 2
                 for s, t in tests.items()}
    verdict = majority_verdict(distorted, flat, len(tests)) if n_units >= 2 else INCONCLUSIVE
    evidence = (f"D/noise floor significantly ≥ {factor:g} on {len(distorted)}/{len(tests)} shifts, significantly "
                f"< {factor:g} on {len(flat)} (geometric mean over {n_units} models, t-test on log ratios, Holm; "
                f"median ratio {np.median(list(ratios.values())) if ratios else float('nan'):.1f})"
                + ("; fewer than 2 models: no interval" if n_units < 2 else ""))
    return _verdict(verdict, evidence, ratio=ratios, interval=intervals, distorted=distorted, undistorted=flat,
                    factor=factor)


def sign_test(k: int, n: int) -> float:
    """Exact two-sided binomial p-value of k successes in n trials with success probability 1/2."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def realignment(changes: dict[str, list[float]], margin: float, confidence: float) -> dict[str, Any]:
    """Replicate-level test of a realignment: ``changes`` per unit (model) the changes of D in noise floors (after
    − reference; negative = realigned) over that unit's shifts, averaged per unit; one-sided t-tests of the mean
    lying below −``margin`` (realigned by more than the margin) and above it (any realignment smaller than the
    margin: the equivalence half)."""
    units = np.array([float(np.mean(v)) for v in changes.values() if v])
    test = _one_sample(units, -margin, confidence)
    return {**test, "margin": margin, "per_unit": {k: float(np.mean(v)) for k, v in changes.items() if v}}


def _realignment_verdict(test: dict[str, Any], alpha: float, what: str) -> tuple[str, str]:
    if test["n"] < 2:
        return INCONCLUSIVE, f"{what}: fewer than 2 models with removals, no replicate-level interval"
    text = (f"{what}: mean change {test['mean']:+.2f} noise floors [{test['low']:+.2f}, {test['high']:+.2f}] over "
            f"{test['n']} models (margin −{test['margin']:g})")
    if test["p_below"] < alpha:
        return SUPPORTED, text
    if test["p_above"] < alpha:
        return REFUTED, text + ": any realignment is smaller than the margin"
    return INCONCLUSIVE, text + ": undecided"


def c4_realigns(results: dict) -> dict:
    """"TALE's removal realigns the OOD profiles": per model and shift where TALE removed blocks, D after TALE's
    removal (pruned OOD vs its own ID) minus D after removing as many random blocks, in units of that model's
    ID-vs-ID noise floor, averaged over the model's shifts; decided at the replicate level by
    :func:`realignment` with margin ``realign_margin`` noise floors (supported: realigns beyond random by more
    than the margin; refuted: the equivalence bound excludes that). Runs without the random-removal reference
    compare with the full model instead, and say so. Also names the reviewer's "what would settle it" cases."""
    r = rules(results)
    per_seed = results["geometry"]["D_per_seed"]
    removed = results["removed"]["target"]
    pairs = [(s, seed) for s in _shifts(results) for seed in per_seed if removed[s].get(seed)]
    if not pairs:
        return _verdict(INCONCLUSIVE, "TALE removed no block on any shift: nothing to realign", pairs=0)
    has_random = all("random_pruned" in per_seed[seed][s] for s, seed in pairs)
    reference = "random_pruned" if has_random else "full"
    changes: dict[str, list[float]] = {}
    for s, seed in pairs:
        floor = max(per_seed[seed]["noise_floor"]["full"], 1e-12)
        changes.setdefault(seed, []).append((per_seed[seed][s]["target_pruned"] - per_seed[seed][s][reference]) / floor)
    test = realignment(changes, r["realign_margin"], r["confidence"])
    what = ("D after TALE's removal − D after removing as many random blocks" if has_random else
            "D after TALE's removal − D of the full model (this run has no random-removal reference)")
    verdict, evidence = _realignment_verdict(test, r["alpha"], what)
    closer = [(s, seed) for s, seed in pairs if per_seed[seed][s]["target_pruned"] < per_seed[seed][s]["full"]]
    result = _verdict(verdict, evidence, pairs=len(pairs), reference=reference, **test)
    not_closer = sorted({s for s, seed in pairs if (s, seed) not in closer})
    gained = _improved_shifts(results)
    closer_not_better = sorted({s for s, _ in closer if s not in gained})
    cases = []
    if not_closer:
        cases.append(f"TALE's layers removed but profiles not closer: {', '.join(not_closer)}")
    if closer_not_better:
        cases.append(f"profiles closer but OOD not better: {', '.join(closer_not_better)}")
    result["settle_case"] = "; ".join(cases) or None
    return result


def c5_causal(results: dict) -> dict:
    """"The distortion causes the gain", on shifts where TALE improved held-out OOD (without a gain there is
    nothing to explain: inconclusive, as C7 and C9). Two halves, each at the replicate level (per model,
    averaged over its improved shifts): (a) residual scaling of TALE's blocks (α 0..1) ties D to the score more
    tightly than scaling as many random kept blocks: Spearman ρ(D, score) of TALE's sweep minus the control's,
    one-sided t-test < 0; (b) norm matching without pruning recovers at least ``recovered_share_min`` of the
    pruning gain: the ratio of means (matched − full) / (pruned − full) with a delta-method interval.
    Supported when both hold; refuted when either has evidence against it (ρ significantly above the control's,
    or the recovered share's upper bound below the minimum); otherwise inconclusive."""
    r = rules(results)
    interventions = results.get("interventions") or {}
    if not interventions:
        return _verdict(INCONCLUSIVE, "no intervention ran (TALE removed no block on any shift)")
    improved = _improved_shifts(results)
    if not any(shift in improved for shift in interventions):
        return _verdict(INCONCLUSIVE, "no shift with interventions improved on held-out examples, so there is no "
                                      "gain whose cause the sweeps and norm matching could test")
    rho_gaps: dict[str, list[float]] = {}
    matched: dict[str, list[float]] = {}
    pruned: dict[str, list[float]] = {}
    for shift, row in interventions.items():
        if shift not in improved:
            continue
        for seed, points in row["sweep_removed"].items():
            own, control = _sweep_rho(points), _sweep_rho(row["sweep_control"].get(seed) or [])
            if math.isfinite(own) and math.isfinite(control):
                rho_gaps.setdefault(seed, []).append(own - control)
            m = row["norm_matching"][seed]
            if "ood_matched" in m:
                matched.setdefault(seed, []).append(m["ood_matched"] - m["ood_full"])
                pruned.setdefault(seed, []).append(m["ood_pruned"] - m["ood_full"])
    sweep = _one_sample(np.array([np.mean(v) for v in rho_gaps.values()]), 0.0, r["confidence"])
    seeds = [s for s in matched if s in pruned]
    share = stats.ratio_of_means([np.mean(matched[s]) for s in seeds], [np.mean(pruned[s]) for s in seeds],
                                 r["confidence"]) if seeds else (float("nan"),) * 3
    sweeps = (f"ρ(D, score) of TALE's sweep − the random-block control's: {sweep['mean']:+.2f} "
              f"[{sweep['low']:+.2f}, {sweep['high']:+.2f}] over {sweep['n']} models")
    if not _norm_matching_ran(interventions):
        return _verdict(INCONCLUSIVE, f"{sweeps}; norm matching was not run, so half of the test is missing",
                        sweep=sweep)
    recovered = (f"norm matching recovered {share[0]:.0%} [{share[1]:.0%}, {share[2]:.0%}] of the pruning gain "
                 f"(ratio of means over {len(seeds)} models; minimum {r['recovered_share_min']:.0%})")
    tighter = sweep["n"] >= 2 and sweep["p_below"] < r["alpha"]
    looser = sweep["n"] >= 2 and sweep["p_above"] < r["alpha"]
    enough = len(seeds) >= 2 and share[1] > r["recovered_share_min"]
    too_little = len(seeds) >= 2 and share[2] < r["recovered_share_min"]
    verdict = SUPPORTED if tighter and enough else REFUTED if looser or too_little else INCONCLUSIVE
    return _verdict(verdict, f"{sweeps}; {recovered}", sweep=sweep, recovered_share=list(share))


def _norm_matching_ran(interventions: dict) -> bool:
    return any("ood_matched" in m for row in interventions.values() for m in row["norm_matching"].values())


def _sweep_rho(points: list[dict]) -> float:
    inside = [p for p in points if 0.0 <= p["alpha"] <= 1.0]
    d, score = [p["D"] for p in inside], [p["score"] for p in inside]
    if len(inside) < 3 or np.std(d) == 0 or np.std(score) == 0:
        return float("nan")
    return float(np.corrcoef(_rank(np.asarray(d)), _rank(np.asarray(score)))[0, 1])


def c6_scales(results: dict) -> dict:
    """C1–C4 at every scale of a multi-scale study (at least ``min_scales`` testbed sizes, or ``min_lms``
    language models). Supported when all four are supported at every scale (an intersection–union test: each
    at α is a level-α test of the conjunction). Refuted only when some claim is refuted at some scale with
    Bonferroni's α / (number of scales), so that one of many scales cannot refute by chance: each scale's
    C1–C4 are re-decided at that level (:func:`bonferroni_verdicts`, recorded per scale as
    ``claims_bonferroni``, or from ``scale_results`` when given); without them a refutation at α is reported but
    is inconclusive. Otherwise inconclusive."""
    scales = results.get("scales")
    if not scales:
        return _verdict(INCONCLUSIVE, "single model scale in this study; run a multi-scale config "
                                      "(e.g. configs/scales.yaml) to test C6")
    table = {name: {c: s["claims"][c]["verdict"] for c in SCALE_CLAIMS} for name, s in scales.items()}
    r = rules(results)
    needed = r["min_lms"] if results.get("kind") == "lm" else r["min_scales"]
    agree = [c for c in SCALE_CLAIMS if len({v[c] for v in table.values()}) == 1]
    consistency = (f"verdicts agree across scales on {', '.join(agree) or 'none'} of {', '.join(SCALE_CLAIMS)}")
    if len(scales) < needed:
        return _verdict(INCONCLUSIVE, f"{len(scales)} scale(s); C6 needs at least {needed}; {consistency}",
                        per_scale=table, n_scales=len(scales))
    if all(v[c] == SUPPORTED for v in table.values() for c in SCALE_CLAIMS):
        return _verdict(SUPPORTED, f"C1–C4 supported at all {len(scales)} scales", per_scale=table,
                        n_scales=len(scales))
    full = results.get("scale_results") or {}
    strict = {name: s["claims_bonferroni"] for name, s in scales.items() if "claims_bonferroni" in s}
    strict.update({name: bonferroni_verdicts(scale_results, len(scales)) for name, scale_results in full.items()})
    refuted = {c: [n for n, v in strict.items() if v[c] == REFUTED] for c in SCALE_CLAIMS}
    refuted = {c: names for c, names in refuted.items() if names}
    if refuted:
        where = "; ".join(f"{c} refuted at {', '.join(names)}" for c, names in refuted.items())
        return _verdict(REFUTED, f"{where} at α/{len(scales)} (Bonferroni over scales; {consistency})",
                        per_scale=table, per_scale_bonferroni=strict, n_scales=len(scales))
    at_alpha = [f"{c} at {n}" for n, v in table.items() for c in SCALE_CLAIMS if v[c] == REFUTED]
    note = (f"; refuted at α only ({', '.join(at_alpha)}), not at α/{len(scales)}"
            + ("" if strict else " (the scales' results were not available to re-decide)")) if at_alpha else ""
    return _verdict(INCONCLUSIVE, f"not all of C1–C4 supported at every scale, none refuted after Bonferroni "
                    f"({consistency}){note}", per_scale=table, per_scale_bonferroni=strict, n_scales=len(scales))


def bonferroni_verdicts(scale_results: dict, n_scales: int) -> dict[str, str]:
    """C1–C4 of one scale's results.json re-decided at α / ``n_scales`` (C6's refutation level)."""
    tight = dict(scale_results, rules={**rules(scale_results), "confidence": 1 - rules(scale_results)["alpha"] / n_scales})
    tight.pop("smallest_effect", None)
    return {c: CLAIMS[c](tight)["verdict"] for c in SCALE_CLAIMS}


def c7_not_tamer(results: dict) -> dict:
    """"The gain is not tamer confidence", on shifts where TALE improved OOD. Testbed: the change in the
    prediction-shrinkage slope (pruned − full) per replicate, averaged over the improved shifts; text tasks and
    graphs: the replicate-level change in mean top-choice confidence. Supported when the one-sided t-test says
    it fell by less than the tolerance (``slope_tolerance`` / ``confidence_tolerance``); refuted when it says it
    fell by more; otherwise inconclusive (also with no gain, or no confidence values)."""
    r = rules(results)
    improved = _improved_shifts(results)
    if not improved:
        return _verdict(INCONCLUSIVE, "no shift improved, so there is no gain to explain")
    if primary_metric(results) == "nmse":
        changes = results.get("shrinkage_change") or {}
        what, tolerance = "shrinkage slope", r["slope_tolerance"]
    else:
        changes = results.get("confidence_change") or {}
        what, tolerance = "mean top-choice confidence", r["confidence_tolerance"]
    per_unit: dict[str, list[float]] = {}
    for s in improved:
        for unit, value in (changes.get(s) or {}).items():
            per_unit.setdefault(unit, []).append(value)
    if not per_unit:
        return _verdict(INCONCLUSIVE, f"the run has no per-replicate {what} for the improved shifts: it cannot be "
                                      "compared")
    test = _one_sample(np.array([np.mean(v) for v in per_unit.values()]), -tolerance, r["confidence"])
    text = (f"{what} change {test['mean']:+.3f} [{test['low']:+.3f}, {test['high']:+.3f}] over {test['n']} "
            f"replicates on {len(improved)} improved shift(s) (tolerance −{tolerance:g})")
    if test["n"] < 2:
        return _verdict(INCONCLUSIVE, text + ": fewer than 2 replicates", **test)
    if test["p_above"] < r["alpha"]:
        return _verdict(SUPPORTED, text + ": it did not fall beyond the tolerance", **test)
    if test["p_below"] < r["alpha"]:
        return _verdict(REFUTED, text + ": it fell beyond the tolerance", **test)
    return _verdict(INCONCLUSIVE, text + ": undecided", **test)


def _improved_shifts(results: dict) -> list[str]:
    return [s for s, o in shift_outcomes(results).items() if o == "gain"]


def c8_distortion_predicts(results: dict) -> dict:
    """"Distortion predicts the OOD drop": Spearman ρ across shifts between D (full model) and the drop (shift
    NMSE − ID NMSE, or ID accuracy − shift accuracy), with a permutation p-value (exact up to 7 shifts). Decided
    only by p < α: supported when ρ > 0, refuted when ρ < 0 (a significant opposite effect); a constant input
    (NaN ρ) or fewer than 3 shifts is inconclusive. Also: overlap between the blocks TALE removed and the blocks
    of largest distortion attribution, against the random expectation."""
    r = rules(results)
    shifts = _shifts(results)
    d = [results["geometry"]["D_mean"][s]["full"] for s in shifts]
    metric = primary_metric(results)
    sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
    drop = [sign * (results["full"][s][metric]["mean"] - results["full"]["id"][metric]["mean"]) for s in shifts]
    if len(shifts) < 3:
        return _verdict(INCONCLUSIVE, f"only {len(shifts)} shifts; need at least 3 for a rank correlation")
    rho, p = spearman_with_p(d, drop)
    overlap = attribution_overlap(results)
    smallest_p = 2 / math.factorial(len(shifts)) if len(shifts) <= 7 else 0.0
    if not math.isfinite(rho):
        verdict, why = INCONCLUSIVE, ": D or the drop is constant across shifts, ρ is undefined"
    elif p < r["alpha"]:
        verdict, why = (SUPPORTED, "") if rho > 0 else (REFUTED, ": a significant negative correlation")
    else:
        verdict = INCONCLUSIVE
        why = (f": {len(shifts)} shifts cannot reach p < {r['alpha']:g} (smallest p {smallest_p:.3f})"
               if smallest_p >= r["alpha"] else ": not significant")
    return _verdict(verdict, f"Spearman ρ(D, OOD drop) = {rho:.2f} (p = {p:.3f}, {len(shifts)} shifts){why}; "
                    f"{overlap['summary']}", rho=rho, p=p, overlap=overlap)


def attribution_overlap(results: dict) -> dict:
    """How many of TALE's removed blocks (target protocol) are also the blocks of largest distortion
    attribution, summed over seeds × shifts where TALE removed k ≥ 1 blocks, against chance: with k blocks drawn
    at random from L the hits are hypergeometric (mean k²/L). ``p`` is the exact probability of at least as
    many hits by chance (independent cases); ``cases`` lists each case's [k, L]."""
    n_blocks = results["n_blocks"]
    hits, cases = 0, []
    for seed, per_shift in results["geometry"]["attribution_full"].items():
        for shift, attribution in per_shift.items():
            removed = results["removed"]["target"][shift][seed]
            if removed:
                top = set(np.argsort(-np.asarray(attribution), kind="stable")[: len(removed)].tolist())
                hits += len(top & set(removed))
                cases.append([len(removed), n_blocks])
    return overlap_summary(hits, cases)


def overlap_summary(hits: int, cases: list[list[int]]) -> dict:
    """Hits, chance expectation, exact p and a sentence for overlap cases ``[[k, L], ...]``."""
    expected = sum(k * k / n for k, n in cases)
    p = chance_of_overlap(hits, cases) if cases else None
    summary = (f"top-attribution blocks matched TALE's removed blocks {hits} times "
               f"(random expectation {expected:.1f}, P(≥ {hits} by chance) = {p:.3f})") if cases else \
        "TALE removed no block: no overlap to test"
    return {"hits": hits, "random_expectation": expected, "p": p, "cases": cases, "summary": summary}


def chance_of_overlap(hits: int, cases: list[list[int]]) -> float:
    """P(at least ``hits``) for a sum of independent hypergeometric overlaps: in case [k, L], k blocks drawn at
    random from L, of which k are marked."""
    total = np.ones(1)
    for k, n_blocks in cases:
        pmf = np.array([math.comb(k, x) * math.comb(n_blocks - k, k - x) for x in range(k + 1)], dtype=float)
        total = np.convolve(total, pmf / math.comb(n_blocks, k))
    return float(min(1.0, total[hits:].sum()))


def c9_needs_layer_removal(results: dict) -> dict:
    """"The gain needs layer removal", per (shift, weight-pruning method) on shifts where TALE gained: weight
    pruning (magnitude, Wanda) at TALE's parameter budget, compared with TALE directly (paired, same held-out
    examples, replicate level, Holm across cases) and with the full model. A case needs layer removal when TALE
    beats weight pruning significantly and weight pruning's own gain is shown below δ (equivalence); weight
    pruning carries the gain when its own gain is significantly ≥ δ and TALE's advantage over it is shown below
    δ. Supported when a majority of cases need layer removal, refuted when a majority are carried by weight
    pruning, otherwise inconclusive (also when TALE gained nowhere or no control ran)."""
    r = rules(results)
    improved = _improved_shifts(results)
    comparisons = results.get("comparisons") or {}
    metric = primary_metric(results)
    ran = [(s, m) for s in comparisons for m in ("magnitude", "wanda") if m in comparisons[s]]
    also_anywhere = [f"{s}/{m}" for s, m in ran if comparisons[s][m][metric].get("improved")]
    cases = [(s, m) for s, m in ran if s in improved and "vs_tale" in comparisons[s][m]]
    if not cases:
        why = ("TALE improved no shift" if ran else "no weight-pruning control ran") if not any(
            s in improved for s, _ in ran) else "this run has no direct TALE − weight-pruning comparison"
        extra = f"; weight pruning alone improved {', '.join(also_anywhere)}" if also_anywhere else ""
        return _verdict(INCONCLUSIVE, f"{why}: nothing to compare{extra}", also_improved_anywhere=also_anywhere)
    name = [f"{s}/{m}" for s, m in cases]
    delta = {f"{s}/{m}": smallest_effect(results, metric, comparisons[s]["tale"][metric]["full"]) for s, m in cases}
    own = {f"{s}/{m}": GainTest(comparisons[s][m][metric], metric, delta[f"{s}/{m}"]) for s, m in cases}
    over = {f"{s}/{m}": GainTest(comparisons[s][m]["vs_tale"][metric], metric, -delta[f"{s}/{m}"])
            for s, m in cases}  # weight pruning's gain over TALE
    p_over = stats.holm({c: t.p_value for c, t in over.items()})
    p_own_small = stats.holm({c: t.p_below_delta for c, t in own.items()})
    p_own_big = stats.holm({c: min(t.p_value, 1.0) if t.mean >= t.delta else 1.0 for c, t in own.items()})
    p_close = stats.holm({c: t.p_above_delta for c, t in over.items()})  # TALE's advantage < δ
    needs = [c for c in name if p_over[c] < r["alpha"] and over[c].mean < 0 and p_own_small[c] < r["alpha"]]
    carried = [c for c in name if p_own_big[c] < r["alpha"] and own[c].mean > 0 and p_close[c] < r["alpha"]]
    verdict = SUPPORTED if len(needs) > len(name) / 2 else REFUTED if len(carried) > len(name) / 2 else INCONCLUSIVE
    first = comparisons[cases[0][0]][cases[0][1]]["vs_tale"][metric]
    power = _power(first, delta[name[0]], r["confidence"])
    evidence = (f"of {len(name)} (shift, method) cases where TALE gained, layer removal was needed in {len(needs)} "
                f"(TALE beat weight pruning and weight pruning gained < δ) and weight pruning carried the gain in "
                f"{len(carried)}; TALE − weight pruning: " + ", ".join(
                    f"{c} {-over[c].mean:+.4f}" for c in name) + f" ({_sizing(power)})")
    return _verdict_with_power(verdict, evidence, power, needs=needs, carried=carried, cases=name,
                               also_improved_anywhere=also_anywhere)


def g1_edge_pruning_realigns(results: dict) -> dict:
    """Graphs: per seed (the unit), D after PrunE (its classifier on its kept edges, OOD vs its own ID) minus D
    of the reference — the same classifier after removing as many random edges when the run has it, else the
    ERM classifier on whole graphs — in noise floors (the larger of the two ID-vs-ID floors), averaged over the
    shifts; decided at the replicate level by :func:`realignment` as C4."""
    r = rules(results)
    per_seed = results["edges"]["per_seed"]
    shifts = _shifts(results)
    has_random = all("random" in summary["geometry"] for summary in per_seed.values())
    reference = "random" if has_random else "erm"
    changes: dict[str, list[float]] = {}
    for seed, summary in per_seed.items():
        geo = summary["geometry"]
        floor = max(geo[reference]["noise_floor"], geo["prune"]["noise_floor"], 1e-12)
        changes[seed] = [(geo["prune"][s] - geo[reference][s]) / floor for s in shifts]
    test = realignment(changes, r["realign_margin"], r["confidence"])
    what = ("D after PrunE − D after removing as many random edges" if has_random else
            "D after PrunE − D of the ERM classifier (this run has no random-edge reference)")
    verdict, evidence = _realignment_verdict(test, r["alpha"], what)
    mean = results["edges"]["geometry"]
    evidence += "; mean D before → after: " + ", ".join(
        f"{s} {mean['erm'][s]:.3f} → {mean['prune'][s]:.3f}" for s in shifts)
    return _verdict(verdict, evidence, reference=reference, **test)


GRAPH_CLAIMS = {"G1": g1_edge_pruning_realigns}  # decided only where results.json has an "edges" block

CLAIMS = {"C1": c1_no_id_benefit, "C2": c2_ood_improves, "C3": c3_ood_distorts, "C4": c4_realigns,
          "C5": c5_causal, "C6": c6_scales, "C7": c7_not_tamer, "C8": c8_distortion_predicts,
          "C9": c9_needs_layer_removal}


def verdicts(results: dict) -> dict[str, dict]:
    """All claims' verdicts for a results.json dict (held-out protocol); G1 too for a graph study."""
    out = {name: rule(results) for name, rule in CLAIMS.items()}
    if "edges" in results:
        out.update({name: rule(results) for name, rule in GRAPH_CLAIMS.items()})
    return out


def verdicts_in_sample(results: dict) -> dict[str, dict]:
    """C1 and C2 under the paper's own protocol: selected and scored on the same selection examples."""
    if "in-sample" not in results["protocols"]:
        return {}
    return {"C1": c1_no_id_benefit(results, "in-sample"), "C2": c2_ood_improves(results, "in-sample")}


# what C1's verdict says about the ID half of the paper's pattern, in the pattern sentence
ID_OUTCOME = {SUPPORTED: "no ID gain", REFUTED: "ID gains too", INCONCLUSIVE: "ID gain undecided"}


def paper_pattern(results: dict) -> dict[str, Any]:
    """Whether the paper's pattern (no ID gain, OOD gain: C1 and C2 supported) appears under its own protocol
    (in-sample) and whether it survives on held-out examples, in one sentence."""
    held = results["claims"]
    inside = results.get("claims_in_sample") or verdicts_in_sample(results)
    def pattern(v: dict) -> bool:
        return bool(v) and v["C1"]["verdict"] == SUPPORTED and v["C2"]["verdict"] == SUPPORTED
    def gains(protocol: str, v: dict) -> str:
        """C1's ID half and the shifts that gain under ``protocol``, e.g. "ID gains too, 2/2 shifts gain"."""
        outcomes = shift_outcomes(results, protocol)
        return (f"{ID_OUTCOME.get(v['C1']['verdict'], 'ID not assessed')}, "
                f"{sum(o == 'gain' for o in outcomes.values())}/{len(outcomes)} shifts gain")
    in_sample, held_out = pattern(inside), pattern(held)
    if not inside:
        sentence = (f"Held out, the paper's pattern (no ID gain, OOD gain) {'appears' if held_out else 'does not appear'}"
                    f" ({gains('target', held)}); the in-sample protocol was not computed by this run.")
    else:
        sentence = (f"Under the paper's protocol (selected and scored on the same examples) the pattern — no ID gain, "
                    f"OOD gain — {'appears' if in_sample else 'does not appear'} ({gains('in-sample', inside)}); on "
                    f"held-out examples it {'survives' if held_out else 'does not survive' if in_sample else 'does not appear either'}"
                    f" ({gains('target', held)}).")
    return {"in_sample": in_sample, "held_out": held_out, "sentence": sentence}
