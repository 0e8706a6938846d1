"""Command line: ``tapioca train|prune|evaluate|study|report|stability|check|transfer``. A thin layer over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from tapioca.api import evaluate, load_task, prune, resolve_device, save_pruned
from tapioca.config import Config, load_config, to_dict
from tapioca.errors import CheckpointError, ConfigError, TapiocaError
from tapioca.analysis.evaluation import Evaluation, compare, example_view
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.io import environment, read_json, write_json, write_yaml
from tapioca.models.icl import load_model
from tapioca.models.install import add_models_command, main_models
from tapioca.perf import keep_freed_memory
from tapioca.pruning.searches import PruneResult
from tapioca.report.report import write_report
from tapioca.models.training import train
from tapioca.tasks.base import Workload


def _common(parser: argparse.ArgumentParser, out_default: str = "run.out") -> None:
    parser.add_argument("--config", help="YAML config file (default: the built-in testbed study)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=2000 (repeatable)")
    parser.add_argument("--out", help=f"run directory (default: {out_default})")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: run.device)")
    parser.add_argument("--seed", type=int, help="seed (default: run.seed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapioca", description="Task-aware layer pruning under distribution shift.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "train": "train a testbed model on the ID sampler (resumes from --out)",
        "prune": "search which blocks to remove (pruning.search, pruning.protocol, pruning.target)",
        "evaluate": "score a model, full and pruned, on ID and every shift with bootstrap CIs",
        "study": "train/load -> prune (both protocols, every target) -> evaluate -> profile -> intervene -> report",
        "report": "rebuild report.md, report.html and the plots of a finished run directory",
        "stability": "how many selection examples a stable TALE selection needs: resampled searches per size",
        "check": "is a pruned model not worse where it matters? ID, OOD and calibration tests against its base",
        "transfer": "prune for each task, score every pruned model on every task's ID and shifts: the transfer matrix",
    }
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "report":
            p.add_argument("run_dir", help="a run directory written by `tapioca study` or `tapioca transfer`")
            p.add_argument("--quiet", action="store_true", help="no messages")
            p.add_argument("--debug", action="store_true", help="show full tracebacks")
            continue
        _common(p, "runs/check" if name == "check" else "run.out")
        if name == "transfer":
            p.description = (help_text + "; with no --config the built-in testbed default (configs/transfer.yaml: "
                             "polynomials and sinusoids over one mixture-trained model per seed)")
        if name in ("prune", "evaluate"):
            p.add_argument("--model", help="model folder (default: model.checkpoint; with an lm: section, lm.model)")
        if name == "prune":
            p.add_argument("--workers", type=int, metavar="N",
                           help="score TALE candidates on N Ray workers (default: pruning.workers; 0 = serial)")
            p.add_argument("--ray-address", metavar="ADDR",
                           help='join a Ray cluster: "auto" or "ray://host:port" (default: pruning.ray_address; '
                                "none = start local Ray)")
            p.add_argument("--save", metavar="DIR",
                           help="also write the pruned model to DIR: a Hugging Face folder (save_pretrained, "
                                "tokenizer, tapioca_pruning.json) for a language model, a testbed model folder "
                                "otherwise")
        if name == "study":
            p.add_argument("--scales", metavar="NAME,NAME,...",
                           help="with a scales: config, run only these scales; the others join the ladder report "
                                "if they finished earlier (default: every scale)")
        if name == "evaluate":
            p.add_argument("--pruning", help="pruning.json whose blocks to remove for the pruned model")
        if name == "check":
            p.add_argument("--base", required=True, metavar="DIR", help="the original model (Hugging Face folder)")
            p.add_argument("--pruned", required=True, metavar="DIR",
                           help="the pruned model (Hugging Face folder; pruned by tapioca or any other tool)")
        if name == "stability":
            p.add_argument("--sizes", metavar="N,N,...",
                           help="selection sizes, comma-separated, each >= 8 (default: 16,32,64,128,256)")
            p.add_argument("--repeats", type=int, default=5, metavar="R", help="resamples per size (default: 5)")
            p.add_argument("--dists", metavar="D,D,...",
                           help="distributions (default: testbed id,x_scale_2,degree_4; language model all)")
    add_models_command(sub)
    return parser


FLAG_KEYS = (("out", "run.out"), ("device", "run.device"), ("seed", "run.seed"), ("workers", "pruning.workers"),
             ("ray_address", "pruning.ray_address"), ("base", "lm.model"))  # command-line flag -> the config key it overrides


def resolve_config(args: argparse.Namespace) -> Config:
    """The config from --config and --set, with --out/--device/--seed (and prune's --workers/--ray-address)
    applied as run.* (pruning.*) overrides, after the --set ones."""
    overrides = list(args.overrides)
    for flag, key in FLAG_KEYS:
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")  # JSON is YAML: "10.0.0.1:6379" stays a string
    cfg = load_config(args.config, overrides)
    resolve_device(cfg.run.device)
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    return cfg


def _workload(args: argparse.Namespace, cfg: Config) -> Workload:
    """The model of ``--model`` (or the config's) bound to the config's task: the testbed model with the
    polynomial task, or (config with an ``lm`` section) the causal LM with its text task."""
    device = resolve_device(cfg.run.device)
    if cfg.lm is not None:
        from tapioca.tasks.text_workload import TextWorkload, load_lm, load_text_task

        lmc = dataclasses.replace(cfg.lm, model=args.model) if args.model else cfg.lm
        return TextWorkload.from_config(cfg, load_lm(lmc, str(device)), load_text_task(lmc))
    from tapioca.tasks.testbed import TestbedWorkload

    path = args.model or (cfg.model.checkpoint.format(seed=cfg.run.seed) if cfg.model.checkpoint else None)
    if path is None:
        raise CheckpointError("no model given: pass --model PATH (a folder made by `tapioca train`) "
                              "or set model.checkpoint (or an lm: section for a language model)")
    return TestbedWorkload.from_config(cfg, load_model(path, device), load_task(cfg), name=str(path))


def _start(cfg: Config) -> Path:
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", to_dict(cfg))
    write_json(out / "environment.json", environment())
    return out


def cmd_train(args: argparse.Namespace, cfg: Config, say: Callable[[str], None]) -> None:
    out = _start(cfg)
    start = time.perf_counter()
    model = train(cfg, out, progress=not args.quiet)
    ev = evaluate(model, load_task(cfg), None, ["id"], cfg.evaluation.seeds, cfg.evaluation.n_heldout)
    nmse = ev.mean("id", "nmse")
    write_json(out / "train_result.json", {"id_query_nmse": nmse, "seconds_this_call": time.perf_counter() - start})
    say(f"trained {out}: ID query NMSE {nmse:.4f}")


def cmd_prune(args: argparse.Namespace, cfg: Config, say: Callable[[str], None]) -> None:
    p = cfg.pruning
    if p.workers and p.search != "tale":
        raise ConfigError(f"pruning.workers: {p.workers} applies only to pruning.search=tale (its candidate "
                          f"rounds); {p.search!r} runs in-process: use --workers 0")
    if args.save and Path(args.save).resolve() == Path(cfg.run.out).resolve():
        raise ConfigError(f"--save: {args.save!r} is the run directory (--out); give the pruned model its own folder")
    wl = _workload(args, cfg)
    out = _start(cfg)
    result = prune(wl, None, p.search, p.protocol, p.target, cfg=p, seed=cfg.run.seed,
                   progress=not args.quiet, cache_path=out / ".pruning.scores.json")
    write_json(out / "pruning.json", result.to_dict())
    say(f"{p.search} ({p.protocol}, selected on {result.info['selected_on']}): removed {result.removed}; "
        f"selection score {result.baseline_score:.4f} -> {result.selection_score:.4f}")
    if args.save:
        folder = save_pruned(wl.model, result, args.save, {"config": args.config})
        say(f"pruned model ({wl.model.n_blocks - len(result.removed)} of {wl.model.n_blocks} blocks): {folder}")


def cmd_evaluate(args: argparse.Namespace, cfg: Config, say: Callable[[str], None]) -> None:
    wl = _workload(args, cfg)
    out = _start(cfg)
    ev, metric = cfg.evaluation, wl.primary_metric
    pruning = PruneResult.from_dict(read_json(args.pruning)) if args.pruning else None
    full_parts, pruned_parts = [], []
    for seed in ev.seeds:
        runs = HeldoutRuns(wl, seed, wl.sizes.n_heldout)
        for dist in wl.distributions:
            full_parts.append(runs.one([], dist))
            if pruning is not None:
                pruned_parts.append(runs.one(pruning.removed, dist))
    full = Evaluation.concat(full_parts)
    result = {"kind": wl.kind, "primary_metric": metric,
              "full": full.summary(ev.n_bootstrap, ev.confidence, shrinkage=wl.regression)}
    if pruning is not None:
        pruned = Evaluation.concat(pruned_parts)
        result.update(removed=pruning.removed, pruned=pruned.summary(ev.n_bootstrap, ev.confidence, shrinkage=wl.regression),
                      # one given model and pruning: examples are the unit (as in tapioca check)
                      delta=example_view(compare(full, pruned, None, ev.n_bootstrap, ev.confidence, wl.metrics),
                                         wl.metrics, ev.confidence))
    write_json(out / "evaluation.json", result)
    for dist, row in result["full"].items():
        m = row[metric]
        line = f"{dist:>14}: {metric} {m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}]"
        if "delta" in result:
            d = result["delta"][dist][metric]
            line += f"  pruned Δ {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] p_holm={d['p_holm']:.3g}"
        say(line)


def cmd_study(args: argparse.Namespace, cfg: Config, say: Callable[[str], None]) -> None:
    from tapioca.study.steps import run_study
    from tapioca.report.summary import format_summary

    scales = [name.strip() for name in args.scales.split(",") if name.strip()] if args.scales else None
    results = run_study(cfg, cfg.run.out, progress=not args.quiet, log=say, scales=scales)
    say(format_summary(results))
    say(f"results: {Path(cfg.run.out) / 'results.json'}")
    say(f"report: {write_report(cfg.run.out) / 'report.html'}")


def cmd_stability(args: argparse.Namespace, cfg: Config, say: Callable[[str], None]) -> None:
    from tapioca.study.stability import parse_sizes, run_stability

    sizes = parse_sizes(args.sizes) if args.sizes is not None else None
    dists = [d.strip() for d in args.dists.split(",") if d.strip()] if args.dists else None
    out = Path(cfg.run.out)
    results = run_stability(cfg, out, sizes, args.repeats, dists, progress=not args.quiet, log=say)
    say(results["answer"])
    say(f"results: {out / 'stability.json'}, {out / 'stability.md'}, {out / 'stability.png'}")


def cmd_check(args: argparse.Namespace, cfg: Config, say: Callable[[str], None]) -> None:
    from tapioca.study.check import run_check, verdict_lines

    out = Path(args.out or "runs/check")
    data = run_check(cfg, args.base, args.pruned, out, progress=not args.quiet, log=say)
    for line in verdict_lines(data):
        say(line)
    say(f"results: {out / 'check.json'}; report: {out / 'report.html'}")


def cmd_transfer(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """``tapioca transfer``: its own config resolution, since no --config means the built-in transfer default."""
    from tapioca.report.transfer_report import matrix_lines
    from tapioca.study.transfer import load_transfer_config, run_transfer

    overrides = list(args.overrides)
    for flag, key in FLAG_KEYS:
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    cfg = load_transfer_config(args.config, overrides)
    resolve_device(cfg.run.device)
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    out = Path(cfg.run.out)
    results = run_transfer(cfg, out, progress=not args.quiet, log=say)
    for line in matrix_lines(results):
        say(line)
    say(results["summary"]["answer"])
    say(f"results: {out / 'transfer.json'}; report: {out / 'report' / 'report.html'}")


def cmd_report(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    """Rebuild the report of a study run directory, or of a transfer one (it holds transfer.json)."""
    if (Path(args.run_dir) / "transfer.json").is_file() and not (Path(args.run_dir) / "results.json").is_file():
        from tapioca.report.transfer_report import write_transfer_report

        say(f"report: {write_transfer_report(args.run_dir) / 'report.html'}")
        return
    say(f"report: {write_report(args.run_dir) / 'report.html'}")


COMMANDS = {"train": cmd_train, "prune": cmd_prune, "evaluate": cmd_evaluate, "study": cmd_study,
            "stability": cmd_stability, "check": cmd_check}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # fewer page faults in batched passes (tapioca.perf)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    try:
        if args.command == "report":
            cmd_report(args, say)
        elif args.command == "transfer":
            cmd_transfer(args, say)
        elif args.command == "models":
            main_models(args)
        else:
            COMMANDS[args.command](args, resolve_config(args), say)
    except (TapiocaError, ConfigError) as err:
        if args.debug:
            raise
        print(f"tapioca {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tapioca {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
