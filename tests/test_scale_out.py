"""Scaling the search out: pruning.workers / ray_address, HFReplica, ChoiceReplica, device_map loading, CLI flags.

One test starts real local Ray (the testbed TALE on 2 workers); the LM worker path runs in-process.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle

import pytest
import torch

import tapioca
import tapioca.tasks.choices
from tapioca.api import load_task
from tapioca.cli import build_parser, main, resolve_config
from tapioca.config import PruningConfig, load_config
from tapioca.errors import ConfigError
from tapioca.tasks.choices import ChoiceModel, ChoiceReplica, prune_lm
from tapioca.models.gates import removal_gates
from tapioca.models.hf import HFModel, LoadSource, load_causal_lm
from tapioca.pruning.parallel import CandidateWorker, HFReplica, split_candidates
from tapioca.pruning.searches import tale_search

from conftest import CONTINUATIONS, PROMPTS, build, mc_task, tiny_lm

# ---------------------------------------------------------------- config


def test_workers_default_to_serial_and_addresses_are_accepted() -> None:
    assert PruningConfig().workers == 0 and PruningConfig().ray_address is None
    for address in ("auto", "ray://head:10001", "ray://head", "10.0.0.1:6379"):
        cfg = load_config(None, ["pruning.workers=2", f"pruning.ray_address={address}"])
        assert cfg.pruning.workers == 2 and cfg.pruning.ray_address == address


@pytest.mark.parametrize("override, message", [
    ("pruning.workers=-1", "pruning.workers: -1 is not allowed; expected a value >= 0"),
    ("pruning.workers=1.5", "pruning.workers: 1.5 is not allowed; expected an integer"),
    ("pruning.workers=true", "pruning.workers: True is not allowed; expected an integer"),
    ("pruning.ray_address=http://head:80", "pruning.ray_address: 'http://head:80' is not allowed; expected \"auto\""),
    ("pruning.ray_address=3", "pruning.ray_address: 3 is not allowed; expected a string"),
])
def test_bad_workers_and_addresses_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["pruning.workers=2", override])
    assert message in str(info.value)


def test_an_address_without_workers_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"pruning\.ray_address: 'auto' has no effect with pruning\.workers=0"):
        load_config(None, ["pruning.ray_address=auto"])


# ---------------------------------------------------------------- testbed API


def test_prune_without_ray_tells_how_to_install_it(tiny_cfg, tiny_model, monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    message = r"pruning\.workers: 2 Ray workers need Ray.*pip install 'tapioca\[parallel\]'"
    with pytest.raises(ConfigError, match=message):
        tapioca.prune(tiny_model, load_task(tiny_cfg), n_select=8, progress=False, workers=2)


def test_prune_on_two_ray_workers_equals_serial(tiny_cfg, tiny_model) -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'tapioca[parallel]')")
    task = load_task(tiny_cfg)
    kw = dict(n_select=32, batch_size=16, epsilon=1e6, progress=False)  # a huge tolerance: TALE removes all 3
    serial = tapioca.prune(tiny_model, task, **kw)
    parallel = tapioca.prune(tiny_model, task, workers=2, **kw)
    assert not ray.is_initialized()
    assert parallel.removed == serial.removed and len(serial.path) == 3
    assert parallel.rounds == serial.rounds  # every candidate score bit-identical
    assert parallel.info["workers"] == 2 and parallel.info["ray_address"] is None
    assert parallel.info["selected_on"] == "id"


# ---------------------------------------------------------------- Hugging Face replicas and device maps


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama with the character tokenizer of test_hf, saved to a folder."""
    return build("llama").save(tmp_path_factory.mktemp("llama") / "m")


def outputs(lm: HFModel, gates=None, capture: bool = False):
    return lm.run(lm.tokenize(PROMPTS, CONTINUATIONS), gates, capture)


def test_hf_replica_pickles_and_rebuilds_the_same_model(llama_folder) -> None:
    lm = HFModel.load(llama_folder, dtype=torch.float32)
    assert lm.source == LoadSource(str(llama_folder.resolve()), "float32")
    replica = HFReplica.of(lm)
    assert replica == HFReplica(str(llama_folder.resolve()), "float32", False, None, None)
    again = pickle.loads(pickle.dumps(replica))
    assert again == replica
    rebuilt = again(torch.device("cpu"))
    assert isinstance(rebuilt, HFModel) and rebuilt is not lm and rebuilt.n_blocks == lm.n_blocks == 4
    for gates in (None, removal_gates([1])):
        ref, out = outputs(lm, gates), outputs(rebuilt, gates)
        assert torch.equal(ref.query_logprobs, out.query_logprobs) and torch.equal(ref.predictions, out.predictions)


def test_hf_replica_checks_dtype_and_needs_a_loaded_model(llama_folder) -> None:
    assert HFReplica(str(llama_folder), torch.bfloat16).dtype == "bfloat16"
    with pytest.raises(ConfigError, match="dtype 'float64' is not supported"):
        HFReplica(str(llama_folder), "float64")
    with pytest.raises(ConfigError, match="not made by HFModel.load"):
        HFReplica.of(build("llama"))
    assert build("llama").source is None and HFModel.load(llama_folder).pruned_copy([0]).source is None


def assert_same_runs(ref: HFModel, lm: HFModel) -> None:
    """Equal log-likelihoods, next-token distributions and captured states (5, B, 32) under several gates."""
    for gates in (None, removal_gates([0, 2]), {1: 0.5}):
        a, b = outputs(ref, gates, capture=True), outputs(lm, gates, capture=True)
        assert torch.equal(a.query_logprobs, b.query_logprobs) and torch.equal(a.predictions, b.predictions)
        assert b.states.shape == (5, len(PROMPTS), 32) and torch.equal(a.states, b.states)


def test_device_map_load_equals_the_plain_load_with_gates_and_capture(llama_folder) -> None:
    plain = HFModel.load(llama_folder)
    mapped = HFModel.load(llama_folder, device="meta", device_map={"": "cpu"})  # device is ignored
    assert mapped.device == torch.device("cpu") and {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    assert mapped.source.device_map == {"": "cpu"} and HFReplica.of(mapped).device_map == {"": "cpu"}
    assert_same_runs(plain, mapped)


def test_gates_and_capture_work_through_accelerate_hooks(llama_folder) -> None:
    """A model dispatched block by block (what a multi-device ``device_map`` does; here all on the CPU)."""
    accelerate = pytest.importorskip("accelerate")
    plain = HFModel.load(llama_folder)
    model, tokenizer = load_causal_lm(llama_folder)
    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)), "model.norm", "model.rotary_emb",
             "lm_head"]
    hooked = HFModel(accelerate.dispatch_model(model, dict.fromkeys(names, "cpu"), force_hooks=True), tokenizer)
    forward = hooked.blocks[1].forward
    assert hasattr(hooked.blocks[1], "_hf_hook") and hooked.device == torch.device("cpu")
    assert_same_runs(plain, hooked)
    assert hooked.blocks[1].forward == forward  # the gates put accelerate's forward back


# ---------------------------------------------------------------- LM search on workers (in-process, no Ray)


def in_process_parallel_tale(ctx, factory, workers=2, address=None, **ray_options):
    """``parallel_tale`` without Ray: the factory is pickled as Ray would, and ``workers`` in-process
    CandidateWorkers share each round."""
    factory = pickle.loads(pickle.dumps(factory))
    pool = [CandidateWorker(factory, ctx.batch, ctx.score_predictions, ctx.chunk, ctx.prefix_cache, None, "cpu")
            for _ in range(workers)]
    assert all(type(w.model) is type(ctx.model) is ChoiceModel for w in pool)

    def evaluate(removed, candidates):
        shares = split_candidates(candidates, workers)
        return {b: s for w, share in zip(pool, shares) for b, s in w.evaluate(removed, share).items()}

    result = tale_search(dataclasses.replace(ctx, candidate_evaluator=evaluate))
    result.info.update(workers=workers, ray_address=address, ray_options=ray_options)
    return result


def test_prune_lm_workers_build_the_search_model_and_select_as_serial(tmp_path, monkeypatch) -> None:
    lm = HFModel.load(tiny_lm().save(tmp_path / "lm"))
    task = mc_task(n=24)
    kw = dict(target="wide", metric="loglik", epsilon=1e6, max_drop=2, n_select=10, batch_size=4, progress=False)
    serial = prune_lm(lm, task, **kw)
    monkeypatch.setattr(tapioca.pruning.parallel, "require_ray", lambda key, workers: None)  # Ray itself is not used here
    monkeypatch.setattr(tapioca.pruning.parallel, "parallel_tale", in_process_parallel_tale)
    split = prune_lm(lm, task, workers=2, ray_address="auto", ray_options={"num_gpus": 0}, **kw)
    assert split.rounds == serial.rounds and split.removed == serial.removed and len(split.path) == 2
    assert split.info["workers"] == 2 and split.info["ray_address"] == "auto"
    assert split.info["ray_options"] == {"num_gpus": 0}
    replica = ChoiceReplica(HFReplica.of(lm))
    assert isinstance(pickle.loads(pickle.dumps(replica))(torch.device("cpu")), ChoiceModel)


def test_prune_lm_workers_clear_errors(monkeypatch) -> None:
    monkeypatch.setattr(tapioca.pruning.parallel, "require_ray", lambda key, workers: None)  # the same errors with or without Ray
    lm, task, kw = tiny_lm(), mc_task(n=24), dict(target="wide", n_select=8, progress=False)
    with pytest.raises(ConfigError, match=r"pruning\.workers: -1 is not allowed"):
        prune_lm(lm, task, workers=-1, **kw)
    with pytest.raises(ConfigError, match=r"pruning\.ray_address: 'auto' has no effect"):
        prune_lm(lm, task, ray_address="auto", **kw)
    with pytest.raises(ConfigError, match=r"pruning\.workers: 2 applies only to search 'tale'"):
        prune_lm(lm, task, "angular", workers=2, **kw)
    with pytest.raises(ConfigError, match="not made by HFModel.load"):
        prune_lm(lm, task, workers=2, **kw)


# ---------------------------------------------------------------- CLI


def test_cli_flags_become_pruning_overrides(tmp_path) -> None:
    parser = build_parser()
    args = parser.parse_args(["prune", "--workers", "2", "--ray-address", "auto", "--out", str(tmp_path)])
    cfg = resolve_config(args)
    assert cfg.pruning.workers == 2 and cfg.pruning.ray_address == "auto" and cfg.run.out == str(tmp_path)
    args = parser.parse_args(["prune", "--set", "pruning.workers=3", "--ray-address", "10.0.0.1:6379"])
    assert resolve_config(args).pruning.ray_address == "10.0.0.1:6379"
    assert resolve_config(parser.parse_args(["prune"])).pruning.workers == 0  # no flags: the config's value


@pytest.mark.parametrize("args, message", [
    (["--ray-address", "auto"], "pruning.ray_address: 'auto' has no effect with pruning.workers=0"),
    (["--workers", "-2"], "pruning.workers: -2 is not allowed; expected a value >= 0"),
    (["--workers", "2", "--set", "pruning.search=angular"], "pruning.workers: 2 applies only to pruning.search=tale"),
])
def test_cli_flag_errors_are_one_line(capsys, tmp_path, args, message) -> None:
    assert main(["prune", "--out", str(tmp_path / "p"), "--quiet", *args]) == 2  # before any model is loaded
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "p").exists()
