"""Racing TALE rounds: stages, the elimination rule, and a planted harmful block found with less work."""

from __future__ import annotations

import pytest
import torch

import tapioca
from tapioca.config import load_config
from tapioca.errors import ConfigError
from tapioca.models.icl import ICLModel
from tapioca.pruning.racing import eliminated, stage_ends

from conftest import assert_close_scaled
from test_pruning import NoisyBlock, trained  # noqa: F401  (module-scoped fixture)


def test_stage_ends_double_and_end_at_n():
    assert stage_ends(512, 64) == [64, 128, 256, 512]
    assert stage_ends(100, 64) == [64, 100]
    assert stage_ends(50, 64) == [50]


def test_elimination_drops_clear_losers_and_keeps_close_ones():
    torch.manual_seed(0)
    leader = torch.randn(200)
    scores = {0: leader, 1: leader - 1.0 + 0.1 * torch.randn(200), 2: leader + 0.01 * torch.randn(200) - 0.0005,
              3: leader - 0.02 * torch.rand(200)}  # 3: worse on every example, so its paired mean is below 0
    out = eliminated(scores, z=3.0)
    assert 1 in out and 0 not in out and 2 not in out and 3 in out
    assert eliminated({0: leader, 1: leader - 1.0}, z=3.0) == {1}  # no spread: a constant deficit loses


def test_racing_finds_the_planted_block_with_fewer_example_runs(trained):  # noqa: F811
    cfg, model, task = trained
    planted = ICLModel(cfg.model)
    planted.load_state_dict(model.state_dict())
    planted.backbone.h[2] = NoisyBlock(planted.backbone.h[2], scale=3.0)
    planted.eval()
    common = dict(cfg=cfg.pruning, progress=False, n_select=256, batch_size=64, max_drop=1)
    exact = tapioca.prune(planted, task, "tale", "target", "id", **common)
    raced = tapioca.prune(planted, task, "tale", "target", "id", racing_delta=0.05, racing_min=32, **common)
    assert exact.path == raced.path == [2] and raced.removed == exact.removed
    # the winner is scored on every example (racing's stages of 32, 64, ... make other batch shapes)
    assert_close_scaled(raced.rounds[0]["candidates"]["2"], exact.rounds[0]["candidates"]["2"])
    out = raced.rounds[0]["raced_out"]
    assert out and all(n < 256 for n in out.values())  # losers stopped early
    assert raced.info["racing_delta"] == 0.05 and exact.info["racing_delta"] is None
    assert "raced_out" not in exact.rounds[0]


def test_racing_config_is_checked():
    with pytest.raises(ConfigError, match="pruning.racing_delta"):
        load_config(None, ["pruning.racing_delta=0"])
    with pytest.raises(ConfigError, match="pruning.racing_min"):
        load_config(None, ["pruning.racing_min=1"])
