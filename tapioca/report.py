"""A study's report: PNG plots, ``report.md`` and a self-contained ``report.html``.

Reads only the run directory (``results.json``, ``config.yaml``, ``environment.json``, ``timings.json``,
``geometry/seed*.json`` and ``evaluation/seed*/full.npz``); never loads or runs a model. Optional blocks of
``results.json`` (``comparisons``, ``interventions``, ``claims``) are rendered when present.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tapioca import stats
from tapioca.errors import CheckpointError
from tapioca.evaluation import METRICS, Evaluation
from tapioca.io import atomic_write_bytes

__all__ = ["write_report", "build_report", "load_results"]

REQUIRED_KEYS = ("quality", "full", "protocols")
METRIC_LABELS = {"nmse": "NMSE", "tol_acc": "tolerance accuracy"}
METHOD_ORDER = ("tale", "block_influence", "angular", "last_k", "random", "distortion", "magnitude", "wanda")
CLAIMS = {
    "C1": "task-aware pruning gives no ID benefit",
    "C2": "task-aware pruning improves OOD",
    "C3": "OOD inputs distort the layer-wise norm / pairwise-distance profiles",
    "C4": "pruning realigns OOD profiles toward ID",
    "C5": "the realignment is causal",
    "C6": "consistent across model scales",
    "C7": "the gain is not 'tamer confidence'",
    "C8": "the distortion metric predicts the OOD drop",
    "C9": "the gain needs whole-layer removal (weight pruning gives no OOD gain)",
}
N_RELIABILITY_BINS = 15
DPI = 100

Block = tuple  # ("h", level, text) | ("p", text) | ("table", headers, rows) | ("img", file, caption)


# ----------------------------------------------------------------------------------------------------------
# reading the run directory
# ----------------------------------------------------------------------------------------------------------


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """``run_dir/results.json`` as a dict; CheckpointError naming the file when missing or corrupt."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; finish the study first (tapioca study --out {Path(run_dir)})")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt results file ({exc}); re-run the study's statistics step") from exc
    if not isinstance(results, dict):
        raise CheckpointError(f"{path}: corrupt results file (top level is {type(results).__name__}, not a mapping)")
    missing = [key for key in REQUIRED_KEYS if not isinstance(results.get(key), dict)]
    if missing:
        raise CheckpointError(f"{path}: corrupt results file (missing {', '.join(missing)})")
    return results


def _optional_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _optional_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _seed_key(path: Path) -> int:
    digits = re.sub(r"\D", "", path.stem if path.is_file() else path.name)
    return int(digits) if digits else -1


def load_profiles(run_dir: Path) -> dict[int, dict]:
    """Geometry profiles per seed from ``geometry/seed*.json`` (unreadable files skipped)."""
    out = {}
    for path in sorted((run_dir / "geometry").glob("seed*.json"), key=_seed_key):
        data = _optional_json(path)
        if isinstance(data, dict):
            out[_seed_key(path)] = data
    return out


def load_full_evaluation(run_dir: Path) -> Evaluation | None:
    """The full model's held-out evaluation, pooled over seeds, or None when no file is readable."""
    parts = []
    for path in sorted((run_dir / "evaluation").glob("seed*/full.npz"), key=lambda p: _seed_key(p.parent)):
        try:
            parts.append(Evaluation.load(path))
        except (OSError, ValueError, KeyError):
            continue
    return Evaluation.concat(parts) if parts else None


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


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
    return not METRICS.get(metric, False)


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
    fig = _figure(max(6.0, 0.55 * len(dists) * len(protocols) + 2), 7.0)
    axes = fig.subplots(2, len(protocols), squeeze=False)
    x = np.arange(len(dists))
    for col, protocol in enumerate(protocols):
        pruned = results["protocols"][protocol].get("pruned", {})
        delta = results["protocols"][protocol].get("delta", {})
        top, bottom = axes[0, col], axes[1, col]
        for offset, label, source, color in ((-0.2, "full", results["full"], "#4c72b0"),
                                             (0.2, "pruned", pruned, "#dd8452")):
            entries = [_dig(source, d, metric) or {} for d in dists]
            means = [e.get("mean", np.nan) for e in entries]
            errs = np.array([_err(e) for e in entries]).T
            top.bar(x + offset, means, 0.4, yerr=errs, capsize=2, label=label, color=color)
        if _lower_is_better(metric):
            top.set_yscale("log")
        top.set_title(f"protocol {protocol}: held-out {METRIC_LABELS.get(metric, metric)}")
        top.legend(fontsize=8)
        rows = [_delta_view(_dig(delta, d, metric) or {}, metric) for d in dists]
        for i, r in enumerate(rows):
            color = "#2a9d41" if r.get("improved") else "#c0392b" if r.get("worse") else "#555555"
            bottom.errorbar([i], [r["mean"]], yerr=np.array(_err(r)).reshape(2, 1), fmt="o", color=color, capsize=3)
        bottom.axhline(0, color="black", lw=0.8)
        bottom.set_ylabel(_delta_unit(metric), fontsize=8)
        bottom.set_title("Δ (pruned − full), 95% CI; green better, red worse (Holm)", fontsize=10)
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


def _sweep_mean(by_seed: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Seed-mean (alpha, score, D) of a residual-scaling sweep."""
    points: dict[float, list[tuple[float, float]]] = {}
    for rows in (by_seed or {}).values():
        for r in rows or []:
            if isinstance(r, dict) and "alpha" in r:
                points.setdefault(float(r["alpha"]), []).append((r.get("score", np.nan), r.get("D", np.nan)))
    if not points:
        return None
    alphas = np.array(sorted(points))
    score = np.array([np.nanmean([s for s, _ in points[a]]) for a in alphas])
    dist = np.array([np.nanmean([d for _, d in points[a]]) for a in alphas])
    return alphas, score, dist


def plot_interventions(results: dict) -> Figure | None:
    """Score and D vs residual scale α of the removed blocks and of control blocks, per shift."""
    interventions = results.get("interventions")
    if not isinstance(interventions, dict):
        return None
    shifts = [s for s, v in interventions.items() if isinstance(v, dict)
              and (_sweep_mean(v.get("sweep_removed")) or _sweep_mean(v.get("sweep_control")))]
    if not shifts:
        return None
    fig = _figure(9.0, 2.5 * len(shifts) + 0.5)
    axes = fig.subplots(len(shifts), 2, squeeze=False)
    for row, shift in enumerate(shifts):
        for key, label, ls, color in (("sweep_removed", "TALE-removed blocks", "-", "#2471a3"),
                                      ("sweep_control", "control blocks", "--", "#dd8452")):
            sweep = _sweep_mean(interventions[shift].get(key))
            if sweep is None:
                continue
            alphas, score, dist = sweep
            axes[row, 0].plot(alphas, score, ls=ls, marker="o", color=color, label=label)
            axes[row, 1].plot(alphas, dist, ls=ls, marker="o", color=color, label=label)
        axes[row, 0].set_ylabel(f"{shift}\nscore (−NMSE)", fontsize=9)
        axes[row, 1].set_ylabel("D", fontsize=9)
        axes[row, 0].legend(fontsize=6)
    axes[0, 0].set_title("OOD score vs α (higher is better)")
    axes[0, 1].set_title("distortion D vs α")
    for ax in axes[-1]:
        ax.set_xlabel("residual scale α (1 = full, 0 = removed)")
    return fig


def binned_reliability(pred: np.ndarray, target: np.ndarray, n_bins: int = N_RELIABILITY_BINS):
    """(mean target, mean prediction) in ``n_bins`` quantile bins of the target."""
    edges = np.unique(np.quantile(target, np.linspace(0, 1, n_bins + 1)))
    if edges.size < 2:
        return np.array([target.mean()]), np.array([pred.mean()])
    idx = np.clip(np.searchsorted(edges, target, side="right") - 1, 0, edges.size - 2)
    used = [b for b in range(edges.size - 1) if np.any(idx == b)]
    return (np.array([target[idx == b].mean() for b in used]), np.array([pred[idx == b].mean() for b in used]))


def plot_reliability(results: dict, ev: Evaluation | None) -> Figure | None:
    """Binned mean prediction vs binned target per distribution (full model, seeds pooled), with y = x."""
    if ev is None:
        return None
    dists = [d for d in results["full"] if d in ev.predictions] or ev.distributions
    if not dists:
        return None
    ncols = min(4, len(dists))
    nrows = math.ceil(len(dists) / ncols)
    fig = _figure(3.0 * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
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
        ax.set_title(dist, fontsize=9)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes[len(dists):]:
        ax.set_visible(False)
    fig.supxlabel("binned true y (15 quantile bins)", fontsize=9)
    fig.supylabel("mean prediction ŷ", fontsize=9)
    return fig


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


# ----------------------------------------------------------------------------------------------------------
# sections: each returns a list of blocks
# ----------------------------------------------------------------------------------------------------------


def _config_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_config_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_config_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def section_header(results: dict, config: Any, environment: Any, timings: Any) -> list[Block]:
    """Title, configuration summary, environment and timings."""
    blocks: list[Block] = [("h", 1, "tapioca study report"),
                           ("p", f"{len(_shifts(results))} shifts, {results.get('n_blocks', '?')} blocks per model, "
                                 f"selection metric `{results.get('selection_metric', '?')}`. "
                                 "Everything below is read from the run directory; no model is re-run.")]
    blocks.append(("h", 2, "Configuration"))
    if isinstance(config, dict):
        rows = []
        for section, values in config.items():
            if not isinstance(values, dict):
                rows.append([section, _config_value(values)])
                continue
            shown = {k: v for k, v in values.items() if not (section == "run" and k == "out")}
            for key, value in shown.items():
                rows.append([f"{section}.{key}", _config_value(value)])
        blocks.append(("table", ["setting", "value"], rows))
    else:
        blocks.append(("p", "config.yaml is missing or unreadable."))
    blocks.append(("h", 2, "Environment"))
    if isinstance(environment, dict):
        blocks.append(("table", ["item", "value"], [[k, _config_value(v)] for k, v in environment.items()]))
    else:
        blocks.append(("p", "environment.json is missing or unreadable."))
    timings = results.get("timings_seconds") or timings
    blocks.append(("h", 2, "Timings"))
    if isinstance(timings, dict) and timings:
        rows = [[k, f"{float(v):.1f}"] for k, v in timings.items()]
        rows.append(["**total**", f"{sum(float(v) for v in timings.values()):.1f}"])
        blocks.append(("table", ["step", "wall seconds"], rows))
    else:
        blocks.append(("p", "No timings recorded."))
    return blocks


def section_quality(results: dict) -> list[Block]:
    """The model's ID query NMSE beside the reference predictors."""
    q = results["quality"]
    model = q.get("model_id_nmse", {})
    per_seed = ", ".join(f"s{s}: {_num(v)}" for s, v in (model.get("per_seed") or {}).items())
    rows = [["transformer (full)", _ci(model), per_seed or "—"]]
    rows += [[name.replace("_", " "), _num(v), "—"] for name, v in (q.get("references_id_nmse") or {}).items()]
    return [("h", 2, "Model quality"),
            ("p", "Held-out ID query NMSE (lower is better) with a seed-stratified bootstrap 95% CI, "
                  "beside reference predictors on the same prompts."),
            ("table", ["predictor", "ID NMSE [95% CI]", "per seed"], rows)]


def _claim_numbers(numbers: Any, limit: int = 8) -> str:
    if not isinstance(numbers, dict):
        return "—"
    items = [(k, v) for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k} = {_num(v)}" for k, v in items[:limit]) or "—"


def section_claims(results: dict) -> list[Block]:
    """Verdict table for C1–C9, and any 'what would settle it' case printed plainly."""
    claims = results.get("claims")
    blocks: list[Block] = [("h", 2, "Claims C1–C9")]
    headers = ["claim", "statement", "verdict", "evidence", "key numbers"]
    if not isinstance(claims, dict):
        blocks.append(("p", "results.json has no `claims` block: the claims were not assessed for this run."))
        rows = [[cid, text, "not assessed", "—", "—"] for cid, text in CLAIMS.items()]
        return blocks + [("table", headers, rows)]
    ids = list(CLAIMS) + [c for c in claims if c not in CLAIMS]
    rows, settle = [], []
    for cid in ids:
        c = claims.get(cid)
        if not isinstance(c, dict):
            rows.append([cid, CLAIMS.get(cid, ""), "not assessed", "—", "—"])
            continue
        rows.append([cid, CLAIMS.get(cid, ""), f"**{c.get('verdict', '?')}**", str(c.get("evidence") or "—"),
                     _claim_numbers(c.get("numbers"))])
        if c.get("settle_case"):
            settle.append(("p", f"**What would settle it ({cid}):** {c['settle_case']}"))
    return blocks + [("table", headers, rows)] + settle


def section_protocols(results: dict) -> list[Block]:
    """Per protocol and metric: full, pruned, Δ [CI], p, Holm p, outcome and blocks removed per seed."""
    blocks: list[Block] = [("h", 2, "Pruning protocols (held-out)")]
    removed = results.get("removed") or {}
    for protocol, data in results["protocols"].items():
        delta = data.get("delta") or {}
        for metric in _metrics(results):
            better = "lower" if _lower_is_better(metric) else "higher"
            blocks.append(("h", 3, f"Protocol `{protocol}` — {METRIC_LABELS.get(metric, metric)}"))
            blocks.append(("p", f"Δ = pruned − full ({better} is better); paired seed-stratified bootstrap "
                                "95% CI; Holm correction across distributions. "
                                + ("Blocks selected on each distribution's own selection split."
                                   if protocol == "target" else "Blocks selected on ID only.")))
            rows = []
            for dist, row in delta.items():
                d = row.get(metric) or {}
                by_seed = _dig(removed, protocol, dist) if protocol == "target" else removed.get(protocol)
                rows.append([dist, _num(d.get("full")), _num(d.get("pruned")), _ci(d, signed=True),
                             _p(d.get("p_value")), _p(d.get("p_holm")), _outcome(d), _removed_text(by_seed)])
            blocks.append(("table", ["distribution", "full", "pruned", "Δ [95% CI]", "p", "Holm p", "outcome",
                                     "blocks removed"], rows))
    return blocks


def section_geometry(results: dict) -> list[Block]:
    """Distortion D per shift for the full and pruned models, beside the ID-vs-ID noise floor."""
    mean = _dig(results, "geometry", "D_mean")
    if not isinstance(mean, dict):
        return [("h", 2, "Geometry"), ("p", "results.json has no geometry block.")]
    floor = _dig(mean, "noise_floor", "full")
    rows = [["ID vs ID (noise floor)", _num(floor), "1", "—", "—", "—", "—"]]
    for shift, row in mean.items():
        if shift == "noise_floor" or not isinstance(row, dict):
            continue
        full, pruned = row.get("full"), row.get("target_pruned")
        ratio = full / floor if full is not None and floor else None
        change = pruned - full if full is not None and pruned is not None else None
        rows.append([shift, _num(full), _num(ratio), _num(pruned), _num(change, signed=True),
                     _num(row.get("target_pruned_vs_full_id")), _num(row.get("from_id_pruned"))])
    pairs = distortion_drop(results)
    rho = _spearman(pairs) if len(pairs) >= 3 else None
    text = ("D = sqrt(Σ_l δ_N(l)² + δ_P(l)²) between OOD and ID profiles at the query position, mean over seeds. "
            "'target pruned' compares both profiles under the blocks TALE removed for that shift; "
            "'vs full ID' compares the pruned OOD profile with the full model's ID profile.")
    if rho is not None:
        text += f" Spearman ρ between D (full) and the full model's OOD drop over {len(pairs)} shifts: {rho:.2f}."
    return [("h", 2, "Geometry"), ("p", text),
            ("table", ["shift", "D full", "D / floor", "D target pruned", "Δ D (pruned − full)",
                       "D target pruned vs full ID", "D from-id pruned"], rows)]


def section_comparisons(results: dict) -> list[Block]:
    """Full, pruned and Δ [CI] per shift and pruning method (only when ``comparisons`` is present)."""
    comparisons = results.get("comparisons")
    if not isinstance(comparisons, dict) or not comparisons:
        return []
    metric = _main_metric(results)
    rows = []
    for shift, by_method in comparisons.items():
        if not isinstance(by_method, dict):
            continue
        methods = [m for m in METHOD_ORDER if m in by_method] + [m for m in by_method if m not in METHOD_ORDER]
        for method in methods:
            d = _dig(by_method, method, metric) or {}
            rows.append([shift, method, _num(d.get("full")), _num(d.get("pruned")), _ci(d, signed=True),
                         _p(d.get("p_holm")), _outcome(d)])
    return [("h", 2, "Pruning methods compared"),
            ("p", f"Held-out {METRIC_LABELS.get(metric, metric)} per shift and method; Δ = pruned − full with "
                  "95% CI and Holm-corrected p."),
            ("table", ["shift", "method", "full", "pruned", "Δ [95% CI]", "Holm p", "outcome"], rows)]


def section_interventions(results: dict) -> list[Block]:
    """Norm-matching summary (seed means) when ``interventions`` is present."""
    interventions = results.get("interventions")
    if not isinstance(interventions, dict) or not interventions:
        return []
    keys = ("ood_full", "ood_matched", "ood_pruned", "id_full", "id_pushed")
    rows = []
    for shift, data in interventions.items():
        by_seed = _dig(data, "norm_matching")
        if not isinstance(by_seed, dict) or not by_seed:
            continue
        vals = [[v.get(k) for v in by_seed.values() if isinstance(v, dict) and v.get(k) is not None] for k in keys]
        rows.append([shift, *[_num(float(np.mean(v))) if v else "—" for v in vals]])
    blocks: list[Block] = [("h", 2, "Interventions")]
    blocks.append(("p", "Residual scaling of the removed blocks (α from 1 to 0) against control blocks is "
                        "plotted below. Norm matching without pruning (scores are mean −NMSE, higher is "
                        "better; mean over seeds): OOD states rescaled to ID norms, and the control that pushes "
                        "ID states to OOD norms."))
    if rows:
        blocks.append(("table", ["shift", "OOD full", "OOD norm-matched", "OOD pruned", "ID full", "ID pushed"], rows))
    return blocks


# ----------------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------------


PLOT_TEXT = {  # file -> (section title, caption)
    "scores_nmse.png": ("Held-out NMSE", "Held-out NMSE per distribution (log scale, 95% CI), full vs pruned, and Δ "
                        "as % of the full model's NMSE, one column per protocol."),
    "scores_tol_acc.png": ("Held-out tolerance accuracy", "Held-out tolerance accuracy per distribution (95% CI), "
                           "full vs pruned, and Δ in percentage points, one column per protocol."),
    "methods.png": ("Pruning methods", "Δ held-out score by pruning method and shift (95% CI)."),
    "profiles.png": ("Layer-wise profiles", "Norm and pairwise-distance profiles at the query position (mean over "
                     "seeds): ID full, OOD full, OOD after target-protocol pruning."),
    "distortion_vs_drop.png": ("Distortion vs OOD drop", "Distortion D of each shift (full model) against the full "
                               "model's OOD drop; dashed line: ID-vs-ID noise floor."),
    "interventions.png": ("Residual-scaling sweep", "OOD score and D vs α for the TALE-removed blocks and control "
                          "blocks (mean over seeds)."),
    "reliability.png": ("Reliability / shrinkage", "Binned mean prediction vs binned target, 15 quantile bins (full "
                        "model, seeds pooled), with y = x and the shrinkage slope."),
    "attribution.png": ("Distortion attribution", "Per-block distortion attribution a_l (shifts × blocks, full "
                        "model, mean over seeds)."),
}


def make_plots(results: dict, profiles: dict[int, dict], ev: Evaluation | None) -> dict[str, Figure]:
    """Every plot the run has data for, by file name (in report order)."""
    makers: dict[str, Callable[[], Figure | None]] = {
        **{f"scores_{m}.png": (lambda m=m: plot_scores(results, m)) for m in _metrics(results)},
        "methods.png": lambda: plot_methods(results),
        "profiles.png": lambda: plot_profiles(results, profiles),
        "distortion_vs_drop.png": lambda: plot_distortion_vs_drop(results),
        "interventions.png": lambda: plot_interventions(results),
        "reliability.png": lambda: plot_reliability(results, ev),
        "attribution.png": lambda: plot_attribution(results),
    }
    figures = {}
    for name, make in makers.items():
        fig = make()
        if fig is not None:
            figures[name] = fig
    return figures


def section_plots(names: Iterable[str]) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Plots")]
    for name in names:
        title, caption = PLOT_TEXT.get(name, (name, name))
        blocks += [("h", 3, title), ("img", name, caption)]
    return blocks


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    """Blocks as GitHub-flavoured markdown (images linked by relative file name)."""
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |",
                     "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{block[2]}]({block[1]})")
    return "\n\n".join(out) + "\n"


def _inline_html(text: Any) -> str:
    """Escape text, then render **bold** and `code`."""
    s = html.escape(str(text))
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.88em; color: #555; }
"""


def render_html(blocks: list[Block], images: dict[str, bytes]) -> str:
    """Blocks as one self-contained HTML page (PNGs embedded as base64 data URIs)."""
    body = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{_inline_html(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(images[block[1]]).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline_html(block[2])}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>tapioca study report</title>\n<style>" + CSS + "</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# ----------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------


def build_report(run_dir: str | Path) -> tuple[list[Block], dict[str, bytes]]:
    """The report's blocks and PNG bytes by file name, from the run directory alone."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    figures = make_plots(results, load_profiles(run_dir), load_full_evaluation(run_dir))
    images = {name: _png(fig) for name, fig in figures.items()}
    blocks = (section_header(results, _optional_yaml(run_dir / "config.yaml"),
                             _optional_json(run_dir / "environment.json"), _optional_json(run_dir / "timings.json"))
              + section_quality(results) + section_claims(results) + section_protocols(results)
              + section_comparisons(results) + section_geometry(results) + section_interventions(results)
              + section_plots(images))
    return blocks, images


def write_report(run_dir: str | Path) -> Path:
    """Write PNG plots, ``report.md`` and a self-contained ``report.html`` into ``run_dir/report/``.

    Returns the report folder. Raises CheckpointError when ``results.json`` is missing or corrupt.
    """
    run_dir = Path(run_dir)
    blocks, images = build_report(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOT_TEXT:
        if name not in images:
            (out / name).unlink(missing_ok=True)  # a plot from an earlier report whose data is gone
    for name, data in images.items():
        atomic_write_bytes(out / name, data)
    atomic_write_bytes(out / "report.md", render_markdown(blocks).encode("utf-8"))
    atomic_write_bytes(out / "report.html", render_html(blocks, images).encode("utf-8"))
    return out
