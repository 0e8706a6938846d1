"""A study's report: PNG plots, ``report.md`` and a self-contained ``report.html``.

Reads only the run directory (``results.json``, ``config.yaml``, ``environment.json``, ``timings.json``,
``geometry/seed*.json`` and ``evaluation/seed*/full.npz``); never loads or runs a model. Optional blocks of
``results.json`` (``comparisons``, ``interventions``, ``claims``) are rendered when present.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from tapioca.config import NOT_FOR_LM
from tapioca.errors import CheckpointError
from tapioca.analysis.evaluation import Evaluation
from tapioca.io import atomic_write_bytes
from tapioca.study.scales import is_multi_scale
from tapioca.report.scales_report import build_scales_report
from tapioca.report.plots import (METHOD_ORDER, METRIC_LABELS, _ci, _dig, _lower_is_better, _main_metric, _metrics, _num,
                           _outcome, _p, _png, _removed_text, _shifts, _spearman, distortion_drop, make_plots)

__all__ = ["write_report", "build_report", "load_results"]

REQUIRED_KEYS = ("quality", "full", "protocols")
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
            if not any(isinstance(row.get(metric), dict) for row in delta.values()):
                continue  # a metric without comparisons (confidence: no good side; see Calibration)
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
    return [("h", 2, "Calibration"),
            ("p", "Held-out calibration, full → pruned (Δ), seeds pooled. Confidence is the top choice's probability "
                  "(multiple choice) or the model's probability of its own greedy answer line (short answer); ECE "
                  "uses 15 equal-width bins; Brier is multi-class over choices (multiple choice) or binary on "
                  "'the answer is right' (short answer)."),
            ("table", ["protocol", "distribution", "n", "accuracy", "confidence", "ECE", "Brier"], rows)]


def section_interventions(results: dict) -> list[Block]:
    """Norm-matching summary (seed means) when ``interventions`` is present; LM runs have no norm matching,
    so their table holds the sweep's ends (α = 1 and α = 0) only."""
    interventions = results.get("interventions")
    if not isinstance(interventions, dict) or not interventions:
        return []
    lm = results.get("kind") == "lm"
    columns = {"ood_full": "OOD full", "ood_matched": "OOD norm-matched", "ood_pruned": "OOD pruned",
               "id_full": "ID full", "id_pushed": "ID pushed"}
    if lm:
        columns = {k: columns[k] for k in ("ood_full", "ood_pruned")}
    rows = []
    for shift, data in interventions.items():
        by_seed = _dig(data, "norm_matching")
        if not isinstance(by_seed, dict) or not by_seed:
            continue
        vals = [[v.get(k) for v in by_seed.values() if isinstance(v, dict) and v.get(k) is not None] for k in columns]
        rows.append([shift, *[_num(float(np.mean(v))) if v else "—" for v in vals]])
    text = "Residual scaling of the removed blocks (α from 1 to 0) against control blocks is plotted below. "
    text += ("Norm matching is not run on text (prompts differ in length). The table gives the OOD score of the "
             "sweep at α = 1 (full) and α = 0 (TALE's blocks removed) on the intervention prompts, mean over seeds."
             if lm else
             "Norm matching without pruning (scores are mean −NMSE, higher is better; mean over seeds): OOD states "
             "rescaled to ID norms, and the control that pushes ID states to OOD norms.")
    blocks: list[Block] = [("h", 2, "Interventions"), ("p", text)]
    if rows:
        blocks.append(("table", ["shift", *columns.values()], rows))
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
    "calibration.png": ("Calibration", "Reliability diagrams (accuracy vs confidence, 15 equal-width bins) per "
                        "distribution, full model vs target-protocol pruned model, with each one's ECE."),
    "attribution.png": ("Distortion attribution", "Per-block distortion attribution a_l (shifts × blocks, full "
                        "model, mean over seeds)."),
}


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
    multi = _optional_json(run_dir / "results.json")
    if isinstance(multi, dict) and is_multi_scale(multi):
        blocks, figures = build_scales_report(multi)
        return blocks, {name: _png(fig) for name, fig in figures.items()}
    results = load_results(run_dir)
    figures = make_plots(results, load_profiles(run_dir), load_full_evaluation(run_dir))
    images = {name: _png(fig) for name, fig in figures.items()}
    blocks = (section_header(results, _optional_yaml(run_dir / "config.yaml"),
                             _optional_json(run_dir / "environment.json"), _optional_json(run_dir / "timings.json"))
              + section_quality(results) + section_claims(results) + section_protocols(results)
              + section_comparisons(results) + section_calibration(results) + section_geometry(results)
              + section_interventions(results)
              + section_plots(images))
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
    for name in [*PLOT_TEXT, "scales.png"]:
        if name not in images:
            (out / name).unlink(missing_ok=True)  # a plot from an earlier report whose data is gone
    for name, data in images.items():
        atomic_write_bytes(out / name, data)
    atomic_write_bytes(out / "report.md", render_markdown(blocks).encode("utf-8"))
    atomic_write_bytes(out / "report.html", render_html(blocks, images).encode("utf-8"))
    return out
