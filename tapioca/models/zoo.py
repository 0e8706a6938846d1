"""Shipping a trained checkpoint into ``tapioca/zoo``: the files a study needs, optionally with the weights
stored in half precision to keep the repository small.

    python -m tapioca.models.zoo runs/train/seed0 tapioca/zoo/testbed-L16-D64-seed0 --dtype float16

Copies ``model.json`` (training fingerprint, curve and wall time kept, ``stored_dtype`` and a new sha256
recorded), ``config.yaml``, ``environment.json`` and ``train_result.json`` when present, and writes the weights
(safetensors) in ``dtype``. Loading converts them back to float32 (``load_state_dict`` copies into the model's
own float32 parameters), so a shipped fp16 checkpoint is the trained model rounded to fp16 once.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tapioca.errors import CheckpointError
from tapioca.io import write_json
from tapioca.models.icl import META_FILE, WEIGHTS_FILE, read_meta, sha256_of, verify_weights

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COPIED = ("config.yaml", "environment.json", "train_result.json")


def ship(src: str | Path, dst: str | Path, dtype: str = "float16", fmt: str = "tapioca-icl") -> Path:
    """Write checkpoint folder ``src`` (format ``fmt``) into ``dst`` with floating weights stored as ``dtype``."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: allowed {sorted(DTYPES)}")
    src, dst = Path(src), Path(dst)
    meta = read_meta(src, fmt)
    verify_weights(src, meta)
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{str(dst)!r} is the source folder; ship into a new folder")
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in load_file(str(src / WEIGHTS_FILE)).items()}
    save_file(state, str(dst / WEIGHTS_FILE))
    write_json(dst / META_FILE, {**meta, "stored_dtype": dtype, "sha256": sha256_of(dst / WEIGHTS_FILE)})
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Ship a trained checkpoint folder (e.g. into tapioca/zoo).")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--format", default="tapioca-icl", choices=["tapioca-icl", "tapioca-gnn"])
    args = parser.parse_args(argv)
    out = ship(args.src, args.dst, args.dtype, args.format)
    print(f"shipped {args.src} -> {out} ({args.dtype}, {sum(f.stat().st_size for f in out.iterdir()) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
