"""Split roles and selection draws.

Every task keeps fixed, disjoint splits per (distribution, role, seed): "select" (what searches choose on),
"heldout" (what is reported), and task-specific others. A study may run several independent selections per
model (``evaluation.selection_draws``): draw 0 is the "select" role itself, draw k ≥ 1 the role
``"select.k"``, disjoint from every other draw and from every other role (the testbed and graphs sample it
from its own seed; text tasks take the k-th block of n examples of the select pool).
"""

from __future__ import annotations

SELECT = "select"


def selection_role(draw: int) -> str:
    """The role name of selection draw ``draw`` (0: "select")."""
    if int(draw) < 0:
        raise ValueError(f"selection draw must be >= 0; got {draw}")
    return SELECT if int(draw) == 0 else f"{SELECT}.{int(draw)}"


def split_role(role: str) -> tuple[str, int]:
    """("select", k) for "select.k", (role, 0) for any other role name."""
    base, dot, draw = role.partition(".")
    if dot and base == SELECT and draw.isdigit() and int(draw) >= 1:
        return SELECT, int(draw)
    return role, 0
