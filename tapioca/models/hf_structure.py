"""Loading Hugging Face causal LMs and finding, removing and restoring their transformer blocks.

Blocks are found by structure (the one ``nn.ModuleList`` of ``config.num_hidden_layers`` identical modules)
and removed physically so that a pruned model is still a normal ``PreTrainedModel``: block list,
``num_hidden_layers``, every ``layer_idx`` and per-layer config lists (``layer_types``) are all kept
consistent. :mod:`tapioca.models.hf` builds the gated adapter on top.
"""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from tapioca.errors import CheckpointError, ConfigError, DataError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")  # config lists with one entry per block


class ContextTooLongError(DataError):
    """A prompt (plus continuation or generated tokens) does not fit the model's context window."""


class ChatTemplateError(ConfigError):
    """A chat template was asked for but the tokenizer has none."""


class UnsupportedModelError(ConfigError):
    """No transformer block list could be found in a model."""


# ---------------------------------------------------------------- loading


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` (or such a torch dtype) as a torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype {dtype!r} is not supported; allowed: {', '.join(DTYPES)}")


def dtype_name(dtype: str | torch.dtype) -> str:
    """The :data:`DTYPES` name of a supported dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    resolved = resolve_dtype(dtype)
    return next(name for name, value in DTYPES.items() if value == resolved)


@dataclass(frozen=True)
class LoadSource:
    """How an :class:`HFModel` was loaded (:meth:`HFModel.load`): absolute path, dtype name, GGUF file, device map."""

    path: str
    dtype: str
    gguf_file: str | None = None
    device_map: str | dict | None = None


def _check_model_folder(folder: Path, gguf_file: str | None) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"model path {str(folder)!r} is not a folder (expected a Hugging Face model folder "
                              f"with config.json and {WEIGHT_FILES[0]}, or a .gguf file)")
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise CheckpointError(f"GGUF file {str(folder / gguf_file)!r} does not exist")
        return
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{str(folder)!r} is not a Hugging Face model folder: expected config.json in it")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"model folder {str(folder)!r} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def load_causal_lm(
    path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
    gguf_file: str | None = None, device_map: str | dict | None = None,
) -> tuple[Any, Any]:
    """Load a local causal LM and its tokenizer (no hub access), in ``dtype`` on ``device``, in eval mode.

    ``path`` is a Hugging Face folder, or a folder with ``gguf_file`` in it, or a ``.gguf`` file: GGUF weights
    are dequantised by transformers (needs the ``gguf`` package) and the model is made serialisable again.
    ``device_map`` ("auto", {"": "cuda:1"}, {module name: device}, ...) shards the model with accelerate, for
    models larger than one device; ``device`` is then ignored.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    folder = Path(path)
    if gguf_file is None and folder.suffix == ".gguf" and folder.is_file():
        folder, gguf_file = folder.parent, folder.name
    _check_model_folder(folder, gguf_file)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    placement = {"device_map": device_map} if device_map is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, local_files_only=True,
                                                     **extra, **placement)
    except ImportError as err:
        raise ConfigError(f"loading {str(folder)!r} needs a missing package ({err}); GGUF: pip install gguf; "
                          "device_map: pip install accelerate") from None
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot load the model in {str(folder)!r}: {err}") from None
    if gguf_file:
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # else save_pretrained refuses: "quantized with gguf"
        model = model.to(torch_dtype)
    if device_map is None:
        model = model.to(device)  # a dispatched model stays where device_map put it
    return model.eval(), tokenizer


# ---------------------------------------------------------------- blocks


def text_config(model: nn.Module) -> Any:
    """The decoder config of ``model`` (the config that holds ``num_hidden_layers``)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .config; expected a transformers PreTrainedModel")
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _block_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the block list: the shallowest ``nn.ModuleList`` of
    ``config.num_hidden_layers`` modules of one class."""
    n_layers = getattr(text_config(model), "num_hidden_layers", None)
    seen, found = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not name:
            continue
        seen.append(f"{name} ({len(module)})")
        if len(module) == n_layers and len({type(m) for m in module}) == 1:
            found.append(name)
    if not found:
        raise UnsupportedModelError(
            f"no transformer block list in {type(model).__name__}: looked for an nn.ModuleList of "
            f"config.num_hidden_layers={n_layers} modules of one class; module lists found: {seen or 'none'}"
        )
    depth = min(n.count(".") for n in found)
    shallowest = [n for n in found if n.count(".") == depth]
    if len(shallowest) > 1:
        raise UnsupportedModelError(f"ambiguous block lists in {type(model).__name__}: {shallowest}")
    parent, _, attr = shallowest[0].rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM, in order (Llama/Qwen2/Gemma-3 ``model.layers``, GPT-2
    ``transformer.h``, GPT-NeoX ``gpt_neox.layers``, ...), found by structure, not by model name."""
    return getattr(*_block_owner(model))


def _kept(n_blocks: int, removed: Sequence[int]) -> list[int]:
    bad = [i for i in removed if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < n_blocks]
    if bad:
        raise ConfigError(f"blocks to remove {bad} are not blocks; allowed: integers 0..{n_blocks - 1}")
    keep = [i for i in range(n_blocks) if i not in {int(r) for r in removed}]
    if not keep:
        raise ConfigError(f"cannot remove all {n_blocks} blocks; keep at least one")
    return keep


def _apply_removal(model: nn.Module, removed: Sequence[int]) -> Callable[[], None]:
    """Remove blocks in place (block list, layer_idx, config); returns a function that undoes it."""
    owner, attr = _block_owner(model)
    blocks: nn.ModuleList = getattr(owner, attr)
    keep = _kept(len(blocks), list(removed))
    config = text_config(model)
    undo_config = {k: getattr(config, k) for k in ("num_hidden_layers", *PER_LAYER_CONFIG_KEYS) if hasattr(config, k)}
    renumber = [(m, new) for new, old in enumerate(keep) for m in blocks[old].modules()
                if isinstance(getattr(m, "layer_idx", None), int)]  # attention modules and decoder layers
    undo_idx = [(m, m.layer_idx) for m, _ in renumber]
    setattr(owner, attr, nn.ModuleList([blocks[i] for i in keep]))
    for module, new_index in renumber:
        module.layer_idx = new_index
    config.num_hidden_layers = len(keep)  # GPT-2 style configs map this onto n_layer
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == len(blocks):
            setattr(config, key, type(values)(values[i] for i in keep))

    def undo() -> None:
        setattr(owner, attr, blocks)
        for module, index in undo_idx:
            module.layer_idx = index
        for key, value in undo_config.items():
            setattr(config, key, value)

    return undo


def _check_renumbering(model: nn.Module, removed: Sequence[int]) -> None:
    """Refuse a persistent removal that renumbers blocks whose weights' meaning depends on their index."""
    keep = _kept(len(find_blocks(model)), list(removed))
    if removed and min(removed) < max(keep) and getattr(text_config(model), "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("this model scales attention by 1 / (layer_idx + 1): renumbered blocks would change "
                          "after save/reload; prune it with gates instead")


def remove_blocks(model: nn.Module, removed: Sequence[int]) -> nn.Module:
    """Physically remove the ``removed`` blocks from ``model`` in place and return it.

    The result is a normal ``PreTrainedModel``: its logits equal the gated model's with those blocks at
    alpha = 0, and ``save_pretrained`` / ``from_pretrained`` round-trips it.
    """
    _check_renumbering(model, removed)
    _apply_removal(model, removed)
    return model


@contextmanager
def blocks_removed(model: nn.Module, removed: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily remove blocks (as :func:`remove_blocks`); everything is restored on exit."""
    undo = _apply_removal(model, removed)
    try:
        yield model
    finally:
        undo()
