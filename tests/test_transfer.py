"""`tapioca transfer`: the sinusoid family and training mixtures, the transfer config, the verdict rules, a tiny
testbed transfer end to end (files, matrix, diagonal, resume, report, CLI) and a tiny language-model transfer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tapioca.study.steps as steps
import tapioca.study.transfer as transfer
from tapioca.cli import main
from tapioca.config import Config, SamplerParams, TaskConfig, load_config, to_dict, transfer_config
from tapioca.errors import ConfigError
from tapioca.models.gates import removal_gates
from tapioca.models.icl import load_model
from tapioca.models.training import find_pretrained
from tapioca.tasks.base import evaluate
from tapioca.tasks.polyreg import PolyBatch, PolyRegTask, sample_prompts, split_seed, y_variance
from tapioca.tasks.testbed import TestbedWorkload
from tapioca.study.transfer import (
    AT_LIMIT, HARMS, HELPS, NO_EFFECT, NOT_ENOUGH, NOTHING_REMOVED, TransferTask, cell_verdict, load_transfer_config,
    run_transfer,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=3", "model.n_embd=16", "model.n_positions=32", "task.sampler.n_points=11", "train.steps=12",
        "train.warmup_steps=2", "train.checkpoint_every=6", "train.curriculum_interval=2", "train.batch_size=16",
        "evaluation.n_heldout=32", "evaluation.seeds=[0,1]", "evaluation.n_bootstrap=200", "pruning.n_select=16",
        "pruning.epsilon=5.0", "pruning.max_drop=1", "pruning.choose=final", "run.threads=1",
        "transfer.tasks.polynomial.task.shifts={x_scale_2: {x_scale: 2.0}}",
        "transfer.tasks.sinusoid.task.shifts={harmonic_5: {degrees: [5]}}"]


def quiet(msg: str) -> None:
    pass


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the default polynomial prompts are unchanged

def _hash(batch: PolyBatch) -> str:
    data = batch.xs.numpy().tobytes() + batch.ys.numpy().tobytes() + batch.degrees.numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


# computed with the code before sampler families existed (the same prompts must come out bit for bit)
OLD_HASHES = {"id": ("3af19f15546e1228", "de540309fb483158"), "x_scale_2": ("4ad884ace74931cb", "d0b2fbe16d0c02b2"),
              "uniform_x": ("0711635fc4deffa7", "0670aa615c3ebc06"), "degree_5": ("dc97dedba43c7c1f", "1f6a729a6c52d302"),
              "noise_0.5": ("c5c366ee2614326f", "5481cb918f9692b3"), "more_points": ("b86d8cc3163c0a3d", "e8e211f7a499143c")}


def test_default_polynomial_prompts_are_bit_identical_to_before_families() -> None:
    task = PolyRegTask(TaskConfig())
    batch = task.data("id", "heldout", 0, 4)
    assert batch.xs[:, 0].tolist() == [1.7592442035675049, 0.8483617901802063, 0.31624969840049744,
                                       -0.13267694413661957]
    assert batch.ys[:, -1].tolist() == [0.28311634063720703, -1.0807814598083496, 6.316183567047119,
                                        0.15889307856559753]
    assert batch.degrees.tolist() == [3, 1, 3, 2]
    for dist, (heldout, select) in OLD_HASHES.items():
        assert _hash(task.data(dist, "heldout", 0, 64)) == heldout, dist
        assert _hash(task.data(dist, "select", 1, 16)) == select, dist
    train = sample_prompts(task.params("id"), 64, gen(split_seed(0, "train-step-5", "train")))
    assert _hash(train) == "0b27b0fd63f11473"  # training batches too
    assert task.y_var == 9.0


def test_families_at_default_stay_out_of_saved_configs_and_fingerprints() -> None:
    tree = to_dict(Config())
    assert "families" not in tree["task"]["sampler"] and "transfer" not in tree
    assert find_pretrained(load_config(None, []), 0) is not None  # the shipped checkpoints still match
    mixed = load_config(None, ["task.sampler.families=[polynomial, sinusoid]"])
    assert to_dict(mixed)["task"]["sampler"]["families"] == ["polynomial", "sinusoid"]
    assert find_pretrained(mixed, 0) is None  # a mixture model is trained, never taken from the zoo


# ---------------------------------------------------------------- the sinusoid family and mixtures

def _fit_error(batch: PolyBatch, basis: str, degree: int) -> float:
    """Relative residual of a least-squares fit of every prompt on a polynomial or trigonometric basis."""
    xs, ys = batch.xs.double(), batch.ys.double()
    if basis == "polynomial":
        design = xs[..., None] ** torch.arange(degree + 1, dtype=torch.double)
    else:
        k = torch.arange(1, degree + 1, dtype=torch.double)
        design = torch.cat([torch.sin(xs[..., None] * k), torch.cos(xs[..., None] * k)], -1)
    coefs = torch.linalg.lstsq(design, ys[..., None], driver="gelsd").solution
    resid = (design @ coefs)[..., 0] - ys
    return float(resid.square().mean(1).sqrt().max() / ys.abs().mean())


def test_sinusoid_prompts_are_trigonometric_polynomials_of_unit_variance() -> None:
    params = SamplerParams(families=("sinusoid",))
    batch = sample_prompts(params, 20_000, gen(0))
    assert set(batch.degrees.tolist()) == {1, 2, 3}
    assert abs(float(batch.ys.mean())) < 0.02 and abs(float(batch.ys.var()) - 1.0) < 0.03
    assert y_variance(params) == 1.0
    small = sample_prompts(params, 256, gen(1))
    for d in (1, 2, 3):
        rows = small.degrees == d
        part = PolyBatch(small.xs[rows], small.ys[rows], small.degrees[rows])
        assert _fit_error(part, "sinusoid", d) < 1e-5  # exactly harmonics 1..d
        if d > 1:
            assert _fit_error(part, "sinusoid", d - 1) > 1e-2  # and not fewer
    assert _fit_error(small, "polynomial", 3) > 1e-2  # not a cubic
    # the variance does not depend on x (uniform phases) nor on the degree; coef_scale and noise add as usual
    for override in ({"x_scale": 3.0}, {"x_shift": 2.0, "x_dist": "uniform"}, {"degrees": (5,)},
                     {"coef_scale": 2.0, "noise_std": 0.5}):
        shifted = dataclasses.replace(params, **override)
        ys = sample_prompts(shifted, 20_000, gen(2)).ys
        assert float(ys.var()) == pytest.approx(y_variance(shifted), rel=0.04), override
    assert y_variance(dataclasses.replace(params, coef_scale=2.0, noise_std=0.5)) == 4.25
    assert y_variance(dataclasses.replace(params, degrees=(0, 1))) == 0.5  # degree 0 is the zero function


def test_a_mixture_draws_each_family_uniformly_and_its_variance_is_the_mean() -> None:
    params = SamplerParams(families=("polynomial", "sinusoid"))
    batch = sample_prompts(params, 2_000, gen(3))
    is_poly = torch.tensor([_fit_error(PolyBatch(batch.xs[i:i + 1], batch.ys[i:i + 1], batch.degrees[i:i + 1]),
                                       "polynomial", 3) < 1e-4 for i in range(0, 2_000, 10)])
    assert 0.35 < float(is_poly.double().mean()) < 0.65
    assert y_variance(params) == (9.0 + 1.0) / 2
    big = sample_prompts(params, 40_000, gen(4)).ys
    assert float(big.var()) == pytest.approx(5.0, rel=0.08)
    assert torch.equal(sample_prompts(params, 64, gen(5)).ys, sample_prompts(params, 64, gen(5)).ys)  # seeded


def test_bad_families_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"task\.sampler\.families: \[\] is not allowed"):
        load_config(None, ["task.sampler.families=[]"])
    with pytest.raises(ConfigError, match=r"families\[0\]: 'cosine' is not allowed"):
        load_config(None, ["task.sampler.families=[cosine]"])
    with pytest.raises(ConfigError, match=r"task\.shifts\.twice\.families"):
        load_config(None, ["task.shifts.twice={families: [sinusoid, sinusoid]}"])


# ---------------------------------------------------------------- the transfer config

def test_shipped_transfer_yaml_is_the_built_in_default() -> None:
    load_transfer_config(None, TINY)  # overrides of one call never leak into the built-in default
    cfg = load_transfer_config(None)
    assert load_transfer_config(ROOT / "configs" / "transfer.yaml") == cfg
    assert cfg.lm is None and cfg.task.sampler.families == ("polynomial", "sinusoid")
    subs = {name: transfer_config(cfg, name) for name in cfg.transfer.tasks}
    assert subs["sinusoid"].task.sampler.families == ("sinusoid",)
    assert subs["polynomial"].model == cfg.model and subs["polynomial"].train == cfg.train  # one model
    assert subs["polynomial"].pruning.target == "id" and subs["polynomial"].pruning.protocol == "target"
    lm = load_config(ROOT / "configs" / "transfer-lm.yaml")
    assert lm.lm is not None and lm.transfer is not None and len(lm.transfer.tasks) >= 2
    assert {transfer_config(lm, name).lm.model for name in lm.transfer.tasks} == {lm.lm.model}


@pytest.mark.parametrize("override, match", [
    (["transfer.tasks={a: {task: {}}}"], "two or more tasks"),
    (["transfer.tasks={a: {model: {n_layer: 2}}, b: {}}"], r"transfer\.tasks\.a\.model: not allowed"),
    (["transfer.tasks={a: {}, b: {pruning: {target: x}}}"], r"pruning\.target: set transfer\.target"),
    (["transfer.tasks={a: {}, b: {}}", "transfer.target=x_scale_9"], r"'x_scale_9' is not a distribution"),
    (["transfer.tasks={a: {}, 'b c': {}}"], "names a folder"),
    (["transfer.tasks={a: {}, b: {task: {sampler: {families: [cos]}}}}"], r"transfer\.tasks\.b: task\.sampler"),
    (["transfer.tasks={a: {}, b: {}}", "scales={L2: {model: {n_layer: 2}}}"], "not combined with scales"),
])
def test_transfer_config_errors_name_the_key(override: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_a_language_model_transfer_shares_the_model() -> None:
    base = ["lm.model=some-folder", "transfer.tasks={a: {lm: {task: {source: mmlu}}}, b: {lm: {model: other}}}"]
    with pytest.raises(ConfigError, match=r"lm\.model: every transfer task shares one model"):
        load_config(None, base)
    with pytest.raises(ConfigError, match=r"transfer\.tasks\.a\.task: not allowed on a lm transfer"):
        load_config(None, ["lm.model=x", "transfer.tasks={a: {task: {}}, b: {}}"])


def test_without_a_transfer_section_the_command_says_so(tmp_path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text("evaluation: {seeds: [0]}\n")
    with pytest.raises(ConfigError, match="no transfer section"):
        load_transfer_config(path)


# ---------------------------------------------------------------- verdict rules

def _row(mean: float, low: float, high: float, low_tost: float, high_tost: float, p_holm: float,
         p_equivalence_holm: float = 0.5) -> dict:
    """A replicate-level cell; ``p_equivalence_holm``: the matrix-wide Holm p of the TOST for ±δ."""
    return {"mean": mean, "low": low, "high": high, "low_tost": low_tost, "high_tost": high_tost,
            "p_holm": p_holm, "p_equivalence_holm": p_equivalence_holm, "sd": 1.0, "mde": 0.3, "n": 5}


@pytest.mark.parametrize("row, removed, expected", [
    (_row(-0.5, -0.8, -0.2, -0.7, -0.3, 0.001), True, HELPS),  # NMSE fell: the gain is positive
    (_row(0.5, 0.2, 0.8, 0.3, 0.7, 0.001), True, HARMS),
    (_row(0.5, 0.2, 0.8, 0.3, 0.7, 0.2), True, NOT_ENOUGH),  # the CI excludes 0, but not after Holm
    (_row(0.01, -0.04, 0.06, -0.03, 0.05, 0.8, 0.01), True, NO_EFFECT),  # shown within ±δ = 0.1 after Holm
    (_row(0.01, -0.04, 0.06, -0.03, 0.05, 0.8, 0.2), True, NOT_ENOUGH),  # within ±δ, but not after Holm
    (_row(0.01, -0.3, 0.3, -0.25, 0.25, 0.9), True, NOT_ENOUGH),  # wider than δ on both sides
    (_row(0.0, 0.0, 0.0, 0.0, 0.0, 1.0), False, NOTHING_REMOVED),
])
def test_cell_verdicts(row: dict, removed: bool, expected: str) -> None:
    verdict, evidence = cell_verdict(row, "nmse", 0.1, removed, 0.95)
    assert verdict == expected and evidence
    if expected == NOT_ENOUGH and row["p_holm"] > 0.5:
        assert "MDE 0.3 at 5 replicates" in evidence and "replicates would detect" in evidence


def test_cells_where_the_full_model_is_at_chance_or_at_one_are_not_evidence() -> None:
    def acc_row(full: float, mean: float, low: float, high: float, p_holm: float) -> dict:
        within = -0.01 < low + 0.002 and high - 0.002 < 0.01  # shown within ±δ = 0.01
        return {**_row(mean, low, high, low + 0.002, high - 0.002, p_holm, 0.01 if within else 0.5), "full": full}
    flat = acc_row(0.24, 0.0, -0.004, 0.004, 0.9)  # no change on a 4-choice task answered at chance
    assert cell_verdict(flat, "acc", 0.01, True, 0.95)[0] == NO_EFFECT  # without a chance level: "no effect"
    verdict, evidence = cell_verdict(flat, "acc", 0.01, True, 0.95, chance=0.25)
    assert verdict == AT_LIMIT and evidence.startswith("floor")
    assert cell_verdict(acc_row(0.24, -0.1, -0.15, -0.05, 0.001), "acc", 0.01, True, 0.95, 0.25)[0] == AT_LIMIT
    assert cell_verdict(acc_row(0.24, 0.1, 0.05, 0.15, 0.001), "acc", 0.01, True, 0.95, 0.25)[0] == HELPS
    assert cell_verdict(acc_row(0.60, 0.0, -0.004, 0.004, 0.9), "acc", 0.01, True, 0.95, 0.25)[0] == NO_EFFECT
    assert cell_verdict(acc_row(0.995, 0.0, -0.004, 0.004, 0.9), "acc", 0.01, True, 0.95, 0.25)[0] == AT_LIMIT
    assert cell_verdict(acc_row(0.995, -0.1, -0.15, -0.05, 0.001), "acc", 0.01, True, 0.95, 0.25)[0] == HARMS


def test_accuracy_cells_are_oriented_the_other_way() -> None:
    assert cell_verdict(_row(0.1, 0.05, 0.15, 0.06, 0.14, 0.001), "acc", 0.01, True, 0.95)[0] == HELPS


# ---------------------------------------------------------------- a tiny testbed transfer end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict, Config]:
    out = tmp_path_factory.mktemp("transfer") / "run"
    cfg = load_transfer_config(None, TINY)
    return out, run_transfer(cfg, out, progress=False, log=quiet), cfg


@pytest.mark.e2e
def test_tiny_transfer_writes_every_file_and_the_whole_matrix(tiny_run) -> None:
    out, results, _ = tiny_run
    for name in ("config.yaml", "environment.json", "timings.json", "transfer.json", "report/report.md",
                 "report/report.html", "report/transfer.png", "models/seed0/model.safetensors",
                 "pruning/seed1/sinusoid.json", "evaluation/seed0/polynomial/full.npz",
                 "evaluation/seed1/sinusoid/pruned-for-polynomial.npz", "evaluation/seed0/sinusoid/in-sample-pruned.npz"):
        assert (out / name).is_file(), name
    assert results["rows"] == ["polynomial", "sinusoid"]
    assert results["columns"] == [["polynomial", "id"], ["polynomial", "x_scale_2"], ["sinusoid", "id"],
                                  ["sinusoid", "harmonic_5"]]
    assert all(len(row) == 4 for row in results["cells"].values())
    for t, row in results["cells"].items():
        for key, cell in row.items():
            assert cell["own"] == key.startswith(f"{t}/")
            assert cell["verdict"] in transfer.VERDICTS and cell["n"] == 2 and cell["examples"]["n"] == 64  # 2 seeds x 32
            assert cell["low"] <= cell["mean"] <= cell["high"] and cell["sesoi"] > 0
            assert "tol_acc" in cell["other_metrics"]
            assert ("vs_own" in cell) == (not cell["own"])
    assert set(results["removed"]["sinusoid"]) == {"0", "1"}
    assert results["summary"]["answer"] and "Cross-task shift cells (2)" in results["summary"]["paragraph"]
    assert sum(sum(c.values()) for c in results["counts"].values()) == 8
    assert json.loads((out / "transfer.json").read_text())["cells"] == json.loads(json.dumps(results["cells"]))


@pytest.mark.e2e
def test_the_diagonal_is_each_tasks_own_pruned_delta(tiny_run) -> None:
    out, results, cfg = tiny_run
    for t in results["rows"]:
        sub = transfer_config(cfg, t)
        full, pruned = [], []
        for seed in cfg.evaluation.seeds:
            wl = TestbedWorkload.from_config(sub, load_model(out / "models" / f"seed{seed}"), TransferTask(sub.task, t))
            removed = results["removed"][t][str(seed)]
            full.append(evaluate(wl, None, "id", seed, 32).values["id"]["nmse"])
            pruned.append(evaluate(wl, removal_gates(removed), "id", seed, 32).values["id"]["nmse"])
        cell = results["cells"][t][f"{t}/id"]
        assert cell["mean"] == pytest.approx(float(np.mean(np.concatenate(pruned) - np.concatenate(full))), abs=1e-9)
        assert cell["full"] == pytest.approx(float(np.concatenate(full).mean()), abs=1e-9)
        assert results["in_sample"][t]["column"] == f"{t}/id"
    # a cross-task cell's comparison with the model pruned for the evaluated task is the difference of two cells
    cross, own = results["cells"]["polynomial"]["sinusoid/id"], results["cells"]["sinusoid"]["sinusoid/id"]
    assert cross["vs_own"]["mean"] == pytest.approx(cross["pruned"] - own["pruned"], abs=1e-9)


@pytest.mark.e2e
def test_rerun_resumes_without_recomputing(tiny_run, monkeypatch) -> None:
    out, results, cfg = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")} | {p: p.stat().st_mtime_ns
                                                                      for p in (out / "pruning").rglob("*.json")}

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a cached step")

    monkeypatch.setattr(transfer, "prune", refuse)
    monkeypatch.setattr(steps, "train", refuse)
    again = run_transfer(cfg, out, progress=False, log=quiet)
    assert again["cells"] == results["cells"] and again["removed"] == results["removed"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.e2e
def test_report_leads_with_the_answer(tiny_run) -> None:
    out, results, _ = tiny_run
    md = (out / "report" / "report.md").read_text()
    assert md.startswith("# tapioca transfer\n\n**" + results["summary"]["answer"])
    assert "![" in md and "transfer.png" in md and "## Own task, under both protocols" in md
    html = (out / "report" / "report.html").read_text()
    assert "<title>tapioca transfer</title>" in html and "data:image/png;base64," in html
    assert (out / "report" / "transfer.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_tapioca_report_rebuilds_a_transfer_report(tiny_run, capsys) -> None:
    out, _, _ = tiny_run
    (out / "report" / "report.md").unlink()
    from tapioca.cli import main

    assert main(["report", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert (out / "report" / "report.md").read_text().startswith("# tapioca transfer")


@pytest.mark.e2e
def test_cli_transfer_resumes_and_prints_the_matrix(tiny_run, capsys) -> None:
    out, results, _ = tiny_run
    args = ["transfer", *(a for o in TINY for a in ("--set", o)), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert results["summary"]["answer"] in printed and "pruned for sinusoid" in printed
    assert main([*args, "--quiet"]) == 0 and capsys.readouterr().out == ""
    assert main(["transfer", "--out", str(out), "--set", "transfer.target=nope", "--quiet"]) == 2


# ---------------------------------------------------------------- a tiny language-model transfer

@pytest.mark.e2e
def test_language_model_transfer_on_a_tiny_llama(tmp_path) -> None:
    from conftest import PLANTED
    from test_lm_study import planted_study_files

    model_dir, data = planted_study_files(tmp_path)
    columns = {"question": "q", "choices": "c", "answer": "a", "split": "s"}

    def task(splits: dict) -> dict:
        return {"lm": {"task": {"source": "jsonl", "path": str(data), "columns": columns, "splits": splits,
                                "n_shots": 0}}}

    tasks = {"narrow": task({"id": ["id"], "wide": ["wide"]}), "broad": task({"id": ["wide"], "narrow": ["id"]})}
    cfg = load_config(None, [
        f"lm.model={model_dir}", "lm.metric=acc", "lm.n_select=16", "lm.n_heldout=16", "lm.batch_size=8",
        "evaluation.seeds=[0, 1]", "evaluation.n_bootstrap=200", "pruning.max_drop=2",
        f"transfer={json.dumps({'tasks': tasks, 'target': 'id'})}"])
    results = run_transfer(cfg, tmp_path / "run", progress=False, log=quiet)
    assert results["kind"] == "lm" and results["primary_metric"] == "acc"
    assert results["columns"] == [["narrow", "id"], ["narrow", "wide"], ["broad", "id"], ["broad", "narrow"]]
    for t in ("narrow", "broad"):
        assert all(PLANTED in r for r in results["removed"][t].values())
    cross = results["cells"]["narrow"]["broad/narrow"]  # pruned for one task, another task's shift
    assert cross["mean"] > 0 and cross["n"] == 2 and cross["examples"]["n"] == 32  # 2 sampling seeds x 16
    assert (tmp_path / "run" / "report" / "report.html").is_file()
