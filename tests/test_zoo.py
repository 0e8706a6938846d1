"""Shipping checkpoints into the zoo: half-precision weights load back as the rounded trained model, keep the
training fingerprint and curve, and bad input is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tapioca.config import Config, load_config
from tapioca.errors import CheckpointError
from tapioca.models.icl import load_model, read_meta
from tapioca.models.training import find_pretrained, train, training_record
from tapioca.models.zoo import main, ship
from tapioca.tasks.polyreg import PolyRegTask

TINY = ["model.n_layer=2", "model.n_embd=16", "train.steps=6", "train.warmup_steps=1", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Config, Path]:
    cfg = load_config(None, TINY)
    out = tmp_path_factory.mktemp("trained")
    train(cfg, out, progress=False)
    return cfg, out


def test_fp16_ship_is_the_rounded_model_and_is_found_by_its_fingerprint(tmp_path: Path, trained) -> None:
    cfg, src = trained
    zoo = tmp_path / "zoo"
    dst = ship(src, zoo / "tiny-seed0", "float16")
    full, half = load_model(src), load_model(dst)
    for key, value in full.state_dict().items():
        assert half.state_dict()[key].dtype == torch.float32
        assert torch.equal(half.state_dict()[key], value.half().float()), key
    assert (dst / "model.safetensors").stat().st_size < 0.6 * (src / "model.safetensors").stat().st_size
    assert read_meta(dst)["stored_dtype"] == "float16"
    assert training_record(dst)["id_curve"] == training_record(src)["id_curve"]
    assert find_pretrained(cfg, cfg.run.seed, zoo=zoo) == dst
    task = PolyRegTask(cfg.task)
    batch = task.data("id", "heldout", 0, 256)
    nmse = [float(task.metrics(m.run(batch).predictions, batch)["nmse"].mean()) for m in (full, half)]
    assert nmse[1] == pytest.approx(nmse[0], rel=0.02)


def test_ship_refuses_bad_input(tmp_path: Path, trained) -> None:
    _, src = trained
    with pytest.raises(CheckpointError, match="allowed"):
        ship(src, tmp_path / "x", "int8")
    with pytest.raises(CheckpointError, match="source folder"):
        ship(src, src)
    with pytest.raises(CheckpointError, match="does not exist"):
        ship(tmp_path / "absent", tmp_path / "y")
    broken = ship(src, tmp_path / "copy", "float32")
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:-8] + b"12345678")
    with pytest.raises(CheckpointError, match="corrupt"):
        ship(broken, tmp_path / "z")


def test_command_line(tmp_path: Path, trained, capsys) -> None:
    _, src = trained
    main([str(src), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert "bfloat16" in capsys.readouterr().out
    assert read_meta(tmp_path / "out")["stored_dtype"] == "bfloat16"
