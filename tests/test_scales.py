"""Multi-scale studies: the scales config, the C6 rule, and a tiny three-scale study with its report."""

from __future__ import annotations

import json

import pytest

from tapioca.report.claims import INCONCLUSIVE, REFUTED, SUPPORTED, c6_scales
from tapioca.config import load_config, scale_config
from tapioca.errors import ConfigError
from tapioca.report.report import write_report
from tapioca.study.steps import run_study
from tapioca.report.summary import format_summary

from test_study import TINY, quiet

SCALES = "scales={s2: {model: {n_layer: 2}}, s3: {model: {n_layer: 3}}, s4: {model: {n_layer: 4}}}"


def test_scale_config_merges_overrides_and_writes_below_the_run_dir():
    cfg = load_config(None, [*TINY, SCALES, "run.out=runs/x"])
    sub = scale_config(cfg, "s4")
    assert sub.model.n_layer == 4 and sub.model.n_embd == cfg.model.n_embd
    assert sub.scales == {} and sub.run.out == "runs/x/scales/s4"
    assert sub.task == cfg.task and sub.evaluation == cfg.evaluation


@pytest.mark.parametrize("bad, message", [
    ("scales={a: {model: {n_layer: 0}}}", "scales.a: model.n_layer"),
    ("scales={a: {model: {depth: 4}}}", "scales.a: model.depth: unknown key"),
    ("scales={a: 4}", "give section overrides"),
    ("scales={'a/b': {model: {n_layer: 4}}}", "names a folder"),
    ("scales={a: {run: {out: elsewhere}}}", "may not set"),
])
def test_bad_scales_are_config_errors_naming_the_scale(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [bad])


def test_scales_yaml_is_three_depths_of_the_default_study():
    cfg = load_config("configs/scales.yaml")
    depths = sorted(scale_config(cfg, name).model.n_layer for name in cfg.scales)
    assert len(depths) >= 3 and len(set(depths)) == len(depths)
    assert all(scale_config(cfg, n).model.n_embd == cfg.model.n_embd for n in cfg.scales)


def _scale(verdicts: dict[str, str]) -> dict:
    return {"claims": {c: {"verdict": v} for c, v in verdicts.items()}}


def test_c6_rule():
    yes = {"C1": SUPPORTED, "C2": SUPPORTED, "C3": SUPPORTED, "C4": SUPPORTED}
    assert c6_scales({})["verdict"] == INCONCLUSIVE
    assert c6_scales({"scales": {"a": _scale(yes), "b": _scale(yes)}})["verdict"] == INCONCLUSIVE  # < 3 scales
    assert c6_scales({"scales": {n: _scale(yes) for n in "abc"}})["verdict"] == SUPPORTED
    mixed = {"a": _scale(yes), "b": _scale(yes), "c": _scale({**yes, "C2": REFUTED})}
    result = c6_scales({"scales": mixed})  # a refutation at α, without the scales' results to re-decide it
    assert result["verdict"] == INCONCLUSIVE and "refuted at α only (C2 at c)" in result["evidence"]
    unsure = {"a": _scale(yes), "b": _scale(yes), "c": _scale({**yes, "C4": INCONCLUSIVE})}
    assert c6_scales({"scales": unsure})["verdict"] == INCONCLUSIVE
    consistent_no = {n: _scale({**yes, "C2": REFUTED}) for n in "abc"}
    result = c6_scales({"scales": consistent_no})
    assert "agree across scales on C1, C2, C3, C4" in result["evidence"]


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    out = tmp_path_factory.mktemp("scales")
    cfg = load_config(None, [*TINY, SCALES, "geometry.controls=false", "evaluation.seeds=[0]"])
    return out, run_study(cfg, out, progress=False, log=quiet)


def test_multi_scale_study_runs_every_scale_and_decides_c6(multi):
    out, results = multi
    assert set(results["scales"]) == {"s2", "s3", "s4"}
    for name, depth in (("s2", 2), ("s3", 3), ("s4", 4)):
        single = json.loads((out / "scales" / name / "results.json").read_text())
        assert single["n_blocks"] == depth == results["scales"][name]["n_blocks"]
        assert json.dumps(results["scales"][name]["claims"], sort_keys=True) == json.dumps(single["claims"], sort_keys=True)  # NaN-safe
        assert json.dumps(results["scales"][name]["target_delta"], sort_keys=True) == json.dumps(
            {d: r["nmse"] for d, r in single["protocols"]["target"]["delta"].items()}, sort_keys=True)  # NaN-safe
    assert results["claims"]["C6"] == c6_scales(results)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert "C6" in format_summary(results)


def test_multi_scale_report_has_a_verdict_per_scale_and_links_each_report(multi):
    out, results = multi
    report = write_report(out)
    md = (report / "report.md").read_text()
    assert "Verdicts per scale" in md and "| claim | s2 | s3 | s4 |" in md
    assert "C6 (consistent across model scales)" in md
    assert (report / "scales.png").is_file()
    for name in ("s2", "s3", "s4"):
        assert (out / "scales" / name / "report" / "report.html").is_file()
        assert f"../scales/{name}/report/report.html" in md
    assert "data:image/png;base64," in (report / "report.html").read_text()
    # the answer leads: findings (C6 in words, one clause per scale), verdicts and the figure before quality
    order = [md.index(h) for h in ("## Findings", "## Verdicts per scale", "## Across scales", "## Model quality",
                                   "## Per-scale reports")]
    assert order == sorted(order)
    findings = md[md.index("## Findings"):md.index("## Verdicts per scale")]
    assert f"C6 (consistent across model scales): {results['claims']['C6']['verdict']}" in findings
    for name, s in results["scales"].items():
        gains = sum(bool(d.get("improved")) for dist, d in s["target_delta"].items() if dist != "id")
        assert f"{name}: TALE improved {gains}/{len(s['target_delta']) - 1} shifts" in findings
    evidence = md[md.index("### Evidence behind"):]
    assert "| scale | claim | evidence |" in evidence  # not the compact verdict style: long evidence wraps


def test_only_some_scales_run_and_finished_ones_join(multi, tmp_path):
    """--scales: only the named scales run; another scale joins from its run directory if it finished with the
    same config, and is left out if it did not finish or its config changed."""
    import shutil

    from tapioca.io import read_json, write_yaml
    from tapioca.config import read_yaml
    from tapioca.study.scales import run_scales

    out, results = multi
    copy = tmp_path / "ladder"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "scales" / "s4")  # never finished
    cfg = load_config(None, [*TINY, SCALES, "geometry.controls=false", "evaluation.seeds=[0]"])
    ran = []

    def fake_study(sub, folder, progress, log):
        ran.append(folder.name)
        return read_json(folder / "results.json")

    logged = []
    partial = run_scales(cfg, copy, False, logged.append, fake_study, only=["s2"])
    assert ran == ["s2"]
    assert set(partial["scales"]) == {"s2", "s3"}
    for key in ("claims", "target_delta", "quality", "removed"):
        assert json.dumps(partial["scales"]["s3"][key]) == json.dumps(results["scales"]["s3"][key])  # NaN-safe
    assert any("s4" in line and "left out" in line for line in logged)

    changed = read_yaml(copy / "scales" / "s3" / "config.yaml")
    changed["train"]["steps"] += 1
    write_yaml(copy / "scales" / "s3" / "config.yaml", changed)
    assert set(run_scales(cfg, copy, False, quiet, fake_study, only=["s2"])["scales"]) == {"s2"}

    with pytest.raises(ConfigError, match="'s9'"):
        run_scales(cfg, copy, False, quiet, fake_study, only=["s9"])
    with pytest.raises(ConfigError, match="--scales needs a config with a scales"):
        run_study(load_config(None, list(TINY)), tmp_path / "single", progress=False, log=quiet, scales=["s2"])


@pytest.mark.parametrize("held,inside,sentence", [
    (True, False, "TALE's OOD gain appears held out at a; in-sample (the paper's protocol) at no scale."),
    (False, False, "TALE's OOD gain appears held out at no scale, nor in-sample (the paper's protocol)."),
    (True, True, "TALE's OOD gain appears held out at a, and in-sample (the paper's protocol) at a."),
])
def test_scale_findings_say_where_the_gain_appears_under_each_protocol(held, inside, sentence):
    from tapioca.report.scales_report import section_scale_findings

    def delta(gain):
        return {"id": {"mean": 0.0, "low": 0.0, "high": 0.0},
                "s1": {"mean": -1.0 if gain else 0.0, "low": -2.0 if gain else -1.0, "high": -0.5 if gain else 1.0,
                       "improved": gain, "worse": False}}

    scale = {"n_blocks": 2, "target_delta": delta(held), "in_sample_delta": delta(inside), "claims": {}}
    text = " ".join(str(b[-1]) for b in section_scale_findings({"scales": {"a": scale}, "claims": {}}))
    assert sentence in text
