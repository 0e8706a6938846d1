"""The report of ``tapioca check``: ``report.md``, a self-contained ``report.html`` and PNG plots, from
``check.json`` alone (never loads a model). It leads with the verdicts, then says which original blocks the
pruned model kept, then gives accuracy, calibration and geometry with their tables and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tapioca.errors import CheckpointError
from tapioca.io import atomic_write_bytes, read_result
from tapioca.report.plots import _ci, _figure, _finish_grid, _num, _panel_grid, _panel_style, _png
from tapioca.report.render import Block, render_html, render_markdown

MODELS = ("base", "pruned")
COLORS = {"base": "#4c72b0", "pruned": "#dd8452"}
PLOTS = ("accuracy.png", "reliability.png", "profiles.png")


def load_check(folder: str | Path) -> dict[str, Any]:
    """``folder/check.json``; CheckpointError naming the file when it is missing or corrupt."""
    path = Path(folder) / "check.json"
    data = read_result(path, "check", f"run tapioca check --out {Path(folder)} first")
    if data.get("kind") != "check":
        raise CheckpointError(f"{path}: not a tapioca check result")
    return data


def _pts(row: dict[str, Any]) -> str:
    """A Δ row in percentage points: mean [low, high]."""
    return f"{100 * row['mean']:+.2f} [{100 * row['low']:+.2f}, {100 * row['high']:+.2f}]"


def _delta(row: dict[str, Any]) -> str:
    return _ci(row, signed=True)


# ---------------------------------------------------------------- plots


def plot_accuracy(data: dict[str, Any]) -> Figure:
    """Left: held-out accuracy per distribution for both models (95 % CI). Right: Δ = pruned − base in points
    with its paired-bootstrap CI, and the ±δ band of the smallest effect of interest."""
    dists = data["distributions"]
    fig = _figure(max(7.0, 1.6 * len(dists) + 4), 3.2)
    left, right = fig.subplots(1, 2)
    x = np.arange(len(dists))
    for k, name in enumerate(MODELS):
        rows = [data["accuracy"][name][d]["acc"] for d in dists]
        mean = np.array([r["mean"] for r in rows])
        err = np.array([[r["mean"] - r["low"] for r in rows], [r["high"] - r["mean"] for r in rows]])
        left.errorbar(x + (k - 0.5) * 0.2, mean, yerr=np.clip(err, 0, None), fmt="o", capsize=3, label=name,
                      color=COLORS[name])
    left.set_xticks(x, dists, fontsize=8)
    left.set_ylabel("held-out accuracy")
    left.set_ylim(-0.02, 1.02)
    left.legend(fontsize=8)
    rows = [data["delta"][d]["acc"] for d in dists]
    mean = np.array([100 * r["mean"] for r in rows])
    err = np.array([[100 * (r["mean"] - r["low"]) for r in rows], [100 * (r["high"] - r["mean"]) for r in rows]])
    delta = 100 * data["settings"]["smallest_effect_points"]
    right.axhspan(-delta, delta, color="grey", alpha=0.15, label=f"±δ ({delta:g} pts)")
    right.axhline(0, color="grey", lw=0.8)
    right.errorbar(x, mean, yerr=np.clip(err, 0, None), fmt="o", capsize=3, color="black")
    right.set_xticks(x, dists, fontsize=8)
    right.set_ylabel("Δ accuracy, pruned − base (points)")
    right.legend(fontsize=8)
    fig.suptitle("accuracy per distribution (95 % CIs)", fontsize=10)
    return fig


def plot_reliability(data: dict[str, Any]) -> Figure:
    """Reliability diagrams (accuracy vs confidence in equal-width bins) per distribution, both models."""
    dists = data["distributions"]
    fig, axes = _panel_grid(len(dists), 2.9)
    for ax, dist in zip(axes, dists):
        ax.plot([0, 1], [0, 1], color="grey", ls=":", label="y = x")
        for name in MODELS:
            cal = data["calibration"][dist][name]
            conf = np.asarray(cal["reliability"]["confidence"], float)
            acc = np.asarray(cal["reliability"]["accuracy"], float)
            ok = np.isfinite(conf) & np.isfinite(acc)
            ax.plot(conf[ok], acc[ok], marker="o", ms=3, color=COLORS[name], label=f"{name} (ECE {cal['ece']:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        _panel_style(ax, dist)
    return _finish_grid(fig, axes, len(dists), "mean confidence (bin)", "accuracy (bin)")


def plot_profiles(data: dict[str, Any]) -> Figure | None:
    """Norm (top) and mean pairwise distance (bottom) at the last prompt token per original block, both
    models, one column per distribution; removed blocks shaded."""
    geometry = data.get("geometry") or {}
    if "profiles" not in geometry:
        return None
    dists = data["distributions"]
    fig = _figure(3.0 * len(dists), 5.0)
    axes = fig.subplots(2, len(dists), squeeze=False)
    removed = data["blocks"].get("removed") or []
    for col, dist in enumerate(dists):
        for row, key in enumerate(("norm", "pairwise")):
            ax = axes[row, col]
            for block in removed:  # h_{b+1} is the output of original block b
                ax.axvspan(block + 0.5, block + 1.5, color="grey", alpha=0.15)
            for name in MODELS:
                values = geometry["profiles"][name][dist][key]
                ax.plot(range(len(values)), values, marker="o", ms=3, color=COLORS[name], label=name,
                        ls="-" if name == "base" else "--")
            ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(dist, fontsize=9)
                ax.legend(fontsize=7)
            ax.set_ylabel("mean ‖h‖" if key == "norm" else "mean pairwise distance", fontsize=8)
    fig.supxlabel("layer (h_0 = input of block 0, h_l = output of original block l − 1; shaded: removed)", fontsize=8)
    return fig


# ---------------------------------------------------------------- sections


def _verdicts(data: dict[str, Any]) -> list[Block]:
    rows = [[v["test"], v["scope"], f"**{v['verdict']}**", v["evidence"]] for v in data["verdicts"]]
    return [("h", 2, "Verdicts", "verdicts"), ("table", ["test", "scope", "verdict", "evidence"], rows)]


def _blocks(data: dict[str, Any]) -> list[Block]:
    b = data["blocks"]
    out: list[Block] = [("h", 2, "Which blocks the pruned model kept"), ("p", b["message"])]
    provenance = b.get("provenance")
    if provenance:
        agrees = {True: "the weights agree", False: "**the weights disagree**", None: "not cross-checked"}
        out.append(("p", f"The folder's `tapioca_pruning.json` says it removed {provenance.get('removed')} "
                         f"(search {provenance.get('search', 'not recorded')}); {agrees[b.get('provenance_agrees')]}."))
    return out


def _accuracy(data: dict[str, Any]) -> list[Block]:
    rows = []
    for d in data["distributions"]:
        base, pruned, row = data["accuracy"]["base"][d]["acc"], data["accuracy"]["pruned"][d]["acc"], data["delta"][d]["acc"]
        rows.append([d, _ci(base), _ci(pruned), _pts(row), _num(row["p_value"]),
                     _num(row["p_holm"]) if d != "id" else "—", f"{100 * row['mde']:.2f}", row["n"]])
    metrics = [m for m in next(iter(data["delta"].values())) if m != "acc"]
    other = [[d, m, _num(data["delta"][d][m]["base"]), _num(data["delta"][d][m]["pruned"]), _delta(data["delta"][d][m]),
              _num(data["delta"][d][m]["p_holm"])] for d in data["distributions"] for m in metrics]
    return [("h", 2, "Accuracy: in-distribution and on each shift"),
            ("p", "Held-out accuracy [95 % CI] of both models on the same examples; Δ = pruned − base in points with "
                  "a paired-bootstrap CI (stratified by sampling seed); Holm across shifts; MDE = minimal detectable "
                  "effect at 80 % power."),
            ("table", ["distribution", "base", "pruned", "Δ (pts)", "p", "p (Holm)", "MDE (pts)", "n"], rows),
            ("img", "accuracy.png", "accuracy per distribution (left) and Δ with the ±δ band (right)"),
            ("table", ["distribution", "metric", "base", "pruned", "Δ [CI]", "p (Holm)"], other)]


def _calibration(data: dict[str, Any]) -> list[Block]:
    rows = []
    for d in data["distributions"]:
        c = data["calibration"][d]
        rows.append([d, f"{c['base']['ece']:.3f} → {c['pruned']['ece']:.3f}", _delta(c["delta_ece"]),
                     f"{c['base']['brier']:.3f} → {c['pruned']['brier']:.3f}", _delta(c["delta_brier"]),
                     f"{c['base']['confidence']:.3f} → {c['pruned']['confidence']:.3f}", _delta(c["delta_confidence"])])
    s = data["settings"]
    return [("h", 2, "Calibration"),
            ("p", f"ECE ({s['n_bins']} equal-width bins on the confidence), Brier score and mean confidence, base → "
                  "pruned, each Δ with a paired-bootstrap 95 % CI. Confidence: the top choice's probability "
                  "(multiple choice) or the probability of the model's own greedy answer (short answer)."),
            ("table", ["distribution", "ECE", "ΔECE [CI]", "Brier", "ΔBrier [CI]", "confidence", "Δconfidence [CI]"],
             rows),
            ("img", "reliability.png", "reliability diagrams: accuracy vs confidence per bin, both models")]


def _geometry(data: dict[str, Any], images: dict[str, bytes]) -> list[Block]:
    g = data.get("geometry") or {}
    out: list[Block] = [("h", 2, "Geometry by original block")]
    if "D" not in g:
        return out + [("p", f"Not computed: {g.get('skipped', 'no profiles')}.")]
    rows = [[d, _num(g["D"]["base"][d]), _num(g["D"]["pruned"][d])] for d in g["D"]["base"]]
    out += [("p", f"Distortion D of each shift's profile against the same model's ID profile ({g['n_prompts']} "
                  f"reference prompts, seed {g['seed']}; the noise floor compares two ID samples). A pruned model "
                  "whose D falls toward the floor realigns OOD inputs with ID ones."),
            ("table", ["", "D base", "D pruned"], rows)]
    if "profiles.png" in images:
        out.append(("img", "profiles.png", "norm and pairwise-distance profiles per original block"))
    return out


def _settings(data: dict[str, Any]) -> list[Block]:
    s, task = data["settings"], data["task"]
    rows = [["base", f"`{data['base']['path']}` ({data['base']['n_blocks']} blocks)"],
            ["pruned", f"`{data['pruned']['path']}` ({data['pruned']['n_blocks']} blocks)"],
            ["task", f"{task['source']} ({task['kind']}, {task['n_shots']}-shot)"],
            ["examples", f"{data['n_heldout']} held-out per distribution and seed; seeds {data['seeds']}"],
            ["smallest effect of interest δ", f"{100 * s['smallest_effect_points']:g} points"],
            ["tolerances", f"ECE +{s['ece_tolerance']}, mean confidence −{s['confidence_tolerance']}"],
            ["bootstrap", f"{s['n_bootstrap']} resamples, {100 * s['confidence']:g} % intervals"]]
    env = data.get("environment") or {}
    rows += [[k, str(v)] for k, v in env.items() if k in ("tapioca", "torch", "transformers", "git_commit")]
    return [("h", 2, "Settings"), ("table", ["", ""], rows)]


def build_check_report(data: dict[str, Any]) -> tuple[list[Block], dict[str, bytes]]:
    """The report's blocks and its PNGs (by file name) from ``check.json`` data."""
    figures = {"accuracy.png": plot_accuracy(data), "reliability.png": plot_reliability(data),
               "profiles.png": plot_profiles(data)}
    images = {name: _png(fig) for name, fig in figures.items() if fig is not None}
    lead = (f"Is `{data['pruned']['path']}` ({data['pruned']['n_blocks']} blocks) not worse than "
            f"`{data['base']['path']}` ({data['base']['n_blocks']} blocks) where it matters? Three tests: ID "
            "accuracy, OOD accuracy on each shift, calibration.")
    blocks: list[Block] = [("h", 1, "tapioca check"), ("p", lead, "lead"), *_verdicts(data), *_blocks(data),
                           *_accuracy(data), *_calibration(data), *_geometry(data, images), *_settings(data)]
    return blocks, images


def write_check_report(folder: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and the PNGs into ``folder`` (which holds ``check.json``)."""
    folder = Path(folder)
    blocks, images = build_check_report(load_check(folder))
    for name in PLOTS:
        if name not in images:
            (folder / name).unlink(missing_ok=True)
    for name, png in images.items():
        atomic_write_bytes(folder / name, png)
    atomic_write_bytes(folder / "report.md", render_markdown(blocks).encode("utf-8"))
    page = render_html(blocks, images).replace("<title>tapioca study report</title>", "<title>tapioca check</title>")
    atomic_write_bytes(folder / "report.html", page.encode("utf-8"))
    return folder
