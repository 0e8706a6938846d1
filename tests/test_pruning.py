"""Pruning searches: TALE's greedy logic on synthetic scores, a planted harmful block, baselines, resume."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import tapioca
from tapioca.config import load_config
from tapioca.errors import ConfigError
from tapioca.analysis.evaluation import selection_scorer
from tapioca.io import read_json, write_json
from tapioca.models.icl import ICLModel
from tapioca.pruning.searches import SEARCHES, PruneResult, SearchContext, get_search, tale_search
from tapioca.tasks.polyreg import PolyRegTask

TINY = ["model.n_layer=4", "model.n_embd=16", "model.n_head=2", "train.steps=150", "train.warmup_steps=10",
        "train.curriculum_interval=5", "train.curriculum_degree_steps=60", "pruning.n_select=128",
        "evaluation.n_heldout=64"]


class FakeModel:
    """Just enough of a BlockModel for searches that only call the scorer."""

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks


def additive_scorer(gains: dict[int, float], calls: list | None = None):
    """Score = sum of per-block gains of the removed blocks (a removed block with gain g adds g)."""
    def scorer(gates):
        if calls is not None:
            calls.append(dict(gates))
        return torch.tensor([float(sum(gains.get(b, -1.0) for b, a in gates.items() if a == 0.0))] * 4)
    return scorer


def tale(gains, n_blocks=6, **kwargs) -> PruneResult:
    ctx = SearchContext(model=FakeModel(n_blocks), batch=None, scorer=additive_scorer(gains), progress=False, **kwargs)
    return tale_search(ctx)


def test_tale_removes_in_order_of_gain_and_stops_below_floor():
    result = tale({4: 0.5, 1: 0.3, 2: 0.01}, epsilon=0.08)
    # Greedy: 4 (0.5), then 1 (0.8), then 2 (0.81); next best is -1 + 0.81 < 0 - 0.08 -> stop.
    assert result.path == [4, 1, 2]
    assert result.best == [4, 1, 2] and result.removed == result.best and result.final == [4, 1, 2]
    assert result.baseline_score == 0.0
    assert [r["accepted"] for r in result.rounds] == [True, True, True, False]
    assert result.rounds[0]["candidates"]["4"] == pytest.approx(0.5)
    assert len(result.rounds[0]["candidates"]) == 6 and len(result.rounds[1]["candidates"]) == 5


def table_scorer(table: dict[tuple[int, ...], float]):
    """Score of a configuration looked up by its sorted removed blocks; anything else scores -1."""
    def scorer(gates):
        key = tuple(sorted(b for b, a in gates.items() if a == 0.0))
        return torch.full((4,), table.get(key, -1.0), dtype=torch.float64)
    return scorer


def test_tale_best_bsba_and_final_are_different_configurations():
    table = {(): 0.0, (3,): -0.05, (0, 3): 0.01, (0, 3, 5): -0.02, (0, 1, 3, 5): 0.0}
    ctx = SearchContext(model=FakeModel(6), batch=None, scorer=table_scorer(table), epsilon=0.08, progress=False)
    result = tale_search(ctx)
    assert result.path == [3, 0, 5, 1]
    assert result.path_scores == pytest.approx([-0.05, 0.01, -0.02, 0.0])
    assert result.best == [3, 0]  # highest selection score
    assert result.bsba == [3, 0, 5, 1]  # deepest configuration still >= baseline
    assert result.final == [3, 0, 5, 1]  # deepest above the floor
    assert result.removed == result.best
    for choose in ("bsba", "final"):
        ctx = SearchContext(model=FakeModel(6), batch=None, scorer=table_scorer(table), epsilon=0.08,
                            progress=False, choose=choose)
        assert tale_search(ctx).removed == getattr(result, choose)


def test_tale_best_prefers_fewer_blocks_on_ties_and_final_can_be_worse_than_baseline():
    table = {(): 0.0, (2,): 0.0, (2, 4): -0.07}
    ctx = SearchContext(model=FakeModel(6), batch=None, scorer=table_scorer(table), epsilon=0.08, progress=False)
    result = tale_search(ctx)
    assert result.path == [2, 4]
    assert result.best == []  # ties with the baseline -> fewer blocks
    assert result.bsba == [2]
    assert result.final == [2, 4]


def test_tale_ties_go_to_the_lowest_index_and_max_drop_is_respected():
    result = tale({2: 0.1, 5: 0.1, 1: 0.1}, epsilon=0.0, max_drop=2)
    assert result.path == [1, 2]
    assert len(result.rounds) == 2


def test_tale_no_improving_block_keeps_the_full_model():
    result = tale({}, epsilon=0.08)
    assert result.removed == [] and result.path == []
    assert len(result.rounds) == 1 and not result.rounds[0]["accepted"]


def test_tale_resumes_from_its_score_cache(tmp_path):
    gains = {4: 0.5, 1: 0.3}
    cache = tmp_path / "scores.json"
    calls: list = []

    def failing(gates, _n=[0]):
        _n[0] += 1
        if _n[0] > 5:
            raise KeyboardInterrupt
        return additive_scorer(gains, calls)(gates)

    with pytest.raises(KeyboardInterrupt):
        tale_search(SearchContext(model=FakeModel(6), batch=None, scorer=failing, progress=False, cache_path=cache))
    assert len(calls) == 5
    resumed_calls: list = []
    ctx = SearchContext(model=FakeModel(6), batch=None, scorer=additive_scorer(gains, resumed_calls),
                        progress=False, cache_path=cache)
    resumed = tale_search(ctx)
    assert resumed.path == tale(gains).path
    assert all(c not in calls for c in resumed_calls)  # nothing evaluated twice
    assert resumed.info["configurations_evaluated"] == len(resumed_calls)


def test_one_shot_searches_read_scores_from_a_shared_cache(tmp_path):
    from tapioca.io import read_json, write_json

    cache = tmp_path / "scores.json"
    write_json(cache, {"": 1.5, "5": 2.5})  # as TALE leaves them: full model and single removals
    calls: list = []
    ctx = SearchContext(model=FakeModel(6), batch=None, scorer=additive_scorer({}, calls), progress=False,
                        cache_path=cache, n_remove=1)
    result = SEARCHES["last_k"](ctx)
    assert result.removed == [5] and (result.baseline_score, result.selection_score) == (1.5, 2.5) and not calls
    ctx.n_remove = 2
    two = SEARCHES["last_k"](ctx)
    assert two.selection_score == -2.0 and len(calls) == 1 and read_json(cache)["4,5"] == -2.0  # new ones stored


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    cfg = load_config(None, TINY)
    return cfg, tapioca.train(cfg, progress=False), PolyRegTask(cfg.task)


class NoisyBlock(nn.Module):
    """A planted harmful block: adds large fixed-seed noise to the residual stream."""

    def __init__(self, block: nn.Module, scale: float) -> None:
        super().__init__()
        self.block, self.scale = block, scale

    def forward(self, hidden, *args, **kwargs):
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(hidden.shape, generator=gen).to(hidden)
        return self.block(hidden, *args, **kwargs) + self.scale * noise


def test_tale_removes_a_planted_noise_block_first(trained):
    cfg, model, task = trained
    planted = ICLModel(cfg.model)
    planted.load_state_dict(model.state_dict())
    planted.backbone.h[2] = NoisyBlock(planted.backbone.h[2], scale=3.0)
    planted.eval()
    result = tapioca.prune(planted, task, "tale", "target", "id", cfg=cfg.pruning, progress=False)
    assert result.rounds[0]["chosen"] == 2
    assert result.path[0] == 2 and 2 in result.removed
    scores = result.rounds[0]["candidates"]
    assert scores["2"] > max(v for k, v in scores.items() if k != "2")


def test_same_config_and_seed_give_the_same_selection(trained):
    cfg, model, task = trained
    first = tapioca.prune(model, task, "tale", "target", "x_scale_2", cfg=cfg.pruning, seed=3, progress=False)
    second = tapioca.prune(model, task, "tale", "target", "x_scale_2", cfg=cfg.pruning, seed=3, progress=False)
    assert first.to_dict() == second.to_dict()
    assert first.info["selected_on"] == "x_scale_2"


def test_from_id_protocol_selects_on_id(trained):
    cfg, model, task = trained
    result = tapioca.prune(model, task, "tale", "from-id", "x_scale_3", cfg=cfg.pruning, progress=False)
    assert result.info["selected_on"] == "id"


def test_block_influence_removes_a_planted_near_identity_block(trained):
    cfg, model, task = trained
    planted = ICLModel(cfg.model)
    planted.load_state_dict(model.state_dict())
    with torch.no_grad():  # block 1 writes almost nothing into the residual stream
        for name, p in planted.backbone.h[1].named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("c_proj.bias"):
                p.mul_(1e-4)
    planted.eval()
    result = tapioca.prune(planted, task, "block_influence", cfg=cfg.pruning, n_remove=1, progress=False)
    assert result.removed == [1]
    assert result.block_scores[1] == min(result.block_scores.values())


def test_one_shot_baselines_remove_the_requested_number(trained):
    cfg, model, task = trained
    for search in ("block_influence", "angular", "last_k", "random"):
        result = tapioca.prune(model, task, search, cfg=cfg.pruning, n_remove=2, progress=False, seed=1)
        assert len(set(result.removed)) == 2 and all(0 <= b < 4 for b in result.removed), search
    angular = tapioca.prune(model, task, "angular", cfg=cfg.pruning, n_remove=2, progress=False)
    assert angular.removed[1] == angular.removed[0] + 1  # contiguous
    assert tapioca.prune(model, task, "last_k", cfg=cfg.pruning, n_remove=2, progress=False).removed == [2, 3]
    r1 = tapioca.prune(model, task, "random", cfg=cfg.pruning, n_remove=2, progress=False, seed=5)
    r2 = tapioca.prune(model, task, "random", cfg=cfg.pruning, n_remove=2, progress=False, seed=5)
    assert r1.removed == r2.removed


def test_bad_search_requests_are_clear_errors(trained):
    cfg, model, task = trained
    with pytest.raises(ConfigError, match="allowed: .*'tale'"):
        get_search("talee")
    with pytest.raises(ConfigError, match="max_drop: 9 is more blocks than the model has \\(4\\)"):
        tapioca.prune(model, task, "tale", cfg=cfg.pruning, max_drop=9, progress=False)
    with pytest.raises(ConfigError, match="n_remove: 5"):
        tapioca.prune(model, task, "random", cfg=cfg.pruning, n_remove=5, progress=False)
    with pytest.raises(ConfigError, match="unknown distribution 'nope'"):
        tapioca.prune(model, task, "tale", "target", "nope", cfg=cfg.pruning, progress=False)
    with pytest.raises(ConfigError, match="protocol"):
        tapioca.prune(model, task, "tale", "sideways", cfg=cfg.pruning, progress=False)
    assert set(SEARCHES) == {"tale", "block_influence", "angular", "last_k", "random", "distortion", "sleb"}


def test_prune_result_round_trips_through_dict(trained):
    cfg, model, task = trained
    result = tapioca.prune(model, task, "block_influence", cfg=cfg.pruning, progress=False)
    again = PruneResult.from_dict(result.to_dict())
    assert again == result and again.gates == {b: 0.0 for b in result.removed}


@pytest.mark.parametrize("target", ["id", "x_scale_3", "degree_4"])
def test_prefix_reuse_gives_the_same_scores_and_selection_as_naive(trained, target):
    cfg, model, task = trained
    kwargs = dict(cfg=cfg.pruning, progress=False, epsilon=0.5, batch_size=48)  # several chunks, deep search
    fast = tapioca.prune(model, task, "tale", "target", target, prefix_cache=True, **kwargs)
    slow = tapioca.prune(model, task, "tale", "target", target, prefix_cache=False, **kwargs)
    assert fast.info["prefix_cache"] and not slow.info["prefix_cache"]
    assert fast.path == slow.path and fast.removed == slow.removed
    for a, b in zip(fast.rounds, slow.rounds):
        assert a["candidates"].keys() == b["candidates"].keys()
        assert a["candidates"] == b["candidates"]  # bit-identical: the reused prefix is the same computation
    assert len(fast.rounds) >= 2


def base_runs(result: PruneResult) -> list[list[int]]:
    """Configurations whose full pass a prefix-reuse search ran."""
    return [removed for removed, first in result.info["passes"] if first == 0]


def selection_context(trained, target: str, n: int = 96, chunk: int = 32, **kwargs) -> SearchContext:
    cfg, model, task = trained
    batch = task.data(target, "select", 0, n)
    return SearchContext(model=model, batch=batch, scorer=selection_scorer(model, task, batch, "nmse", chunk),
                         score_predictions=functools.partial(task.score, metric="nmse"), epsilon=0.5, chunk=chunk,
                         progress=False, **kwargs)


@pytest.mark.parametrize("target", ["id", "degree_4"])
def test_kept_rounds_match_chunk_by_chunk_rounds_without_repeating_base_passes(trained, target):
    kept = tale_search(selection_context(trained, target))  # 3 chunks; their block inputs fit easily
    chunked = tale_search(selection_context(trained, target, keep_bytes=0))  # one chunk at a time
    assert kept.path == chunked.path and kept.removed == chunked.removed and len(kept.rounds) >= 2
    for a, b in zip(kept.rounds, chunked.rounds):
        assert a["candidates"] == b["candidates"]  # bit-identical: the winner's own pass is the next base
    assert kept.baseline_score == chunked.baseline_score
    assert base_runs(kept) == [[]]  # the baseline's pass only; every later base is a kept winner
    assert base_runs(chunked) == [[], *(sorted(r["removed_before"]) for r in chunked.rounds)]
    first_computed = {tuple(removed): first for removed, first in kept.info["passes"]}
    c = kept.path[0]  # round 2: candidates below the first winner resume above it, from their own round-1 pass
    assert c > 0 or target != "id"  # the ID search removes block 1 first, so some candidates lie below it
    assert all(first_computed[tuple(sorted({c, b}))] == c + 1 for b in range(c))
    assert all(first_computed[tuple(sorted({c, b}))] == b + 1 for b in range(c + 1, 4))


def test_kept_rounds_resume_from_a_partial_score_cache(trained, tmp_path):
    path = tmp_path / "scores.json"
    full = tale_search(selection_context(trained, "id", cache_path=path))
    first_round = {"", *(str(b) for b in range(4))}  # baseline and round 1: its winner's inputs were never kept
    write_json(path, {k: v for k, v in read_json(path).items() if k in first_round})
    again = tale_search(selection_context(trained, "id", cache_path=path))
    assert again.path == full.path and again.rounds == full.rounds
    assert base_runs(again) == [full.path[:1]]  # round 2 needs a base pass of its own


class NormAmplifier(nn.Module):
    """A planted distorting block: grows states by the square of their norm relative to a typical ID norm,
    so inputs with larger norms (e.g. wider x) are amplified far more than ID ones."""

    def __init__(self, block: nn.Module, id_norm: float) -> None:
        super().__init__()
        self.block, self.id_norm = block, id_norm

    def forward(self, hidden, *args, **kwargs):
        out = self.block(hidden, *args, **kwargs)
        return out * (1 + (out.norm(dim=-1, keepdim=True) / self.id_norm) ** 2)


def test_distortion_search_finds_a_planted_distorting_block_without_labels(trained, monkeypatch):
    cfg, model, task = trained
    from tapioca.analysis.geometry import query_states

    id_norm = float(query_states(model, task.data("id", "select", 0, 64))[2].norm(dim=-1).mean())
    planted = ICLModel(cfg.model)
    planted.load_state_dict(model.state_dict())
    planted.backbone.h[1] = NormAmplifier(planted.backbone.h[1], id_norm)
    planted.eval()
    monkeypatch.setattr(task, "score", lambda *a, **k: pytest.fail("labels were used"), raising=False)
    monkeypatch.setattr("tapioca.pruning.searches._one_shot", lambda ctx, name, removed, scores: (removed, scores))
    removed, attribution = tapioca.pruning.searches.distortion_search(SearchContext(
        model=planted, batch=task.data("x_scale_3", "select", 0, 128), scorer=None, progress=False,
        reference_batch=task.data("id", "select", 0, 128)))
    assert removed == [1]
    assert attribution[1] == max(attribution.values())
