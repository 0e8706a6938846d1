"""ResumedRuns: gated runs resumed from the full model's residual stream equal plain gated runs exactly."""

from __future__ import annotations

import pytest
import torch

from tapioca.tasks.choices import lm_selection
from tapioca.models.base import run_in_chunks
from tapioca.models.resumed import ResumedRuns
from tapioca.tasks.polyreg import PolyRegTask

from conftest import mc_task, tiny_lm


GATES = [{}, {2: 0.0}, {0: 0.5, 2: 0.0}, {2: 1.5}, {0: 0.25}, {1: 1.0}, {1: 0.0, 2: 0.0}]


def assert_same_runs(model, batch, chunk: int) -> ResumedRuns:
    runs = ResumedRuns(model, batch, chunk)
    for gates in GATES:
        for capture in (False, True):
            want = run_in_chunks(model, batch, gates, capture=capture, chunk=chunk)
            got = runs(gates, capture=capture)
            assert torch.equal(got.predictions, want.predictions), gates
            assert (got.states is None) == (not capture)
            if capture:
                assert torch.equal(got.states, want.states), gates
    return runs


def test_resumed_testbed_runs_equal_plain_gated_runs(tiny_model, tiny_cfg) -> None:
    batch = PolyRegTask(tiny_cfg.task).data("x_scale_3", "heldout", 0, 20)
    runs = assert_same_runs(tiny_model, batch, chunk=7)
    assert runs.passes == 1 + sum(any(a != 1.0 for a in g.values()) for g in GATES) * 2  # full pass recorded once


def test_resumed_lm_runs_equal_plain_gated_runs() -> None:
    lm = tiny_lm(True)
    sel = lm_selection(lm, mc_task(n_shots=1), "wide", n=10, metric="loglik")
    assert_same_runs(sel.model, sel.batch, chunk=4)


def test_bad_gates_are_refused(tiny_model, tiny_cfg) -> None:
    runs = ResumedRuns(tiny_model, PolyRegTask(tiny_cfg.task).data("id", "heldout", 0, 4), chunk=4)
    with pytest.raises(ValueError, match="not a block"):
        runs({99: 0.0})
