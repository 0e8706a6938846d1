"""The depth and training-length sections of a multi-scale report: per ladder the measured answer, a table
(ID quality beside least squares, whether training flattened, significant OOD gains/harms under both
protocols, attribution overlap vs chance, where TALE's blocks sit, C1–C4) and one figure; plus the training
curves. Reads the multi-scale ``results.json`` only (see :mod:`tapioca.report.ladders`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tapioca.report.plots import _ci, _figure, _num
from tapioca.report.ladders import AXES, answer, ladder_rows

Block = tuple
TITLES = {"depth": "Depth ladder: does the effect change as models get deeper?",
          "training": "Training-length ladder: does the effect change with longer training?"}
AXIS_LABEL = {"depth": "blocks", "training": "training steps"}


def _counts(c: dict[str, int]) -> str:
    return f"{c['gain']} / {c['harm']} of {c['shifts']}" if c.get("shifts") else "—"


def _overlap(o: dict | None) -> str:
    if not o or not o.get("cases"):
        return "no block removed"
    return f"{o['hits']} vs {o['random_expectation']:.1f} (p {o['p']:.3f})"


def section_ladder(results: dict, ladder: str) -> list[Block]:
    """The ladder's answer, its table and its figure (nothing when the study has no such ladder)."""
    rows = ladder_rows(results, ladder)
    if not rows:
        return []
    table = [[r["name"], f"{r['value']:,}", _ci(r["id_nmse"]), _num(r["least_squares"]), r["training"],
              _counts(r["held_out"]), _counts(r["in_sample"]), _overlap(r["overlap"]),
              _num(r["mean_position"]),
              " ".join(f"{c}:{(v or '—')[:3]}" for c, v in r["claims"].items()),
              " ".join(f"{c}:{(v or '—')[:3]}" for c, v in r["claims_in_sample"].items())] for r in rows]
    return [("h", 2, TITLES[ladder]),
            ("p", f"**Answer (as measured):** {answer(results, ladder)}"),
            ("img", f"{ladder}.png", f"Along the {ladder} ladder: ID quality beside least squares; shifts with a "
             "significant OOD gain or harm under both protocols; attribution overlap against chance; where TALE's "
             "blocks sit in depth."),
            ("table", [ladder if ladder == "depth" else "scale", AXIS_LABEL[ladder], "ID NMSE [95% CI]",
                       "least squares", "ID error at the end of training", "held out: gains / harms",
                       "in-sample: gains / harms", "top-attribution hits vs chance", "mean position of TALE's blocks",
                       "C1–C4 held out", "C1–C2 in-sample"], table),
            ("p", "Gains / harms count the shifts whose Δ NMSE (pruned − full) has a 95% CI entirely below / above 0 "
                  "and a Holm-corrected p < 0.05 over the shifts (the per-scale table below gives both). Positions are "
                  "(block + 0.5) / L over seeds and shifts: 0 is the input end, 1 the output end. The "
                  "hits test counts how often TALE's k removed blocks are the k blocks of largest distortion "
                  "attribution, against the hypergeometric chance k²/L (p: at least that many by chance). A model "
                  "whose ID error still fell by ≥ 5 % in its last quarter of training is marked improving: its "
                  "verdicts describe a model short of convergence. A rung trained with train.stop_when_flat says "
                  "where the stop rule (no new best for train.flat_patience steps) ended each seed, beside its "
                  "last-quarter gain and how far its last checkpoint (the model kept) sits above the curve's best.")]


def section_training_curves(results: dict) -> list[Block]:
    """The ID validation curves of every scale and seed that recorded one."""
    if not any(_curves(s) for s in results["scales"].values()):
        return [("h", 2, "Training curves"),
                ("p", "No scale recorded an ID validation curve (checkpoints trained before tapioca recorded curves "
                      "carry none).")]
    missing = [n for n, s in results["scales"].items() if s.get("kind", "testbed") == "testbed" and not _curves(s)]
    note = f" Not recorded for: {', '.join(missing)} (their checkpoints predate curve recording)." if missing else ""
    return [("h", 2, "Training curves"),
            ("img", "training_curves.png", "ID query NMSE on 512 fixed held-out prompts at every checkpoint, per "
             "scale and seed; dashed: least squares on the true degree where it is on the scale (on the testbed it "
             "is exact up to rounding, ~1e-15); ×: where train.stop_when_flat ended a training (its last checkpoint is "
             "the model kept, unless ○ marks the checkpoint that train.restore_best kept)." + note)]


def _curves(summary: dict) -> dict[str, list]:
    return {seed: r["id_curve"] for seed, r in (summary.get("training") or {}).items() if r and r.get("id_curve")}


OFF_SCALE = 1e-3  # a reference this far below the lowest model NMSE is written, not drawn (it would flatten the axis)


def on_scale(reference: float | None, lowest: float) -> bool:
    """Whether a least-squares reference NMSE is worth drawing on a log axis whose data bottom out at ``lowest``."""
    return reference is not None and reference > 0 and reference >= OFF_SCALE * lowest


def plot_ladder(results: dict, ladder: str) -> Figure | None:
    """Four panels along one ladder: ID NMSE (and least squares), shifts gained/harmed per protocol,
    attribution hits vs chance, and the relative depth of TALE's removed blocks."""
    rows = ladder_rows(results, ladder)
    if not rows:
        return None
    x = np.array([r["value"] for r in rows], dtype=float)
    fig = _figure(12, 7.5)
    (ax_q, ax_g), (ax_o, ax_p) = fig.subplots(2, 2)
    q = [r["id_nmse"] for r in rows]
    ax_q.errorbar(x, [v["mean"] for v in q], yerr=[[v["mean"] - v["low"] for v in q], [v["high"] - v["mean"] for v in q]],
                  marker="o", capsize=3, label="transformer")
    lowest = min(v["low"] for v in q)
    if all(on_scale(r["least_squares"], lowest) for r in rows):
        ax_q.plot(x, [r["least_squares"] for r in rows], "k--", label="least squares")
    else:  # least squares on the true degree is exact up to rounding: ~1e-15, far below any model
        ax_q.plot([], [], " ", label=f"least squares ≤ {max(r['least_squares'] or 0 for r in rows):.0e} (off scale)")
    ax_q.set(yscale="log", ylabel="ID NMSE (log)", title="model quality")
    for key, style, label in (("held_out", "o-", "held-out gains"), ("in_sample", "s--", "in-sample gains")):
        ax_g.plot(x, [r[key]["gain"] for r in rows], style, label=label)
    ax_g.plot(x, [r["held_out"]["harm"] for r in rows], "v:", color="tab:red", label="held-out harms")
    ax_g.set(ylabel=f"shifts (of {rows[0]['held_out']['shifts']})", title="significant OOD effects of TALE")
    hits = [(r["overlap"] or {}).get("hits", 0) for r in rows]
    chance = [(r["overlap"] or {}).get("random_expectation", 0.0) for r in rows]
    ax_o.plot(x, hits, "o-", label="TALE ∩ top attribution")
    ax_o.plot(x, chance, "k--", label="chance k²/L")
    ax_o.set(ylabel="hits over seeds × shifts", title="removed blocks vs largest attribution")
    for i, r in enumerate(rows):
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(r["positions"]))
        ax_p.scatter(np.full(len(r["positions"]), i) + jitter, r["positions"], s=14, alpha=0.6)
    ax_p.set_xticks(range(len(rows)), [f"{r['value']:,}" for r in rows])
    ax_p.set(xlim=(-0.5, len(rows) - 0.5), ylim=(0, 1), ylabel="relative depth (0 input, 1 output)",
             title="where TALE's blocks sit")  # every rung keeps its slot, with or without removed blocks
    for ax in (ax_g, ax_o):  # counts of shifts and of hits
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_q, ax_g, ax_o):
        ax.set_xticks(x, [f"{int(v):,}" for v in x])
        if ladder == "training":
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(x, [f"{int(v):,}" for v in x])
        ax.legend(fontsize=8)
    for ax in (ax_q, ax_g, ax_o, ax_p):
        ax.set_xlabel(AXIS_LABEL[ladder])
    return fig


def plot_training_curves(results: dict) -> Figure | None:
    """ID validation NMSE against training step for every recorded scale and seed (log-log); a cross marks
    where ``train.stop_when_flat`` ended a training (its last checkpoint is the model kept), a circle the
    checkpoint that ``train.restore_best`` kept instead."""
    curves = {n: _curves(s) for n, s in results["scales"].items()}
    if not any(curves.values()):
        return None
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    stops, kept = [], []  # (step, NMSE): where train.stop_when_flat ended a training; train.restore_best's pick
    for i, (name, per_seed) in enumerate(curves.items()):  # the config's order: L4 before L12
        color = f"C{i % 10}"
        records = results["scales"][name].get("training") or {}
        for j, (seed, curve) in enumerate(sorted(per_seed.items())):
            steps, values = zip(*curve)
            ax.plot(steps, values, color=color, alpha=0.85, label=name if j == 0 else None)
            if records[seed].get("stopped_flat"):
                stops.append((steps[-1], values[-1]))
            if records[seed].get("kept_step") is not None:
                kept.append(next((s, v) for s, v in curve if s == records[seed]["kept_step"]))
        ls = results["scales"][name]["quality"].get("references_id_nmse", {}).get("least_squares")
        if per_seed and on_scale(ls, min(v for curve in per_seed.values() for _, v in curve)):
            ax.axhline(ls, color=color, ls="--", lw=0.7)
    if stops:
        ax.plot(*zip(*stops), "kx", ms=7, ls="none", label="stopped flat" + ("" if kept else " (the kept model)"))
    if kept:
        ax.plot(*zip(*kept), "ko", ms=7, mfc="none", ls="none", label="kept: lowest ID NMSE (train.restore_best)")
    ax.set(xscale="log", yscale="log", xlabel="training step", ylabel="ID query NMSE (512 held-out prompts)",
           title="training curves")
    ax.legend(fontsize=8)
    return fig


def build_ladder_sections(results: dict) -> tuple[list[Block], dict[str, Any]]:
    """Blocks and figures for every ladder the study has, then the training curves."""
    blocks: list[Block] = []
    figures: dict[str, Any] = {}
    for ladder in AXES:
        section = section_ladder(results, ladder)
        if section:
            blocks += section
            figures[f"{ladder}.png"] = plot_ladder(results, ladder)
    if blocks:
        blocks += section_training_curves(results)
        figures["training_curves.png"] = plot_training_curves(results)
    return blocks, figures
