"""``tapioca check``: is a pruned causal LM not worse where it matters? Three tests on any pair of models.

Both models (two Hugging Face folders; the pruned one may come from any tool) are scored on the same held-out
examples of the config's text task (``lm.task``; ``evaluation.seeds`` are sampling seeds, ``lm.n_heldout``
examples per seed and distribution), and compared:

1. **In-distribution**: Δ accuracy (pruned − base) on ID, paired-bootstrap CI, minimal detectable effect.
2. **Out-of-distribution**: the same Δ on each named shift, Holm-corrected across shifts.
3. **Calibration**: ECE, Brier and the reliability curve of both models per distribution, with paired-bootstrap
   CIs of ΔECE, ΔBrier and Δ mean confidence, so that an OOD "gain" is not just tamer confidence.

The verdict rules (:func:`verdict_no_id_loss`, :func:`verdict_ood_gain`, :func:`verdict_not_confidence_artefact`)
are fixed here, before any result, and read only the numbers in ``check.json``. Which original blocks the pruned
model kept is inferred from block weights (:func:`tapioca.models.hf_save.match_blocks`); where it can be, the
layer-wise profiles of both models are compared block by original block. ``check.json``, ``report.md``,
``report.html`` and PNG plots go to the output folder (:mod:`tapioca.report.check_report`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from tapioca.analysis import stats
from tapioca.analysis.calibration import calibration
from tapioca.analysis.evaluation import Evaluation, compare, example_view
from tapioca.analysis.geometry import Profile, distortion, profile, query_states
from tapioca.api import resolve_device
from tapioca.config import Config
from tapioca.errors import ConfigError, DataError
from tapioca.io import environment, write_json
from tapioca.models.hf import HFModel
from tapioca.models.hf_save import BlockMatch, by_original_block, match_blocks, read_provenance
from tapioca.config import EvaluationConfig
from tapioca.report.claims import INCONCLUSIVE, REFUTED, SUPPORTED, GainTest, gain_outcome, holm_outcomes, room_of
from tapioca.tasks import base as workload_base
from tapioca.tasks.text_workload import TextWorkload, load_text_task, resolve_lm_path

METRIC = "acc"  # the tests are decided on held-out accuracy
ALPHA = 1.0 - EvaluationConfig().confidence  # the level of a row judged alone (a check's own: its settings)
CONFIDENCE_TOLERANCE = EvaluationConfig().confidence_tolerance  # mean confidence may fall by at most this much
ECE_TOLERANCE = EvaluationConfig().ece_tolerance  # default: ECE may rise by at most this much where OOD improved
N_BINS = 15  # equal-width confidence bins of ECE and the reliability curve
TESTS = ("no ID loss", "OOD gain", "not a confidence artefact")


# ---------------------------------------------------------------- statistics


def _bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence (n,), as :func:`tapioca.analysis.stats.ece` bins it: (edge_i, edge_i+1], 0 in bin 0."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, np.clip(confidence, 0.0, 1.0), side="left") - 1, 0, n_bins - 1)


def _gap_matrix(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """(n, n_bins): confidence − correctness of each example in its bin's column; ECE = |column sums|.sum() / n."""
    out = np.zeros((len(confidence), n_bins))
    out[np.arange(len(confidence)), _bins(confidence, n_bins)] = confidence - correct
    return out


def paired_ece_bootstrap(base: dict[str, np.ndarray], pruned: dict[str, np.ndarray], groups: np.ndarray,
                         n_resamples: int = 10_000, confidence: float = 0.95, n_bins: int = N_BINS,
                         seed: int = 0) -> dict[str, float]:
    """ΔECE = ECE(pruned) − ECE(base) on the same examples, with a paired percentile-bootstrap CI and a
    two-sided bootstrap p-value: each resample draws the same examples (within each group of ``groups``, (n,))
    for both models. ``base`` / ``pruned``: per-example ``confidence`` and ``acc`` (n,)."""
    gaps = [_gap_matrix(m["confidence"], m["acc"], n_bins) for m in (base, pruned)]
    n = len(groups)
    observed = float(np.abs(gaps[1].sum(0)).sum() - np.abs(gaps[0].sum(0)).sum()) / n
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    draws = []
    for start in range(0, n_resamples, 1000):
        m = min(1000, n_resamples - start)
        counts = np.zeros((m, n))
        for idx in members:
            counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=m)
        draws.append((np.abs(counts @ gaps[1]).sum(1) - np.abs(counts @ gaps[0]).sum(1)) / n)
    d = np.concatenate(draws)
    alpha = 1.0 - confidence
    low, high = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2.0 * min((np.sum(d <= 0) + 1) / (len(d) + 1), (np.sum(d >= 0) + 1) / (len(d) + 1)))
    return {"mean": observed, "low": float(low), "high": float(high), "p_value": float(p), "n": n}


def _paired(a: np.ndarray, b: np.ndarray, groups: np.ndarray, n_resamples: int, confidence: float) -> dict[str, Any]:
    """Paired-bootstrap Δ = mean(a − b) as a plain dict (CI, p, sd, MDE, TOST bounds)."""
    return stats.paired_bootstrap(a, b, groups=groups, n_resamples=n_resamples, confidence=confidence,
                                  seed=0).to_dict()


# ---------------------------------------------------------------- verdict rules (fixed in advance)


def _line(test: str, scope: str, verdict: str, evidence: str, **numbers: Any) -> dict[str, Any]:
    return {"test": test, "scope": scope, "verdict": verdict, "evidence": evidence, "numbers": numbers}


def _ci(row: dict[str, Any], points: bool = True) -> str:
    scale, unit = (100.0, " pts") if points else (1.0, "")
    return f"{scale * row['mean']:+.2f} [{scale * row['low']:+.2f}, {scale * row['high']:+.2f}]{unit}"


def _power(row: dict[str, Any], delta: float) -> str:
    """The row's MDE at its n, and the n that would detect ``delta``."""
    needed = stats.examples_needed(row.get("sd"), delta)
    return (f"MDE {100 * row['mde']:.2f} pts at n={row['n']}"
            + (f", n≈{needed} would detect δ" if needed else ""))


def _at_limit(test: str, scope: str, limit: str, chance: float | None, ci: str,
              numbers: dict[str, Any]) -> dict[str, Any]:
    """The inconclusive line where the base model's accuracy is within δ of ``chance`` (``limit`` "floor") or
    of 1 ("ceiling"): there neither "no loss" nor "no gain" says anything about pruning
    (:func:`tapioca.report.claims.room`)."""
    where = f"within δ of chance ({chance:.3f})" if limit == "floor" else "within δ of 1"
    return _line(test, scope, INCONCLUSIVE, f"{limit}: the base model's accuracy is {where}: {ci}", **numbers,
                 room=limit)


def verdict_no_id_loss(row: dict[str, Any], delta: float, chance: float | None = None) -> dict[str, Any]:
    """"No ID loss" from the ID accuracy row (Δ = pruned − base: 95 % paired-bootstrap CI [low, high] and the
    (1 − 2α) TOST interval [low_tost, high_tost]) and the smallest effect of interest δ
    (``evaluation.smallest_effect_points``), each bound a one-sided test at α as in the claims.

    supported: low_tost > −δ (a loss as large as δ is excluded; a significant loss smaller than δ is no loss
    that matters). refuted: high_tost < −δ (the loss exceeds δ), or the loss is significant (high < 0) and a
    loss of δ cannot be excluded. inconclusive: otherwise, with the minimal detectable effect, and instead of
    "supported" when the base model is at chance (``chance``: a floor, where no loss is possible) and the pruned
    model is not significantly better."""
    ci = f"ID Δacc {_ci(row)} (base {row['base']:.3f}, pruned {row['pruned']:.3f}; δ {100 * delta:.1f} pts)"
    numbers = dict(mean=row["mean"], low=row["low"], high=row["high"], mde=row["mde"], n=row["n"], sesoi=delta)
    low_t, high_t = row.get("low_tost", row["low"]), row.get("high_tost", row["high"])
    at_floor = room_of(METRIC, row["base"], chance, delta) == "floor" and row["low"] <= 0  # no significant gain
    if low_t > -delta and not at_floor:
        return _line(TESTS[0], "id", SUPPORTED, f"a loss of δ or more is excluded: {ci}", **numbers)
    if high_t < -delta:
        return _line(TESTS[0], "id", REFUTED, f"the pruned model loses more than δ in-distribution: {ci}", **numbers)
    if row["high"] < 0:
        return _line(TESTS[0], "id", REFUTED, f"a significant ID loss, and a loss of δ is not excluded: {ci}",
                     **numbers)
    if at_floor and low_t > -delta:
        return _at_limit(TESTS[0], "id", "floor", chance, ci, numbers)
    return _line(TESTS[0], "id", INCONCLUSIVE, f"cannot exclude an ID loss of δ ({_power(row, delta)}): {ci}",
                 **numbers)


def verdict_ood_gain(shift: str, row: dict[str, Any], delta: float, chance: float | None = None,
                     outcome: str | None = None) -> dict[str, Any]:
    """"OOD gain" on one shift, from its accuracy row and its ``outcome`` (:func:`tapioca.report.claims.
    gain_outcome`, Holm-adjusted across the check's shifts by :func:`verdicts`; without it the row alone decides,
    with its ``p_holm``) — the claims' convention at the same α.

    supported: a significant gain of at least δ ("gain"). refuted (evidence against a gain): the pruned model is
    significantly worse, or the gain is shown below δ (one-sided test at α: the equivalence half).
    inconclusive: otherwise (also a significant gain smaller than δ that is not shown below it), with the MDE,
    and instead of "refuted" when the base model is within δ of ``chance`` (floor) or is shown below δ within δ
    of 1 (ceiling)."""
    if outcome is None:
        test = GainTest(row, METRIC, delta)
        outcome = gain_outcome(test, row["p_holm"], test.p_below_delta, ALPHA)
    ci = f"{shift} Δacc {_ci(row)}, Holm p {row['p_holm']:.3g} (base {row['base']:.3f}, pruned {row['pruned']:.3f})"
    numbers = dict(mean=row["mean"], low=row["low"], high=row["high"], p_holm=row["p_holm"], mde=row["mde"],
                   n=row["n"], sesoi=delta, outcome=outcome)
    if outcome == "gain":
        return _line(TESTS[1], shift, SUPPORTED, f"OOD accuracy rose by at least δ: {ci}", **numbers)
    limit = room_of(METRIC, row["base"], chance, delta)
    if limit == "floor" and outcome in ("worse", "no gain ≥ δ") or (limit == "ceiling" and outcome == "no gain ≥ δ"):
        return _at_limit(TESTS[1], shift, limit, chance, ci, numbers)
    if outcome == "worse":
        return _line(TESTS[1], shift, REFUTED, f"OOD accuracy fell: {ci}", **numbers)
    if outcome == "no gain ≥ δ":
        return _line(TESTS[1], shift, REFUTED, f"a gain of δ ({100 * delta:.1f} pts) is excluded: {ci}", **numbers)
    small = "a significant gain smaller than δ, not shown below δ" if outcome == "gain < δ" else \
        "no significant change and a gain of δ is not excluded"
    return _line(TESTS[1], shift, INCONCLUSIVE, f"{small} ({_power(row, delta)}): {ci}", **numbers)


def _artefact_outcome(cal: dict[str, Any], ece_tolerance: float, confidence_tolerance: float) -> tuple[str, str]:
    """One improved shift's calibration outcome (see :func:`verdict_not_confidence_artefact`)."""
    ece, conf = cal["delta_ece"], cal["delta_confidence"]
    text = f"ΔECE {_ci(ece, False)}, Δconfidence {_ci(conf, False)}"
    if ece["low"] > ece_tolerance or conf["high"] < -confidence_tolerance:
        return REFUTED, text
    if ece["high"] <= ece_tolerance and conf["low"] >= -confidence_tolerance:
        return SUPPORTED, text
    return INCONCLUSIVE, text


def verdict_not_confidence_artefact(ood: list[dict[str, Any]], calib: dict[str, dict[str, Any]],
                                    ece_tolerance: float = ECE_TOLERANCE,
                                    confidence_tolerance: float = CONFIDENCE_TOLERANCE) -> dict[str, Any]:
    """"Not a confidence artefact", judged on every shift whose "OOD gain" is supported.

    Per improved shift, with paired-bootstrap 95 % CIs of ΔECE and Δ mean confidence (pruned − base):
    supported when ECE did not rise beyond the tolerance (ΔECE's upper end ≤ ``ECE_TOLERANCE``) and mean
    confidence did not fall beyond its tolerance (Δconfidence's lower end ≥ −``CONFIDENCE_TOLERANCE``);
    refuted when ECE rose beyond the tolerance (lower end > ``ECE_TOLERANCE``) or confidence fell beyond it
    (upper end < −``CONFIDENCE_TOLERANCE``); else undecided. Overall: refuted if any improved shift is refuted,
    supported if all are supported, otherwise inconclusive; inconclusive too when no shift improved."""
    improved = [v["scope"] for v in ood if v["verdict"] == SUPPORTED]
    if not improved:
        return _line(TESTS[2], "ood", INCONCLUSIVE, "no shift gained significantly, so there is no gain to explain")
    outcomes = {s: _artefact_outcome(calib[s], ece_tolerance, confidence_tolerance) for s in improved}
    detail = "; ".join(f"{s}: {text}" for s, (_, text) in outcomes.items())
    verdicts = [v for v, _ in outcomes.values()]
    rule = f"tolerances: ECE +{ece_tolerance}, confidence −{confidence_tolerance}"
    numbers = {s: v for s, (v, _) in outcomes.items()}
    if REFUTED in verdicts:
        bad = [s for s, (v, _) in outcomes.items() if v == REFUTED]
        return _line(TESTS[2], "ood", REFUTED, f"calibration worsened or confidence fell where accuracy rose on "
                     f"{bad} ({rule}): {detail}", **numbers)
    if all(v == SUPPORTED for v in verdicts):
        return _line(TESTS[2], "ood", SUPPORTED, f"ECE and confidence held within tolerance on every improved "
                     f"shift ({rule}): {detail}", **numbers)
    open_ = [s for s, (v, _) in outcomes.items() if v == INCONCLUSIVE]
    return _line(TESTS[2], "ood", INCONCLUSIVE, f"the CIs are too wide to exclude a calibration change beyond "
                 f"tolerance on {open_} ({rule}): {detail}", **numbers)


def verdicts(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every verdict line of a check, from ``check.json`` data alone."""
    s = data["settings"]
    rows, chance = data["delta"], data.get("chance") or {}
    shifts = [d for d in data["distributions"] if d != "id"]
    outcomes = holm_outcomes({d: GainTest(rows[d][METRIC], METRIC, s["smallest_effect_points"]) for d in shifts},
                             1.0 - s.get("confidence", 0.95))
    ood = [verdict_ood_gain(d, rows[d][METRIC], s["smallest_effect_points"], chance.get(d), outcomes[d])
           for d in shifts]
    return [verdict_no_id_loss(rows["id"][METRIC], s["smallest_effect_points"], chance.get("id")), *ood,
            verdict_not_confidence_artefact(ood, data["calibration"], s.get("ece_tolerance", ECE_TOLERANCE),
                                            s.get("confidence_tolerance", CONFIDENCE_TOLERANCE))]


# ---------------------------------------------------------------- geometry


def _geometry(wls: dict[str, TextWorkload], match: BlockMatch, seed: int) -> dict[str, Any]:
    """Norm and pairwise-distance profiles of both models (indexed by original block) on ``n_profile``
    reference prompts per distribution (ID twice, for the noise floor), and each model's distortion D of every
    shift against its own ID profile."""
    if not match.in_order:
        return {"skipped": "the kept blocks are unknown, repeated or reordered, so profiles cannot be indexed "
                           "by original block"}
    wl = wls["base"]
    n, chunk = wl.sizes.n_profile, wl.sizes.eval_chunk
    profiles: dict[str, dict[str, Profile]] = {}
    try:
        for name, model_wl in wls.items():
            profiles[name] = {}
            for dist in wl.distributions:
                batch = model_wl.inputs(dist, seed, 2 * n if dist == "id" else n)
                states = query_states(model_wl.model, batch, None, chunk)
                if name == "pruned":
                    states = by_original_block(states, match.kept, match.n_original)
                if dist == "id":
                    profiles[name]["id_b"] = profile(states[:, n:])
                    states = states[:, :n]
                profiles[name][dist] = profile(states)
    except DataError as err:
        return {"skipped": f"too few reference prompts for profiles: {err}"}
    shifts = [d for d in wl.distributions if d != "id"]
    D = {name: {"noise_floor": distortion(p["id_b"], p["id"]).D,
                **{s: distortion(p[s], p["id"]).D for s in shifts}} for name, p in profiles.items()}
    attribution = {s: distortion(profiles["base"][s], profiles["base"]["id"]).attribution for s in shifts}
    return {"seed": seed, "n_prompts": n, "D": D, "attribution_base": attribution,
            "profiles": {name: {d: p.to_dict() for d, p in ps.items() if d != "id_b"} for name, ps in profiles.items()}}


# ---------------------------------------------------------------- the check


def _load(model: Any, cfg: Config, device: str) -> tuple[HFModel, str | None]:
    """An :class:`HFModel` from a folder (or an installed name), or ``model`` itself; and its path if known."""
    if isinstance(model, HFModel):
        return model, model.source.path if model.source is not None else None
    path = resolve_lm_path(str(model))
    return HFModel.load(path, dtype=cfg.lm.dtype, device=device, chat=cfg.lm.chat), str(path)  # type: ignore[union-attr]


def _evaluate(wls: dict[str, TextWorkload], seeds: Sequence[int], n: int, progress: bool) -> dict[str, Evaluation]:
    """Both models on the same ``n`` held-out examples per seed and distribution."""
    dists = wls["base"].distributions
    jobs = [(name, d, s) for s in seeds for d in dists for name in wls]
    parts: dict[str, list[Evaluation]] = {name: [] for name in wls}
    for name, dist, seed in tqdm(jobs, disable=not progress, desc="check: evaluate", leave=False):
        parts[name].append(workload_base.evaluate(wls[name], None, dist, seed, n))
    return {name: Evaluation.concat(p) for name, p in parts.items()}


def _calibration(evs: dict[str, Evaluation], n_bootstrap: int, confidence: float) -> dict[str, Any]:
    """Per distribution: calibration of both models and paired-bootstrap Δ of ECE, Brier and mean confidence."""
    cal = {name: calibration(ev, N_BINS) for name, ev in evs.items()}
    out = {}
    for dist in cal["base"]:
        base, pruned = evs["base"].values[dist], evs["pruned"].values[dist]
        groups = evs["base"].seeds[dist]
        out[dist] = {"base": cal["base"][dist], "pruned": cal["pruned"][dist],
                     "delta_ece": paired_ece_bootstrap(base, pruned, groups, n_bootstrap, confidence),
                     "delta_brier": _paired(pruned["brier"], base["brier"], groups, n_bootstrap, confidence),
                     "delta_confidence": _paired(pruned["confidence"], base["confidence"], groups, n_bootstrap,
                                                 confidence)}
    return out


def run_check(cfg: Config, base: Any, pruned: Any, out: str | Path | None = "runs/check", progress: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the three tests on ``base`` and ``pruned`` (model folders, installed names or :class:`HFModel` s) with
    the text task and settings of ``cfg`` (an ``lm:`` section with ``lm.task``); returns the ``check.json`` data
    and, when ``out`` is given, writes it there with the report."""
    say = log or (lambda message: None)
    if cfg.lm is None or not cfg.lm.task:
        raise ConfigError("lm.task: empty; tapioca check needs the text task in the config's lm: section "
                          "(see configs/lm-*.yaml)")
    device = str(resolve_device(cfg.run.device))
    (base_lm, base_path), (pruned_lm, pruned_path) = _load(base, cfg, device), _load(pruned, cfg, device)
    match = match_blocks(base_lm.model, pruned_lm.model)
    provenance = read_provenance(pruned_path) if pruned_path and Path(pruned_path).is_dir() else None
    say(f"blocks: {match.message}")
    wl = TextWorkload.from_config(cfg, base_lm, load_text_task(cfg.lm))
    wls = {"base": wl, "pruned": dataclasses.replace(wl.with_model(pruned_lm), name=pruned_path or "pruned")}
    ev_cfg = cfg.evaluation
    evs = _evaluate(wls, ev_cfg.seeds, wl.sizes.n_heldout, progress)
    delta = example_view(compare(evs["base"], evs["pruned"], None, ev_cfg.n_bootstrap, ev_cfg.confidence,
                                 wl.metrics), wl.metrics, ev_cfg.confidence)
    data: dict[str, Any] = {
        "kind": "check",
        "base": {"path": base_path, "n_blocks": base_lm.n_blocks},
        "pruned": {"path": pruned_path, "n_blocks": pruned_lm.n_blocks},
        "blocks": {**match.to_dict(), "provenance": provenance,
                   "provenance_agrees": None if provenance is None or not match.ok
                   else provenance.get("kept") == match.kept},
        "task": wl.describe()["task"],
        "distributions": wl.distributions,
        "seeds": list(ev_cfg.seeds),
        "n_heldout": wl.sizes.n_heldout,
        "chance": workload_base.chance_levels(wl, list(ev_cfg.seeds)),
        "settings": {"metric": METRIC, "n_bootstrap": ev_cfg.n_bootstrap, "confidence": ev_cfg.confidence,
                     "smallest_effect_points": ev_cfg.smallest_effect_points,
                     "ece_tolerance": ev_cfg.ece_tolerance, "confidence_tolerance": ev_cfg.confidence_tolerance,
                     "n_bins": N_BINS},
        "accuracy": {name: ev.summary(ev_cfg.n_bootstrap, ev_cfg.confidence, shrinkage=False)
                     for name, ev in evs.items()},
        "delta": delta,
        "calibration": _calibration(evs, ev_cfg.n_bootstrap, ev_cfg.confidence),
        "geometry": _geometry(wls, match, ev_cfg.seeds[0]),
    }
    data["verdicts"] = verdicts(data)
    if out is not None:
        from tapioca.report.check_report import write_check_report

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "check.json", {**data, "environment": environment()})
        write_check_report(folder)
    return data


def verdict_lines(data: dict[str, Any]) -> list[str]:
    """One line per verdict: "<test> [<scope>]: <verdict> — <evidence>"."""
    return [f"{v['test']} [{v['scope']}]: {v['verdict']} — {v['evidence']}" for v in data["verdicts"]]
