"""Held-out evaluation of (pruned) causal LMs on text tasks: accuracy, calibration and paired comparisons.

:func:`evaluate_lm` returns a :class:`tapioca.analysis.evaluation.Evaluation` whose per-example metrics are
(multiple choice) ``acc``, ``prob_correct``, ``confidence`` (top-choice probability) and ``brier``, or
(short answer) ``acc``, ``score`` (the checker's partial credit), ``confidence`` (the model's probability
of its own greedy answer line) and ``brier`` ((confidence - acc)^2, the binary Brier score of "the answer is
right"). Everything ECE, Brier and the reliability curve need is per example, so :func:`calibration` works on
a saved evaluation too::

    full, pruned = evaluate_lm(lm, task, None, n=100), evaluate_lm(lm, task, result.gates, n=100)
    compare_lm(full, pruned)["humanities"]["acc"]          # paired bootstrap Δ, Holm across shifts
    calibration_change(full, pruned)["humanities"]["delta_ece"]
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from tapioca.analysis import stats
from tapioca.analysis.evaluation import LM_METRICS, Evaluation, compare
from tapioca.models.gates import Gates

__all__ = ["LM_METRICS", "calibration", "calibration_change", "compare_lm", "evaluate_lm"]


def evaluate_lm(model: Any, task: Any, gates: Gates | None = None, distributions: Iterable[str] | None = None,
                seeds: Sequence[int] = (0, 1, 2), n: int = 100, *, batch_size: int = 16, length_normalize: bool = False,
                max_new_tokens: int = 32, progress: bool = False) -> Evaluation:
    """Score causal LM ``model`` with ``gates`` on ``n`` held-out examples per seed of each distribution of the
    text ``task`` (:func:`tapioca.api.evaluate` with a text workload). Multiple choice by log-likelihood
    (``length_normalize`` as lm-eval's acc_norm): predictions = top choice, targets = correct choice. Short
    answer by greedy generation: predictions / targets = the extracted / gold answer as a number (NaN if none)."""
    from tapioca.api import evaluate  # the API sits above analysis

    return evaluate(model, task, gates, distributions, seeds, n, batch_size, progress, length_normalize=length_normalize,
                    max_new_tokens=max_new_tokens, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------
# Calibration


def _top_choice_table(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A probability table (n, W) and labels (n,) with the given top-choice confidence and correctness: all
    that ECE and the reliability curve read. Column 0 holds the confidence, the rest share 1 - confidence
    and stay strictly below it (W - 1 > 1 / min confidence); label 0 = correct, 1 = wrong."""
    width = max(2, math.ceil(1.0 / float(confidence.min())) + 1)
    table = np.empty((len(confidence), width))
    table[:, 0] = confidence
    table[:, 1:] = ((1.0 - confidence) / (width - 1))[:, None]
    return table, np.where(correct > 0.5, 0, 1)


def calibration(evaluation: Evaluation, n_bins: int = 15) -> dict[str, dict[str, Any]]:
    """Per distribution: ECE (``n_bins`` equal-width bins on the top-choice probability), Brier score,
    reliability curve, accuracy, mean confidence and n, from an :func:`evaluate_lm` result (multiple choice:
    top-choice probability; short answer: probability of the greedy answer line)."""
    out = {}
    for dist, values in evaluation.values.items():
        if "confidence" not in values or "brier" not in values:
            raise ValueError(f"{dist}: calibration needs per-example confidence and brier values; this "
                             f"evaluation has only {sorted(values)}")
        table, labels = _top_choice_table(values["confidence"], values["acc"])
        out[dist] = {"ece": stats.ece(table, labels, n_bins), "brier": float(values["brier"].mean()),
                     "reliability": stats.reliability_curve(table, labels, n_bins),
                     "accuracy": float(values["acc"].mean()), "confidence": float(values["confidence"].mean()),
                     "n": int(len(labels))}
    return out


def calibration_change(full: Evaluation, pruned: Evaluation, n_bins: int = 15) -> dict[str, dict[str, Any]]:
    """Calibration before (``full``) and after (``pruned``) per distribution, with Δ = pruned − full of ECE,
    Brier and mean confidence."""
    before, after = calibration(full, n_bins), calibration(pruned, n_bins)
    return {d: {"full": before[d], "pruned": after[d],
                **{f"delta_{k}": after[d][k] - before[d][k] for k in ("ece", "brier", "confidence", "accuracy")}}
            for d in before if d in after}


# ---------------------------------------------------------------------------------------------------------
# Comparison


def compare_lm(
    full: Evaluation,
    pruned: Evaluation,
    distributions: Sequence[str] | None = None,
    n_bootstrap: int = 10_000,
    confidence: float = 0.95,
) -> dict[str, dict[str, dict]]:
    """Paired-bootstrap Δ = pruned − full per distribution and LM metric (:data:`LM_METRICS` present in both),
    Holm-corrected across shifts; the same table as :func:`tapioca.analysis.evaluation.compare` gives the testbed."""
    dists = list(distributions) if distributions is not None else [d for d in full.values if d in pruned.values]
    metrics = {m: up for m, up in LM_METRICS.items()
               if all(m in full.values[d] and m in pruned.values[d] for d in dists)}
    return compare(full, pruned, dists, n_bootstrap, confidence, metrics)
