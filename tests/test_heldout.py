"""Shared held-out runs: identical numbers to a from-scratch evaluation, fewer forward passes."""

from __future__ import annotations

import numpy as np
import pytest

import dataclasses

from tapioca.api import evaluate, load_task, workload
from tapioca.analysis.heldout import HeldoutRuns
from tapioca.models.gates import removal_gates


@pytest.fixture
def task(tiny_cfg):
    return load_task(tiny_cfg)


def heldout_runs(model, task, seed: int, n: int, chunk: int) -> HeldoutRuns:
    wl = workload(model, task)
    return HeldoutRuns(dataclasses.replace(wl, sizes=dataclasses.replace(wl.sizes, eval_chunk=chunk)), seed, n)


@pytest.mark.parametrize("removed", [[], [0], [1], [2], [2, 1], [0, 2]])
def test_resumed_runs_equal_from_scratch_evaluation(tiny_model, task, removed):
    runs = heldout_runs(tiny_model, task, seed=3, n=40, chunk=16)  # 3 chunks, the last one short
    runs([1], ["x_scale_2"])  # another distribution first, so the cache must switch
    got = runs(removed, ["id", "x_scale_2"])
    want = evaluate(tiny_model, task, removal_gates(removed), ["id", "x_scale_2"], [3], 40, 16)
    for dist in ("id", "x_scale_2"):
        np.testing.assert_array_equal(got.predictions[dist], want.predictions[dist])
        for metric in want.values[dist]:
            np.testing.assert_array_equal(got.values[dist][metric], want.values[dist][metric])
        np.testing.assert_array_equal(got.seeds[dist], want.seeds[dist])


def test_identical_removal_sets_run_once(tiny_model, task):
    runs = heldout_runs(tiny_model, task, seed=0, n=16, chunk=16)
    first = runs([2, 0], ["id"])
    assert runs.runs == 2  # the full model (recording block inputs), then the resumed run
    assert runs([0, 2], ["id"]) is not None and runs.runs == 2
    runs([], ["id"])
    assert runs.runs == 2  # the full model's evaluation came with the recording
    np.testing.assert_array_equal(runs([0, 2], ["id"]).predictions["id"], first.predictions["id"])
