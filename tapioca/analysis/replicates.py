"""Replicate-level inference: the run (model × selection draw) is the unit of replication, examples are nested in
it. Student-t intervals and tests over replicate means, noncentral-t power (statsmodels), one-sided tests for
equivalence bounds, and a ratio of means with a delta-method interval. Re-exported by
:mod:`tapioca.analysis.stats`."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tapioca.analysis.stats import _POWER, _as_1d_finite, _check_confidence, _check_same_length, _group_codes



@dataclass(frozen=True)
class ReplicateDelta:
    """A method-level mean difference inferred over replicates, not examples.

    Examples are averaged within each replicate (one model × one selection draw); with two or more models the
    draws of a model are averaged too and the unit is the **model** (the balanced nested random-effects model
    ``y_md = μ + a_m + e_md`` has exactly this estimator and standard error); with one model (a language model)
    the unit is the **draw** and the inference is about that model. ``mean``: mean of the unit means;
    ``low``/``high``: Student-t ``confidence`` interval on ``n`` units (``df = n − 1``); ``p_value``: one-sample
    t-test of mean 0; ``low_tost``/``high_tost``: the (1 − 2α) interval of the equivalence (TOST) test at the
    same α; ``sd``: sd of the unit means; ``mde``: the true difference a two-sided t-test on ``n`` units detects
    with 80 % power (noncentral t, statsmodels). With fewer than 2 units nothing is inferred (NaN bounds, p 1).
    """

    mean: float
    low: float
    high: float
    p_value: float
    n: int
    low_tost: float
    high_tost: float
    sd: float
    mde: float
    unit: str  # "model" or "draw"
    n_examples: int
    unit_means: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["unit_means"] = list(self.unit_means)
        return out


def unit_means(x: Any, models: Any, draws: Any = None) -> tuple[np.ndarray, str]:
    """Means of ``x`` (n,) per unit of replication and the unit's name: per model (draw means averaged with equal
    weight) when ``models`` (n,) has two or more labels, else per draw (``draws`` (n,); all zero when None)."""
    arr = _as_1d_finite("x", x)
    m = _group_codes(models, arr.shape[0])
    k = np.zeros(arr.shape[0], dtype=np.int64) if draws is None else _group_codes(draws, arr.shape[0])
    cells = m * (int(k.max()) + 1) + k
    labels, codes = np.unique(cells, return_inverse=True)
    cell_means = np.bincount(codes, weights=arr) / np.bincount(codes)  # (replicates,)
    cell_models = labels // (int(k.max()) + 1)
    if len(np.unique(cell_models)) >= 2:
        return np.array([cell_means[cell_models == g].mean() for g in np.unique(cell_models)]), "model"
    return cell_means, "draw"


def replicate_delta(d: Any, models: Any, draws: Any = None, confidence: float = 0.95,
                    power: float = _POWER) -> ReplicateDelta:
    """Replicate-level inference on per-example paired differences ``d`` (n,) labelled by model (n,) and
    selection draw (n,); see :class:`ReplicateDelta`."""
    confidence = _check_confidence(confidence)
    arr = _as_1d_finite("d", d)
    means, unit = unit_means(arr, models, draws)
    k, mean = len(means), float(means.mean())
    nan = float("nan")
    if k < 2:
        return ReplicateDelta(mean, nan, nan, 1.0, k, nan, nan, nan, float("inf"), unit, len(arr), tuple(means))
    sd = float(means.std(ddof=1))
    alpha = 1.0 - confidence
    if sd == 0.0:  # every unit agrees exactly (e.g. nothing removed anywhere): a point mass
        p = 1.0 if mean == 0.0 else 0.0
        return ReplicateDelta(mean, mean, mean, p, k, mean, mean, 0.0, 0.0, unit, len(arr), tuple(means))
    se = sd / math.sqrt(k)
    half = _t_quantile(1 - alpha / 2, k - 1) * se
    half_tost = _t_quantile(1 - alpha, k - 1) * se
    p = float(min(1.0, 2.0 * _t_sf(abs(mean) / se, k - 1)))  # the one-sample t-test of mean 0
    return ReplicateDelta(mean, mean - half, mean + half, p, k, mean - half_tost, mean + half_tost, sd,
                          units_mde(sd, k, confidence, power), unit, len(arr), tuple(float(v) for v in means))


@functools.lru_cache(maxsize=4096)
def _t_quantile(q: float, df: int) -> float:
    """Student-t quantile (scipy.special.stdtrit: the ufunc behind scipy.stats.t.ppf, without its overhead)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, q))


def _t_sf(t: float, df: int) -> float:
    """Student-t survival function P(T > t) (scipy.special.stdtr)."""
    from scipy.special import stdtr

    return float(stdtr(df, -t))


@functools.lru_cache(maxsize=256)
def _standardised_mde(k: int, alpha: float, power: float) -> float:
    from statsmodels.stats.power import TTestPower

    return float(TTestPower().solve_power(nobs=k, alpha=alpha, power=power, alternative="two-sided"))


def units_mde(sd: float, k: int, confidence: float = 0.95, power: float = _POWER) -> float:
    """Smallest true mean a two-sided one-sample t-test on ``k`` units of sd ``sd`` detects with ``power``."""
    if k < 2 or not math.isfinite(sd):
        return float("inf")
    return _standardised_mde(int(k), 1.0 - confidence, power) * sd


def units_needed(sd: float | None, effect: float, confidence: float = 0.95, power: float = _POWER) -> int | None:
    """Units (models, or draws of one model) a two-sided t-test needs to detect a true mean ``effect`` with
    ``power`` when unit means vary with sd ``sd``; None when sd is missing, NaN or 0."""
    if sd is None or not sd > 0 or not effect > 0 or not math.isfinite(effect):
        return None
    from statsmodels.stats.power import TTestPower

    size, alpha = effect / sd, 1.0 - confidence

    def enough(k: int) -> bool:
        return float(TTestPower().power(effect_size=size, nobs=k, alpha=alpha, alternative="two-sided")) >= power

    high = 2
    while not enough(high):  # the smallest k with enough power: double, then bisect
        if high > 10**9:
            return None
        high *= 2
    low = max(2, high // 2)
    if enough(low):
        return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


def t_interval(mean: float, sd: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t ``confidence`` interval of a mean of ``n`` units with sd ``sd`` (NaN below 2 units; a
    point when sd is 0)."""
    if n < 2 or not math.isfinite(sd):
        return float("nan"), float("nan")
    half = _t_quantile(1 - (1 - confidence) / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def t_p_beyond(mean: float, sd: float, n: int, bound: float, side: str) -> float:
    """One-sided t-test p-value that the true mean lies beyond ``bound`` (``side`` "above" or "below"), from
    ``n`` units of sd ``sd``: the equivalence (TOST) half and the non-inferiority test. 1 below 2 units; with sd 0
    it is 0 when the mean lies strictly beyond the bound, else 1."""
    if side not in ("above", "below"):
        raise ValueError(f"side must be 'above' or 'below'; got {side!r}")
    if n < 2 or not math.isfinite(sd) or not math.isfinite(mean):
        return 1.0
    beyond = mean - bound if side == "above" else bound - mean
    if sd == 0.0:
        return 0.0 if beyond > 0 else 1.0
    return _t_sf(beyond / (sd / math.sqrt(n)), n - 1)


def ratio_of_means(a: Any, b: Any, confidence: float = 0.95) -> tuple[float, float, float]:
    """mean(a) / mean(b) over paired units (k,) with a delta-method Student-t interval (k − 1 df): the
    standard error of a ratio estimator. Returns (ratio, low, high); NaN bounds below 2 units or when mean(b)
    is 0."""
    x, y = _as_1d_finite("a", a), _as_1d_finite("b", b)
    _check_same_length(a=x, b=y)
    k, mb = len(x), float(y.mean())
    if mb == 0.0:
        return float("nan"), float("nan"), float("nan")
    r = float(x.mean()) / mb
    if k < 2:
        return r, float("nan"), float("nan")
    resid = x - r * y  # linearised ratio: var(R) ≈ var(a − R b) / (k mean(b)²)
    sd = float(resid.std(ddof=1)) / abs(mb)
    low, high = t_interval(r, sd, k, confidence)
    return r, low, high
