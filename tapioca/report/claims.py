"""Verdicts on the study's claims C1–C9 (REFERENCE §1), computed from results.json data alone.

Each verdict is "supported", "refuted" or "inconclusive", with the numbers behind it and a one-line
evidence string. The rules are fixed in advance (never tuned to a result) and documented per function.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tapioca.analysis import stats
from tapioca.analysis.evaluation import HIGHER_IS_BETTER
from tapioca.config import EvaluationConfig

SUPPORTED, REFUTED, INCONCLUSIVE = "supported", "refuted", "inconclusive"
ID_MARGIN_RELATIVE = 0.01  # C1: a held-out ID change within ±1% of the full model's NMSE counts as "no change"
ID_MARGIN_POINTS = 0.01  # C1 on accuracy-type metrics: within ±1 point (REFERENCE §1)
CONFIDENCE_TOLERANCE = 0.05  # C7 (LMs): mean top-choice confidence may fall by at most this much
DISTORTION_FACTOR = 3.0  # C3: D(OOD vs ID) must be at least 3x the ID-vs-ID noise floor
SIGN_TEST_ALPHA = 0.05  # C4, G1: the sign test over (shift, seed) pairs must reach this two-sided level
MONOTONE_RHO = -0.8  # C5: Spearman rho(D, score) over the alpha sweep at most this (D down <-> score up)
SLOPE_TOLERANCE = 0.05  # C7: a pruned model's shrinkage slope may fall by at most this much
MIN_SCALES = 3  # C6: testbed scales needed (REFERENCE §1)
MIN_LMS = 2  # C6: real LMs needed (REFERENCE §1)
MIN_TESTED_SHIFTS = 2  # C2: shifts where the search removed blocks, needed before "consistently" can be decided
SCALE_CLAIMS = ("C1", "C2", "C3", "C4")  # C6: the claims that must hold at every scale


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
    """Spearman rho and a two-sided permutation p-value."""
    rx, ry = _rank(np.asarray(x, float)), _rank(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan"), 1.0
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    perms = np.array([np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(n_perm)])
    return rho, float((np.sum(np.abs(perms) >= abs(rho) - 1e-12) + 1) / (n_perm + 1))


def smallest_effect(results: dict, metric: str, full_mean: float) -> float:
    """The smallest effect of interest on ``metric``: a share of the full model's mean for error metrics
    (``evaluation.smallest_effect_relative``), points for accuracy-type ones (``..._points``); fixed in the
    config before any result."""
    default = EvaluationConfig()  # run directories written before the setting existed
    sesoi = results.get("smallest_effect") or {"relative": default.smallest_effect_relative,
                                               "points": default.smallest_effect_points}
    return sesoi["points"] if HIGHER_IS_BETTER[metric] else sesoi["relative"] * abs(full_mean)


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


def _power(row: dict, delta: float, confidence: float = 0.95) -> dict[str, Any]:
    """MDE at 80 % power for the row's n, and the n that would detect the smallest effect of interest (none when
    the paired differences never vary, e.g. no block was removed: there is nothing to size a run from)."""
    sd, n = row.get("sd", float("nan")), row.get("n")
    return {"mde": row.get("mde"), "n": n, "sesoi": delta,
            "n_needed": stats.examples_needed(sd, delta, confidence) if n else None}


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and x == x else "n/a"


def _verdict_with_power(verdict: str, evidence: str, power: dict[str, Any], **numbers: Any) -> dict[str, Any]:
    out = _verdict(verdict, evidence, **numbers)
    out.update(power)
    return out


def c1_no_id_benefit(results: dict, protocol: str = "target") -> dict:
    """"Task-aware pruning gives no ID benefit", with the ID-selected search under ``protocol`` (held-out
    "target", or "in-sample": the paper's protocol). Let δ be the smallest effect of interest.
    Supported when the data exclude a gain as large as δ (the upper end of the TOST (1 − 2α) interval of the
    gain is below +δ; a significant loss also means no benefit). Refuted when the whole CI of the gain lies
    above +δ. Otherwise inconclusive, with the minimal detectable effect (and, when the CI excludes 0 but not
    δ, saying that a gain was found whose size is undecided)."""
    metric = primary_metric(results)
    row = results["protocols"][protocol]["delta"]["id"][metric]
    delta = smallest_effect(results, metric, row["full"])
    gain, power = gain_interval(row, metric), _power(row, delta)
    ci = (f"ID gain in {metric} {gain['mean']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}] "
          f"(full {row['full']:.4f}; δ {delta:.4f}; MDE {_fmt(power['mde'])} at n={power['n']})")
    numbers = dict(row, margin=delta)
    if not _removed_any(results, "id"):
        return _verdict_with_power(INCONCLUSIVE, "the ID search removed no block in any seed (every removal cost "
                                   f"more than ε): Δ is 0 by construction, so pruning's effect on ID was never "
                                   f"tested: {ci}", power, **numbers)
    if gain["low"] > delta:
        return _verdict_with_power(REFUTED, f"selecting on ID improves ID by more than δ: {ci}", power, **numbers)
    limit = room(results, "id", metric, row["full"])
    if limit is not None:
        return _verdict_with_power(INCONCLUSIVE, f"{_room_text(results, 'id', row['full'], limit)}: {ci}", power,
                                   room=limit, **numbers)
    if gain["high_tost"] < delta:
        return _verdict_with_power(SUPPORTED, f"no ID gain as large as δ: {ci}", power, **numbers)
    sizing = f"MDE {_fmt(power['mde'])} at n={power['n']}, n≈{power['n_needed']} needed"
    if gain["low"] > 0:
        return _verdict_with_power(INCONCLUSIVE, f"a significant ID gain whose CI straddles δ: whether it is as "
                                   f"large as δ is undecided ({sizing}): {ci}", power, **numbers)
    return _verdict_with_power(INCONCLUSIVE, f"cannot exclude an ID gain of δ (underpowered: {sizing}): {ci}",
                               power, **numbers)


def shift_outcomes(results: dict, protocol: str = "target") -> dict[str, str]:
    """Per shift under ``protocol``: "nothing removed" (the search kept every block in every seed: Δ is 0 by
    construction, so it says nothing about pruning), "gain" (CI excludes 0 on the good side, Holm), "worse"
    (likewise on the bad side), "no gain ≥ δ" (the TOST interval's upper end is below +δ), "at floor" / "at
    ceiling" (a loss or an equivalence bound where the full model is within δ of chance or of 1: see
    :func:`room`) or "undecided"."""
    metric = primary_metric(results)
    delta_rows = results["protocols"][protocol]["delta"]
    out = {}
    for s in _shifts(results):
        row = delta_rows[s][metric]
        if not _removed_any(results, s):
            out[s] = "nothing removed"
        elif row["improved"]:
            out[s] = "gain"
        elif row["worse"]:
            out[s] = "worse"
        elif gain_interval(row, metric)["high_tost"] < smallest_effect(results, metric, row["full"]):
            out[s] = "no gain ≥ δ"
        else:
            out[s] = "undecided"
        limit = room(results, s, metric, row["full"])
        if (limit == "floor" and out[s] in ("worse", "no gain ≥ δ")) or (
                limit == "ceiling" and out[s] == "no gain ≥ δ"):
            out[s] = f"at {limit}"  # a loss from the top is still a loss; nothing else here is evidence
    return out


def c2_ood_improves(results: dict, protocol: str = "target") -> dict:
    """"Task-aware pruning improves OOD", target-selected searches under ``protocol``. Supported when a
    majority of shifts gain significantly (Holm). Refuted when a majority show evidence against a gain (a
    significant loss, or an equivalence bound excluding a gain of δ) and none gains. Shifts where the search
    removed no block are not counted; fewer than two counted shifts is inconclusive. Otherwise inconclusive,
    naming the undecided shifts and their minimal detectable effects. from-ID counts are reported beside."""
    metric = primary_metric(results)
    outcomes = shift_outcomes(results, protocol)
    shifts = list(outcomes)
    rows = results["protocols"][protocol]["delta"]
    better = [s for s, o in outcomes.items() if o == "gain"]
    against = [s for s, o in outcomes.items() if o in ("worse", "no gain ≥ δ")]
    undecided = [s for s, o in outcomes.items() if o == "undecided"]
    untested = [s for s, o in outcomes.items() if o == "nothing removed"]
    bounded = [s for s, o in outcomes.items() if o.startswith("at ")]  # at floor or ceiling: no evidence either way
    shifts = [s for s in shifts if s not in untested]
    from_id = results["protocols"]["from-id"]["delta"]
    better_from_id = [s for s in shifts if from_id[s][metric]["improved"]]
    mdes = [rows[s][metric].get("mde") for s in shifts if rows[s][metric].get("mde") is not None]
    power = {"mde": float(np.median(mdes)) if mdes else None, "n": rows[shifts[0]][metric].get("n") if shifts else None,
             "sesoi": None, "n_needed": None}
    if undecided:
        needed = [_power(rows[s][metric], smallest_effect(results, metric, rows[s][metric]["full"]))["n_needed"]
                  for s in undecided]
        power["n_needed"] = max((n for n in needed if n), default=None)
    if not shifts:
        return _verdict_with_power(INCONCLUSIVE, f"the search removed no block on any shift ({', '.join(untested)}): "
                                   "every removal cost more than ε on the shift's own selection split, so pruning's "
                                   "effect on OOD was never tested", power, untested=untested, outcomes=outcomes)
    if len(shifts) < MIN_TESTED_SHIFTS:
        verdict = INCONCLUSIVE  # one tested shift cannot say "consistently", whatever it shows
    elif len(better) > len(shifts) / 2:
        verdict = SUPPORTED
    elif not better and len(against) > len(shifts) / 2:
        verdict = REFUTED
    else:
        verdict = INCONCLUSIVE
    evidence = (f"gain on {len(better)}/{len(shifts)} shifts ({', '.join(better) or 'none'}); evidence against a "
                f"gain on {len(against)} ({sum(o == 'worse' for o in outcomes.values())} significantly worse); "
                f"undecided {len(undecided)}" + (f" (median MDE {power['mde']:.4f} at n={power['n']}; "
                                                  f"n≈{power['n_needed']} needed for δ)" if undecided and mdes else "")
                + f"; from-ID selection gained on {len(better_from_id)}/{len(shifts)}"
                + (f"; no block removed (not counted) on {', '.join(untested)}" if untested else "")
                + (f"; the full model is at chance or at 1 (no evidence either way) on {', '.join(bounded)}"
                   if bounded else "")
                + (f"; fewer than {MIN_TESTED_SHIFTS} shifts had blocks removed, too few to decide 'consistently'"
                   if len(shifts) < MIN_TESTED_SHIFTS else ""))
    return _verdict_with_power(verdict, evidence, power, improved=better, against=against, undecided=undecided,
                               untested=untested, bounded=bounded,
                               outcomes=outcomes, improved_from_id=better_from_id, n_shifts=len(shifts))


def c3_ood_distorts(results: dict) -> dict:
    """Supported if D(OOD vs ID) >= 3x the ID-vs-ID noise floor on a majority of shifts, refuted if on none."""
    mean = results["geometry"]["D_mean"]
    floor = mean["noise_floor"]["full"]
    ratios = {s: mean[s]["full"] / floor if floor > 0 else float("inf") for s in _shifts(results)}
    distorted = [s for s, r in ratios.items() if r >= DISTORTION_FACTOR]
    verdict = SUPPORTED if len(distorted) > len(ratios) / 2 else REFUTED if not distorted else INCONCLUSIVE
    evidence = (f"D/noise floor ≥ {DISTORTION_FACTOR:g} on {len(distorted)}/{len(ratios)} shifts "
                f"(floor {floor:.4f}; median ratio {np.median(list(ratios.values())):.1f})")
    return _verdict(verdict, evidence, noise_floor=floor, ratio=ratios)


def sign_test(k: int, n: int) -> float:
    """Exact two-sided binomial p-value of k successes in n trials with success probability 1/2."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def c4_realigns(results: dict) -> dict:
    """Per (shift, seed) where TALE removed blocks: does D (pruned model, OOD vs its own ID) fall below the full
    model's D? An exact two-sided sign test over those pairs (ties dropped) decides: supported if D fell in
    significantly more pairs than it rose (p < 0.05), refuted if it rose significantly more often (the opposite
    effect), otherwise inconclusive with the count, p and the pairs a decision needs. Inconclusive too if no
    block was removed anywhere. Also names the reviewer's "what would settle it" cases."""
    per_seed = results["geometry"]["D_per_seed"]
    removed = results["removed"]["target"]
    target = results["protocols"]["target"]["delta"]
    pairs = [(s, seed) for s in _shifts(results) for seed in per_seed if removed[s][seed]]
    if not pairs:
        return _verdict(INCONCLUSIVE, "TALE removed no block on any shift: nothing to realign", pairs=0)
    d = {(s, seed): (per_seed[seed][s]["target_pruned"], per_seed[seed][s]["full"]) for s, seed in pairs}
    closer = [pair for pair in pairs if d[pair][0] < d[pair][1]]
    farther = [pair for pair in pairs if d[pair][0] > d[pair][1]]
    n = len(closer) + len(farther)
    p = sign_test(len(closer), n)
    ratios = [pruned / full for pruned, full in d.values() if full > 0]
    median_ratio = float(np.median(ratios)) if ratios else float("nan")
    evidence = (f"D fell after pruning in {len(closer)}/{len(pairs)} (shift, seed) pairs with removed blocks, rose "
                f"in {len(farther)} (sign test p {p:.3g}; median D pruned/full {median_ratio:.2f})")
    if p < SIGN_TEST_ALPHA:
        verdict = SUPPORTED if len(closer) > len(farther) else REFUTED
    else:
        verdict = INCONCLUSIVE
        needed = next(m for m in range(1, 64) if sign_test(0, m) < SIGN_TEST_ALPHA)
        evidence += (f": not significant; even pairs that all agree decide only from {needed} pairs on"
                     if n < needed else ": not significant")
    result = _verdict(verdict, evidence, closer=len(closer), farther=len(farther), pairs=len(pairs), p_value=p,
                      median_ratio=median_ratio)
    not_closer = sorted({s for s, seed in pairs if (s, seed) not in closer})
    closer_not_better = sorted({s for s, _ in closer if not target[s][primary_metric(results)]["improved"]})
    cases = []
    if not_closer:
        cases.append(f"TALE's layers removed but profiles not closer: {', '.join(not_closer)}")
    if closer_not_better:
        cases.append(f"profiles closer but OOD not better: {', '.join(closer_not_better)}")
    result["settle_case"] = "; ".join(cases) or None
    return result


def c5_causal(results: dict) -> dict:
    """Residual scaling of TALE's blocks (alpha 0..1): Spearman rho between D and score must be <= -0.8 in a
    majority of sweeps and weaker for the random-block control; norm matching (no pruning) must recover a
    positive share of the pruning gain on average. Only shifts where TALE improved held-out OOD count: C5 asks
    what causes a gain, so without one (as C7 and C9) it is inconclusive, not refuted by sweeps of noise.
    Supported if both hold, refuted if neither, else inconclusive (also when no intervention ran, when norm
    matching was not run, or when pruning gained nothing on the intervention prompts, so that there is no gain
    to recover)."""
    interventions = results.get("interventions") or {}
    if not interventions:
        return _verdict(INCONCLUSIVE, "no intervention ran (TALE removed no block on any shift)")
    improved = _improved_shifts(results)
    if not any(shift in improved for shift in interventions):
        return _verdict(INCONCLUSIVE, "no shift with interventions improved on held-out examples, so there is no "
                                      "gain whose cause the sweeps and norm matching could test")
    rhos, control_rhos, recovered = [], [], []
    for shift, row in interventions.items():
        if shift not in improved:
            continue
        for seed, points in row["sweep_removed"].items():
            rhos.append(_sweep_rho(points))
            if row["sweep_control"].get(seed):
                control_rhos.append(_sweep_rho(row["sweep_control"][seed]))
            m = row["norm_matching"][seed]
            gain = m["ood_pruned"] - m["ood_full"]
            if "ood_matched" in m and gain > 0:
                recovered.append((m["ood_matched"] - m["ood_full"]) / gain)
    if not rhos:
        return _verdict(INCONCLUSIVE, "no intervention ran on an improved shift (TALE removed no block there)")
    together = sum(r <= MONOTONE_RHO for r in rhos if not np.isnan(r))
    monotone = together > len(rhos) / 2
    matched = bool(recovered) and float(np.mean(recovered)) > 0
    verdict = SUPPORTED if monotone and matched else REFUTED if not monotone and not matched else INCONCLUSIVE
    sweeps = (f"ρ(D, score) ≤ {MONOTONE_RHO} in {together}/{len(rhos)} sweeps of TALE's blocks "
              f"(control median ρ {np.nanmedian(control_rhos) if control_rhos else float('nan'):.2f})")
    if not _norm_matching_ran(interventions):
        return _verdict(INCONCLUSIVE, f"{sweeps}; norm matching was not run, so half of the test is missing",
                        rhos=rhos, control_rhos=control_rhos)
    if not recovered:
        return _verdict(INCONCLUSIVE, f"{sweeps}; pruning gained nothing on the intervention prompts, so there "
                        "is no gain for norm matching to recover: half of the test is missing",
                        rhos=rhos, control_rhos=control_rhos)
    evidence = (f"{sweeps}; norm matching recovered {np.mean(recovered) * 100 if recovered else float('nan'):.0f}% "
                f"of the pruning gain on average ({len(recovered)} cases with a gain)")
    return _verdict(verdict, evidence, rhos=rhos, control_rhos=control_rhos, recovered=recovered)


def _norm_matching_ran(interventions: dict) -> bool:
    return any("ood_matched" in m for row in interventions.values() for m in row["norm_matching"].values())


def _sweep_rho(points: list[dict]) -> float:
    inside = [p for p in points if 0.0 <= p["alpha"] <= 1.0]
    d, score = [p["D"] for p in inside], [p["score"] for p in inside]
    if len(inside) < 3 or np.std(d) == 0 or np.std(score) == 0:
        return float("nan")
    return float(np.corrcoef(_rank(np.asarray(d)), _rank(np.asarray(score)))[0, 1])


def c6_scales(results: dict) -> dict:
    """C1–C4 at every scale of a multi-scale study (at least MIN_SCALES testbed sizes, or MIN_LMS language
    models when the scales are LMs). Supported when all four are
    supported at every scale; refuted when any is refuted at some scale (the claimed effect does not hold
    there); otherwise inconclusive. Whether the verdicts themselves agree across scales is reported too."""
    scales = results.get("scales")
    if not scales:
        return _verdict(INCONCLUSIVE, "single model scale in this study; run a multi-scale config "
                                      "(e.g. configs/scales.yaml) to test C6")
    table = {name: {c: s["claims"][c]["verdict"] for c in SCALE_CLAIMS} for name, s in scales.items()}
    needed = MIN_LMS if results.get("kind") == "lm" else MIN_SCALES
    agree = [c for c in SCALE_CLAIMS if len({v[c] for v in table.values()}) == 1]
    consistency = (f"verdicts agree across scales on {', '.join(agree) or 'none'} of {', '.join(SCALE_CLAIMS)}")
    if len(scales) < needed:
        return _verdict(INCONCLUSIVE, f"{len(scales)} scale(s); C6 needs at least {needed}; {consistency}",
                        per_scale=table, n_scales=len(scales))
    refuted = {c: [n for n, v in table.items() if v[c] == REFUTED] for c in SCALE_CLAIMS}
    refuted = {c: names for c, names in refuted.items() if names}
    if refuted:
        where = "; ".join(f"{c} refuted at {', '.join(names)}" for c, names in refuted.items())
        return _verdict(REFUTED, f"{where} ({consistency})", per_scale=table, n_scales=len(scales))
    if all(v[c] == SUPPORTED for v in table.values() for c in SCALE_CLAIMS):
        return _verdict(SUPPORTED, f"C1–C4 supported at all {len(scales)} scales", per_scale=table,
                        n_scales=len(scales))
    return _verdict(INCONCLUSIVE, f"no C1–C4 verdict refuted, but not all supported ({consistency})",
                    per_scale=table, n_scales=len(scales))


def c7_not_tamer(results: dict) -> dict:
    """On shifts where TALE improved OOD: the prediction-shrinkage slope must not fall by more than 0.05
    (a gain from shrinking predictions toward 0 would be "tamer confidence"); on text tasks with choice
    probabilities, the mean top-choice confidence must not fall by more than 0.05 (ECE and Brier reported
    beside). Inconclusive with no gain, or on a task without probabilities."""
    improved = _improved_shifts(results)
    if not improved:
        return _verdict(INCONCLUSIVE, "no shift improved, so there is no gain to explain")
    if primary_metric(results) != "nmse":
        return _c7_confidence(results, improved)
    full, pruned = results["full"], results["protocols"]["target"]["pruned"]
    slopes = {s: (full[s]["shrinkage_slope"], pruned[s]["shrinkage_slope"]) for s in improved}
    shrunk = [s for s, (a, b) in slopes.items() if b < a - SLOPE_TOLERANCE]
    verdict = REFUTED if len(shrunk) > len(slopes) / 2 else SUPPORTED
    return _verdict(verdict, f"shrinkage slope fell by > {SLOPE_TOLERANCE} on {len(shrunk)}/{len(slopes)} "
                    f"improved shifts", slopes=slopes)


def _c7_confidence(results: dict, improved: list[str]) -> dict:
    calibration = results.get("calibration", {}).get("target") or {}
    rows = {s: calibration[s] for s in improved if s in calibration}
    if not rows:
        return _verdict(INCONCLUSIVE, "the run has no confidence values for the improved shifts: calibration "
                                      "cannot be compared")
    tamer = [s for s, r in rows.items() if r["delta_confidence"] < -CONFIDENCE_TOLERANCE]
    verdict = REFUTED if len(tamer) > len(rows) / 2 else SUPPORTED
    detail = "; ".join(f"{s}: Δconf {r['delta_confidence']:+.3f}, ΔECE {r['delta_ece']:+.3f}, "
                       f"ΔBrier {r['delta_brier']:+.3f}" for s, r in rows.items())
    return _verdict(verdict, f"mean confidence fell by > {CONFIDENCE_TOLERANCE} on {len(tamer)}/{len(rows)} "
                    f"improved shifts ({detail})", tamer=tamer)


def _improved_shifts(results: dict) -> list[str]:
    delta = results["protocols"]["target"]["delta"]
    metric = primary_metric(results)
    return [s for s in _shifts(results) if delta[s][metric]["improved"]]


def c8_distortion_predicts(results: dict) -> dict:
    """Spearman rho across shifts between D (full model) and the OOD drop (how much worse the shift scores than
    ID: shift NMSE − ID NMSE, or ID accuracy − shift accuracy): supported if
    rho > 0 with permutation p < 0.05, refuted if rho <= 0, else inconclusive. Also: overlap between the
    blocks TALE removed and the blocks of largest distortion attribution, against the random expectation."""
    shifts = _shifts(results)
    d = [results["geometry"]["D_mean"][s]["full"] for s in shifts]
    metric = primary_metric(results)
    sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
    drop = [sign * (results["full"][s][metric]["mean"] - results["full"]["id"][metric]["mean"]) for s in shifts]
    if len(shifts) < 3:
        return _verdict(INCONCLUSIVE, f"only {len(shifts)} shifts; need at least 3 for a rank correlation")
    rho, p = spearman_with_p(d, drop)
    overlap = attribution_overlap(results)
    verdict = SUPPORTED if rho > 0 and p < 0.05 else REFUTED if not rho > 0 else INCONCLUSIVE
    return _verdict(verdict, f"Spearman ρ(D, OOD drop) = {rho:.2f} (p = {p:.3f}, {len(shifts)} shifts); "
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
    """On shifts where TALE improved: weight pruning (magnitude, Wanda) at the same parameter budget should
    not improve. Supported if it improves on a minority of them, refuted on a majority, inconclusive when
    TALE improved nowhere or no control ran."""
    improved = _improved_shifts(results)
    comparisons = results.get("comparisons") or {}
    metric = primary_metric(results)
    ran = [(s, m) for s in comparisons for m in ("magnitude", "wanda") if m in comparisons[s]]
    also_anywhere = [f"{s}/{m}" for s, m in ran if comparisons[s][m][metric]["improved"]]
    cases = [(s, m) for s, m in ran if s in improved]
    if not cases:
        why = "TALE improved no shift" if ran else "no weight-pruning control ran"
        extra = f"; weight pruning alone improved {', '.join(also_anywhere)}" if also_anywhere else ""
        return _verdict(INCONCLUSIVE, f"{why}: nothing to compare{extra}", also_improved_anywhere=also_anywhere)
    also = [(s, m) for s, m in cases if comparisons[s][m][metric]["improved"]]
    mdes = [comparisons[s][m][metric]["mde"] for s, m in cases if "mde" in comparisons[s][m][metric]]
    verdict = REFUTED if len(also) > len(cases) / 2 else SUPPORTED
    out = _verdict(verdict, f"weight pruning at TALE's budget also improved {len(also)}/{len(cases)} "
                   f"(shift, method) cases where TALE did", also_improved=also, cases=cases)
    out.update(mde=float(np.median(mdes)) if mdes else None, n=comparisons[cases[0][0]][cases[0][1]][metric].get("n"))
    return out


def g1_edge_pruning_realigns(results: dict) -> dict:
    """Graphs: per (shift, seed), D after (PrunE's classifier on its kept edges, OOD vs its own ID) against D
    before (the ERM classifier on whole graphs). A change counts only beyond the larger of the two ID-vs-ID
    noise floors; changes within the noise are no evidence either way. As C4, an exact two-sided sign test over
    the pairs that moved decides: supported if D fell significantly more often (p < 0.05), refuted if it rose
    significantly more often, else inconclusive."""
    per_seed = results["edges"]["per_seed"]
    pairs, fell, rose, changes = 0, [], [], {}
    for seed, summary in per_seed.items():
        geo = summary["geometry"]
        floor = max(geo["erm"]["noise_floor"], geo["prune"]["noise_floor"])
        for shift in _shifts(results):
            before, after = geo["erm"][shift], geo["prune"][shift]
            pairs += 1
            changes[f"{shift}/{seed}"] = after - before
            if after < before - floor:
                fell.append(f"{shift}/{seed}")
            elif after > before + floor:
                rose.append(f"{shift}/{seed}")
    p = sign_test(len(fell), len(fell) + len(rose))
    verdict = (INCONCLUSIVE if p >= SIGN_TEST_ALPHA else SUPPORTED if len(fell) > len(rose) else REFUTED)
    mean = results["edges"]["geometry"]
    evidence = (f"D fell beyond the noise floor in {len(fell)}/{pairs} (shift, seed) pairs and rose beyond it in "
                f"{len(rose)} (sign test p {p:.3g}); mean D before → after: " + ", ".join(
                    f"{s} {mean['erm'][s]:.3f} → {mean['prune'][s]:.3f}" for s in _shifts(results)))
    return _verdict(verdict, evidence, fell=fell, rose=rose, pairs=pairs, change=changes, p_value=p)


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
