"""Plain-text tables of a study's results.json (for the terminal and the closing notes)."""

from __future__ import annotations

import textwrap
from typing import Any

from tapioca.report.headline import findings


def _removed(by_seed: dict[str, list[int]]) -> str:
    return " ".join(f"s{seed}:{blocks or '-'}" for seed, blocks in by_seed.items()).replace(" ", "")


def format_quality(results: dict[str, Any]) -> str:
    q = results["quality"]
    if "model_id_acc" in q:
        m = q["model_id_acc"]
        return (f"{results['model']['name']} ({results['n_blocks']} blocks): held-out ID accuracy {m['mean']:.3f} "
                f"[{m['low']:.3f}, {m['high']:.3f}] (per seed {', '.join(f'{v:.3f}' for v in m['per_seed'].values())})")
    m = q["model_id_nmse"]
    refs = ", ".join(f"{name} {value:.4f}" for name, value in q["references_id_nmse"].items())
    return (f"ID query NMSE: model {m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}] "
            f"(per seed {', '.join(f'{v:.4f}' for v in m['per_seed'].values())}); references: {refs}")


def _or_dash(x: Any) -> str:
    return "—" if x is None else str(x)


def _p(x: Any) -> str:
    return f"{x:8.3g}" if isinstance(x, (int, float)) else f"{'—':>8}"


def format_protocol(results: dict[str, Any], protocol: str, metric: str = "nmse") -> str:
    """One row per distribution: full vs pruned score, Δ with CI, Holm p, blocks removed (in-sample: the paper's
    protocol, scored on the selection examples the blocks were chosen on)."""
    delta = results["protocols"][protocol]["delta"]
    removed = results["removed"]
    split = "the selection examples (the paper's protocol)" if protocol == "in-sample" else "held-out examples"
    lines = [f"protocol {protocol} — {metric} on {split} (Δ = pruned − full, t CI over replicates, Holm over "
             "shifts)",
             f"{'distribution':>14} {'full':>10} {'pruned':>10} {'Δ':>10} {'CI':>23} {'p_holm':>8}  verdict   removed"]
    for dist, row in delta.items():
        d = row[metric]
        verdict = "better" if d["improved"] else "worse" if d["worse"] else "same"
        blocks = removed["from-id"] if protocol == "from-id" else removed["target"][dist]
        lines.append(f"{dist:>14} {d['full']:10.4f} {d['pruned']:10.4f} {d['mean']:+10.4f} "
                     f"[{d['low']:+9.4f},{d['high']:+9.4f}] {_p(d.get('p_holm'))}  {verdict:8}  {_removed(blocks)}")
    return "\n".join(lines)


def format_geometry(results: dict[str, Any]) -> str:
    """Distortion D (mean over seeds) of each shift for the full and the pruned models, and the noise floor."""
    mean = results["geometry"]["D_mean"]
    lines = [f"distortion D of OOD vs ID profiles (mean over seeds; ID-vs-ID noise floor "
             f"{mean['noise_floor']['full']:.4f})",
             f"{'shift':>14} {'full':>9} {'target':>9} {'tgt/fullID':>10} {'from-id':>9}"]
    for dist, row in mean.items():
        if dist != "noise_floor":
            lines.append(f"{dist:>14} {row['full']:9.4f} {row['target_pruned']:9.4f} "
                         f"{row['target_pruned_vs_full_id']:10.4f} {row['from_id_pruned']:9.4f}")
    return "\n".join(lines)


def format_claims(results: dict[str, Any]) -> str:
    """The verdict table: one line per claim, its in-sample verdict and power where present, plus the reviewer's
    "what would settle it" case if it occurred."""
    lines = ["claims (REFERENCE §1; held-out verdicts)"]
    in_sample = results.get("claims_in_sample") or {}
    for name, claim in results["claims"].items():
        lines.append(f"  {name} {claim['verdict']:>12}  {claim['evidence']}")
        if name in in_sample:
            lines.append(f"  {'':2} {'':>12}  in-sample verdict: {in_sample[name]['verdict']} "
                         f"({in_sample[name]['evidence']})")
        if claim.get("mde") is not None:
            unit = claim.get("unit", "replicate")
            lines.append(f"  {'':2} {'':>12}  MDE at 80% power {claim['mde']:.4g} (n = {claim.get('n', '?')} {unit}s); "
                         f"{unit}s needed for the smallest effect of interest: {_or_dash(claim.get('n_needed'))}")
        if claim.get("settle_case"):
            lines.append(f"  {'':2} {'':>12}  WHAT WOULD SETTLE IT: {claim['settle_case']}")
    return "\n".join(lines)


def format_scales(results: dict[str, Any]) -> str:
    """A multi-scale study: per scale its ID NMSE and C1–C9 verdicts, then C6."""
    claims = [c for c in next(iter(results["scales"].values()))["claims"] if c != "C6"]
    score = "ID acc" if results.get("kind") == "lm" else "ID NMSE"
    lines = [f"{'scale':>8} {'blocks':>6} {score:>9}  " + " ".join(f"{c:>12}" for c in claims)]
    for name, s in sorted(results["scales"].items(), key=lambda kv: kv[1]["n_blocks"]):
        verdicts = " ".join(f"{s['claims'][c]['verdict']:>12}" for c in claims)
        quality = s["quality"].get("model_id_nmse") or s["quality"]["model_id_acc"]
        lines.append(f"{name:>8} {s['n_blocks']:>6} {quality['mean']:9.4f}  {verdicts}")
    c6 = results["claims"]["C6"]
    lines.append(f"C6 {c6['verdict']}: {c6['evidence']}")
    return "\n".join(lines)


def format_summary(results: dict[str, Any]) -> str:
    if "full" not in results and "scales" in results:
        return format_scales(results)
    parts = [textwrap.fill("findings: " + findings(results), 110), format_quality(results)]
    for protocol, data in results["protocols"].items():
        for metric in ("acc",) if results.get("kind") == "lm" else ("nmse", "tol_acc"):
            if all(metric in row for row in data["delta"].values()):
                parts.append(format_protocol(results, protocol, metric))
    if "geometry" in results:
        parts.append(format_geometry(results))
    if "claims" in results:
        parts.append(format_claims(results))
    if "timings_seconds" in results:
        parts.append("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings_seconds"].items()))
    return "\n\n".join(parts)
