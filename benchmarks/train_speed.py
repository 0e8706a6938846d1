"""Training speed of the testbed recipes: steps/s and the projected wall time of each config's full training.

    python benchmarks/train_speed.py                                   # default and paper-scale, CPU, fp32
    python benchmarks/train_speed.py --device cuda --precision fp32 tf32 bf16 --compile
    python benchmarks/train_speed.py --config configs/paper-scale.yaml --batch-size 64 256

Each row times ``--steps`` optimiser steps (after ``--warmup`` untimed ones) of ``tapioca.models.training``'s own
step function at the end of the curriculum (full-length prompts, every degree), so the figures hold for the
bulk of a long training. Nothing is written.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from tapioca.config import load_config, replace
from tapioca.models.icl import ICLModel
from tapioca.models.training import _train_step, matmul_precision

DEFAULT_CONFIGS = ("configs/default.yaml", "configs/paper-scale.yaml")


def steps_per_second(cfg, device: str, steps: int, warmup: int) -> float:
    """Optimiser steps per second of ``cfg``'s model and recipe on ``device`` (late in the curriculum)."""
    torch.manual_seed(0)
    model = ICLModel(cfg.model).to(device).train()
    forward = torch.compile(model) if cfg.train.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    late = max(cfg.train.curriculum_degree_steps, cfg.train.curriculum_interval * 100)  # past the curriculum
    with matmul_precision(cfg.train.precision):
        for step in range(warmup):
            _train_step(forward, opt, cfg, 0, late + step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(steps):
            _train_step(forward, opt, cfg, 0, late + warmup + step)  # .item() in the step synchronises
        return steps / (time.perf_counter() - start)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also time each row with train.compile=true")
    parser.add_argument("--batch-size", nargs="+", type=int, default=None, help="override train.batch_size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.steps} timed steps per row")
    print(f"{'config':<38} {'blocks×width':>12} {'batch':>6} {'precision':>9} {'compile':>7} {'steps/s':>8} "
          f"{'full training':>14}")
    for path, precision, compiled in itertools.product(args.config, args.precision,
                                                       (False, True) if args.compile else (False,)):
        base = load_config(path)
        for batch in args.batch_size or [base.train.batch_size]:
            cfg = replace(base, f"train.precision={precision}", f"train.compile={str(compiled).lower()}",
                          f"train.batch_size={batch}")
            rate = steps_per_second(cfg, args.device, args.steps, args.warmup)
            size = f"{cfg.model.n_layer}×{cfg.model.n_embd}"
            print(f"{path:<38} {size:>12} {batch:>6} {precision:>9} {str(compiled):>7} {rate:>8.2f} "
                  f"{_hours(cfg.train.steps / rate):>14}  ({cfg.train.steps:,} steps)")


if __name__ == "__main__":
    main()
