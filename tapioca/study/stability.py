"""Stability of the TALE selection: how many labelled examples does a reliable selection need?

For every model seed (``evaluation.seeds``), distribution, selection size ``n`` of a ladder and resample
``r``, TALE (the ``pruning`` settings) selects on ``n`` examples of the selection role drawn with sampling
seed ``1000 * r + seed``; the full and the pruned model are then scored on the fixed held-out split
(:class:`~tapioca.analysis.heldout.HeldoutRuns`, primary metric) and, in the same way, on the very selection
examples (the in-sample gain in the primary metric). The testbed draws a fresh prompt set per resample; a text
task's pool is finite, so ``n`` examples are drawn without replacement from the first :data:`POOL_CAP`
examples of the seed's selection role (``n`` clipped to the pool, with a message), keeping every draw disjoint
from the held-out role.

Per (distribution, n) it reports the mean pairwise Jaccard overlap of the removed block sets across resamples
(within a seed, averaged over seeds), the share of resamples removing nothing, the held-out gain (pruned −
full, signed so that positive = better) with its spread, the in-sample gain (TALE's own ``selection_score -
baseline_score``, in the selection metric; and in the primary metric), the optimism (in-sample − held-out
gain, primary metric) and "stable from": the smallest ``n`` from which, at every larger ``n`` of the ladder
too, the Jaccard overlap is ≥ 0.8 and the held-out gain's sign agrees in ≥ 80% of the resamples.

Outputs in ``out``: ``stability/seed<s>/<dist>/n<n>-r<r>.search.json`` and ``….eval.json`` (one per unit,
written atomically and reused on a rerun), ``stability.json``, ``stability.md`` and ``stability.png``.
``stability.json`` keys: ``kind``, ``primary_metric``, ``selection_metric``, ``higher_is_better``, ``seeds``,
``distributions``, ``sizes``, ``repeats``, ``thresholds``, ``pruning``, ``n_heldout``, ``pool_cap``, ``rows``
(dist -> str(n) -> summary, see :func:`summarize`), ``stable_from`` (dist -> n or None), ``answer``,
``seconds`` (this call) and ``seconds_total`` (wall seconds of every call on ``out``, summed).

Measured: the testbed default (``tapioca stability``: the shipped 8-block models of seeds 0, 1, 2; id, x_scale_2
and degree_4; sizes 16, 32, 64, 128, 256; 5 resamples; 225 searches) took 5.5 min (331 s) wall on the 2-core
CPU while another engineer's language-model study ran on the same cores, and 7.5 min (448 s) in an earlier run
when a test suite ran too (the same numbers both times). Time grows with the sum of the sizes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tapioca.analysis.evaluation import MIN_SPLIT
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.api import prune
from tapioca.config import Config, distributions as config_distributions, to_dict
from tapioca.errors import ConfigError, DataError
from tapioca.io import atomic_write_bytes, write_json
from tapioca.study.rundir import Log, SeedThreads, Timer, cached_json, prepare_run_dir, seed_workers
from tapioca.study.steps import open_workloads
from tapioca.tasks.base import Workload
from tapioca.tasks.polyreg import PolyRegTask

TESTBED_SIZES = (16, 32, 64, 128, 256)  # selection prompts (the default fits 10 min on 2 CPU cores)
LM_SIZES = (16, 32, 64, 128, 256)  # selection questions
TESTBED_DISTRIBUTIONS = ("id", "x_scale_2", "degree_4")  # testbed default (those of them the config has)
DEFAULT_REPEATS = 5
SEED_STRIDE = 1000  # resample r of model seed s draws with sampling seed SEED_STRIDE * r + s
POOL_CAP = 2048  # text tasks: resamples are drawn from at most this many selection examples
THRESHOLD = 0.8  # "stable": Jaccard >= 0.8 and the held-out gain's sign agreeing in >= 80% of resamples


# ---------------------------------------------------------------------------------------------------------
# Agreement helpers


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """|a ∩ b| / |a ∪ b| of two block sets; two empty sets are identical (1.0)."""
    a, b = set(a), set(b)
    return 1.0 if not a | b else len(a & b) / len(a | b)


def mean_pairwise_jaccard(sets: Sequence[Iterable[int]]) -> float | None:
    """Mean Jaccard overlap over all pairs of ``sets``; None for fewer than two sets."""
    pairs = list(itertools.combinations([set(s) for s in sets], 2))
    return float(np.mean([jaccard(a, b) for a, b in pairs])) if pairs else None


def sign_agreement(gains: Sequence[float]) -> float:
    """Share of ``gains`` (n,) having the most common sign (exactly 0, i.e. nothing removed, is a sign too)."""
    counts = Counter(int(np.sign(g)) for g in gains)
    return max(counts.values()) / len(gains)


def stable_from(sizes: Sequence[int], overlaps: Sequence[float | None], agreements: Sequence[float],
                threshold: float = THRESHOLD) -> int | None:
    """The smallest size from which every size (itself and all larger ones) has overlap >= ``threshold`` and
    sign agreement >= ``threshold``; None when even the largest size falls short ("not within the ladder")."""
    found = None
    for n, overlap, agree in sorted(zip(sizes, overlaps, agreements), reverse=True):
        if overlap is None or overlap < threshold or agree < threshold:
            break
        found = n
    return found


def signed_gain(full: float, pruned: float, higher_is_better: bool) -> float:
    """Pruned − full, signed so that positive means the pruned model is better."""
    return pruned - full if higher_is_better else full - pruned


# ---------------------------------------------------------------------------------------------------------
# Selection sets


@dataclass
class Draw:
    """One resample's selection examples (a testbed ``PolyBatch`` or a list of text examples)."""

    examples: Any
    n: int  # examples drawn: the size asked for, clipped to the pool
    sample_seed: int
    pool: int | None  # text tasks: how many selection examples the draw was made from


def pool_size(task: Any, dist: str, seed: int, cap: int) -> int:
    """How many selection examples (at most ``cap``) ``task`` holds for ``dist`` and ``seed``."""
    try:
        task.data(dist, "select", seed, cap)
        return cap
    except DataError:
        pass
    ok, too_many = 0, cap  # the task's role lists are cached, so each probe after the first is cheap
    while too_many - ok > 1:
        mid = (ok + too_many) // 2
        try:
            task.data(dist, "select", seed, mid)
            ok = mid
        except DataError:
            too_many = mid
    return ok


def draw_selection(wl: Workload, dist: str, seed: int, repeat: int, n: int, cap: int = POOL_CAP) -> Draw:
    """Resample ``repeat``'s ``n`` selection examples of ``dist`` for model seed ``seed``: a fresh testbed
    draw, or ``n`` of a text task's finite selection pool (without replacement, clipped to the pool)."""
    sample_seed = SEED_STRIDE * repeat + seed
    task = wl.task  # type: ignore[attr-defined]
    if isinstance(task, PolyRegTask):
        return Draw(task.data(dist, "select", sample_seed, n), n, sample_seed, None)
    pool = task.data(dist, "select", seed, pool_size(task, dist, seed, cap))
    take = min(n, len(pool))
    if take < MIN_SPLIT:
        raise DataError(f"distribution {dist!r}: the selection pool holds {len(pool)} examples (seed {seed}); "
                        f"a search needs at least {MIN_SPLIT}")
    picked = np.sort(np.random.default_rng(sample_seed).choice(len(pool), take, replace=False))
    return Draw([pool[int(i)] for i in picked], take, sample_seed, len(pool))


class FixedSelection:
    """``task`` whose "select" role of ``dist`` is ``draw.examples``: a search on a workload holding it selects
    on them, and :class:`HeldoutRuns` with role "select" scores them (the in-sample evaluation). Every other
    split, and every other attribute, is the task's own."""

    def __init__(self, task: Any, dist: str, draw: Draw) -> None:
        self.task, self.dist, self.draw = task, dist, draw

    def data(self, distribution: str, role: str, seed: int, n: int) -> Any:
        if distribution == self.dist and role == "select":
            if n != self.draw.n:
                raise ValueError(f"the fixed selection holds {self.draw.n} examples, {n} were asked for")
            return self.draw.examples
        return self.task.data(distribution, role, seed, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)


def on_selection(wl: Workload, dist: str, draw: Draw) -> Workload:
    """``wl`` whose selection split of ``dist`` is ``draw``."""
    sizes = dataclasses.replace(wl.sizes, n_select=draw.n)
    return dataclasses.replace(wl, task=FixedSelection(wl.task, dist, draw), sizes=sizes)  # type: ignore


# ---------------------------------------------------------------------------------------------------------
# One unit: (seed, dist, n, repeat)


def unit_search(cfg: Config, wl: Workload, seed: int, dist: str, n: int, repeat: int, stem: Path) -> dict:
    """TALE on resample ``repeat`` of ``n`` selection examples (cached as ``<stem>.search.json``)."""
    def compute() -> dict:
        draw = draw_selection(wl, dist, seed, repeat, n)
        result = prune(on_selection(wl, dist, draw), None, "tale", "target", dist, cfg=cfg.pruning, seed=seed,
                       progress=False, cache_path=stem.with_name(f".{stem.name}.scores.json"))
        result.info.update(asked=n, n_used=draw.n, sample_seed=draw.sample_seed, pool=draw.pool)
        return result.to_dict()

    return cached_json(stem.with_name(f"{stem.name}.search.json"), compute)


def unit_evaluation(wl: Workload, runs: HeldoutRuns, search: dict, seed: int, dist: str, n: int, repeat: int,
                    stem: Path) -> dict:
    """Held-out and in-sample primary-metric scores of the full and the pruned model (cached as
    ``<stem>.eval.json``). In-sample runs only when blocks were removed (otherwise its gain is exactly 0)."""
    metric, up = wl.primary_metric, wl.metrics[wl.primary_metric]

    def compute() -> dict:
        removed = search["removed"]
        full, pruned = (runs.one(r, dist).mean(dist, metric) for r in ([], removed))
        in_full = in_pruned = None
        if removed:
            draw = draw_selection(wl, dist, seed, repeat, n)
            own = HeldoutRuns(on_selection(wl, dist, draw), seed, draw.n, role="select")
            in_full, in_pruned = (own.one(r, dist).mean(dist, metric) for r in ([], removed))
        heldout = signed_gain(full, pruned, up)
        in_sample = signed_gain(in_full, in_pruned, up) if removed else 0.0
        return {"removed": removed, "n_used": search["info"]["n_used"],
                "heldout": {"full": full, "pruned": pruned, "gain": heldout},
                "in_sample": {"full": in_full, "pruned": in_pruned, "gain": in_sample,
                              "selection_gain": search["selection_score"] - search["baseline_score"]},
                "optimism": in_sample - heldout}

    return cached_json(stem.with_name(f"{stem.name}.eval.json"), compute)


# ---------------------------------------------------------------------------------------------------------
# Summaries


def _spread(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def summarize(units: list[dict]) -> dict:
    """One (distribution, n) from its unit records (each: ``seed``, ``repeat``, ``pool`` and an eval json).
    Overlap and sign agreement are computed across the resamples of each seed, then averaged over seeds; gains
    are pooled over seeds and resamples. ``resampled`` is False when some seed's draws were its whole (text)
    pool, so that every resample was the same set."""
    by_seed: dict[int, list[dict]] = {}
    for u in units:
        by_seed.setdefault(u["seed"], []).append(u)
    overlaps = [mean_pairwise_jaccard([u["removed"] for u in us]) for us in by_seed.values()]
    overlaps = [o for o in overlaps if o is not None]
    heldout = [u["heldout"]["gain"] for u in units]
    pools = [u["pool"] for u in units if u.get("pool") is not None]
    return {
        "n_used": min(u["n_used"] for u in units),
        "pool": min(pools) if pools else None,  # text tasks: the smallest pool a seed drew from
        "resampled": all(u.get("pool") is None or u["n_used"] < u["pool"] for u in units),
        "jaccard": float(np.mean(overlaps)) if overlaps else None,
        "removes_nothing": float(np.mean([not u["removed"] for u in units])),
        "sign_agreement": float(np.mean([sign_agreement([u["heldout"]["gain"] for u in us])
                                         for us in by_seed.values()])),
        "heldout_gain": _spread(heldout),
        "in_sample_selection_gain": _spread([u["in_sample"]["selection_gain"] for u in units]),
        "in_sample_gain": _spread([u["in_sample"]["gain"] for u in units]),
        "optimism": _spread([u["optimism"] for u in units]),
        "units": [{k: u[k] for k in ("seed", "repeat", "removed")} | {"heldout_gain": u["heldout"]["gain"],
                                                                       "optimism": u["optimism"]} for u in units],
    }


def answer(stable: dict[str, int | None], judged: dict[str, list[int]], unit: str) -> str:
    """The one-sentence answer: from how many examples the selection is stable, per distribution (``judged``:
    the sizes "stable from" was decided on)."""
    parts = [f"{n} {unit} on {d}" if n is not None else
             f"more than {max(judged[d])} on {d} (not within the ladder)" if judged[d] else
             f"an unknown number on {d} (every size took the whole selection pool)" for d, n in stable.items()]
    return (f"A stable TALE selection (block-set overlap ≥ {THRESHOLD:.0%} and the held-out gain's sign agreeing "
            f"in ≥ {THRESHOLD:.0%} of resamples, at that size and every larger one) needs " + "; ".join(parts) + ".")


# ---------------------------------------------------------------------------------------------------------
# The run


def default_sizes(cfg: Config) -> tuple[int, ...]:
    return TESTBED_SIZES if cfg.lm is None else LM_SIZES


def parse_sizes(text: str) -> list[int]:
    """``"64,256,1024"`` -> [64, 256, 1024] (checked by :func:`check_sizes`)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--sizes: {text!r} is not allowed; give comma-separated integers, "
                          "e.g. 64,256,1024") from None
    return check_sizes(sizes)


def check_sizes(sizes: Sequence[int]) -> list[int]:
    """Distinct sizes >= MIN_SPLIT, sorted; else a :class:`ConfigError`."""
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or n < MIN_SPLIT:
            raise ConfigError(f"--sizes: {n!r} is not allowed; give selection sizes >= {MIN_SPLIT}, e.g. 64,256,1024")
    if len(set(sizes)) != len(sizes) or not sizes:
        raise ConfigError(f"--sizes: {list(sizes)} is not allowed; give one or more distinct sizes")
    return sorted(sizes)


def choose_distributions(cfg: Config, available: list[str], asked: Sequence[str] | None) -> list[str]:
    """``asked`` (checked against ``available``), or the default: the testbed's id, x_scale_2 and degree_4
    (those the config has; every distribution when it has neither shift), a language model's every one."""
    if asked:
        unknown = [d for d in asked if d not in available]
        if unknown:
            raise ConfigError(f"--dists: unknown distribution {unknown[0]!r}; allowed: {available}")
        return list(dict.fromkeys(asked))
    if cfg.lm is None:
        chosen = [d for d in TESTBED_DISTRIBUTIONS if d in available]
        return chosen if len(chosen) > 1 else available
    return available


def run_stability(cfg: Config, out: str | Path | None = None, sizes: Sequence[int] | None = None,
                  repeats: int = DEFAULT_REPEATS, distributions: Sequence[str] | None = None,
                  progress: bool = True, log: Log = print) -> dict:
    """Every (seed, distribution, size, resample) search and evaluation (each cached), then
    ``stability.json``, ``stability.md`` and ``stability.png`` in ``out`` (default ``run.out``)."""
    start = time.perf_counter()
    out = Path(out if out is not None else cfg.run.out)
    sizes = check_sizes(list(sizes) if sizes else list(default_sizes(cfg)))
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"--repeats: {repeats!r} is not allowed; give an integer >= 1")
    if cfg.lm is None:  # a bad --dists fails before any model is trained
        choose_distributions(cfg, config_distributions(cfg.task), distributions)
    prepare_run_dir(cfg, out)
    seeds = list(cfg.evaluation.seeds)
    threads = SeedThreads(seed_workers(cfg))
    timer = Timer(out / "stability" / "timings.json")  # wall seconds, summed over calls (a resumed run adds up)
    with timer("stability"):
        workload_of = open_workloads(cfg, out, timer, progress and threads.workers == 1, log)
        first = workload_of(seeds[0])
        dists = choose_distributions(cfg, first.distributions, distributions)
        units = [(dist, n, r) for dist in dists for n in sizes for r in range(repeats)]
        bar = tqdm(total=len(seeds) * len(units), disable=not progress, desc="stability", unit="search")
        try:
            per_seed = threads.map(lambda seed: seed_units(cfg, first if seed == seeds[0] else workload_of(seed),
                                                           seed, units, out, threads, bar, log), seeds)
        finally:
            torch.set_num_threads(threads.threads)
            bar.close()
    results = gather(cfg, first, [r for s in seeds for r in per_seed[s]], seeds, dists, sizes, repeats)
    results.update(seconds=time.perf_counter() - start, seconds_total=timer.seconds["stability"])
    write_json(out / "stability.json", results)
    atomic_write_bytes(out / "stability.md", render_markdown(results).encode("utf-8"))
    atomic_write_bytes(out / "stability.png", plot_png(results))
    return results


_BAR_LOCK = threading.Lock()


def seed_units(cfg: Config, wl: Workload, seed: int, units: list[tuple[str, int, int]], out: Path,
               threads: SeedThreads, bar: Any, log: Log) -> list[dict]:
    """The (dist, n, repeat) ``units`` of one seed, in order (one held-out pass of the full model per
    distribution), as records: the unit's eval json with ``seed``, ``dist``, ``n``, ``repeat`` and ``pool``."""
    runs, records = HeldoutRuns(wl, seed, wl.sizes.n_heldout), []
    for dist, n, repeat in units:
        threads.fit()  # shares the CPU threads among the seeds still running; stops after another seed failed
        stem = out / "stability" / f"seed{seed}" / dist / f"n{n}-r{repeat}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        search = unit_search(cfg, wl, seed, dist, n, repeat, stem)
        if repeat == 0 and search["info"]["n_used"] < n:
            log(f"seed {seed}, {dist}: n={n} clipped to the {search['info']['n_used']} examples the selection "
                "pool holds; every resample is that whole pool, so this size is left out of 'stable from'")
        ev = unit_evaluation(wl, runs, search, seed, dist, n, repeat, stem)
        records.append({"seed": seed, "dist": dist, "n": n, "repeat": repeat, "pool": search["info"]["pool"], **ev})
        with _BAR_LOCK:
            bar.update(1)
            bar.set_postfix_str(f"seed {seed} {dist} n={n} r={repeat}", refresh=False)
    return records


def gather(cfg: Config, wl: Workload, records: list[dict], seeds: list[int], dists: list[str], sizes: list[int],
           repeats: int) -> dict:
    """stability.json (without ``seconds``) from every unit record."""
    rows = {d: {str(n): summarize([r for r in records if r["dist"] == d and r["n"] == n]) for n in sizes}
            for d in dists}
    judged = {d: [n for n in sizes if rows[d][str(n)]["resampled"]] for d in dists}  # whole-pool sizes: left out
    stable = {d: stable_from(judged[d], [rows[d][str(n)]["jaccard"] for n in judged[d]],
                             [rows[d][str(n)]["sign_agreement"] for n in judged[d]]) for d in dists}
    unit = "selection prompts" if wl.kind == "testbed" else "selection examples"
    return {"kind": wl.kind, "primary_metric": wl.primary_metric, "selection_metric": wl.selection_metric,
            "higher_is_better": wl.metrics[wl.primary_metric], "seeds": seeds, "distributions": dists,
            "sizes": sizes, "repeats": repeats, "thresholds": {"jaccard": THRESHOLD, "sign_agreement": THRESHOLD},
            "pruning": to_dict(cfg.pruning), "n_heldout": wl.sizes.n_heldout,
            "pool_cap": None if wl.kind == "testbed" else POOL_CAP, "rows": rows, "stable_from": stable,
            "answer": answer(stable, judged, unit)}


# ---------------------------------------------------------------------------------------------------------
# Report


def _f(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.4g}" if signed else f"{x:.3g}"


def render_markdown(results: dict) -> str:
    """stability.md: the answer first, then the table and "stable from" per distribution."""
    metric, p = results["primary_metric"], results["pruning"]
    lines = [
        "# Stability of the TALE selection", "", f"**{results['answer']}**", "",
        f"{results['kind']} · seeds {results['seeds']} · {results['repeats']} resamples per size · held-out "
        f"{results['n_heldout']} examples per seed · TALE epsilon {p['epsilon']}, choose {p['choose']}, max_drop "
        f"{p['max_drop']} · gains in {metric} (positive = pruned better) unless said otherwise; selection metric "
        f"{results['selection_metric']} · wall time {results['seconds_total'] / 60:.1f} min (this call "
        f"{results['seconds'] / 60:.1f} min).", "",
        "| distribution | n | Jaccard | removes nothing | held-out gain mean ± sd [min, max] | sign agreement | "
        f"in-sample gain ({results['selection_metric']}, TALE) | in-sample gain ({metric}) | optimism |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for dist, by_n in results["rows"].items():
        for n, row in by_n.items():
            g, o = row["heldout_gain"], row["optimism"]
            shown = n if row["n_used"] == int(n) else f"{n} → {row['n_used']}"
            if row["pool"] is not None:
                shown += " (whole pool)" if not row["resampled"] else f" (of {row['pool']})"
            lines.append(
                f"| {dist} | {shown} | {_f(row['jaccard'])} | {row['removes_nothing']:.0%} | {_f(g['mean'], True)} "
                f"± {_f(g['sd'])} [{_f(g['min'], True)}, {_f(g['max'], True)}] | {row['sign_agreement']:.0%} | "
                f"{_f(row['in_sample_selection_gain']['mean'], True)} | {_f(row['in_sample_gain']['mean'], True)} | "
                f"{_f(o['mean'], True)} ± {_f(o['sd'])} |")
    lines += ["", "Stable from: " + "; ".join(
        f"{d}: {n if n is not None else 'not within the ladder'}" for d, n in results["stable_from"].items()) + ".",
        "", "Jaccard: mean pairwise overlap of the removed block sets across resamples of one seed, averaged over "
        "seeds (two empty sets count as identical). Sign agreement: share of a seed's resamples whose held-out gain "
        "has the most common sign (0 = nothing removed), averaged over seeds. Optimism: in-sample − held-out gain, "
        f"both in {metric}.", ""]
    if results["pool_cap"] is not None:
        lines[-1:-1] = ["", "Text tasks: \"n (of P)\" draws n of the seed's first P selection examples per resample "
                        "(the smaller P of the seeds shown; P is at most the pool cap "
                        f"{results['pool_cap']}); \"whole pool\" marks a size clipped to the pool, where every "
                        "resample is the same set: it is left out of \"stable from\"."]
    return "\n".join(lines)


def plot_png(results: dict) -> bytes:
    """stability.png: Jaccard overlap, held-out gain (mean ± sd, min–max shaded) and optimism (mean ± sd)
    against the selection size (log scale), one line per distribution."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    metric = results["primary_metric"]
    for dist, by_n in results["rows"].items():
        sizes = [int(n) for n in by_n]
        rows = list(by_n.values())
        jac = [np.nan if r["jaccard"] is None else r["jaccard"] for r in rows]
        color = axes[0].plot(sizes, jac, marker="o", label=dist)[0].get_color()
        for ax, key in ((axes[1], "heldout_gain"), (axes[2], "optimism")):
            mean = [r[key]["mean"] for r in rows]
            ax.errorbar(sizes, mean, yerr=[r[key]["sd"] for r in rows], marker="o", capsize=3, color=color)
        axes[1].fill_between(sizes, [r["heldout_gain"]["min"] for r in rows], [r["heldout_gain"]["max"] for r in rows],
                             color=color, alpha=0.12, linewidth=0)
    axes[0].axhline(THRESHOLD, color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylim(-0.05, 1.05)
    titles = ("block-set overlap (Jaccard)", f"held-out gain ({metric}, + = better)", f"optimism ({metric})")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xticks(results["sizes"], [str(n) for n in results["sizes"]])
        ax.minorticks_off()
        ax.set_xlabel("selection size n")
        ax.set_title(title, fontsize=10)
        if ax is not axes[0]:
            ax.axhline(0, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()
