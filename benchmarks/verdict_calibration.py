"""Error rates of tapioca's verdict rules, measured on simulated studies whose truth is known.

Each simulated study is a results.json built the way the study builds it — per-example held-out errors of a
full and a pruned model for every replicate (model × selection draw), turned into rows by the study's own
:func:`tapioca.analysis.evaluation.compare` — or, for claims decided on per-model summaries (D ratios,
realignment, sweeps, slopes), those summaries drawn per model; the verdict comes from the very claim function
in :mod:`tapioca.report.claims`. The worlds vary between-replicate heterogeneity (models differ in the effect),
heavy-tailed NMSE-like errors (log-normal errors times Student-t(3) noise) and, for C1/C2, floors are not
simulated (NMSE has none). Per claim it prints one line::

    claim=C2 null_wrong=0.031 mc_se=0.006 power_delta=0.41 power_2delta=0.93

* ``null_wrong``: the worst rate, over the worlds where the claim is false (for "supported") or true (for
  "refuted") — boundary worlds included — of a decisive verdict contradicting the simulated truth;
  ``mc_se`` its Monte-Carlo standard error.
* ``power_delta`` / ``power_2delta``: the rate of "supported" when the truth lies δ (2δ) inside the region
  where the claim holds, δ being the claim's smallest effect of interest (C1, C2, C9: ``evaluation.
  smallest_effect_relative`` of the full model's NMSE), else the declared unit stated in ``WORLDS`` below.

Run ``python benchmarks/verdict_calibration.py --quick`` (≤ 3 min on 2 cores; claims run in parallel
processes) or without ``--quick`` for tighter Monte-Carlo errors; ``--models`` and ``--draws`` set the design
(default: the default study's, 5 models × 1 draw).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tapioca.analysis.evaluation import Evaluation, compare
from tapioca.config import EvaluationConfig
from tapioca.report import claims as C

SUPPORTED, REFUTED = C.SUPPORTED, C.REFUTED
SHIFTS = [f"s{i}" for i in range(1, 7)]
DELTA_REL = EvaluationConfig().smallest_effect_relative  # δ = 5 % of the full model's mean NMSE (≈ 1 here)


@dataclass(frozen=True)
class Design:
    """The simulated study: replicates, examples per replicate, and heterogeneity."""

    models: int = 5  # the default study's
    draws: int = 1
    n: int = 256  # held-out examples per model
    tau: float = 1.0  # between-model sd of the true gain, in units of δ
    tau_draw: float = 0.5  # between-draw sd within a model, in units of δ
    noise: float = 0.5  # per-example noise of the pruned error relative to the full one (times Student-t(3))


# ------------------------------------------------------------------------------------------- simulated rows


def evaluations(rng: np.random.Generator, d: Design, gains: dict[str, float]) -> tuple[Evaluation, Evaluation]:
    """Full and pruned evaluations (NMSE) of every model × draw on every distribution: the full model's errors
    are log-normal with mean 1 (heavy-tailed); a replicate's true gain is ``gains[dist] · δ`` plus model and
    draw effects; the pruned error is full × (1 − gain) + full × noise × t₃."""
    full_v, pruned_v, seeds, draws = {}, {}, {}, {}
    delta = DELTA_REL  # the full model's mean NMSE is 1
    for dist, gain in gains.items():
        f_parts, p_parts, s_parts, k_parts = [], [], [], []
        for m in range(d.models):
            full = rng.lognormal(-0.5, 1.0, d.n)  # mean 1
            model_gain = (gain + d.tau * rng.standard_normal()) * delta
            for k in range(d.draws):
                g = model_gain + d.tau_draw * delta * rng.standard_normal() if d.draws > 1 else model_gain
                noise = d.noise * rng.standard_t(3, d.n) / math.sqrt(3)
                f_parts.append(full)
                p_parts.append(np.maximum(full * (1 - g) + full * noise * 0.1, 0.0))
                s_parts.append(np.full(d.n, m))
                k_parts.append(np.full(d.n, k))
        full_all = np.concatenate(f_parts)
        full_v[dist] = {"nmse": full_all}
        pruned_v[dist] = {"nmse": np.concatenate(p_parts)}
        seeds[dist], draws[dist] = np.concatenate(s_parts), np.concatenate(k_parts)
    zeros = {k: np.zeros_like(v["nmse"]) for k, v in full_v.items()}
    full = Evaluation(full_v, seeds, zeros, zeros, draws)
    pruned = Evaluation(pruned_v, seeds, zeros, zeros, draws)
    return full, pruned


def rows(rng: np.random.Generator, d: Design, gains: dict[str, float]) -> dict:
    full, pruned = evaluations(rng, d, gains)
    return compare(full, pruned, list(gains), n_bootstrap=100, metrics={"nmse": False})


def study(rng: np.random.Generator, d: Design, id_gain: float = 0.0, shift_gains: dict[str, float] | None = None,
          ratio_log: float = math.log(10.0), realign: float = -3.0) -> dict:
    """A results.json where every claim is strongly decidable, with the ID gain, shift gains (units of δ), the
    log D/floor ratio and the realignment (noise floors, TALE − random) as given."""
    shift_gains = shift_gains if shift_gains is not None else {s: 4.0 for s in SHIFTS}
    delta = rows(rng, d, {"id": id_gain, **shift_gains})
    seeds = [str(m) for m in range(d.models)]
    per_seed = {}
    for seed in seeds:
        rows_ = {"noise_floor": {"full": 0.1}}
        for s in shift_gains:
            log_ratio = ratio_log + 0.3 * rng.standard_normal()
            full_d = 0.1 * math.exp(log_ratio)
            random_d = full_d
            rows_[s] = {"full": full_d, "random_pruned": random_d,
                        "target_pruned": random_d + 0.1 * (realign + rng.standard_normal()),
                        "target_pruned_vs_full_id": 0.0, "from_id_pruned": 0.0}
        per_seed[seed] = rows_
    mean = {r: {c: float(np.mean([per_seed[s][r][c] for s in seeds])) for c in per_seed[seeds[0]][r]}
            for r in per_seed[seeds[0]]}
    full = {"id": {"nmse": {"mean": 1.0}}, **{s: {"nmse": {"mean": 1.0 + i}} for i, s in enumerate(shift_gains)}}
    return {"protocols": {"target": {"delta": delta}, "from-id": {"delta": copy.deepcopy(delta)}},
            "removed": {"target": {s: {seed: [1] for seed in seeds} for s in ["id", *shift_gains]}},
            "geometry": {"D_mean": mean, "D_per_seed": per_seed,
                         "attribution_full": {seeds[0]: {s: [0.0, 1.0, 0.0, 0.0] for s in shift_gains}}},
            "full": full, "n_blocks": 4, "rules": C.rules_of(EvaluationConfig())}


# ------------------------------------------------------------------------------------------- worlds per claim


def verdict(claim: Callable[[dict], dict]) -> Callable[[dict], str]:
    return lambda results: claim(results)["verdict"]


def c1_world(id_gain: float) -> Callable:
    return lambda rng, d: C.c1_no_id_benefit(study(rng, d, id_gain=id_gain))["verdict"]


def c2_world(gains: list[float]) -> Callable:
    return lambda rng, d: C.c2_ood_improves(study(rng, d, shift_gains=dict(zip(SHIFTS, gains))))["verdict"]


def c3_world(log_excess: float) -> Callable:
    factor = EvaluationConfig().distortion_factor
    return lambda rng, d: C.c3_ood_distorts(study(rng, d, ratio_log=math.log(factor) + log_excess))["verdict"]


def c4_world(realign: float) -> Callable:
    return lambda rng, d: C.c4_realigns(study(rng, d, realign=realign))["verdict"]


def c7_world(change: float) -> Callable:
    def run(rng: np.random.Generator, d: Design) -> str:
        results = study(rng, d)
        results["shrinkage_change"] = {s: {str(m): change + 0.05 * rng.standard_normal() for m in range(d.models)}
                                       for s in SHIFTS}
        return C.c7_not_tamer(results)["verdict"]
    return run


def c8_world(r: float, n_shifts: int = 10) -> Callable:
    def run(rng: np.random.Generator, d: Design) -> str:
        z = rng.standard_normal((n_shifts, 2))
        distortion = np.exp(z[:, 0])
        drop = np.exp(r * z[:, 0] + math.sqrt(1 - r * r) * z[:, 1])
        shifts = [f"t{i}" for i in range(n_shifts)]
        results = {"protocols": {"target": {"delta": {"id": {}, **{s: {} for s in shifts}}}},
                   "geometry": {"D_mean": {s: {"full": float(v)} for s, v in zip(shifts, distortion)},
                                "attribution_full": {}},
                   "full": {"id": {"nmse": {"mean": 0.0}}, **{s: {"nmse": {"mean": float(v)}}
                                                               for s, v in zip(shifts, drop)}},
                   "removed": {"target": {s: {} for s in shifts}}, "n_blocks": 4}
        return C.c8_distortion_predicts(results)["verdict"]
    return run


def c9_world(tale_gain: float, weight_gain: float) -> Callable:
    def run(rng: np.random.Generator, d: Design) -> str:
        results = study(rng, d, shift_gains={s: tale_gain for s in SHIFTS[:2]})
        gains = {s: tale_gain for s in SHIFTS[:2]}
        full, tale = evaluations(rng, d, gains)
        weight_rows = {}
        for s in SHIFTS[:2]:  # weight pruning on the same examples: its own gain (per model), then against TALE
            model_gain = (weight_gain + d.tau * rng.standard_normal(d.models)) * DELTA_REL
            g = model_gain[full.seeds[s]]  # (n,): each example's model's true gain
            noise = d.noise * rng.standard_t(3, len(g)) / math.sqrt(3)
            weight_rows[s] = {"nmse": np.maximum(full.values[s]["nmse"] * (1 - g + 0.1 * noise), 0.0)}
        weight = Evaluation(weight_rows, full.seeds, full.predictions, full.targets, full.draws)
        own = compare(full, weight, SHIFTS[:2], n_bootstrap=100, metrics={"nmse": False})
        vs = compare(tale, weight, SHIFTS[:2], n_bootstrap=100, metrics={"nmse": False})
        tale_rows = compare(full, tale, SHIFTS[:2], n_bootstrap=100, metrics={"nmse": False})
        results["protocols"]["target"]["delta"].update(tale_rows)
        results["comparisons"] = {s: {"tale": tale_rows[s], "magnitude": {**own[s], "vs_tale": vs[s]}}
                                  for s in SHIFTS[:2]}
        for s in SHIFTS[2:]:
            results["protocols"]["target"]["delta"].pop(s, None)
            results["removed"]["target"].pop(s, None)
        return C.c9_needs_layer_removal(results)["verdict"]
    return run


def c5_world(coupling: float, share: float) -> Callable:
    """TALE's sweep: score falls with D as strongly as ``coupling`` (0: no tighter than random blocks); norm
    matching recovers ``share`` of each model's pruning gain (plus noise)."""
    alphas = (0.0, 0.25, 0.5, 0.75, 1.0)

    def sweep(rng: np.random.Generator, c: float) -> list[dict]:
        d = np.array(alphas) + 0.2 * rng.standard_normal(len(alphas))
        score = -c * np.array(alphas) + 0.2 * rng.standard_normal(len(alphas))
        return [{"alpha": a, "D": float(x), "score": float(y)} for a, x, y in zip(alphas, d, score)]

    def run(rng: np.random.Generator, d: Design) -> str:
        results = study(rng, d, shift_gains={"s1": 4.0, "s2": 4.0})
        seeds = [str(m) for m in range(d.models)]
        results["interventions"] = {s: {
            "sweep_removed": {m: sweep(rng, coupling) for m in seeds},
            "sweep_control": {m: sweep(rng, 0.0) for m in seeds},
            "norm_matching": {m: (lambda p: {"ood_full": -2.0, "ood_pruned": -2.0 + p,
                                             "ood_matched": -2.0 + share * p + 0.1 * rng.standard_normal()})(
                1.0 + 0.2 * rng.standard_normal()) for m in seeds}} for s in ("s1", "s2")}
        return C.c5_causal(results)["verdict"]
    return run


def g1_world(realign: float) -> Callable:
    def run(rng: np.random.Generator, d: Design) -> str:
        per_seed = {str(m): {"geometry": {"erm": {"noise_floor": 0.1, "s1": 1.0},
                                          "random": {"noise_floor": 0.1, "s1": 1.0},
                                          "prune": {"noise_floor": 0.1,
                                                    "s1": 1.0 + 0.1 * (realign + rng.standard_normal())}}}
                    for m in range(d.models)}
        results = {"protocols": {"target": {"delta": {"id": {}, "s1": {}}}},
                   "edges": {"per_seed": per_seed, "geometry": {"erm": {"s1": 1.0}, "prune": {"s1": 1.0}}}}
        return C.g1_edge_pruning_realigns(results)["verdict"]
    return run


def c6_world(id_gains: list[float]) -> Callable:
    def run(rng: np.random.Generator, d: Design) -> str:
        scale_results = {f"L{i}": study(rng, d, id_gain=g) for i, g in enumerate(id_gains)}
        scales = {}
        for name, r in scale_results.items():
            r["claims"] = {c: C.CLAIMS[c](r) for c in C.SCALE_CLAIMS}
            scales[name] = {"claims": r["claims"]}
        return C.c6_scales({"scales": scales, "scale_results": scale_results})["verdict"]
    return run


MARGIN = EvaluationConfig().realign_margin
SHARE = EvaluationConfig().recovered_share_min
TOL = EvaluationConfig().slope_tolerance
# claim -> (worlds where it is false: "supported" is wrong there; worlds where it is true: "refuted" is wrong;
#           the world δ and 2δ inside the claim's region, for power; the unit of δ)
WORLDS: dict[str, tuple[list[Callable], list[Callable], Callable, Callable, str]] = {
    "C1": ([c1_world(1.0), c1_world(1.5)], [c1_world(1.0), c1_world(0.5)], c1_world(0.0), c1_world(-1.0),
           "ID gain (δ = 5 % of the full NMSE) below the bound δ"),
    "C2": ([c2_world([0.0] * 6), c2_world([2.0] * 3 + [0.0] * 3)], [c2_world([1.0] * 6), c2_world([1.0] * 4 + [0.0] * 2)],
           c2_world([1.0] * 6), c2_world([2.0] * 6), "OOD gain on every shift above 0 (support needs Δ ≥ δ)"),
    "C3": ([c3_world(0.0)], [c3_world(0.0)], c3_world(0.3), c3_world(0.6),
           "log D/floor above log factor, δ = one between-model sd (0.3)"),
    "C4": ([c4_world(-MARGIN)], [c4_world(-MARGIN)], c4_world(-MARGIN - 1), c4_world(-MARGIN - 2),
           "realignment beyond random, δ = one between-model sd (1 noise floor)"),
    "C5": ([c5_world(0.0, 1.0), c5_world(3.0, SHARE)], [c5_world(0.0, 1.0), c5_world(3.0, SHARE)],
           c5_world(1.0, SHARE + 0.25), c5_world(2.0, SHARE + 0.5),
           "sweep coupling (score per unit α) and recovered share above the minimum"),
    "C6": ([c6_world([-1.0, -1.0, 1.0])], [c6_world([1.0, 1.0, 1.0])], c6_world([0.0] * 3), c6_world([-1.0] * 3),
           "C1's ID gain at every scale (C2–C4 strongly supported)"),
    "C7": ([c7_world(-TOL)], [c7_world(-TOL)], c7_world(-TOL + 0.05), c7_world(-TOL + 0.1),
           "slope change above −tolerance, δ = one between-model sd (0.05)"),
    "C8": ([c8_world(0.0)], [c8_world(0.0)], c8_world(0.4), c8_world(0.8),
           "latent correlation of D and drop over 10 shifts: δ = 0.4"),
    "C9": ([c9_world(4.0, 1.0), c9_world(4.0, 4.0)], [c9_world(2.0, 1.0), c9_world(4.0, 0.0)],
           c9_world(4.0, 0.0), c9_world(4.0, -1.0), "weight pruning's own gain below δ (TALE gains 4δ)"),
    "G1": ([g1_world(-MARGIN)], [g1_world(-MARGIN)], g1_world(-MARGIN - 1), g1_world(-MARGIN - 2),
           "as C4, on graphs"),
}


def rate(world: Callable, target: str, reps: int, d: Design, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([world(rng, d) == target for _ in range(reps)]))


def jobs(claim: str) -> list[tuple[str, str, int]]:
    """The (claim, group, index) of every rate one claim needs: its false worlds ("supported" is wrong), its true
    worlds ("refuted" is wrong) and its two power worlds."""
    false_worlds, true_worlds = WORLDS[claim][:2]
    return ([(claim, "false", i) for i in range(len(false_worlds))] + [(claim, "true", i) for i in range(len(true_worlds))]
            + [(claim, "delta", 0), (claim, "2delta", 0)])


def run_job(job: tuple[str, str, int], reps: int, d: Design, seed: int) -> float:
    """The rate of one job of :func:`jobs` (a separate process may run it: only names cross)."""
    claim, group, i = job
    false_worlds, true_worlds, at_delta, at_2delta, _ = WORLDS[claim]
    world, target, offset = {"false": (false_worlds[i] if group == "false" else None, SUPPORTED, 0),
                             "true": (true_worlds[i] if group == "true" else None, REFUTED, 100),
                             "delta": (at_delta, SUPPORTED, 200), "2delta": (at_2delta, SUPPORTED, 300)}[group]
    return rate(world, target, reps, d, seed + offset + i)


def summarise(claim: str, rates: dict[tuple[str, str, int], float], reps: int) -> dict:
    """null_wrong (with its Monte-Carlo se) and power at δ and 2δ of one claim from its jobs' rates; ``wrong``:
    each world's rate (false worlds' "supported" first, then true worlds' "refuted")."""
    wrong = [rates[j] for j in jobs(claim) if j[1] in ("false", "true")]
    worst = max(wrong)
    return {"null_wrong": worst, "mc_se": math.sqrt(max(worst * (1 - worst), 1.0 / reps) / reps),
            "power_delta": rates[(claim, "delta", 0)], "power_2delta": rates[(claim, "2delta", 0)], "wrong": wrong}


def calibrate(claim: str, reps: int, d: Design, seed: int = 0) -> dict[str, float]:
    """:func:`summarise` of one claim, its jobs run here."""
    return summarise(claim, {j: run_job(j, reps, d, seed) for j in jobs(claim)}, reps)


def line(claim: str, r: dict[str, float]) -> str:
    return (f"claim={claim} null_wrong={r['null_wrong']:.3f} mc_se={r['mc_se']:.3f} "
            f"power_delta={r['power_delta']:.2f} power_2delta={r['power_2delta']:.2f}")


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer simulated studies (≤ 3 min on 2 cores)")
    parser.add_argument("--reps", type=int, default=None, help="simulated studies per world (default 1000; quick 150)")
    parser.add_argument("--models", type=int, default=5, help="models per simulated study (default 5, as the "
                                                                    "default study)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU core)")
    parser.add_argument("--draws", type=int, default=1, help="selection draws per model (default 1)")
    parser.add_argument("--claims", default=",".join(WORLDS), help="comma-separated claims (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="also print each world's wrong-verdict rate")
    args = parser.parse_args(argv)
    reps = args.reps or (150 if args.quick else 1000)
    design = Design(models=args.models, draws=args.draws)
    claims = args.claims.split(",")
    unknown = [c for c in claims if c not in WORLDS]
    if unknown:
        raise SystemExit(f"unknown claim {unknown[0]!r}; allowed: {', '.join(WORLDS)}")
    start, out = time.perf_counter(), {}
    todo = [j for c in claims for j in jobs(c)]
    workers = min(args.workers or os.cpu_count() or 1, len(todo))
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:  # one world per task
        args_ = ([reps] * len(todo), [design] * len(todo), [args.seed] * len(todo))
        rates = dict(zip(todo, pool.map(run_job, todo, *args_) if pool is not None else map(run_job, todo, *args_)))
    for claim in claims:
        out[claim] = summarise(claim, rates, reps)
        print(line(claim, out[claim]), flush=True)
        if args.verbose:
            print(f"#   {claim} ({WORLDS[claim][4]}): wrong-verdict rate per world "
                  + ", ".join(f"{r:.3f}" for r in out[claim]["wrong"]))
    print(f"# {reps} simulated studies per world; {design}; {time.perf_counter() - start:.0f} s")
    return out


if __name__ == "__main__":
    main()
