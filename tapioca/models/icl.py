"""The in-context regression model: Linear read-in -> GPT-2 blocks -> Linear read-out.

A prompt of n pairs becomes 2n - 1 tokens x_1, y_1, ..., x_{n-1}, y_{n-1}, x_n; each token is the 2-vector
(value, is_y). The model predicts y_i at every x position; the last x is the query.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

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
        self.query_only = True  # run: the last block computes the query position alone

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
        """Query predictions (B,) with block gates; states (L + 1, B, D) at the query token if ``capture``.
        Only the query's output is used, so the last block computes it alone (:func:`last_position_only`)
        unless ``query_only`` is off (calibrations that need every position's activations turn it off)."""
        batch = batch.to(self.device)
        last = last_position_only(self.blocks[-1]) if self.query_only else contextlib.nullcontext()
        with last, gated(self.blocks, gates, capture=capture) as cap:
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


def _last_position_forward(block: nn.Module, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """A GPT-2 block (eval, no cache, no padding) on hidden (B, T, D) that computes the last position's output
    only: keys and values for every position, query, attention, projection and MLP for the last one. The
    other positions come out unchanged (their outputs are never read)."""
    attn, width = block.attn, hidden.shape[-1]
    x = block.ln_1(hidden)
    weight, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: x @ weight + bias, weight (D, 3D) = [q | k | v]
    query = torch.addmm(bias[:width], x[:, -1], weight[:, :width])[:, None]  # (B, 1, D)
    keys, values = (x @ weight[:, width:] + bias[width:]).split(width, dim=2)  # (B, T, D) each
    heads = lambda t: t.view(t.shape[0], t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(heads(query), heads(keys), heads(values), scale=attn.scaling)
    last = hidden[:, -1:] + attn.c_proj(out.transpose(1, 2).reshape(hidden.shape[0], 1, width))
    last = last + block.mlp(block.ln_2(last))
    return torch.cat([hidden[:, :-1], last], dim=1)


@contextlib.contextmanager
def last_position_only(block: nn.Module) -> Iterator[None]:
    """While active, the GPT-2 ``block`` computes its last position only (see :func:`_last_position_forward`);
    gates and hooks entered inside see it as the block's forward. Blocks with options this does not
    reproduce (cross-attention, reordered or layer-scaled attention, training mode) are left as they are."""
    attn = getattr(block, "attn", None)
    plain = (attn is not None and not block.training and not hasattr(block, "crossattention")
             and not attn.reorder_and_upcast_attn and not attn.scale_attn_by_inverse_layer_idx)
    if not plain or "forward" in block.__dict__:
        yield
        return
    block.forward = functools.partial(_last_position_forward, block)
    try:
        yield
    finally:
        del block.forward


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: ICLModel, folder: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``model.json`` (model config + ``info`` + the weights' ``sha256``)
    atomically into ``folder``."""
    save_checked(model, folder, "tapioca-icl", info)


def save_checked(model: nn.Module, folder: str | Path, fmt: str, info: dict[str, Any] | None = None) -> None:
    """Write ``model``'s state as ``model.safetensors`` and ``model.json`` (format ``fmt``, ``model.cfg`` as
    ``model``, ``info`` and the weights' ``sha256``) atomically into ``folder``: what :func:`load_checked` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    digest = sha256_of(tmp)
    tmp.replace(folder / WEIGHTS_FILE)
    write_json(folder / META_FILE, {"format": fmt, "model": dataclasses.asdict(model.cfg), **(info or {}),  # type: ignore[call-overload]
                                    "sha256": digest})


def verify_weights(folder: str | Path, meta: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` when ``model.safetensors`` differs from the ``sha256`` recorded in
    ``meta``; folders saved before checksums were recorded have none and pass."""
    expected, weights = meta.get("sha256"), Path(folder) / WEIGHTS_FILE
    if expected is None:
        return
    actual = sha256_of(weights)
    if actual != expected:
        raise CheckpointError(f"checkpoint weights {str(weights)!r} are corrupt: expected sha256 {str(expected)[:12]}... "
                              f"(recorded in {META_FILE}), got {actual[:12]}...")


FORMAT_NAMES = {"tapioca-icl": "tapioca ICL", "tapioca-gnn": "tapioca graph"}


def read_meta(folder: str | Path, fmt: str = "tapioca-icl") -> dict[str, Any]:
    """The checkpoint's ``model.json`` (of format ``fmt``), with clear errors when it is missing or corrupt."""
    path = Path(folder) / META_FILE
    if not Path(folder).is_dir():
        raise CheckpointError(f"checkpoint {str(folder)!r} does not exist (expected a folder with {META_FILE})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} has no {META_FILE}; is it a tapioca model folder?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or "model" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a {FORMAT_NAMES.get(fmt, fmt)} model description")
    return meta


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> ICLModel:
    """Load a model saved by :func:`save_model` (safetensors only; no pickle), checking the weights' sha256
    when ``model.json`` records one."""
    return load_checked(folder, "tapioca-icl", ModelConfig, ICLModel, device)


def load_checked(folder: str | Path, fmt: str, config_class: type, build: Any,
                 device: str | torch.device = "cpu") -> Any:
    """``build(config)`` with the safetensors weights of a checkpoint folder of format ``fmt``: the config
    (``model`` in ``model.json``, as ``config_class``) and the weights' sha256 are checked, and every problem is
    a one-line :class:`CheckpointError`."""
    meta = read_meta(folder, fmt)
    try:
        cfg = from_dict(config_class, meta["model"], "model")
    except ConfigError as err:
        raise CheckpointError(f"checkpoint {str(folder)!r} has an invalid model config: {err}") from None
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} has no {WEIGHTS_FILE}")
    verify_weights(folder, meta)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint weights {str(weights)!r} are corrupt: {err}") from None
    model = build(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights {str(weights)!r} do not match its model.json: {err}") from None
    return model.to(device).eval()


__all__ = ["ICLModel", "prompt_tokens", "save_model", "load_model", "read_meta", "sha256_of", "verify_weights"]
