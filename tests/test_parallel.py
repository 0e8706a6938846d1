"""TALE rounds on Ray workers give the same candidates, scores and selection as the serial search."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from tapioca.config import ModelConfig, TaskConfig
from tapioca.analysis.evaluation import selection_scorer
from tapioca.models.icl import ICLModel
from tapioca.pruning.parallel import CandidateWorker, ICLReplica, split_candidates
from tapioca.pruning.searches import SearchContext, tale_search
from tapioca.tasks.polyreg import PolyRegTask


def tiny_context(prefix: bool) -> SearchContext:
    """A 4-block untrained model, 40 prompts in chunks of 16, and a tolerance that lets TALE go deep."""
    torch.manual_seed(0)
    model = ICLModel(ModelConfig(n_layer=4, n_embd=16, n_head=2, n_positions=128)).eval()
    task = PolyRegTask(TaskConfig())
    batch = task.data("id", "select", 0, 40)
    return SearchContext(model=model, batch=batch, scorer=selection_scorer(model, task, batch, "nmse", 16),
                         score_predictions=functools.partial(task.score, metric="nmse"), prefix_cache=prefix,
                         epsilon=1e6, chunk=16, progress=False)


def test_split_candidates_interleaves_and_drops_empty_shares():
    assert split_candidates([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert split_candidates([5], 3) == [[5]]


@pytest.mark.parametrize("prefix", [True, False])
def test_in_process_worker_matches_the_serial_search(prefix):
    ctx = tiny_context(prefix)
    worker = CandidateWorker(ICLReplica.of(ctx.model), ctx.batch, ctx.score_predictions, ctx.chunk, prefix, None, "cpu")
    shares = lambda removed, cands: {b: s for part in split_candidates(cands, 2)  # noqa: E731
                                     for b, s in worker.evaluate(removed, part).items()}
    serial = tale_search(ctx)
    split = tale_search(dataclasses.replace(ctx, candidate_evaluator=shares))
    assert split.rounds == serial.rounds and split.path == serial.path


def test_two_ray_workers_give_identical_selection_to_serial():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'tapioca[test]' or pip install ray)")
    from tapioca.pruning.parallel import parallel_tale

    ctx = tiny_context(prefix=True)
    serial = tale_search(ctx)
    parallel = parallel_tale(ctx, ICLReplica.of(ctx.model), workers=2)
    assert not ray.is_initialized()  # the local cluster it started is shut down again
    assert parallel.path == serial.path and parallel.removed == serial.removed and len(serial.path) == 4
    assert parallel.rounds == serial.rounds  # every candidate score bit-identical
    assert parallel.info["workers"] == 2
