"""What a report leads with: the findings in plain words, the verdict table and the headline figure.

Everything is phrased from results.json (verdicts and numbers); nothing here states a conclusion of its own.
Fields a run may lack (the in-sample protocol, power, optimism) are skipped and the text says so.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tapioca.report.plots import (IN_SAMPLE, METRIC_LABELS, _dig, _figure, _lower_is_better, _main_metric, _metrics,
                                  _num, _shifts)

Block = tuple

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
GRAPH_CLAIM_TEXT = {"G1": "edge pruning (PrunE) realigns OOD profiles toward ID"}  # graph studies only
NOT_COMPUTED = "not computed by this run"
HELD_OUT_COLOR, IN_SAMPLE_COLOR = "#2471a3", "#dd8452"


def primary(results: dict) -> str:
    """The metric the claims are decided on (``primary_metric``), or the selection metric when it has no data."""
    metric = results.get("primary_metric")
    return metric if metric in _metrics(results) else _main_metric(results)


def metric_name(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _verdict(claims: Any, cid: str) -> str | None:
    v = _dig(claims, cid, "verdict")
    return v if isinstance(v, str) else None


# ----------------------------------------------------------------------------------------------------------
# findings
# ----------------------------------------------------------------------------------------------------------


def _pattern(claims: Any) -> tuple[str, str]:
    """(how the paper's pattern fares, 'C1 x, C2 y') from the C1 and C2 verdicts of one protocol."""
    c1, c2 = _verdict(claims, "C1"), _verdict(claims, "C2")
    state = ("appears" if c1 == c2 == "supported" else "does not appear" if "refuted" in (c1, c2)
             else "is not established")
    return state, f"C1 {c1 or 'not assessed'}, C2 {c2 or 'not assessed'}"


def _pattern_sentence(results: dict) -> str:
    given = _dig(results, "paper_pattern", "sentence")
    if isinstance(given, str) and given.strip():
        return given.strip()
    if not isinstance(results.get("claims"), dict):
        return "The claims were not assessed for this run, so there is no verdict on the paper's pattern."
    held, held_why = _pattern(results["claims"])
    if not isinstance(results.get("claims_in_sample"), dict):
        return (f"On held-out data the paper's pattern — no ID gain, an OOD gain — {held} ({held_why}); its own "
                f"in-sample protocol (blocks selected and scored on the same examples) was {NOT_COMPUTED}.")
    ins, ins_why = _pattern(results["claims_in_sample"])
    if ins == "appears":
        after = "survives" if held == "appears" else "does not survive"
    else:
        after = held if held != "appears" else "appears only"
    return (f"The paper's pattern — no ID gain, an OOD gain — {ins} under its own protocol, where blocks are "
            f"selected and scored on the same examples ({ins_why}), and {after} on held-out data ({held_why}).")


def _count(names: list[str]) -> str:
    return f"{len(names)} ({', '.join(names)})" if names and len(names) <= 4 else str(len(names))


def _shift_sentence(results: dict, metric: str) -> str | None:
    delta = _dig(results, "protocols", "target", "delta")
    if not isinstance(delta, dict):
        return None
    shifts = [s for s in _shifts(results) if isinstance(_dig(delta, s, metric), dict)]
    better = [s for s in shifts if delta[s][metric].get("improved")]
    worse = [s for s in shifts if delta[s][metric].get("worse")]
    text = (f"Selected on each shift, TALE improved held-out {metric_name(metric)} on {_count(better)} of "
            f"{len(shifts)} shifts and worsened it on {_count(worse)} (95% CIs, Holm-corrected)")
    ins = _dig(results, "protocols", IN_SAMPLE, "delta")
    if isinstance(ins, dict):
        n_in = sum(bool(_dig(ins, s, metric, "improved")) for s in shifts)
        text += f"; scored in-sample, the same selections improved {n_in} of {len(shifts)}"
    return text + "."


def _optimism_sentence(results: dict) -> str | None:
    rows = {d: r for d, r in (results.get("optimism") or {}).items() if isinstance(r, dict)}
    means = [r["mean"] for r in rows.values() if isinstance(r.get("mean"), (int, float))]
    if not means:
        return None
    above = [d for d, r in rows.items() if isinstance(r.get("low"), (int, float)) and r["low"] > 0]
    unit = metric_name(next(iter(rows.values())).get("metric", ""))
    text = (f"Optimism (in-sample minus held-out gain) had a median of {_num(float(np.median(means)), True)} {unit}, "
            f"with its CI above 0 on {len(above)} of {len(rows)} distributions")
    nulls = {d: r for d, r in rows.items() if isinstance(r.get("p_null"), (int, float))}
    if nulls:
        beat = sum(r["p_null"] < 0.05 for r in nulls.values())
        text += (f"; the search's own in-sample gain exceeded what its whole greedy search produces when no block "
                 f"truly helps (p_null < 0.05) on {beat} of {len(nulls)}")
    return text + "."


def _controls_sentence(results: dict) -> str | None:
    claims = results.get("claims")
    parts = []
    for cid, what in (("C9", "weight pruning at TALE's budget"), ("C5", "residual scaling and norm matching")):
        verdict, evidence = _verdict(claims, cid), _dig(claims, cid, "evidence")
        if verdict:
            parts.append(f"{cid} ({what}) is {verdict}" + (f" — {evidence}" if cid == "C9" and evidence else ""))
    return ("Controls: " + "; ".join(parts) + ".") if parts else None


def findings(results: dict) -> str:
    """2–4 plain sentences: the paper's pattern in-sample vs held out, the shifts, optimism, the controls."""
    metric = primary(results)
    sentences = [_pattern_sentence(results), _shift_sentence(results, metric), _optimism_sentence(results),
                 _controls_sentence(results)]
    return " ".join(s for s in sentences if s)


# ----------------------------------------------------------------------------------------------------------
# verdict table
# ----------------------------------------------------------------------------------------------------------


def _units(c: dict, n: Any) -> str:
    """``n`` with the claim's unit of replication, e.g. "3 models" (older runs: the bare number)."""
    unit = c.get("unit")
    return f"{n} {unit}{'s' if n != 1 else ''}" if unit else f"{n}"


def _power_cells(c: dict) -> tuple[str, str]:
    mde = c.get("mde")
    mde_text = f"{_num(mde)} ({_units(c, c['n'])})" if c.get("n") is not None else _num(mde)
    if c.get("n_needed") is None:
        return (mde_text if mde is not None else "—"), "—"
    sesoi = f" (δ {_num(c['sesoi'])})" if c.get("sesoi") is not None else ""
    return (mde_text if mde is not None else "—"), f"{_units(c, c['n_needed'])}{sesoi}"


def verdict_table(results: dict) -> list[Block]:
    """One row per claim: statement, held-out verdict, in-sample verdict, minimal detectable effect (n) and the
    n needed for the smallest effect of interest; a column no claim fills is left out and the note says so."""
    claims = results.get("claims")
    if not isinstance(claims, dict):
        rows = [[cid, text, "not assessed"] for cid, text in CLAIMS.items()]
        return [("p", "results.json has no `claims` block: the claims were not assessed for this run."),
                ("table", ["claim", "statement", "held-out verdict"], rows)]
    in_sample = results.get("claims_in_sample") if isinstance(results.get("claims_in_sample"), dict) else None
    power = any(isinstance(c, dict) and ("mde" in c or "n_needed" in c) for c in claims.values())
    headers = ["claim", "statement", "held-out verdict"]
    headers += ["in-sample verdict"] * bool(in_sample) + ["MDE (n)", "n for SESOI (δ)"] * power
    rows = []
    for cid in list(CLAIMS) + [c for c in claims if c not in CLAIMS]:
        c = claims.get(cid) if isinstance(claims.get(cid), dict) else {}
        row = [f"[{cid}](#{cid.lower()})", CLAIMS.get(cid, GRAPH_CLAIM_TEXT.get(cid, "")), f"**{c.get('verdict', 'not assessed')}**"]
        if in_sample:
            row.append(_verdict(in_sample, cid) or "—")
        if power:
            row += list(_power_cells(c))
        rows.append(row)
    missing = ([] if in_sample else ["in-sample verdicts"]) + ([] if power else ["power (MDE, n needed)"])
    note = "Held-out verdicts decide."
    if in_sample:
        note += " The in-sample column is the paper's protocol (blocks selected and scored on the same examples)."
    if power:
        note += (" MDE: minimal detectable effect at 80% power with the run's replicates (models, or selection "
                 "draws of one model: the unit of every verdict); n for SESOI: replicates needed to detect the "
                 "smallest effect of interest δ.")
    if missing:
        missing[0] = missing[0][0].upper() + missing[0][1:]
        note += f" {' and '.join(missing)}: {NOT_COMPUTED}."
    return [("table", headers, rows), ("p", note, "note")]


# ----------------------------------------------------------------------------------------------------------
# headline figure
# ----------------------------------------------------------------------------------------------------------


def improvement(d: Any, metric: str) -> tuple[float, float, float, bool]:
    """(mean, low, high, decided) of a Δ row as an improvement (up = better): −Δ as % of the full model's score
    for lower-is-better metrics, Δ in percentage points otherwise; decided: the CI excludes 0."""
    if not isinstance(d, dict) or not all(isinstance(d.get(k), (int, float)) for k in ("mean", "low", "high")):
        return math.nan, math.nan, math.nan, False
    decided = bool(d.get("improved") or d.get("worse"))
    if _lower_is_better(metric):
        full = d.get("full")
        scale = -100.0 / full if isinstance(full, (int, float)) and full > 0 else math.nan
        return d["mean"] * scale, d["high"] * scale, d["low"] * scale, decided
    return d["mean"] * 100.0, d["low"] * 100.0, d["high"] * 100.0, decided


def improvement_label(metric: str) -> str:
    if _lower_is_better(metric):
        return f"improvement = −Δ {metric_name(metric)}, % of full (lower {metric_name(metric)} is better)"
    return f"improvement = Δ {metric_name(metric)}, points (higher is better)"


def plot_headline(results: dict) -> Figure | None:
    """Per distribution, the held-out and the in-sample Δ of the primary metric as improvements with 95% CIs
    (dot and whisker; filled: the CI excludes 0), zero line; right of zero = pruning helped."""
    metric = primary(results)
    dists = list(results.get("full") or {})
    protocols = [(p, label, color) for p, label, color in
                 (("target", "held-out", HELD_OUT_COLOR), (IN_SAMPLE, "in-sample (paper's protocol)", IN_SAMPLE_COLOR))
                 if isinstance(_dig(results, "protocols", p, "delta"), dict)]
    if not dists or not protocols:
        return None
    fig = _figure(5.2, 0.3 * len(dists) + 1.9)
    ax = fig.subplots()
    y = np.arange(len(dists))[::-1].astype(float)
    for j, (protocol, label, color) in enumerate(protocols):
        offset = 0.13 if len(protocols) > 1 and j == 0 else -0.13 if len(protocols) > 1 else 0.0
        for yi, dist in zip(y, dists):
            mean, low, high, decided = improvement(_dig(results, "protocols", protocol, "delta", dist, metric), metric)
            if not math.isfinite(mean):
                continue
            ax.errorbar([mean], [yi + offset], xerr=[[max(mean - low, 0)], [max(high - mean, 0)]], fmt="o",
                        color=color, mfc=color if decided else "white", capsize=3, ms=6)
        ax.plot([], [], "o", color=color, label=label)
    if len(protocols) == 1:
        ax.plot([], [], " ", label=f"in-sample: {NOT_COMPUTED}")
    ax.axvline(0, color="black", lw=0.9)
    ax.set_yticks(y, [f"{d} (C1)" if d == "id" else d for d in dists], fontsize=10)
    ax.set_ylim(-0.6, len(dists) - 0.4)
    ax.set_xlabel(improvement_label(metric) + "\n← worse | better →", fontsize=8.5)
    ax.set_title(f"Does pruning help? {metric_name(metric)}, 95% CI", fontsize=11)
    fig.legend(fontsize=8, loc="outside upper center", ncols=2, title="filled marker: the CI excludes 0",
               title_fontsize=8, frameon=False)
    ax.grid(axis="x", color="#eeeeee")
    return fig


def headline_caption(results: dict) -> str:
    metric = primary(results)
    text = (f"Headline: {improvement_label(metric)}, per distribution, 95% CI; right of the zero line = pruning "
            "helped. Blue: held-out (blocks selected on the selection split, scored on disjoint held-out examples). ")
    if isinstance(_dig(results, "protocols", IN_SAMPLE, "delta"), dict):
        return text + ("Orange: in-sample, the paper's protocol (selected and scored on the same examples). "
                       "The `id` row decides C1, the shifts C2.")
    return text + f"The in-sample Δ (the paper's protocol) was {NOT_COMPUTED}. The `id` row decides C1, the shifts C2."
