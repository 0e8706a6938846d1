"""``tapioca check`` on a tiny Llama and a copy pruned "by another tool" (its layer list sliced and saved), with a
multiple-choice task written to JSONL: inferred blocks, Δ rows with CIs and MDEs, verdicts, report files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tapioca.analysis import stats
from tapioca.analysis.calibration import calibration
from tapioca.analysis.evaluation import Evaluation
from tapioca.cli import main
from tapioca.models.hf import HFModel
from tapioca.study.check import (
    ECE_TOLERANCE, paired_ece_bootstrap, verdict_no_id_loss, verdict_not_confidence_artefact, verdict_ood_gain,
)

from conftest import PLANTED, mc_task, plant, relabel, tiny_lm

KEEP = [i for i in range(4) if i != PLANTED]


def write_task(task, path: Path) -> dict:
    """The task's questions as JSONL rows (q, c, a, s) and the lm.task section that reads them."""
    with open(path, "w") as f:
        for dist, pool in task.source.examples.items():
            for ex in pool:
                f.write(json.dumps({"q": ex.question, "c": list(ex.choices), "a": int(ex.answer), "s": dist}) + "\n")
    return {"source": "jsonl", "path": str(path), "n_shots": 0, "mc_format": "letters",
            "columns": {"question": "q", "choices": "c", "answer": "a", "split": "s"},
            "splits": {"id": ["id"], "wide": ["wide"]}}


def save_sliced(lm: HFModel, keep: list[int], folder: Path, perturb: int | None = None) -> Path:
    """What other tools do: slice the decoder layer list, fix the layer count, save_pretrained."""
    model = copy.deepcopy(lm.model)
    model.model.layers = nn.ModuleList([model.model.layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    if perturb is not None:
        with torch.no_grad():
            model.model.layers[perturb].mlp.up_proj.weight.add_(0.01)
    model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """(base folder, sliced folder, perturbed sliced folder, config): the base has a planted harmful block and
    the task is labelled with the answers of the model without it, so removing it helps on ID and OOD."""
    root = tmp_path_factory.mktemp("check")
    lm = tiny_lm(True)
    task = relabel(lm, mc_task(n=100), {PLANTED: 0.0})
    plant(lm, PLANTED)
    base = lm.save(root / "base")
    sliced = save_sliced(lm, KEEP, root / "sliced")
    tuned = save_sliced(lm, KEEP, root / "tuned", perturb=1)
    cfg = {"lm": {"task": write_task(task, root / "items.jsonl"), "n_heldout": 24, "n_profile": 6, "batch_size": 8},
           "evaluation": {"seeds": [0, 1], "n_bootstrap": 500}}
    (root / "task.yaml").write_text(json.dumps(cfg))
    return base, sliced, tuned, root / "task.yaml"


def test_check_of_a_model_pruned_by_another_tool(pair, tmp_path, capsys):
    base, sliced, _, config = pair
    out = tmp_path / "check"
    assert main(["check", "--base", str(base), "--pruned", str(sliced), "--config", str(config),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "check.json").read_text())
    blocks = data["blocks"]
    assert blocks["kept"] == KEEP and blocks["removed"] == [PLANTED] and blocks["ok"] and blocks["rest_equal"]
    assert blocks["provenance"] is None and "inferred from block weights" in blocks["message"]
    for dist in ("id", "wide"):
        row = data["delta"][dist]["acc"]
        assert row["low"] <= row["mean"] <= row["high"] and row["mde"] > 0 and row["n"] == 48
        assert row["mean"] > 0 and row["pruned"] > row["base"]  # removing the planted block helps
        cal = data["calibration"][dist]
        for key in ("delta_ece", "delta_brier", "delta_confidence"):
            assert cal[key]["low"] <= cal[key]["mean"] <= cal[key]["high"]
        assert cal["delta_ece"]["mean"] == pytest.approx(cal["pruned"]["ece"] - cal["base"]["ece"], abs=1e-12)
    tests = [(v["test"], v["scope"]) for v in data["verdicts"]]
    assert tests == [("no ID loss", "id"), ("OOD gain", "wide"), ("not a confidence artefact", "ood")]
    assert data["verdicts"][0]["verdict"] == "supported" and data["verdicts"][1]["verdict"] == "supported"
    assert data["verdicts"][2]["verdict"] in ("supported", "refuted", "inconclusive")
    assert "no ID loss [id]: supported" in printed and "OOD gain [wide]: supported" in printed
    geometry = data["geometry"]
    assert len(geometry["profiles"]["pruned"]["wide"]["norm"]) == 5  # indexed by original block (L + 1)
    norms = geometry["profiles"]["pruned"]["id"]["norm"]
    assert norms[PLANTED + 1] == norms[PLANTED]  # the removed block passes its input through
    assert set(geometry["D"]["base"]) == {"noise_floor", "wide"}
    for name in ("report.md", "report.html", "accuracy.png", "reliability.png", "profiles.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## Verdicts" in report and "keeps original blocks [0, 1, 3]" in report and "ΔECE" in report


def test_check_says_when_it_cannot_infer_the_kept_blocks(pair, tmp_path):
    base, _, tuned, config = pair
    out = tmp_path / "check"
    assert main(["check", "--base", str(base), "--pruned", str(tuned), "--config", str(config), "--out", str(out),
                 "--set", "evaluation.seeds=[0]", "--quiet"]) == 0
    data = json.loads((out / "check.json").read_text())
    assert data["blocks"]["kept"] is None and not data["blocks"]["ok"]
    assert data["blocks"]["message"].startswith("cannot infer: layer 1 of the pruned model matches no original layer")
    assert "skipped" in data["geometry"] and not (out / "profiles.png").exists()
    assert data["delta"]["wide"]["acc"]["n"] == 24 and "Not computed" in (out / "report.md").read_text()


def test_check_reads_tapioca_provenance_and_needs_a_task(pair, tmp_path, capsys):
    from tapioca.api import check, save_pruned

    base, _, _, config = pair
    saved = save_pruned(HFModel.load(base), [PLANTED], tmp_path / "saved", {"search": "manual"})
    data = check(base, saved, config, out=None)
    assert data["blocks"]["kept"] == KEEP and data["blocks"]["provenance_agrees"] is True
    (tmp_path / "empty.yaml").write_text("evaluation: {seeds: [0]}\n")
    assert main(["check", "--base", str(base), "--pruned", str(saved), "--config", str(tmp_path / "empty.yaml"),
                 "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "lm.task: empty" in capsys.readouterr().err


# ---------------------------------------------------------------- statistics and rules


def test_paired_ece_bootstrap_matches_calibration():
    rng = np.random.default_rng(0)
    n = 120
    values = {name: {"confidence": rng.uniform(0.25, 1.0, n), "acc": (rng.random(n) < 0.6).astype(float)}
              for name in ("base", "pruned")}
    for v in values.values():
        v["brier"] = (v["confidence"] - v["acc"]) ** 2
    seeds = np.repeat([0, 1], n // 2)
    cal = {k: calibration(Evaluation({"id": v}, {"id": seeds}, {"id": v["acc"]}, {"id": v["acc"]}))["id"]
           for k, v in values.items()}
    got = paired_ece_bootstrap(values["base"], values["pruned"], seeds, n_resamples=2000)
    assert got["mean"] == pytest.approx(cal["pruned"]["ece"] - cal["base"]["ece"], abs=1e-12)
    assert got["low"] < got["mean"] < got["high"] and 0 < got["p_value"] <= 1
    same = paired_ece_bootstrap(values["base"], values["base"], seeds, n_resamples=200)
    assert same["mean"] == same["low"] == same["high"] == 0.0


def row(mean: float, low: float, high: float, **extra) -> dict:
    """An example-level row on 100 examples whose sd matches the 95 % CI's width (normal approximation)."""
    sd = (high - low) / (2 * 1.96) * 10
    half_tost = 1.645 * sd / 10
    d = stats.DeltaCI(mean, low, high, 0.5, 100, mean - half_tost, mean + half_tost, sd, 0.06).to_dict()
    return {**d, "base": 0.5, "pruned": 0.5 + mean, "p_holm": extra.pop("p_holm", 0.5), "improved": False,
            "worse": False, **extra}


@pytest.mark.parametrize("r, verdict", [
    (row(0.0, -0.005, 0.005), "supported"),
    (row(-0.004, -0.008, -0.001), "supported"),  # significant but smaller than δ = 1 point
    (row(-0.05, -0.08, -0.02), "refuted"),
    (row(-0.02, -0.04, -0.005), "refuted"),  # significant, and a loss of δ not excluded
    (row(0.0, -0.05, 0.05), "inconclusive"),
])
def test_no_id_loss_rule(r, verdict):
    got = verdict_no_id_loss(r, 0.01)
    assert got["verdict"] == verdict and got["test"] == "no ID loss"
    if verdict == "inconclusive":
        assert "MDE" in got["evidence"]


def test_a_base_model_at_chance_or_at_one_makes_no_loss_and_no_gain_inconclusive():
    at_chance = {"base": 0.25, "pruned": 0.25}
    assert verdict_no_id_loss(row(0.0, -0.005, 0.005), 0.01)["verdict"] == "supported"  # base 0.5: real evidence
    floor = verdict_no_id_loss(row(0.0, -0.005, 0.005, **at_chance), 0.01, chance=0.25)
    assert floor["verdict"] == "inconclusive" and floor["evidence"].startswith("floor")
    assert verdict_no_id_loss(row(-0.05, -0.08, -0.02, **at_chance), 0.01, 0.25)["verdict"] == "refuted"
    for r in (row(0.0, -0.01, 0.008, **at_chance), row(-0.1, -0.15, -0.05, worse=True, p_holm=0.01, **at_chance)):
        got = verdict_ood_gain("far", r, 0.01, chance=0.25)
        assert got["verdict"] == "inconclusive" and got["numbers"]["room"] == "floor"
    assert verdict_ood_gain("far", row(0.1, 0.05, 0.15, improved=True, p_holm=0.01, **at_chance), 0.01,
                            0.25)["verdict"] == "supported"
    top = {"base": 0.995, "pruned": 0.995}
    assert verdict_ood_gain("near", row(0.0, -0.01, 0.008, **top), 0.01, 0.25)["numbers"]["room"] == "ceiling"
    assert verdict_ood_gain("near", row(-0.1, -0.15, -0.05, worse=True, p_holm=0.01, **top), 0.01,
                            0.25)["verdict"] == "refuted"  # a real loss from the top


def test_ood_gain_and_confidence_artefact_rules():
    gain = verdict_ood_gain("wide", row(0.1, 0.05, 0.15, improved=True, p_holm=0.01), 0.01)
    worse = verdict_ood_gain("far", row(-0.1, -0.15, -0.05, worse=True, p_holm=0.01), 0.01)
    none = verdict_ood_gain("near", row(0.0, -0.01, 0.008), 0.01)  # TOST upper end below δ
    open_ = verdict_ood_gain("mid", row(0.0, -0.1, 0.1), 0.01)
    assert [v["verdict"] for v in (gain, worse, none, open_)] == ["supported", "refuted", "refuted", "inconclusive"]

    def cal(ece: tuple, conf: tuple) -> dict:
        return {"delta_ece": dict(zip(("mean", "low", "high"), ece)),
                "delta_confidence": dict(zip(("mean", "low", "high"), conf))}

    fine = cal((0.0, -0.01, 0.01), (0.0, -0.02, 0.02))
    assert verdict_not_confidence_artefact([gain], {"wide": fine})["verdict"] == "supported"
    worse_ece = cal((0.1, ECE_TOLERANCE + 0.01, 0.2), (0.0, -0.02, 0.02))
    assert verdict_not_confidence_artefact([gain], {"wide": worse_ece})["verdict"] == "refuted"
    tamer = cal((0.0, -0.01, 0.01), (-0.2, -0.3, -0.1))
    assert verdict_not_confidence_artefact([gain], {"wide": tamer})["verdict"] == "refuted"
    wide = cal((0.0, -0.1, 0.1), (0.0, -0.1, 0.1))
    assert verdict_not_confidence_artefact([gain], {"wide": wide})["verdict"] == "inconclusive"
    assert "no gain to explain" in verdict_not_confidence_artefact([open_], {})["evidence"]
