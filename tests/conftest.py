"""Shared fixtures: a tiny config, a tiny ICL model and a tiny Llama; one CPU thread for light test runs; and
:func:`assert_close_scaled` for results that reach the same numbers by different kernels."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tapioca.config import Config, load_config
from tapioca.models.icl import ICLModel

torch.set_num_threads(1)

TINY_OVERRIDES = (
    "model.n_layer=3",
    "model.n_embd=16",
    "model.n_head=2",
    "model.n_positions=128",
    "train.steps=12",
    "train.checkpoint_every=4",
    "train.warmup_steps=2",
    "train.curriculum_interval=2",
    "train.batch_size=16",
)


def assert_close_scaled(actual: Any, expected: Any, rel: float = 1e-4) -> None:
    """Assert ``actual`` equals ``expected`` (tensors, arrays, lists or numbers) up to float rounding: rtol=rel
    and atol=rel * max(|expected|.max(), 1).

    For the same quantity computed along different paths: different kernels or batch shapes (chunked vs whole
    batch, packed vs padded rows, a cached prefix vs none, another CPU or thread count) or sums in another order.
    Their float32 errors grow with the largest magnitude in the computation, not with each element, so a fixed
    atol that holds for values near 1 fails for values near 25. Code paths that are literally identical
    (same function, same shapes) are compared exactly instead."""
    actual, expected = (torch.as_tensor(v).detach().cpu().double() for v in (actual, expected))
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def tiny_cfg() -> Config:
    """A small, fast configuration (3 blocks of width 16, 12 training steps, checkpoints every 4)."""
    return load_config(None, list(TINY_OVERRIDES))


@pytest.fixture
def tiny_model(tiny_cfg: Config) -> ICLModel:
    """An untrained ICL model from ``tiny_cfg`` (seed 0), in eval mode."""
    torch.manual_seed(0)
    return ICLModel(tiny_cfg.model).eval()


@pytest.fixture
def tiny_llama():
    """A 4-layer randomly initialised Llama causal LM (blocks at ``model.model.layers``), in eval mode."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()
