"""Hugging Face causal language models behind the :class:`~tapioca.models.base.BlockModel` interface.

Blocks are found by structure (the one ``nn.ModuleList`` of ``config.num_hidden_layers`` identical modules),
gated with :func:`~tapioca.models.gates.gated`, and removed physically so that a pruned model is still a
normal ``PreTrainedModel``: block list, ``num_hidden_layers``, every ``layer_idx`` and per-layer config lists
(``layer_types``) are all kept consistent.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from tapioca.errors import CheckpointError, ConfigError, DataError
from tapioca.models.base import RunOutput
from tapioca.models.gates import Gates, check_gates, gated

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


# ---------------------------------------------------------------- batches


@dataclass
class TokenBatch:
    """Right-padded token ids with the position to capture and the tokens to score.

    input_ids (B, T) long; attention_mask (B, T) long (1 = real token); query (B,) long: index of the last
    prompt token; target_mask (B, T) bool: continuation tokens whose log-likelihood counts.
    """

    input_ids: Tensor
    attention_mask: Tensor
    query: Tensor
    target_mask: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, rows: Tensor) -> "TokenBatch":
        """The examples ``rows`` (K,), with padding columns that are empty for all of them dropped."""
        width = int(self.attention_mask[rows].sum(1).max()) if len(rows) else 0
        cut = lambda t: t[rows][:, :width]  # noqa: E731
        return TokenBatch(cut(self.input_ids), cut(self.attention_mask), self.query[rows], cut(self.target_mask))

    def slice(self, i: int, j: int) -> "TokenBatch":
        """Examples ``i:j`` (trimmed to their longest)."""
        return self.take(torch.arange(len(self))[i:j])

    def to(self, device: str | torch.device) -> "TokenBatch":
        return TokenBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class LMRunOutput(RunOutput):
    """:class:`RunOutput` plus token_logprobs (B, T): log p of each target token (0 elsewhere), and
    query_logprobs (B, V): the next-token distribution after the prompt (log-probabilities)."""

    token_logprobs: Tensor | None = None
    query_logprobs: Tensor | None = None


def _sliding_window(cfg: Any) -> int | None:
    """The attention window of a model with sliding-window layers, else None."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    if types is None and not getattr(cfg, "use_sliding_window", True):
        return None
    return int(window)


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix that every row starts with."""
    length = min(len(r) for r in rows)
    for k in range(length):
        if any(r[k] != rows[0][k] for r in rows[1:]):
            return k
    return length


def _pad(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Pad token lists -> ids (B, T), attention mask (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, span] = torch.tensor(row, dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


# ---------------------------------------------------------------- adapter


class HFModel:
    """A Hugging Face causal LM as a :class:`~tapioca.models.base.BlockModel`.

    ``chat=True`` wraps every prompt in the tokenizer's chat template (one user turn plus the generation
    prompt); a tokenizer without one raises :class:`ChatTemplateError`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, chat: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._owner, self._attr = _block_owner(model)
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError("chat=True but the tokenizer has no chat template; use plain prompts (chat=False)")
        self.chat = chat
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token  # existing token: the scoring vocabulary is unchanged
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway
        self.window = getattr(text_config(model), "max_position_embeddings", None)
        forward_parameters = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in forward_parameters
        self._takes_cache = "cache" in forward_parameters
        self.share_prefix = True  # run a prompt prefix shared by every row of a batch once (see shared_prefix)
        self.min_shared = 8  # fewest shared tokens worth a separate pass
        self.source: LoadSource | None = None  # set by :meth:`load`: how to load this model again

    @classmethod
    def load(cls, path: str | Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
             gguf_file: str | None = None, chat: bool = False, device_map: str | dict | None = None) -> "HFModel":
        """:func:`load_causal_lm` wrapped in an adapter that remembers where it came from (``source``)."""
        lm = cls(*load_causal_lm(path, dtype, device, gguf_file, device_map), chat=chat)
        lm.source = LoadSource(str(Path(path).resolve()), dtype_name(dtype), gguf_file, device_map)
        return lm

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self._owner, self._attr)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first shard under a ``device_map``; its
        execution device when accelerate offloads it)."""
        try:
            embeddings = self.model.get_input_embeddings()
        except NotImplementedError:
            return next(self.model.parameters()).device
        hook = getattr(embeddings, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        return embeddings.weight.device

    def block_parameter_count(self, index: int) -> int:
        return sum(p.numel() for p in self.blocks[index].parameters())

    # -- text -> tokens

    def format(self, prompts: Sequence[str]) -> list[str]:
        """Prompts as the model sees them: through the chat template when ``chat`` is on."""
        if not self.chat:
            return list(prompts)
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts]

    def _encode(self, texts: Sequence[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=special)["input_ids"]]

    def _check_fits(self, lengths: Sequence[int], max_length: int | None, what: str) -> None:
        limits = [n for n in (self.window, max_length) if n is not None]
        limit = min(limits) if limits else None
        for i, n in enumerate(lengths):
            if limit is not None and n > limit:
                raise ContextTooLongError(f"example {i}: {what} is {n} tokens but the model window is {limit} "
                                          f"tokens (max_position_embeddings={self.window}, max_length={max_length})")

    def tokenize(
        self, prompts: Sequence[str], continuations: Sequence[str] | None = None, max_length: int | None = None,
    ) -> TokenBatch:
        """Right-padded batch: prompt tokens (with the tokenizer's special tokens) then continuation tokens."""
        if continuations is not None and len(continuations) != len(prompts):
            raise DataError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        if not prompts:
            raise DataError("no prompts to tokenize")
        contexts = self._encode(self.format(prompts), special=not self.chat)
        targets = self._encode(continuations, special=False) if continuations is not None else [[] for _ in prompts]
        for i, (ctx, tgt) in enumerate(zip(contexts, targets)):
            if not ctx:
                raise DataError(f"prompt {i} ({prompts[i]!r}) has no tokens; a scored token needs a context")
            if continuations is not None and not tgt:
                raise DataError(f"continuation {i} ({continuations[i]!r}) has no tokens")
        what = "prompt + continuation" if continuations is not None else "prompt"
        self._check_fits([len(c) + len(t) for c, t in zip(contexts, targets)], max_length, what)
        ids, mask = _pad([c + t for c, t in zip(contexts, targets)], self.pad_id)
        query = torch.tensor([len(c) - 1 for c in contexts], dtype=torch.long)
        position = torch.arange(ids.shape[1])
        target = (position > query[:, None]) & mask.bool()
        return TokenBatch(ids, mask, query, target)

    # -- forward passes

    def shared_prefix(self, batch: TokenBatch) -> int:
        """Tokens P that every row of ``batch`` starts with (few-shot demonstrations, a system prompt) and
        that :meth:`run` computes once: 0 when sharing is off, the batch has one row, or P < ``min_shared``.
        P stays below every row's query, so each row keeps at least its last prompt token."""
        if not self.share_prefix or len(batch) < 2:
            return 0
        same = ((batch.input_ids == batch.input_ids[:1]) & (batch.attention_mask == 1)).all(0)
        different = (~same).nonzero()
        length = int(different[0]) if len(different) else same.numel()
        length = min(length, int(batch.query.min()))
        return length if length >= self.min_shared else 0

    def _prefix_cache(self, batch: TokenBatch, length: int) -> Any:
        """The KV cache of the first ``length`` tokens, computed on one row and repeated for every row.
        Layers whose block was skipped (gate 0) get zeros: never read, they keep the cache lengths that
        masks and positions are computed from equal across layers."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=batch.input_ids[:1, :length], attention_mask=batch.attention_mask[:1, :length],
                   use_cache=True, **self._cache_arg(cache), **self._keep_logits(1))
        filled = [layer for layer in cache.layers if layer.get_seq_length() > 0]
        for layer in cache.layers:
            if layer.get_seq_length() == 0:
                layer.update(*(torch.zeros(self._kv_shape(filled, length), dtype=self.model.dtype,
                                           device=self.device) for _ in range(2)))
        cache.batch_repeat_interleave(len(batch))
        return cache

    def _kv_shape(self, filled: list, length: int) -> tuple[int, int, int, int]:
        """(1, KV heads, length, head dim) of a cache layer, from a filled layer or else the config."""
        if filled:
            _, heads, _, dim = filled[0].keys.shape
            return 1, heads, length, dim
        cfg = text_config(self.model)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 1, heads, length, dim

    def _cache_arg(self, cache: Any) -> dict[str, Any]:
        """A KV cache as this model's forward takes it (``cache`` in newer transformers, else past_key_values)."""
        return {"cache": cache} if self._takes_cache else {"past_key_values": cache}

    def _keep_logits(self, n: int) -> dict[str, int]:
        return {"logits_to_keep": n} if self._keeps_logits else {}

    def _logits(self, batch: TokenBatch, start: int, shared: int = 0, cache: Any = None) -> Tensor:
        """Logits for positions ``start:`` -> (B, T - start, V), float32; with a ``cache`` of the first
        ``shared`` tokens only the rest of each row is run."""
        width = batch.input_ids.shape[1]
        kwargs: dict[str, Any] = dict(input_ids=batch.input_ids[:, shared:], attention_mask=batch.attention_mask,
                                      use_cache=cache is not None)
        if cache is not None:
            kwargs.update(self._cache_arg(cache))
        logits = self.model(**kwargs, **self._keep_logits(width - start)).logits
        return logits[:, -(width - start):].float().to(self.device)

    @torch.no_grad()
    def run(self, batch: TokenBatch, gates: Gates | None = None, capture: bool = False) -> LMRunOutput:
        """Summed log-likelihood of the target tokens (B,; 0 without continuations) with block gates; states
        (L + 1, B, D) at the query (the last prompt token) if ``capture``. A prompt prefix that all rows
        share is run once (:meth:`shared_prefix`): the same numbers up to float rounding, much less compute
        for few-shot prompts; blocks see it as a first call (prefix) and a second (the rest)."""
        batch = batch.to(self.device)
        start = int(batch.query.min())
        shared = self.shared_prefix(batch)
        with gated(self.blocks, gates):
            cache = self._prefix_cache(batch, shared) if shared else None
            with gated(self.blocks, None, capture=capture, positions=batch.query - shared) as cap:
                logits = self._logits(batch, start, shared, cache)  # (B, T - start, V)
        rows = torch.arange(len(batch), device=self.device)
        query_logprobs = logits[rows, batch.query - start].log_softmax(-1)
        token_logprobs = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=self.device)
        if logits.shape[1] > 1:
            predictors = logits[:, :-1]  # position t predicts token t + 1
            nxt = batch.input_ids[:, start + 1:]
            picked = predictors.gather(-1, nxt[..., None]).squeeze(-1) - predictors.logsumexp(-1)
            token_logprobs[:, start + 1:] = torch.where(batch.target_mask[:, start + 1:], picked, 0.0)
        if cap is not None:  # under a device_map each block's states are on that block's device
            cap.states = [None if h is None else h.to(self.device) for h in cap.states]
        states = cap.stacked() if cap is not None else None
        return LMRunOutput(token_logprobs.sum(1), states, token_logprobs, query_logprobs)

    def loglik(
        self, prompts: Sequence[str], continuations: Sequence[str], gates: Gates | None = None, batch_size: int = 16,
    ) -> Tensor:
        """Summed log-likelihood of each continuation given its prompt, (N,); batches are formed by length."""
        batch = self.tokenize(prompts, continuations)
        order = torch.argsort(batch.attention_mask.sum(1), descending=True, stable=True)
        out = torch.empty(len(batch), dtype=torch.float32)
        for i in range(0, len(batch), batch_size):
            rows = order[i:i + batch_size]
            out[rows] = self.run(batch.take(rows), gates).predictions.cpu()
        return out

    @contextmanager
    def _gated_for_cache(self, gates: Gates | None) -> Iterator[None]:
        """Gates that are safe with a KV cache: alpha = 0 blocks are removed physically for the duration
        (a skipped block would leave its cache layer empty and break cache lengths and masks)."""
        gates = check_gates(gates, self.n_blocks)
        removed = sorted(i for i, a in gates.items() if a == 0.0)
        keep = [i for i in range(self.n_blocks) if i not in removed]
        with blocks_removed(self.model, removed):
            with gated(self.blocks, {keep.index(i): a for i, a in gates.items() if a != 0.0}):
                yield

    def _generation_config(self, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                pad_token_id=self.pad_id, eos_token_id=eos)

    def generate(
        self, prompts: Sequence[str], gates: Gates | None = None, max_new_tokens: int = 32, batch_size: int = 8,
    ) -> list[str]:
        """Greedy continuations (KV cache on) of each prompt with block gates, decoded up to the first EOS."""
        return self.generate_with_confidence(prompts, gates, max_new_tokens, batch_size)[0]

    @torch.no_grad()
    def generate_with_confidence(
        self, prompts: Sequence[str], gates: Gates | None = None, max_new_tokens: int = 32, batch_size: int = 8,
        stop: str = "\n",
    ) -> tuple[list[str], Tensor]:
        """Greedy continuations as :meth:`generate`, and each one's confidence (N,) float64: the model's
        probability of its own greedy answer, the product of the chosen tokens' probabilities up to the first
        EOS or the first token containing ``stop`` (the answer line; a response that starts with ``stop``
        has confidence 1, an empty product)."""
        contexts = self._encode(self.format(prompts), special=not self.chat)
        self._check_fits([len(c) + max_new_tokens for c in contexts], None, f"prompt + {max_new_tokens} new tokens")
        config = self._generation_config(max_new_tokens)
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        texts: list[str] = []
        confidence: list[float] = []
        with self._gated_for_cache(gates):
            for i in range(0, len(contexts), batch_size):
                ids, mask, cache = self._generation_inputs(contexts[i:i + batch_size], max_new_tokens)
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                          output_scores=True, return_dict_in_generate=True,
                                          **(self._cache_arg(cache) if cache is not None else {}))
                new = out.sequences[:, ids.shape[1]:]  # (b, S)
                logprobs = torch.stack(out.scores, 1).float().log_softmax(-1)  # (b, S, V)
                chosen = logprobs.gather(-1, new[..., None]).squeeze(-1).double().cpu()  # (b, S)
                for row, row_logprobs in zip(new.tolist(), chosen):
                    texts.append(self._decode(row, eos))
                    span = self._answer_span(row, eos, stop)
                    confidence.append(float(row_logprobs[:span].sum().exp()))
        return texts, torch.tensor(confidence, dtype=torch.float64)

    def _generation_inputs(self, rows: list[list[int]], max_new_tokens: int) -> tuple[Tensor, Tensor, Any]:
        """ids (B, T), attention mask (B, T) and a KV cache (or None) for generating from token ``rows``: the
        prefix every row shares (see :meth:`shared_prefix`) is run once into the cache, and the rows' rest is
        left-padded after it (positions follow the mask, so the padding in between is invisible)."""
        shared = 0
        window = _sliding_window(text_config(self.model))
        fits_window = window is None or max(len(r) for r in rows) + max_new_tokens <= window
        if self.share_prefix and len(rows) > 1 and fits_window:  # else padding in between would take window slots
            shared = min(_common_prefix(rows), min(len(r) for r in rows) - 1)
        if shared < self.min_shared:
            ids, mask = _pad(rows, self.pad_id, left=True)
            return ids.to(self.device), mask.to(self.device), None
        rest, rest_mask = _pad([r[shared:] for r in rows], self.pad_id, left=True)
        prefix = torch.tensor(rows[0][:shared], dtype=torch.long)
        ids = torch.cat([prefix.expand(len(rows), -1), rest], 1).to(self.device)
        mask = torch.cat([torch.ones(len(rows), shared, dtype=torch.long), rest_mask], 1).to(self.device)
        prefix_batch = TokenBatch(ids[:1, :shared], mask[:1, :shared], torch.tensor([shared - 1]),
                                  torch.zeros(1, shared, dtype=torch.bool))
        cache = self._prefix_cache(prefix_batch, shared)
        cache.batch_repeat_interleave(len(rows))
        return ids, mask, cache

    def _answer_span(self, ids: list[int], eos: list[int | None], stop: str) -> int:
        """Number of leading generated tokens before the first EOS or the first token that contains ``stop``."""
        for k, token in enumerate(ids):
            if token in eos or stop in self.tokenizer.decode([token]):
                return k
        return len(ids)

    def _decode(self, ids: list[int], eos: list[int | None]) -> str:
        cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True)

    # -- pruning and saving

    def pruned_copy(self, removed: Sequence[int]) -> "HFModel":
        """A new adapter over a copy of the model without the ``removed`` blocks (only kept blocks are copied)."""
        _check_renumbering(self.model, removed)
        with blocks_removed(self.model, removed):
            clone = copy.deepcopy(self.model)
        return HFModel(clone, self.tokenizer, chat=self.chat)

    def save(self, path: str | Path) -> Path:
        """Write model (safetensors) and tokenizer to ``path`` via ``save_pretrained``; replaces atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        return path


__all__ = ["HFModel", "LoadSource", "TokenBatch", "LMRunOutput", "load_causal_lm", "find_blocks", "remove_blocks",
           "blocks_removed", "resolve_dtype", "dtype_name", "text_config", "ContextTooLongError", "ChatTemplateError",
           "UnsupportedModelError"]
