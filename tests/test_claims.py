"""Claim verdicts on hand-built results with known answers (each rule can come out either way)."""

from __future__ import annotations

import copy

import pytest

from tapioca.report.claims import (REFUTED, SUPPORTED, INCONCLUSIVE, c1_no_id_benefit, c2_ood_improves, c3_ood_distorts,
                            c4_realigns, c5_causal, c7_not_tamer, c8_distortion_predicts, c9_needs_layer_removal, g1_edge_pruning_realigns,
                            paper_pattern,
                            sign_test, spearman_with_p, verdicts)

SHIFTS = ["s1", "s2", "s3", "s4", "s5", "s6"]


def row(mean=0.0, low=-0.01, high=0.01, full=1.0, improved=False, worse=False):
    return {"nmse": {"full": full, "pruned": full + mean, "mean": mean, "low": low, "high": high, "p_value": 0.5,
                     "p_holm": 0.5, "n": 100, "improved": improved, "worse": worse}}


ALL = ("id", *SHIFTS)  # the ID search and every shift's search removed blocks


def build(improved=(), d_full=None, d_pruned=None, removed=("s1",), drop=None):
    """A minimal results.json: 6 shifts, 2 seeds, full-model NMSE = 1 + drop, D = d_full per shift."""
    d_full = d_full or {s: 1.0 for s in SHIFTS}
    d_pruned = d_pruned or {s: 0.5 for s in SHIFTS}
    drop = drop or {s: 1.0 for s in SHIFTS}
    delta = {"id": row(full=0.1), **{s: row(-0.2, -0.3, -0.1, improved=True) if s in improved else row()
                                     for s in SHIFTS}}
    per_seed = {seed: {"noise_floor": {"full": 0.1},
                       **{s: {"full": d_full[s], "target_pruned": d_pruned[s], "target_pruned_vs_full_id": 0.0,
                              "from_id_pruned": 0.0} for s in SHIFTS}} for seed in ("0", "1")}
    full = {"id": {"nmse": {"mean": 0.1}, "shrinkage_slope": 1.0},
            **{s: {"nmse": {"mean": 0.1 + drop[s]}, "shrinkage_slope": 1.0} for s in SHIFTS}}
    return {
        "protocols": {"target": {"delta": delta, "pruned": copy.deepcopy(full)},
                      "from-id": {"delta": copy.deepcopy(delta)}},
        "removed": {"target": {s: {"0": [2] if s in removed else [], "1": []} for s in ["id", *SHIFTS]}},
        "geometry": {"D_mean": per_seed["0"], "D_per_seed": per_seed,
                     "attribution_full": {"0": {s: [0.0, 0.0, 1.0, 0.0] for s in SHIFTS}}},
        "full": full, "n_blocks": 4,
    }


def test_c1_separates_no_benefit_from_not_enough_data():
    results = build(removed=ALL)  # ID NMSE 0.1: the smallest effect of interest is 5 % of it, 0.005
    delta = results["protocols"]["target"]["delta"]
    delta["id"] = row(0.0, -0.001, 0.001, full=0.1)  # the CI excludes a gain of 0.005
    assert c1_no_id_benefit(results)["verdict"] == SUPPORTED
    delta["id"] = row(-0.05, -0.06, -0.04, full=0.1)  # a clear gain beyond δ
    assert c1_no_id_benefit(results)["verdict"] == REFUTED
    delta["id"] = row(0.0, -0.01, 0.01, full=0.1)  # a gain of 0.005 is inside the CI: no evidence either way
    verdict = c1_no_id_benefit(results)
    assert verdict["verdict"] == INCONCLUSIVE and "underpowered" in verdict["evidence"]
    delta["id"] = row(-0.006, -0.009, -0.002, full=0.1, improved=True)  # a gain, but its CI straddles δ = 0.005
    verdict = c1_no_id_benefit(results)
    assert verdict["verdict"] == INCONCLUSIVE and "significant ID gain whose CI straddles δ" in verdict["evidence"]
    delta["id"] = row(0.02, 0.01, 0.03, full=0.1, worse=True)  # significantly worse: no benefit
    assert c1_no_id_benefit(results)["verdict"] == SUPPORTED


def test_c1_uses_the_tost_interval_and_reports_power():
    results = build(removed=ALL)
    results["smallest_effect"] = {"relative": 0.05, "points": 0.01}
    r = row(0.0, -0.006, 0.006, full=0.1)  # 95 % CI reaches a gain of 0.006 > δ ...
    r["nmse"].update(low_tost=-0.004, high_tost=0.004, sd=0.02, mde=0.0056)  # ... the 90 % one does not
    results["protocols"]["target"]["delta"]["id"] = r
    verdict = c1_no_id_benefit(results)
    assert verdict["verdict"] == SUPPORTED
    assert verdict["mde"] == 0.0056 and verdict["n"] == 100 and verdict["sesoi"] == pytest.approx(0.005)
    assert verdict["n_needed"] == pytest.approx(((1.96 + 0.8416) * 0.02 / 0.005) ** 2, rel=0.02)


def test_no_sample_size_is_given_when_the_differences_never_vary():
    results = build(removed=())  # the ID search removed nothing: Δ is 0 on every example
    r = row(0.0, 0.0, 0.0, full=0.1)
    r["nmse"].update(low_tost=0.0, high_tost=0.0, sd=0.0, mde=0.0)
    results["protocols"]["target"]["delta"]["id"] = r
    assert c1_no_id_benefit(results)["n_needed"] is None
    r["nmse"]["sd"] = 0.02
    assert c1_no_id_benefit(results)["n_needed"] > 2


def test_c2_needs_evidence_against_a_gain_to_refute():
    assert c2_ood_improves(build(improved=SHIFTS[:4], removed=ALL))["verdict"] == SUPPORTED
    assert c2_ood_improves(build(improved=SHIFTS[:2], removed=ALL))["verdict"] == INCONCLUSIVE
    verdict = c2_ood_improves(build(removed=ALL))  # every shift: gain CI [-0.01, 0.01] excludes δ = 0.05 of NMSE 1
    assert verdict["verdict"] == REFUTED and "gain on 0/6" in verdict["evidence"]
    wide = build(removed=ALL)
    for s in SHIFTS:
        wide["protocols"]["target"]["delta"][s] = row(0.0, -0.2, 0.2)  # no significant change, CI too wide
    verdict = c2_ood_improves(wide)
    assert verdict["verdict"] == INCONCLUSIVE and verdict["numbers"]["undecided"] == SHIFTS


def _accuracy(results: dict, full: dict[str, float]) -> dict:
    """``results`` rewritten as an accuracy study (the same CIs, as gains) with these full-model accuracies."""
    for dist, r in results["protocols"]["target"]["delta"].items():
        acc = dict(r["nmse"], full=full[dist], pruned=full[dist] - r["nmse"]["mean"])
        acc.update(mean=-r["nmse"]["mean"], low=-r["nmse"]["high"], high=-r["nmse"]["low"])
        r.clear()
        r["acc"] = acc
    results["protocols"]["from-id"]["delta"] = copy.deepcopy(results["protocols"]["target"]["delta"])
    results.update(primary_metric="acc", smallest_effect={"relative": 0.05, "points": 0.01})
    return results


def test_a_full_model_at_chance_or_at_one_is_no_evidence_against_a_gain():
    at_chance = {d: 0.25 for d in ALL}
    results = _accuracy(build(removed=ALL), at_chance)
    for r in results["protocols"]["target"]["delta"].values():
        r["acc"].update(low=-0.002, high=0.002)  # every gain excluded beyond δ = 0.01: evidence against, normally
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
    for r in near_one["protocols"]["target"]["delta"].values():
        r["acc"].update(low=-0.002, high=0.002)
    assert c1_no_id_benefit(near_one)["evidence"].startswith("ceiling")
    assert c2_ood_improves(near_one)["numbers"]["outcomes"]["s1"] == "at ceiling"


def test_c1_and_c2_do_not_count_searches_that_removed_nothing():
    results = build(removed=("s1", "s2"))  # the ID search and four shifts' searches kept every block
    results["protocols"]["target"]["delta"]["id"] = row(0.0, 0.0, 0.0, full=0.1)
    c1 = c1_no_id_benefit(results)
    assert c1["verdict"] == INCONCLUSIVE and "never tested" in c1["evidence"]
    c2 = c2_ood_improves(results)  # s1 and s2 alone are tested: their CIs exclude a gain of δ
    assert c2["verdict"] == REFUTED and c2["numbers"]["untested"] == SHIFTS[2:]
    one = c2_ood_improves(build(improved=("s1",), removed=("s1",)))  # one tested shift, even with a gain
    assert one["verdict"] == INCONCLUSIVE and "too few" in one["evidence"]
    assert c2_ood_improves(build(removed=()))["verdict"] == INCONCLUSIVE


def test_c3_compares_distortion_with_the_noise_floor():
    assert c3_ood_distorts(build(d_full={s: 1.0 for s in SHIFTS}))["verdict"] == SUPPORTED  # 10x floor
    assert c3_ood_distorts(build(d_full={s: 0.2 for s in SHIFTS}))["verdict"] == REFUTED  # 2x floor


def test_c4_realignment_and_the_settle_case():
    closer = c4_realigns(build(removed=SHIFTS))  # D fell in all 6 pairs: sign test p = 2/64
    assert closer["verdict"] == SUPPORTED and closer["numbers"]["p_value"] == pytest.approx(2 / 64)
    assert "profiles closer but OOD not better: s1, s2, s3, s4, s5, s6" in closer["settle_case"]
    farther = c4_realigns(build(removed=SHIFTS, d_pruned={s: 2.0 for s in SHIFTS}, improved=("s1",)))
    assert farther["verdict"] == REFUTED and farther["numbers"]["median_ratio"] == pytest.approx(2.0)
    assert "profiles not closer: s1, s2" in farther["settle_case"]
    assert c4_realigns(build(removed=()))["verdict"] == INCONCLUSIVE


def test_c4_needs_a_significant_majority_of_pairs():
    few = c4_realigns(build(removed=("s1", "s2")))  # D fell in 2/2 pairs: p = 0.5
    assert few["verdict"] == INCONCLUSIVE and "from 6 pairs on" in few["evidence"]
    mixed = build(removed=SHIFTS, d_pruned={s: 2.0 if s in ("s1", "s2") else 0.5 for s in SHIFTS})
    verdict = c4_realigns(mixed)  # 4 fell, 2 rose: the old majority rule said "supported"
    assert verdict["verdict"] == INCONCLUSIVE and "4/6" in verdict["evidence"] and "rose in 2" in verdict["evidence"]
    tied = c4_realigns(build(removed=SHIFTS, d_pruned={s: 1.0 for s in SHIFTS}))  # ties carry no sign
    assert tied["verdict"] == INCONCLUSIVE and tied["numbers"]["p_value"] == 1.0


def edges_results(changes: list[float], floor: float = 0.1) -> dict:
    """A graph study's edges block: one shift, one seed per change of D (after - before), noise floor ``floor``."""
    per_seed = {str(i): {"geometry": {"erm": {"noise_floor": floor, "s1": 1.0},
                                      "prune": {"noise_floor": floor, "s1": 1.0 + c}}}
                for i, c in enumerate(changes)}
    return {"protocols": {"target": {"delta": {"id": {}, "s1": {}}}}, "edges": {
        "per_seed": per_seed, "geometry": {"erm": {"s1": 1.0}, "prune": {"s1": 1.0 + sum(changes) / len(changes)}}}}


def test_g1_counts_moves_beyond_the_noise_floor_with_a_sign_test():
    assert g1_edge_pruning_realigns(edges_results([-0.5] * 6))["verdict"] == SUPPORTED
    assert g1_edge_pruning_realigns(edges_results([+0.5] * 6))["verdict"] == REFUTED
    few = g1_edge_pruning_realigns(edges_results([-0.5, +0.5, +0.5, +0.5, +0.5, +0.5, 0.0, 0.0, 0.0]))
    assert few["verdict"] == INCONCLUSIVE and "rose beyond it in 5 (sign test p 0.219)" in few["evidence"]
    noise = g1_edge_pruning_realigns(edges_results([+0.05] * 9))  # every change within the floor
    assert noise["verdict"] == INCONCLUSIVE and noise["numbers"]["p_value"] == 1.0


def test_sign_test_matches_the_exact_binomial():
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 6), (2, 6), (5, 6), (9, 10), (10, 13), (3, 3), (7, 20)]:
        assert sign_test(k, n) == pytest.approx(scipy_stats.binomtest(k, n, 0.5).pvalue, rel=1e-9)


def sweep(d_slope: float):
    return [{"alpha": a, "score": -1.0 - a, "D": 1.0 + d_slope * a} for a in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)]


def test_c5_needs_monotone_sweeps_and_recovery_by_norm_matching():
    results = build(improved=("s1",))
    matching = {"ood_full": -2.0, "ood_pruned": -1.0, "ood_matched": -1.5, "id_full": -0.1, "id_pushed": -0.3}
    results["interventions"] = {"s1": {"sweep_removed": {"0": sweep(1.0)}, "sweep_control": {"0": sweep(-1.0)},
                                       "norm_matching": {"0": matching}}}
    verdict = c5_causal(results)
    assert verdict["verdict"] == SUPPORTED and verdict["numbers"]["recovered"] == [pytest.approx(0.5)]
    results["interventions"]["s1"]["sweep_removed"]["0"] = sweep(-1.0)  # D rises as the score rises
    results["interventions"]["s1"]["norm_matching"]["0"] = {**matching, "ood_matched": -2.5}
    assert c5_causal(results)["verdict"] == REFUTED
    assert c5_causal(build())["verdict"] == INCONCLUSIVE
    results["interventions"]["s1"]["norm_matching"]["0"] = {**matching, "ood_pruned": -2.5}  # pruning lost
    no_gain = c5_causal(results)
    assert no_gain["verdict"] == INCONCLUSIVE and "no gain for norm matching to recover" in no_gain["evidence"]
    del results["interventions"]["s1"]["norm_matching"]["0"]["ood_matched"]  # matching not run (text)
    assert "not run" in c5_causal(results)["evidence"]


def test_c5_tests_the_cause_of_a_held_out_gain_only():
    """Sweeps and norm matching on shifts TALE did not improve are noise: they neither support nor refute C5."""
    matching = {"ood_full": -2.0, "ood_pruned": -1.9, "ood_matched": -2.5, "id_full": -0.1, "id_pushed": -0.3}
    refuting = {"sweep_removed": {"0": sweep(-1.0)}, "sweep_control": {"0": sweep(-1.0)},
                "norm_matching": {"0": matching}}
    results = build(improved=())
    results["interventions"] = {"s1": refuting}
    no_gain = c5_causal(results)
    assert no_gain["verdict"] == INCONCLUSIVE and "no gain whose cause" in no_gain["evidence"]
    results = build(improved=("s2",))
    results["interventions"] = {"s1": refuting}  # the improved shift had no intervention
    assert c5_causal(results)["verdict"] == INCONCLUSIVE
    results["interventions"]["s2"] = refuting
    assert c5_causal(results)["verdict"] == REFUTED


def test_c7_flags_gains_that_come_from_shrinking_predictions():
    results = build(improved=("s1",))
    assert c7_not_tamer(results)["verdict"] == SUPPORTED
    results["protocols"]["target"]["pruned"]["s1"]["shrinkage_slope"] = 0.5
    assert c7_not_tamer(results)["verdict"] == REFUTED
    assert c7_not_tamer(build())["verdict"] == INCONCLUSIVE


def test_c8_rank_correlation_between_distortion_and_drop():
    ranks = {s: float(i) for i, s in enumerate(SHIFTS)}
    assert c8_distortion_predicts(build(d_full=ranks, drop=ranks))["verdict"] == SUPPORTED
    reversed_drop = {s: -v for s, v in ranks.items()}
    assert c8_distortion_predicts(build(d_full=ranks, drop=reversed_drop))["verdict"] == REFUTED
    overlap = c8_distortion_predicts(build(d_full=ranks, drop=ranks))["numbers"]["overlap"]
    assert overlap["hits"] == 1 and overlap["random_expectation"] == pytest.approx(0.25)  # block 2 removed


def test_spearman_with_p_matches_known_values():
    rho, p = spearman_with_p([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7])
    assert rho == pytest.approx(1.0) and p < 0.01
    rho, p = spearman_with_p([1, 2, 3, 4], [2, 1, 4, 3])
    assert rho == pytest.approx(0.6) and p > 0.2


def test_c9_weight_pruning_control():
    results = build(improved=("s1",))
    results["comparisons"] = {"s1": {"magnitude": row(), "wanda": row()}}
    assert c9_needs_layer_removal(results)["verdict"] == SUPPORTED
    results["comparisons"]["s1"]["magnitude"] = row(-0.2, -0.3, -0.1, improved=True)
    results["comparisons"]["s1"]["wanda"] = row(-0.2, -0.3, -0.1, improved=True)
    assert c9_needs_layer_removal(results)["verdict"] == REFUTED
    assert c9_needs_layer_removal(build())["verdict"] == INCONCLUSIVE


def test_every_claim_gets_a_verdict():
    out = verdicts(build(improved=("s1",)))
    assert list(out) == [f"C{i}" for i in range(1, 10)]
    assert all(v["verdict"] in (SUPPORTED, REFUTED, INCONCLUSIVE) and v["evidence"] for v in out.values())


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
