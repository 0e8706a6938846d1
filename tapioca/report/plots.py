"""Plots of a study's run directory: pure functions from results data to matplotlib Figures (no pyplot,
no global state), plus the small formatting helpers the report's tables share with them."""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Iterable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tapioca.analysis import stats
from tapioca.analysis.evaluation import HIGHER_IS_BETTER, Evaluation

METRIC_LABELS = {"nmse": "NMSE", "tol_acc": "tolerance accuracy"}
METHOD_ORDER = ("tale", "block_influence", "angular", "last_k", "random", "distortion", "magnitude", "wanda")
N_RELIABILITY_BINS = 15
DPI = 100
IN_SAMPLE = "in-sample"  # the paper's protocol: blocks selected and scored on the same selection examples
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # t quantile 0.975, df 1..10


def _num(x: Any, signed: bool = False) -> str:
    """A number with 4 significant digits ('—' for None / NaN)."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return "—" if not isinstance(x, bool) else str(x).lower()
    if x == 0:
        return "0"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _ci(d: dict, signed: bool = False) -> str:
    return f"{_num(d.get('mean'), signed)} [{_num(d.get('low'), signed)}, {_num(d.get('high'), signed)}]"


def _p(x: Any) -> str:
    return "—" if x is None else f"{x:.3g}"


def _outcome(d: dict) -> str:
    return "better" if d.get("improved") else "worse" if d.get("worse") else "no change"


def _removed_text(by_seed: dict[str, list[int]] | None) -> str:
    if not isinstance(by_seed, dict):
        return "—"
    return " · ".join(f"s{seed}: {list(blocks) if blocks else '–'}"
                      for seed, blocks in sorted(by_seed.items(), key=lambda kv: int(kv[0])))


def _shifts(results: dict) -> list[str]:
    return [d for d in results["full"] if d != "id"]


def _metrics(results: dict) -> list[str]:
    first = next(iter(results["full"].values()), {})
    return [m for m in first if isinstance(first[m], dict) and "mean" in first[m]]


def _main_metric(results: dict) -> str:
    metrics = _metrics(results)
    metric = results.get("selection_metric", "nmse")
    return metric if metric in metrics else (metrics[0] if metrics else "nmse")


def _lower_is_better(metric: str) -> bool:
    return not HIGHER_IS_BETTER.get(metric, False)


def _err(d: dict) -> tuple[float, float]:
    """Asymmetric error-bar lengths (below, above) from a {mean, low, high} entry."""
    mean, low, high = (d.get(k) for k in ("mean", "low", "high"))
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mean, low, high)):
        return 0.0, 0.0
    return max(mean - low, 0.0), max(high - mean, 0.0)


def _delta_view(d: dict, metric: str) -> dict:
    """A Δ entry on a comparable scale: % of the full model's score for lower-is-better metrics (NMSE),
    percentage points for accuracies."""
    full = d.get("full")
    if _lower_is_better(metric):
        scale = 100.0 / full if isinstance(full, (int, float)) and full > 0 else float("nan")
    else:
        scale = 100.0
    out = {k: float(d[k]) * scale if isinstance(d.get(k), (int, float)) else float("nan")
           for k in ("mean", "low", "high")}
    return {**d, **out}


def _delta_unit(metric: str) -> str:
    return "Δ, % of full" if _lower_is_better(metric) else "Δ, percentage points"


def _symlog_y(ax, values: Iterable[float], linthresh: float) -> None:
    """Symmetric-log y-axis (linear within ±linthresh) when the values span several decades."""
    finite = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if finite.size and np.abs(finite).max() > 100 * linthresh:
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_ylim(min(finite.min(), 0.0) - 0.5 * linthresh, finite.max() * 2 + linthresh)


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas (no pyplot, no global backend switch)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _mean_over_seeds(arrays: list[Any]) -> np.ndarray | None:
    arrays = [np.asarray(a, dtype=float) for a in arrays if a is not None]
    if not arrays or len({a.shape for a in arrays}) != 1:
        return None
    return np.mean(arrays, axis=0)


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


# ----------------------------------------------------------------------------------------------------------
# plots: each returns a Figure, or None when the run has nothing to draw
# ----------------------------------------------------------------------------------------------------------


def plot_scores(results: dict, metric: str) -> Figure | None:
    """Full vs pruned held-out score (95% CI) per distribution, and Δ with CI, one column per protocol."""
    protocols = list(results["protocols"])
    dists = list(results["full"])
    if not protocols or not dists or metric not in results["full"][dists[0]]:
        return None
    fig = _figure(max(6.0, len(protocols) * max(3.2, 0.55 * len(dists) + 1)), 7.0)
    axes = fig.subplots(2, len(protocols), squeeze=False)
    x = np.arange(len(dists))
    for col, protocol in enumerate(protocols):
        data = results["protocols"][protocol]
        pruned, delta = data.get("pruned", {}), data.get("delta", {})
        full = data.get("full") or results["full"]  # in-sample: the full model on the selection examples
        top, bottom = axes[0, col], axes[1, col]
        for offset, label, source, color in ((-0.2, "full", full, "#4c72b0"),
                                             (0.2, "pruned", pruned, "#dd8452")):
            entries = [_dig(source, d, metric) or {} for d in dists]
            means = [e.get("mean", np.nan) for e in entries]
            errs = np.array([_err(e) for e in entries]).T
            top.bar(x + offset, means, 0.4, yerr=errs, capsize=2, label=label, color=color)
        if _lower_is_better(metric):
            top.set_yscale("log")
        split = "selection examples" if protocol == IN_SAMPLE else "held-out"
        top.set_title(f"{protocol}\n{split} {METRIC_LABELS.get(metric, metric)}", fontsize=10)
        top.legend(fontsize=8)
        rows = [_delta_view(_dig(delta, d, metric) or {}, metric) for d in dists]
        for i, r in enumerate(rows):
            color = "#2a9d41" if r.get("improved") else "#c0392b" if r.get("worse") else "#555555"
            bottom.errorbar([i], [r["mean"]], yerr=np.array(_err(r)).reshape(2, 1), fmt="o", color=color, capsize=3)
        bottom.axhline(0, color="black", lw=0.8)
        bottom.set_ylabel(_delta_unit(metric), fontsize=8)
        bottom.set_title("Δ (pruned − full), 95% CI\ngreen better, red worse (Holm)", fontsize=9)
        for ax in (top, bottom):
            ax.set_xticks(x, dists, rotation=45, ha="right", fontsize=8)
    return fig


def plot_methods(results: dict) -> Figure | None:
    """Δ held-out score (95% CI) of every pruning method per shift, from ``comparisons``."""
    comparisons = results.get("comparisons")
    if not isinstance(comparisons, dict) or not comparisons:
        return None
    shifts = list(comparisons)
    found = list(dict.fromkeys(m for s in shifts for m in comparisons[s]))
    methods = [m for m in METHOD_ORDER if m in found] + [m for m in found if m not in METHOD_ORDER]
    metrics = list(dict.fromkeys(k for s in shifts for m in comparisons[s].values() for k in m))
    if not methods or not metrics:
        return None
    fig = _figure(max(7.0, 0.5 * len(shifts) * len(methods) / 2 + 3), 3.2 * len(metrics))
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    width = 0.8 / len(methods)
    x = np.arange(len(shifts))
    for ax, metric in zip(axes, metrics):
        for j, method in enumerate(methods):
            rows = [_delta_view(_dig(comparisons, s, method, metric) or {}, metric) for s in shifts]
            means = [r["mean"] for r in rows]
            errs = np.nan_to_num(np.array([_err(r) for r in rows]).T)
            ax.bar(x - 0.4 + (j + 0.5) * width, means, width, yerr=errs, capsize=1.5, label=method)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, shifts, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(_delta_unit(metric), fontsize=8)
        ax.set_title(f"Δ {METRIC_LABELS.get(metric, metric)} (pruned − full) by method, 95% CI", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def mean_profiles(profiles: dict[int, dict], shift: str) -> dict[str, dict[str, np.ndarray]]:
    """Seed-mean norm and pairwise profiles: ID full, OOD full and OOD after target-protocol pruning."""
    sources = {
        "ID, full": lambda p: _dig(p, "full", "id"),
        "OOD, full": lambda p: _dig(p, "full", shift),
        "OOD, pruned (target)": lambda p: _dig(p, "target", shift, "ood"),
    }
    out = {}
    for label, get in sources.items():
        curves = {key: _mean_over_seeds([_dig(get(p), key) for p in profiles.values()])
                  for key in ("norm", "pairwise")}
        if all(c is not None for c in curves.values()):
            out[label] = curves
    return out


def plot_profiles(results: dict, profiles: dict[int, dict]) -> Figure | None:
    """Norm and pairwise-distance profiles (mean over seeds) per shift, block index 0..L on the x-axis."""
    shifts = [s for s in _shifts(results) if mean_profiles(profiles, s)]
    if not shifts:
        return None
    fig = _figure(9.0, 2.3 * len(shifts) + 0.5)
    axes = fig.subplots(len(shifts), 2, squeeze=False)
    styles = {"ID, full": ("black", "-"), "OOD, full": ("#c0392b", "-"), "OOD, pruned (target)": ("#2471a3", "--")}
    for row, shift in enumerate(shifts):
        for label, curves in mean_profiles(profiles, shift).items():
            color, ls = styles[label]
            for col, key in enumerate(("norm", "pairwise")):
                y = curves[key]
                axes[row, col].plot(np.arange(len(y)), y, color=color, ls=ls, marker=".", label=label)
        axes[row, 0].set_ylabel(shift, fontsize=9)
    for col, title in enumerate(("norm ‖h_l‖ (query position)", "mean pairwise distance")):
        axes[0, col].set_title(title)
        axes[-1, col].set_xlabel("block index l (0 = embeddings)")
    for ax in axes.ravel():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(fontsize=7)
    return fig


def distortion_drop(results: dict) -> dict[str, tuple[float, float]]:
    """Per shift: (D of the full model, OOD drop of the full model's score vs ID; positive = worse)."""
    d_mean = _dig(results, "geometry", "D_mean") or {}
    metric = "nmse" if "nmse" in _metrics(results) else _main_metric(results)
    sign = 1.0 if _lower_is_better(metric) else -1.0
    id_score = _dig(results, "full", "id", metric, "mean")
    out = {}
    for shift in _shifts(results):
        d = _dig(d_mean, shift, "full")
        score = _dig(results, "full", shift, metric, "mean")
        if d is not None and score is not None and id_score is not None:
            out[shift] = (float(d), sign * (float(score) - float(id_score)))
    return out


def _spearman(pairs: dict[str, tuple[float, float]]) -> float | None:
    try:
        return stats.spearman([p[0] for p in pairs.values()], [p[1] for p in pairs.values()])
    except ValueError:
        return None


def plot_distortion_vs_drop(results: dict) -> Figure | None:
    """Per-shift distortion D (full model) vs OOD score drop, with the ID-vs-ID noise floor."""
    pairs = distortion_drop(results)
    if not pairs:
        return None
    fig = _figure(6.5, 4.8)
    ax = fig.subplots()
    xs, ys = zip(*pairs.values())
    ax.scatter(xs, ys, color="#2471a3", zorder=3)
    for name, (x, y) in pairs.items():
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    floor = _dig(results, "geometry", "D_mean", "noise_floor", "full")
    if floor is not None:
        ax.axvline(floor, color="grey", ls="--", label=f"noise floor D = {floor:.3g}")
        ax.legend(fontsize=8)
    if min(xs) > 0:
        ax.set_xscale("log")
    id_level = abs(_dig(results, "full", "id", "nmse", "mean") or 0.0)
    _symlog_y(ax, ys, linthresh=id_level or max(abs(v) for v in ys) * 1e-2 or 1.0)
    rho = _spearman(pairs)
    metric = "NMSE" if "nmse" in _metrics(results) else _main_metric(results)
    ax.set_xlabel("distortion D (OOD vs ID profiles, full model, mean over seeds)")
    ax.set_ylabel(f"OOD drop: {metric}(shift) − {metric}(ID)")
    ax.set_title("distortion vs OOD drop" + (f" (Spearman ρ = {rho:.2f})" if rho is not None else ""))
    return fig


def t975(df: int) -> float:
    """Student-t 0.975 quantile: exact table to df 10, Cornish-Fisher expansion beyond (error < 0.005)."""
    if df <= len(T975):
        return T975[max(df, 1) - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def seed_interval(values: Iterable[float]) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of per-seed values: a t-based 95% interval across seeds (NaN bounds below 2 seeds)."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if v.size < 2:
        return float(v[0]), float("nan"), float("nan"), 1
    half = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half), int(v.size)


def sweep_stats(by_seed: dict | None, key: str) -> dict[str, np.ndarray] | None:
    """A residual-scaling sweep's ``key`` ("score" or "D") per α across seeds: alpha, mean, low, high and the
    number of seeds n (interval: :func:`seed_interval`)."""
    points: dict[float, list[float]] = {}
    for rows in (by_seed or {}).values():
        for r in rows or []:
            if isinstance(r, dict) and "alpha" in r:
                points.setdefault(float(r["alpha"]), []).append(r.get(key, np.nan))
    if not points:
        return None
    alphas = sorted(points)
    rows = np.array([seed_interval(points[a]) for a in alphas], dtype=float).reshape(-1, 4)
    return {"alpha": np.array(alphas), "mean": rows[:, 0], "low": rows[:, 1], "high": rows[:, 2],
            "n": rows[:, 3].astype(int)}


def sweep_seeds(interventions: dict) -> int:
    """The most seeds any sweep of the run has."""
    return max((len([r for r in by_seed.values() if r]) for row in interventions.values() if isinstance(row, dict)
                for by_seed in (row.get("sweep_removed"), row.get("sweep_control")) if isinstance(by_seed, dict)),
               default=0)


def plot_interventions(results: dict) -> Figure | None:
    """Score and D vs residual scale α of the removed blocks and of control blocks, per shift: the mean over
    seeds with a t-based 95% interval across seeds (shaded); with one seed, the points themselves."""
    interventions = results.get("interventions")
    if not isinstance(interventions, dict):
        return None
    shifts = [s for s, v in interventions.items() if isinstance(v, dict)
              and (sweep_stats(v.get("sweep_removed"), "score") or sweep_stats(v.get("sweep_control"), "score"))]
    if not shifts:
        return None
    lm = results.get("kind") == "lm"
    score = f"score ({results.get('selection_metric', 'score')})" if lm else "score (−NMSE)"
    fig = _figure(9.0, 2.5 * len(shifts) + 0.5)
    axes = fig.subplots(len(shifts), 2, squeeze=False)
    for row, shift in enumerate(shifts):
        for key, label, ls, color in (("sweep_removed", "TALE-removed blocks", "-", "#2471a3"),
                                      ("sweep_control", "control blocks", "--", "#dd8452")):
            for col, value in enumerate(("score", "D")):
                band = sweep_stats(interventions[shift].get(key), value)
                if band is None:
                    continue
                ax, one = axes[row, col], int(band["n"].max()) < 2
                name = f"{label} (1 seed: points, no interval)" if one else f"{label} (mean, 95% CI over seeds)"
                ax.plot(band["alpha"], band["mean"], ls="none" if one else ls, marker="o", color=color, label=name)
                if not one:
                    ax.fill_between(band["alpha"], band["low"], band["high"], color=color, alpha=0.18, lw=0)
        axes[row, 0].set_ylabel(f"{shift}\n{score}", fontsize=9)
        axes[row, 1].set_ylabel("D", fontsize=9)
        axes[row, 0].legend(fontsize=6)
    axes[0, 0].set_title("OOD score vs α (higher is better)")
    axes[0, 1].set_title("distortion D vs α")
    for ax in axes[-1]:
        ax.set_xlabel("residual scale α (1 = full, 0 = removed)")
    return fig


def realignment_pairs(results: dict) -> dict[str, list[tuple[float, float]]]:
    """Per shift: (D full, D target-pruned) of every seed where TALE removed a block (C4's cases)."""
    per_seed = _dig(results, "geometry", "D_per_seed") or {}
    removed = _dig(results, "removed", "target") or {}
    out: dict[str, list[tuple[float, float]]] = {}
    for shift in _shifts(results):
        for seed, rows in per_seed.items():
            full, pruned = _dig(rows, shift, "full"), _dig(rows, shift, "target_pruned")
            if full is not None and pruned is not None and _dig(removed, shift, seed):
                out.setdefault(shift, []).append((float(full), float(pruned)))
    return out


def plot_realignment(results: dict) -> Figure | None:
    """C4: distortion D of each shift before (full) and after target-protocol pruning, one line per seed where
    TALE removed blocks (blue: D fell, red: D rose), with the ID-vs-ID noise floor."""
    pairs = realignment_pairs(results)
    if not pairs:
        return None
    fig = _figure(max(5.5, 1.3 * len(pairs) + 2), 3.8)
    ax = fig.subplots()
    for i, shift in enumerate(pairs):
        for full, pruned in pairs[shift]:
            ax.plot([i - 0.15, i + 0.15], [full, pruned], marker="o", ms=4,
                    color="#2471a3" if pruned < full else "#c0392b")
    floor = _dig(results, "geometry", "D_mean", "noise_floor", "full")
    if floor is not None:
        ax.axhline(floor, color="grey", ls="--", lw=0.8, label=f"noise floor D = {floor:.3g}")
        ax.legend(fontsize=8)
    values = [v for rows in pairs.values() for p in rows for v in p]
    if min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")
    ax.set_xticks(np.arange(len(pairs)), [f"{s}\nfull → pruned" for s in pairs], fontsize=8)
    ax.set_ylabel("distortion D (OOD vs ID profiles)")
    ax.set_title("D before → after pruning, one line per seed (blue: fell, red: rose)", fontsize=10)
    return fig


def binned_reliability(pred: np.ndarray, target: np.ndarray, n_bins: int = N_RELIABILITY_BINS):
    """(mean target, mean prediction) in ``n_bins`` quantile bins of the target."""
    edges = np.unique(np.quantile(target, np.linspace(0, 1, n_bins + 1)))
    if edges.size < 2:
        return np.array([target.mean()]), np.array([pred.mean()])
    idx = np.clip(np.searchsorted(edges, target, side="right") - 1, 0, edges.size - 2)
    used = [b for b in range(edges.size - 1) if np.any(idx == b)]
    return (np.array([target[idx == b].mean() for b in used]), np.array([pred[idx == b].mean() for b in used]))


def _panel_grid(n: int, height: float) -> tuple[Figure, np.ndarray]:
    """A figure with ``n`` small panels, at most 4 per row; returns it and its axes, flattened."""
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = _figure(3.0 * ncols, height * nrows)
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def _panel_style(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)


def _finish_grid(fig: Figure, axes: np.ndarray, used: int, xlabel: str, ylabel: str) -> Figure:
    """Hide the panels after the first ``used`` and label the shared axes."""
    for ax in axes[used:]:
        ax.set_visible(False)
    fig.supxlabel(xlabel, fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    return fig


def plot_reliability(results: dict, ev: Evaluation | None) -> Figure | None:
    """Binned mean prediction vs binned target per distribution (full model, seeds pooled), with y = x.
    Regression runs only: an LM run's calibration is :func:`plot_calibration`."""
    if ev is None or results.get("kind") == "lm":
        return None
    dists = [d for d in results["full"] if d in ev.predictions] or ev.distributions
    if not dists:
        return None
    fig, axes = _panel_grid(len(dists), 2.8)
    for ax, dist in zip(axes, dists):
        pred = np.asarray(ev.predictions[dist], dtype=float)
        target = np.asarray(ev.targets[dist], dtype=float)
        ok = np.isfinite(pred) & np.isfinite(target)
        pred, target = pred[ok], target[ok]
        if target.size == 0:
            ax.set_visible(False)
            continue
        slope = _dig(results, "full", dist, "shrinkage_slope")
        if slope is None:
            try:
                slope = stats.shrinkage_slope(pred, target)
            except ValueError:
                slope = float("nan")
        tx, py = binned_reliability(pred, target)
        lo, hi = float(min(tx.min(), py.min())), float(max(tx.max(), py.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", ls=":", label="y = x")
        ax.plot(tx, py, marker="o", ms=3, label=f"slope {slope:.3g}")
        _panel_style(ax, dist)
    return _finish_grid(fig, axes, len(dists), "binned true y (15 quantile bins)", "mean prediction ŷ")


def attribution_matrix(results: dict) -> tuple[list[str], np.ndarray] | None:
    """Shifts and the (shifts, blocks) seed-mean per-block distortion attribution a_l."""
    per_seed = _dig(results, "geometry", "attribution_full")
    if not isinstance(per_seed, dict) or not per_seed:
        return None
    shifts = [s for s in _shifts(results) if all(s in v for v in per_seed.values())]
    rows = [_mean_over_seeds([v[s] for v in per_seed.values()]) for s in shifts]
    keep = [(s, r) for s, r in zip(shifts, rows) if r is not None]
    if not keep or len({r.shape for _, r in keep}) != 1:
        return None
    return [s for s, _ in keep], np.stack([r for _, r in keep])


def plot_attribution(results: dict) -> Figure | None:
    """Heatmap of per-block distortion attribution (shifts × blocks, mean over seeds)."""
    found = attribution_matrix(results)
    if found is None:
        return None
    shifts, mat = found
    fig = _figure(max(6.5, 0.6 * mat.shape[1] + 3), 0.4 * len(shifts) + 1.8)
    ax = fig.subplots()
    vmax = float(np.nanmax(np.abs(mat))) or 1.0
    image = ax.imshow(mat, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, label="a_l = |δ(l)| − |δ(l−1)|")
    ax.set_yticks(np.arange(len(shifts)), shifts, fontsize=8)
    ax.set_xticks(np.arange(mat.shape[1]), [str(i) for i in range(mat.shape[1])], fontsize=8)
    ax.set_xlabel("block (original index)")
    ax.set_title("distortion attribution per block (full model, seed mean)", fontsize=10)
    if mat.size <= 200:
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                    color="white" if abs(v) > 0.6 * vmax else "black")
    return fig


def plot_calibration(results: dict, protocol: str = "target") -> Figure | None:
    """Reliability diagrams (accuracy vs confidence, equal-width bins) per distribution, full vs pruned under
    ``protocol``, from ``results["calibration"]`` (LM runs)."""
    table = _dig(results, "calibration", protocol)
    if not isinstance(table, dict) or not table:
        return None
    dists = list(table)
    fig, axes = _panel_grid(len(dists), 2.9)
    for ax, dist in zip(axes, dists):
        ax.plot([0, 1], [0, 1], color="grey", ls=":", label="y = x")
        for model in ("full", "pruned"):
            curve, ece = table[dist][model]["reliability"], table[dist][model]["ece"]
            conf, acc = np.asarray(curve["confidence"], float), np.asarray(curve["accuracy"], float)
            ok = np.isfinite(conf) & np.isfinite(acc)
            ax.plot(conf[ok], acc[ok], marker="o", ms=3, label=f"{model} (ECE {ece:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        _panel_style(ax, dist)
    return _finish_grid(fig, axes, len(dists), "mean confidence (bin)", "accuracy (bin)")


def make_plots(results: dict, profiles: dict[int, dict], ev: Evaluation | None) -> dict[str, Figure]:
    """Every plot the run has data for, by file name (in report order)."""
    makers: dict[str, Callable[[], Figure | None]] = {
        **{f"scores_{m}.png": (lambda m=m: plot_scores(results, m)) for m in _metrics(results)},
        "methods.png": lambda: plot_methods(results),
        "profiles.png": lambda: plot_profiles(results, profiles),
        "realignment.png": lambda: plot_realignment(results),
        "distortion_vs_drop.png": lambda: plot_distortion_vs_drop(results),
        "interventions.png": lambda: plot_interventions(results),
        "reliability.png": lambda: plot_reliability(results, ev),
        "calibration.png": lambda: plot_calibration(results),
        "attribution.png": lambda: plot_attribution(results),
    }
    figures = {}
    for name, make in makers.items():
        fig = make()
        if fig is not None:
            figures[name] = fig
    return figures
