"""The search-speed benchmark: the naive TALE reference picks what tale_search picks, and its cost model,
measurements and table work on a tiny case. Nothing here asserts on time."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import search_speed as bench  # noqa: E402
import speed_cost  # noqa: E402
from naive_tale import naive_tale  # noqa: E402

from tapioca.models.gates import first_tensor  # noqa: E402
from tapioca.models.icl import load_model  # noqa: E402
from tapioca.pruning.searches import SearchContext, tale_search  # noqa: E402


class OffsetBlock(nn.Module):
    """A planted harmful block: adds a large fixed offset per position (the same for every batch size)."""

    def __init__(self, block: nn.Module, width: int, scale: float = 3.0) -> None:
        super().__init__()
        self.block = block
        self.register_buffer("offset", scale * torch.randn(128, width, generator=torch.Generator().manual_seed(0)))

    def forward(self, hidden, *args, **kwargs):
        out = self.block(hidden, *args, **kwargs)
        out = out if isinstance(out, torch.Tensor) else out[0]
        return out + self.offset[: hidden.shape[1]]


@pytest.fixture
def planted_case() -> bench.Case:
    """The shipped testbed model (8 blocks, width 64) with block 2 planted as harmful, 16 ID prompts."""
    model = load_model(bench.ZOO / "testbed-L8-D64-seed0")
    model.backbone.h[2] = OffsetBlock(model.backbone.h[2], 64)
    return bench.testbed_case("planted", model.eval(), 16)


@pytest.fixture
def tiny_case() -> bench.Case:
    """4 untrained blocks of width 16 and 24 ID selection prompts (cost does not depend on training)."""
    return bench.testbed_case("tiny", bench.untrained_icl(4, width=16), 24)


def test_naive_reference_and_tale_search_pick_identical_blocks(planted_case):
    case = planted_case
    naive = naive_tale(case.scorer(1), case.model.n_blocks, epsilon=0.08, max_drop=2)
    ctx = SearchContext(model=case.model, batch=case.batch, scorer=case.scorer(1024),
                        score_predictions=case.score_predictions, epsilon=0.08, max_drop=2, progress=False)
    fast = tale_search(ctx)
    assert naive.path[0] == 2 and naive.removed == [2]  # the planted block goes first and is the best
    assert bench.same_selection(naive, fast) and fast.info["prefix_cache"]
    assert [r["chosen"] for r in naive.rounds] == [r["chosen"] for r in fast.rounds]
    scale = max(1.0, *(abs(v) for r in fast.rounds for v in r["candidates"].values()))
    assert bench.max_score_difference(naive, fast) < 1e-4 * scale  # batch 1 vs 16: float rounding only
    assert naive.info["configurations_evaluated"] == fast.info["configurations_evaluated"]


def test_naive_reference_respects_max_drop_and_choose(tiny_case):
    result = naive_tale(tiny_case.scorer(8), 4, epsilon=math.inf, max_drop=2, choose="final")
    assert len(result.path) == 2 and result.removed == result.final == result.path
    assert len(result.rounds) == 2 and result.info["configurations_evaluated"] == 1 + 4 + 3


class BlockCounter:
    """Counts (block, example) forwards actually computed; a skipped block returns its input unchanged."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.count = 0
        self.handles = [b.register_forward_hook(self.hook, with_kwargs=True) for b in blocks]

    def hook(self, module, args, kwargs, output) -> None:
        hidden = first_tensor(args, kwargs)
        if output is not hidden:
            self.count += hidden.shape[0]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("prefix", [False, True])
def test_executed_forwards_match_the_blocks_really_run(tiny_case, prefix):
    case = tiny_case
    counter = BlockCounter(case.model.blocks)
    try:
        if prefix:
            result = tale_search(SearchContext(model=case.model, batch=case.batch, scorer=case.scorer(10),
                                               score_predictions=case.score_predictions, epsilon=math.inf,
                                               chunk=10, progress=False))
        else:
            result = naive_tale(case.scorer(10), case.model.n_blocks, epsilon=math.inf)
    finally:
        counter.close()
    predicted = len(case.batch) * sum(len(f) for f in speed_cost.executed_forwards(result, prefix))
    assert counter.count == predicted
    assert len(result.rounds) == 4


def test_cost_model_counts_matmuls_and_attention(tiny_model):
    cost = bench.CostModel(block_params=(10, 20), d_model=4, seq_len=3, other_params=5)
    assert cost.block_flops(0) == 2 * 10 * 3 + 4 * 3 * 3 * 4
    assert cost.forward_flops([1]) == cost.block_flops(1) + 2 * 5 * 3
    query_only = dataclasses.replace(cost, last_kv_params=4)  # the last block: K, V for 3 tokens, the rest for 1
    assert query_only.block_flops(1) == 2 * 4 * 3 + 2 * 16 + 4 * 3 * 4 and query_only.block_flops(0) == cost.block_flops(0)
    icl = speed_cost.model_cost(tiny_model, 16, 81)
    assert icl.block_params == (12 * 16 * 16,) * 3  # qkv, out, two MLP matrices
    assert icl.other_params == 2 * 16 + 16  # read-in (2 -> D) and read-out (D -> 1)


def test_compare_table_and_verdict_on_a_tiny_case(tiny_case):
    rows = bench.compare(tiny_case, epsilon=0.08, max_drop=1, chunk=16)
    assert [r.side for r in rows] == ["naive", "tapioca", "batched only"]
    assert all(r.configurations == 5 and r.flops > 0 and r.peak_rss > 0 for r in rows)
    assert rows[1].flops < rows[0].flops == rows[2].flops  # prefix reuse skips work; batching alone does not
    table = bench.format_table(rows, bench.Peak(wall=1e10, cpu=1e10))
    assert len(table.splitlines()) == 4 and "%peak wall" in table and "naive" in table
    assert bench.verdict(rows) == f"model=tiny speedup_vs_naive={rows[0].seconds / rows[1].seconds:.2f} " \
                                  "identical_selection=true"


def test_ceiling_line_divides_naive_time_by_tapiocas_flops_at_peak(tiny_case):
    rows = bench.compare(tiny_case, epsilon=0.08, max_drop=1, chunk=16)
    naive, fast = rows[0], rows[1]
    naive.seconds, naive.flops, fast.flops = 30.0, 8e9, 2e9
    line = bench.ceiling_line(rows, bench.Peak(wall=1e9, cpu=1e9))
    assert "naive/tapioca: 4.00x" in line  # 8 / 2 GFLOP
    assert "peak: 15.00x" in line  # 30 s against 2 GFLOP at 1 GFLOP/s = 2 s


def test_fit_exponent_recovers_a_power_law():
    xs = [4, 8, 12, 16]
    assert bench.fit_exponent(xs, [3 * x**2 for x in xs]) == pytest.approx(2.0)
    assert bench.fit_exponent(xs, [0.5 * x for x in xs]) == pytest.approx(1.0)


def test_peak_rss_sees_an_allocation_and_matmul_peak_is_positive():
    # in a fresh interpreter: inside the test process, memory freed by earlier tests can be reused without growing RSS
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import search_speed as bench\n"
            "with bench.PeakRSS(interval=0.005) as rss:\n"
            "    block = torch.ones(16 * 2**20 // 4); assert block.sum() > 0\n"
            "print(rss.peak - rss.start)")
    out = subprocess.run([sys.executable, "-c", code, str(Path(bench.__file__).parent)], capture_output=True,
                         text=True, check=True, timeout=120)
    assert int(out.stdout.split()[-1]) >= 8 * 2**20
    peak = bench.matmul_peak(threads=1, size=128, repeats=1)
    assert peak.wall > 0 and peak.cpu > 0


def test_missing_lm_is_a_skip_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tapioca.models.hf", None)  # import fails as if the adapter were absent
    with pytest.raises(bench.Skip, match="not importable"):
        bench.smollm_case(4)


def test_racing_line_on_the_planted_case(planted_case):
    rows = bench.compare(planted_case, epsilon=0.08, max_drop=1, chunk=8, ablation=False)
    line = bench.racing_line(planted_case, rows[1], delta=0.05, min_examples=4, chunk=8)
    assert line.startswith("racing delta=0.05 min=4:") and "same_selection=true" in line
    raced, exact = map(int, line.split("candidate-example pairs ")[1].split(",")[0].split(" vs "))
    assert exact == 8 * 16 and raced < exact  # one round: 8 candidates on 16 examples; racing scores fewer


def test_flop_examples_count_a_shared_prefix_once_per_chunk(tiny_case):
    import dataclasses

    n, t = len(tiny_case.batch), tiny_case.cost.seq_len
    assert tiny_case.flop_examples(4) == n  # nothing shared
    shared = dataclasses.replace(tiny_case, shared_tokens=t // 2)
    assert shared.flop_examples(1) == n  # batch 1 shares nothing
    chunks = -(-n // 4)
    assert shared.flop_examples(4) == pytest.approx(n - (n - chunks) * (t // 2) / t)


def test_keep_freed_memory_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    from tapioca.perf import keep_freed_memory

    monkeypatch.setenv("TAPIOCA_MALLOC", "system")
    assert keep_freed_memory() is False
    monkeypatch.delenv("TAPIOCA_MALLOC")
    import platform
    assert keep_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_train_speed_benchmark_prints_a_row_per_setting() -> None:
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "benchmarks/train_speed.py", "--config", "configs/default.yaml",
                          "--precision", "fp32", "bf16", "--steps", "1", "--warmup", "0", "--threads", "1"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("configs/default.yaml")]
    assert [r[3] for r in rows] == ["fp32", "bf16"]
    assert all(float(r[5]) > 0 and "(5,000" in " ".join(r) for r in rows)
