"""Hugging Face causal language models behind the :class:`~tapioca.models.base.BlockModel` interface.

Blocks are found and removed by :mod:`tapioca.models.hf_structure` (loading too; its names are re-exported
here), gated with :func:`~tapioca.models.gates.gated`. A prompt prefix shared by every row of a batch is
computed once (:meth:`HFModel.shared_prefix`).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from tapioca.errors import DataError
from tapioca.models.base import RunOutput
from tapioca.models.gates import Capture, Gates, check_gates, gated
from tapioca.models.hf_structure import (  # noqa: F401  (re-exported: tapioca.models.hf is the public module)
    DTYPES, ChatTemplateError, ContextTooLongError, LoadSource, UnsupportedModelError, _block_owner,
    _check_renumbering, blocks_removed, dtype_name, find_blocks, load_causal_lm, remove_blocks, resolve_dtype,
    text_config,
)
from tapioca.models.packing import MASK_FORMS, pack_rows, pack_spans

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

    def spans(self, chunk: int) -> list[tuple[int, int]]:
        """Row ranges ``(i, j)``, in order, for passes of at most ``chunk`` rows' worth of tokens: each range's
        padded size (rows x its longest row) stays within ``chunk`` x the batch's mean length (one row at
        least). Equal-length rows go ``chunk`` at a time; long rows go fewer at a time, so a batch sorted by
        length (as :func:`tapioca.tasks.choices.choice_batch` makes) wastes little compute on padding."""
        lengths = self.attention_mask.sum(1).tolist()
        if not lengths:
            return []
        budget = chunk * math.ceil(sum(lengths) / len(lengths))
        spans, start, longest = [], 0, 0
        for i, n in enumerate(lengths):
            if i > start and (i - start + 1) * max(longest, n) > budget:
                spans.append((start, i))
                start, longest = i, 0
            longest = max(longest, n)
        spans.append((start, len(lengths)))
        return spans

    def to(self, device: str | torch.device) -> "TokenBatch":
        return TokenBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class LMRunOutput(RunOutput):
    """:class:`RunOutput` plus token_logprobs (B, T): log p of each target token (0 elsewhere), query_logprobs
    (B, V): the next-token distribution after the prompt (log-probabilities), and next_token (B,) long: the
    greedy next token after the prompt (argmax of the raw logits, ties to the lowest id, as greedy generation
    picks its first token)."""

    token_logprobs: Tensor | None = None
    query_logprobs: Tensor | None = None
    next_token: Tensor | None = None


def _sliding_window(cfg: Any) -> int | None:
    """The attention window of a model with sliding-window layers, else None."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    if types is None and not getattr(cfg, "use_sliding_window", True):
        return None
    return int(window)


def common_prefix(rows: list[list[int]]) -> int:
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


def _at_positions(x: Tensor, positions: Tensor, width: int) -> Tensor:
    """x (B, K, F) holds the last K of ``width`` positions of each row -> its rows at ``positions`` (B, S, F)
    (x (1, K, F), a packed sequence, serves every row)."""
    index = (positions - (width - x.shape[1])).to(x.device)
    x = x.expand(index.shape[0], -1, -1) if x.shape[0] == 1 else x
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


@contextmanager
def _head_at(head: nn.Module, positions: Tensor, width: int) -> Iterator[None]:
    """While active, the output ``head`` computes logits only at ``positions`` (B, S) of each row (its input
    is cut to (B, S, D) by :func:`_at_positions`)."""

    def pick(module: nn.Module, args: tuple) -> tuple:
        return (_at_positions(args[0], positions, width), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _restored(cache: Any) -> Iterator[None]:
    """A KV cache's layers as they were on entry once the block exits (a prefix cache serves several packs);
    no cache, nothing to do."""
    if cache is None:
        yield
        return
    saved = [(layer.keys, layer.values) for layer in cache.layers]
    try:
        yield
    finally:
        for layer, (keys, values) in zip(cache.layers, saved):
            layer.keys, layer.values = keys, values


def _scored_positions(batch: TokenBatch) -> Tensor:
    """Positions (B, S) whose logits a run needs: each row's query and the S - 1 after it, S covering the
    row with the most target tokens (clamped to each row's last real token)."""
    columns = torch.arange(batch.input_ids.shape[1], device=batch.query.device)
    last = torch.where(batch.target_mask, columns, -1).amax(1)  # last target token, -1 if none
    span = int((last - batch.query).clamp(min=0).max()) + 1
    end = batch.attention_mask.sum(1, keepdim=True) - 1  # (B, 1): rows are right-padded
    return torch.minimum(batch.query[:, None] + torch.arange(span, device=batch.query.device), end)


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
        self.pack_tokens = 512  # run rows end to end without padding, this many tokens a pass (0: padded rows)
        self.source: LoadSource | None = None  # set by :meth:`load`: how to load this model again
        self.query_positions: Tensor | None = None  # during run's main pass only: see _at_queries

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

    def _prefix_cache(self, prefix: Tensor, rows: int) -> Any:
        """The KV cache of the token ids ``prefix`` (1, P), computed once and repeated for ``rows`` rows.
        Layers whose block was skipped (gate 0) get zeros: never read, they keep the cache lengths that
        masks and positions are computed from equal across layers."""
        from transformers import DynamicCache

        length = prefix.shape[1]
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True,
                   **self._cache_arg(cache), **self._keep_logits(1))
        filled = [layer for layer in cache.layers if layer.get_seq_length() > 0]
        for layer in cache.layers:
            if layer.get_seq_length() == 0:
                layer.update(*(torch.zeros(self._kv_shape(filled, length), dtype=self.model.dtype,
                                           device=self.device) for _ in range(2)))
        cache.batch_repeat_interleave(rows)
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
        """Logits (B, K, V) float32 of the last K positions, K = T - start (all of the rest when the model
        cannot keep fewer), or whatever a hook on the head cut them to; with a ``cache`` of the first
        ``shared`` tokens only the rest of each row is run."""
        width = batch.input_ids.shape[1]
        kwargs: dict[str, Any] = dict(input_ids=batch.input_ids[:, shared:], attention_mask=batch.attention_mask,
                                      use_cache=cache is not None)
        if cache is not None:
            kwargs.update(self._cache_arg(cache))
        return self.model(**kwargs, **self._keep_logits(width - start)).logits.float().to(self.device)

    @torch.no_grad()
    def run(self, batch: TokenBatch, gates: Gates | None = None, capture: bool = False) -> LMRunOutput:
        """Summed log-likelihood of the target tokens (B,; 0 without continuations) with block gates; states
        (L + 1, B, D) at the query (the last prompt token) if ``capture``. A prompt prefix that all rows
        share is run once (:meth:`shared_prefix`), and rows are packed end to end without padding
        (:mod:`tapioca.models.packing`, when :meth:`packs` allows): the same numbers up to float rounding, much
        less compute. Blocks see the prefix as a first call, then the rest (one call per pack)."""
        batch = batch.to(self.device)
        shared = self.shared_prefix(batch)
        positions = _scored_positions(batch)  # (B, S): the query and the target tokens' predictors
        packed = self.packs(batch)
        with gated(self.blocks, gates):
            cache = self._prefix_cache(batch.input_ids[:1, :shared], 1 if packed else len(batch)) if shared else None
            pass_ = self._packed_pass if packed else self._padded_pass
            logits, states = pass_(batch, shared, positions, cache, capture)  # (B, S, V), (L + 1, B, D) or None
        query_logprobs = logits[:, 0].log_softmax(-1)
        next_token = logits[:, 0].argmax(-1)
        token_logprobs = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=self.device)
        if logits.shape[1] > 1:
            predicted = positions[:, 1:]  # (B, S - 1): the token each predictor position scores
            nxt = batch.input_ids.gather(1, predicted)
            picked = logits[:, :-1].gather(-1, nxt[..., None]).squeeze(-1) - logits[:, :-1].logsumexp(-1)
            scored = batch.target_mask.gather(1, predicted) & (predicted > positions[:, :-1])
            token_logprobs.scatter_add_(1, predicted, torch.where(scored, picked, 0.0))  # clamped repeats add 0
        return LMRunOutput(token_logprobs.sum(1), states, token_logprobs, query_logprobs, next_token)

    def packs(self, batch: TokenBatch) -> bool:
        """Does :meth:`run` pack ``batch``'s rows? Needs ``pack_tokens`` > 0, two rows or more, an output head,
        an attention implementation with a known mask form, and no sliding-window layers."""
        return (self.pack_tokens > 0 and len(batch) > 1 and self.model.get_output_embeddings() is not None
                and getattr(self.model.config, "_attn_implementation", None) in MASK_FORMS
                and _sliding_window(text_config(self.model)) is None)

    def _padded_pass(self, batch: TokenBatch, shared: int, positions: Tensor, cache: Any,
                     capture: bool) -> tuple[Tensor, Tensor | None]:
        """Logits (B, S, V) at ``positions`` and query states from one right-padded pass over the rows."""
        width = batch.input_ids.shape[1]
        head = self.model.get_output_embeddings()
        query = batch.query - shared
        with self._at_queries(query), gated(self.blocks, None, capture=capture, positions=query) as cap, \
                _head_at(head, positions, width) if head is not None else nullcontext():
            logits = self._logits(batch, int(batch.query.min()), shared, cache)  # (B, T - start, V) without a head
        if head is None:  # the model ran its head at every kept position: pick the scored ones
            logits = _at_positions(logits, positions, width)
        return logits, self._stacked(cap)

    def _packed_pass(self, batch: TokenBatch, shared: int, positions: Tensor, cache: Any,
                     capture: bool) -> tuple[Tensor, Tensor | None]:
        """Logits (B, S, V) at ``positions`` and query states from packed passes of ``pack_tokens`` tokens."""
        lengths = batch.attention_mask.sum(1)
        head = self.model.get_output_embeddings()
        implementation = self.model.config._attn_implementation
        logits, states = [], []
        for i, j in pack_spans((lengths - shared).tolist(), self.pack_tokens):
            pack = pack_rows(batch.input_ids[i:j], lengths[i:j], shared)
            kwargs: dict[str, Any] = dict(input_ids=pack.ids, position_ids=pack.position_ids, use_cache=cache is not None,
                                          attention_mask=pack.attention_mask(implementation, self.model.dtype))
            query = pack.index(batch.query[i:j, None], shared)[:, 0]
            with _restored(cache), self._at_queries(query), gated(self.blocks, None, capture=capture,
                                                                  positions=query) as cap, \
                    _head_at(head, pack.index(positions[i:j], shared), pack.ids.shape[1]):
                out = self.model(**kwargs, **(self._cache_arg(cache) if cache is not None else {}), **self._keep_logits(0))
            logits.append(out.logits.float().to(self.device))
            states.append(self._stacked(cap))
        return torch.cat(logits), torch.cat(states, 1) if capture else None  # type: ignore[arg-type]

    @contextmanager
    def _at_queries(self, positions: Tensor) -> Iterator[None]:
        """While active, ``query_positions`` is ``positions`` (b,): each row's last prompt token in the hidden
        states the blocks see, (b, T', D) right-padded rest of the rows or (1, N, D) packed rows (whose one row
        they all index); None outside (the shared-prefix pass holds no query). Hooks read it
        (:func:`tapioca.analysis.interventions.last_token_norm_matched`)."""
        self.query_positions = positions
        try:
            yield
        finally:
            self.query_positions = None

    def _stacked(self, cap: Capture | None) -> Tensor | None:
        """Captured states (L + 1, b, D) on the input device (under a device_map each block's are on its own)."""
        if cap is None:
            return None
        cap.states = [None if h is None else h.to(self.device) for h in cap.states]
        return cap.stacked()

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

    def eos_ids(self) -> list[int]:
        """The token ids that end a greedy generation (the model's generation config, else the tokenizer's)."""
        eos = self._generation_config(1).eos_token_id
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]

    def generation_prefix(self, rows: Sequence[Sequence[int]], max_new_tokens: int) -> int:
        """Tokens every row of ``rows`` starts with that greedy generation runs once into a KV cache before the
        rows' left-padded rest (0: no sharing). Off with ``share_prefix`` False, one row, fewer than
        ``min_shared`` tokens, or a sliding window the padding in between would take slots of; each row keeps at
        least one token after it."""
        window = _sliding_window(text_config(self.model))
        fits_window = window is None or max(len(r) for r in rows) + max_new_tokens <= window
        if not (self.share_prefix and len(rows) > 1 and fits_window):
            return 0
        shared = min(common_prefix([list(r) for r in rows]), min(len(r) for r in rows) - 1)
        return shared if shared >= self.min_shared else 0

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
        shared = self.generation_prefix(rows, max_new_tokens)
        if not shared:
            ids, mask = _pad(rows, self.pad_id, left=True)
            return ids.to(self.device), mask.to(self.device), None
        rest, rest_mask = _pad([r[shared:] for r in rows], self.pad_id, left=True)
        prefix = torch.tensor(rows[0][:shared], dtype=torch.long)
        ids = torch.cat([prefix.expand(len(rows), -1), rest], 1).to(self.device)
        mask = torch.cat([torch.ones(len(rows), shared, dtype=torch.long), rest_mask], 1).to(self.device)
        return ids, mask, self._prefix_cache(ids[:1, :shared], len(rows))

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

    def save(self, path: str | Path, extra_json: dict[str, Any] | None = None) -> Path:
        """Write model (safetensors) and tokenizer to ``path`` via ``save_pretrained``, and each
        ``extra_json`` {file name: data} as JSON beside them; replaces atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        for name, data in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n")
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        return path


__all__ = ["HFModel", "LoadSource", "TokenBatch", "LMRunOutput", "load_causal_lm", "find_blocks", "remove_blocks",
           "blocks_removed", "resolve_dtype", "dtype_name", "text_config", "ContextTooLongError", "ChatTemplateError",
           "UnsupportedModelError"]
