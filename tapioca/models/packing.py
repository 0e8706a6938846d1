"""Padding-free causal LM passes: the rows of a batch laid end to end in one sequence.

Right-padded rows of unequal length waste the padding's compute in every block. Packed, row r's tokens
after a shared prompt prefix of P tokens (0 without one) take positions P, P + 1, ... and attend to the
prefix and to their own row's earlier tokens only, through a custom (1, 1, N, P + N) attention mask: the
same numbers as the padded pass up to float rounding. Rows are packed a few at a time (``pack_spans``) so
that the N x (P + N) attention stays small next to the blocks' matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MASK_FORMS = ("sdpa", "eager")  # attention implementations whose 4-D mask form is known: bool / additive


@dataclass
class Pack:
    """Rows ``lengths`` (b,) of a batch after ``shared`` prefix tokens, end to end.

    ids (1, N) long; position_ids (1, N): each token's position in its own row; allowed (1, 1, N, P + N) bool:
    may query i attend to key j (prefix keys first); starts (b,): where each row begins in the pack.
    """

    ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    starts: Tensor

    def index(self, positions: Tensor, shared: int) -> Tensor:
        """Row positions (b, S) (counted from the start of the row, prefix included) -> pack indices (b, S)."""
        return self.starts[:, None] + positions - shared

    def attention_mask(self, implementation: str, dtype: torch.dtype) -> Tensor:
        """The mask as the attention implementation takes it: bool (sdpa) or additive 0 / -inf-like (eager)."""
        if implementation == "sdpa":
            return self.allowed
        if implementation == "eager":
            blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=self.allowed.device)
            return torch.where(self.allowed, torch.zeros((), dtype=dtype, device=self.allowed.device), blocked)
        raise ValueError(f"no packed mask form for attention implementation {implementation!r}; "
                         f"known: {list(MASK_FORMS)}")


def pack_spans(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges ``(i, j)`` whose lengths sum to at most ``budget`` tokens (one row at least)."""
    spans, start, total = [], 0, 0
    for k, n in enumerate(lengths):
        if k > start and total + n > budget:
            spans.append((start, k))
            start, total = k, 0
        total += n
    if lengths:
        spans.append((start, len(lengths)))
    return spans


def pack_rows(input_ids: Tensor, lengths: Tensor, shared: int) -> Pack:
    """Pack right-padded rows ``input_ids`` (b, T) of real ``lengths`` (b,) after their first ``shared`` tokens."""
    rest = (lengths - shared).tolist()
    device = input_ids.device
    ids = torch.cat([input_ids[r, shared:shared + n] for r, n in enumerate(rest)])[None]
    row = torch.repeat_interleave(torch.arange(len(rest), device=device), torch.tensor(rest, device=device))
    starts = torch.cumsum(torch.tensor([0, *rest[:-1]], device=device), 0)
    offset = torch.arange(ids.shape[1], device=device) - starts[row]  # (N,) position after the prefix
    own = (row[:, None] == row[None, :]) & (offset[None, :] <= offset[:, None])  # (N, N) causal within a row
    prefix = torch.ones(len(offset), shared, dtype=torch.bool, device=device)
    allowed = torch.cat([prefix, own], 1)[None, None]
    return Pack(ids, (offset + shared)[None], allowed, starts)
