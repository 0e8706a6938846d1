"""TALE rounds on Ray workers: each worker holds a model replica and scores a share of a round's candidates.

A round's candidates are independent, so they spread over ``workers`` actors; each runs the same code as the
serial search (:class:`~tapioca.pruning.searches.PrefixRounds`, or the chunked scorer), on the same data, in the same
chunks, so the selection is identical to the serial run. Local Ray by default; ``address=`` joins an existing
cluster. On GPUs give every worker one device with ``num_gpus=1`` (see benchmarks/README.md).

    factory = ICLReplica.of(model)                       # picklable: config + CPU state dict
    result = parallel_tale(ctx, factory, workers=2)       # ctx: a SearchContext, as for tale_search

Hugging Face LMs: ``HFReplica.of(lm)`` (an :class:`~tapioca.models.hf.HFModel` from ``HFModel.load``) reloads
the model from its folder on each worker; ``tapioca.tasks.choices.prune_lm(..., workers=N)`` wraps it as the search does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tapioca.config import ModelConfig
from tapioca.errors import ConfigError
from tapioca.models.base import BlockModel, run_in_chunks
from tapioca.models.gates import removal_gates
from tapioca.models.hf import HFModel, dtype_name
from tapioca.models.icl import ICLModel
from tapioca.pruning.searches import PredictionScorer, PrefixRounds, PruneResult, SearchContext, tale_search

ModelFactory = Callable[[torch.device], BlockModel]  # device -> a model replica in eval mode (picklable)


@dataclass(frozen=True)
class ICLReplica:
    """A picklable recipe for a testbed model: its config and CPU weights. Call with a device."""

    cfg: ModelConfig
    state: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: ICLModel) -> "ICLReplica":
        return cls(model.cfg, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})

    def __call__(self, device: torch.device) -> ICLModel:
        model = ICLModel(self.cfg)
        model.load_state_dict(self.state)
        return model.to(device).eval()


@dataclass(frozen=True)
class HFReplica:
    """A picklable recipe for a Hugging Face causal LM adapter: a local folder (or ``.gguf`` file) read again on
    the worker, so only these few fields travel. The folder must exist at ``path`` on every worker machine.

    ``dtype``: "float32", "bfloat16" or "float16". ``device_map``: accelerate sharding (then the worker's
    device is not used; give the actor ``num_gpus=k`` for k shards).
    """

    path: str
    dtype: str = "float32"
    chat: bool = False
    gguf_file: str | None = None
    device_map: str | dict | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))  # checks it; torch.bfloat16 -> "bfloat16"

    @classmethod
    def of(cls, lm: HFModel) -> "HFReplica":
        """The recipe of an adapter made by :meth:`HFModel.load` (the same folder, dtype, chat and device map).
        Workers read the folder's weights: changes made to ``lm`` in memory after loading do not travel."""
        if lm.source is None:
            raise ConfigError("this HFModel was not made by HFModel.load, so workers cannot load it again; "
                              "save it (lm.save(folder)) and load it with HFModel.load(folder), or build "
                              "HFReplica(folder, dtype, chat) yourself")
        src = lm.source
        return cls(src.path, src.dtype, lm.chat, src.gguf_file, src.device_map)

    def __call__(self, device: torch.device) -> HFModel:
        return HFModel.load(self.path, self.dtype, device, self.gguf_file, self.chat, self.device_map)


def require_ray(key: str, workers: int) -> None:
    """A ConfigError naming ``key`` when ``workers`` asks for Ray workers but Ray is not installed."""
    if workers > 0 and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"{key}: {workers} Ray workers need Ray, which is not installed; "
                          "pip install 'tapioca[parallel]' (or use 0 workers: serial, in-process)")


def split_candidates(candidates: list[int], workers: int) -> list[list[int]]:
    """Interleaved shares (``candidates[i::workers]``), non-empty only. Interleaving balances prefix reuse,
    where an early candidate (long suffix to run) costs more than a late one."""
    return [share for share in (candidates[i::workers] for i in range(workers)) if share]


class CandidateWorker:
    """Scores candidates of a round on one model replica (runs inside a Ray actor, or in-process)."""

    def __init__(self, factory: ModelFactory, batch: Any, score_predictions: PredictionScorer, chunk: int,
                 prefix: bool, threads: int | None, device: str) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.model = factory(torch.device(device))
        self.batch, self.score_predictions, self.chunk = batch, score_predictions, chunk
        self.prefix = PrefixRounds(self.model, batch, score_predictions, chunk) if prefix else None

    def evaluate(self, removed: list[int], candidates: list[int]) -> dict[int, float]:
        """Mean selection score of ``removed + [b]`` for each candidate b."""
        if self.prefix is not None:
            return self.prefix(removed, candidates)
        return {b: self._score([*removed, b]) for b in candidates}

    def _score(self, removed: list[int]) -> float:
        preds = run_in_chunks(self.model, self.batch, removal_gates(removed), capture=False, chunk=self.chunk)
        return float(self.score_predictions(preds.predictions, self.batch).double().mean())


class RayEvaluator:
    """A TALE round evaluator (``SearchContext.candidate_evaluator``) over ``workers`` Ray actors.

    ``address``: an existing cluster ("auto", "ray://host:10001"); None starts local Ray with ``workers``
    CPUs (and shuts it down on :meth:`close`). ``num_gpus``: GPUs per worker (1 = one worker per GPU; the
    replica is then built on "cuda", which Ray maps to the worker's own device). ``threads``: torch CPU
    threads per worker (None: the driver's current ``torch.get_num_threads()``, so kernels match the serial run).
    """

    def __init__(self, factory: ModelFactory, batch: Any, score_predictions: PredictionScorer, *, workers: int = 2,
                 address: str | None = None, chunk: int = 1024, prefix: bool = True, threads: int | None = None,
                 num_cpus: float = 1, num_gpus: float = 0, runtime_env: dict | None = None) -> None:
        import ray  # optional dependency: only this path needs it

        if workers < 1:
            raise ValueError(f"workers: {workers} is too few; use at least 1")
        self._ray, self._owns_ray = ray, not ray.is_initialized()
        if self._owns_ray:
            init = {"address": address} if address else {"num_cpus": max(math.ceil(workers * num_cpus), 1)}
            ray.init(**init, runtime_env=runtime_env, include_dashboard=False, log_to_driver=False)
        device = "cuda" if num_gpus > 0 else "cpu"
        threads = torch.get_num_threads() if threads is None else threads
        actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(CandidateWorker)
        batch_ref = ray.put(batch)
        self.actors = [actor.remote(factory, batch_ref, score_predictions, chunk, prefix, threads, device)
                       for _ in range(workers)]

    def __call__(self, removed: list[int], candidates: list[int]) -> dict[int, float]:
        shares = split_candidates(candidates, len(self.actors))
        futures = [a.evaluate.remote(list(removed), share) for a, share in zip(self.actors, shares)]
        merged: dict[int, float] = {}
        for part in self._ray.get(futures):
            merged.update(part)
        return {b: merged[b] for b in candidates}

    def close(self) -> None:
        """Stop the actors (and local Ray, if this evaluator started it)."""
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._owns_ray:
            self._ray.shutdown()

    def __enter__(self) -> "RayEvaluator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parallel_tale(ctx: SearchContext, factory: ModelFactory, workers: int = 2, address: str | None = None,
                  **ray_options: Any) -> PruneResult:
    """:func:`~tapioca.pruning.searches.tale_search` with each round's candidates scored on Ray workers.

    ``ctx.score_predictions`` must be set (workers score predictions of the same ``ctx.batch``); ``factory``
    rebuilds ``ctx.model`` on a device. The baseline is scored on the driver, as in the serial search.
    """
    if ctx.score_predictions is None:
        raise ValueError("parallel_tale needs SearchContext.score_predictions (workers score their own predictions)")
    with RayEvaluator(factory, ctx.batch, ctx.score_predictions, workers=workers, address=address,
                      chunk=ctx.chunk, prefix=ctx.prefix_cache, **ray_options) as evaluator:
        result = tale_search(dataclasses.replace(ctx, candidate_evaluator=evaluator))
    result.info.update(workers=workers, ray_address=address)
    return result
