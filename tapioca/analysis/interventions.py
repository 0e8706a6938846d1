"""Causal interventions without pruning: residual-scaling sweeps and hidden-state norm matching.

Both are context managers or plain functions over a :class:`~tapioca.models.base.BlockModel`; every hook
is removed on exit, also when an exception is raised.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from tapioca.analysis.geometry import distortion, profile
from tapioca.models.base import BlockModel, run_in_chunks
from tapioca.models.resumed import ResumedRuns

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


@dataclass
class SweepPoint:
    """One point of a residual-scaling sweep: the gates' alpha, the task score and the distortion D."""

    alpha: float
    score: float
    D: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def residual_scaling_sweep(
    model: BlockModel,
    blocks: Sequence[int],
    ood_batch: Any,
    id_batch: Any,
    score: Callable[[Tensor, Any], Tensor],
    alphas: Sequence[float] = ALPHAS,
    chunk: int = 1024,
    id_profiles: dict | None = None,
) -> list[SweepPoint]:
    """Scale the residual contribution of ``blocks`` jointly by each alpha (1 = full model, 0 = removed)
    and record the mean ``score(predictions, ood_batch)`` and the distortion D of the OOD profile against
    the ID profile of the same gated model. ``id_profiles``: an optional dict, shared by sweeps on the same
    ``model`` and ``id_batch``, that keeps each gated ID profile so it is computed once.

    ``ood_batch`` / ``id_batch`` may be :class:`~tapioca.models.resumed.ResumedRuns` (shared by sweeps on the
    same prompts); plain batches are wrapped. Either way each gated run resumes at the lowest swept block."""
    ood = ood_batch if isinstance(ood_batch, ResumedRuns) else ResumedRuns(model, ood_batch, chunk)
    ident = id_batch if isinstance(id_batch, ResumedRuns) else ResumedRuns(model, id_batch, chunk)
    points = []
    id_profiles = {} if id_profiles is None else id_profiles
    for alpha in alphas:
        gates = {b: float(alpha) for b in blocks}
        out = ood(gates, capture=True)
        key = tuple(sorted((b, a) for b, a in gates.items() if a != 1.0))  # alpha 1 leaves a block untouched
        if key not in id_profiles:
            id_profiles[key] = profile(ident(gates, capture=True).states.cpu())
        reference = id_profiles[key]
        points.append(SweepPoint(float(alpha), float(score(out.predictions, ood.batch).double().mean()),
                                 distortion(profile(out.states.cpu()), reference).D))
    return points


def position_norms(model: BlockModel, batch: Any) -> Tensor:
    """Mean hidden-state norm per block output and token position over ``batch``: (L, T); for blocks that see
    node states (N, D) (graphs) the mean node norm per block output, (L,)."""
    norms: list[Tensor | None] = [None] * model.n_blocks

    def recorder(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            hidden = output if isinstance(output, Tensor) else output[0]
            norms[index] = hidden.detach().double().norm(dim=-1).mean(0)
        return hook

    handles = [block.register_forward_hook(recorder(i)) for i, block in enumerate(model.blocks)]
    try:
        model.run(batch)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(norms)  # type: ignore[arg-type]


@contextmanager
def norm_matched(model: BlockModel, target_norms: Mapping[int, Tensor]) -> Iterator[None]:
    """Rescale the output of each block l in ``target_norms`` so that every token's hidden state has norm
    ``target_norms[l][t]`` (a (T,) tensor of per-position norms, e.g. ID means from :func:`position_norms`), or,
    for a model whose blocks see node states (N, D) without positions (graphs), every state to the 0-d
    ``target_norms[l]``. Directions are kept; only norms are forced onto the target profile."""
    def matcher(target: Tensor) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = output if isinstance(output, Tensor) else output[0]
            t = target.to(hidden) if target.ndim == 0 else target[: hidden.shape[1]].to(hidden)[None, :, None]
            scaled = hidden * (t / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            return scaled if isinstance(output, Tensor) else (scaled, *output[1:])
        return hook

    handles = [model.blocks[l].register_forward_hook(matcher(t)) for l, t in target_norms.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def last_token_norms(model: BlockModel, batch: Any, chunk: int = 1024) -> Tensor:
    """Mean norm over rows of each block's output at the query (an LM's last prompt token), (L,) float64:
    the norm profile N(l) of the captured states (L + 1, B, D) without the embedding row. Text prompts
    differ in length, so this, not :func:`position_norms`, is the profile that norm matching of text uses."""
    states = run_in_chunks(model, batch, None, capture=True, chunk=chunk).states
    return states[1:].double().norm(dim=-1).mean(-1).cpu()


def _query_owner(model: Any) -> Any:
    """What tells a hook where each row's query is: an LM adapter (itself or ``model.lm``) with
    ``query_positions`` (set during its passes), else None (the query is the last token, e.g. the testbed)."""
    for candidate in (model, getattr(model, "lm", None)):
        if candidate is not None and hasattr(candidate, "query_positions"):
            return candidate
    return None


def _rescale_queries(hidden: Tensor, positions: Tensor, target: float) -> Tensor:
    """``hidden`` (b, T, D) with the state at ``positions`` (b,) of each row (or, for one packed row (1, N, D),
    at every one of ``positions``) scaled to norm ``target``; every other state unchanged (a new tensor)."""
    positions = positions.to(hidden.device)
    rows = torch.arange(len(positions), device=hidden.device) if hidden.shape[0] == len(positions) else \
        torch.zeros_like(positions)
    picked = hidden[rows, positions]  # (b, D)
    scaled = picked * (target / picked.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return hidden.index_put((rows, positions), scaled.to(hidden.dtype))


@contextmanager
def last_token_norm_matched(model: BlockModel, target_norms: Mapping[int, float]) -> Iterator[None]:
    """Rescale, at the output of each block l in ``target_norms``, only each row's query state (an LM's last
    prompt token) to norm ``target_norms[l]`` (e.g. ID means from :func:`last_token_norms`); directions and
    every other position are kept. An LM adapter reports the query positions of the pass that is running
    (right-padded, packed or after a shared prefix: ``HFModel.query_positions``); passes without a query (a
    shared-prefix pass, generation) are left alone. Without such an adapter the query is the last token."""
    owner = _query_owner(model)

    def matcher(target: float) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = output if isinstance(output, Tensor) else output[0]
            if owner is None:
                positions = torch.full((hidden.shape[0],), hidden.shape[1] - 1, dtype=torch.long)
            else:
                positions = owner.query_positions
                if positions is None:
                    return None
            scaled = _rescale_queries(hidden, positions, target)
            return scaled if isinstance(output, Tensor) else (scaled, *output[1:])
        return hook

    handles = []
    try:
        for l, t in target_norms.items():
            handles.append(model.blocks[l].register_forward_hook(matcher(float(t))))
        yield
    finally:
        for handle in handles:
            handle.remove()
