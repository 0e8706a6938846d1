"""Geometry: exact pairwise distances, profiles, distortion and attribution on inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from tapioca.analysis.geometry import Profile, distortion, mean_pairwise_distance, profile, query_states


def brute_force_pairwise(states: torch.Tensor) -> list[float]:
    out = []
    for layer in states.double():
        n = layer.shape[0]
        dists = [float((layer[i] - layer[j]).norm()) for i in range(n) for j in range(i + 1, n)]
        out.append(sum(dists) / len(dists))
    return out


@pytest.mark.parametrize("n, chunk", [(2, 1), (7, 3), (40, 16), (33, 1024)])
def test_pairwise_distance_equals_a_double_loop(n, chunk):
    states = torch.randn(3, n, 5, generator=torch.Generator().manual_seed(n))
    assert mean_pairwise_distance(states, chunk=chunk).tolist() == pytest.approx(brute_force_pairwise(states), rel=1e-10)


def test_pairwise_distance_known_answer_and_errors():
    square = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # unit square corners
    expected = (4 * 1.0 + 2 * math.sqrt(2)) / 6
    assert float(mean_pairwise_distance(square)[0]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(torch.zeros(1, 1, 3))


def test_profile_norms_and_spread():
    states = torch.zeros(2, 4, 3)
    states[0, :, 0] = 2.0  # every state has norm 2, all equal -> no spread
    states[1] = torch.eye(4, 3) * 3.0  # norms 3, 3, 3, 0
    p = profile(states)
    assert p.norm == pytest.approx([2.0, 2.25])
    assert p.pairwise[0] == 0.0 and p.spread[0] == 0.0
    assert p.pairwise[1] == pytest.approx(brute_force_pairwise(states)[1])
    assert p.n == 4


def test_distortion_is_zero_against_itself_and_scales_with_deviation():
    ref = Profile(norm=[1.0, 2.0, 4.0], pairwise=[0.5, 1.0, 2.0], n=10)
    assert distortion(ref, ref).D == 0.0
    shifted = Profile(norm=[1.0, 3.0, 8.0], pairwise=[0.5, 1.0, 3.0], n=10)
    d = distortion(shifted, ref)
    assert d.delta_norm == pytest.approx([0.0, 0.5, 1.0])
    assert d.delta_pairwise == pytest.approx([0.0, 0.0, 0.5])
    assert d.D == pytest.approx(math.sqrt(0.25 + 1.0 + 0.25))
    # attribution: |delta(l)| - |delta(l-1)| per block; it telescopes to |delta(L)| - |delta(0)|
    assert d.attribution == pytest.approx([0.5, math.sqrt(1.25) - 0.5])
    assert sum(d.attribution) == pytest.approx(math.sqrt(1.25))


def test_distortion_against_a_zero_reference_is_zero_when_equal_and_flagged_when_not():
    # text prompts ending in one token: every query embedding coincides, so P(0) = 0 for both samples
    ref = Profile(norm=[1.0, 2.0], pairwise=[0.0, 1.0], n=10)
    same_token = Profile(norm=[1.0, 3.0], pairwise=[0.0, 1.0], n=10)
    d = distortion(same_token, ref)
    assert d.delta_pairwise == [0.0, 0.0] and d.undefined == [] and d.D == pytest.approx(0.5)
    other_token = Profile(norm=[1.0, 3.0], pairwise=[0.2, 1.0], n=10)
    d = distortion(other_token, ref)
    assert d.delta_pairwise == [0.0, 0.0] and d.undefined == [0] and d.D == pytest.approx(0.5)


def test_query_states_of_a_pruned_model_pass_removed_blocks_through(tiny_model, tiny_cfg):
    from tapioca.tasks.polyreg import PolyRegTask

    batch = PolyRegTask(tiny_cfg.task).data("id", "heldout", 0, 12)
    full = query_states(tiny_model, batch, chunk=5)
    pruned = query_states(tiny_model, batch, {1: 0.0}, chunk=5)
    n_blocks = tiny_model.n_blocks
    assert full.shape == (n_blocks + 1, 12, tiny_cfg.model.n_embd)
    assert torch.equal(pruned[2], pruned[1])  # block 1 removed: its output is its input
    assert torch.equal(pruned[:2], full[:2])  # blocks before it untouched
    assert not torch.equal(pruned[-1], full[-1])
