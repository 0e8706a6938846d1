"""Per-block residual gates and hidden-state capture for any stack of transformer blocks.

A block computes ``h_out = Block(h_in)``; with gate alpha the stack sees ``h_in + alpha * (h_out - h_in)``.
alpha = 1 leaves the block untouched (bit-identical), alpha = 0 skips the block's computation entirely
(identical to removing it), anything else scales its residual contribution. Gates and captures live only
inside the :func:`gated` context; hooks and patched ``forward`` methods are removed on exit, also on error.
"""

from __future__ import annotations

import functools
import numbers
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

Gates = Mapping[int, float]


def first_tensor(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states passed to a block: first positional argument or ``hidden_states=``."""
    return args[0] if args else kwargs["hidden_states"]


def _hidden_of(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    return hidden if isinstance(output, Tensor) else (hidden, *output[1:])


def _gated_forward(forward: Callable, alpha: float, *args: Any, **kwargs: Any) -> Any:
    h_in = first_tensor(args, kwargs)
    if alpha == 0.0:
        return h_in  # skipped: not computed at all
    out = forward(*args, **kwargs)
    h_out = _hidden_of(out)
    return _with_hidden(out, h_in + alpha * (h_out - h_in))


@dataclass
class Capture:
    """Hidden states at one position per example, filled while the :func:`gated` context runs.

    ``states[l]`` is (B, D): ``l = 0`` the input of the first block, ``l >= 1`` the output of block l-1.
    """

    positions: Tensor | None  # (B,) token index per example; None = last token
    states: list[Tensor | None] = field(default_factory=list)

    def take(self, hidden: Tensor) -> Tensor:
        """Select the captured position of (B, T, D) hidden states -> (B, D)."""
        if self.positions is None:
            return hidden[:, -1].detach().clone()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, self.positions.to(hidden.device)].detach().clone()

    def stacked(self) -> Tensor:
        """All captured states, (L + 1, B, D)."""
        missing = [i for i, s in enumerate(self.states) if s is None]
        if missing:
            raise RuntimeError(f"no hidden states captured for block outputs {missing}; did the forward pass run?")
        return torch.stack(self.states)  # type: ignore[arg-type]


def check_gates(gates: Gates | None, n_blocks: int) -> dict[int, float]:
    """Validated ``{block index: alpha}``; indices must exist and alphas be finite."""
    out = {}
    for index, alpha in (gates or {}).items():
        if not isinstance(index, numbers.Integral) or isinstance(index, bool) or not 0 <= index < n_blocks:
            raise ValueError(f"gate index {index!r} is not a block; allowed: integers 0..{n_blocks - 1}")
        alpha = float(alpha)
        if not torch.isfinite(torch.tensor(alpha)):
            raise ValueError(f"gate alpha for block {index} is {alpha}; it must be a finite number")
        out[int(index)] = alpha
    return out


def removal_gates(removed: Sequence[int]) -> dict[int, float]:
    """Gates that remove (skip) the given blocks."""
    return {int(i): 0.0 for i in removed}


@contextmanager
def gated(
    blocks: nn.ModuleList,
    gates: Gates | None = None,
    capture: bool = False,
    positions: Tensor | None = None,
) -> Iterator[Capture | None]:
    """Run ``blocks`` with residual gates, optionally capturing per-block states at ``positions``.

    Blocks whose alpha is 1 are not touched. Yields a :class:`Capture` (filled by the forward pass run
    inside the context) when ``capture`` is true, else None.
    """
    gates = check_gates(gates, len(blocks))
    saved: list[tuple[nn.Module, bool, Any]] = []
    handles: list[torch.utils.hooks.RemovableHandle] = []
    cap = Capture(positions, [None] * (len(blocks) + 1)) if capture else None
    try:
        for index, alpha in gates.items():
            if alpha == 1.0:
                continue
            block = blocks[index]
            saved.append((block, "forward" in block.__dict__, block.__dict__.get("forward")))
            block.forward = functools.partial(_gated_forward, block.forward, alpha)
        if cap is not None:
            handles.append(blocks[0].register_forward_pre_hook(_pre_hook(cap), with_kwargs=True))
            for index, block in enumerate(blocks):
                handles.append(block.register_forward_hook(_post_hook(cap, index + 1)))
        yield cap
    finally:
        for handle in handles:
            handle.remove()
        for block, had_own, previous in reversed(saved):
            if had_own:
                block.forward = previous
            else:
                del block.forward


def _pre_hook(cap: Capture) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        cap.states[0] = cap.take(first_tensor(args, kwargs))

    return hook


def _post_hook(cap: Capture, slot: int) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        cap.states[slot] = cap.take(_hidden_of(output))

    return hook


Recorded = tuple  # one block's recorded inputs: a tensor per forward call, in call order


@contextmanager
def recorded_inputs(blocks: nn.ModuleList) -> Iterator[list[Recorded]]:
    """Record the hidden-state input of every block during the forward pass run inside: ``inputs[i]`` is a
    tuple with one tensor per call of block ``i`` (one (B, T, D) tensor for a plain pass; a causal LM that
    runs a shared prompt prefix first gives (prefix (1, P, D), rest (B, T - P, D)))."""
    inputs: list[Recorded] = [() for _ in blocks]

    def recorder(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[index] = (*inputs[index], first_tensor(args, kwargs).detach())
        return hook

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def injected_input(blocks: nn.ModuleList, index: int, hidden: Tensor | Recorded) -> Iterator[None]:
    """Replace the hidden-state input of block ``index`` by ``hidden`` during the forward pass: a (B, T, D)
    tensor for every call, or what :func:`recorded_inputs` recorded (its k-th tensor for the k-th call).

    With every block before ``index`` gated to 0, the model resumes from a cached residual stream.
    """
    calls = [0]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if isinstance(hidden, Tensor):
            value = hidden
        else:
            if calls[0] >= len(hidden):
                raise RuntimeError(f"block {index} ran {calls[0] + 1} times but {len(hidden)} inputs were recorded")
            value = hidden[calls[0]]
        calls[0] += 1
        if args:
            return (value, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}

    handle = blocks[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
