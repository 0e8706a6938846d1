"""Statistics helpers: bootstrap confidence intervals, multiple-testing
correction, regression slope, calibration metrics and rank correlation.

All functions take numpy arrays (or anything ``np.asarray`` accepts);
torch tensors should be converted by the caller. Randomised functions are
deterministic given ``seed``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Union

import numpy as np

__all__ = [
    "DeltaCI",
    "paired_bootstrap",
    "bootstrap_mean_ci",
    "holm",
    "shrinkage_slope",
    "ece",
    "brier",
    "reliability_curve",
    "spearman",
    "ReplicateDelta",
    "replicate_delta",
    "unit_means",
    "units_mde",
    "units_needed",
    "t_interval",
    "t_p_beyond",
    "ratio_of_means",
]

# Max number of resampled values held at once (uniforms / indices / values,
# 8 bytes each, at most two alive at a time), so one chunk stays well below
# ~100 MB.
_CHUNK_ELEMENTS = 2_000_000
# Largest resample count matrix kept for reuse (float64: 8 bytes each, at most 0.5 GB).
_MAX_COUNT_ELEMENTS = 64_000_000
_PROB_SUM_TOL = 1e-4

PValues = Union[Mapping[str, float], Sequence[float], np.ndarray]


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _as_1d_finite(name: str, x: Any, *, min_len: int = 1) -> np.ndarray:
    """Return ``x`` as a float64 array of shape (n,), checking n >= min_len and finiteness."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (n,); got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.shape[0] < min_len:
        if arr.shape[0] == 0:
            raise ValueError(f"{name} is empty; need at least {min_len} value(s)")
        raise ValueError(f"{name} has {arr.shape[0]} value(s); need at least {min_len}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN/inf value(s) "
            f"(first at index {int(np.argmax(bad))}); only finite values are allowed"
        )
    return arr


def _check_same_length(**arrays: np.ndarray) -> None:
    """Raise if the given 1-D arrays do not all have the same length."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k} has {v}" for k, v in lengths.items())
        raise ValueError(f"length mismatch: {desc}; they must be equal (paired per example)")


def _check_confidence(confidence: float) -> float:
    """Validate a confidence level in the open interval (0, 1)."""
    c = float(confidence)
    if not (0.0 < c < 1.0):
        raise ValueError(f"confidence must be in the open interval (0, 1); got {confidence!r}")
    return c


def _check_positive_int(name: str, value: Any) -> int:
    """Validate an integer >= 1 (bools rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value}")
    return int(value)


def _group_codes(groups: Any, n: int) -> np.ndarray:
    """Map integer group labels of shape (n,) to dense codes 0..G-1, shape (n,)."""
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ValueError(f"groups must have shape ({n},) to match the scores; got shape {g.shape}")
    if np.issubdtype(g.dtype, np.floating):
        if not np.all(np.isfinite(g)) or not np.all(g == np.round(g)):
            raise ValueError("groups must be integer labels; got non-integer or NaN/inf floats")
        g = g.astype(np.int64)
    elif not (np.issubdtype(g.dtype, np.integer) or g.dtype == np.bool_):
        raise ValueError(f"groups must be integer labels; got dtype {g.dtype}")
    _, codes = np.unique(g, return_inverse=True)
    return codes.reshape(-1)


# --------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaCI:
    """Mean difference with a percentile bootstrap CI and two-sided bootstrap p-value; ``low_tost`` /
    ``high_tost``: the (1 − 2α) interval of an equivalence (TOST) test at the same α; ``sd``: standard
    deviation of the per-example differences; ``mde``: minimal detectable effect (two-sided α, power 0.8)."""

    mean: float
    low: float
    high: float
    p_value: float
    n: int
    low_tost: float = float("nan")
    high_tost: float = float("nan")
    sd: float = float("nan")
    mde: float = float("nan")

    def to_dict(self) -> dict[str, float | int]:
        """Return the fields as a plain dict."""
        return asdict(self)


def _resampled_positions(sizes: np.ndarray, n_resamples: int, seed: int | None) -> Iterator[np.ndarray]:
    """Chunks of resampled positions, each (m, n) with m * n <= ~_CHUNK_ELEMENTS: row r holds n draws with
    replacement, position i drawn uniformly within the group (sorted, of size ``sizes[g]``) of position i."""
    n = int(sizes.sum())
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(len(sizes)), sizes)
    starts = np.cumsum(sizes) - sizes
    lows, spans = starts[codes], sizes[codes].astype(np.float64)  # shape (n,)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        # floor(U * size) is uniform on 0..size-1 (U < 1 keeps it below size);
        # faster than rng.integers with a per-position upper bound.
        u = rng.random((m, n))
        u *= spans
        idx = u.astype(np.int64)
        del u
        idx += lows
        yield idx


@functools.lru_cache(maxsize=1)
def _resample_counts(sizes: tuple[int, ...], n_resamples: int, seed: int | None) -> np.ndarray:
    """How often each (group-sorted) example appears in each resample, shape (n_resamples, n), float64.
    Cached: every statistic over examples of the same group sizes reuses the same resamples."""
    n = sum(sizes)
    rows = []
    for idx in _resampled_positions(np.asarray(sizes), n_resamples, seed):
        m = idx.shape[0]
        flat = idx + (np.arange(m) * n)[:, None]
        rows.append(np.bincount(flat.ravel(), minlength=m * n).reshape(m, n).astype(np.float64))
    return np.concatenate(rows)


def _bootstrap_means(
    x: np.ndarray,
    groups: np.ndarray | None,
    n_resamples: int,
    seed: int | None,
) -> np.ndarray:
    """Bootstrap distribution of mean(x), shape (n_resamples,).

    x: shape (n,). If ``groups`` (dense codes, shape (n,)) is given, examples are
    resampled with replacement within each group, keeping group sizes; the
    statistic is always the mean over all n resampled examples. With a seed and at
    most _MAX_COUNT_ELEMENTS resampled values, the resamples are held as a count
    matrix shared by every call with the same group sizes (mat-vecs per call);
    otherwise they are drawn in chunks of ~_CHUNK_ELEMENTS values. Both give the
    same resamples for the same seed.
    """
    n = x.shape[0]
    if groups is None:
        groups = np.zeros(n, dtype=np.int64)
    xs = x[np.argsort(groups, kind="stable")]
    sizes = tuple(int(c) for c in np.bincount(groups))
    if seed is not None and n_resamples * n <= _MAX_COUNT_ELEMENTS:
        return _resample_counts(sizes, n_resamples, seed) @ xs / n
    out = np.empty(n_resamples, dtype=np.float64)
    start = 0
    for idx in _resampled_positions(np.asarray(sizes), n_resamples, seed):
        out[start : start + idx.shape[0]] = xs[idx].mean(axis=1)
        start += idx.shape[0]
    return out


def _prepare_bootstrap(
    x: np.ndarray, groups: Any, n_resamples: int, confidence: float
) -> tuple[np.ndarray | None, int, float]:
    """Validate shared bootstrap arguments; return (group codes or None, n_resamples, confidence)."""
    n_resamples = _check_positive_int("n_resamples", n_resamples)
    confidence = _check_confidence(confidence)
    codes = None if groups is None else _group_codes(groups, x.shape[0])
    return codes, n_resamples, confidence


def _percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap statistics, shape (R,) -> (low, high)."""
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _two_sided_p(stats: np.ndarray) -> float:
    """Two-sided bootstrap p-value for H0: statistic == 0, with +1 correction."""
    r = stats.shape[0]
    p_le = (np.count_nonzero(stats <= 0.0) + 1) / (r + 1)
    p_ge = (np.count_nonzero(stats >= 0.0) + 1) / (r + 1)
    return float(min(1.0, 2.0 * min(p_le, p_ge)))


def paired_bootstrap(
    a: Any,
    b: Any,
    *,
    groups: Any = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> DeltaCI:
    """Paired bootstrap of mean(a - b).

    a, b: per-example scores on the same examples, shape (n,).
    groups: optional integer labels, shape (n,) (e.g. replicate seeds); when
    given, resampling is stratified within groups, keeping group sizes.
    Returns the observed mean difference, a percentile CI and a two-sided
    bootstrap p-value ``min(1, 2*min((#{d*<=0}+1)/(R+1), (#{d*>=0}+1)/(R+1)))``.
    If every per-example difference is exactly 0, returns mean 0, CI [0, 0], p 1.
    """
    a_arr = _as_1d_finite("a", a)
    b_arr = _as_1d_finite("b", b)
    _check_same_length(a=a_arr, b=b_arr)
    d = a_arr - b_arr
    codes, n_resamples, confidence = _prepare_bootstrap(d, groups, n_resamples, confidence)
    n = int(d.shape[0])
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    power = dict(sd=sd, mde=minimal_detectable_effect(sd, n, confidence))
    if np.all(d == d[0]):
        # Constant differences: the bootstrap distribution is a point mass.
        c = float(d[0])
        p = 1.0 if c == 0.0 else min(1.0, 2.0 / (n_resamples + 1))
        return DeltaCI(mean=c, low=c, high=c, p_value=p, n=n, low_tost=c, high_tost=c, **power)
    stats = _bootstrap_means(d, codes, n_resamples, seed)
    low, high = _percentile_interval(stats, confidence)
    low_tost, high_tost = _percentile_interval(stats, 1.0 - 2.0 * (1.0 - confidence))
    return DeltaCI(mean=float(d.mean()), low=low, high=high, p_value=_two_sided_p(stats), n=n, low_tost=low_tost,
                   high_tost=high_tost, **power)


_POWER = 0.8


def _z(q: float) -> float:
    return NormalDist().inv_cdf(q)


def minimal_detectable_effect(sd: float, n: int, confidence: float = 0.95, power: float = _POWER) -> float:
    """Smallest true mean difference a paired two-sided test at level 1 − ``confidence`` detects with
    ``power``: (z_{1−α/2} + z_power) · sd / √n (REFERENCE §9)."""
    if n < 1:
        return float("inf")
    return (_z(1 - (1 - confidence) / 2) + _z(power)) * sd / math.sqrt(n)


def n_needed(sd: float, effect: float, confidence: float = 0.95, power: float = _POWER) -> int:
    """Examples a paired test needs to detect a true mean difference ``effect`` with ``power``."""
    if effect <= 0 or not math.isfinite(effect):
        return 0
    return max(2, math.ceil(((_z(1 - (1 - confidence) / 2) + _z(power)) * sd / effect) ** 2))


def examples_needed(sd: float | None, effect: float, confidence: float = 0.95) -> int | None:
    """:func:`n_needed` for paired differences with standard deviation ``sd``; None when sd is missing, NaN or 0
    (differences that never vary, e.g. nothing was pruned, size no run)."""
    if sd is None or not sd > 0:
        return None
    return n_needed(sd, effect, confidence)


def difference_of_means(
    a: Any, b: Any, *, groups_a: Any = None, groups_b: Any = None, n_resamples: int = 10_000,
    confidence: float = 0.95, seed: int | None = 0,
) -> DeltaCI:
    """mean(a) − mean(b) for independent samples a (n,) and b (m,), each resampled on its own (stratified by
    its groups); percentile CI and two-sided bootstrap p-value."""
    a_arr, b_arr = _as_1d_finite("a", a), _as_1d_finite("b", b)
    codes_a, n_resamples, confidence = _prepare_bootstrap(a_arr, groups_a, n_resamples, confidence)
    codes_b = None if groups_b is None else _group_codes(groups_b, b_arr.shape[0])
    stats = (_bootstrap_means(a_arr, codes_a, n_resamples, seed)
             - _bootstrap_means(b_arr, codes_b, n_resamples, None if seed is None else seed + 1))
    low, high = _percentile_interval(stats, confidence)
    return DeltaCI(mean=float(a_arr.mean() - b_arr.mean()), low=low, high=high, p_value=_two_sided_p(stats),
                   n=int(a_arr.shape[0] + b_arr.shape[0]))


def bootstrap_mean_ci(
    x: Any,
    *,
    groups: Any = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap CI for mean(x); x shape (n,), groups optional shape (n,).

    Returns (mean, low, high). Stratified by ``groups`` as in ``paired_bootstrap``.
    """
    arr = _as_1d_finite("x", x)
    codes, n_resamples, confidence = _prepare_bootstrap(arr, groups, n_resamples, confidence)
    if np.all(arr == arr[0]):
        c = float(arr[0])
        return c, c, c
    stats = _bootstrap_means(arr, codes, n_resamples, seed)
    low, high = _percentile_interval(stats, confidence)
    return float(arr.mean()), low, high


# --------------------------------------------------------------------------
# multiple testing
# --------------------------------------------------------------------------


def _holm_array(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values for p of shape (m,), returned in input order."""
    m = p.shape[0]
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (m - np.arange(m))
    adjusted_sorted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    out = np.empty(m, dtype=np.float64)
    out[order] = adjusted_sorted
    return out


def holm(p_values: PValues) -> PValues:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, clipped at 1).

    Accepts a mapping name -> p (returns a dict with the same key order), a
    numpy array of shape (m,) (returns an array) or a sequence (returns a list).
    Empty input returns an empty container of the same kind.
    """
    if isinstance(p_values, Mapping):
        keys = list(p_values.keys())
        values = [p_values[k] for k in keys]
    else:
        keys = None
        values = p_values
    p = np.asarray(values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be a 1-D sequence or a mapping; got shape {p.shape}")
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("p_values must be finite and within [0, 1]; got NaN/inf or out-of-range values")
    adjusted = _holm_array(p)
    if keys is not None:
        return {k: float(v) for k, v in zip(keys, adjusted)}
    if isinstance(p_values, np.ndarray):
        return adjusted
    return [float(v) for v in adjusted]


# --------------------------------------------------------------------------
# regression
# --------------------------------------------------------------------------


def shrinkage_slope(pred: Any, target: Any) -> float:
    """OLS slope of pred regressed on target: cov(pred, target) / var(target).

    pred, target: shape (n,), n >= 2. A slope < 1 means predictions are shrunk
    toward the mean. Raises ValueError when target has zero variance.
    """
    p = _as_1d_finite("pred", pred, min_len=2)
    t = _as_1d_finite("target", target, min_len=2)
    _check_same_length(pred=p, target=t)
    tc = t - t.mean()
    var_t = float(np.dot(tc, tc))
    if var_t == 0.0:
        raise ValueError("target has zero variance (all values equal); the slope is undefined")
    return float(np.dot(p - p.mean(), tc) / var_t)


# --------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------


def _check_probs_labels(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate probs (n, C) with rows summing to 1 and integer labels (n,) in [0, C)."""
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D with shape (n, C); got shape {p.shape}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probs is empty (shape {p.shape}); need n >= 1 examples and C >= 1 classes")
    if not np.issubdtype(p.dtype, np.number):
        raise ValueError(f"probs must be numeric; got dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN/inf; only finite probabilities are allowed")
    if p.min() < 0.0:
        raise ValueError(f"probs must be non-negative; found minimum {p.min():.3g}")
    row_err = np.abs(p.sum(axis=1) - 1.0)
    if row_err.max() > _PROB_SUM_TOL:
        i = int(np.argmax(row_err))
        raise ValueError(
            f"each row of probs must sum to 1 within {_PROB_SUM_TOL:g}; "
            f"row {i} sums to {p[i].sum():.6g}"
        )
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"labels must have shape ({p.shape[0]},) to match probs; got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices; got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(
            f"labels must be in [0, {p.shape[1] - 1}] for C={p.shape[1]} classes; "
            f"got range [{y.min()}, {y.max()}]"
        )
    return p, y.astype(np.int64)


def _bin_stats(
    probs: Any, labels: Any, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (edges (B+1,), counts (B,), summed confidence (B,), summed correctness (B,)).

    Bins are equal-width on the top-choice confidence; bin i covers
    (edges[i], edges[i+1]], with confidence exactly 0 placed in bin 0.
    """
    n_bins = _check_positive_int("n_bins", n_bins)
    p, y = _check_probs_labels(probs, labels)
    top = np.argmax(p, axis=1)
    conf = np.clip(p[np.arange(p.shape[0]), top], 0.0, 1.0)
    correct = (top == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    return edges, counts, sum_conf, sum_acc


def ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error: sum_b (n_b / n) * |acc_b - conf_b|.

    probs: (n, C) class probabilities (rows sum to 1); labels: (n,) ints.
    Equal-width bins on the top-choice confidence.
    """
    _, counts, sum_conf, sum_acc = _bin_stats(probs, labels, n_bins)
    return float(np.abs(sum_acc - sum_conf).sum() / counts.sum())


def brier(probs: Any, labels: Any) -> float:
    """Multi-class Brier score: mean over examples of sum_c (p_c - onehot_c)^2.

    probs: (n, C); labels: (n,) ints. Ranges over [0, 2].
    """
    p, y = _check_probs_labels(probs, labels)
    diff = p.copy()
    diff[np.arange(p.shape[0]), y] -= 1.0
    return float(np.mean(np.sum(diff * diff, axis=1)))


def reliability_curve(probs: Any, labels: Any, n_bins: int = 15) -> dict[str, list]:
    """Reliability diagram data over equal-width confidence bins.

    probs: (n, C); labels: (n,) ints. Returns lists of length n_bins:
    ``bin_lower``, ``bin_upper``, ``confidence`` (mean top confidence, NaN if
    empty), ``accuracy`` (NaN if empty) and ``count`` (ints summing to n).
    """
    edges, counts, sum_conf, sum_acc = _bin_stats(probs, labels, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, sum_conf / counts, np.nan)
        mean_acc = np.where(counts > 0, sum_acc / counts, np.nan)
    return {
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": mean_acc.tolist(),
        "count": [int(c) for c in counts],
    }


# --------------------------------------------------------------------------
# rank correlation
# --------------------------------------------------------------------------


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x (n,), ties receiving the average of their ranks, shape (n,)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    avg_rank = last_rank - (counts - 1) / 2.0
    return avg_rank[inverse.reshape(-1)]


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation of x, y (shape (n,), n >= 3), average ranks for ties.

    Raises ValueError for fewer than 3 points, NaN/inf, or a constant input.
    """
    xa = _as_1d_finite("x", x, min_len=3)
    ya = _as_1d_finite("y", y, min_len=3)
    _check_same_length(x=xa, y=ya)
    rx = _average_ranks(xa)
    ry = _average_ranks(ya)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = float(np.sqrt(np.dot(rx, rx) * np.dot(ry, ry)))
    if denom == 0.0:
        raise ValueError("spearman is undefined when x or y is constant (all ranks tied)")
    return float(np.clip(np.dot(rx, ry) / denom, -1.0, 1.0))


# replicate-level inference (the run is the unit) lives in its own module; re-exported here for callers
from tapioca.analysis.replicates import (  # noqa: E402  (it uses the validation helpers above)
    ReplicateDelta, ratio_of_means, replicate_delta, t_interval, t_p_beyond, unit_means, units_mde, units_needed,
)
