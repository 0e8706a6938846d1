"""Reference predictors for the query of a polynomial prompt: least squares, kNN, mean."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tapioca.tasks.polyreg import PolyBatch


def least_squares(batch: PolyBatch) -> Tensor:
    """Least-squares fit of each prompt's true degree to its context pairs, evaluated at the query. (B,)"""
    xs, ys = batch.xs.double(), batch.ys.double()
    max_degree = int(batch.degrees.max())
    powers = torch.arange(max_degree + 1, dtype=torch.double)
    keep = (powers[None, :] <= batch.degrees[:, None]).double()  # (B, max_degree + 1)
    design = xs[:, :-1, None] ** powers * keep[:, None, :]  # (B, k - 1, max_degree + 1)
    coefs = torch.linalg.lstsq(design, ys[:, :-1, None], driver="gelsd").solution[..., 0]
    query = xs[:, -1, None] ** powers * keep
    return (query * coefs).sum(-1)


def nearest_neighbours(batch: PolyBatch, k: int = 3) -> Tensor:
    """Mean y of the ``k`` context points whose x is closest to the query x. (B,)"""
    dist = (batch.xs[:, :-1] - batch.xs[:, -1:]).abs()
    idx = dist.topk(min(k, dist.shape[1]), largest=False).indices
    return batch.ys[:, :-1].gather(1, idx).double().mean(1)


def context_mean(batch: PolyBatch) -> Tensor:
    """Mean of the context ys (the floor any in-context learner should beat). (B,)"""
    return batch.ys[:, :-1].double().mean(1)


REFERENCES: dict[str, Callable[[PolyBatch], Tensor]] = {
    "least_squares": least_squares,
    "knn": nearest_neighbours,
    "mean": context_mean,
}
