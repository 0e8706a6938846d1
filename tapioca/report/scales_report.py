"""The report of a multi-scale study: per-scale model quality, TALE's OOD deltas and C1–C9 verdicts side by
side, C6, a plot across scales and links to every scale's own report. Reads the run directory only."""

from __future__ import annotations

from typing import Any

import numpy as np

from tapioca.report.ladders import shift_counts
from tapioca.report.ladders_report import build_ladder_sections
from tapioca.report.plots import _ci, _figure, _num, _p

Block = tuple

CLAIM_IDS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9")
SCALES_PLOTS = ("scales.png", "depth.png", "training.png", "training_curves.png")  # every figure this report may draw


def is_multi_scale(results: dict) -> bool:
    """True for a multi-scale study's results.json (it has ``scales`` and no single-model ``full``)."""
    return isinstance(results.get("scales"), dict) and "full" not in results


def _by_depth(scales: dict[str, dict]) -> list[tuple[str, dict]]:
    return sorted(scales.items(), key=lambda kv: (kv[1].get("n_blocks", 0), kv[0]))


def section_overview(results: dict) -> list[Block]:
    names = ", ".join(f"{n} ({s.get('n_blocks', '?')} blocks)" for n, s in _by_depth(results["scales"]))
    return [("h", 1, "tapioca multi-scale study report"),
            ("p", f"Scales: {names}. Each scale is a complete study with its own report (linked below); this "
                  "page sets their numbers side by side. Nothing here re-runs a model.")]


def _scale_sentence(name: str, s: dict) -> str:
    """One scale in words: significant OOD gains / harms held out and in-sample, and the claims it refutes."""
    held, inside = shift_counts(s["target_delta"]), shift_counts(s.get("in_sample_delta", {}))
    refuted = [c for c in CLAIM_IDS if c != "C6" and s["claims"].get(c, {}).get("verdict") == "refuted"]
    against = f"; it refutes {', '.join(refuted)}" if refuted else ""
    return (f"{name}: TALE improved {held['gain']}/{held['shifts']} shifts and harmed {held['harm']} held out "
            f"({inside['gain']} gains in-sample){against}")


def section_scale_findings(results: dict) -> list[Block]:
    """The answer first: C6 in words, each scale in one clause, and whether the paper's pattern (OOD gain held
    out) appears at any scale."""
    ordered = _by_depth(results["scales"])
    c6 = results.get("claims", {}).get("C6", {})
    depth = results.get("ladders", {}).get("depth")
    over = f" (decided over the depth ladder: {', '.join(depth)})" if depth else ""
    gained = [n for n, s in ordered if shift_counts(s["target_delta"])["gain"]]
    inside = [n for n, s in ordered if shift_counts(s.get("in_sample_delta", {}))["gain"]]
    pattern = (f"TALE's OOD gain appears held out at {', '.join(gained)}" if gained
               else "TALE's OOD gain appears held out at no scale")
    if inside:
        pattern += f", and in-sample (the paper's protocol) at {', '.join(inside)}."
    else:
        pattern += "; in-sample (the paper's protocol) at no scale." if gained else ", nor in-sample (the paper's protocol)."
    return [("h", 2, "Findings"),
            ("p", f"**C6 (consistent across model scales): {c6.get('verdict', 'not assessed')}**{over} — "
                  f"{c6.get('evidence', '')}. {pattern}"),
            ("p", " ".join(_scale_sentence(n, s) + "." for n, s in ordered))]


def _metric(results: dict) -> str:
    """The primary metric the scales share ("nmse" on the testbed, "acc" on LMs)."""
    return next(iter(results["scales"].values())).get("metric", "nmse")


def _quality(s: dict) -> dict:
    """A scale's held-out ID score row: NMSE (testbed) or accuracy (LM)."""
    q = s["quality"]
    return q["model_id_nmse"] if "model_id_nmse" in q else q["model_id_acc"]


def section_scale_quality(results: dict) -> list[Block]:
    """Per scale: size, training steps, seeds, ID NMSE with CI beside the reference predictors (LMs: the
    model and its held-out ID accuracy)."""
    if results.get("kind") == "lm":
        rows = [[name, s.get("model", "?"), s.get("n_blocks", "?"), ", ".join(map(str, s.get("seeds", []))),
                 _ci(_quality(s))] for name, s in _by_depth(results["scales"])]
        return [("h", 2, "Model quality per model"),
                ("p", "Held-out ID accuracy (seed-stratified bootstrap 95% CI; seeds are sampling seeds)."),
                ("table", ["name", "model", "blocks", "seeds", "ID accuracy [95% CI]"], rows)]
    rows = []
    for name, s in _by_depth(results["scales"]):
        refs = s["quality"].get("references_id_nmse", {})
        rows.append([name, s.get("n_blocks", "?"), s.get("n_embd", "?"), s.get("train_steps", "?"),
                     ", ".join(map(str, s.get("seeds", []))), _ci(s["quality"]["model_id_nmse"]),
                     _num(refs.get("least_squares")), _num(refs.get("knn")), _num(refs.get("mean"))])
    return [("h", 2, "Model quality per scale"),
            ("p", "Held-out ID query NMSE (lower is better; seed-stratified bootstrap 95% CI). Least squares on "
                  "the true degree is the ceiling, the context mean the floor: a scale far from least squares is "
                  "undertrained, and its verdicts say less."),
            ("table", ["scale", "blocks", "width", "train steps", "seeds", "model ID NMSE [95% CI]",
                       "least squares", "kNN", "context mean"], rows)]


def section_scale_claims(results: dict) -> list[Block]:
    """Claims × scales verdict table, then the evidence behind C1–C4 at each scale (C6: the findings)."""
    ordered = _by_depth(results["scales"])
    rows = []
    for cid in CLAIM_IDS:
        if cid == "C6":
            continue
        rows.append([cid] + [f"**{s['claims'].get(cid, {}).get('verdict', '—')}**" for _, s in ordered])
    evidence = [[n, cid, s["claims"][cid].get("evidence", "—")] for cid in ("C1", "C2", "C3", "C4")
                for n, s in ordered if cid in s["claims"]]
    return [("h", 2, "Verdicts per scale"), ("table", ["claim", *[n for n, _ in ordered]], rows),
            ("h", 3, "Evidence behind C1–C4 per scale"), ("table", ["scale", "claim", "evidence"], evidence)]


def section_scale_deltas(results: dict) -> list[Block]:
    """Per distribution and scale: TALE (target protocol) held-out Δ with CI and Holm p."""
    ordered = _by_depth(results["scales"])
    dists = list(next(iter(results["scales"].values()))["target_delta"])
    rows = []
    for dist in dists:
        row = [dist]
        for _, s in ordered:
            d = s["target_delta"].get(dist)
            row.append("—" if d is None else f"{_ci(d, signed=True)} (Holm p {_p(d.get('p_holm'))})")
        rows.append(row)
    metric = _metric(results)
    better = "negative" if metric == "nmse" else "positive"
    metric = metric.upper()
    return [("h", 2, f"TALE (target protocol): held-out Δ{metric} per scale"),
            ("p", f"Δ = pruned − full on held-out prompts (for {metric} {better} is better), Student-t 95% CI "
                  "over replicates (models, or selection draws). 0 means TALE kept every block on every seed."),
            ("table", ["distribution", *[n for n, _ in ordered]], rows)]


def section_scale_links(results: dict) -> list[Block]:
    rows = [[n, s.get("run_dir", "?"), f"../{s.get('run_dir', '?')}/report/report.html",
             f"{sum(float(v) for v in s.get('timings_seconds', {}).values()):.0f}"]
            for n, s in _by_depth(results["scales"])]
    return [("h", 2, "Per-scale reports"),
            ("table", ["scale", "run directory", "report", "wall seconds"], rows)]


def plot_scales(results: dict) -> Any:
    """Left: ID NMSE vs depth (with CIs) and least squares. Right: TALE's held-out ΔNMSE per shift and scale."""
    ordered = _by_depth(results["scales"])
    fig = _figure(12, 4.2)
    ax_q, ax_d = fig.subplots(1, 2)
    depth = [s["n_blocks"] for _, s in ordered]
    q = [_quality(s) for _, s in ordered]
    metric = _metric(results)
    ax_q.errorbar(depth, [v["mean"] for v in q], yerr=[[v["mean"] - v["low"] for v in q],
                                                       [v["high"] - v["mean"] for v in q]], marker="o", capsize=3,
                  label="model")
    for ref in ("knn", "mean") if metric == "nmse" else ():  # the testbed's reference predictors
        ax_q.plot(depth, [s["quality"].get("references_id_nmse", {}).get(ref, np.nan) for _, s in ordered], "x--",
                  label=ref)  # markers: a single scale still shows its references
    if metric == "nmse":
        ax_q.set(ylabel="ID NMSE (log)", yscale="log")
    else:
        ax_q.set(ylabel=f"ID {metric}")
    ax_q.set(xlabel="blocks", title="model quality per scale", xticks=sorted(set(depth)))
    ax_q.legend(fontsize=8)
    shifts = [d for d in next(iter(results["scales"].values()))["target_delta"] if d != "id"]
    width = 0.8 / max(len(ordered), 1)
    for i, (name, s) in enumerate(ordered):
        x = np.arange(len(shifts)) + (i - (len(ordered) - 1) / 2) * width
        d = [s["target_delta"][sh] for sh in shifts]
        ax_d.errorbar(x, [v["mean"] for v in d], yerr=[[v["mean"] - v["low"] for v in d],
                                                       [v["high"] - v["mean"] for v in d]],
                      fmt="o", capsize=2, label=name)
    ax_d.axhline(0, color="k", lw=0.8)
    ax_d.set_yscale("symlog", linthresh=0.01)
    ax_d.set_xticks(np.arange(len(shifts)), shifts, rotation=45, ha="right", fontsize=8)
    ax_d.set(ylabel=f"Δ{metric} pruned − full (symlog)",
             title=f"TALE held-out Δ per shift ({'below' if metric == 'nmse' else 'above'} 0 = better)")
    ax_d.legend(fontsize=8)
    return fig


def build_scales_report(results: dict) -> tuple[list[Block], dict[str, Any]]:
    """The multi-scale report's blocks and figures by file name: the depth and training-length ladders' answers
    first (when the scales form ladders), the findings, the verdicts and the figure across scales, then quality
    and Δ per scale, and the links."""
    ladder_blocks, figures = build_ladder_sections(results)
    metric = _metric(results).upper()
    figure = [("h", 2, "Across scales"), ("img", "scales.png", f"Left: held-out ID {metric} per scale. Right: "
               f"TALE's held-out Δ{metric} per shift and scale, 95% CIs.")]
    blocks = (section_overview(results) + ladder_blocks + section_scale_findings(results)
              + section_scale_claims(results) + figure + section_scale_quality(results)
              + section_scale_deltas(results) + section_scale_links(results))
    return blocks, {**figures, "scales.png": plot_scales(results)}
