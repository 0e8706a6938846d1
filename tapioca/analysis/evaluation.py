"""Held-out evaluation on ID and every shift, seeds, paired-bootstrap deltas and Holm correction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from tapioca.analysis import stats
from tapioca.errors import DataError, check_finite
from tapioca.models.base import BlockModel, run_in_chunks
from tapioca.models.gates import Gates
from tapioca.pruning.searches import Scorer

# metric name -> True if higher is better
METRICS = {"nmse": False, "tol_acc": True}
# LM metric name -> True if higher is better (the ones a comparison reports; confidence has no good side)
LM_METRICS = {"acc": True, "prob_correct": True, "brier": False, "score": True}
HIGHER_IS_BETTER = {**METRICS, **LM_METRICS}  # every metric a comparison reports, testbed and LM
MIN_SPLIT = 8  # fewest examples a selection or held-out split may have


def check_split_size(n: int, what: str) -> None:
    """Refuse splits too small for statistics."""
    if n < MIN_SPLIT:
        raise DataError(f"{what}: {n} examples is too few; use at least {MIN_SPLIT}")


def selection_scorer(model: BlockModel, task: Any, batch: Any, metric: str, chunk: int) -> Scorer:
    """Gates -> per-example selection scores (B,) of ``model`` on ``batch`` (higher is better), with
    ``task.score(predictions, batch, metric)``."""
    def score(gates: Gates) -> torch.Tensor:
        return task.score(run_in_chunks(model, batch, gates, capture=False, chunk=chunk).predictions, batch, metric)

    return score


@dataclass
class Evaluation:
    """Per-example held-out results by distribution, pooled over seeds.

    values[dist][metric]: (n,) metric per example; seeds[dist]: (n,) model (sampling) seed of each example;
    predictions[dist], targets[dist]: (n,) query prediction and true y; draws[dist]: (n,) selection draw of the
    pruned model that made each prediction (absent: draw 0). A replicate is one (seed, draw).
    """

    values: dict[str, dict[str, np.ndarray]]
    seeds: dict[str, np.ndarray]
    predictions: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    draws: dict[str, np.ndarray] = field(default_factory=dict)

    def draw_labels(self, dist: str) -> np.ndarray:
        """Selection draw of every example of ``dist``, (n,) (zeros when the evaluation has none)."""
        return self.draws.get(dist, np.zeros(len(self.seeds[dist]), dtype=np.int64))

    def with_draw(self, draw: int) -> "Evaluation":
        """The same results labelled as selection draw ``draw``."""
        return Evaluation(self.values, self.seeds, self.predictions, self.targets,
                          {d: np.full(len(s), draw, dtype=np.int64) for d, s in self.seeds.items()})

    @property
    def distributions(self) -> list[str]:
        return list(self.values)

    def mean(self, dist: str, metric: str) -> float:
        return float(self.values[dist][metric].mean())

    def summary(self, n_bootstrap: int = 10_000, confidence: float = 0.95, shrinkage: bool = True) -> dict[str, dict]:
        """Per distribution: mean and bootstrap CI per metric (stratified by seed), per-seed means, and (for
        regression, ``shrinkage``) the prediction-shrinkage slope (OLS slope of prediction on target; < 1 means
        shrunk toward 0)."""
        out = {}
        for dist, metrics in self.values.items():
            entry = {}
            for name, v in metrics.items():
                mean, low, high = stats.bootstrap_mean_ci(v, groups=self.seeds[dist], n_resamples=n_bootstrap,
                                                           confidence=confidence, seed=0)
                per_seed = {str(int(s)): float(v[self.seeds[dist] == s].mean()) for s in np.unique(self.seeds[dist])}
                entry[name] = {"mean": mean, "low": low, "high": high, "per_seed": per_seed}
            if shrinkage:
                entry["shrinkage_slope"] = stats.shrinkage_slope(self.predictions[dist], self.targets[dist])
            entry["n"] = int(len(self.seeds[dist]))
            out[dist] = entry
        return out

    def save(self, path: str | Path) -> None:
        """Write all arrays to one ``.npz`` (atomically)."""
        arrays = {}
        for dist in self.values:
            for name, v in self.values[dist].items():
                arrays[f"{dist}/values/{name}"] = v
            arrays[f"{dist}/seeds"] = self.seeds[dist]
            arrays[f"{dist}/predictions"] = self.predictions[dist]
            arrays[f"{dist}/targets"] = self.targets[dist]
            if dist in self.draws:
                arrays[f"{dist}/draws"] = self.draws[dist]
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Evaluation":
        with np.load(path, allow_pickle=False) as data:
            items = {k: data[k] for k in data.files}
        ev = cls({}, {}, {}, {})
        for key, value in items.items():
            dist, kind = key.split("/", 1)
            if kind.startswith("values/"):
                ev.values.setdefault(dist, {})[kind.split("/", 1)[1]] = value
            else:
                getattr(ev, {"seeds": "seeds", "predictions": "predictions", "targets": "targets",
                             "draws": "draws"}[kind])[dist] = value
        return ev

    def subset(self, dists: Iterable[str]) -> "Evaluation":
        """The same results restricted to ``dists``."""
        dists = list(dists)
        return Evaluation({d: self.values[d] for d in dists}, {d: self.seeds[d] for d in dists},
                          {d: self.predictions[d] for d in dists}, {d: self.targets[d] for d in dists},
                          {d: self.draws[d] for d in dists if d in self.draws})

    def for_seeds(self, seeds: Iterable[int]) -> "Evaluation":
        """The same results restricted to the examples of ``seeds``."""
        keep = {d: np.isin(self.seeds[d], list(seeds)) for d in self.seeds}
        return Evaluation({d: {m: v[keep[d]] for m, v in ms.items()} for d, ms in self.values.items()},
                          {d: v[keep[d]] for d, v in self.seeds.items()},
                          {d: v[keep[d]] for d, v in self.predictions.items()},
                          {d: v[keep[d]] for d, v in self.targets.items()},
                          {d: v[keep[d]] for d, v in self.draws.items()})

    @classmethod
    def concat(cls, parts: Sequence["Evaluation"]) -> "Evaluation":
        """Join evaluations (e.g. one per seed, or one per distribution) into one."""
        out = cls({}, {}, {}, {})
        dists = list(dict.fromkeys(d for p in parts for d in p.values))
        for dist in dists:
            having = [p for p in parts if dist in p.values]
            out.values[dist] = {m: np.concatenate([p.values[dist][m] for p in having]) for m in having[0].values[dist]}
            for name in ("seeds", "predictions", "targets"):
                getattr(out, name)[dist] = np.concatenate([getattr(p, name)[dist] for p in having])
            if any(dist in p.draws for p in having):
                out.draws[dist] = np.concatenate([p.draw_labels(dist) for p in having])
        return out


def single_evaluation(dist: str, seed: int, metrics: dict[str, torch.Tensor], preds: torch.Tensor, targets: torch.Tensor,
                      where: str = "") -> Evaluation:
    """One seed's per-example results on ``dist``. A metric that is NaN or inf for some example (NaN predictions
    from damaged weights) raises :class:`DataError`; ``where`` names the model in that message. The metrics are
    checked rather than ``preds``, which may be NaN by design (a short answer that is not a number)."""
    values = {k: v.double().cpu().numpy() for k, v in metrics.items()}
    n = len(preds)
    if values:
        check_finite(np.stack(list(values.values()), 1),
                     f"{where + ' on ' if where else ''}distribution {dist} (held-out, seed {seed})")
    return Evaluation({dist: values}, {dist: np.full(n, seed)}, {dist: preds.double().cpu().numpy()},
                      {dist: targets.double().cpu().numpy()})


def paired_full(full: Evaluation, pruned: Evaluation, dist: str, metric: str) -> np.ndarray:
    """``full``'s values of ``metric`` on ``dist`` aligned with ``pruned``'s examples, (n_pruned,): by (seed, draw)
    when ``full`` has selection draws (in-sample: each draw has its own examples), else by seed (held out: every
    draw of a seed is scored on the same examples), in order within the group."""
    fs, ps = full.seeds[dist], pruned.seeds[dist]
    fv = full.values[dist][metric]
    if dist not in pruned.draws and len(fs) == len(ps) and np.array_equal(fs, ps):
        return fv
    pk = pruned.draw_labels(dist)
    fk = full.draws.get(dist)
    out = np.empty(len(ps))
    for seed, draw in sorted(set(zip(ps.tolist(), pk.tolist()))):
        here = (ps == seed) & (pk == draw)
        there = (fs == seed) & ((fk == draw) if fk is not None else True)
        if here.sum() != there.sum():
            raise ValueError(f"{dist}: pruned and full evaluations are not on the same examples (seed {seed}, draw "
                             f"{draw}: {int(here.sum())} pruned vs {int(there.sum())} full examples)")
        out[here] = fv[there]
    return out


def compare(
    full: Evaluation,
    pruned: Evaluation,
    distributions: Sequence[str] | None = None,
    n_bootstrap: int = 10_000,
    confidence: float = 0.95,
    metrics: Mapping[str, bool] = METRICS,
    seeds_are_models: bool = True,
) -> dict[str, dict[str, dict]]:
    """Δ = pruned − full per distribution and metric, on the same examples, inferred over **replicates**.

    Each row's top-level numbers (``mean``, ``low``/``high``, ``p_value``, TOST bounds, ``sd``, ``mde``, ``n``
    units, ``unit``) come from :func:`tapioca.analysis.stats.replicate_delta`: the run (model × selection draw)
    is the unit, so they speak of the method. ``examples`` keeps the paired, replicate-stratified bootstrap over
    examples: a statement about *these* models and selections only. Holm-corrected p-values (replicate level)
    are computed across the shifts (every distribution but "id") per metric. ``seeds_are_models`` False (a
    language model: seeds are sampling seeds of one fixed model): every (seed, draw) is a draw of that model and
    the draws are the units. ``improved`` (``worse``): the
    replicate-level CI excludes 0 on the good (bad) side of the metric — lower NMSE, higher accuracy — and the
    Holm-corrected p-value is below 1 − confidence. ``metrics``: name -> higher is better.
    """
    dists = list(distributions) if distributions is not None else [d for d in full.values if d in pruned.values]
    table: dict[str, dict[str, dict]] = {d: {} for d in dists}
    for metric, higher_better in metrics.items():
        for dist in dists:
            a, b = pruned.values[dist][metric], paired_full(full, pruned, dist, metric)
            seeds, draws = pruned.seeds[dist], pruned.draw_labels(dist)
            replicate = seeds.astype(np.int64) * (int(draws.max()) + 1) + draws
            examples = stats.paired_bootstrap(a, b, groups=replicate, n_resamples=n_bootstrap,
                                              confidence=confidence, seed=0)
            method = (stats.replicate_delta(a - b, seeds, draws, confidence) if seeds_are_models else
                      stats.replicate_delta(a - b, np.zeros_like(replicate), replicate, confidence))
            table[dist][metric] = {"full": float(b.mean()), "pruned": float(a.mean()), **method.to_dict(),
                                   "replicates": int(len(np.unique(replicate))), "examples": examples.to_dict()}
        holm_flags({d: table[d][metric] for d in dists}, confidence, higher_better)
    return table


def holm_flags(rows: dict[str, dict], confidence: float, higher_is_better: bool) -> None:
    """Set ``p_holm`` (Holm across every distribution but "id"; "id" keeps its own p) and ``improved`` /
    ``worse`` (the CI excludes 0 on the good / bad side and ``p_holm`` < 1 − confidence) on each row, in place."""
    shifts = {d: row["p_value"] for d, row in rows.items() if d != "id"}
    adjusted = stats.holm(shifts) if shifts else {}
    for dist, row in rows.items():
        row["p_holm"] = adjusted.get(dist, row["p_value"])
        significant = row["p_holm"] < 1 - confidence
        up, down = row["low"] > 0 and significant, row["high"] < 0 and significant
        row["improved"], row["worse"] = (up, down) if higher_is_better else (down, up)


def example_view(delta: dict[str, dict[str, dict]], metrics: Mapping[str, bool],
                 confidence: float) -> dict[str, dict[str, dict]]:
    """:func:`compare` rows about one given model and pruning (``tapioca check``, ``tapioca evaluate``), where the
    examples, not replicates, are the unit: each row's ``examples`` numbers (paired bootstrap CI, TOST bounds, sd,
    MDE, n examples), the base model's mean as ``base``, and :func:`holm_flags` on them."""
    out: dict[str, dict[str, dict]] = {d: {} for d in delta}
    for metric, higher in metrics.items():
        for dist, rows in delta.items():
            row = rows[metric]
            out[dist][metric] = {**row["examples"], "base": row["full"], "pruned": row["pruned"]}
        holm_flags({d: out[d][metric] for d in delta}, confidence, higher)
    return out
