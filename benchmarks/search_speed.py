"""Search speed: the naive TALE loop against tapioca's ``tale_search``, same model, data and machine, one run.

    python benchmarks/search_speed.py                      # testbed seed 0, 512 ID selection prompts
    python benchmarks/search_speed.py --n 256 --max-drop 2 # smaller; both sides get the same n and rounds
    python benchmarks/search_speed.py --sweep L            # cost vs blocks (untrained, width 64), fitted exponent
    python benchmarks/search_speed.py --sweep N            # cost vs examples; --sweep both for the two
    python benchmarks/search_speed.py --workers 2          # add a row for Ray workers (tapioca.pruning.parallel)
    python benchmarks/search_speed.py --cases gen-mc gen-arith   # SmolLM2 scored by greedy generation

Prints a table (configurations evaluated, wall time, tokens/s, peak RSS, achieved FLOP/s as a fraction of a
measured float32 matmul peak) and one line per model: ``model=<name> speedup_vs_naive=<x> identical_selection=<b>``.
FLOPs are an analytic estimate of the work actually executed (skipped blocks cost nothing):
2·(matmul parameters)·tokens per block plus attention 4·T²·D per sequence. Timings are wall clock on a
possibly shared machine: the header prints the load average. Nothing here asserts on time.

The generation cases score TALE as published: by greedy generation and an answer rule. ``gen-mc``: MMLU
multiple choice, one new token, TALE's first-letter rule (one forward pass per candidate, prefix reuse);
``gen-arith``: short-answer arithmetic, several new tokens, tapioca's checker (cached batched decoding whose
prompt pass resumes below each candidate's block). Each is timed against a batch-1 loop of
``HFModel.generate`` (greedy, KV cache) scored by the same rule, in the same process.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_cases import (  # noqa: E402
    GEN_CASES, ZOO, Case, Skip, generation_case, smollm_case, testbed_case, untrained_icl,
)
from speed_cost import (  # noqa: E402
    CostModel, DecodeCost, Peak, executed_passes, generation_flops, matmul_peak, search_flops,
)
from naive_tale import naive_tale  # noqa: E402

from tapioca.models.icl import ICLModel, load_model  # noqa: E402
from tapioca.perf import keep_freed_memory  # noqa: E402
from tapioca.pruning.searches import PruneResult, SearchContext, tale_search  # noqa: E402

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
    decode_profile: Any = field(default=None, repr=False)  # generation cases: (DecodeProfile, each pass's ids)


def measure(model: str, side: str, n_examples: int, cost: CostModel, prefix: bool, run: Callable[[], PruneResult],
            record_passes: int = 1, flop_examples: float | None = None,
            decode: "DecodeCost | None" = None) -> Row:
    """Run one search, timing it and sampling its peak RSS. ``flop_examples``: examples' worth of tokens each
    forward computes (fewer than ``n_examples`` when a shared prompt prefix is run once per chunk);
    ``decode``: the search generates (its FLOPs are :func:`generation_flops`)."""
    with PeakRSS() as rss:
        start, cpu = time.perf_counter(), time.process_time()
        result = run()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    configs = int(result.info["configurations_evaluated"])
    examples = n_examples if flop_examples is None else flop_examples
    flops = (search_flops(result, cost, examples, prefix, record_passes) if decode is None
             else generation_flops(result, cost, decode, examples, n_examples, prefix))
    return Row(model, side, n_examples, configs, len(result.rounds), seconds, cpu, configs * n_examples * cost.seq_len,
               flops, rss.peak, rss.peak - rss.start, result)


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


# --------------------------------------------------------------------------------------------- runs


def compare(case: Case, epsilon: float, max_drop: int | None, chunk: int, workers: int = 0,
            ablation: bool = True) -> list[Row]:
    """Naive (batch 1, from scratch) and tapioca's tale_search (chunk, prefix reuse) on one case; with
    ``ablation`` also tale_search batched but without prefix reuse, to separate the two gains."""
    n = len(case.batch)
    naive_scorer = case.scorer(1)
    rows = [measure(case.name, "naive", n, case.cost, False,
                    lambda: naive_tale(naive_scorer, case.model.n_blocks, epsilon, max_drop), decode=case.decode)]
    captured: list[torch.Tensor] = []  # generation cases: every pass's generated ids, for decode_sharing_line

    def recorded(predictions: torch.Tensor, batch: Any) -> torch.Tensor:
        captured.append(predictions)
        return case.score_predictions(predictions, batch)

    ctx = SearchContext(model=case.model, batch=case.batch, scorer=case.scorer(chunk),
                        score_predictions=recorded if case.decode is not None else case.score_predictions,
                        epsilon=epsilon, max_drop=max_drop, chunk=chunk, progress=False)
    batched = case.flop_examples(chunk)
    profile = decode_profile()
    if profile is not None:
        profile.reset()
    rows.append(measure(case.name, "tapioca", n, case.cost, True, lambda: tale_search(ctx), flop_examples=batched,
                        decode=case.decode))
    if profile is not None:
        rows[-1].decode_profile = (dataclasses.replace(profile), list(captured))
    if ablation:
        plain = dataclasses.replace(ctx, prefix_cache=False, score_predictions=case.score_predictions)
        rows.append(measure(case.name, "batched only", n, case.cost, False, lambda: tale_search(plain),
                            flop_examples=batched, decode=case.decode))
    if workers:
        try:
            rows.append(ray_row(case, ctx, workers))
        except Skip as why:
            print(f"skipped: ray row of {case.name}: {why}", flush=True)
    return rows


def decode_profile() -> Any:
    """tapioca's greedy-decoding profile (prompt vs decode seconds), or None without the HF adapter."""
    try:
        from tapioca.models.decoding import PROFILE
    except ImportError:
        return None
    return PROFILE


def decode_sharing_line(case: Case, row: Row) -> str:
    """Is sharing decode steps across candidates worth it? A resumed candidate's blocks below its first
    computed block see its base's tokens until its generation departs from the base's (its base: the
    configuration without the block it resumed at, recorded earlier), so those blocks' decode steps could be
    shared while the tokens agree. Measured on the tapioca row: its prompt and decode seconds, the mean share
    of kept blocks below each resumed pass's first block, and the share of each row's generated tokens before
    its first departure from the base's. Bounds: decode seconds x block share (every row agreeing to the end),
    and x block share x agreement (per row; a batched step is shared only while all its rows agree, so less)."""
    if row.decode_profile is None or row.result is None or case.decode is None or not case.decode.steps:
        return ""
    prof, captured = row.decode_profile
    passes = list(executed_passes(row.result, True))
    block_shares, agreements = [], []
    for k, (removed, first) in enumerate(passes):
        if first == 0:
            continue
        block_shares.append(sum(1 for j in range(first) if j not in removed) / (row.result.n_blocks - len(removed)))
        base = sorted(set(removed) - {first - 1})
        earlier = [i for i in range(k) if sorted(passes[i][0]) == base]
        if len(captured) == len(passes) and earlier:
            agreements.append(_agreement(captured[k], captured[earlier[-1]]))
    block = sum(block_shares) / max(len(block_shares), 1)
    line = (f"decode sharing ({case.name}): prompt passes {prof.prompt_seconds:.1f} s, decode steps "
            f"{prof.decode_seconds:.1f} s ({prof.steps} batched steps) of {row.seconds:.1f} s; a resumed pass's "
            f"blocks below its first block: {100 * block:.0f} % of its kept blocks; sharing their decode steps saves "
            f"at most {prof.decode_seconds * block:.1f} s ({100 * prof.decode_seconds * block / row.seconds:.0f} %)")
    if agreements:
        agree = sum(agreements) / len(agreements)
        saved = prof.decode_seconds * block * agree
        line += (f"; rows' tokens agree with the base's for {100 * agree:.0f} % of their length, so at most "
                 f"{saved:.1f} s ({100 * saved / row.seconds:.0f} %) with per-row sharing")
    return line


def _agreement(tokens: torch.Tensor, base: torch.Tensor) -> float:
    """Mean over rows of the share of a generation (R, S) (-1 after stopping) before its first token that
    differs from the base generation's."""
    shares = []
    for row, ref in zip(tokens.tolist(), base.tolist()):
        length = sum(1 for t in row if t >= 0)
        same = next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b or a < 0), len(row))
        shares.append(min(same, length) / max(length, 1))
    return sum(shares) / max(len(shares), 1)


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


def ceiling_line(rows: Sequence[Row], peak: Peak) -> str:
    """How far the executed work lets tapioca go: the FLOP ratio naive/tapioca, and the speed-up tapioca would
    reach if its FLOPs ran at the measured matmul peak (wall) against the naive side as measured. A target above
    this ceiling needs fewer FLOPs, not a faster kernel."""
    naive, fast = rows[0], rows[1]
    ratio = naive.flops / fast.flops if fast.flops > 0 else float("nan")
    best_seconds = fast.flops / peak.wall
    ceiling = naive.seconds / best_seconds if best_seconds > 0 else float("nan")
    return (f"executed FLOPs naive/tapioca: {ratio:.2f}x; speed-up ceiling with tapioca at 100 % of the matmul "
            f"peak: {ceiling:.2f}x")


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
    p.add_argument("--cases", nargs="+", choices=["testbed", "lm", *GEN_CASES],
                   default=["testbed", "lm", *GEN_CASES],
                   help="testbed: the zoo model on polynomial regression; lm: SmolLM2-135M on arithmetic "
                        "(log-likelihood); gen-mc / gen-arith: SmolLM2 scored by greedy generation (MMLU, first "
                        "letter of one new token; arithmetic, several new tokens)")
    p.add_argument("--lm-n", type=int, default=16, help="selection examples for the LM case (both sides)")
    p.add_argument("--lm-max-drop", type=int, default=2, help="rounds for the LM case (both sides)")
    p.add_argument("--lm-cache-dir", help="tapioca model cache holding the converted LM (default: $TAPIOCA_CACHE)")
    p.add_argument("--gen-mc-n", type=int, default=40, help="MMLU questions for gen-mc (both sides)")
    p.add_argument("--gen-arith-n", type=int, default=32, help="arithmetic questions for gen-arith (both sides)")
    p.add_argument("--gen-max-drop", type=int, default=2, help="rounds for the generation cases (both sides)")
    p.add_argument("--gen-max-new-tokens", type=int, help="gen-arith: new tokens (default 8)")
    p.add_argument("--gen-arith-rule", choices=["checker", "final_number"], default="checker",
                   help="gen-arith: answer rule (tapioca's checker, or TALE's final number of the generation)")
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
    cases: dict[str, tuple[Callable[[], Case], int | None, int]] = {  # name -> (case, max_drop, chunk)
        "testbed": (lambda: testbed_case(Path(args.model).name, model, args.n, args.metric), args.max_drop, args.batch),
        "lm": (lambda: smollm_case(args.lm_n, args.lm_cache_dir), args.lm_max_drop, args.batch),
        "gen-mc": (lambda: generation_case("gen-mc", args.gen_mc_n, args.lm_cache_dir), args.gen_max_drop,
                   args.batch),
        "gen-arith": (lambda: generation_case("gen-arith", args.gen_arith_n, args.lm_cache_dir,
                                              args.gen_max_new_tokens, args.gen_arith_rule), args.gen_max_drop,
                      args.batch),
    }
    verdicts = []
    for make, max_drop, chunk in (cases[name] for name in args.cases):
        try:
            case = make()
            rows = compare(case, args.epsilon, max_drop, chunk, args.workers, args.ablation)
        except Skip as why:
            print(f"skipped: {why}", flush=True)
            continue
        print(f"# {case.name}: N={len(case.batch)}, T={case.cost.seq_len} tokens per example, "
              f"{case.shared_tokens} of them a prompt prefix every example shares", flush=True)
        print(format_table(rows, peak), flush=True)
        print(f"speed-up over naive: {gains(rows)}")
        print(f"max |score difference| naive vs tapioca: {max_score_difference(rows[0].result, rows[1].result):.2e}")
        print(ceiling_line(rows, peak), flush=True)
        sharing = decode_sharing_line(case, rows[1])
        if sharing:
            print(sharing, flush=True)
        if args.racing is not None and case.decode is None:  # racing resumes one forward pass, not a decoding
            print(racing_line(case, rows[1], args.racing, args.racing_min, chunk), flush=True)
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
