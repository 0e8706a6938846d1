"""Multi-scale studies: the same study at several model sizes, one verdict table per scale, and C6.

A config with a ``scales`` section (e.g. ``configs/scales.yaml``) runs one complete single-scale study per
scale into ``<out>/scales/<name>/`` (each resumable and with its own report), then writes a small
``<out>/results.json`` that gathers every scale's model quality, OOD deltas and C1–C9 verdicts and decides
C6 ("consistent across model scales") from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tapioca.report.claims import c6_scales, primary_metric
from tapioca.config import Config, scale_config
from tapioca.io import write_json
from tapioca.study.rundir import prepare_run_dir

Log = Callable[[str], None]


def scale_summary(cfg: Config, results: dict) -> dict:
    """What the multi-scale report needs from one scale's results.json: size, quality, TALE's held-out
    Δ per distribution (main metric, target protocol) and the claims."""
    metric = primary_metric(results)
    deltas = results["protocols"]["target"]["delta"]
    lm = cfg.lm is not None
    return {
        "kind": "lm" if lm else "testbed",
        "model": cfg.lm.model if lm else None,
        "n_blocks": results.get("n_blocks", cfg.model.n_layer),
        "n_embd": None if lm else cfg.model.n_embd,
        "train_steps": None if lm else cfg.train.steps,
        "seeds": list(cfg.evaluation.seeds),
        "quality": results["quality"],
        "metric": metric,
        "target_delta": {d: row[metric] for d, row in deltas.items()},
        "removed": results["removed"]["target"],
        "claims": results["claims"],
        "timings_seconds": results.get("timings_seconds", {}),
    }


def run_scales(cfg: Config, out: Path, progress: bool, log: Log, run_study: Callable[..., dict]) -> dict:
    """Run the single-scale study of every scale of ``cfg`` with ``run_study`` (each into
    ``out/scales/<name>``), then write and return the multi-scale ``results.json``:
    ``{"scales": {name: summary}, "claims": {"C6": ...}}``."""
    prepare_run_dir(cfg, out)
    summaries = {}
    for name in cfg.scales:
        sub = scale_config(cfg, name)
        what = f"model {sub.lm.model}" if sub.lm is not None else f"{sub.model.n_layer} blocks, width {sub.model.n_embd}"
        log(f"scale {name}: {what} -> {out / 'scales' / name}")
        summaries[name] = {"run_dir": f"scales/{name}", **scale_summary(sub, run_study(sub, out / "scales" / name,
                                                                                  progress, log))}
    kind = "lm" if cfg.lm is not None else "testbed"
    results = {"kind": kind, "scales": summaries, "claims": {"C6": c6_scales({"kind": kind, "scales": summaries})}}
    write_json(out / "results.json", results)
    return results
