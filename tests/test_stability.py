"""`tapioca stability`: agreement helpers, selection resampling, a tiny run end to end, resuming and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import tapioca.study.stability as stability
import tapioca.study.steps as steps
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.cli import main
from tapioca.config import load_config
from tapioca.errors import DataError
from tapioca.study.stability import (
    FixedSelection, draw_selection, jaccard, mean_pairwise_jaccard, pool_size, sign_agreement, stable_from,
)

TINY = ["model.n_layer=3", "model.n_embd=16", "train.steps=20", "train.warmup_steps=2", "evaluation.n_heldout=32",
        "evaluation.seeds=[0,1]", "task.shifts={x_scale_3: {x_scale: 3.0}, degree_4: {degrees: [4]}}",
        "pruning.epsilon=5.0", "pruning.choose=final", "pruning.max_drop=1", "run.threads=1"]
SIZES, REPEATS = [16, 32], 3


def quiet(msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------
# Helpers


def test_jaccard_of_identical_sets_is_one_and_of_disjoint_sets_zero():
    assert jaccard([1, 4], [4, 1]) == 1.0
    assert jaccard([], []) == 1.0  # both removing nothing is the same selection
    assert jaccard([1, 2], [3]) == 0.0
    assert jaccard([], [3]) == 0.0
    assert jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3)
    assert mean_pairwise_jaccard([[1], [1], [2]]) == pytest.approx(1 / 3)  # pairs: 1, 0, 0
    assert mean_pairwise_jaccard([[1]]) is None


def test_sign_agreement_counts_the_most_common_sign():
    assert sign_agreement([0.1, 0.2, -0.1, 0.0, 0.3]) == pytest.approx(0.6)
    assert sign_agreement([0.0, 0.0]) == 1.0  # nothing removed twice


@pytest.mark.parametrize("overlaps, agreements, expected", [
    ([0.5, 0.9, 0.9, 0.9], [1.0, 1.0, 1.0, 1.0], 32),
    ([0.9, 0.9, 0.7, 0.9], [1.0, 1.0, 1.0, 1.0], 128),  # a dip at 64: only from 128 on
    ([0.9, 0.9, 0.9, 0.9], [1.0, 0.6, 0.8, 1.0], 64),  # sign agreement 0.8 counts as agreeing
    ([0.9, 0.9, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0], None),  # the largest size fails: not within the ladder
    ([1.0, 1.0, 1.0, None], [1.0, 1.0, 1.0, 1.0], None),  # one resample: no overlap to judge
    ([0.8, 0.8, 0.8, 0.8], [0.8, 0.8, 0.8, 0.8], 16),
])
def test_stable_from_is_the_smallest_size_from_which_every_larger_one_is_stable(overlaps, agreements, expected):
    assert stable_from([16, 32, 64, 128], overlaps, agreements) == expected


class PoolTask:
    """A finite pool of 20 selection examples (a text task's shape)."""

    def data(self, dist: str, role: str, seed: int, n: int) -> list[str]:
        if n > 20:
            raise DataError(f"only 20 examples exist, {n} were needed")
        return [f"{dist}/{role}/{seed}/{i}" for i in range(n)]


def test_a_finite_pool_is_resampled_without_replacement_and_clipped():
    wl = SimpleNamespace(task=PoolTask())
    assert pool_size(wl.task, "id", 0, 2048) == 20
    a, b = draw_selection(wl, "id", 0, 0, 10), draw_selection(wl, "id", 0, 1, 10)
    assert a.n == 10 and a.pool == 20 and len(set(a.examples)) == 10
    assert set(a.examples) <= set(PoolTask().data("id", "select", 0, 20))  # the seed's own selection role
    assert a.examples != b.examples and a.sample_seed != b.sample_seed
    assert draw_selection(wl, "id", 0, 0, 10).examples == a.examples  # deterministic
    clipped = draw_selection(wl, "id", 0, 2, 64)
    assert clipped.n == 20 and sorted(clipped.examples) == sorted(PoolTask().data("id", "select", 0, 20))
    fixed = FixedSelection(wl.task, "id", a)
    assert fixed.data("id", "select", 0, 10) is a.examples  # in-sample runs read it with role "select"
    assert fixed.data("id", "heldout", 0, 10) == PoolTask().data("id", "heldout", 0, 10)  # held-out untouched
    assert fixed.data("id", "reference", 0, 3) == PoolTask().data("id", "reference", 0, 3)
    assert fixed.data("wide", "select", 0, 3) == PoolTask().data("wide", "select", 0, 3)


def test_bad_sizes_and_repeats_are_config_errors():
    assert stability.parse_sizes("64, 16,256") == [16, 64, 256]
    for text in ("3", "abc", "16,16", "16,x"):
        with pytest.raises(stability.ConfigError, match="--sizes"):
            stability.parse_sizes(text)
    with pytest.raises(stability.ConfigError, match="--repeats"):
        stability.run_stability(load_config(None, TINY), "unused", SIZES, 0, progress=False, log=quiet)


# ---------------------------------------------------------------------------------------------------------
# A tiny run end to end


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability")
    cfg = load_config(None, TINY)
    return cfg, out, stability.run_stability(cfg, out, SIZES, REPEATS, progress=False, log=quiet)


@pytest.mark.e2e
def test_every_output_is_written_with_the_documented_keys(finished):
    cfg, out, results = finished
    assert json.loads((out / "stability.json").read_text()) == json.loads(json.dumps(results))
    assert {"kind", "primary_metric", "selection_metric", "higher_is_better", "seeds", "distributions", "sizes",
            "repeats", "thresholds", "pruning", "n_heldout", "rows", "stable_from", "answer", "seconds",
            "seconds_total"} <= set(results)
    assert results["distributions"] == ["id", "degree_4"]  # the default: id and the default shifts the config has
    assert results["sizes"] == SIZES and results["repeats"] == REPEATS and results["seeds"] == [0, 1]
    for dist in ("id", "degree_4"):
        assert set(results["rows"][dist]) == {"16", "32"}
        row = results["rows"][dist]["32"]
        assert {"jaccard", "removes_nothing", "sign_agreement", "heldout_gain", "in_sample_selection_gain",
                "in_sample_gain", "optimism", "units", "n_used"} <= set(row)
        assert {"mean", "sd", "min", "max"} == set(row["heldout_gain"])
        assert 0.0 <= row["jaccard"] <= 1.0 and len(row["units"]) == 2 * REPEATS
        assert results["stable_from"][dist] in (None, 16, 32)
        for seed in (0, 1):
            for n in SIZES:
                for r in range(REPEATS):
                    stem = out / "stability" / f"seed{seed}" / dist / f"n{n}-r{r}"
                    assert stem.with_name(stem.name + ".search.json").is_file()
                    assert stem.with_name(stem.name + ".eval.json").is_file()
    md = (out / "stability.md").read_text()
    assert results["answer"] in md.splitlines()[2] and "Stable from:" in md and "| degree_4 | 32 |" in md
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_each_resample_selects_on_its_own_draw(finished):
    _, out, results = finished
    searches = [json.loads(p.read_text()) for p in sorted((out / "stability").rglob("*.search.json"))]
    assert all(len(s["removed"]) == 1 for s in searches)  # max_drop=1, epsilon 5: always one block
    seeds = {(s["info"]["seed"], s["info"]["n_used"], s["info"]["sample_seed"]) for s in searches}
    assert len(seeds) == len(searches) // 2  # distinct per (seed, n, repeat); shared by the two distributions
    assert {s["info"]["sample_seed"] for s in searches} == {1000 * r + s for r in range(REPEATS) for s in (0, 1)}


@pytest.mark.e2e
def test_in_sample_gain_in_the_primary_metric_matches_tales_own(finished):
    """With selection metric NMSE the score is −NMSE, so both in-sample gains must agree: the in-sample
    evaluation really scores the selection examples."""
    _, out, _ = finished
    for path in (out / "stability").rglob("*.eval.json"):
        ev = json.loads(path.read_text())
        assert ev["in_sample"]["gain"] == pytest.approx(ev["in_sample"]["selection_gain"], rel=1e-4, abs=1e-7)
        assert ev["optimism"] == pytest.approx(ev["in_sample"]["gain"] - ev["heldout"]["gain"])


@pytest.mark.e2e
def test_a_rerun_recomputes_nothing(finished, monkeypatch):
    cfg, out, results = finished

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished unit ran again")

    monkeypatch.setattr(stability, "prune", must_not_run)
    monkeypatch.setattr(HeldoutRuns, "one", must_not_run)
    monkeypatch.setattr(steps, "train", must_not_run)
    again = stability.run_stability(cfg, out, SIZES, REPEATS, progress=False, log=quiet)
    assert again["rows"] == json.loads(json.dumps(results["rows"]))
    assert again["stable_from"] == results["stable_from"]


GOLDEN = Path(__file__).parent / "data" / "golden"


@pytest.mark.e2e
def test_a_language_model_resamples_its_finite_pool(tmp_path):
    """The tiny Llama with a planted harmful block: 120 questions per split, ~40% of them selection ones."""
    task = {"source": "jsonl", "path": str(GOLDEN / "items.jsonl"), "n_shots": 0,
            "columns": {"question": "q", "choices": "c", "answer": "a", "split": "s"},
            "splits": {"id": ["id"], "wide": ["wide"]}}
    lm = {"model": str(GOLDEN / "tiny-llama"), "task": task, "metric": "acc", "n_select": 16, "n_heldout": 16,
          "n_profile": 8, "batch_size": 8}
    cfg = load_config(None, [f"lm={json.dumps(lm)}", "pruning.max_drop=2", "evaluation.seeds=[0]"])
    said: list[str] = []
    results = stability.run_stability(cfg, tmp_path, [16, 128], 2, progress=False, log=said.append)
    assert results["kind"] == "lm" and results["primary_metric"] == "acc" and results["distributions"] == ["id", "wide"]
    row = results["rows"]["wide"]["128"]
    assert 16 < row["n_used"] < 128 and any("n=128 clipped to" in m for m in said)
    assert not row["resampled"] and results["rows"]["wide"]["16"]["resampled"]  # the whole pool vs a resample
    assert results["stable_from"]["wide"] in (None, 16)  # decided on n=16 alone
    assert all(2 in u["removed"] for u in row["units"])  # the planted block, whatever the resample
    assert row["heldout_gain"]["min"] > 0


# ---------------------------------------------------------------------------------------------------------
# The command line


CLI_TINY = [arg for key in TINY if not key.startswith("evaluation.seeds") for arg in ("--set", key)]


def one_line_error(capsys, *args: str) -> str:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.e2e
def test_the_stability_command_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["stability", "--out", str(out), *CLI_TINY, "--set", "evaluation.seeds=[0]", "--sizes", "16,24",
                 "--repeats", "2", "--dists", "id"]) == 0
    results = json.loads((out / "stability.json").read_text())
    assert results["distributions"] == ["id"] and results["sizes"] == [16, 24] and results["repeats"] == 2
    assert (out / "stability.md").is_file() and (out / "stability.png").is_file()
    assert results["answer"] in capsys.readouterr().out


@pytest.mark.parametrize("sizes", ["3", "abc", "16,,x"])
def test_a_bad_sizes_value_is_a_one_line_error(capsys, tmp_path, sizes):
    err = one_line_error(capsys, "stability", "--out", str(tmp_path), "--sizes", sizes, "--quiet")
    assert err.startswith("tapioca stability: error: --sizes:")
    assert not (tmp_path / "config.yaml").exists()  # refused before any work


def test_an_unknown_distribution_is_a_one_line_error_before_any_training(capsys, tmp_path):
    err = one_line_error(capsys, "stability", "--out", str(tmp_path), *CLI_TINY, "--dists", "id,nope")
    assert "--dists: unknown distribution 'nope'" in err
    assert not (tmp_path / "models").exists()
