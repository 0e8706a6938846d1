"""Interventions: residual-scaling sweep end points and norm matching."""

from __future__ import annotations

import pytest
import torch

from tapioca.analysis.geometry import distortion, profile, query_states
from tapioca.analysis.interventions import norm_matched, position_norms, residual_scaling_sweep
from tapioca.tasks.polyreg import PolyRegTask

from conftest import assert_close_scaled


@pytest.fixture
def setup(tiny_model, tiny_cfg):
    task = PolyRegTask(tiny_cfg.task)
    return tiny_model, task, task.data("id", "heldout", 0, 16), task.data("x_scale_3", "heldout", 0, 16)


def test_sweep_end_points_are_the_full_and_the_pruned_model(setup):
    model, task, id_batch, ood_batch = setup
    score = lambda preds, batch: task.score(preds, batch, "nmse")
    points = residual_scaling_sweep(model, [1], ood_batch, id_batch, score, alphas=(0.0, 0.5, 1.0), chunk=7)
    full = score(model.run(ood_batch).predictions, ood_batch).double().mean()
    pruned = score(model.run(ood_batch, {1: 0.0}).predictions, ood_batch).double().mean()
    assert [p.alpha for p in points] == [0.0, 0.5, 1.0]
    assert_close_scaled(points[2].score, full)  # chunks of 7 there, one batch of 16 here
    assert_close_scaled(points[0].score, pruned)
    assert points[1].score not in (points[0].score, points[2].score)
    assert all(p.D > 0 for p in points)
    full_d = distortion(profile(query_states(model, ood_batch)), profile(query_states(model, id_batch))).D
    gates = {1: 0.0}
    pruned_d = distortion(profile(query_states(model, ood_batch, gates)), profile(query_states(model, id_batch, gates))).D
    assert_close_scaled([points[2].D, points[0].D], [full_d, pruned_d])


def test_shared_id_profiles_give_the_same_sweeps(setup, tiny_cfg):
    model, task, id_batch, ood_batch = setup
    score = lambda preds, batch: task.score(preds, batch, "nmse")
    other = task.data("degree_4", "heldout", 0, 16)
    shared: dict = {}
    for batch, blocks in ((ood_batch, [1]), (other, [1]), (other, [0, 2])):
        alone = residual_scaling_sweep(model, blocks, batch, id_batch, score, alphas=(0.0, 1.0), chunk=7)
        assert residual_scaling_sweep(model, blocks, batch, id_batch, score, (0.0, 1.0), 7, shared) == alone
    assert set(shared) == {(), ((1, 0.0),), ((0, 0.0), (2, 0.0))}  # alpha 1 is the full model for every sweep


def test_norm_matching_forces_the_target_norms_and_keeps_directions(setup):
    model, task, id_batch, ood_batch = setup
    id_norms = position_norms(model, id_batch)  # (L, T)
    assert id_norms.shape == (model.n_blocks, 2 * id_batch.xs.shape[1] - 1)
    with norm_matched(model, {0: id_norms[0]}):
        matched = position_norms(model, ood_batch)
    assert torch.allclose(matched[0], id_norms[0].to(matched), rtol=1e-5)
    ood = position_norms(model, ood_batch)
    assert not torch.allclose(ood[0], id_norms[0], rtol=1e-2)
    assert all(not b._forward_hooks for b in model.blocks)  # hooks gone


def test_norm_matching_hooks_are_removed_after_an_error(setup):
    model, task, id_batch, ood_batch = setup
    before = model.run(ood_batch).predictions
    with pytest.raises(RuntimeError, match="boom"):
        with norm_matched(model, {0: torch.ones(200)}):
            raise RuntimeError("boom")
    assert all(not b._forward_hooks for b in model.blocks)
    assert torch.equal(model.run(ood_batch).predictions, before)
