"""Search speed: the naive TALE loop against tapioca's ``tale_search``, same model, data and machine, one run.

    python benchmarks/search_speed.py                      # testbed seed 0, 512 ID selection prompts
    python benchmarks/search_speed.py --n 256 --max-drop 2 # smaller; both sides get the same n and rounds
    python benchmarks/search_speed.py --sweep L            # cost vs blocks (untrained, width 64), fitted exponent
    python benchmarks/search_speed.py --sweep N            # cost vs examples; --sweep both for the two
    python benchmarks/search_speed.py --workers 2          # add a row for Ray workers (tapioca.pruning.parallel)

Prints a table (configurations evaluated, wall time, tokens/s, peak RSS, achieved FLOP/s as a fraction of a
measured float32 matmul peak) and one line per model: ``model=<name> speedup_vs_naive=<x> identical_selection=<b>``.
FLOPs are an analytic estimate of the work actually executed (skipped blocks cost nothing):
2·(matmul parameters)·tokens per block plus attention 4·T²·D per sequence. Timings are wall clock on a
possibly shared machine: the header prints the load average. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import os
import platform
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_tale import naive_tale  # noqa: E402

from tapioca.config import ModelConfig, TaskConfig  # noqa: E402
from tapioca.analysis.evaluation import selection_scorer  # noqa: E402
from tapioca.models.base import BlockModel, run_in_chunks  # noqa: E402
from tapioca.models.icl import ICLModel, load_model  # noqa: E402
from tapioca.perf import keep_freed_memory  # noqa: E402
from tapioca.pruning.searches import PredictionScorer, PruneResult, Scorer, SearchContext, tale_search  # noqa: E402
from tapioca.tasks.polyreg import PolyRegTask  # noqa: E402

ZOO = Path(__file__).resolve().parent.parent / "tapioca" / "zoo"


class Skip(Exception):
    """A benchmark case that cannot run here; the message says why."""


# --------------------------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class CostModel:
    """Analytic FLOPs of one example's forward. ``block_params``: matmul weights per block; ``seq_len``: T."""

    block_params: tuple[int, ...]
    d_model: int
    seq_len: int
    other_params: int = 0  # matmul weights outside the blocks, applied to every token (read-in/out, LM head)
    last_kv_params: int | None = None  # set when the last block computes the last position only: its K, V weights

    def block_flops(self, block: int) -> float:
        """One block on one sequence: 2·params·T for the matmuls plus 4·T²·D for QKᵀ and AV (unmasked); a
        last block that computes the last position alone: keys and values for T tokens, the rest for one."""
        t, params = self.seq_len, self.block_params[block]
        if self.last_kv_params is not None and block == len(self.block_params) - 1:
            return 2.0 * self.last_kv_params * t + 2.0 * (params - self.last_kv_params) + 4.0 * t * self.d_model
        return 2.0 * params * t + 4.0 * t * t * self.d_model

    def forward_flops(self, blocks: Sequence[int]) -> float:
        """One example through ``blocks`` (the others skipped) plus the parts outside the blocks."""
        return sum(self.block_flops(b) for b in blocks) + 2.0 * self.other_params * self.seq_len


def matmul_params(module: torch.nn.Module) -> int:
    """Parameters of the matrices multiplied in ``module``: 2-D weights outside embedding tables (lookups)."""
    return sum(p.numel() for m in module.modules() if not isinstance(m, torch.nn.Embedding)
               for p in m.parameters(recurse=False) if p.dim() == 2)


def model_cost(model: BlockModel, d_model: int, seq_len: int, other_params: int | None = None) -> CostModel:
    """Cost model of any BlockModel: per-block matmul parameters from ``model.blocks``; ``other_params``
    defaults to the model's matmul parameters outside the blocks (when it is an ``nn.Module``)."""
    block = tuple(matmul_params(b) for b in model.blocks)
    if other_params is None:
        total = matmul_params(model) if isinstance(model, torch.nn.Module) else sum(block)
        other_params = max(total - sum(block), 0)
    return CostModel(block, d_model, seq_len, other_params)


def executed_forwards(result: PruneResult, prefix: bool, record_passes: int = 1) -> Iterator[list[int]]:
    """The blocks each forward of a search actually computed.

    Naive (or ``prefix=False``): the baseline, then every candidate configuration from scratch. Prefix reuse:
    the passes ``result.info["passes"]`` lists (removed blocks, first block computed); without that list, the
    baseline, ``record_passes`` passes per round under the current gates, and candidate b from block b + 1.
    """
    n = result.n_blocks
    passes = result.info.get("passes") if prefix else None
    if passes is not None:
        for removed, first in passes:
            yield [j for j in range(first, n) if j not in removed]
        return
    yield list(range(n))  # baseline
    for rnd in result.rounds:
        removed = set(rnd["removed_before"])
        kept = [j for j in range(n) if j not in removed]
        if prefix:
            for _ in range(record_passes):
                yield kept
        for b in map(int, rnd["candidates"]):
            yield [j for j in kept if j > b] if prefix else [j for j in kept if j != b]


def search_flops(result: PruneResult, cost: CostModel, n_examples: int, prefix: bool, record_passes: int = 1) -> float:
    """Estimated FLOPs a search executed on ``n_examples`` examples."""
    return n_examples * sum(cost.forward_flops(f) for f in executed_forwards(result, prefix, record_passes))


@dataclass(frozen=True)
class Peak:
    """Measured float32 matmul FLOP/s, per wall second and per CPU second of this process."""

    wall: float
    cpu: float


def matmul_peak(threads: int, size: int = 2048, repeats: int = 3) -> Peak:
    """Best of ``repeats`` (size × size) float32 matmuls on ``threads`` CPU threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    wall = cpu = math.inf
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        a @ b
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return Peak(2.0 * size**3 / wall, 2.0 * size**3 / max(cpu, 1e-9))


# --------------------------------------------------------------------------------------------- measuring


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        scale = 1 if platform.system() == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakRSS:
    """Highest RSS while the ``with`` block runs, sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@dataclass
class Row:
    """One measured search."""

    model: str
    side: str
    n_examples: int
    configurations: int
    rounds: int
    seconds: float
    cpu_seconds: float  # CPU time of this process (less sensitive to other load; excludes Ray workers)
    tokens: float  # prompt tokens scored: configurations × examples × T
    flops: float
    peak_rss: int
    rss_delta: int
    result: PruneResult | None = field(default=None, repr=False)


def measure(model: str, side: str, n_examples: int, cost: CostModel, prefix: bool, run: Callable[[], PruneResult],
            record_passes: int = 1, flop_examples: float | None = None) -> Row:
    """Run one search, timing it and sampling its peak RSS. ``flop_examples``: examples' worth of tokens each
    forward computes (fewer than ``n_examples`` when a shared prompt prefix is run once per chunk)."""
    with PeakRSS() as rss:
        start, cpu = time.perf_counter(), time.process_time()
        result = run()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    configs = int(result.info["configurations_evaluated"])
    return Row(model, side, n_examples, configs, len(result.rounds), seconds, cpu, configs * n_examples * cost.seq_len,
               search_flops(result, cost, n_examples if flop_examples is None else flop_examples, prefix, record_passes),
               rss.peak, rss.peak - rss.start, result)


def format_table(rows: Sequence[Row], peak: Peak) -> str:
    """The results as an aligned text table. %peak: achieved FLOP/s over the matmul peak, by wall time and by
    CPU time (the latter is less disturbed by other processes on a shared machine)."""
    head = ("model", "side", "N", "rounds", "configs", "wall s", "cpu s", "tokens/s", "GFLOP", "GFLOP/s",
            "%peak wall", "%peak cpu", "peak RSS MiB", "ΔRSS MiB")
    lines = [head]
    nan = float("nan")
    for r in rows:
        rate = r.flops / r.seconds if r.seconds > 0 else nan
        cpu_rate = r.flops / r.cpu_seconds if r.cpu_seconds > 0 else nan
        lines.append((r.model, r.side, str(r.n_examples), str(r.rounds), str(r.configurations), f"{r.seconds:.2f}",
                      f"{r.cpu_seconds:.2f}",
                      f"{r.tokens / r.seconds:,.0f}" if r.seconds > 0 else "nan", f"{r.flops / 1e9:.1f}",
                      f"{rate / 1e9:.2f}", f"{100 * rate / peak.wall:.1f}", f"{100 * cpu_rate / peak.cpu:.1f}",
                      f"{r.peak_rss / 2**20:.0f}",
                      f"{r.rss_delta / 2**20:+.0f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def same_selection(a: PruneResult, b: PruneResult) -> bool:
    """Same accepted path and the same best / bsba / final / chosen configurations."""
    return all(getattr(a, k) == getattr(b, k) for k in ("path", "removed", "best", "bsba", "final"))


def max_score_difference(a: PruneResult, b: PruneResult) -> float:
    """Largest |Δ| between the two searches' candidate scores in rounds both ran (batch 1 vs batched)."""
    diffs = [abs(x["candidates"][k] - y["candidates"][k]) for x, y in zip(a.rounds, b.rounds)
             for k in x["candidates"] if k in y["candidates"]]
    return max(diffs, default=0.0)


# --------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """A model and its selection data: ``batch`` (with ``slice``/``len``), per-example ``score_predictions``."""

    name: str
    model: BlockModel
    batch: Any
    score_predictions: PredictionScorer
    cost: CostModel
    make_scorer: Callable[[int], Scorer] | None = None  # chunk -> scorer; default: run_in_chunks + score_predictions
    shared_tokens: int = 0  # prompt tokens every example starts with, which a batched LM run computes once

    def flop_examples(self, chunk: int) -> float:
        """Examples' worth of tokens a run over the batch in chunks of ``chunk`` computes: all of them, less the
        shared prefix of every example but one per chunk (chunk 1, the naive side, shares nothing)."""
        n = len(self.batch)
        if chunk <= 1 or not self.shared_tokens:
            return float(n)
        return n - (n - math.ceil(n / chunk)) * self.shared_tokens / self.cost.seq_len

    def scorer(self, chunk: int) -> Scorer:
        """Gates -> per-example scores (B,), running ``chunk`` examples at a time."""
        if self.make_scorer is not None:
            return self.make_scorer(chunk)

        def score(gates):
            preds = run_in_chunks(self.model, self.batch, gates, capture=False, chunk=chunk).predictions
            return self.score_predictions(preds, self.batch)

        return score


def testbed_case(name: str, model: ICLModel, n: int, metric: str = "nmse", seed: int = 0) -> Case:
    """A testbed model on ``n`` ID selection prompts, scored by tapioca's ``selection_scorer``."""
    task = PolyRegTask(TaskConfig())
    batch = task.data("id", "select", seed, n)
    width = model.cfg.n_embd
    cost = dataclasses.replace(model_cost(model, width, 2 * batch.xs.shape[1] - 1), last_kv_params=2 * width * width)
    return Case(name, model, batch, functools.partial(task.score, metric=metric), cost,
                make_scorer=lambda chunk: selection_scorer(model, task, batch, metric, chunk))


def untrained_icl(n_blocks: int, width: int = 64, seed: int = 0) -> ICLModel:
    """A randomly initialised testbed model (cost does not depend on training)."""
    torch.manual_seed(seed)
    return ICLModel(ModelConfig(n_layer=n_blocks, n_embd=width, n_head=2, n_positions=128)).eval()


def lm_case(name: str, model: BlockModel, batch: Any, score_predictions: PredictionScorer, d_model: int,
            seq_len: int, head_params: int = 0) -> Case:
    """Any causal LM behind the BlockModel interface, e.g. from ``tapioca.models.hf``, as a benchmark case.
    ``head_params``: matmul parameters per token outside the blocks (LM head share of the scored positions)."""
    return Case(name, model, batch, score_predictions, model_cost(model, d_model, seq_len, head_params))


def smollm_case(n: int, cache_dir: str | None = None, name: str = "SmolLM2-135M-Instruct") -> Case:
    """SmolLM2-135M on basic arithmetic (ID selection split), scored by the log-likelihood of the correct
    answer, when tapioca's HF adapter, text tasks and the converted weights are installed."""
    try:
        from tapioca.models.hf import HFModel, text_config
        from tapioca.models.install import installed_path
        from tapioca.tasks.text import TextTask, TextTaskConfig
    except ImportError as err:
        raise Skip(f"{name}: tapioca's HF adapter is not importable ({err}); plug an LM in via lm_case()") from None
    path = installed_path(name, cache_dir)
    if path is None:
        raise Skip(f"{name} is not installed (tapioca models install {name}; or point --lm-cache-dir at it)")
    model = HFModel.load(path)
    task = TextTask(TextTaskConfig(source="basic_arithmetic"))
    examples = task.data("id", "select", 0, n)
    batch = model.tokenize(task.prompts(examples, 0), [f" {ex.answer}" for ex in examples])
    cfg = text_config(model.model)
    seq_len = round(float(batch.attention_mask.sum(1).double().mean()))
    scored = float(batch.target_mask.sum(1).double().mean()) + 1  # logits_to_keep: answer positions only
    head = round(cfg.vocab_size * cfg.hidden_size * scored / seq_len)
    case = lm_case(f"{name}-arith", model, batch, answer_loglik, cfg.hidden_size, seq_len, head)
    case.shared_tokens = model.shared_prefix(batch)  # the few-shot demonstrations, run once per batched chunk
    return case


def answer_loglik(predictions: torch.Tensor, batch: Any) -> torch.Tensor:
    """LM selection score: the summed log-likelihood of the correct answer (HFModel.run's predictions), (B,)."""
    return predictions


# --------------------------------------------------------------------------------------------- runs


def compare(case: Case, epsilon: float, max_drop: int | None, chunk: int, workers: int = 0,
            ablation: bool = True) -> list[Row]:
    """Naive (batch 1, from scratch) and tapioca's tale_search (chunk, prefix reuse) on one case; with
    ``ablation`` also tale_search batched but without prefix reuse, to separate the two gains."""
    n = len(case.batch)
    naive_scorer = case.scorer(1)
    rows = [measure(case.name, "naive", n, case.cost, False,
                    lambda: naive_tale(naive_scorer, case.model.n_blocks, epsilon, max_drop))]
    ctx = SearchContext(model=case.model, batch=case.batch, scorer=case.scorer(chunk),
                        score_predictions=case.score_predictions, epsilon=epsilon, max_drop=max_drop, chunk=chunk,
                        progress=False)
    batched = case.flop_examples(chunk)
    rows.append(measure(case.name, "tapioca", n, case.cost, True, lambda: tale_search(ctx), flop_examples=batched))
    if ablation:
        plain = dataclasses.replace(ctx, prefix_cache=False)
        rows.append(measure(case.name, "batched only", n, case.cost, False, lambda: tale_search(plain),
                            flop_examples=batched))
    if workers:
        try:
            rows.append(ray_row(case, ctx, workers))
        except Skip as why:
            print(f"skipped: ray row of {case.name}: {why}", flush=True)
    return rows


def racing_line(case: Case, exact: Row, delta: float, min_examples: int, chunk: int) -> str:
    """tale_search with racing against the exact search (``exact``, the tapioca row): wall time, the
    (candidate, example) pairs scored, and whether the selection is the same. Racing is not TALE (it may
    differ, with probability bounded by delta per round), so it is reported apart from the verdict."""
    from tapioca.pruning.racing import RacingRounds

    racer = RacingRounds(case.model, case.batch, case.score_predictions, chunk, delta, min_examples)
    ctx = SearchContext(model=case.model, batch=case.batch, scorer=case.scorer(chunk),
                        score_predictions=case.score_predictions, epsilon=exact.result.info["epsilon"],
                        max_drop=exact.result.info["max_drop"], chunk=chunk, progress=False, candidate_evaluator=racer)
    start = time.perf_counter()
    result = tale_search(ctx)
    seconds = time.perf_counter() - start
    exact_pairs = sum(len(r["candidates"]) for r in exact.result.rounds) * len(case.batch)
    raced = sum(len(r.get("raced_out", {})) for r in result.rounds)
    return (f"racing delta={delta} min={min_examples}: {seconds:.2f} s ({exact.seconds / seconds:.2f}x vs exact "
            f"tapioca), candidate-example pairs {racer.example_runs} vs {exact_pairs}, {raced} candidates raced out, "
            f"same_selection={str(same_selection(exact.result, result)).lower()}")


def ray_row(case: Case, ctx: SearchContext, workers: int) -> Row:
    """tale_search with candidates on ``workers`` local Ray workers (start-up included in the time)."""
    from tapioca.pruning.parallel import ICLReplica, parallel_tale

    if not isinstance(case.model, ICLModel):
        raise Skip("the Ray row needs a model factory; only testbed models have one here")
    return measure(case.name, f"ray x{workers}", len(case.batch), case.cost, True,
                   lambda: parallel_tale(ctx, ICLReplica.of(case.model), workers=workers), record_passes=workers)


def verdict(rows: Sequence[Row]) -> str:
    """``model=<name> speedup_vs_naive=<x> identical_selection=<true|false>`` for naive vs tapioca."""
    naive, fast = rows[0], rows[1]
    same = all(same_selection(naive.result, r.result) for r in rows[1:])
    return (f"model={naive.model} speedup_vs_naive={naive.seconds / fast.seconds:.2f} "
            f"identical_selection={str(same).lower()}")


def gains(rows: Sequence[Row]) -> str:
    """Speed-ups over naive by wall and CPU time, per row: how much batching and prefix reuse each give."""
    naive = rows[0]
    return "; ".join(f"{r.side}: {naive.seconds / r.seconds:.2f}x wall, {naive.cpu_seconds / r.cpu_seconds:.2f}x cpu"
                     for r in rows[1:] if r.seconds > 0 and r.cpu_seconds > 0)


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y on log x: the a in y ∝ x^a."""
    lx, ly = torch.tensor(xs, dtype=torch.float64).log(), torch.tensor(ys, dtype=torch.float64).log()
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


def sweep(kind: str, values: Sequence[int], fixed: int, rounds: int, chunk: int) -> list[Row]:
    """Cost of ``rounds`` TALE rounds (always accepted) vs blocks L (N fixed) or examples N (L fixed)."""
    rows = []
    for v in values:
        n_blocks, n = (v, fixed) if kind == "L" else (fixed, v)
        case = testbed_case(f"untrained-L{n_blocks}", untrained_icl(n_blocks), n)
        rows += compare(case, math.inf, min(rounds, n_blocks), chunk, ablation=False)
    return rows


def exponent_lines(kind: str, rows: Sequence[Row]) -> list[str]:
    """Fitted exponents of wall time (and of the analytic FLOPs) for naive and tapioca."""
    out = []
    for side in ("naive", "tapioca"):
        mine = [r for r in rows if r.side == side]
        xs = [r.result.n_blocks if kind == "L" else r.n_examples for r in mine]
        out.append(f"sweep={kind} side={side} exponent_time={fit_exponent(xs, [r.seconds for r in mine]):.2f} "
                   f"exponent_flops={fit_exponent(xs, [r.flops for r in mine]):.2f}")
    return out


def header(threads: int, peak: Peak) -> str:
    """Machine, versions and load: timings are only comparable within one run."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"# search_speed  host cpus={os.cpu_count()} torch={torch.__version__} threads={threads} "
            f"load_average(1,5,15 min)=({load})\n# matmul peak (float32, {threads} thread(s)): "
            f"{peak.wall / 1e9:.1f} GFLOP/s wall, {peak.cpu / 1e9:.1f} GFLOP/s per CPU second")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512, help="selection prompts (both sides)")
    p.add_argument("--max-drop", type=int, default=None, help="bound the rounds (both sides)")
    p.add_argument("--epsilon", type=float, default=0.08)
    p.add_argument("--metric", default="nmse", choices=["nmse", "tol_acc"])
    p.add_argument("--batch", type=int, default=128, help="tapioca's chunk size, as pruning.batch_size (naive: 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads for both sides (default: torch's own, the machine's cores)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="tapioca.perf.keep_freed_memory() for the whole process, both sides (default: on)")
    p.add_argument("--model", default=str(ZOO / "testbed-L8-D64-seed0"), help="testbed model folder")
    p.add_argument("--cases", nargs="+", choices=["testbed", "lm"], default=["testbed", "lm"],
                   help="testbed: the zoo model on polynomial regression; lm: SmolLM2-135M on arithmetic")
    p.add_argument("--lm-n", type=int, default=16, help="selection examples for the LM case (both sides)")
    p.add_argument("--lm-max-drop", type=int, default=2, help="rounds for the LM case (both sides)")
    p.add_argument("--lm-cache-dir", help="tapioca model cache holding the converted LM (default: $TAPIOCA_CACHE)")
    p.add_argument("--workers", type=int, default=0, help="also time tale on this many local Ray workers")
    p.add_argument("--racing", type=float, metavar="DELTA",
                   help="also run tale with racing at this error bound (reported apart: racing is not exact TALE)")
    p.add_argument("--racing-min", type=int, default=64, help="racing: examples in the first stage")
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="also time tale_search batched without prefix reuse (separates the two gains)")
    p.add_argument("--sweep", choices=["L", "N", "both"], help="scaling sweep instead of the comparison")
    p.add_argument("--sweep-blocks", type=int, nargs="+", default=[4, 8, 12, 16])
    p.add_argument("--sweep-examples", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--sweep-rounds", type=int, default=1, help="TALE rounds per sweep point")
    p.add_argument("--sweep-fixed-n", type=int, default=128, help="N for the L sweep")
    p.add_argument("--sweep-fixed-l", type=int, default=4,
                   help="L for the N sweep (the N exponent does not depend on depth; 4 keeps the naive side short)")
    return p.parse_args(argv)


def run_sweeps(args: argparse.Namespace, peak: Peak) -> None:
    kinds = ["L", "N"] if args.sweep == "both" else [args.sweep]
    for kind in kinds:
        values, fixed = (args.sweep_blocks, args.sweep_fixed_n) if kind == "L" else (args.sweep_examples, args.sweep_fixed_l)
        rows = sweep(kind, values, fixed, args.sweep_rounds, args.batch)
        print(format_table(rows, peak), flush=True)
        print("\n".join(exponent_lines(kind, rows)), flush=True)


def run_comparison(args: argparse.Namespace, peak: Peak) -> None:
    model = load_model(args.model) if "testbed" in args.cases else None
    cases: dict[str, tuple[Callable[[], Case], int | None]] = {
        "testbed": (lambda: testbed_case(Path(args.model).name, model, args.n, args.metric), args.max_drop),
        "lm": (lambda: smollm_case(args.lm_n, args.lm_cache_dir), args.lm_max_drop),
    }
    verdicts = []
    for make, max_drop in (cases[name] for name in args.cases):
        try:
            case = make()
            rows = compare(case, args.epsilon, max_drop, args.batch, args.workers, args.ablation)
        except Skip as why:
            print(f"skipped: {why}", flush=True)
            continue
        print(f"# {case.name}: N={len(case.batch)}, T={case.cost.seq_len} tokens per example, "
              f"{case.shared_tokens} of them a prompt prefix every example shares", flush=True)
        print(format_table(rows, peak), flush=True)
        print(f"speed-up over naive: {gains(rows)}")
        print(f"max |score difference| naive vs tapioca: {max_score_difference(rows[0].result, rows[1].result):.2e}")
        if args.racing is not None:
            print(racing_line(case, rows[1], args.racing, args.racing_min, args.batch), flush=True)
        verdicts.append(verdict(rows))
    print("\n".join(verdicts))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.keep_freed_memory else False
    peak = matmul_peak(args.threads)
    print(f"{header(args.threads, peak)}\n# malloc keeps freed memory (tapioca.perf): {str(kept).lower()}", flush=True)
    run_sweeps(args, peak) if args.sweep else run_comparison(args, peak)


if __name__ == "__main__":
    main()
