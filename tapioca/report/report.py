"""A study's report: PNG plots, ``report.md`` and a self-contained ``report.html``.

Reads only the run directory (``results.json``, ``config.yaml``, ``environment.json``, ``timings.json``,
``geometry/seed*.json`` and ``evaluation/seed*/full.npz``); never loads or runs a model. The report leads with
the answer (findings, verdict table, headline figure), then gives one section per claim C1–C9 with the plot
and tables that decide it, then supporting detail, and ends with configuration, environment and timings.
Optional blocks of ``results.json`` are rendered when present; an absent one is said to be not computed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tapioca.config import NOT_FOR_LM
from tapioca.errors import CheckpointError
from tapioca.analysis.evaluation import Evaluation
from tapioca.io import atomic_write_bytes, read_result
from tapioca.report.edges_report import GRAPH_CLAIM_TEXT, edges_plot, section_edges
from tapioca.report.render import Block, render_html, render_markdown
from tapioca.report.scales_report import SCALES_PLOTS, build_scales_report, is_multi_scale
from tapioca.report.headline import (CLAIMS, NOT_COMPUTED, findings, headline_caption, plot_headline, primary,
                                     verdict_table)
from tapioca.report.plots import (IN_SAMPLE, METHOD_ORDER, METRIC_LABELS, _ci, _dig, _lower_is_better, _main_metric,
                                  _metrics, _num, _outcome, _p, _png, _removed_text, _shifts, _spearman,
                                  distortion_drop, make_plots, sweep_seeds)

__all__ = ["write_report", "build_report", "load_results"]

REQUIRED_KEYS = ("quality", "full", "protocols")


# ----------------------------------------------------------------------------------------------------------
# reading the run directory
# ----------------------------------------------------------------------------------------------------------


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """``run_dir/results.json`` as a dict; CheckpointError naming the file when missing or corrupt."""
    path = Path(run_dir) / "results.json"
    results = read_result(path, "results", f"finish the study first (tapioca study --out {Path(run_dir)})",
                          "re-run the study's statistics step")
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


def _config_value(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_config_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_config_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _mde(d: dict) -> str:
    return f"{_num(d['mde'])} (n = {d.get('n', '?')})" if d.get("mde") is not None else "—"


def section_title(results: dict) -> list[Block]:
    seeds = list(_dig(results, "quality", "model_id_nmse", "per_seed") or _dig(results, "quality", "model_id_acc",
                                                                              "per_seed") or [])
    return [("h", 1, "tapioca study report"),
            ("p", f"{len(_shifts(results))} shift(s) · {results.get('n_blocks', '?')} blocks per model · "
                  f"{len(seeds) or '?'} seed(s) · primary metric `{primary(results)}` · selection metric "
                  f"`{results.get('selection_metric', '?')}`. Everything here is read from the run directory; no "
                  "model is re-run.", "note")]


def section_lead(results: dict, images: dict[str, bytes]) -> list[Block]:
    """The first screen: findings, the verdict table and the headline figure."""
    blocks: list[Block] = [("h", 2, "Findings", "findings"), ("p", findings(results), "lead"),
                           *section_claims(results)]
    if "headline.png" in images:
        blocks.append(("img", "headline.png", headline_caption(results)))
    else:
        blocks.append(("p", f"Headline figure: no Δ of the primary metric in results.json ({NOT_COMPUTED})."))
    return blocks


def section_claims(results: dict) -> list[Block]:
    """The verdict table for C1–C9 (held-out, in-sample, power)."""
    return [("h", 2, "Verdicts", "verdicts"), *verdict_table(results)]


def section_setup(results: dict, config: Any, environment: Any, timings: Any) -> list[Block]:
    """Configuration, environment and timings: the last part of the report."""
    blocks: list[Block] = [("h", 2, "Configuration")]
    if isinstance(config, dict):
        rows = []
        lm = results.get("kind") == "lm"
        for section, values in config.items():
            if lm and section in NOT_FOR_LM:
                continue
            if not isinstance(values, dict):
                rows.append([section, _config_value(values)])
                continue
            for key, value in values.items():
                name = f"{section}.{key}"
                if name != "run.out" and not (lm and name in NOT_FOR_LM):
                    rows.append([name, _config_value(value)])
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
    """The model's ID query NMSE beside the reference predictors (LM: its held-out ID accuracy)."""
    q = results["quality"]
    if "model_id_acc" in q:
        model, m = q["model_id_acc"], results.get("model", {})
        per_seed = ", ".join(f"s{s}: {_num(v)}" for s, v in (model.get("per_seed") or {}).items())
        return [("h", 2, "Model quality"),
                ("p", f"{m.get('name', 'the model')} ({m.get('n_blocks', '?')} blocks, {m.get('dtype', '?')}): "
                      f"held-out ID accuracy with a seed-stratified bootstrap 95% CI (seeds are sampling seeds). "
                      "Models installed by `tapioca models install` are quantised GGUF originals dequantised "
                      "to float: their scores sit below the published fp16 models'."),
                ("table", ["model", "ID accuracy [95% CI]", "per seed"], [["full", _ci(model), per_seed or "—"]])]
    model = q.get("model_id_nmse", {})
    per_seed = ", ".join(f"s{s}: {_num(v)}" for s, v in (model.get("per_seed") or {}).items())
    rows = [["transformer (full)", _ci(model), per_seed or "—"]]
    rows += [[name.replace("_", " "), _num(v), "—"] for name, v in (q.get("references_id_nmse") or {}).items()]
    return [("h", 2, "Model quality"),
            ("p", "Held-out ID query NMSE (lower is better) with a seed-stratified bootstrap 95% CI, "
                  "beside reference predictors on the same prompts."),
            ("table", ["predictor", "ID NMSE [95% CI]", "per seed"], rows)]


# ----------------------------------------------------------------------------------------------------------
# one section per claim: its verdict, evidence, and the plot and tables that decide it
# ----------------------------------------------------------------------------------------------------------


def _claim_numbers(numbers: Any, limit: int = 8) -> str:
    if not isinstance(numbers, dict):
        return "—"
    items = [(k, v) for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k} = {_num(v)}" for k, v in items[:limit]) or "—"


def claim_verdict(results: dict, cid: str) -> list[Block]:
    """A claim's held-out verdict with its evidence, the in-sample verdict, key numbers, power and the
    'what would settle it' case, as far as results.json has them."""
    c = _dig(results, "claims", cid)
    if not isinstance(c, dict):
        return [("p", "**Verdict: not assessed** — results.json has no verdict for this claim.")]
    blocks: list[Block] = [("p", f"**Held-out verdict: {c.get('verdict', '?')}.** {c.get('evidence') or ''}")]
    inner = _dig(results, "claims_in_sample", cid)
    if isinstance(inner, dict):
        blocks.append(("p", f"**In-sample verdict (the paper's protocol): {inner.get('verdict', '?')}.** "
                            f"{inner.get('evidence') or ''}"))
    numbers = _claim_numbers(c.get("numbers"))
    if numbers != "—":
        blocks.append(("p", f"Key numbers: {numbers}.", "note"))
    power = [f"minimal detectable effect at 80% power {_mde(c)}"] if c.get("mde") is not None else []
    if c.get("n_needed") is not None:
        sesoi = f" δ = {_num(c['sesoi'])}" if c.get("sesoi") is not None else ""
        power.append(f"detecting the smallest effect of interest{sesoi} needs n = {c['n_needed']} "
                     f"{c.get('unit', 'replicate')}s")
    if power:
        blocks.append(("p", f"Power: {'; '.join(power)}.", "note"))
    if c.get("settle_case"):
        blocks.append(("p", f"**What would settle it ({cid}):** {c['settle_case']}"))
    return blocks


PROTOCOL_TEXT = {"target": "Blocks selected on each distribution's own selection split, scored on held-out examples.",
                 "from-id": "Blocks selected on ID only, scored on held-out examples.",
                 IN_SAMPLE: "The paper's protocol: blocks selected and scored on the same selection examples "
                            "(optimistic: the winner's curse)."}


def protocol_table(results: dict, protocol: str, metric: str) -> list[Block]:
    """Per distribution: full, pruned, Δ [CI], p, Holm p, MDE, outcome and blocks removed per seed."""
    delta = _dig(results, "protocols", protocol, "delta") or {}
    if not any(isinstance(row.get(metric), dict) for row in delta.values()):
        return []  # a metric without comparisons (confidence: no good side; see Calibration)
    removed = results.get("removed") or {}
    power = any("mde" in (row.get(metric) or {}) for row in delta.values())
    better = "lower" if _lower_is_better(metric) else "higher"
    rows = []
    for dist, row in delta.items():
        d = row.get(metric) or {}
        by_seed = removed.get("from-id") if protocol == "from-id" else _dig(removed, "target", dist)
        rows.append([dist, _num(d.get("full")), _num(d.get("pruned")), _ci(d, signed=True), _p(d.get("p_value")),
                     _p(d.get("p_holm")), *([_mde(d)] * power), _outcome(d), _removed_text(by_seed)])
    headers = ["distribution", "full", "pruned", "Δ [95% CI]", "p", "Holm p", *(["MDE (n)"] * power), "outcome",
               "blocks removed"]
    return [("h", 3, f"Protocol `{protocol}` — {METRIC_LABELS.get(metric, metric)}"),
            ("p", f"Δ = pruned − full ({better} is better); Student-t 95% CI and p over replicates (models, or "
                  f"selection draws of one model; examples averaged within each); Holm correction across "
                  f"distributions. {PROTOCOL_TEXT.get(protocol, '')}"),
            ("table", headers, rows)]


def _img(images: dict, name: str, caption: str) -> list[Block]:
    return [("img", name, caption)] if name in images else []


def claim_c1(results: dict, images: dict) -> list[Block]:
    metric = primary(results)
    rows = []
    for protocol, data in results["protocols"].items():
        d = _dig(data, "delta", "id", metric)
        if isinstance(d, dict):
            rows.append([protocol, _num(d.get("full")), _num(d.get("pruned")), _ci(d, signed=True),
                         _p(d.get("p_holm")), _mde(d), _outcome(d)])
    return [("p", f"The `id` rows of the headline figure and of the Δ plot under C2 decide C1: held-out ID "
                  f"{METRIC_LABELS.get(metric, metric)} of the model pruned on ID, per protocol."),
            ("table", ["protocol", "full", "pruned", "Δ [95% CI]", "Holm p", "MDE (n)", "outcome"], rows)]


def claim_c2(results: dict, images: dict) -> list[Block]:
    metric = primary(results)
    name = f"scores_{metric}.png"
    blocks = _img(images, name, PLOT_TEXT.get(name, ("", name))[1])
    for protocol in results["protocols"]:
        blocks += protocol_table(results, protocol, metric)
    return blocks + section_optimism(results) + section_robust(results)


def section_optimism(results: dict) -> list[Block]:
    rows = results.get("optimism")
    if not isinstance(rows, dict) or not rows:
        return [("h", 3, "Optimism of the in-sample protocol"), ("p", f"Optimism: {NOT_COMPUTED}.")]
    table = [[dist, METRIC_LABELS.get(r.get("metric"), r.get("metric", "?")), _num(r.get("in_sample"), True),
              _num(r.get("held_out"), True), _ci(r, signed=True), _num(r.get("null_mean"), True),
              _num(r.get("null_q95"), True), _p(r.get("p_null"))] for dist, r in rows.items() if isinstance(r, dict)]
    return [("h", 3, "Optimism of the in-sample protocol"),
            ("p", "Gains are oriented so that positive = pruning looks better. Optimism = in-sample gain − held-out "
                  "gain (Student-t 95% CI over replicates). Null: TALE's whole greedy search (its rounds, ε, "
                  "max_drop and choice of depth) replayed when no block truly helps, in the metric the search "
                  "maximised (its mean and 95% quantile); p_null: the share of null searches whose in-sample gain "
                  "reaches the real one — a large p_null means selection alone explains the in-sample gain."),
            ("table", ["distribution", "metric", "in-sample gain", "held-out gain", "optimism [95% CI]",
                       "null mean", "null 95% quantile", "p_null"], table)]


def section_robust(results: dict) -> list[Block]:
    robust = results.get("robust")
    if not isinstance(robust, dict) or not robust:
        return []
    rows = []
    for dist, r in robust.items():
        dominant = ", ".join(f"s{e.get('seed')}#{e.get('index')}: {100 * e.get('share', 0):.0f}%"
                             for e in (r.get("dominant") or [])[:3] if isinstance(e, dict))
        rows.append([dist, _num(r.get("median_full")), _num(r.get("median_pruned")),
                     _ci(r.get("mean_log_ratio") or {}, signed=True), dominant or "—"])
    return [("h", 3, "Robust summary"),
            ("p", "A heavy-tailed error is summarised robustly: medians of the full and target-pruned model, the mean "
                  "log ratio log(pruned / full) per example with a paired bootstrap 95% CI (< 0: pruning lowers the "
                  "typical error), and the examples that dominate the full model's mean (seed#index: share)."),
            ("table", ["distribution", "median full", "median pruned", "mean log ratio [95% CI]",
                       "dominant examples"], rows)]


def claim_c3(results: dict, images: dict) -> list[Block]:
    return _img(images, "profiles.png", PLOT_TEXT["profiles.png"][1]) + section_geometry(results)


def claim_c4(results: dict, images: dict) -> list[Block]:
    if "realignment.png" not in images:
        return [("p", "TALE removed no block on any shift: there is no realignment to show.")]
    return _img(images, "realignment.png", PLOT_TEXT["realignment.png"][1])


def claim_c5(results: dict, images: dict) -> list[Block]:
    n = sweep_seeds(results.get("interventions") or {})
    band = (f"mean over {n} seeds with a t-based 95% interval across seeds (shaded; t on {n - 1} degree(s) of "
            "freedom, so few seeds give wide intervals)" if n >= 2 else "one seed: the points themselves, no interval")
    caption = f"OOD score and D vs α for the TALE-removed blocks and control blocks; {band}."
    blocks = _img(images, "interventions.png", caption)
    return (blocks or [("p", f"Residual-scaling sweeps: {NOT_COMPUTED}.")]) + section_interventions(results)


def claim_c6(results: dict, images: dict) -> list[Block]:
    return [("p", "C6 compares C1–C4 across model scales; a multi-scale study (`scales:` in the config) decides it "
                  "in its own report.")]


def claim_c7(results: dict, images: dict) -> list[Block]:
    blocks: list[Block] = []
    for name in ("reliability.png", "calibration.png"):
        blocks += _img(images, name, PLOT_TEXT[name][1])
    full, pruned = results["full"], _dig(results, "protocols", "target", "pruned") or {}
    rows = [[s, _num(_dig(full, s, "shrinkage_slope")), _num(_dig(pruned, s, "shrinkage_slope"))]
            for s in _shifts(results) if _dig(full, s, "shrinkage_slope") is not None]
    if rows:
        blocks += [("p", "Prediction-shrinkage slope (1 = no shrinkage) of the full and the target-pruned model."),
                   ("table", ["shift", "slope full", "slope pruned"], rows)]
    return blocks + section_calibration(results)


def claim_c8(results: dict, images: dict) -> list[Block]:
    return (_img(images, "distortion_vs_drop.png", PLOT_TEXT["distortion_vs_drop.png"][1])
            + _img(images, "attribution.png", PLOT_TEXT["attribution.png"][1]))


def claim_c9(results: dict, images: dict) -> list[Block]:
    blocks = _img(images, "methods.png", PLOT_TEXT["methods.png"][1]) + section_comparisons(results)
    return blocks or [("p", f"Pruning-method controls: {NOT_COMPUTED}.")]


CLAIM_SECTIONS = {"C1": claim_c1, "C2": claim_c2, "C3": claim_c3, "C4": claim_c4, "C5": claim_c5, "C6": claim_c6,
                  "C7": claim_c7, "C8": claim_c8, "C9": claim_c9}


def section_each_claim(results: dict, images: dict) -> list[Block]:
    blocks: list[Block] = []
    for cid, details in CLAIM_SECTIONS.items():
        blocks += [("h", 2, f"{cid} — {CLAIMS[cid]}", cid.lower()), *claim_verdict(results, cid),
                   *details(results, images)]
    if "edges" in results:
        blocks += [("h", 2, f"G1 — {GRAPH_CLAIM_TEXT['G1']}", "g1"), *claim_verdict(results, "G1"),
                   *section_edges(results, images)]
    return blocks


def section_geometry(results: dict) -> list[Block]:
    """Distortion D per shift for the full and pruned models, beside the ID-vs-ID noise floor."""
    mean = _dig(results, "geometry", "D_mean")
    if not isinstance(mean, dict):
        return [("h", 3, "Geometry"), ("p", "results.json has no geometry block.")]
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
    return [("h", 3, "Geometry"), ("p", text),
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
    return [("h", 3, "Pruning methods compared"),
            ("p", f"Held-out {METRIC_LABELS.get(metric, metric)} per shift and method; Δ = pruned − full with "
                  "95% CI and Holm-corrected p."),
            ("table", ["shift", "method", "full", "pruned", "Δ [95% CI]", "Holm p", "outcome"], rows)]


def section_calibration(results: dict) -> list[Block]:
    """ECE, Brier, mean confidence and accuracy per distribution, full -> pruned, per protocol (LM runs)."""
    calibration = results.get("calibration")
    if not isinstance(calibration, dict) or not calibration:
        return []
    rows = []
    for protocol, table in calibration.items():
        for dist, row in table.items():
            full, pruned = row["full"], row["pruned"]
            rows.append([protocol, dist, full["n"],
                         *[f"{_num(full[k])} → {_num(pruned[k])} ({_num(row[f'delta_{k}'], signed=True)})"
                           for k in ("accuracy", "confidence", "ece", "brier")]])
    return [("h", 3, "Calibration"),
            ("p", "Held-out calibration, full → pruned (Δ), seeds pooled. Confidence is the top choice's probability "
                  "(multiple choice) or the model's probability of its own greedy answer line (short answer); ECE "
                  "uses 15 equal-width bins; Brier is multi-class over choices (multiple choice) or binary on "
                  "'the answer is right' (short answer)."),
            ("table", ["protocol", "distribution", "n", "accuracy", "confidence", "ECE", "Brier"], rows)]


def section_interventions(results: dict) -> list[Block]:
    """Norm-matching summary (seed means) when ``interventions`` is present. Testbed and graph runs match
    norms per position (node); LM runs at each prompt's last token, since prompts differ in length."""
    interventions = results.get("interventions")
    if not isinstance(interventions, dict) or not interventions:
        return []
    columns = {"ood_full": "OOD full", "ood_matched": "OOD norm-matched", "ood_pruned": "OOD pruned",
               "id_full": "ID full", "id_pushed": "ID pushed"}
    rows, skipped = [], []
    for shift, data in interventions.items():
        by_seed = _dig(data, "norm_matching")
        if not isinstance(by_seed, dict) or not by_seed:
            continue
        seeds = [v for v in by_seed.values() if isinstance(v, dict)]
        skipped += [f"{shift} ({v['skipped']})" for v in seeds[:1] if v.get("skipped")]
        vals = [[v[k] for v in seeds if v.get(k) is not None] for k in columns]
        rows.append([shift, *[_num(float(np.mean(v))) if v else "—" for v in vals]])
    where = ("at each prompt's last token (prompts differ in length)" if results.get("kind") == "lm"
             else "per position")
    text = ("Residual scaling of the removed blocks (α from 1 to 0) against control blocks is plotted above. "
            f"Norm matching without pruning, {where} (scores higher is better; mean over seeds): OOD states at "
            "TALE's blocks rescaled to ID norms, and the control that pushes ID states to OOD norms.")
    if skipped:
        text += " Not matched: " + "; ".join(skipped) + "."
    blocks: list[Block] = [("h", 3, "Interventions"), ("p", text)]
    if rows:
        blocks.append(("table", ["shift", *columns.values()], rows))
    return blocks


def section_detail(results: dict, images: dict, placed: set[str]) -> list[Block]:
    """Model quality, the protocols' tables for the other metrics, and any plot not shown with a claim."""
    blocks = section_quality(results)
    others = [m for m in _metrics(results) if m != primary(results)]
    if others:
        blocks.append(("h", 2, "Other metrics"))
    for metric in others:
        name = f"scores_{metric}.png"
        blocks += _img(images, name, PLOT_TEXT.get(name, ("", name))[1])
        placed.add(name)
        for protocol in results["protocols"]:
            blocks += protocol_table(results, protocol, metric)
    rest = [n for n in images if n not in placed]
    if rest:
        blocks.append(("h", 2, "Other plots"))
        for name in rest:
            title, caption = PLOT_TEXT.get(name, (name, name))
            blocks += [("h", 3, title), ("img", name, caption)]
    return blocks


# ----------------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------------


PLOT_TEXT = {  # file -> (title, caption)
    "headline.png": ("Headline", "Δ of the primary metric per distribution, held-out and in-sample."),
    "scores_nmse.png": ("Held-out NMSE", "NMSE per distribution (log scale, 95% CI), full vs pruned, and Δ "
                        "as % of the full model's NMSE, one column per protocol (held-out except `in-sample`)."),
    "scores_tol_acc.png": ("Held-out tolerance accuracy", "Tolerance accuracy per distribution (95% CI), full vs "
                           "pruned, and Δ in percentage points, one column per protocol."),
    "scores_acc.png": ("Held-out accuracy", "Accuracy per distribution (95% CI), full vs pruned, and Δ in "
                       "percentage points, one column per protocol (held-out except `in-sample`)."),
    "methods.png": ("Pruning methods", "Δ held-out score by pruning method and shift (95% CI)."),
    "profiles.png": ("Layer-wise profiles", "Norm and pairwise-distance profiles at the query position (mean over "
                     "seeds): ID full, OOD full, OOD after target-protocol pruning."),
    "realignment.png": ("Realignment", "Distortion D of each shift before and after target-protocol pruning, one "
                        "line per seed where TALE removed blocks (blue: D fell, red: D rose); dashed: ID-vs-ID "
                        "noise floor."),
    "distortion_vs_drop.png": ("Distortion vs OOD drop", "Distortion D of each shift (full model) against the full "
                               "model's OOD drop; dashed line: ID-vs-ID noise floor."),
    "interventions.png": ("Residual-scaling sweep", "OOD score and D vs α for the TALE-removed blocks and control "
                          "blocks."),
    "reliability.png": ("Reliability / shrinkage", "Binned mean prediction vs binned target, 15 quantile bins (full "
                        "model, seeds pooled), with y = x and the shrinkage slope."),
    "calibration.png": ("Calibration", "Reliability diagrams (accuracy vs confidence, 15 equal-width bins) per "
                        "distribution, full model vs target-protocol pruned model, with each one's ECE."),
    "edges.png": ("Edge pruning", "Held-out accuracy of ERM, PrunE and edge controls, and edge retention."),
    "attribution.png": ("Distortion attribution", "Per-block distortion attribution a_l (shifts × blocks, full "
                        "model, mean over seeds)."),
}


def build_report(run_dir: str | Path) -> tuple[list[Block], dict[str, bytes]]:
    """The report's blocks and PNG bytes by file name, from the run directory alone."""
    run_dir = Path(run_dir)
    multi = _optional_json(run_dir / "results.json")
    if isinstance(multi, dict) and is_multi_scale(multi):
        blocks, figures = build_scales_report(multi)
        return blocks, {name: _png(fig) for name, fig in figures.items() if fig is not None}
    results = load_results(run_dir)
    figures = {"headline.png": plot_headline(results),
               **make_plots(results, load_profiles(run_dir), load_full_evaluation(run_dir)),
               "edges.png": edges_plot(results)}
    images = {name: _png(fig) for name, fig in figures.items() if fig is not None}
    lead = section_title(results) + section_lead(results, images)
    claims = section_each_claim(results, images)
    placed = {b[1] for b in lead + claims if b[0] == "img"}
    blocks = (lead + claims + section_detail(results, images, placed)
              + section_setup(results, _optional_yaml(run_dir / "config.yaml"),
                              _optional_json(run_dir / "environment.json"), _optional_json(run_dir / "timings.json")))
    return blocks, images


def write_report(run_dir: str | Path) -> Path:
    """Write PNG plots, ``report.md`` and a self-contained ``report.html`` into ``run_dir/report/``.

    Returns the report folder. Raises CheckpointError when ``results.json`` is missing or corrupt.
    """
    run_dir = Path(run_dir)
    multi = _optional_json(run_dir / "results.json")
    if isinstance(multi, dict) and is_multi_scale(multi):
        for scale in multi["scales"].values():  # each scale's own report first, so the links resolve
            write_report(run_dir / scale["run_dir"])
    blocks, images = build_report(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name in [*PLOT_TEXT, *SCALES_PLOTS]:
        if name not in images:
            (out / name).unlink(missing_ok=True)  # a plot from an earlier report whose data is gone
    for name, data in images.items():
        atomic_write_bytes(out / name, data)
    atomic_write_bytes(out / "report.md", render_markdown(blocks).encode("utf-8"))
    atomic_write_bytes(out / "report.html", render_html(blocks, images).encode("utf-8"))
    return out
