"""The verdict-calibration benchmark runs, prints one line per claim in its fixed format, and its simulated
worlds are what they claim to be (a strong effect is found, a null one is not)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import verdict_calibration as bench  # noqa: E402

LINE = re.compile(r"^claim=(\w+) null_wrong=\d\.\d{3} mc_se=\d\.\d{3} power_delta=\d\.\d{2} power_2delta=\d\.\d{2}$")


def test_one_line_per_claim_in_the_fixed_format(capsys):
    out = bench.main(["--reps", "4", "--claims", "C1,C3,C8"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("claim=")]
    assert [LINE.match(line).group(1) for line in lines] == ["C1", "C3", "C8"]
    assert all(0.0 <= r["null_wrong"] <= 1.0 and 0.0 <= r["power_2delta"] <= 1.0 for r in out.values())


def test_the_worlds_have_the_truth_they_are_built_with():
    d = bench.Design()
    assert bench.rate(bench.c1_world(-4.0), bench.SUPPORTED, 10, d, 0) >= 0.9  # ID clearly worse: no ID benefit
    assert bench.rate(bench.c1_world(6.0), bench.REFUTED, 10, d, 0) >= 0.9  # a large ID gain
    assert bench.rate(bench.c2_world([6.0] * 6), bench.SUPPORTED, 10, d, 0) >= 0.9
    assert bench.rate(bench.c8_world(0.99), bench.SUPPORTED, 10, d, 0) >= 0.9
    assert bench.rate(bench.c4_world(-6.0), bench.SUPPORTED, 10, d, 0) >= 0.9
