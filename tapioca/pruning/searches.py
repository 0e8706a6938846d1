"""Block-pruning searches: faithful TALE (greedy, task-aware) and one-shot baselines, in one registry.

Every search sees a :class:`SearchContext` — the model, the selection batch and a scorer that maps gates to
per-example selection scores (higher is better) — and returns a :class:`PruneResult`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from tapioca.errors import ConfigError, DataError, check_finite
from tapioca.analysis.geometry import distortion, profile, query_states
from tapioca.io import read_json, write_json
from tapioca.models.base import BlockModel, RunOutput, chunks, run_in_chunks
from tapioca.models.resumed import nbytes, run_from
from tapioca.models.gates import Gates, Recorded, recorded_inputs, removal_gates
from tapioca.pruning.racing import RacingRounds
from tapioca.pruning.sleb import sleb_search

Scorer = Callable[[Gates], torch.Tensor]  # gates -> per-example selection scores (B,)
PredictionScorer = Callable[[torch.Tensor, Any], torch.Tensor]  # (predictions, batch) -> scores (B,)
RoundEvaluator = Callable[[list[int], list[int]], dict[int, float]]  # (removed, candidates) -> mean score each
KEEP_BYTES = 2 * 2**30  # PrefixRounds: memory for the block inputs it keeps between candidates and rounds


@dataclass
class SearchContext:
    """Everything a search may use. ``scorer`` runs ``model`` on the selection ``batch``."""

    model: BlockModel
    batch: Any
    scorer: Scorer
    score_predictions: PredictionScorer | None = None  # enables prefix reuse in TALE rounds
    prefix_cache: bool = True
    epsilon: float = 0.08
    max_drop: int | None = None
    n_remove: int = 1
    seed: int = 0
    chunk: int = 1024
    progress: bool = True
    cache_path: Path | None = None  # TALE: evaluated configurations, so an interrupted search resumes
    choose: str = "best"  # TALE: which accepted configuration becomes ``removed``
    reference_batch: Any = None  # ID inputs (no labels needed), for label-free searches against ID
    candidate_evaluator: RoundEvaluator | None = None  # TALE: scores a round's candidates (e.g. on Ray workers)
    racing_delta: float | None = None  # TALE: race candidates with this error bound (None: exact TALE)
    racing_min: int = 64  # TALE racing: examples in the first stage
    keep_bytes: int = KEEP_BYTES  # TALE prefix reuse: memory for kept block inputs (PrefixRounds)
    where: str = ""  # names model and data in errors, e.g. "model runs/m0 on distribution x_scale_3 (selection)"
    unlabelled_scorer: Scorer | None = None  # SLEB: gates -> label-free per-example scores (B,), higher is better
    unlabelled_rounds: Any = None  # SLEB: a PrefixRounds over the unlabelled inputs (same scores, prefix reuse)
    per_example: dict[str, torch.Tensor] | None = None  # TALE: filled with every scored configuration's (B,) scores


@dataclass
class PruneResult:
    """Outcome of a search. ``removed``: the chosen configuration (TALE: ``best`` unless configured
    otherwise), in order of removal."""

    search: str
    n_blocks: int
    baseline_score: float
    removed: list[int]
    best: list[int]
    final: list[int]
    bsba: list[int]
    path: list[int] = field(default_factory=list)  # every accepted removal, in order
    path_scores: list[float] = field(default_factory=list)  # selection score after each accepted removal
    rounds: list[dict[str, Any]] = field(default_factory=list)  # TALE: candidates and scores per round
    block_scores: dict[int, float] = field(default_factory=dict)  # one-shot: the per-block criterion
    selection_score: float = float("nan")  # score of ``removed`` on the selection data
    info: dict[str, Any] = field(default_factory=dict)  # protocol, target, metric, ...

    @property
    def gates(self) -> dict[int, float]:
        """Gates that remove the chosen blocks."""
        return removal_gates(self.removed)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["block_scores"] = {str(k): v for k, v in self.block_scores.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneResult":
        data = dict(data)
        data["block_scores"] = {int(k): v for k, v in data.get("block_scores", {}).items()}
        return cls(**data)


def _key(removed: Iterable[int]) -> str:
    return ",".join(map(str, sorted(removed)))


class ScoreCache:
    """Mean selection score per evaluated configuration, optionally persisted to JSON as it grows.

    Every score is checked: NaN or inf (e.g. from damaged weights) stops the search with a :class:`DataError`
    that names ``where`` and counts the non-finite examples."""

    def __init__(self, scorer: Scorer, path: Path | None, prefix: RoundEvaluator | None = None,
                 where: str = "") -> None:
        self.scorer, self.path, self.prefix = scorer, path, prefix
        self.where = where or "selection split"
        cached = read_json(path) if path is not None and path.is_file() else {}
        self.scores: dict[str, float] = {k: v for k, v in cached.items() if math.isfinite(v)}  # others: rerun
        self.partial: dict[str, tuple[float, int]] = {}  # raced out: (mean on the examples seen, how many)
        self.evaluated = 0  # configurations actually run (cache misses)
        self.per_example: dict[str, torch.Tensor] | None = None  # set to a dict: configuration -> scores (B,)

    def __call__(self, removed: frozenset[int]) -> float:
        key = _key(removed)
        if key not in self.scores:
            base = getattr(self.prefix, "base", None)  # a recorded pass that the next round can start from
            value = base(sorted(removed)) if base is not None else self._checked_mean(key)
            self._store({key: float(value)})
        return self.scores[key]

    def _checked_mean(self, key: str) -> float:
        """Mean of the scorer's per-example scores for configuration ``key``, after checking they are finite."""
        removed = [int(b) for b in key.split(",") if b]
        values = self.scorer(removal_gates(removed))
        check_finite(values, f"{self.where}, blocks {removed} removed" if removed else self.where)
        if self.per_example is not None:
            self.per_example[key] = values.detach().double().cpu()
        return float(values.double().mean())

    def round(self, removed: list[int], candidates: list[int]) -> dict[int, float]:
        """Score of removing ``removed`` plus each candidate; uncached candidates run together."""
        todo = [b for b in candidates if _key([*removed, b]) not in self.scores]
        if todo and self.prefix is not None:
            self._store({_key([*removed, b]): s for b, s in self.prefix(removed, todo).items()})
            for b, seen in getattr(self.prefix, "eliminated", {}).items():  # racing: not stored, never chosen
                self.partial[_key([*removed, b])] = seen
        raced = self.raced_out(removed, candidates)
        return {b: self.partial[_key([*removed, b])][0] if b in raced else self(frozenset([*removed, b]))
                for b in candidates}

    def raced_out(self, removed: list[int], candidates: Iterable[int]) -> dict[int, int]:
        """Candidates of this round that racing dropped early -> how many examples they were scored on."""
        return {b: self.partial[k][1] for b in candidates if (k := _key([*removed, b])) in self.partial}

    def _store(self, scores: dict[str, float]) -> None:
        for key, value in scores.items():
            if not math.isfinite(value):  # a mean from prefix reuse: a plain run counts the non-finite examples
                self._checked_mean(key)
                raise DataError(f"{self.where}: the mean selection score with blocks [{key}] removed is {value}")
        self.scores.update(scores)
        self.evaluated += len(scores)
        if self.path is not None:
            write_json(self.path, self.scores)


def plain_recorded_run(model: BlockModel, batch: Any, gates: Gates) -> tuple[RunOutput, list[Recorded]]:
    """``model.run(batch, gates)`` and every block's recorded input (:func:`recorded_inputs`)."""
    with recorded_inputs(model.blocks) as inputs:
        out = model.run(batch, gates)
    return out, inputs


def plain_resumed_run(model: BlockModel, batch: Any, inputs: list[Recorded], start: int, gates: Gates,
                      record: bool = True) -> tuple[RunOutput, list[Recorded]]:
    """:func:`run_from` (resumed at block ``start`` from ``inputs``) and, with ``record``, every block's recorded
    input (else an empty list)."""
    if not record:
        return run_from(model, batch, inputs, start, gates), []
    with recorded_inputs(model.blocks) as got:
        out = run_from(model, batch, inputs, start, gates)
    return out, got


def recorded_run(model: BlockModel, batch: Any, gates: Gates) -> tuple[RunOutput, list[Recorded]]:
    """A run whose record a later run can resume from, per block: the model's own ``recorded_run`` when it has
    one (a run that is more than one forward pass, e.g. greedy decoding, records what its resumption needs:
    :mod:`tapioca.models.decoding`), else :func:`plain_recorded_run`."""
    own = getattr(model, "recorded_run", None)
    return own(batch, gates) if own is not None else plain_recorded_run(model, batch, gates)


def resumed_run(model: BlockModel, batch: Any, inputs: list[Recorded], start: int, gates: Gates,
                record: bool = True) -> tuple[RunOutput, list[Recorded]]:
    """``model`` with ``gates`` resumed at block ``start`` from the record ``inputs`` of a run that agrees with
    ``gates`` below ``start``, and (with ``record``) its own record: the model's ``resumed_run`` when it has one,
    else :func:`plain_resumed_run`."""
    own = getattr(model, "resumed_run", None)
    if own is not None:
        return own(batch, inputs, start, gates, record)
    return plain_resumed_run(model, batch, inputs, start, gates, record)


class PrefixRounds:
    """TALE rounds evaluated with prefix reuse. The input to block j depends only on which blocks below j
    are removed, so a configuration can resume at block j from any recorded pass that agrees with it below j.

    * A pass under the current gates records every block's input; candidate b resumes from its cached input
      at b with blocks 0..b skipped. Same numbers, about half the compute.
    * When the selection batch's block inputs fit in ``keep_bytes`` (judged from the first chunk), candidates
      run one after another over all chunks and their own block inputs are recorded too. The round's winner
      c is the next round's base (no more base passes; the baseline's pass is the first round's), and while
      a round's candidates' inputs fit (about 1 + L/2 passes' worth), candidate b < c of the next round
      resumes at block c from its own last pass, which agrees with it below c: it runs only blocks above c.
    * Otherwise every chunk is recorded and all candidates run on it before the next chunk (memory: one
      chunk's inputs).

    ``passes``: every pass run, in order, as (removed blocks, first block computed), for cost accounting.
    A model whose run is more than one forward pass records and resumes its runs itself (``recorded_run`` /
    ``resumed_run``, see :func:`recorded_run`; greedy decoding also records the prompt's KV cache): the rounds
    keep its per-block records exactly as they keep block inputs.
    """

    def __init__(self, model: BlockModel, batch: Any, score_predictions: PredictionScorer, chunk: int,
                 keep_bytes: int = KEEP_BYTES) -> None:
        self.model, self.batch, self.score_predictions = model, batch, score_predictions
        self.chunks = chunks(batch, chunk)
        self.keep_bytes = keep_bytes
        self.passes: list[tuple[list[int], int]] = []
        self._keep: str | None = None  # "all" candidates' inputs, the "best" one's, or "none"; set on first pass
        self._base: tuple[str, list[list[Recorded]]] | None = None  # configuration, its inputs (chunk, block)
        self._own: dict[int, list[list[Recorded]]] = {}  # last round: candidate -> inputs of removed + [b]
        self._own_removed: set[int] = set()  # that round's removed blocks
        self.per_example: dict[str, torch.Tensor] | None = None  # set to a dict: configuration -> scores (B,)

    def __call__(self, removed: list[int], candidates: list[int]) -> dict[int, float]:
        c = self._last_removed(removed)
        base = self._base_inputs(removed, c)
        if base is None:
            return self._chunk_major(removed, candidates)
        return self._candidate_major(removed, candidates, base, c)

    def base(self, removed: list[int]) -> float:
        """Mean score of the configuration ``removed``, from a recorded pass whose block inputs are kept as
        the next round's base when they fit."""
        self.passes.append((sorted(removed), 0))
        gates = removal_gates(removed)
        preds, inputs = [], []
        for sub in self.chunks:
            out, got = recorded_run(self.model, sub, gates)
            preds.append(out.predictions)
            if self._keep is None:
                self._keep = self._tier(nbytes(got) * len(self.chunks))
            if self._keep != "none":
                inputs.append(got)
        if self._keep != "none":
            self._base = (_key(removed), inputs)
        return self._mean(preds, removed)

    def _tier(self, pass_bytes: int) -> str:
        """What to keep, from one pass's block inputs: a round's candidates take about L/2 passes' worth."""
        if pass_bytes * (2 + self.model.n_blocks / 2) <= self.keep_bytes:
            return "all"
        return "best" if 3 * pass_bytes <= self.keep_bytes else "none"

    def _last_removed(self, removed: list[int]) -> int | None:
        """The block c when ``removed`` is the last round's removed blocks plus c (its winner), else None."""
        extra = set(removed) - self._own_removed
        return extra.pop() if self._own_removed <= set(removed) and len(extra) == 1 else None

    def _base_inputs(self, removed: list[int], c: int | None) -> list[list[Recorded]] | None:
        """Every chunk's block inputs under ``removed``: kept, those of the last round's winner ``c``, or a new
        recorded pass; None when they do not fit."""
        if self._base is not None and self._base[0] == _key(removed):
            return self._base[1]
        if c is not None and c in self._own:
            self._base = (_key(removed), self._own[c])
            return self._base[1]
        if self._keep == "none":
            return None
        self.base(removed)
        return self._base[1] if self._keep != "none" else None  # type: ignore[index]

    def _candidate_major(self, removed: list[int], candidates: list[int], base: list[list[Recorded]],
                         c: int | None) -> dict[int, float]:
        """Each candidate over all chunks, resumed from the deepest recorded input that agrees with it (its own
        pass of the last round, whose winner was ``c``, when b < c)."""
        earlier = self._own if c is not None else {}
        own: dict[int, list[list[Recorded]]] = {}
        scores: dict[int, float] = {}
        for b in candidates:
            start, below = (c, earlier.pop(b)) if c is not None and b < c and b in earlier else (b, base)
            gates = removal_gates([*removed, b])  # start >= b: resumed at or above the candidate
            preds, recorded = [], []
            for sub, inputs in zip(self.chunks, below):
                out, got = resumed_run(self.model, sub, inputs, start, gates)
                preds.append(out.predictions)
                recorded.append(inputs[: start + 1] + got[start + 1:])
            scores[b] = self._mean(preds, [*removed, b])
            self.passes.append((sorted({*removed, b}), start + 1))
            if self._keep == "all":
                own[b] = recorded
            elif not own or scores[b] > scores[next(iter(own))]:  # the best so far; ties: the lower block
                own = {b: recorded}
        self._own, self._own_removed = own, set(removed)
        return scores

    def _chunk_major(self, removed: list[int], candidates: list[int]) -> dict[int, float]:
        """Chunk by chunk: a recorded base pass, then every candidate resumed from it."""
        preds: dict[int, list[torch.Tensor]] = {b: [] for b in candidates}
        base = removal_gates(removed)
        self.passes += [(sorted(removed), 0), *((sorted({*removed, b}), b + 1) for b in candidates)]
        for sub in self.chunks:
            _, inputs = recorded_run(self.model, sub, base)
            for b in candidates:
                preds[b].append(resumed_run(self.model, sub, inputs, b, {**base, b: 0.0}, record=False)[0].predictions)
        return {b: self._mean(p, [*removed, b]) for b, p in preds.items()}

    def _mean(self, preds: list[torch.Tensor], removed: list[int]) -> float:
        """Mean selection score of the configuration ``removed`` from its predictions (chunks); its per-example
        scores go to :attr:`per_example` when that is a dict."""
        values = self.score_predictions(torch.cat(preds), self.batch).double()
        if self.per_example is not None:
            self.per_example[_key(removed)] = values.detach().cpu()
        return float(values.mean())


def tale_search(ctx: SearchContext) -> PruneResult:
    """TALE: greedily remove the block whose removal gives the highest selection score (REFERENCE §2).

    Each round scores every remaining block; the best candidate (ties -> lowest index) is accepted unless
    its score is below ``baseline - epsilon``. Stops at ``max_drop`` removals or when no block is left.
    With ``racing_delta`` set, candidates that cannot win are dropped early (:mod:`tapioca.pruning.racing`); the
    winner is chosen among the candidates scored on every example.
    """
    n_blocks = ctx.model.n_blocks
    limit = n_blocks if ctx.max_drop is None else ctx.max_drop
    prefix = ctx.candidate_evaluator
    if prefix is None and ctx.racing_delta is not None and ctx.score_predictions is not None:
        prefix = RacingRounds(ctx.model, ctx.batch, ctx.score_predictions, ctx.chunk, ctx.racing_delta, ctx.racing_min)
    elif prefix is None and ctx.prefix_cache and ctx.score_predictions is not None:
        prefix = PrefixRounds(ctx.model, ctx.batch, ctx.score_predictions, ctx.chunk, ctx.keep_bytes)
    score = ScoreCache(ctx.scorer, ctx.cache_path, prefix, ctx.where)
    if ctx.per_example is not None:  # keep what each configuration scored per example (the whole-search null)
        score.per_example = ctx.per_example
        if isinstance(prefix, PrefixRounds):
            prefix.per_example = ctx.per_example
    baseline = score(frozenset())
    floor = baseline - ctx.epsilon
    removed: list[int] = []
    path_scores: list[float] = []
    rounds: list[dict[str, Any]] = []
    bar = tqdm(total=limit, disable=not ctx.progress, desc="TALE rounds", leave=False)
    while len(removed) < limit and len(removed) < n_blocks:
        candidates = score.round(removed, [b for b in range(n_blocks) if b not in removed])
        raced = score.raced_out(removed, candidates)
        chosen = max((b for b in candidates if b not in raced), key=lambda b: (candidates[b], -b))
        accepted = candidates[chosen] >= floor
        rounds.append({"removed_before": list(removed), "candidates": {str(b): s for b, s in candidates.items()},
                       "chosen": chosen, "score": candidates[chosen], "accepted": accepted})
        if raced:  # racing: candidates eliminated early, with the examples they were scored on
            rounds[-1]["raced_out"] = {str(b): n for b, n in raced.items()}
        bar.update(1)
        if not accepted:
            break
        removed.append(chosen)
        path_scores.append(candidates[chosen])
    bar.close()
    best, bsba, final = _tale_outputs(removed, path_scores, baseline)
    chosen = {"best": best, "bsba": bsba, "final": final}[ctx.choose]
    return PruneResult(
        search="tale", n_blocks=n_blocks, baseline_score=baseline, removed=chosen, best=best, final=final,
        bsba=bsba, path=removed, path_scores=path_scores, rounds=rounds,
        selection_score=score(frozenset(chosen)), info={"epsilon": ctx.epsilon, "max_drop": ctx.max_drop,
                                                         "choose": ctx.choose,
                                                       "configurations_evaluated": score.evaluated,
                                                       "prefix_cache": prefix is not None,
                                                       "passes": getattr(prefix, "passes", None),
                                                       "racing_delta": ctx.racing_delta},
    )


def _tale_outputs(path: list[int], scores: list[float], baseline: float) -> tuple[list[int], list[int], list[int]]:
    """best (highest score; ties -> fewer blocks), bsba (deepest with score >= baseline), final (deepest)."""
    depth_scores = [baseline, *scores]  # depth d: the first d removals of the path
    best_depth = max(range(len(depth_scores)), key=lambda d: (depth_scores[d], -d))
    bsba_depth = max((d for d in range(len(depth_scores)) if depth_scores[d] >= baseline), default=0)
    return path[:best_depth], path[:bsba_depth], list(path)


# ---------------------------------------------------------------------------------------------------------
# One-shot baselines: rank blocks by a criterion, remove ``n_remove`` of them


def _query_states(ctx: SearchContext) -> torch.Tensor:
    """Hidden states of the full model at the query position, (L + 1, B, D), in float64."""
    return run_in_chunks(ctx.model, ctx.batch, None, capture=True, chunk=ctx.chunk).states.double()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over examples of (..., B, D) pairs -> (...)."""
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean(-1)


def block_influence_search(ctx: SearchContext) -> PruneResult:
    """ShortGPT: remove the blocks with the lowest Block Influence BI_l = 1 - mean cos(h_in, h_out)."""
    states = _query_states(ctx)
    influence = 1 - _cosine(states[:-1], states[1:])  # (L,)
    order = sorted(range(ctx.model.n_blocks), key=lambda b: (float(influence[b]), b))
    return _one_shot(ctx, "block_influence", order[: ctx.n_remove], {b: float(v) for b, v in enumerate(influence)})


def angular_search(ctx: SearchContext) -> PruneResult:
    """Gromov et al.: remove the n contiguous blocks l..l+n-1 whose input h_l and output h_{l+n} are closest
    in angular distance arccos(cos) / pi."""
    states, n = _query_states(ctx), ctx.n_remove
    starts = range(ctx.model.n_blocks - n + 1)
    distance = {l: float(torch.arccos(_cosine(states[l], states[l + n]).clamp(-1, 1)) / torch.pi) for l in starts}
    start = min(distance, key=lambda l: (distance[l], l))
    return _one_shot(ctx, "angular", list(range(start, start + n)), distance)


def last_k_search(ctx: SearchContext) -> PruneResult:
    """Remove the last ``n_remove`` blocks."""
    n = ctx.model.n_blocks
    return _one_shot(ctx, "last_k", list(range(n - ctx.n_remove, n)), {})


def random_search(ctx: SearchContext) -> PruneResult:
    """Remove ``n_remove`` blocks drawn uniformly at random (seeded by ``ctx.seed``)."""
    blocks = random.Random(ctx.seed).sample(range(ctx.model.n_blocks), ctx.n_remove)
    return _one_shot(ctx, "random", blocks, {})


def _one_shot(ctx: SearchContext, name: str, removed: list[int], block_scores: dict[int, float]) -> PruneResult:
    score = ScoreCache(ctx.scorer, ctx.cache_path, where=ctx.where)  # e.g. TALE's cache on the same selection data
    return PruneResult(
        search=name, n_blocks=ctx.model.n_blocks, baseline_score=score(frozenset()), removed=removed,
        best=removed, final=removed, bsba=removed, path=removed, block_scores=block_scores,
        selection_score=score(frozenset(removed)), info={"n_remove": ctx.n_remove, "seed": ctx.seed},
    )


def distortion_search(ctx: SearchContext) -> PruneResult:
    """Label-free: remove the ``n_remove`` blocks with the largest distortion attribution a_l of the selection
    inputs' profile against the ID reference inputs' profile (only inputs are used, never labels)."""
    if ctx.reference_batch is None:
        raise ConfigError("pruning.search: 'distortion' needs ID reference inputs (SearchContext.reference_batch)")
    shifted = profile(query_states(ctx.model, ctx.batch, None, ctx.chunk))
    reference = profile(query_states(ctx.model, ctx.reference_batch, None, ctx.chunk))
    attribution = distortion(shifted, reference).attribution
    order = sorted(range(ctx.model.n_blocks), key=lambda b: (-attribution[b], b))
    return _one_shot(ctx, "distortion", order[: ctx.n_remove], dict(enumerate(attribution)))


SEARCHES: dict[str, Callable[[SearchContext], PruneResult]] = {
    "tale": tale_search,
    "block_influence": block_influence_search,
    "angular": angular_search,
    "last_k": last_k_search,
    "random": random_search,
    "distortion": distortion_search,
    "sleb": sleb_search,
}


NEEDS_ID_REFERENCE = {"distortion"}  # searches that compare the selection inputs with ID inputs


def get_search(name: str) -> Callable[[SearchContext], PruneResult]:
    """The search called ``name``; a wrong name lists the valid ones."""
    if name not in SEARCHES:
        raise ConfigError(f"pruning.search: unknown search {name!r}; allowed: {sorted(SEARCHES)}")
    return SEARCHES[name]


def check_budget(n_blocks: int, max_drop: int | None, n_remove: int) -> None:
    """Refuse to remove more blocks than the model has."""
    if max_drop is not None and max_drop > n_blocks:
        raise ConfigError(f"pruning.max_drop: {max_drop} is more blocks than the model has ({n_blocks}); "
                          f"allowed: 1..{n_blocks}")
    if n_remove > n_blocks:
        raise ConfigError(f"pruning.n_remove: {n_remove} is more blocks than the model has ({n_blocks}); "
                          f"allowed: 1..{n_blocks}")
