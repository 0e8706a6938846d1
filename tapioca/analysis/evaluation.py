"""Held-out evaluation on ID and every shift, seeds, paired-bootstrap deltas and Holm correction."""

from __future__ import annotations

from dataclasses import dataclass
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

    values[dist][metric]: (n,) metric per example; seeds[dist]: (n,) replicate seed of each example;
    predictions[dist], targets[dist]: (n,) query prediction and true y.
    """

    values: dict[str, dict[str, np.ndarray]]
    seeds: dict[str, np.ndarray]
    predictions: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]

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
                getattr(ev, {"seeds": "seeds", "predictions": "predictions", "targets": "targets"}[kind])[dist] = value
        return ev

    def subset(self, dists: Iterable[str]) -> "Evaluation":
        """The same results restricted to ``dists``."""
        dists = list(dists)
        return Evaluation({d: self.values[d] for d in dists}, {d: self.seeds[d] for d in dists},
                          {d: self.predictions[d] for d in dists}, {d: self.targets[d] for d in dists})

    @classmethod
    def concat(cls, parts: Sequence["Evaluation"]) -> "Evaluation":
        """Join evaluations (e.g. one per seed, or one per distribution) into one."""
        out = cls({}, {}, {}, {})
        dists = list(dict.fromkeys(d for p in parts for d in p.values))
        for dist in dists:
            having = [p for p in parts if dist in p.values]
            out.values[dist] = {m: np.concatenate([p.values[dist][m] for p in having]) for m in having[0].values[dist]}
            for field in ("seeds", "predictions", "targets"):
                getattr(out, field)[dist] = np.concatenate([getattr(p, field)[dist] for p in having])
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


def compare(
    full: Evaluation,
    pruned: Evaluation,
    distributions: Sequence[str] | None = None,
    n_bootstrap: int = 10_000,
    confidence: float = 0.95,
    metrics: Mapping[str, bool] = METRICS,
) -> dict[str, dict[str, dict]]:
    """Paired-bootstrap Δ = pruned − full per distribution and metric, on the same held-out examples.

    Holm-corrected p-values are computed across the shifts (every distribution but "id") per metric.
    ``improved`` (``worse``): the CI excludes 0 on the good (bad) side of the metric — lower NMSE, higher
    accuracy — and the Holm-corrected p-value is below 1 − confidence. ``metrics``: name -> higher is better.
    """
    dists = list(distributions) if distributions is not None else [d for d in full.values if d in pruned.values]
    table: dict[str, dict[str, dict]] = {d: {} for d in dists}
    for metric, higher_better in metrics.items():
        for dist in dists:
            a, b = pruned.values[dist][metric], full.values[dist][metric]
            if len(a) != len(b) or not np.array_equal(pruned.seeds[dist], full.seeds[dist]):
                raise ValueError(f"{dist}: pruned and full evaluations are not on the same examples")
            ci = stats.paired_bootstrap(a, b, groups=full.seeds[dist], n_resamples=n_bootstrap,
                                        confidence=confidence, seed=0)
            table[dist][metric] = {"full": float(b.mean()), "pruned": float(a.mean()), **ci.to_dict()}
        shifts = [d for d in dists if d != "id"]
        adjusted = stats.holm({d: table[d][metric]["p_value"] for d in shifts}) if shifts else {}
        for dist in dists:
            row = table[dist][metric]
            row["p_holm"] = adjusted.get(dist, row["p_value"])
            significant = row["p_holm"] < 1 - confidence
            up, down = row["low"] > 0 and significant, row["high"] < 0 and significant
            row["improved"], row["worse"] = (up, down) if higher_better else (down, up)
    return table
