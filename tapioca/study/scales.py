"""Multi-scale studies: the same study at several model sizes, one verdict table per scale, and C6.

A config with a ``scales`` section (e.g. ``configs/scales.yaml``) runs one complete single-scale study per
scale into ``<out>/scales/<name>/`` (each resumable and with its own report), then writes a small
``<out>/results.json`` that gathers every scale's model quality, OOD deltas and C1–C9 verdicts, finds the
depth and training-length ladders among the scales (:mod:`tapioca.report.ladders`) and decides C6 ("consistent
across model scales") over the depth ladder (over every scale when there is none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from tapioca.report.claims import attribution_overlap, bonferroni_verdicts, c6_scales, primary_metric, rules_of
from tapioca.config import Config, scale_config
from tapioca.errors import ConfigError
from tapioca.io import write_json
from tapioca.models.training import trained_model_folder, training_record
from tapioca.report.ladders import ladders
from tapioca.study.rundir import finished_results, prepare_run_dir

Log = Callable[[str], None]


def scale_summary(cfg: Config, results: dict, out: Path | None = None) -> dict:
    """What the multi-scale report needs from one scale's results.json (``out``: that scale's run directory):
    size, quality, TALE's Δ per distribution (main metric, target protocol) held out and in-sample, the claims
    under both protocols, the attribution overlap and (testbed) :func:`training_summary`."""
    metric = primary_metric(results)
    protocols = results["protocols"]
    lm = cfg.lm is not None
    summary = {
        "kind": "lm" if lm else "testbed",
        "model": cfg.lm.model if lm else None,
        "n_blocks": results.get("n_blocks", cfg.model.n_layer),
        "n_embd": None if lm else cfg.model.n_embd,
        "train_steps": None if lm else cfg.train.steps,
        "seeds": list(cfg.evaluation.seeds),
        "quality": results["quality"],
        "metric": metric,
        "target_delta": {d: row[metric] for d, row in protocols["target"]["delta"].items()},
        "in_sample_delta": {d: row[metric] for d, row in protocols.get("in-sample", {}).get("delta", {}).items()},
        "removed": results["removed"]["target"],
        "claims": results["claims"],
        "claims_in_sample": results.get("claims_in_sample", {}),
        "timings_seconds": results.get("timings_seconds", {}),
    }
    if "attribution_full" in results.get("geometry", {}):
        summary["attribution_overlap"] = attribution_overlap(results)
    if not lm and cfg.graph is None and out is not None:
        summary.update(training_summary(cfg, out))
    return summary


def training_summary(cfg: Config, out: Path) -> dict:
    """A testbed scale's ``training``: each seed's training record (None where it has none); for a scale trained
    with ``train.stop_when_flat`` also ``until_flat`` and ``train_steps``, the most steps a seed ran (not the cap)."""
    folders = {seed: trained_model_folder(cfg, seed, out) for seed in cfg.evaluation.seeds}
    training = {str(seed): training_record(f) if f is not None else None for seed, f in folders.items()}
    if not cfg.train.stop_when_flat:
        return {"training": training}
    ran = [r["steps_done"] for r in training.values() if r and r.get("steps_done")]
    return {"training": training, "until_flat": True, "train_steps": max(ran, default=cfg.train.steps)}


def run_scales(cfg: Config, out: Path, progress: bool, log: Log, run_study: Callable[..., dict],
               only: Sequence[str] | None = None) -> dict:
    """Run the single-scale study of every scale of ``cfg`` with ``run_study`` (each into
    ``out/scales/<name>``), then write and return the multi-scale ``results.json``:
    ``{"scales": {name: summary}, "claims": {"C6": ...}}``. ``only``: run just these scales; each other scale
    joins the results if its study finished earlier with the same config, and is left out otherwise."""
    unknown = [name for name in only or () if name not in cfg.scales]
    if unknown:
        raise ConfigError(f"unknown scale {unknown[0]!r} in --scales; allowed: {', '.join(cfg.scales)}")
    prepare_run_dir(cfg, out)
    summaries, full_results = {}, {}
    for name in cfg.scales:
        sub = scale_config(cfg, name)
        folder = out / "scales" / name
        if only is not None and name not in only:
            results = finished_results(sub, folder)
            log(f"scale {name}: " + ("finished earlier, taken from its run directory" if results is not None
                                     else "not in --scales and not finished earlier: left out"))
            if results is None:
                continue
        else:
            what = (f"model {sub.lm.model}" if sub.lm is not None
                    else f"{sub.model.n_layer} blocks, width {sub.model.n_embd}")
            log(f"scale {name}: {what} -> {folder}")
            results = run_study(sub, folder, progress, log)
        summaries[name] = {"run_dir": f"scales/{name}", **scale_summary(sub, results, folder)}
        full_results[name] = results
    kind = "lm" if cfg.lm is not None else "testbed"
    found = ladders(summaries)
    compared = {n: summaries[n] for n in found["depth"]} if "depth" in found else summaries
    for name in compared:  # C6 refutes only at α / (scales compared): each scale's C1–C4 re-decided there
        compared[name]["claims_bonferroni"] = bonferroni_verdicts(full_results[name], len(compared))
    results = {"kind": kind, "scales": summaries, "ladders": found,
               "claims": {"C6": c6_scales({"kind": kind, "scales": compared, "rules": rules_of(cfg.evaluation)})}}
    write_json(out / "results.json", results)
    return results
