"""The study on a real causal LM and a text task: prune -> evaluate -> profile -> intervene -> verdicts.

The same steps and the same results.json layout as the testbed study (:mod:`tapioca.study.steps`), so the report
and the C1–C9 rules read both. What differs: the model is fixed and ``evaluation.seeds`` are sampling seeds
(which examples and demonstrations); held-out scores are accuracy (multiple choice by choice log-likelihood,
short answer by greedy generation and the task's checker), with ECE and Brier (confidence: top-choice
probability, or the probability of the greedy answer line); states
are taken at the last prompt token. Every step is cached in the run directory and skipped on re-run.

    tapioca study --config configs/lm-smollm2-arithmetic.yaml
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tapioca.report.claims import verdicts
from tapioca.config import Config, LMConfig
from tapioca.errors import CheckpointError, ConfigError
from tapioca.analysis.evaluation import Evaluation
from tapioca.analysis.geometry import profile
from tapioca.io import write_json
from tapioca.analysis.interventions import residual_scaling_sweep
from tapioca.tasks.choices import lm_selection, prune_lm
from tapioca.analysis.calibration import calibration_change, compare_lm, evaluate_lm
from tapioca.models.base import run_in_chunks
from tapioca.models.gates import removal_gates
from tapioca.models.hf import HFModel
from tapioca.models.resumed import ResumedRuns
from tapioca.models.install import MODELS, installed_path
from tapioca.pruning.searches import PruneResult
from tapioca.study.steps import (
    Log, Timer, cached_evaluation, cached_json, distortion_summary, intervention_table, prepare_run_dir,
)
from tapioca.tasks.text import TextTask, TextTaskConfig

PRIMARY_METRIC = "acc"


def resolve_lm_path(name: str) -> Path:
    """An installed model's folder (by ``tapioca models list`` name), or ``name`` as a local path."""
    if name in MODELS:
        path = installed_path(name)
        if path is None:
            raise CheckpointError(f"lm.model: {name!r} is not installed; run `tapioca models install {name}`")
        return path
    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(f"lm.model: {name!r} is neither an installed model ({', '.join(MODELS)}) nor an "
                              "existing folder or .gguf file")
    return path


def load_lm(cfg: LMConfig, device: str) -> HFModel:
    return HFModel.load(resolve_lm_path(cfg.model), dtype=cfg.dtype, device=device, chat=cfg.chat)


def load_text_task(cfg: LMConfig) -> TextTask:
    """The text task of ``lm.task`` (errors name the ``lm.task`` key)."""
    try:
        return TextTask(TextTaskConfig(**cfg.task))
    except TypeError as err:
        raise ConfigError(f"lm.task: {err}; allowed keys: {list(TextTaskConfig.__dataclass_fields__)}") from None
    except ConfigError as err:
        raise ConfigError(f"lm.task.{err}") from None


def check_data(cfg: Config, task: TextTask) -> None:
    """Fail before any model work if some distribution, role and seed has fewer examples than the study takes
    (selection, held-out, and the geometry's reference prompts: twice ``n_profile`` on ID, for the noise floor);
    the task's error names the split, the role and what to change."""
    lmc = cfg.lm
    assert lmc is not None
    for dist in task.distributions:
        needs = {"select": lmc.n_select, "heldout": lmc.n_heldout,
                 "reference": 2 * lmc.n_profile if dist == "id" else lmc.n_profile}
        for role, n in needs.items():
            for seed in cfg.evaluation.seeds:
                task.data(dist, role, seed, n)


@dataclass
class LMSeedOutputs:
    """What one sampling seed contributes."""

    searches: dict[str, PruneResult]
    full: Evaluation
    from_id: Evaluation
    target: Evaluation
    profiles: dict
    causal: dict[str, dict] = field(default_factory=dict)


@dataclass
class LMStudy:
    """The fixed parts of one LM study: config, model, task and run directory."""

    cfg: Config
    lm: HFModel
    task: TextTask
    out: Path
    progress: bool = True

    @property
    def lmc(self) -> LMConfig:
        assert self.cfg.lm is not None
        return self.cfg.lm

    def search(self, seed: int, dist: str) -> PruneResult:
        """TALE selected on ``dist`` (protocol target; the "id" search is also the from-id one), cached."""
        p, lmc = self.cfg.pruning, self.lmc
        folder = self.out / "pruning" / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        compute = lambda: prune_lm(  # noqa: E731
            self.lm, self.task, "tale", "target", dist, epsilon=p.epsilon, max_drop=p.max_drop, choose=p.choose,
            metric=lmc.metric, seed=seed, n_select=lmc.n_select, batch_size=lmc.batch_size,
            prefix_cache=p.prefix_cache, length_normalize=lmc.length_normalize, max_new_tokens=lmc.max_new_tokens,
            progress=self.progress, cache_path=folder / f".{dist}.scores.json", workers=p.workers,
            ray_address=p.ray_address).to_dict()
        return PruneResult.from_dict(cached_json(folder / f"tale-{dist}.json", compute))

    def evaluate(self, seed: int, removed: list[int], dists: list[str]) -> Evaluation:
        lmc = self.lmc
        return evaluate_lm(self.lm, self.task, removal_gates(removed) if removed else None, dists, [seed],
                           lmc.n_heldout, batch_size=lmc.batch_size, length_normalize=lmc.length_normalize,
                           max_new_tokens=lmc.max_new_tokens, progress=self.progress)

    def states(self, seed: int, examples: list, removed: list[int]):
        """States (L + 1, n, D) at the last prompt token of ``examples`` with ``removed`` skipped."""
        tokens = self.lm.tokenize(self.task.prompts(examples, seed))
        gates = removal_gates(removed) if removed else None
        return run_in_chunks(self.lm, tokens, gates, capture=True, chunk=self.lmc.batch_size).states.cpu()


def run_lm_study(cfg: Config, out: Path, progress: bool = True, log: Log = print) -> dict:
    """Run the LM study of ``cfg`` (``cfg.lm`` set) into ``out`` and return results.json."""
    if cfg.lm is None:
        raise ConfigError("run_lm_study needs an lm: section in the config")
    prepare_run_dir(cfg, out)
    timer = Timer(out / "timings.json")
    with timer("load"):
        study = LMStudy(cfg, load_lm(cfg.lm, cfg.run.device), load_text_task(cfg.lm), out, progress)
    log(f"{cfg.lm.model}: {study.lm.n_blocks} blocks; task {study.task.cfg.source} ({study.task.kind}), "
        f"distributions {study.task.distributions}")
    check_data(cfg, study.task)
    per_seed = {seed: _run_seed(study, seed, timer, log) for seed in cfg.evaluation.seeds}
    with timer("statistics"):
        results = _results(study, per_seed)
    results["timings_seconds"] = timer.seconds
    write_json(out / "results.json", results)
    return results


def _run_seed(study: LMStudy, seed: int, timer: Timer, log: Log) -> LMSeedOutputs:
    dists = study.task.distributions
    with timer("prune"):
        searches = {d: study.search(seed, d) for d in dists}
    with timer("evaluate"):
        full, from_id, target = _evaluations(study, seed, searches)
    with timer("geometry"):
        profiles = cached_json(study.out / "geometry" / f"seed{seed}.json", lambda: _profiles(study, seed, searches))
    outputs = LMSeedOutputs(searches, full, from_id, target, profiles)
    if study.cfg.geometry.controls:
        with timer("interventions"):
            id_profiles: dict = {}
            outputs.causal = {
                t: cached_json(study.out / "interventions" / f"seed{seed}" / f"{t}.json",
                               lambda t=t: interventions(study, seed, t, searches[t].removed, id_profiles))
                for t in dists if t != "id" and searches[t].removed}
    log(f"seed {seed}: ID accuracy {full.mean('id', 'acc'):.3f}; TALE removed (target=id) {searches['id'].removed}; "
        + ", ".join(f"{d} {searches[d].removed}" for d in dists if d != "id"))
    return outputs


def _evaluations(study: LMStudy, seed: int, searches: dict[str, PruneResult]) -> tuple[Evaluation, Evaluation, Evaluation]:
    """Held-out evaluations (cached): full model, from-id pruned on every distribution, and each target-pruned
    model on its own distribution. Where nothing was removed the full model's result is reused."""
    dists, folder = study.task.distributions, study.out / "evaluation" / f"seed{seed}"
    full = cached_evaluation(folder / "full.npz", lambda: study.evaluate(seed, [], dists))

    def pruned(name: str, removed: list[int], on: list[str]) -> Evaluation:
        if not removed:
            return full.subset(on)
        return cached_evaluation(folder / name, lambda: study.evaluate(seed, removed, on))

    from_id = pruned("from-id.npz", searches["id"].removed, dists)
    target = Evaluation.concat([pruned(f"target-{d}.npz", searches[d].removed, [d]) for d in dists])
    return full, from_id, target


def _profiles(study: LMStudy, seed: int, searches: dict[str, PruneResult]) -> dict:
    """Norm and pairwise-distance profiles at the last prompt token, in the testbed study's layout: full model
    per distribution, a second ID sample (noise floor), target-pruned (OOD and ID), from-id pruned."""
    n, task = study.lmc.n_profile, study.task
    data = {d: task.data(d, "reference", seed, 2 * n if d == "id" else n) for d in task.distributions}
    id_b = data["id"][n:]
    data["id"] = data["id"][:n]
    memo: dict[tuple, dict] = {}

    def prof(dist: str, removed: list[int]) -> dict:
        key = (dist, tuple(removed))
        if key not in memo:
            examples = id_b if dist == "id_b" else data[dist]
            memo[key] = profile(study.states(seed, examples, removed)).to_dict()
        return memo[key]

    id_removed = searches["id"].removed
    return {
        "full": {d: prof(d, []) for d in task.distributions},
        "id_b": prof("id_b", []),
        "target": {d: {"ood": prof(d, searches[d].removed), "id": prof("id", searches[d].removed)}
                   for d in task.distributions},
        "from-id": {"ood": {d: prof(d, id_removed) for d in task.distributions}, "id": prof("id", id_removed)},
    }


def intervention_metric(kind: str, metric: str) -> str:
    """A selection metric computable from one forward pass (sweeps need scores and states of the same run):
    short-answer generation accuracy becomes the gold answer's log-likelihood."""
    return "loglik" if kind == "short_answer" and metric == "acc" else metric


def interventions(study: LMStudy, seed: int, shift: str, removed: list[int], id_profiles: dict) -> dict:
    """Residual-scaling sweeps of TALE's blocks and of as many random kept blocks (control), scored with the
    selection metric on the reference-role examples (the geometry prompts) of ``shift``; D against the gated
    model's ID profile. Norm matching is not run on text (per-position norms of prompts of different
    lengths): its entry records the full and pruned scores and says so."""
    lmc, task = study.lmc, study.task
    metric = intervention_metric(task.kind, lmc.metric)
    select = partial(lm_selection, study.lm, task, role="reference", seed=seed, n=lmc.n_profile, metric=metric,
                     chunk=lmc.batch_size, length_normalize=lmc.length_normalize)
    ood, ident = select(shift), select("id")
    kept = [b for b in range(study.lm.n_blocks) if b not in removed]
    control = sorted(random.Random(seed).sample(kept, min(len(kept), len(removed))))

    ood_runs, id_runs = (ResumedRuns(ood.model, s.batch, lmc.batch_size) for s in (ood, ident))

    def sweep(blocks: list[int]) -> list[dict]:
        points = residual_scaling_sweep(ood.model, blocks, ood_runs, id_runs, ood.score_predictions,
                                        study.cfg.geometry.alphas, lmc.batch_size, id_profiles)
        return [p.to_dict() for p in points]

    swept = sweep(removed)
    at = {p["alpha"]: p["score"] for p in swept}
    matching: dict[str, Any] = {"skipped": "text prompts differ in length; per-position norm matching is not run"}
    if 1.0 in at and 0.0 in at:
        matching.update(ood_full=at[1.0], ood_pruned=at[0.0])
    return {"removed": list(removed), "control_blocks": control, "n": lmc.n_profile, "metric": metric,
            "sweep_removed": swept, "sweep_control": sweep(control) if control else [], "norm_matching": matching}


def _results(study: LMStudy, per_seed: dict[int, LMSeedOutputs]) -> dict:
    ev, task, lmc = study.cfg.evaluation, study.task, study.lmc
    dists = task.distributions
    full = Evaluation.concat([o.full for o in per_seed.values()])
    target = Evaluation.concat([o.target for o in per_seed.values()])
    from_id = Evaluation.concat([o.from_id for o in per_seed.values()])
    searches = {seed: o.searches for seed, o in per_seed.items()}
    seeds = [str(s) for s in per_seed]
    summary = partial(Evaluation.summary, n_bootstrap=ev.n_bootstrap, confidence=ev.confidence)
    compared = partial(compare_lm, distributions=dists, n_bootstrap=ev.n_bootstrap, confidence=ev.confidence)
    results: dict[str, Any] = {
        "kind": "lm",
        "model": {"name": lmc.model, "n_blocks": study.lm.n_blocks, "dtype": lmc.dtype, "chat": lmc.chat},
        "task": {"source": task.cfg.source, "kind": task.kind, "splits": task.cfg.splits, "n_shots": task.cfg.n_shots},
        "primary_metric": PRIMARY_METRIC,
        "quality": {"model_id_acc": summary(full)["id"][PRIMARY_METRIC]},
        "full": summary(full),
        "protocols": {
            "target": {"delta": compared(full, target), "pruned": summary(target)},
            "from-id": {"delta": compared(full, from_id), "pruned": summary(from_id)},
        },
        "removed": {
            "target": {d: {s: searches[int(s)][d].removed for s in seeds} for d in dists},
            "from-id": {s: searches[int(s)]["id"].removed for s in seeds},
        },
        "selection_metric": lmc.metric,
        "n_blocks": study.lm.n_blocks,
        "geometry": distortion_summary({s: o.profiles for s, o in per_seed.items()}, dists),
        "interventions": intervention_table({s: o.causal for s, o in per_seed.items()}),
    }
    results["calibration"] = {"target": calibration_change(full, target), "from-id": calibration_change(full, from_id)}
    results["claims"] = verdicts(results)
    return results
