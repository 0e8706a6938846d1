"""A pruned model written by tapioca is an ordinary Hugging Face folder: it reloads with AutoModelForCausalLM and
generates (KV cache on) exactly like the gated model; block matching recognises models pruned by other tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from tapioca.api import save_pruned
from tapioca.cli import main
from tapioca.errors import ConfigError
from tapioca.models.gates import gated, removal_gates
from tapioca.models.hf import HFModel, find_blocks
from tapioca.models.hf_save import PROVENANCE_FILE, by_original_block, match_blocks, read_provenance
from tapioca.models.icl import load_model, save_model

from conftest import PROMPTS, TINY_OVERRIDES, assert_close_scaled, build

GOLDEN = Path(__file__).parent / "data" / "golden"
LONG = "the quick brown fox jumps over the lazy dog"


def reload(folder: Path) -> HFModel:
    """The folder as any Hugging Face user loads it (the tokenizer by its backend class: AutoTokenizer maps
    a qwen2 config to Qwen2's own tokenizer class, which the tests' character tokenizer is not)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    return HFModel(model, transformers.PreTrainedTokenizerFast.from_pretrained(str(folder)))


def hf_generate(lm: HFModel, prompt: str, steps: int) -> list[int]:
    """Plain ``model.generate`` (greedy, KV cache) on one prompt: the new token ids."""
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                            do_sample=False, use_cache=True, pad_token_id=2, eos_token_id=2)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family, removed", [("llama", [1]), ("gemma3", [0, 2]), ("qwen2", [1])])
def test_saved_model_reloads_and_generates_like_the_gated_model(tmp_path: Path, family: str, removed: list[int]):
    lm = build(family)
    folder = save_pruned(lm, removed, tmp_path / "pruned", {"search": "manual"})
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert lm.n_blocks == 4  # the original is untouched
    pruned = reload(folder)
    config = pruned.model.config
    assert config.num_hidden_layers == pruned.n_blocks == 4 - len(removed)
    if getattr(lm.model.config, "layer_types", None) is not None:
        assert config.layer_types == [t for i, t in enumerate(lm.model.config.layer_types) if i not in removed]
    for position, block in enumerate(pruned.blocks):  # KV-cache slots follow the new positions
        assert all(m.layer_idx == position for m in block.modules() if hasattr(m, "layer_idx"))
    gates = removal_gates(removed)
    assert pruned.generate(PROMPTS, max_new_tokens=8, batch_size=3) == lm.generate(PROMPTS, gates, max_new_tokens=8,
                                                                                   batch_size=3)
    with gated(lm.blocks, gates):  # the gated model through plain HF generate, cache on
        expected = hf_generate(lm, LONG, 8)
    assert hf_generate(pruned, LONG, 8) == expected
    ids = torch.tensor([lm.tokenizer(LONG)["input_ids"]])
    with torch.no_grad(), gated(lm.blocks, gates):
        gated_logits = lm.model(ids, use_cache=False).logits
    with torch.no_grad():
        assert_close_scaled(pruned.model(ids, use_cache=False).logits, gated_logits)
    record = read_provenance(folder)
    assert record["removed"] == removed and record["kept"] == [i for i in range(4) if i not in removed]
    assert record["n_blocks_original"] == 4 and record["search"] == "manual"


def test_any_config_list_with_one_entry_per_layer_is_cut(tmp_path: Path):
    lm = build("llama")
    lm.model.config.per_layer_scale = [0.1, 0.2, 0.3, 0.4]  # a list a tool might add: one entry per layer
    lm.model.config.eos_token_id = [2, 2, 2, 2]  # token lists are never per-layer
    folder = save_pruned(lm, [1, 3], tmp_path / "p")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["per_layer_scale"] == [0.1, 0.3] and saved["num_hidden_layers"] == 2
    assert saved["eos_token_id"] == [2, 2, 2, 2] and lm.model.config.per_layer_scale == [0.1, 0.2, 0.3, 0.4]
    assert "per_layer_scale" in read_provenance(folder)["config_lists_trimmed"]


def test_bad_removals_are_one_line_errors(tmp_path: Path):
    lm = build("llama")
    with pytest.raises(ConfigError, match="cannot remove all 4 blocks"):
        save_pruned(lm, [0, 1, 2, 3], tmp_path / "p")
    with pytest.raises(ConfigError, match="allowed: integers 0..3"):
        save_pruned(lm, [7], tmp_path / "p")
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------- block matching


def sliced(lm: HFModel, keep: list[int]) -> nn.Module:
    """What ShortGPT-style scripts and mergekit passthrough slices do: a copy with the layer list sliced and
    the layer count fixed (nothing else)."""
    import copy

    model = copy.deepcopy(lm.model)
    model.model.layers = nn.ModuleList([model.model.layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    return model


def test_match_blocks_infers_the_kept_blocks_of_a_sliced_model():
    lm = build("llama")
    found = match_blocks(lm.model, sliced(lm, [0, 1, 3]))
    assert found.ok and found.in_order and found.kept == [0, 1, 3] and found.removed == [2]
    assert found.rest_equal and "keeps original blocks [0, 1, 3]" in found.message
    repeated = match_blocks(lm.model, sliced(lm, [0, 1, 1, 2]))  # a passthrough merge that repeats a block
    assert repeated.kept == [0, 1, 1, 2] and not repeated.in_order and "repeated or reordered" in repeated.message


def test_match_blocks_says_when_it_cannot_infer():
    lm = build("llama")
    tuned = sliced(lm, [0, 2, 3])
    with torch.no_grad():
        tuned.model.layers[1].mlp.up_proj.weight.add_(1e-3)
    found = match_blocks(lm.model, tuned)
    assert not found.ok and found.kept is None
    assert found.message.startswith("cannot infer: layer 1 of the pruned model matches no original layer")
    with torch.no_grad():  # within the relative tolerance still matches
        tiny = sliced(lm, [0, 2, 3])
        w = tiny.model.layers[1].mlp.up_proj.weight
        w.add_(1e-8 * w.norm() / w.numel() ** 0.5)
    assert match_blocks(lm.model, tiny).kept == [0, 2, 3]


def test_states_by_original_block_equal_the_gated_models():
    lm = build("llama")
    batch = lm.tokenize(PROMPTS)
    gated_states = lm.run(batch, removal_gates([1, 2]), capture=True).states  # (5, B, D)
    pruned_states = lm.pruned_copy([1, 2]).run(batch, capture=True).states  # (3, B, D)
    assert_close_scaled(by_original_block(pruned_states, [0, 3], 4), gated_states)


# ---------------------------------------------------------------- the command line


def lm_config(folder: Path) -> Path:
    task = {"source": "jsonl", "path": str(GOLDEN / "items.jsonl"), "n_shots": 0,
            "columns": {"question": "q", "choices": "c", "answer": "a", "split": "s"},
            "splits": {"id": ["id"], "wide": ["wide"]}}
    cfg = {"lm": {"model": str(GOLDEN / "tiny-llama"), "task": task, "metric": "acc", "n_select": 16,
                  "n_heldout": 16, "batch_size": 8},
           "pruning": {"max_drop": 1}, "evaluation": {"seeds": [0], "n_bootstrap": 200}}
    path = folder / "lm.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_prune_save_writes_a_loadable_pruned_language_model(tmp_path: Path):
    out, saved = tmp_path / "prune", tmp_path / "model"
    assert main(["prune", "--config", str(lm_config(tmp_path)), "--out", str(out), "--save", str(saved),
                 "--set", "pruning.target=wide", "--quiet"]) == 0
    removed = json.loads((out / "pruning.json").read_text())["removed"]
    record = json.loads((saved / PROVENANCE_FILE).read_text())
    assert record["removed"] == sorted(removed) and record["search"] == "tale"
    assert record["search_info"]["selected_on"] == "wide" and record["original"] == str(GOLDEN / "tiny-llama")
    pruned = reload(saved)
    assert pruned.n_blocks == 4 - len(removed) and len(find_blocks(pruned.model)) == pruned.n_blocks
    base = HFModel.load(GOLDEN / "tiny-llama")
    assert pruned.generate(PROMPTS, max_new_tokens=6) == base.generate(PROMPTS, removal_gates(removed),
                                                                       max_new_tokens=6)


def test_prune_save_on_the_testbed_writes_a_sliced_model(tmp_path: Path, tiny_model):
    save_model(tiny_model, tmp_path / "m")
    sets = [a for o in TINY_OVERRIDES for a in ("--set", o)]
    assert main(["prune", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "p"), "--save",
                 str(tmp_path / "s"), *sets, "--set", "pruning.search=last_k", "--set", "pruning.n_remove=1",
                 "--set", "pruning.n_select=16", "--quiet"]) == 0
    sliced_model = load_model(tmp_path / "s")
    assert sliced_model.n_blocks == 2
    meta = json.loads((tmp_path / "s" / "model.json").read_text())
    assert meta["pruning"]["removed"] == [2] and meta["pruning"]["search"] == "last_k"
