"""Depth and training-length ladders: grouping scales, training-curve status, attribution overlap against
chance, and a tiny multi-scale study that forms both ladders, with its report."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from tapioca.config import load_config, scale_config
from tapioca.report.claims import c6_scales, chance_of_overlap
from tapioca.report.report import write_report
from tapioca.models.training import curve_status
from tapioca.report.ladders import answer, ladders, relative_positions, shift_counts, training_status
from tapioca.report.ladders_report import plot_training_curves
from tapioca.study.steps import run_study

from test_study import TINY, quiet


def _scale(blocks: int, steps: int, width: int = 64) -> dict:
    return {"kind": "testbed", "n_blocks": blocks, "train_steps": steps, "n_embd": width}


def test_ladders_group_scales_by_what_varies():
    scales = {"L4": _scale(4, 5000), "L8": _scale(8, 5000), "L16": _scale(16, 5000),
              "L4-long": _scale(4, 20000), "L4-short": _scale(4, 2500), "wide": _scale(8, 5000, width=128)}
    found = ladders(scales)
    assert found["depth"] == ["L4", "L8", "L16"]  # sorted by depth; the other width is not on it
    assert found["training"] == ["L4-short", "L4", "L4-long"]  # sorted by steps
    assert ladders({"a": _scale(4, 5000), "b": _scale(8, 20000)}) == {}  # nothing varies alone
    assert ladders({"a": {"kind": "lm", "n_blocks": 24}, "b": {"kind": "lm", "n_blocks": 30}}) == {}
    flat = {"L4-flat": {**_scale(4, 21000), "until_flat": True}, "L8-flat": {**_scale(8, 34000), "until_flat": True},
            "L4": _scale(4, 5000)}
    assert ladders(flat)["depth"] == ["L4-flat", "L8-flat"]  # trained until flat: the rule is fixed, not the steps
    assert ladders({**flat, "L8": _scale(8, 5000), "L8-10k": _scale(8, 10000)})["training"] == ["L8", "L8-10k", "L8-flat"]


def test_curve_status_flat_improving_or_not_recorded():
    flat = [[s, 0.10 if s < 5000 else 0.099] for s in range(500, 10001, 500)]
    assert curve_status(flat)["status"] == "flat"
    falling = [[s, 1.0 / s] for s in range(500, 10001, 500)]  # halves when the steps double
    status = curve_status(falling)
    assert status["status"] == "improving" and status["last_gain"] == pytest.approx(1 - 7500 / 10000, rel=0.05)
    assert curve_status([[500, 0.1], [1000, 0.05]])["status"] == "not recorded"
    assert curve_status([])["status"] == "not recorded"
    summary = {"training": {"0": {"id_curve": flat}, "1": {"id_curve": falling}, "2": None}}
    assert training_status(summary).startswith("improving")
    assert training_status({"training": {"0": {"id_curve": []}}}) == "not recorded"


def test_training_status_names_the_stop_rule_when_it_ended_every_seed():
    """A rung stopped by train.stop_when_flat reads as stopped flat even if its last quarter held a new best."""
    falling = [[s, 1.0 / s] for s in range(500, 10001, 500)]
    both = {"training": {"0": {"id_curve": falling, "stopped_flat": 10000},
                         "1": {"id_curve": falling, "stopped_flat": 9500}}}
    status = training_status(both)
    assert status.startswith("stopped flat at step 9,500, 10,000") and "25.0 % in the last quarter" in status
    one = {"training": {"0": {"id_curve": falling, "stopped_flat": 10000}, "1": {"id_curve": falling}}}
    assert training_status(one).startswith("improving") and "stopped flat at step 10,000" in training_status(one)
    swinging = {"training": {"0": {"id_curve": [[500, 0.3], [1000, 0.1], [1500, 0.29]], "stopped_flat": 1500},
                             "1": {"id_curve": falling, "stopped_flat": 10000}}}
    assert training_status(swinging).endswith("last checkpoint 2.9×, 1.0× the curve's best)")  # ordered by stop


def _brute_force(hits: int, sizes: list[int], n: int) -> float:
    """P(total overlap >= hits), enumerating every choice of k blocks per case (marked blocks: 0..k-1)."""
    per_case = [[len(set(c) & set(range(k))) for c in itertools.combinations(range(n), k)] for k in sizes]
    outcomes = [sum(o) for o in itertools.product(*per_case)]
    return sum(o >= hits for o in outcomes) / len(outcomes)


@pytest.mark.parametrize("hits, sizes, n", [(0, [1, 2], 5), (1, [1, 2], 5), (2, [2, 2], 6), (3, [1, 2, 1], 4),
                                            (5, [2, 2], 6)])
def test_chance_of_overlap_is_the_exact_hypergeometric_tail(hits, sizes, n):
    assert chance_of_overlap(hits, [[k, n] for k in sizes]) == pytest.approx(_brute_force(hits, sizes, n), abs=1e-12)


def test_positions_and_counts():
    summary = {"n_blocks": 4, "removed": {"x": {"0": [0, 3], "1": []}, "y": {"0": [1]}}}
    assert sorted(relative_positions(summary)) == [0.125, 0.375, 0.875]
    deltas = {"id": {"improved": True}, "a": {"improved": True, "worse": False}, "b": {"worse": True},
              "c": {"improved": False, "worse": False}}
    assert shift_counts(deltas) == {"gain": 1, "harm": 1, "neither": 1, "shifts": 3}


LADDERS = ("scales={d2: {model: {n_layer: 2}}, d3: {model: {n_layer: 3}}, "
           "d2-long: {model: {n_layer: 2}, train: {steps: 40}}}")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    out = tmp_path_factory.mktemp("ladders")
    cfg = load_config(None, [*TINY, LADDERS, "train.checkpoint_every=5", "geometry.controls=false",
                             "evaluation.seeds=[0]"])
    return out, cfg, run_study(cfg, out, progress=False, log=quiet)


def test_study_finds_both_ladders_and_decides_c6_on_depth(both):
    out, cfg, results = both
    assert results["ladders"] == {"depth": ["d2", "d3"], "training": ["d2", "d2-long"]}
    depth_only = {n: results["scales"][n] for n in ("d2", "d3")}
    assert results["claims"]["C6"] == c6_scales({"kind": "testbed", "scales": depth_only})
    for name in ("d2", "d3", "d2-long"):
        s = results["scales"][name]
        single = json.loads((out / "scales" / name / "results.json").read_text())
        assert s["train_steps"] == scale_config(cfg, name).train.steps
        assert json.dumps(s["in_sample_delta"], sort_keys=True) == json.dumps(  # NaN-safe
            {d: r["nmse"] for d, r in single["protocols"]["in-sample"]["delta"].items()}, sort_keys=True)
        assert json.dumps(s["claims_in_sample"], sort_keys=True) == json.dumps(single["claims_in_sample"], sort_keys=True)
        curve = s["training"]["0"]["id_curve"]
        assert [step for step, _ in curve] == list(range(5, s["train_steps"] + 1, 5))
        assert all(math.isfinite(v) for _, v in curve)
        shifts = [d for d in single["removed"]["target"] if d != "id"]  # attribution is measured on shifts
        assert len(s["attribution_overlap"]["cases"]) == sum(bool(single["removed"]["target"][d]["0"]) for d in shifts)


def test_report_answers_each_ladder_with_a_figure(both):
    out, _, results = both
    report = write_report(out)
    md = (report / "report.md").read_text()
    assert "Depth ladder" in md and "Training-length ladder" in md
    assert md.count("**Answer (as measured):**") == 2
    assert answer(results, "depth") in md
    assert "decided over the depth ladder: d2, d3" in md
    for name in ("depth.png", "training.png", "training_curves.png", "scales.png"):
        assert (report / name).stat().st_size > 1000
    assert md.index("Depth ladder") < md.index("Verdicts per scale")  # the answers lead


def _rung(value: int, held: tuple[int, int], inside: int, removed: bool, hits: int = 0) -> dict:
    counts = lambda gain, harm: {"id": {}, **{f"s{i}": {"improved": i < gain, "worse": gain <= i < gain + harm}
                                             for i in range(4)}}
    return {"kind": "testbed", "n_blocks": value, "train_steps": 5000, "n_embd": 64,
            "quality": {"model_id_nmse": {"mean": 0.1, "low": 0.1, "high": 0.1}}, "claims": {},
            "target_delta": counts(*held), "in_sample_delta": counts(inside, 0),
            "removed": {"s0": {"0": [0] if removed else []}},
            "attribution_overlap": {"hits": hits, "random_expectation": 1 / value, "cases": [[1, value]] if removed
                                    else [], "p": None}}


def test_answer_says_no_effect_not_enough_data_and_the_protocol_gap_plainly():
    results = {"scales": {"a": _rung(4, (0, 0), 2, True, hits=1), "b": _rung(8, (0, 1), 0, False)}}
    results["ladders"] = ladders(results["scales"])
    text = answer(results, "depth")
    assert text.startswith("No OOD gain held out at any rung (4, 8 blocks)")
    assert "harmed OOD at 8 blocks (1/4 shifts)" in text
    assert "in-sample protocol it 'gained' at 4 blocks (2/4 shifts)" in text
    assert "Not enough data at 8 blocks" in text
    assert "1 times against 0.2 expected by chance (pooled p = 0.250)" in text
    results["scales"]["b"] = _rung(8, (3, 0), 0, True)
    assert answer(results, "depth").startswith("Held out, TALE improved OOD at 8 blocks (3/4 shifts)")
    assert "No training ladder" in answer(results, "training")


def test_a_least_squares_reference_at_rounding_level_is_written_not_drawn():
    from tapioca.report.ladders_report import on_scale
    assert not on_scale(2e-15, 0.01) and not on_scale(None, 0.01) and not on_scale(0.0, 0.01)
    assert on_scale(0.005, 0.01) and on_scale(1e-5, 0.01)


def test_training_curves_mark_where_the_stop_rule_ended_a_training():
    curve = [[s, 1.0 / s] for s in range(500, 5001, 500)]
    scale = {"quality": {}, "training": {"0": {"id_curve": curve, "stopped_flat": 5000}, "1": {"id_curve": curve}}}
    ax = plot_training_curves({"scales": {"L4": scale}}).axes[0]
    crosses = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [5000]  # only the seed that stopped flat
    assert "stopped flat (the kept model)" in [t.get_text() for t in ax.get_legend().get_texts()]
    unstopped = {"quality": {}, "training": {"0": {"id_curve": curve}}}
    ax = plot_training_curves({"scales": {"L4": unstopped}}).axes[0]
    assert not [line for line in ax.get_lines() if line.get_marker() == "x"]


def test_training_curves_and_status_name_the_checkpoint_restore_best_kept():
    curve = [[500, 0.3], [1000, 0.1], [1500, 0.2]]
    scale = {"quality": {}, "training": {"0": {"id_curve": curve, "stopped_flat": 1500, "kept_step": 1000}}}
    ax = plot_training_curves({"scales": {"L4": scale}}).axes[0]
    circles = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(circles) == 1 and list(circles[0].get_xydata()[0]) == [1000, 0.1]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "stopped flat" in labels and "stopped flat (the kept model)" not in labels  # the last is not the kept
    assert training_status(scale).endswith("kept the best checkpoint, step 1,000)")
