"""Depth and training-length ladders of a multi-scale testbed study.

The scales of a config (e.g. ``configs/depth.yaml``) are grouped by what varies between them: a **depth
ladder** is a set of scales with one width and training length over several depths; a **training ladder** one
depth and width over several training lengths. Per ladder this module answers, from the scales' summaries
(:func:`tapioca.study.scales.scale_summary`) alone: did each model's ID error stop improving, what TALE's OOD Δ
is under both protocols, where in depth TALE's blocks sit, and whether they are the top-attribution blocks more
often than chance.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from tapioca.models.training import curve_status
from tapioca.report.claims import overlap_summary

AXES = {"depth": "n_blocks", "training": "train_steps"}  # the quantity each ladder varies
FIXED = {"depth": ("training_length", "n_embd"), "training": ("n_blocks", "n_embd")}  # what it holds fixed


def _held(summary: dict, key: str) -> Any:
    """A quantity a ladder holds fixed; ``training_length`` is the steps, or "until flat" for every scale trained
    with ``train.stop_when_flat`` (whose ``train_steps`` are the steps it ran, so it joins the training ladder
    there, and a depth ladder of such scales holds the stopping rule fixed, not the steps)."""
    if key == "training_length":
        return "until flat" if summary.get("until_flat") else summary.get("train_steps")
    return summary.get(key)


def ladders(scales: dict[str, dict]) -> dict[str, list[str]]:
    """``{"depth": names, "training": names}``, each sorted along its axis: the largest group of testbed scales
    sharing the ladder's fixed quantities over at least two values of its axis (one scale per value: the
    first by name). A ladder that no group forms is absent; language-model scales form none."""
    found: dict[str, list[str]] = {}
    testbed = {n: s for n, s in scales.items() if s.get("kind", "testbed") == "testbed"}
    for ladder, axis in AXES.items():
        groups: dict[tuple, dict[Any, str]] = defaultdict(dict)
        for name in sorted(testbed):
            s = testbed[name]
            groups[tuple(_held(s, k) for k in FIXED[ladder])].setdefault(s.get(axis), name)
        best = max(groups.values(), key=len, default={})
        if len(best) >= 2:
            found[ladder] = [best[v] for v in sorted(best)]
    return found


def training_status(summary: dict) -> str:
    """One scale's training verdict over its seeds: ``flat``, ``improving`` (any seed still improving),
    ``not recorded`` (no seed has a curve) — with the largest last-quarter gain and the steps at which seeds
    trained with ``train.stop_when_flat`` stopped. When that stop rule ended every seed, the rule's verdict
    leads: it looks at the last ``flat_patience`` steps, while the last quarter of a long noisy curve can still
    hold a new best found before them."""
    records = [r for r in (summary.get("training") or {}).values() if r]
    per_seed = [curve_status(r.get("id_curve", [])) for r in records]
    recorded = [c for c in per_seed if c["status"] != "not recorded"]
    if not recorded:
        return "not recorded"
    last_quarter = f"{100 * max(c['last_gain'] for c in recorded):.1f} % in the last quarter"
    stopped = sorted((r for r in records if r.get("stopped_flat")), key=lambda r: int(r["stopped_flat"]))
    at = ", ".join(f"{int(r['stopped_flat']):,}" for r in stopped)
    kept = sorted(int(r["kept_step"]) for r in records if r.get("kept_step") is not None)
    behind = [_last_over_best(r["id_curve"]) for r in stopped if r.get("kept_step") is None and r.get("id_curve")]
    kept_note = (f"; kept the best checkpoint, step {', '.join(f'{s:,}' for s in kept)}" if kept else "") + (
        f"; last checkpoint {', '.join(f'{g:.1f}×' for g in behind)} the curve's best" if behind else "")
    if len(stopped) == len(records):  # the stop rule (no new best for train.flat_patience steps) ended every seed
        return f"stopped flat at step {at} (no new best at the end; {last_quarter}{kept_note})"
    word = "improving" if any(c["status"] == "improving" for c in recorded) else "flat"
    return f"{word} ({last_quarter}{f'; stopped flat at step {at}' if stopped else ''}{kept_note})"


def _last_over_best(curve: list[list[float]]) -> float:
    """The last point of an ID validation curve over its lowest (1.0: the last is the best)."""
    best = min(float(v) for _, v in curve)
    return float(curve[-1][1]) / best if best > 0 else 1.0


def relative_positions(summary: dict) -> list[float]:
    """Where TALE's removed blocks sit in depth, as (block + 0.5) / L in (0, 1), over seeds and shifts."""
    n = summary["n_blocks"]
    return [(b + 0.5) / n for per_seed in summary.get("removed", {}).values() if isinstance(per_seed, dict)
            for blocks in per_seed.values() for b in blocks]


def shift_counts(deltas: dict[str, dict]) -> dict[str, int]:
    """Over the shifts (not ``id``): how many had a significant gain, a significant harm, or neither."""
    rows = [d for name, d in deltas.items() if name != "id"]
    gains = sum(bool(d.get("improved")) for d in rows)
    harms = sum(bool(d.get("worse")) for d in rows)
    return {"gain": gains, "harm": harms, "neither": len(rows) - gains - harms, "shifts": len(rows)}


def ladder_rows(results: dict, ladder: str) -> list[dict[str, Any]]:
    """Per scale of one ladder (in order): its axis value, ID quality beside least squares, training status,
    significant gains/harms under both protocols, attribution overlap vs chance, mean relative position of
    TALE's blocks and the C1–C4 verdicts."""
    rows = []
    for name in results.get("ladders", {}).get(ladder, []):
        s = results["scales"][name]
        positions = relative_positions(s)
        rows.append({
            "name": name, "value": s.get(AXES[ladder]), "n_blocks": s.get("n_blocks"),
            "train_steps": s.get("train_steps"), "id_nmse": s["quality"]["model_id_nmse"],
            "least_squares": s["quality"].get("references_id_nmse", {}).get("least_squares"),
            "training": training_status(s),
            "held_out": shift_counts(s["target_delta"]), "in_sample": shift_counts(s.get("in_sample_delta", {})),
            "overlap": s.get("attribution_overlap"), "positions": positions,
            "mean_position": float(np.mean(positions)) if positions else None,
            "claims": {c: s["claims"].get(c, {}).get("verdict") for c in ("C1", "C2", "C3", "C4")},
            "claims_in_sample": {c: (s.get("claims_in_sample") or {}).get(c, {}).get("verdict") for c in ("C1", "C2")},
        })
    return rows


def _at(rows: list[dict], protocol: str, outcome: str, unit: str) -> str:
    """'8 blocks (2/10 shifts), 16 blocks (1/10 shifts)': the rungs of ``rows`` and their ``outcome`` counts."""
    return ", ".join(f"{r['value']:,} {unit} ({r[protocol][outcome]}/{r[protocol]['shifts']} shifts)" for r in rows)


def answer(results: dict, ladder: str) -> str:
    """The ladder's answer as measured, in plain words: whether TALE improved (or harmed) OOD held out at any
    rung and what the paper's in-sample protocol shows, rungs where TALE removed nothing (not enough data), and
    whether its blocks are the top-attribution blocks more often than chance (pooled exact p)."""
    rows = ladder_rows(results, ladder)
    if not rows:
        return f"No {ladder} ladder in this study (it needs ≥ 2 scales differing only in {AXES[ladder]})."
    unit = "blocks" if ladder == "depth" else "steps"
    gained = [r for r in rows if r["held_out"]["gain"]]
    harmed = [r for r in rows if r["held_out"]["harm"]]
    inside = [r for r in rows if r["in_sample"]["gain"]]
    rungs = ", ".join(f"{r['value']:,}" for r in rows)
    lead = (f"Held out, TALE improved OOD at {_at(gained, 'held_out', 'gain', unit)}" if gained else
            f"No OOD gain held out at any rung ({rungs} {unit}): no shift improved significantly")
    if harmed:
        lead += f"; it significantly harmed OOD at {_at(harmed, 'held_out', 'harm', unit)}"
    protocol = (f"Under the paper's in-sample protocol it 'gained' at {_at(inside, 'in_sample', 'gain', unit)}"
                if inside else "Under the paper's in-sample protocol: no gain at any rung")
    empty = [f"{r['value']:,}" for r in rows if not r["positions"]]
    scarce = f" Not enough data at {', '.join(empty)} {unit}: TALE removed no block there." if empty else ""
    cases = [c for r in rows for c in (r["overlap"] or {}).get("cases", [])]
    if cases:
        pooled = overlap_summary(sum((r["overlap"] or {}).get("hits", 0) for r in rows), cases)
        link = (f" TALE's blocks were the top-attribution blocks {pooled['hits']} times against "
                f"{pooled['random_expectation']:.1f} expected by chance (pooled p = {pooled['p']:.3f}).")
    else:
        link = " Attribution overlap is untested: TALE removed no block."
    return f"{lead}. {protocol}.{scarce}{link}"
