"""Claim verdicts on hand-built results with known answers (each rule can come out every way it can), decided at
the replicate level from rows shaped like :func:`tapioca.analysis.evaluation.compare`'s."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from tapioca.analysis import stats
from tapioca.report.claims import (REFUTED, SUPPORTED, INCONCLUSIVE, c1_no_id_benefit, c2_ood_improves, c3_ood_distorts,
                                   c4_realigns, c5_causal, c6_scales, c7_not_tamer, c8_distortion_predicts,
                                   c9_needs_layer_removal, g1_edge_pruning_realigns, paper_pattern, shift_outcomes,
                                   sign_test, spearman_with_p, verdicts)

SHIFTS = ["s1", "s2", "s3", "s4", "s5", "s6"]
SEEDS = ["0", "1", "2", "3", "4"]
ALL = ("id", *SHIFTS)  # the ID search and every shift's search removed blocks


def row(mean: float = 0.0, sd: float = 0.001, n: int = 5, full: float = 1.0, metric: str = "nmse") -> dict:
    """A replicate-level delta row (pruned − full) from the unit means' mean and sd, as compare() writes it."""
    low, high = stats.t_interval(mean, sd, n)
    low_t, high_t = stats.t_interval(mean, sd, n, 0.90)
    p = 2 * min(stats.t_p_beyond(mean, sd, n, 0.0, "above"), stats.t_p_beyond(mean, sd, n, 0.0, "below"))
    return {metric: {"full": full, "pruned": full + mean, "mean": mean, "low": low, "high": high, "p_value": min(1.0, p),
                     "p_holm": min(1.0, p), "n": n, "sd": sd, "low_tost": low_t, "high_tost": high_t,
                     "mde": stats.units_mde(sd, n), "unit": "model", "improved": False, "worse": False}}


GAIN = dict(mean=-0.2, sd=0.02)  # NMSE falls by 0.2 (δ = 0.05 of 1.0): a clear gain


def build(improved=(), d_full=None, d_pruned=None, removed=("s1",), drop=None, d_random=None):
    """A minimal results.json: 6 shifts, 5 seeds, full-model NMSE = 1 + drop, D = d_full per shift, noise floor 0.1."""
    d_full = d_full or {s: 1.0 for s in SHIFTS}
    d_pruned = d_pruned or {s: 0.5 for s in SHIFTS}
    drop = drop or {s: 1.0 for s in SHIFTS}
    delta = {"id": row(full=0.1), **{s: row(**GAIN) if s in improved else row() for s in SHIFTS}}
    rng = np.random.default_rng(0)
    per_seed = {seed: {"noise_floor": {"full": 0.1},
                       **{s: {"full": d_full[s] * (1 + 0.01 * rng.standard_normal()),
                              "target_pruned": d_pruned[s] * (1 + 0.01 * rng.standard_normal()),
                              "target_pruned_vs_full_id": 0.0, "from_id_pruned": 0.0,
                              **({"random_pruned": d_random[s] * (1 + 0.01 * rng.standard_normal())}
                                 if d_random else {})} for s in SHIFTS}} for seed in SEEDS}
    full = {"id": {"nmse": {"mean": 0.1}, "shrinkage_slope": 1.0},
            **{s: {"nmse": {"mean": 0.1 + drop[s]}, "shrinkage_slope": 1.0} for s in SHIFTS}}
    return {
        "protocols": {"target": {"delta": delta, "pruned": copy.deepcopy(full)},
                      "from-id": {"delta": copy.deepcopy(delta)}},
        "removed": {"target": {s: {seed: [2] if s in removed else [] for seed in SEEDS} for s in ["id", *SHIFTS]}},
        "geometry": {"D_mean": per_seed["0"], "D_per_seed": per_seed,
                     "attribution_full": {"0": {s: [0.0, 0.0, 1.0, 0.0] for s in SHIFTS}}},
        "full": full, "n_blocks": 4,
    }


def set_row(results: dict, dist: str, **kwargs) -> None:
    results["protocols"]["target"]["delta"][dist] = row(**kwargs)


def test_c1_separates_no_benefit_from_not_enough_data():
    results = build(removed=ALL)  # ID NMSE 0.1: the smallest effect of interest is 5 % of it, 0.005
    set_row(results, "id", mean=0.0, sd=0.001, full=0.1)  # 5 models agree on no change: a gain of δ is excluded
    assert c1_no_id_benefit(results)["verdict"] == SUPPORTED
    set_row(results, "id", mean=-0.05, sd=0.005, full=0.1)  # a clear gain beyond δ
    assert c1_no_id_benefit(results)["verdict"] == REFUTED
    set_row(results, "id", mean=0.0, sd=0.02, full=0.1)  # models disagree: a gain of δ is inside the interval
    verdict = c1_no_id_benefit(results)
    assert verdict["verdict"] == INCONCLUSIVE and "underpowered" in verdict["evidence"]
    assert verdict["unit"] == "model" and verdict["n"] == 5 and verdict["n_needed"] > 5
    set_row(results, "id", mean=-0.006, sd=0.002, full=0.1)  # a gain, but its CI straddles δ = 0.005
    verdict = c1_no_id_benefit(results)
    assert verdict["verdict"] == INCONCLUSIVE and "significant ID gain whose CI straddles δ" in verdict["evidence"]
    set_row(results, "id", mean=0.02, sd=0.002, full=0.1)  # significantly worse: no benefit
    assert c1_no_id_benefit(results)["verdict"] == SUPPORTED
    set_row(results, "id", mean=0.0, sd=0.0001, n=1, full=0.1)  # one replicate: no interval, however tight
    assert c1_no_id_benefit(results)["verdict"] == INCONCLUSIVE


def test_c1_reports_replicates_needed_from_the_t_test_power():
    results = build(removed=ALL)
    set_row(results, "id", mean=0.0, sd=0.01, n=3, full=0.1)
    verdict = c1_no_id_benefit(results)
    statsmodels = pytest.importorskip("statsmodels.stats.power")
    k = statsmodels.TTestPower().solve_power(effect_size=0.005 / 0.01, alpha=0.05, power=0.8)
    assert verdict["n_needed"] == math.ceil(k) and verdict["sesoi"] == pytest.approx(0.005)
    assert "models needed" in verdict["evidence"] or "MDE" in verdict["evidence"]


def test_no_sample_size_is_given_when_the_differences_never_vary():
    results = build(removed=())  # the ID search removed nothing: Δ is 0 in every replicate
    set_row(results, "id", mean=0.0, sd=0.0, full=0.1)
    verdict = c1_no_id_benefit(results)
    assert verdict["verdict"] == INCONCLUSIVE and verdict["n_needed"] is None


def test_c2_needs_gains_of_at_least_delta_and_evidence_against_to_refute():
    assert c2_ood_improves(build(improved=SHIFTS[:4], removed=ALL))["verdict"] == SUPPORTED
    assert c2_ood_improves(build(improved=SHIFTS[:2], removed=ALL))["verdict"] == INCONCLUSIVE
    verdict = c2_ood_improves(build(removed=ALL))  # every shift: no change, tight: a gain of δ = 0.05 excluded
    assert verdict["verdict"] == REFUTED and "gain ≥ δ on 0/6" in verdict["evidence"]
    small = build(removed=ALL)
    for s in SHIFTS:
        set_row(small, s, mean=-0.02, sd=0.002)  # significant gains, all smaller than δ and shown so
    assert c2_ood_improves(small)["verdict"] == REFUTED
    assert set(shift_outcomes(small).values()) == {"no gain ≥ δ"}
    for s in SHIFTS:
        set_row(small, s, mean=-0.04, sd=0.012)  # significant, below δ on average, but not shown below δ
    verdict = c2_ood_improves(small)
    assert verdict["verdict"] == INCONCLUSIVE and verdict["numbers"]["small"] == SHIFTS
    wide = build(removed=ALL)
    for s in SHIFTS:
        set_row(wide, s, mean=0.0, sd=0.2)  # no significant change, interval too wide
    verdict = c2_ood_improves(wide)
    assert verdict["verdict"] == INCONCLUSIVE and verdict["numbers"]["undecided"] == SHIFTS


def test_c2_holm_adjusts_gains_across_shifts():
    results = build(removed=ALL)
    for s in SHIFTS:  # p ≈ 0.02 each: significant alone, not after Holm over 6 shifts
        set_row(results, s, mean=-0.1, sd=0.06)
    raw = results["protocols"]["target"]["delta"]["s1"]["nmse"]["p_value"]
    assert 0.01 < raw < 0.05
    assert c2_ood_improves(results)["numbers"]["improved"] == []


def _accuracy(results: dict, full: dict[str, float]) -> dict:
    """``results`` rewritten as an accuracy study (the same rows, as gains) with these full-model accuracies."""
    for dist, r in results["protocols"]["target"]["delta"].items():
        r["acc"] = row(mean=-r["nmse"]["mean"], sd=r["nmse"]["sd"], n=r["nmse"]["n"], full=full[dist], metric="acc")["acc"]
        del r["nmse"]
    results["protocols"]["from-id"]["delta"] = copy.deepcopy(results["protocols"]["target"]["delta"])
    results.update(primary_metric="acc", smallest_effect={"relative": 0.05, "points": 0.01})
    return results


def test_a_full_model_at_chance_or_at_one_is_no_evidence_against_a_gain():
    at_chance = {d: 0.25 for d in ALL}
    results = _accuracy(build(removed=ALL), at_chance)  # every gain excluded beyond δ = 0.01: evidence against
    assert c2_ood_improves(results)["verdict"] == REFUTED  # no chance level recorded: nothing to compare with
    results["chance"] = {d: 0.25 for d in ALL}  # four choices: the model answers at chance
    c2 = c2_ood_improves(results)
    assert c2["verdict"] == INCONCLUSIVE and c2["numbers"]["bounded"] == SHIFTS
    assert set(c2["numbers"]["outcomes"].values()) == {"at floor"}
    c1 = c1_no_id_benefit(results)
    assert c1["verdict"] == INCONCLUSIVE and c1["evidence"].startswith("floor")
    results["chance"] = {d: 0.0 for d in ALL}  # short answers, far above chance: evidence again
    assert c2_ood_improves(results)["verdict"] == REFUTED
    near_one = _accuracy(build(removed=ALL), {d: 0.995 for d in ALL})
    near_one["chance"] = {d: 0.25 for d in ALL}
    assert c1_no_id_benefit(near_one)["evidence"].startswith("ceiling")
    assert c2_ood_improves(near_one)["numbers"]["outcomes"]["s1"] == "at ceiling"


def test_c1_and_c2_do_not_count_searches_that_removed_nothing():
    results = build(removed=("s1", "s2"))  # the ID search and four shifts' searches kept every block
    set_row(results, "id", mean=0.0, sd=0.0, full=0.1)
    c1 = c1_no_id_benefit(results)
    assert c1["verdict"] == INCONCLUSIVE and "never tested" in c1["evidence"]
    c2 = c2_ood_improves(results)  # s1 and s2 alone are tested: their intervals exclude a gain of δ
    assert c2["verdict"] == REFUTED and c2["numbers"]["untested"] == SHIFTS[2:]
    one = c2_ood_improves(build(improved=("s1",), removed=("s1",)))  # one tested shift, even with a gain
    assert one["verdict"] == INCONCLUSIVE and "too few" in one["evidence"]
    assert c2_ood_improves(build(removed=()))["verdict"] == INCONCLUSIVE


def test_c3_decides_on_an_interval_for_the_ratio_to_the_noise_floor():
    assert c3_ood_distorts(build(d_full={s: 1.0 for s in SHIFTS}))["verdict"] == SUPPORTED  # 10x floor
    assert c3_ood_distorts(build(d_full={s: 0.2 for s in SHIFTS}))["verdict"] == REFUTED  # 2x floor
    borderline = c3_ood_distorts(build(d_full={s: 0.29 for s in SHIFTS}))  # 2.9x, models within 1 %: refuted ...
    assert borderline["verdict"] == REFUTED
    noisy = build(d_full={s: 0.29 for s in SHIFTS})
    for i, seed in enumerate(SEEDS):  # ... but with models that disagree widely, 2.9x is undecided
        for s in SHIFTS:
            noisy["geometry"]["D_per_seed"][seed][s]["full"] = 0.29 * (0.3, 3.0, 1.0, 0.5, 2.0)[i]
    assert c3_ood_distorts(noisy)["verdict"] == INCONCLUSIVE


def test_c4_compares_tale_with_random_removal_in_noise_floors():
    closer = c4_realigns(build(removed=SHIFTS, d_pruned={s: 0.5 for s in SHIFTS}, d_random={s: 1.0 for s in SHIFTS}))
    assert closer["verdict"] == SUPPORTED and closer["numbers"]["reference"] == "random_pruned"
    assert "profiles closer but OOD not better: s1, s2, s3, s4, s5, s6" in closer["settle_case"]
    same = c4_realigns(build(removed=SHIFTS, d_pruned={s: 0.5 for s in SHIFTS}, d_random={s: 0.5 for s in SHIFTS}))
    assert same["verdict"] == REFUTED  # TALE realigns no more than removing random blocks does
    farther = c4_realigns(build(removed=SHIFTS, d_pruned={s: 2.0 for s in SHIFTS}, improved=("s1",)))
    assert farther["verdict"] == REFUTED and farther["numbers"]["reference"] == "full"
    assert "profiles not closer: s1, s2" in farther["settle_case"]
    assert c4_realigns(build(removed=()))["verdict"] == INCONCLUSIVE


def test_c4_counts_models_not_shift_seed_pairs():
    results = build(removed=SHIFTS, d_pruned={s: 0.5 for s in SHIFTS}, d_random={s: 1.0 for s in SHIFTS})
    for seed in SEEDS[2:]:  # two models only
        del results["geometry"]["D_per_seed"][seed]
    two = c4_realigns(results)
    assert two["numbers"]["n"] == 2
    for seed in SEEDS[1:2]:
        del results["geometry"]["D_per_seed"][seed]
    one = c4_realigns(results)  # six (shift, seed) pairs agree, but they come from one model
    assert one["verdict"] == INCONCLUSIVE and "fewer than 2 models" in one["evidence"]


def edges_results(changes: list[float], floor: float = 0.1, random: bool = False) -> dict:
    """A graph study's edges block: one shift, one seed per change of D (after - before), noise floor ``floor``."""
    per_seed = {str(i): {"geometry": {"erm": {"noise_floor": floor, "s1": 1.0},
                                      "prune": {"noise_floor": floor, "s1": 1.0 + c},
                                      **({"random": {"noise_floor": floor, "s1": 1.0}} if random else {})}}
                for i, c in enumerate(changes)}
    return {"protocols": {"target": {"delta": {"id": {}, "s1": {}}}}, "edges": {
        "per_seed": per_seed, "geometry": {"erm": {"s1": 1.0}, "prune": {"s1": 1.0 + sum(changes) / len(changes)}}}}


def test_g1_tests_the_change_in_noise_floors_over_seeds():
    assert g1_edge_pruning_realigns(edges_results([-0.5, -0.4, -0.6, -0.5]))["verdict"] == SUPPORTED
    assert g1_edge_pruning_realigns(edges_results([+0.5, +0.4, +0.6, 0.5]))["verdict"] == REFUTED
    mixed = g1_edge_pruning_realigns(edges_results([-0.5, +0.5, -0.3, +0.4]))
    assert mixed["verdict"] == INCONCLUSIVE
    assert g1_edge_pruning_realigns(edges_results([-0.5] * 3, random=True))["numbers"]["reference"] == "random"


def test_sign_test_matches_the_exact_binomial():
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 6), (2, 6), (5, 6), (9, 10), (10, 13), (3, 3), (7, 20)]:
        assert sign_test(k, n) == pytest.approx(scipy_stats.binomtest(k, n, 0.5).pvalue, rel=1e-9)


def sweep(d_slope: float, jitter: float = 0.0):
    return [{"alpha": a, "score": -1.0 - a + jitter * (i % 2), "D": 1.0 + d_slope * a}
            for i, a in enumerate((0.0, 0.25, 0.5, 0.75, 1.0, 1.25))]


def interventions(own: float, control: float, matched: list[float], seeds=SEEDS) -> dict:
    return {"s1": {"sweep_removed": {s: sweep(own) for s in seeds},
                   "sweep_control": {s: sweep(control, jitter=0.6 * (i % 2)) for i, s in enumerate(seeds)},
                   "norm_matching": {s: {"ood_full": -2.0, "ood_pruned": -1.0, "ood_matched": -2.0 + m}
                                     for s, m in zip(seeds, matched)}}}


def test_c5_needs_tighter_sweeps_than_random_blocks_and_a_recovered_share():
    results = build(improved=("s1",))
    results["interventions"] = interventions(1.0, -1.0, [0.8, 0.9, 0.85, 0.8, 0.9])  # TALE ρ −1, control ≈ 0..1
    verdict = c5_causal(results)
    assert verdict["verdict"] == SUPPORTED and verdict["numbers"]["recovered_share"][0] == pytest.approx(0.85)
    results["interventions"] = interventions(1.0, -1.0, [0.1, 0.05, 0.0, 0.1, 0.05])  # matching recovers ~6 %
    assert c5_causal(results)["verdict"] == REFUTED
    results["interventions"] = interventions(1.0, -1.0, [0.9, -0.5, 1.5, 0.2, 0.8])  # share undecided
    assert c5_causal(results)["verdict"] == INCONCLUSIVE
    assert c5_causal(build())["verdict"] == INCONCLUSIVE


def test_c5_tests_the_cause_of_a_held_out_gain_only():
    """Sweeps and norm matching on shifts TALE did not improve are noise: they neither support nor refute C5."""
    results = build(improved=())
    results["interventions"] = interventions(-1.0, 1.0, [0.0] * 5)
    no_gain = c5_causal(results)
    assert no_gain["verdict"] == INCONCLUSIVE and "no gain whose cause" in no_gain["evidence"]


def test_c7_decides_on_an_interval_for_the_slope_change():
    results = build(improved=("s1",), removed=ALL)
    results["shrinkage_change"] = {"s1": {s: v for s, v in zip(SEEDS, (0.0, 0.01, -0.01, 0.005, 0.0))}}
    assert c7_not_tamer(results)["verdict"] == SUPPORTED
    results["shrinkage_change"] = {"s1": {s: v for s, v in zip(SEEDS, (-0.3, -0.25, -0.35, -0.3, -0.28))}}
    assert c7_not_tamer(results)["verdict"] == REFUTED
    results["shrinkage_change"] = {"s1": {s: v for s, v in zip(SEEDS, (0.2, -0.3, 0.1, -0.25, 0.0))}}
    assert c7_not_tamer(results)["verdict"] == INCONCLUSIVE  # no longer "supported" by default
    del results["shrinkage_change"]
    assert c7_not_tamer(results)["verdict"] == INCONCLUSIVE
    assert c7_not_tamer(build())["verdict"] == INCONCLUSIVE


def test_c8_is_decided_by_its_p_value_in_either_direction():
    ranks = {s: float(i) for i, s in enumerate(SHIFTS)}
    assert c8_distortion_predicts(build(d_full=ranks, drop=ranks))["verdict"] == SUPPORTED
    reversed_drop = {s: -v for s, v in ranks.items()}
    assert c8_distortion_predicts(build(d_full=ranks, drop=reversed_drop))["verdict"] == REFUTED
    weak = {s: v for s, v in zip(SHIFTS, (1.0, 0.0, 3.0, 2.0, 5.0, 4.0))}  # ρ = 0.83 > 0 with p ≈ 0.06
    assert c8_distortion_predicts(build(d_full=ranks, drop=weak))["verdict"] == INCONCLUSIVE
    slightly_negative = {s: v for s, v in zip(SHIFTS, (2.0, 1.0, 0.0, 5.0, 4.0, 3.0))}
    assert c8_distortion_predicts(build(d_full=ranks, drop={s: -v for s, v in slightly_negative.items()}))[
        "verdict"] == INCONCLUSIVE  # ρ ≤ 0 is no longer a refutation by itself
    flat = build(drop=ranks)
    flat["geometry"]["D_mean"] = {s: {"full": 1.0} for s in SHIFTS}
    constant = c8_distortion_predicts(flat)
    assert constant["verdict"] == INCONCLUSIVE and "undefined" in constant["evidence"]
    overlap = c8_distortion_predicts(build(d_full=ranks, drop=ranks))["numbers"]["overlap"]
    assert overlap["hits"] == 1 and overlap["random_expectation"] == pytest.approx(0.25)  # block 2 removed


def test_c8_says_when_too_few_shifts_can_reach_alpha():
    results = build(d_full={s: float(i) for i, s in enumerate(SHIFTS)}, drop={s: float(i) for i, s in enumerate(SHIFTS)})
    for s in SHIFTS[3:]:
        del results["protocols"]["target"]["delta"][s]
    verdict = c8_distortion_predicts(results)  # 3 shifts, perfectly ordered: the smallest p is 1/3
    assert verdict["verdict"] == INCONCLUSIVE and "cannot reach" in verdict["evidence"]


def test_spearman_with_p_matches_known_values():
    rho, p = spearman_with_p([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7])
    assert rho == pytest.approx(1.0) and p == pytest.approx(2 / math.factorial(7))
    rho, p = spearman_with_p([1, 2, 3, 4], [2, 1, 4, 3])
    assert rho == pytest.approx(0.6) and p > 0.2


def test_c9_compares_tale_with_weight_pruning_directly():
    results = build(improved=("s1",), removed=ALL)
    tale = row(**GAIN)
    needs = {"nmse": row(mean=0.0, sd=0.005)["nmse"], "vs_tale": row(mean=0.2, sd=0.02)}  # weight pruning: no gain
    results["comparisons"] = {"s1": {"tale": tale, "magnitude": copy.deepcopy(needs), "wanda": copy.deepcopy(needs)}}
    assert c9_needs_layer_removal(results)["verdict"] == SUPPORTED
    carried = {"nmse": row(**GAIN)["nmse"], "vs_tale": row(mean=0.0, sd=0.005)}  # weight pruning gains as much
    results["comparisons"]["s1"].update(magnitude=copy.deepcopy(carried), wanda=copy.deepcopy(carried))
    assert c9_needs_layer_removal(results)["verdict"] == REFUTED
    undecided = {"nmse": row(mean=-0.05, sd=0.2)["nmse"], "vs_tale": row(mean=0.1, sd=0.3)}
    results["comparisons"]["s1"].update(magnitude=copy.deepcopy(undecided), wanda=copy.deepcopy(undecided))
    verdict = c9_needs_layer_removal(results)
    assert verdict["verdict"] == INCONCLUSIVE and verdict["n_needed"] is not None
    assert c9_needs_layer_removal(build())["verdict"] == INCONCLUSIVE


def test_c6_refutes_only_after_bonferroni_over_scales():
    def scale(verdict: str) -> dict:
        return {"claims": {c: {"verdict": verdict} for c in ("C1", "C2", "C3", "C4")}}

    assert c6_scales({"scales": {n: scale(SUPPORTED) for n in "abc"}})["verdict"] == SUPPORTED
    one = c6_scales({"scales": {"a": scale(SUPPORTED), "b": scale(SUPPORTED), "c": scale(REFUTED)}})
    assert one["verdict"] == INCONCLUSIVE and "not at α/3" in one["evidence"]
    strong = build(removed=ALL)
    set_row(strong, "id", mean=-0.05, sd=0.002, full=0.1)  # C1 refuted beyond any correction
    refuting = {"a": strong, "b": strong, "c": strong}
    out = c6_scales({"scales": {n: scale(REFUTED) for n in "abc"}, "scale_results": refuting})
    assert out["verdict"] == REFUTED and "C1 refuted at a, b, c" in out["evidence"]
    weak = build(removed=ALL)
    set_row(weak, "id", mean=-0.0085, sd=0.0015, n=3, full=0.1)  # refuted at α = 0.05, not at 0.05 / 3
    for s in SHIFTS:
        set_row(weak, s, mean=0.0, sd=0.5)  # C2 undecided
    assert c1_no_id_benefit(weak)["verdict"] == REFUTED
    out = c6_scales({"scales": {n: scale(REFUTED) for n in "abc"}, "scale_results": {n: weak for n in "abc"}})
    assert out["verdict"] == INCONCLUSIVE


def test_every_claim_gets_a_verdict():
    out = verdicts(build(improved=("s1",)))
    assert list(out) == [f"C{i}" for i in range(1, 10)]
    assert all(v["verdict"] in (SUPPORTED, REFUTED, INCONCLUSIVE) and v["evidence"] for v in out.values())


def test_thresholds_come_from_the_recorded_rules():
    results = build(d_full={s: 0.5 for s in SHIFTS})  # 5x floor
    assert c3_ood_distorts(results)["verdict"] == SUPPORTED
    results["rules"] = {"distortion_factor": 8.0}
    assert c3_ood_distorts(results)["verdict"] == REFUTED


def test_pattern_sentence_names_the_id_half_of_each_protocol():
    """In-sample the ID score gains too (C1 refuted) while shifts gain; held out nothing is decided."""
    results = build(improved=("s1",), removed=ALL)
    results["protocols"]["in-sample"] = copy.deepcopy(results["protocols"]["target"])
    results["claims"] = {"C1": {"verdict": INCONCLUSIVE}, "C2": {"verdict": INCONCLUSIVE}}
    results["claims_in_sample"] = {"C1": {"verdict": REFUTED}, "C2": {"verdict": SUPPORTED}}
    pattern = paper_pattern(results)
    assert not pattern["in_sample"] and not pattern["held_out"]
    assert "does not appear (ID gains too, 1/6 shifts gain)" in pattern["sentence"]
    assert "does not appear either (ID gain undecided, 1/6 shifts gain)" in pattern["sentence"]
    del results["protocols"]["in-sample"], results["claims_in_sample"]  # a run without the paper's protocol
    assert "does not appear (ID gain undecided, 1/6 shifts gain); the in-sample protocol was not computed" \
        in paper_pattern(results)["sentence"]
