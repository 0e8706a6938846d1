"""The in-context regression model: Linear read-in -> GPT-2 blocks -> Linear read-out.

A prompt of n pairs becomes 2n - 1 tokens x_1, y_1, ..., x_{n-1}, y_{n-1}, x_n; each token is the 2-vector
(value, is_y). The model predicts y_i at every x position; the last x is the query.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import GPT2Config, GPT2Model

from tapioca.config import ModelConfig, from_dict
from tapioca.errors import CheckpointError, ConfigError
from tapioca.io import write_json
from tapioca.models.base import RunOutput
from tapioca.models.gates import Gates, gated
from tapioca.tasks.polyreg import PolyBatch

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


def prompt_tokens(xs: Tensor, ys: Tensor) -> Tensor:
    """Interleave pairs into tokens: xs, ys (B, n) -> (B, 2n - 1, 2), features (value, is_y)."""
    b, n = xs.shape
    tokens = torch.zeros(b, 2 * n, 2, dtype=xs.dtype, device=xs.device)
    tokens[:, 0::2, 0] = xs
    tokens[:, 1::2, 0] = ys
    tokens[:, 1::2, 1] = 1.0
    return tokens[:, :-1]


class ICLModel(nn.Module):
    """Read-in, a GPT-2 decoder (learned positions, no dropout) and a scalar read-out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        gpt2 = GPT2Config(
            vocab_size=1, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
            bos_token_id=None, eos_token_id=None, activation_function="gelu",
        )
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"model.n_embd: {cfg.n_embd} must be divisible by model.n_head ({cfg.n_head})")
        self.read_in = nn.Linear(2, cfg.n_embd)
        self.backbone = GPT2Model(gpt2)
        self.read_out = nn.Linear(cfg.n_embd, 1)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.h

    @property
    def n_blocks(self) -> int:
        return len(self.backbone.h)

    @property
    def device(self) -> torch.device:
        return self.read_out.weight.device

    def forward(self, xs: Tensor, ys: Tensor) -> Tensor:
        """Predictions at every x position, (B, n): xs, ys (B, n) (the last y is never seen)."""
        tokens = prompt_tokens(xs, ys)
        if tokens.shape[1] > self.cfg.n_positions:
            raise ConfigError(
                f"prompts of {xs.shape[1]} points need {tokens.shape[1]} positions but the model has "
                f"n_positions={self.cfg.n_positions}; use fewer points or a model with more positions"
            )
        hidden = self.backbone(inputs_embeds=self.read_in(tokens)).last_hidden_state
        return self.read_out(hidden[:, 0::2]).squeeze(-1)

    @torch.no_grad()
    def run(self, batch: PolyBatch, gates: Gates | None = None, capture: bool = False) -> RunOutput:
        """Query predictions (B,) with block gates; states (L + 1, B, D) at the query token if ``capture``."""
        batch = batch.to(self.device)
        with gated(self.blocks, gates, capture=capture) as cap:
            preds = self(batch.xs, batch.ys)[:, -1]
        return RunOutput(preds, cap.stacked() if cap is not None else None)

    def block_parameter_count(self, index: int) -> int:
        return sum(p.numel() for p in self.blocks[index].parameters())

    def slice_blocks(self, removed: list[int]) -> "ICLModel":
        """A new model physically without the ``removed`` blocks (weights shared by copy)."""
        keep = [i for i in range(self.n_blocks) if i not in set(removed)]
        clone = ICLModel(dataclasses.replace(self.cfg, n_layer=len(keep), checkpoint=None))
        clone.load_state_dict(self.state_dict(), strict=False)
        clone.backbone.h = nn.ModuleList([self.blocks[i] for i in keep])
        return clone.to(self.device).eval()


def save_model(model: ICLModel, folder: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``model.json`` (model config + ``info``) atomically into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    write_json(folder / META_FILE, {"format": "tapioca-icl", "model": dataclasses.asdict(model.cfg), **(info or {})})


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's ``model.json``, with clear errors when it is missing or corrupt."""
    path = Path(folder) / META_FILE
    if not Path(folder).is_dir():
        raise CheckpointError(f"checkpoint {str(folder)!r} does not exist (expected a folder with {META_FILE})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} has no {META_FILE}; is it a tapioca model folder?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != "tapioca-icl" or "model" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a tapioca ICL model description")
    return meta


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> ICLModel:
    """Load a model saved by :func:`save_model` (safetensors only; no pickle)."""
    meta = read_meta(folder)
    try:
        cfg = from_dict(ModelConfig, meta["model"], "model")
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(folder)!r} has an invalid model config: {err}") from None
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint weights {str(weights)!r} are corrupt: {err}") from None
    model = ICLModel(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights {str(weights)!r} do not match its model.json: {err}") from None
    return model.to(device).eval()


__all__ = ["ICLModel", "prompt_tokens", "save_model", "load_model", "read_meta"]
