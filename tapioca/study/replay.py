"""What the whole-search null (:func:`tapioca.analysis.optimism.search_null`) needs from a finished search:
the per-example selection scores of every candidate of every recorded TALE round, recomputed on the search's
own selection examples, and a cache of them in one ``.npz``.

    rec = record_rounds(wl, seed, search, dist, wl.sizes.n_select)       # RecordedSearch, gains (R, L, n)
    null = search_null([rec, ...], rule_of(search))
    p = p_null(null, replayed_gain([rec, ...], rule_of(search)))

Recording costs what the TALE search itself cost: per round one recorded pass, then every candidate resumed
from its own block (splits scored by generation: one pass per candidate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from tapioca.analysis.optimism import RecordedSearch, SearchRule
from tapioca.errors import DataError, check_finite
from tapioca.io import save_arrays
from tapioca.models.base import chunks
from tapioca.models.gates import removal_gates
from tapioca.pruning.searches import PruneResult, recorded_run, resumed_run
from tapioca.tasks.base import Selection, Workload


def rule_of(search: PruneResult) -> SearchRule:
    """The :class:`SearchRule` a TALE search ran with (from ``search.info``)."""
    info = search.info
    return SearchRule(float(info.get("epsilon", 0.0)), info.get("max_drop"), info.get("choose", "best"))


def record_rounds(wl: Workload, seed: int, search: PruneResult, dist: str, n: int, role: str = "select",
                  tol: float | None = 1e-3, known: Mapping[str, np.ndarray] | None = None) -> RecordedSearch:
    """Per-example selection-score gains (R, L, n) over the full model of every candidate of every round of
    ``search`` (``search.rounds[r]["removed_before"] + [b]`` for b in its candidates), on the examples
    ``wl.selection(dist, role, seed, n)`` (the ones the search chose on) in the metric it maximised. R = 0
    for a search without rounds (one-shot baselines). With ``tol`` set, the full model's mean score must match
    ``search.baseline_score`` within ``tol`` x max(1, |baseline|), else a :class:`DataError` (other examples
    or another metric than the search's). ``known``: per-example scores the search kept while it ran
    (:func:`save_search_scores`), by configuration key ("" the full model, "1,3"); when every configuration is
    there nothing is run."""
    if known is not None:
        rounds = [{int(b): known.get(_key([*rd["removed_before"], int(b)])) for b in rd["candidates"]}
                  for rd in search.rounds]
        if "" in known and all(v is not None for r in rounds for v in r.values()):
            return RecordedSearch.from_scores(np.asarray(known[""]), rounds, search.n_blocks)  # type: ignore[arg-type]
    sel = wl.selection(dist, role, seed, n)
    where = f"model {wl.name} on distribution {dist} ({role}, seed {seed})"

    def scores(removed: list[int]) -> np.ndarray:
        values = sel.scorer(removal_gates(removed))
        check_finite(values, f"{where}, blocks {removed} removed" if removed else where)
        return values.detach().double().cpu().numpy()

    full = scores([])
    if tol is not None and abs(full.mean() - search.baseline_score) > tol * max(1.0, abs(search.baseline_score)):
        raise DataError(f"{where}: the full model's mean selection score {full.mean():.6g} differs from the "
                        f"search's baseline {search.baseline_score:.6g}; record the rounds on the search's own "
                        "selection examples (distribution, role, seed, n) and metric")
    if sel.score_predictions is None:  # scored by generation: every configuration from scratch
        rounds = [{int(b): scores([*rd["removed_before"], int(b)]) for b in rd["candidates"]} for rd in search.rounds]
    else:
        rounds = [resumed_round(sel, rd["removed_before"], [int(b) for b in rd["candidates"]], wl.sizes.select_chunk,
                                where) for rd in search.rounds]
    return RecordedSearch.from_scores(full, rounds, search.n_blocks)


def resumed_round(sel: Selection, removed: list[int], candidates: list[int], chunk: int,
                  where: str) -> dict[int, np.ndarray]:
    """Per-example selection scores (n,) of ``removed`` plus each candidate, as TALE's prefix reuse computes them:
    per chunk one recorded pass with ``removed`` skipped, then every candidate b resumed from its input at b
    (the input to block b depends only on the blocks removed below it)."""
    assert sel.score_predictions is not None
    base = removal_gates(removed)
    preds: dict[int, list[torch.Tensor]] = {b: [] for b in candidates}
    for sub in chunks(sel.batch, chunk):
        _, inputs = recorded_run(sel.model, sub, base)
        for b in candidates:
            preds[b].append(resumed_run(sel.model, sub, inputs, b, {**base, b: 0.0}, record=False)[0].predictions)
    out = {}
    for b, parts in preds.items():
        values = sel.score_predictions(torch.cat(parts), sel.batch)
        check_finite(values, f"{where}, blocks {[*removed, b]} removed")
        out[b] = values.detach().double().cpu().numpy()
    return out


def _key(removed: list[int]) -> str:
    return ",".join(map(str, sorted(int(b) for b in removed)))


def save_search_scores(path: str | Path, per_example: Mapping[str, torch.Tensor]) -> None:
    """Write the per-example scores a search kept ({configuration key: (B,)}) atomically to one ``.npz`` (the
    full model's key "" is stored as "full")."""
    save_arrays(path, {(k or "full"): v.double().numpy() for k, v in per_example.items()})


def load_search_scores(path: str | Path) -> dict[str, np.ndarray] | None:
    """What :func:`save_search_scores` wrote, keyed as the search keyed it; None when there is no file."""
    if not Path(path).is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {("" if k == "full" else k): data[k] for k in data.files}


def save_recorded(path: str | Path, recorded: dict[str, RecordedSearch]) -> None:
    """Write ``recorded`` ({name: RecordedSearch}) atomically to one ``.npz`` (one array (R, L, n) each)."""
    for name in recorded:
        if not isinstance(name, str) or not name or "/" in name:
            raise DataError(f"save_recorded: names must be non-empty strings without '/', got {name!r}")
    save_arrays(path, {name: rec.gains for name, rec in recorded.items()})


def load_recorded(path: str | Path) -> dict[str, RecordedSearch]:
    """What :func:`save_recorded` wrote."""
    with np.load(path, allow_pickle=False) as data:
        return {name: RecordedSearch(data[name]) for name in data.files}


def cached_recorded(path: Path, compute: Callable[[], dict[str, RecordedSearch]]) -> dict[str, RecordedSearch]:
    """Load ``path`` if it exists, else compute, save atomically and return."""
    if Path(path).is_file():
        return load_recorded(path)
    recorded = compute()
    save_recorded(path, recorded)
    return recorded
