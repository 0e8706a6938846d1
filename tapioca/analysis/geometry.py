"""Layer-wise geometry at the query position: norm and pairwise-distance profiles, distortion, attribution.

Profiles are indexed by the original block index (h_0 = input of block 0, h_l = output of block l-1); a
removed block passes its input through, so a pruned model still has a profile of length L + 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from tapioca.models.base import BlockModel, run_in_chunks
from tapioca.models.gates import Gates


@dataclass
class Profile:
    """norm[l] = mean ||h_l||; pairwise[l] = mean over all pairs i<j of ||h_l(i) - h_l(j)||; (L + 1,) each."""

    norm: list[float]
    pairwise: list[float]
    n: int

    @property
    def spread(self) -> list[float]:
        """Scale-free spread P(l) / N(l)."""
        return [p / m if m > 0 else float("nan") for p, m in zip(self.pairwise, self.norm)]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}


@dataclass
class Distortion:
    """Relative deviation of a profile from a reference: delta_norm[l], delta_pairwise[l] (L + 1,), the
    distortion D = sqrt(sum_l delta_norm[l]^2 + delta_pairwise[l]^2) and per-block attribution (L,).

    A relative deviation from a reference value of 0 is undefined unless the value is 0 too (then it is 0):
    such a term counts as 0 and its layer is listed in ``undefined`` (e.g. the pairwise distance at h_0 of
    text prompts that all end in the same token, where every query embedding coincides).
    """

    delta_norm: list[float]
    delta_pairwise: list[float]
    D: float
    attribution: list[float]
    undefined: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_pairwise_distance(states: Tensor, chunk: int = 1024) -> Tensor:
    """Exact mean Euclidean distance over all n(n-1)/2 pairs, per layer: (L, n, D) -> (L,).

    Computed blockwise with ``torch.cdist`` in float64 so memory stays O(chunk * n) per layer.
    """
    layers, n, _ = states.shape
    if n < 2:
        raise ValueError(f"pairwise distances need at least 2 prompts, got {n}")
    x = states.double()
    total = torch.zeros(layers, dtype=torch.float64, device=states.device)
    for start in range(0, n, chunk):
        block = torch.cdist(x[:, start:start + chunk], x, compute_mode="donot_use_mm_for_euclid_dist")
        total += block.sum(dim=(1, 2))
    return total / (n * (n - 1))  # each unordered pair counted twice, the diagonal is zero


def profile(states: Tensor, chunk: int = 1024) -> Profile:
    """Norm and pairwise-distance profiles of states (L + 1, n, D)."""
    norms = states.double().norm(dim=-1).mean(dim=-1)
    return Profile(norms.tolist(), mean_pairwise_distance(states, chunk).tolist(), int(states.shape[1]))


def distortion(p: Profile, reference: Profile) -> Distortion:
    """How far profile ``p`` deviates from ``reference`` (REFERENCE §4)."""
    dn, undefined_n = _relative(p.norm, reference.norm)
    dp, undefined_p = _relative(p.pairwise, reference.pairwise)
    magnitude = [(x * x + y * y) ** 0.5 for x, y in zip(dn, dp)]
    attribution = [magnitude[l] - magnitude[l - 1] for l in range(1, len(magnitude))]
    return Distortion(dn, dp, sum(m * m for m in magnitude) ** 0.5, attribution, sorted(undefined_n | undefined_p))


def _relative(values: list[float], reference: list[float]) -> tuple[list[float], set[int]]:
    """(v - r) / r per layer, 0 where v == r == 0; layers with r == 0 != v get 0 and are returned apart."""
    deltas, undefined = [], set()
    for layer, (v, r) in enumerate(zip(values, reference)):
        if r != 0:
            deltas.append((v - r) / r)
        else:
            deltas.append(0.0)
            if v != 0:
                undefined.add(layer)
    return deltas, undefined


def query_states(model: BlockModel, batch: Any, gates: Gates | None = None, chunk: int = 1024) -> Tensor:
    """Per-block hidden states at the query position, (L + 1, n, D), on CPU."""
    return run_in_chunks(model, batch, gates, capture=True, chunk=chunk).states.cpu()
