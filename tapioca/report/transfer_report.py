"""The report of ``tapioca transfer``: ``report/report.md``, a self-contained ``report/report.html`` and the heat
map ``report/transfer.png``, from ``transfer.json`` alone (never loads a model). It leads with the answer (does
pruning for one task help or harm another task's OOD?) and the heat map, then the cross-task verdicts, the own
task under both protocols (held-out and in-sample), the blocks removed, the full model and the settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from tapioca.errors import CheckpointError
from tapioca.io import atomic_write_bytes, read_result
from tapioca.report.claims import gain_interval
from tapioca.report.plots import _figure, _png
from tapioca.report.render import Block, render_html, render_markdown

HEATMAP = "transfer.png"
CLIP = 5.0  # heat-map colour: sign(gain) * log2(1 + |gain| / δ), saturating at ±5 (a gain of 31 δ)
TICKS = (1, 3, 15)  # colour-bar ticks at ±1, ±3 and ±15 δ


def load_transfer(folder: str | Path) -> dict[str, Any]:
    """``folder/transfer.json``; CheckpointError naming the file when it is missing or corrupt."""
    path = Path(folder) / "transfer.json"
    data = read_result(path, "transfer", f"run tapioca transfer --out {Path(folder)} first")
    if "cells" not in data:
        raise CheckpointError(f"{path}: not a tapioca transfer result")
    return data


def _g(x: float) -> str:
    return f"{x:+.3g}" if x == x else "n/a"


def _ci(cell: dict[str, Any]) -> str:
    """A Δ row: mean [low, high] (pruned − full)."""
    return f"{_g(cell['mean'])} [{_g(cell['low'])}, {_g(cell['high'])}]"


def _columns(data: dict[str, Any]) -> list[str]:
    return [f"{u}/{d}" for u, d in data["columns"]]


# ---------------------------------------------------------------- the heat map


def heat_values(data: dict[str, Any]) -> np.ndarray:
    """(rows, columns) colours of the heat map: the gain (positive = better) in units of each cell's smallest
    effect of interest δ on a signed log scale, sign(g) · log2(1 + |g| / δ), clipped to ±CLIP (1 = one δ); a
    cell whose search removed nothing is NaN (drawn grey)."""
    metric = data["primary_metric"]
    out = np.full((len(data["rows"]), len(data["columns"])), np.nan)
    for i, t in enumerate(data["rows"]):
        for j, key in enumerate(_columns(data)):
            cell = data["cells"][t][key]
            if cell["verdict"] != "nothing removed":
                units = gain_interval(cell, metric)["mean"] / max(cell["sesoi"], 1e-12)
                out[i, j] = np.clip(np.sign(units) * np.log2(1 + abs(units)), -CLIP, CLIP)
    return out


def plot_heatmap(data: dict[str, Any]) -> Figure:
    """Rows: the task each model was pruned for; columns: (evaluated task, distribution). Colour: the gain in
    units of δ (blue better, red worse); text: Δ = pruned − full in the primary metric, with * when the 95 % CI
    excludes 0 (a black frame when it does after Holm) and the in-sample Δ under it in the own target cell."""
    rows, cols = data["rows"], _columns(data)
    values = heat_values(data)
    fig = _figure(max(6.0, 1.5 * len(cols) + 2.5), 1.0 * len(rows) + 2.2)
    ax = fig.subplots()
    cmap = _cmap()
    image = ax.imshow(values, cmap=cmap, vmin=-CLIP, vmax=CLIP, aspect="auto")
    for i, t in enumerate(rows):
        for j, key in enumerate(cols):
            cell = data["cells"][t][key]
            star = "*" if cell["low"] > 0 or cell["high"] < 0 else ""
            text = f"{_g(cell['mean'])}{star}" if cell["verdict"] != "nothing removed" else "nothing\nremoved"
            if cell["verdict"] == "floor or ceiling":
                text += "\n(full model at chance)" if cell["evidence"].startswith("floor") else "\n(full model near 1)"
            if data["in_sample"][t]["column"] == key:
                text += f"\nin-sample {_g(data['in_sample'][t]['delta']['mean'])}"
            dark = values[i, j] == values[i, j] and abs(values[i, j]) > 0.6 * CLIP
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black",
                    fontweight="bold" if cell["improved"] or cell["worse"] else "normal")
            if cell["improved"] or cell["worse"]:
                ax.add_patch(Rectangle((j - 0.42, i - 0.4), 0.84, 0.8, fill=False, linewidth=1.2,
                                       edgecolor="white" if dark else "black"))
        own = [j for j, (u, _) in enumerate(data["columns"]) if u == t]
        if own:  # the row's own task
            ax.add_patch(Rectangle((own[0] - 0.48, i - 0.47), len(own) - 0.04, 0.94, fill=False,
                                   edgecolor="#f2b701", linewidth=2.5, linestyle="--"))
    starts = [j for j in range(1, len(cols)) if data["columns"][j][0] != data["columns"][j - 1][0]]
    for j in starts:
        ax.axvline(j - 0.5, color="white", linewidth=4)
    for i in range(1, len(rows)):
        ax.axhline(i - 0.5, color="white", linewidth=2)
    ax.set_xticks(range(len(cols)), [f"{u}\n{d}" for u, d in data["columns"]], fontsize=8)
    ax.set_yticks(range(len(rows)), [f"pruned for\n{t}" for t in rows], fontsize=8)
    ax.set_xlabel("evaluated on (task / distribution, held out); dashed yellow: the row's own task")
    bar = fig.colorbar(image, ax=ax, shrink=0.9, label="gain (+ = better), in δ (log scale)")
    ticks = [-np.log2(1 + k) for k in reversed(TICKS)] + [0.0] + [np.log2(1 + k) for k in TICKS]
    bar.set_ticks(ticks, labels=[f"−{k}δ" for k in reversed(TICKS)] + ["0"] + [f"+{k}δ" for k in TICKS])
    ax.set_title(f"Δ {data['primary_metric']} (pruned − full): * the 95 % CI excludes 0; bold and framed: also "
                 "after Holm", fontsize=9)
    return fig


def _cmap() -> Any:
    import matplotlib

    return matplotlib.colormaps["RdBu"].with_extremes(bad="#dddddd")


# ---------------------------------------------------------------- sections


def _lead(data: dict[str, Any]) -> list[Block]:
    s = data["summary"]
    return [("h", 1, "tapioca transfer"), ("p", f"**{s['answer']}**", "lead"), ("p", s["paragraph"]),
            ("img", HEATMAP, "Δ of every pruned model (rows: the task it was pruned for) on every task's ID and "
                             "shifts (columns), held out; the own target cell also shows the in-sample Δ")]


def _cross(data: dict[str, Any]) -> list[Block]:
    rows = []
    for t in data["rows"]:
        for key, cell in data["cells"][t].items():
            if not cell["own"]:
                v = cell.get("vs_own")
                own = f"{_ci(v)}, Holm p {v['p_holm']:.3g}" if v else "—"
                rows.append([t, key, _ci(cell), f"{cell['p_holm']:.3g}", f"{cell['sesoi']:.3g}",
                             f"{cell['mde']:.3g} (n={cell['n']})", f"**{cell['verdict']}**: {cell['evidence']}", own])
    return [("h", 2, "Cross-task cells: pruned for one task, scored on another"),
            ("p", "Δ = pruned − full in the primary metric on the other task's held-out examples, pooled over seeds "
                  "(Student-t CI over replicates). helps / harms: the CI excludes 0 after Holm; no effect: the "
                  "equivalence test for ±δ is significant after Holm; not enough data: neither. Last column: this model minus the model "
                  "pruned for the evaluated task itself, on the same examples (is pruning for another task worse for "
                  "it than pruning for it?)."),
            ("table", ["pruned for", "evaluated on", "Δ [95 % CI]", "Holm p", "δ", "MDE", "verdict",
                       "vs pruned for it [95 % CI]"], rows)]


def _own(data: dict[str, Any]) -> list[Block]:
    metric, rows = data["primary_metric"], []
    for t in data["rows"]:
        s = data["in_sample"][t]
        o = s["optimism"]
        for key, cell in data["cells"][t].items():
            if cell["own"]:
                in_sample = _ci(s["delta"]) if key == s["column"] else "—"
                opt = f"{_g(o['mean'])} [{_g(o['low'])}, {_g(o['high'])}]" if key == s["column"] else "—"
                rows.append([t, key, _ci(cell), in_sample, opt, f"**{cell['verdict']}**"])
    return [("h", 2, "Own task, under both protocols"),
            ("p", f"Held-out Δ on each of the task's own distributions; on the target ({data['target']}) also the "
                  f"in-sample Δ (the very examples TALE selected on: the paper's protocol) and the optimism "
                  f"(in-sample − held-out gain in {metric}, positive = the selection split flatters the pruned model)."),
            ("table", ["pruned for", "evaluated on", "held-out Δ", "in-sample Δ", "optimism (gain)", "verdict"], rows)]


def _removed(data: dict[str, Any]) -> list[Block]:
    rows = [[t, *(str(data["removed"][t][str(s)]) for s in data["seeds"])] for t in data["rows"]]
    return [("h", 2, "Blocks removed"), ("p", "Original block indices, in order of removal, per seed."),
            ("table", ["pruned for", *(f"seed {s}" for s in data["seeds"])], rows)]


def _full(data: dict[str, Any]) -> list[Block]:
    rows = [[u, d, f"{v['mean']:.4g} [{v['low']:.4g}, {v['high']:.4g}]"]
            for u, by_d in data["full"].items() for d, v in by_d.items()]
    return [("h", 2, "The full model"), ("table", ["task", "distribution", f"{data['primary_metric']} (95 % CI)"], rows)]


def _settings(data: dict[str, Any]) -> list[Block]:
    m = data["model"]
    rows = [["kind", data["kind"]], ["model", ", ".join(f"{k} {v}" for k, v in m.items() if v is not None)],
            ["seeds", str(data["seeds"]) + (" (one model per seed)" if data["kind"] == "testbed" else
                                            " (sampling seeds; one model)")],
            ["target", data["target"]],
            ["smallest effect of interest δ", f"{data['smallest_effect']['relative']:g} × the full model's mean "
                                              f"(error metrics) or {data['smallest_effect']['points']:g} (accuracy)"],
            ["bootstrap", f"{data['n_bootstrap']} resamples, {100 * data['confidence']:g} % intervals; Holm "
                          f"{data['holm']}"]]
    for t, d in data["tasks"].items():
        rows.append([f"task {t}", "; ".join(f"{k} {v}" for k, v in d.items())])
    timings = data.get("timings_seconds") or {}
    if timings:
        rows.append(["wall time (s, summed over seeds)", ", ".join(f"{k} {v:.0f}" for k, v in timings.items())])
    return [("h", 2, "Settings"), ("table", ["", ""], rows)]


def build_transfer_report(data: dict[str, Any]) -> tuple[list[Block], dict[str, bytes]]:
    """The report's blocks and its PNGs (by file name) from ``transfer.json`` data."""
    images = {HEATMAP: _png(plot_heatmap(data))}
    blocks = [*_lead(data), *_cross(data), *_own(data), *_removed(data), *_full(data), *_settings(data)]
    return blocks, images


def write_transfer_report(folder: str | Path) -> Path:
    """Write ``report/report.md``, ``report/report.html`` and ``report/transfer.png`` under ``folder`` (the run
    directory holding ``transfer.json``); returns the report folder."""
    data = load_transfer(folder)
    report = Path(folder) / "report"
    report.mkdir(parents=True, exist_ok=True)
    blocks, images = build_transfer_report(data)
    for name, png in images.items():
        atomic_write_bytes(report / name, png)
    atomic_write_bytes(report / "report.md", render_markdown(blocks).encode("utf-8"))
    page = render_html(blocks, images).replace("<title>tapioca study report</title>", "<title>tapioca transfer</title>")
    atomic_write_bytes(report / "report.html", page.encode("utf-8"))
    return report


def matrix_lines(data: dict[str, Any]) -> list[str]:
    """The matrix as text lines for the terminal: one line per (row, column) with Δ, CI and the verdict."""
    lines = [f"Δ {data['primary_metric']} (pruned − full), held out:"]
    for t in data["rows"]:
        for key, cell in data["cells"][t].items():
            lines.append(f"  pruned for {t:<12} on {key:<24} {_ci(cell):<34} {cell['verdict']}")
    return lines
