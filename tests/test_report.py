"""The study report: plots, markdown and self-contained HTML, from the run directory alone."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from tapioca.config import GeometryConfig, load_config
from tapioca.errors import CheckpointError
from tapioca.report.headline import findings, improvement
from tapioca.report.plots import plot_interventions, sweep_stats, t975
from tapioca.report.summary import format_summary
from tapioca.report.report import claim_c5, render_markdown, section_claims, write_report
from tapioca.study.steps import run_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DISTS = ("id", "x_scale_3", "degree_4")
TINY = ["model.n_layer=3", "model.n_embd=16", "train.steps=20", "train.warmup_steps=2", "pruning.n_select=32",
        "pruning.epsilon=0.5", "evaluation.n_heldout=32", "evaluation.n_bootstrap=200", "evaluation.seeds=[0,1]",
        "geometry.n_prompts=16", "run.threads=1",
        "task.shifts={x_scale_3: {x_scale: 3.0}, degree_4: {degrees: [4]}}"]
if "controls" in {f.name for f in dataclasses.fields(GeometryConfig)}:
    TINY.append("geometry.controls=false")  # the report's optional blocks are injected below instead
ALWAYS = ("headline.png", "scores_nmse.png", "scores_tol_acc.png", "profiles.png", "distortion_vs_drop.png",
          "reliability.png", "attribution.png")
OPTIONAL = {"methods.png": "comparisons", "interventions.png": "interventions"}  # plot -> results.json block


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study")
    run_study(load_config(None, TINY), out, progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return write_report(run_dir)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copied_run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("report"))
    return dst


def _fake_blocks(shifts: list[str]) -> dict:
    sweep = lambda slope: {"0": [{"alpha": a, "score": -1 - slope * a, "D": 0.2 + slope * a} for a in (0, 0.5, 1)],
                           "1": [{"alpha": a, "score": -1.1 - slope * a, "D": 0.3 + slope * a} for a in (0, 0.5, 1)]}
    delta = {"full": 2.0, "pruned": 1.5, "mean": -0.5, "low": -0.8, "high": -0.2, "p_value": 0.01, "p_holm": 0.02,
             "improved": True, "worse": False}
    verdicts = ["supported", "refuted", "inconclusive"]
    return {
        "interventions": {s: {"sweep_removed": sweep(1.0), "sweep_control": sweep(0.1),
                              "norm_matching": {"0": {"ood_full": -2.0, "ood_matched": -1.5, "ood_pruned": -1.2,
                                                      "id_full": -0.5, "id_pushed": -0.9}}} for s in shifts},
        "comparisons": {s: {m: {"nmse": delta, "tol_acc": {**delta, "full": 0.2, "pruned": 0.25}}
                            for m in ("tale", "block_influence", "magnitude")} for s in shifts},
        "claims": {f"C{i}": {"verdict": verdicts[i % 3], "evidence": f"evidence for claim {i}",
                             "numbers": {"rho": 0.5}, "settle_case": "profiles not closer" if i == 4 else None}
                   for i in range(1, 10)},
    }


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_report_writes_markdown_html_and_every_plot(run_dir, report):
    assert (report / "report.md").stat().st_size > 0
    assert (report / "report.html").stat().st_size > 0
    for name in ALWAYS:
        data = (report / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    results = _results(run_dir)
    for name, block in OPTIONAL.items():  # drawn exactly when the study wrote the block
        assert (report / name).exists() == bool(results.get(block)), name


def test_html_is_self_contained(report):
    text = (report / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == len(list(report.glob("*.png")))
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert not re.search(r'href="(?!#)', text)
    assert "<link" not in text and "<script" not in text
    assert "<table>" in text


def test_markdown_lists_distributions_claims_and_links_plots(run_dir, report):
    md = (report / "report.md").read_text()
    for dist in DISTS:
        assert f"| {dist} |" in md
    assert "| claim | statement | held-out verdict |" in md
    for claim, entry in (_results(run_dir).get("claims") or {}).items():
        assert f"| [{claim}](#{claim.lower()}) |" in md and f"**{entry['verdict']}**" in md
        assert f"**Held-out verdict: {entry['verdict']}.** {entry['evidence']}" in md
    for png in report.glob("*.png"):
        assert f"]({png.name})" in md
    assert "noise floor" in md and "least squares" in md


def test_claims_table_says_so_when_claims_are_absent(run_dir):
    results = _results(run_dir)
    results.pop("claims", None)
    results.pop("paper_pattern", None)
    md = render_markdown(section_claims(results))
    assert "no `claims` block" in md
    assert "| claim | statement | held-out verdict |" in md
    assert md.count("| not assessed |") == 9
    assert "not assessed" in findings(results)


def test_report_rebuilds_from_a_copy_of_the_run_dir(run_dir, report, tmp_path):
    copy = _copy(run_dir, tmp_path)
    hidden = run_dir.with_name(run_dir.name + "_hidden")
    run_dir.rename(hidden)  # the original is out of reach while the copy's report is written
    try:
        out = write_report(copy)
    finally:
        hidden.rename(run_dir)
    assert out == copy / "report"
    assert (out / "report.md").read_text() == (report / "report.md").read_text()
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in report.glob("*.png"))


def test_missing_or_corrupt_results_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="results.json"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="results.json"):
        write_report(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"quality": {}}))
    with pytest.raises(CheckpointError, match="results.json"):
        write_report(tmp_path)


def test_optional_sections_render_when_present(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path)
    results = _results(copy)
    results.update(_fake_blocks([d for d in DISTS if d != "id"]))
    (copy / "results.json").write_text(json.dumps(results))
    out = write_report(copy)
    for name in (*ALWAYS, *OPTIONAL):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    md = (out / "report.md").read_text()
    for word in ("supported", "refuted", "inconclusive", "evidence for claim 9", "block_influence", "magnitude"):
        assert word in md
    assert "What would settle it (C4):** profiles not closer" in md
    assert "no `claims` block" not in md
    assert "| x_scale_3 | -2 | -1.5 | -1.2 | -0.5 | -0.9 |" in md  # norm-matching table
    html_text = (out / "report.html").read_text()
    assert html_text.count('src="data:image/png;base64,') == len(list(out.glob("*.png")))
    assert "95% CI over seeds" not in md  # legend text lives in the PNG; the caption names the interval
    assert "t-based 95% interval across seeds" in md


def _with_new_fields(results: dict, pattern_sentence: bool = True) -> dict:
    """results.json with the in-sample protocol, power, optimism, in-sample verdicts, the paper's pattern and the
    robust summary injected (the schema the study writes once it computes them)."""
    results = json.loads(json.dumps(results))
    target = results["protocols"]["target"]
    for data in results["protocols"].values():
        for row in data["delta"].values():
            for d in row.values():
                d.update(mde=0.123, n=64)
    in_sample = json.loads(json.dumps(target["delta"]))
    for dist, row in in_sample.items():
        if dist != "id":
            full = row["nmse"]["full"]
            row["nmse"].update(mean=-0.3 * full, low=-0.4 * full, high=-0.2 * full, improved=True, worse=False)
    results["protocols"]["in-sample"] = {"delta": in_sample, "pruned": target["pruned"], "full": results["full"]}
    results["optimism"] = {d: {"metric": "nmse", "in_sample": 0.3, "held_out": -0.01, "mean": 0.31, "low": 0.2,
                               "high": 0.4, "null_mean": 0.05, "null_q95": 0.1} for d in in_sample}
    results["claims_in_sample"] = {"C1": {"verdict": "supported", "evidence": "in-sample ID evidence",
                                          "numbers": {}, "settle_case": None},
                                   "C2": {"verdict": "supported", "evidence": "in-sample OOD evidence",
                                          "numbers": {}, "settle_case": None}}
    for cid in ("C1", "C2"):
        results["claims"][cid].update(mde=0.0456, n=64, n_needed=987, sesoi=0.01)
    results["robust"] = {d: {"median_full": 0.5, "median_pruned": 0.4, "dominant": [{"seed": 0, "index": 3,
                                                                                      "share": 0.42}],
                             "mean_log_ratio": {"mean": -0.1, "low": -0.2, "high": 0.05}} for d in in_sample}
    if pattern_sentence:
        results["paper_pattern"] = {"in_sample": True, "held_out": False, "sentence": "PATTERN SENTENCE FIRST."}
    return results


def _sections(md: str) -> list[str]:
    return re.findall(r"^#{1,2} (.+)$", md, flags=re.MULTILINE)


def test_report_leads_with_the_answer_and_ends_with_the_setup(report):
    md = (report / "report.md").read_text()
    order = ["tapioca study report", "Findings", "Verdicts"] + [f"C{i} —" for i in range(1, 10)]
    titles = _sections(md)
    found = [next(i for i, t in enumerate(titles) if t.startswith(name)) for name in order]
    assert found == sorted(found) and found[:3] == [0, 1, 2]
    assert titles[-3:] == ["Configuration", "Environment", "Timings"]
    assert md.index("## Verdicts") < md.index("](headline.png)") < md.index("## C1 —")
    findings_text = md.split("## Findings\n\n")[1].split("\n\n")[0]
    assert 2 <= findings_text.count(". ") + 1 <= 6 and "pattern" in findings_text
    html_text = (report / "report.html").read_text()
    marks = ['id="findings"', 'id="verdicts"', "Headline: improvement", 'id="c1"', 'id="c9"', "<h2>Configuration",
             "<h2>Environment", "<h2>Timings"]
    positions = [html_text.index(m) for m in marks]
    assert positions == sorted(positions)
    assert 'class="lead-grid"' in html_text and '<a href="#c2">C2</a>' in html_text


def test_report_renders_the_new_fields(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path)
    results = _with_new_fields(_results(copy))
    results.update(_fake_blocks([d for d in DISTS if d != "id"]))
    for cid in ("C1", "C2"):
        results["claims"][cid].update(mde=0.0456, n=64, n_needed=987, sesoi=0.01)
    (copy / "results.json").write_text(json.dumps(results))
    out = write_report(copy)
    md = (out / "report.md").read_text()
    assert md.split("## Findings\n\n")[1].startswith("PATTERN SENTENCE FIRST.")
    assert "| claim | statement | held-out verdict | in-sample verdict | MDE (n) | n for SESOI (δ) |" in md
    assert "| 0.0456 (64) | 987 (δ 0.01) |" in md
    assert "**In-sample verdict (the paper's protocol): supported.** in-sample OOD evidence" in md
    assert "Orange: in-sample" in md and "not computed by this run" not in md.split("## C1")[0]
    c2 = md.split("## C2 —")[1].split("## C3 —")[0]
    for text in ("### Protocol `in-sample` — NMSE", "| MDE (n) |", "0.123 (n = 64)", "### Optimism of the in-sample",
                 "+0.31 [+0.2, +0.4]", "### Robust summary", "s0#3: 42%", "](scores_nmse.png)"):
        assert text in c2, text
    assert "Optimism: not computed" not in md
    results.pop("paper_pattern")
    text = findings(results)
    assert text.startswith("The paper's pattern — no ID gain, an OOD gain — appears under its own protocol")
    assert "scored in-sample, the same selections improved 2 of 2" in text
    assert "Optimism (in-sample minus held-out gain)" in text
    summary = format_summary(results)  # the terminal summary reads the in-sample protocol too
    assert "protocol in-sample" in summary and "in-sample verdict" in summary


def test_an_old_run_dir_without_the_new_fields_still_renders(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path)
    results = _results(copy)
    for key in ("optimism", "claims_in_sample", "paper_pattern", "robust", "smallest_effect"):
        results.pop(key, None)
    results["protocols"].pop("in-sample", None)
    for data in results["protocols"].values():
        for row in data["delta"].values():
            for d in row.values():
                d.pop("mde", None)
    for claim in results["claims"].values():
        for key in ("mde", "n", "n_needed", "sesoi"):
            claim.pop(key, None)
    (copy / "results.json").write_text(json.dumps(results))
    out = write_report(copy)
    md = (out / "report.md").read_text()
    lead = md.split("## C1 —")[0]
    assert "| claim | statement | held-out verdict |\n" in lead  # no in-sample or power column
    assert "In-sample verdicts and power (MDE, n needed): not computed by this run" in lead
    assert "The in-sample Δ (the paper's protocol) was not computed by this run" in lead
    assert "Optimism: not computed by this run." in md and "Robust summary" not in md
    assert "Protocol `in-sample`" not in md and (out / "headline.png").read_bytes().startswith(PNG_MAGIC)


def test_sweep_interval_is_t_based_across_seeds_and_absent_with_one_seed():
    by_seed = {"0": [{"alpha": 0.0, "score": 1.0, "D": 2.0}, {"alpha": 1.0, "score": 3.0, "D": 1.0}],
               "1": [{"alpha": 0.0, "score": 2.0, "D": 2.0}, {"alpha": 1.0, "score": 5.0, "D": 1.0}]}
    band = sweep_stats(by_seed, "score")
    assert band["alpha"].tolist() == [0.0, 1.0] and band["mean"].tolist() == [1.5, 4.0]
    half = 12.706 * 0.5 ** 0.5 / 2 ** 0.5  # t(0.975, df 1) · sd / √n with sd = √0.5 at α = 0
    assert band["high"][0] - band["mean"][0] == pytest.approx(half, rel=1e-6)
    one = sweep_stats({"0": by_seed["0"]}, "score")
    assert one["n"].tolist() == [1, 1] and all(v != v for v in one["low"])  # NaN: no interval from one seed
    assert t975(30) == pytest.approx(2.042, abs=0.005) and t975(200) == pytest.approx(1.972, abs=0.005)
    one_seed = {"interventions": {"x_scale_3": {"sweep_removed": {"0": by_seed["0"]}, "sweep_control": {}}}}
    assert plot_interventions(one_seed) is not None
    caption = render_markdown(claim_c5(one_seed, {"interventions.png": b""}))
    assert "one seed: the points themselves, no interval" in caption


def test_headline_plots_improvement_so_that_lower_nmse_is_up():
    gain = {"full": 2.0, "mean": -0.5, "low": -0.8, "high": -0.2, "improved": True}
    assert improvement(gain, "nmse") == pytest.approx((25.0, 10.0, 40.0, True))
    assert improvement({**gain, "mean": 0.05, "low": 0.01, "high": 0.09}, "tol_acc")[:3] == pytest.approx((5, 1, 9))


def test_interventions_section_shows_last_token_norm_matching_for_language_models():
    from tapioca.report.report import section_interventions
    seeds = {"0": {"ood_full": -1.0, "ood_matched": -0.5, "ood_pruned": -0.8, "id_full": -0.1, "id_pushed": -0.3},
             "1": {"ood_full": -3.0, "ood_matched": -1.5, "ood_pruned": -1.2, "id_full": -0.3, "id_pushed": -0.5}}
    results = {"kind": "lm", "interventions": {"more_digits": {"norm_matching": seeds}}}
    blocks = section_interventions(results)
    text = " ".join(b[1] for b in blocks if b[0] == "p")
    assert "not run" not in text and "last token" in text
    header, rows = next((b[1], b[2]) for b in blocks if b[0] == "table")
    row = dict(zip(header, rows[0]))
    assert float(row["OOD norm-matched"]) == pytest.approx(-1.0) and float(row["ID pushed"]) == pytest.approx(-0.4)
    assert float(row["OOD full"]) == pytest.approx(-2.0)


def test_interventions_section_says_which_shifts_could_not_be_norm_matched():
    from tapioca.report.report import section_interventions
    skipped = {"0": {"ood_full": -1.0, "ood_pruned": -0.8, "id_full": -0.1, "skipped": "prompt lengths differ"}}
    blocks = section_interventions({"interventions": {"more_points": {"norm_matching": skipped}}})
    text = " ".join(b[1] for b in blocks if b[0] == "p")
    assert "per position" in text and "more_points (prompt lengths differ)" in text
    row = next(b[2] for b in blocks if b[0] == "table")[0]
    assert row[2] == "—"
