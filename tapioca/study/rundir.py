"""Run-directory helpers every study uses: the resolved config and environment, cached steps (atomic writes,
skipped when their output exists), per-step wall times, progress across seeds, and seed threads.

Nothing here knows a model kind; nothing in :mod:`tapioca.study` is imported back.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from tqdm.auto import tqdm

from tapioca.analysis.evaluation import Evaluation
from tapioca.api import resolve_device
from tapioca.config import Config, read_yaml, to_dict, with_defaults
from tapioca.errors import CheckpointError, TapiocaError
from tapioca.io import environment, read_json, write_json, write_yaml
from tapioca.report.claims import RULE_KEYS

Log = Callable[[str], None]
T = TypeVar("T")


class StudyStopped(TapiocaError):
    """A seed stopped because another seed of the same study failed."""


class Timer:
    """Wall seconds per named step, summed (over seeds, also when seeds run in parallel threads), persisted to
    ``timings.json``. ``before_step`` runs in the calling thread as each step starts."""

    def __init__(self, path: Path, before_step: Callable[[], None] | None = None) -> None:
        self.path, self.before_step = path, before_step
        self.seconds: dict[str, float] = read_json(path) if path.is_file() else {}
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.before_step is not None:
            self.before_step()
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                write_json(self.path, self.seconds)


class SeedThreads:
    """Runs replicate seeds in parallel threads and shares this process's torch CPU threads among the seeds
    running at once: each seed sets its own thread's count as each of its steps starts (:meth:`fit`), so a
    seed left alone at the end gets every thread back. Per-example results do not depend on it (the kernels
    give the same numbers with 1 or 2 threads; tests check the parallel study against the serial one).
    After an error in one seed the others stop at their next step."""

    def __init__(self, workers: int, threads: int | None = None) -> None:
        self.workers = workers
        self.threads = threads if threads is not None else torch.get_num_threads()
        self._running = 0
        self._lock = threading.Lock()
        self._failed = threading.Event()

    def fit(self) -> None:
        """Called at a step boundary by the seed's own thread."""
        if self._failed.is_set():
            raise StudyStopped("another seed failed; this one stops at a step boundary")
        if self.workers > 1:
            torch.set_num_threads(max(1, self.threads // max(1, self._running)))

    def map(self, run: Callable[[int], T], seeds: list[int]) -> dict[int, T]:
        """``{seed: run(seed)}``, ``workers`` seeds at a time (in order when ``workers`` is 1)."""
        if self.workers <= 1 or len(seeds) <= 1:
            return {seed: run(seed) for seed in seeds}

        def one(seed: int) -> T:
            with self._lock:
                self._running += 1
            try:
                return run(seed)
            except BaseException:
                self._failed.set()
                raise
            finally:
                with self._lock:
                    self._running -= 1

        pool = ThreadPoolExecutor(min(self.workers, len(seeds)), thread_name_prefix="tapioca-seed")
        try:
            futures = {seed: pool.submit(one, seed) for seed in seeds}
            for _ in as_completed(futures.values()):
                pass
            errors = [e for f in futures.values() if (e := f.exception()) is not None]
            if errors:  # the error that stopped the study, not the stops it caused
                raise next((e for e in errors if not isinstance(e, StudyStopped)), errors[0])
            return {seed: future.result() for seed, future in futures.items()}
        except BaseException:
            self._failed.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def seed_workers(cfg: Config) -> int:
    """``run.seed_workers``, or (None) on a CPU device one per seed, up to twice the CPU threads (3 seeds on 2
    cores all run at once, one thread each, and finish together instead of leaving the last one alone), else 1.
    A study on a language model runs its seeds one after another: they share one model and its hooks."""
    if cfg.lm is not None:
        return 1
    if cfg.run.seed_workers is not None:
        return cfg.run.seed_workers
    if resolve_device(cfg.run.device).type != "cpu":
        return 1
    return max(1, min(len(cfg.evaluation.seeds), 2 * torch.get_num_threads()))


class StepProgress:
    """One bar for a study's per-seed steps, across seeds running in threads: it moves as each (seed, step)
    finishes and names the step just finished (cached steps count too). ``inner``: steps may show bars of their
    own (e.g. TALE rounds), when one seed runs at a time."""

    def __init__(self, seeds: list[int], steps: list[str], enabled: bool, inner: bool = False) -> None:
        self.bar = tqdm(total=len(seeds) * len(steps), disable=not enabled, desc="study steps", unit="step")
        self.inner = enabled and inner
        self._lock = threading.Lock()

    def done(self, seed: int, step: str) -> None:
        with self._lock:
            self.bar.update(1)
            self.bar.set_postfix_str(f"seed {seed}: {step}", refresh=True)

    def running(self, seed: int, what: str) -> None:
        """Name work in progress that has no step of its own (e.g. the controls' selections) on the bar."""
        with self._lock:
            self.bar.set_postfix_str(f"seed {seed}: {what}…", refresh=True)

    def close(self) -> None:
        self.bar.close()


# evaluation settings that no cached step depends on: every seed's and every selection draw's outputs live in
# folders of their own, and the verdict rules are applied to the pooled statistics when they are recomputed
RECOMPUTED = ("seeds", "selection_draws", "placebo_harmful_z", "ece_tolerance", *RULE_KEYS)


def _what_results_depend_on(tree: dict) -> dict:
    """A resolved config tree without ``run`` (threads, device, output folder) and the evaluation settings in
    :data:`RECOMPUTED`: a run may gain (or drop) seeds and selection draws, or be re-decided under other
    thresholds, and resume."""
    kept = {k: v for k, v in tree.items() if k != "run"}
    kept["evaluation"] = {k: v for k, v in (kept.get("evaluation") or {}).items() if k not in RECOMPUTED}
    return kept


def _same_results_config(recorded: dict, resolved: dict) -> bool:
    """Whether a run directory's recorded config (keys added to tapioca since take their defaults) gives the same
    results as ``resolved``."""
    return _what_results_depend_on(with_defaults(recorded)) == _what_results_depend_on(resolved)


def prepare_run_dir(cfg: Config, out: Path) -> None:
    """Create ``out`` with the resolved config and environment; refuse a run dir of another config (its seeds and
    ``run`` settings may differ)."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    resolved = to_dict(cfg)
    if config_path.is_file() and not _same_results_config(read_yaml(config_path), resolved):
        raise CheckpointError(f"{str(out)!r} holds a run with a different config; use another --out or delete it")
    write_yaml(config_path, resolved)
    write_json(out / "environment.json", environment())


def finished_results(cfg: Config, out: Path) -> dict | None:
    """The ``results.json`` of a finished study in ``out`` made with ``cfg`` (same results-relevant config and
    the same seeds), else None: a ladder may take a rung that ran earlier without running it again."""
    config_path, results_path = out / "config.yaml", out / "results.json"
    if not (config_path.is_file() and results_path.is_file()):
        return None
    previous, resolved = read_yaml(config_path), to_dict(cfg)
    same_seeds = list(with_defaults(previous)["evaluation"]["seeds"]) == list(resolved["evaluation"]["seeds"])
    return read_json(results_path) if same_seeds and _same_results_config(previous, resolved) else None


def cached_json(path: Path, compute: Callable[[], dict]) -> dict:
    """Read ``path`` if it exists, else compute, write atomically and return."""
    if path.is_file():
        return read_json(path)
    result = compute()
    write_json(path, result)
    return result


def cached_evaluation(path: Path, compute: Callable[[], Evaluation]) -> Evaluation:
    if path.is_file():
        return Evaluation.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = compute()
    result.save(path)
    return result


