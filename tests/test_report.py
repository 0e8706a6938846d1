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
from tapioca.report.report import render_markdown, section_claims, write_report
from tapioca.study.steps import run_study

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DISTS = ("id", "x_scale_3", "degree_4")
TINY = ["model.n_layer=3", "model.n_embd=16", "train.steps=20", "train.warmup_steps=2", "pruning.n_select=32",
        "pruning.epsilon=0.5", "evaluation.n_heldout=32", "evaluation.n_bootstrap=200", "evaluation.seeds=[0,1]",
        "geometry.n_prompts=16", "run.threads=1",
        "task.shifts={x_scale_3: {x_scale: 3.0}, degree_4: {degrees: [4]}}"]
if "controls" in {f.name for f in dataclasses.fields(GeometryConfig)}:
    TINY.append("geometry.controls=false")  # the report's optional blocks are injected below instead
ALWAYS = ("scores_nmse.png", "scores_tol_acc.png", "profiles.png", "distortion_vs_drop.png", "reliability.png",
          "attribution.png")
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
    assert "| claim | statement | verdict | evidence |" in md
    for claim, entry in (_results(run_dir).get("claims") or {}).items():
        assert f"| {claim} |" in md and f"**{entry['verdict']}**" in md
    for png in report.glob("*.png"):
        assert f"]({png.name})" in md
    assert "noise floor" in md and "least squares" in md


def test_claims_table_says_so_when_claims_are_absent(run_dir):
    results = _results(run_dir)
    results.pop("claims", None)
    md = render_markdown(section_claims(results))
    assert "no `claims` block" in md
    assert "| claim | statement | verdict | evidence |" in md
    assert md.count("| not assessed |") == 9


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
    assert html_text.count('src="data:image/png;base64,') == len(ALWAYS) + len(OPTIONAL)
