"""Shared fixtures and helpers: a tiny config, a tiny ICL model, the tiny Hugging Face models of every supported
family (``build``) and tiny text tasks (``tiny_lm``, ``mc_task``, ``plant``, ...); one CPU thread for light test runs; and
:func:`assert_close_scaled` for results that reach the same numbers by different kernels."""

from __future__ import annotations

import random
import string
from typing import Any

import pytest
import torch
import transformers

from tapioca.config import Config, load_config
from tapioca.models.base import run_in_chunks
from tapioca.models.hf import HFModel
from tapioca.models.icl import ICLModel
from tapioca.tasks.choices import ChoiceModel, choice_batch, choice_table, task_choices
from tapioca.tasks.text import TextExample, TextTask, TextTaskConfig
from tapioca.tasks.text_sources import TableSource

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

# ---------------------------------------------------------------------------------------------------------
# The tiny Hugging Face models (one per supported family) and the tiny text tasks the tests share

WINDOW = 64
SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=WINDOW, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **SHAPE),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                              max_window_layers=2, **SHAPE),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        num_key_value_heads=2, head_dim=8, sliding_window=4, pad_token_id=None, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"], **SHAPE),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=WINDOW,
                                            bos_token_id=1, eos_token_id=2, initializer_range=0.3),
    "neox": lambda: transformers.GPTNeoXConfig(**SHAPE),
}
BLOCK_PATHS = {"llama": "model.layers", "qwen2": "model.layers", "gemma3": "model.layers", "gpt2": "transformer.h",
               "neox": "gpt_neox.layers"}
PROMPTS = ["the cat sat on", "a b", "hello there, how are you today?"]
CONTINUATIONS = [" the mat", " c", " fine."]


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer (48 tokens) that prepends <s> like Llama's, with no pad token."""
    from tokenizers import Tokenizer, decoders, models, processors

    chars = list(string.ascii_lowercase + string.digits + " .,:?!<>\n")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def build(family: str) -> HFModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    return HFModel(model, char_tokenizer())


CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
WORDS = ["cat", "dog", "eel", "fox", "gnu", "hen", "owl", "yak"]
PLANTED = 2  # the block made harmful in the planted tests


def tokenizer(letter_tokens: bool = True) -> transformers.PreTrainedTokenizerFast:
    """Character-level tokenizer that prepends <s>; with ``letter_tokens`` " A".." D" are single tokens."""
    from tokenizers import Tokenizer, decoders, models, processors

    merges = [(" ", c) for c in "ABCD"] if letter_tokens else []
    tokens = ["<unk>", "<s>", "</s>", *CHARS, *(a + b for a, b in merges)]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def tiny_lm(letter_tokens: bool = True, seed: int = 0) -> HFModel:
    cfg = transformers.LlamaConfig(vocab_size=112, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    torch.manual_seed(seed)
    return HFModel(transformers.LlamaForCausalLM(cfg).eval(), tokenizer(letter_tokens))


def questions(dist: str, n: int, seed: int, n_choices: int = 4) -> list[TextExample]:
    rng = random.Random(f"{dist}{seed}")
    out = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9) if dist == "id" else rng.randint(100, 999)
        choices = tuple(rng.sample(WORDS, n_choices))
        out.append(TextExample(f"{dist} {i}: {a} and {b}?", rng.randrange(n_choices), choices))
    return out


def make_task(pools: dict[str, list[TextExample]], mc_format: str = "letters", n_shots: int = 0) -> TextTask:
    kind = "multiple_choice" if pools["id"][0].choices is not None else "short_answer"
    columns = {"question": "q", "answer": "a", "split": "s", **({"choices": "c"} if kind == "multiple_choice" else {})}
    cfg = TextTaskConfig(source="jsonl", path="in-memory", columns=columns, splits={d: [d] for d in pools},
                         n_shots=n_shots, mc_format=mc_format)
    return TextTask(cfg, source=TableSource(pools, kind, cfg.splits))


def mc_task(mc_format: str = "letters", n: int = 60, n_shots: int = 0) -> TextTask:
    return make_task({d: questions(d, n, 0) for d in ("id", "wide")}, mc_format, n_shots)


def relabel(lm: HFModel, task: TextTask, gates: dict[int, float]) -> TextTask:
    """The same questions labelled with the top choice of ``lm`` under ``gates``."""
    pools = {}
    for dist, pool in task.source.examples.items():
        prompts = task.prompts(pool, 0)
        conts, labels = task_choices(pool, task.cfg.mc_format)
        batch = choice_batch(lm, prompts, conts, labels)
        table = choice_table(run_in_chunks(ChoiceModel(lm), batch, gates, False, 64).predictions, batch)
        pools[dist] = [TextExample(ex.question, int(k), ex.choices) for ex, k in zip(pool, table.argmax(1))]
    return make_task(pools, task.cfg.mc_format, task.cfg.n_shots)


def plant(lm: HFModel, block: int, scale: float = 30.0) -> None:
    """Blow up a block's residual contribution (attention and MLP output projections)."""
    with torch.no_grad():
        lm.blocks[block].self_attn.o_proj.weight.mul_(scale)
        lm.blocks[block].mlp.down_proj.weight.mul_(scale)


# ---------------------------------------------------------------- choice batches


def sa_task() -> TextTask:
    rng = random.Random(0)
    pools = {d: [TextExample(f"{d} {i}: {rng.randint(1, 9)} plus {rng.randint(1, 9)}?", str(rng.randint(2, 18)))
                 for i in range(40)] for d in ("id", "big")}
    return make_task(pools)
