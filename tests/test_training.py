"""Tests for tapioca.models.training and the checkpoint format of tapioca.models.icl: learning, files, exact resume,
clear errors for bad checkpoints, curriculum and learning-rate schedule."""

from __future__ import annotations

import dataclasses
import shutil
import json
import math
from pathlib import Path

import pytest
import torch

import tapioca.models.training as training
from tapioca.config import Config, SamplerParams, TrainConfig, load_config, replace, to_dict
from tapioca.errors import CheckpointError, ConfigError
from tapioca.io import read_json
from tapioca.models.icl import ICLModel, load_model, read_meta, save_model
from tapioca.tasks.polyreg import PolyRegTask
from tapioca.models.training import curriculum, learning_rate, train
from tapioca.study.scales import training_summary

CHECKPOINT_FILES = {"model.safetensors", "model.json", "train_state.json", "checkpoint-12"}


def optimizer_path(folder: Path) -> Path:
    """The optimizer state of the checkpoint that train_state.json points at."""
    return folder / read_json(folder / "train_state.json")["checkpoint"] / "optimizer.pt"


def weights(model: ICLModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: ICLModel, b: ICLModel) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


class Killed(Exception):
    """Stands in for a kill in the middle of training."""


def kill_after(monkeypatch: pytest.MonkeyPatch, n_calls: int) -> list[int]:
    """Make ``_train_step`` raise on call ``n_calls + 1``; returns the list of steps that ran."""
    real = training._train_step
    ran: list[int] = []

    def step(model, opt, cfg, seed, step_index):
        if len(ran) == n_calls:
            raise Killed(f"killed before step {step_index}")
        ran.append(step_index)
        return real(model, opt, cfg, seed, step_index)

    monkeypatch.setattr(training, "_train_step", step)
    return ran


def count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    real = training._train_step
    ran: list[int] = []

    def step(model, opt, cfg, seed, step_index):
        ran.append(step_index)
        return real(model, opt, cfg, seed, step_index)

    monkeypatch.setattr(training, "_train_step", step)
    return ran


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_cfg: Config) -> Path:
    """An uninterrupted 12-step run of ``tiny_cfg`` (checkpoints every 4 steps)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_cfg, out, progress=False)
    return out


# ---------------------------------------------------------------- learning


def test_training_beats_the_untrained_model(tiny_cfg: Config) -> None:
    cfg = replace(tiny_cfg, *["train.steps=100", "train.batch_size=32", "train.lr=0.01",
                             "train.warmup_steps=10", "task.sampler.degrees=[1]", "task.sampler.n_points=11"])
    task = PolyRegTask(cfg.task)
    batch = task.data("id", "heldout", 0, 256)
    torch.manual_seed(cfg.run.seed)
    untrained = ICLModel(cfg.model).eval()
    trained = train(cfg, None, progress=False)
    assert not trained.training
    before = float(task.metrics(untrained.run(batch).predictions, batch)["nmse"].mean())
    after = float(task.metrics(trained.run(batch).predictions, batch)["nmse"].mean())
    assert after < 0.6 * before, (before, after)


def test_losses_are_recorded_and_finite(trained_dir: Path) -> None:
    state = read_json(trained_dir / "train_state.json")
    assert state["step"] == 12
    assert state["losses"] and all(math.isfinite(loss) for _, loss in state["losses"])
    assert state["seconds"] > 0


def test_id_curve_is_recorded_at_every_checkpoint(trained_dir: Path, tiny_cfg: Config) -> None:
    record = training.training_record(trained_dir)
    assert record is not None and record["steps_done"] == 12
    steps = [step for step, _ in record["id_curve"]]
    assert steps == [4, 8, 12]  # checkpoint_every=4, and the end
    assert all(math.isfinite(v) and v > 0 for _, v in record["id_curve"])
    final = training.validation_nmse(load_model(trained_dir), tiny_cfg, tiny_cfg.run.seed)
    assert record["id_curve"][-1][1] == pytest.approx(final, rel=1e-6)  # the same prompts, the final weights
    assert record["train_loss"] == read_json(trained_dir / "train_state.json")["losses"]


def test_training_record_of_a_folder_without_one(tmp_path: Path, tiny_cfg: Config) -> None:
    torch.manual_seed(0)
    save_model(ICLModel(tiny_cfg.model), tmp_path)  # a hand-made checkpoint: no "training" in model.json
    assert training.training_record(tmp_path) is None
    assert training.training_record(tmp_path / "absent") is None


def test_diverging_loss_stops_training(monkeypatch: pytest.MonkeyPatch, tiny_cfg: Config) -> None:
    monkeypatch.setattr(training, "_train_step", lambda *args: float("nan"))
    with pytest.raises(FloatingPointError, match="diverged at step 0"):
        train(tiny_cfg, None, progress=False)


# ---------------------------------------------------------------- checkpoints and exact resume


def test_checkpoint_files(trained_dir: Path, tiny_cfg: Config) -> None:
    names = {p.name for p in trained_dir.iterdir()}
    assert CHECKPOINT_FILES <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-12"]  # older sets are removed
    assert {p.name for p in (trained_dir / "checkpoint-12").iterdir()} == {"model.safetensors", "model.json",
                                                                           "optimizer.pt"}
    meta = read_meta(trained_dir)
    assert meta["model"] == dataclasses.asdict(tiny_cfg.model)
    assert meta["training"]["steps_done"] == 12
    assert meta["training"]["seed"] == tiny_cfg.run.seed


def test_checkpoint_is_written_every_checkpoint_every_steps(monkeypatch, tmp_path: Path, tiny_cfg: Config) -> None:
    saved: list[int] = []
    real = training._save
    monkeypatch.setattr(training, "_save", lambda folder, m, o, state, fp: (saved.append(state["step"]),
                                                                              real(folder, m, o, state, fp)))
    train(replace(tiny_cfg, "train.steps=10"), tmp_path, progress=False)
    assert saved == [4, 8, 10]  # every 4 steps, and at the end


def test_saved_model_matches_returned_model(tmp_path: Path, tiny_cfg: Config) -> None:
    model = train(tiny_cfg, tmp_path, progress=False)
    loaded = load_model(tmp_path)
    assert_same_weights(model, loaded)
    assert not loaded.training
    # training changed the weights
    torch.manual_seed(tiny_cfg.run.seed)
    with pytest.raises(AssertionError):
        assert_same_weights(ICLModel(tiny_cfg.model), loaded)


def test_same_config_same_weights(trained_dir: Path, tiny_cfg: Config) -> None:
    assert_same_weights(train(tiny_cfg, None, progress=False), load_model(trained_dir))


def test_resume_after_kill_is_exact(monkeypatch, tmp_path: Path, trained_dir: Path, tiny_cfg: Config) -> None:
    ran = kill_after(monkeypatch, 10)  # steps 0..9 run, the kill comes before step 10; last save at 8
    with pytest.raises(Killed):
        train(tiny_cfg, tmp_path, progress=False)
    assert ran == list(range(10))
    assert read_json(tmp_path / "train_state.json")["step"] == 8
    monkeypatch.undo()

    ran = count_steps(monkeypatch)
    resumed = train(tiny_cfg, tmp_path, progress=False)
    assert ran == [8, 9, 10, 11]  # resumed from the checkpoint, not from scratch
    assert_same_weights(resumed, load_model(trained_dir))
    assert_same_weights(load_model(tmp_path), load_model(trained_dir))
    assert read_json(tmp_path / "train_state.json")["step"] == 12
    optimizer_a = torch.load(optimizer_path(tmp_path), weights_only=True)
    optimizer_b = torch.load(optimizer_path(trained_dir), weights_only=True)
    for key, value in optimizer_b["state"].items():
        assert torch.equal(optimizer_a["state"][key]["exp_avg"], value["exp_avg"])
        assert torch.equal(optimizer_a["state"][key]["exp_avg_sq"], value["exp_avg_sq"])


def test_rerun_of_a_finished_folder_trains_nothing(monkeypatch, trained_dir: Path, tiny_cfg: Config) -> None:
    ran = count_steps(monkeypatch)
    model = train(tiny_cfg, trained_dir, progress=False)
    assert ran == []
    assert_same_weights(model, load_model(trained_dir))


@pytest.mark.parametrize("override", ["train.lr=0.002", "train.steps=13", "model.n_layer=2",
                                      "task.sampler.x_scale=2.0", "run.seed=1"])
def test_resume_with_a_different_config_is_refused(trained_dir: Path, tiny_cfg: Config, override: str) -> None:
    before = (trained_dir / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="different config or seed"):
        train(replace(tiny_cfg, override), trained_dir, progress=False)
    assert (trained_dir / "model.safetensors").read_bytes() == before


def test_resume_with_a_different_seed_argument_is_refused(trained_dir: Path, tiny_cfg: Config) -> None:
    with pytest.raises(CheckpointError, match="different config or seed"):
        train(tiny_cfg, trained_dir, seed=5, progress=False)


def copy_checkpoint(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty", "missing"])
def test_corrupt_optimizer_state_is_a_checkpoint_error(tmp_path: Path, trained_dir: Path, tiny_cfg: Config,
                                                       damage: str) -> None:
    copy_checkpoint(trained_dir, tmp_path)
    path = optimizer_path(tmp_path)
    if damage == "missing":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes({"garbage": b"not a torch file", "truncate": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="optimizer state .* is missing or corrupt"):
        train(tiny_cfg, tmp_path, progress=False)


def test_corrupt_training_state_is_a_checkpoint_error(tmp_path: Path, trained_dir: Path, tiny_cfg: Config) -> None:
    copy_checkpoint(trained_dir, tmp_path)
    (tmp_path / "train_state.json").write_text("{ half")
    with pytest.raises(CheckpointError, match="train_state.json.*corrupt"):
        train(tiny_cfg, tmp_path, progress=False)


# ---------------------------------------------------------------- load_model errors


@pytest.fixture
def saved_dir(tmp_path: Path, tiny_model: ICLModel) -> Path:
    folder = tmp_path / "ckpt"
    save_model(tiny_model, folder, {"note": "x"})
    return folder


def test_save_load_round_trip(saved_dir: Path, tiny_model: ICLModel, tiny_cfg: Config) -> None:
    loaded = load_model(saved_dir)
    assert loaded.cfg == tiny_model.cfg
    assert_same_weights(loaded, tiny_model)
    assert read_meta(saved_dir)["note"] == "x"
    batch = PolyRegTask(tiny_cfg.task).data("id", "heldout", 0, 4)
    assert torch.equal(loaded.run(batch).predictions, tiny_model.run(batch).predictions)


def test_load_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_load_folder_without_model_json(saved_dir: Path) -> None:
    (saved_dir / "model.json").unlink()
    with pytest.raises(CheckpointError, match="has no model.json"):
        load_model(saved_dir)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{ not json", "is corrupt"),
        ("[1, 2]", "not a tapioca ICL model"),
        ('{"format": "other", "model": {}}', "not a tapioca ICL model"),
        ('{"format": "tapioca-icl", "model": {"n_layer": 0}}', r"invalid model config: model\.n_layer"),
        ('{"format": "tapioca-icl", "model": {"depth": 3}}', r"invalid model config: model\.depth"),
    ],
)
def test_load_corrupt_model_json(saved_dir: Path, text: str, match: str) -> None:
    (saved_dir / "model.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        load_model(saved_dir)


def test_load_missing_weights(saved_dir: Path) -> None:
    (saved_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_model(saved_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_load_corrupt_weights(saved_dir: Path, damage: str) -> None:
    path = saved_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 500, "empty": b""}[damage])
    with pytest.raises(CheckpointError) as info:
        load_model(saved_dir)
    assert "model.safetensors" in str(info.value)


def test_load_weights_that_do_not_match_model_json(saved_dir: Path) -> None:
    meta = json.loads((saved_dir / "model.json").read_text())
    meta["model"]["n_layer"] = 4
    (saved_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match its model.json"):
        load_model(saved_dir)


def test_bad_head_count_is_a_config_error(tiny_cfg: Config) -> None:
    with pytest.raises(ConfigError, match="divisible"):
        ICLModel(dataclasses.replace(tiny_cfg.model, n_embd=15))


# ---------------------------------------------------------------- curriculum and learning rate


def test_curriculum_grows_points() -> None:
    tc = TrainConfig(curriculum_points_start=11, curriculum_interval=100, curriculum_points_step=2,
                     curriculum_degree_steps=0)
    sampler = SamplerParams(n_points=41, x_scale=1.5)
    assert curriculum(tc, sampler, 0).n_points == 11
    assert curriculum(tc, sampler, 99).n_points == 11
    assert curriculum(tc, sampler, 100).n_points == 13
    assert curriculum(tc, sampler, 1499).n_points == 39
    assert curriculum(tc, sampler, 1500).n_points == 41
    assert curriculum(tc, sampler, 10**6).n_points == 41  # capped at the sampler's n_points
    points = [curriculum(tc, sampler, s).n_points for s in range(0, 3000, 7)]
    assert points == sorted(points)
    # other sampler parameters pass through; with degree_steps=0 every degree is there from the start
    assert curriculum(tc, sampler, 0).x_scale == 1.5
    assert curriculum(tc, sampler, 0).degrees == (1, 2, 3)


def test_curriculum_adds_degrees_in_sorted_order() -> None:
    tc = TrainConfig(curriculum_degree_steps=900)
    sampler = SamplerParams(degrees=(3, 1, 2))
    assert curriculum(tc, sampler, 0).degrees == (1,)
    assert curriculum(tc, sampler, 299).degrees == (1,)
    assert curriculum(tc, sampler, 300).degrees == (1, 2)
    assert curriculum(tc, sampler, 600).degrees == (1, 2, 3)
    assert curriculum(tc, sampler, 10**6).degrees == (1, 2, 3)


def test_curriculum_used_by_training_steps(monkeypatch, tiny_cfg: Config) -> None:
    seen: list[SamplerParams] = []
    real = training.sample_prompts
    monkeypatch.setattr(training, "sample_prompts", lambda p, n, g: (seen.append(p), real(p, n, g))[1])
    train(tiny_cfg, None, progress=False)
    # tiny_cfg: 11 points at step 0, +2 every 2 steps
    assert [p.n_points for p in seen] == [11, 11, 13, 13, 15, 15, 17, 17, 19, 19, 21, 21]


def test_learning_rate_warms_up_then_decays() -> None:
    tc = TrainConfig(lr=1e-3, warmup_steps=10, steps=110)
    lrs = [learning_rate(tc, s) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warm-up: strictly increasing
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then non-increasing
    assert lrs[60] == pytest.approx(0.55e-3)  # half-way through the cosine
    assert lrs[110] == pytest.approx(1e-4)  # decays to 10% of lr
    assert learning_rate(tc, 500) == pytest.approx(1e-4)
    assert max(lrs) <= 1e-3 + 1e-15
    assert learning_rate(TrainConfig(lr=0.5, warmup_steps=0, steps=10), 0) == pytest.approx(0.5)


def test_resume_after_kill_between_checkpoint_files_is_exact(monkeypatch, tmp_path: Path, trained_dir: Path,
                                                             tiny_cfg: Config) -> None:
    real = training.write_json

    def write_json(path, obj):
        if Path(path).name == "train_state.json" and obj["step"] == 8:
            raise Killed("killed while saving step 8")
        real(path, obj)

    monkeypatch.setattr(training, "write_json", write_json)
    with pytest.raises(Killed):
        train(tiny_cfg, tmp_path, progress=False)
    monkeypatch.undo()
    assert_same_weights(train(tiny_cfg, tmp_path, progress=False), load_model(trained_dir))


# ---------------------------------------------------------------- the paper-scale recipe and GPU speed options


def test_new_training_options_leave_recorded_configs_and_fingerprints_unchanged(tiny_cfg: Config) -> None:
    recorded = to_dict(TrainConfig())
    assert not {"schedule", "precision", "compile"} & set(recorded)  # omitted at their defaults
    assert to_dict(replace(tiny_cfg, "train.precision=bf16").train)["precision"] == "bf16"


def test_constant_schedule_holds_the_rate_after_warm_up() -> None:
    cfg = TrainConfig(steps=1000, lr=1e-4, warmup_steps=10, schedule="constant")
    assert learning_rate(cfg, 4) == pytest.approx(5e-5)
    assert {learning_rate(cfg, s) for s in (10, 500, 999)} == {1e-4}


def test_bf16_autocast_trains_to_different_finite_weights_and_is_its_own_fingerprint(tmp_path: Path, trained_dir: Path,
                                                                                      tiny_cfg: Config) -> None:
    cfg = replace(tiny_cfg, "train.precision=bf16")
    model = train(cfg, tmp_path, progress=False)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in model.state_dict().values())
    with pytest.raises(AssertionError):
        assert_same_weights(model, load_model(trained_dir))  # bf16 arithmetic changed the weights
    shutil.copytree(trained_dir, tmp_path / "fp32")
    with pytest.raises(CheckpointError, match="different config"):
        train(cfg, tmp_path / "fp32", progress=False)  # an fp32 run is not resumed in bf16


def test_tf32_is_scoped_to_the_training_run(tiny_cfg: Config) -> None:
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    seen = []
    with training.matmul_precision("tf32"):
        seen.append(torch.get_float32_matmul_precision())
    assert seen == ["high"]
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    train(replace(tiny_cfg, "train.precision=tf32", "train.steps=2"), None, progress=False)
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


def test_compile_option_trains_through_torch_compile(monkeypatch: pytest.MonkeyPatch, tiny_cfg: Config) -> None:
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    model = train(replace(tiny_cfg, "train.compile=true"), None, progress=False)
    assert compiled == [model]  # the training forward went through torch.compile; weights are the model's own
    monkeypatch.undo()
    assert_same_weights(model, train(tiny_cfg, None, progress=False))  # an identity "compiler" changes nothing


@pytest.mark.parametrize("path, curriculum", [("configs/paper-scale.yaml", True),
                                              ("configs/paper-scale-no-curriculum.yaml", False)])
def test_paper_scale_configs_hold_the_labs_recipe(path: str, curriculum: bool) -> None:
    cfg = load_config(path)
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_embd, m.n_head) == (12, 256, 8)
    assert (t.batch_size, t.lr, t.steps, t.schedule, cfg.task.sampler.n_points) == (64, 1e-4, 500_000, "constant", 41)
    start = curriculum_of(cfg, 0)
    assert (start.n_points < 41) == curriculum and (len(start.degrees) < 3) == curriculum
    assert curriculum_of(cfg, t.steps - 1) == cfg.task.sampler  # the full ID sampler by the end
    assert 2 * max(41, *(s.get("n_points", 0) for s in cfg.task.shifts.values())) <= m.n_positions


def curriculum_of(cfg: Config, step: int) -> SamplerParams:
    return curriculum(cfg.train, cfg.task.sampler, step)


def test_graph_training_shares_the_schedule_option_and_records_it_only_when_set() -> None:
    from tapioca.config import GraphTrainConfig
    assert "schedule" not in to_dict(GraphTrainConfig())  # shipped graph checkpoints keep their fingerprint
    constant = GraphTrainConfig(steps=100, lr=1e-3, warmup_steps=0, schedule="constant")
    assert to_dict(constant)["schedule"] == "constant"
    assert learning_rate(constant, 99) == pytest.approx(1e-3)
    assert learning_rate(GraphTrainConfig(steps=100, lr=1e-3, warmup_steps=0), 99) < 2e-4  # cosine decays


def test_curriculum_end_is_the_first_step_of_the_full_sampler() -> None:
    cfg = TrainConfig(curriculum_points_start=11, curriculum_points_step=2, curriculum_interval=100,
                      curriculum_degree_steps=1000)
    sampler = SamplerParams(n_points=41, degrees=(1, 2, 3))
    end = training.curriculum_end(cfg, sampler)
    assert end == 1500  # 15 increments of 2 points, every 100 steps; the degrees are all in by step 1000
    assert curriculum(cfg, sampler, end) == sampler
    assert curriculum(cfg, sampler, end - 1) != sampler


def test_stop_when_flat_ends_training_at_the_first_flat_checkpoint_and_stays_finished(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_cfg: Config) -> None:
    """A curve that falls until step 40 and then stays put: the run stops at the first checkpoint with no new best
    in the last ``flat_patience`` steps, records it, counts as finished, and a rerun trains nothing."""
    cfg = replace(tiny_cfg, "train.steps=400", "train.stop_when_flat=true", "train.curriculum_degree_steps=10",
                  "train.flat_patience=60")
    end = training.curriculum_end(cfg.train, cfg.task.sampler)
    monkeypatch.setattr(training, "validation_nmse", lambda model, c, seed: 1.0 / min(done[0], 40))
    done = [0]
    real_step = training._train_step
    monkeypatch.setattr(training, "_train_step", lambda *a: (done.__setitem__(0, a[-1] + 1), real_step(*a))[1])
    train(cfg, tmp_path, progress=False)
    state = read_json(tmp_path / "train_state.json")
    curve = state["id_curve"]
    stop = state["stopped_flat"]
    assert stop == state["step"] == curve[-1][0] < 400
    assert end <= 40 and stop == 40 + 60  # the last new best (step 40) is 60 steps back
    assert not training.stops_flat(cfg.train, cfg.task.sampler, curve[:-1])  # not one checkpoint earlier
    assert training.is_trained(tmp_path, cfg, cfg.run.seed)
    assert training.training_record(tmp_path)["stopped_flat"] == stop
    ran = count_steps(monkeypatch)
    train(cfg, tmp_path, progress=False)
    assert ran == []
    summary = training_summary(replace(cfg, "evaluation.seeds=[0]", f"model.checkpoint={tmp_path}"), tmp_path)
    assert summary["until_flat"] and summary["train_steps"] == stop  # the ladders place it at the steps it ran
    assert summary["training"]["0"]["stopped_flat"] == stop
    assert not training.is_trained(tmp_path, replace(tiny_cfg, "train.steps=400"), cfg.run.seed)  # own fingerprint


def test_restore_best_keeps_the_checkpoint_of_lowest_id_nmse_and_resumes_from_the_last(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_cfg: Config) -> None:
    """train.restore_best: the model returned and left in the folder is the checkpoint of lowest validation NMSE
    (step 8 of 12 here), recorded as ``kept_step``; the resumable state stays at the last checkpoint."""
    constant = replace(tiny_cfg, "train.schedule=constant")  # the first 8 steps equal an 8-step run's
    assert "restore_best" not in to_dict(constant.train)  # off by default: fingerprints of shipped models unchanged
    monkeypatch.setattr(training, "validation_nmse", lambda model, c, seed: 1.0)
    at_8 = train(replace(constant, "train.steps=8"), tmp_path / "short", progress=False).state_dict()
    curve = iter([0.5, 0.2, 0.3])  # checkpoints at steps 4, 8, 12
    monkeypatch.setattr(training, "validation_nmse", lambda model, c, seed: next(curve))
    cfg = replace(constant, "train.restore_best=true")
    returned = train(cfg, tmp_path / "run", progress=False).state_dict()
    kept = load_model(tmp_path / "run").state_dict()
    last = load_model(tmp_path / "run" / "checkpoint-12").state_dict()
    assert all(torch.equal(kept[k], at_8[k]) and torch.equal(returned[k], at_8[k]) for k in at_8)
    assert not all(torch.equal(last[k], at_8[k]) for k in at_8)
    assert read_meta(tmp_path / "run")["training"]["kept_step"] == 8
    assert training.training_record(tmp_path / "run")["kept_step"] == 8
    state = read_json(tmp_path / "run" / "train_state.json")
    assert state["step"] == 12 and state["checkpoint"] == "checkpoint-12"
    ran = count_steps(monkeypatch)
    again = train(cfg, tmp_path / "run", progress=False).state_dict()  # finished: trains nothing, keeps the best
    assert ran == [] and all(torch.equal(again[k], at_8[k]) for k in at_8)


def test_stop_when_flat_is_off_by_default_and_waits_for_the_curriculum() -> None:
    cfg = TrainConfig(curriculum_degree_steps=1000, curriculum_interval=100)
    sampler = SamplerParams(n_points=41, degrees=(1, 2, 3))
    flat = [[s, 0.1] for s in range(500, 20001, 500)]
    assert not training.stops_flat(cfg, sampler, flat)  # off
    on = dataclasses.replace(cfg, stop_when_flat=True)
    assert training.stops_flat(on, sampler, flat)
    end = training.curriculum_end(on, sampler)
    assert end == 1500 and on.flat_patience == 5000
    assert not training.stops_flat(on, sampler, [p for p in flat if p[0] < end + 5000])  # not yet 5,000 steps after
    assert training.stops_flat(on, sampler, [p for p in flat if p[0] <= end + 5000])
    assert not training.stops_flat(on, sampler, [[s, 1.0 / s] for s in range(500, 20001, 500)])  # improving


def test_stop_when_flat_waits_out_a_noisy_plateau_for_a_new_best() -> None:
    """A noisy curve (like the 8-block testbed's at a constant rate 1e-3) keeps training while its last new best
    is less than 5,000 steps back; 5,000 steps without a best 5 % below the one before stop it."""
    on = TrainConfig(stop_when_flat=True)
    sampler = SamplerParams(n_points=41, degrees=(1, 2, 3))
    noisy = [[2000, 0.060], [2500, 0.071], [3000, 0.048], [3500, 0.042], [4000, 0.043], [4500, 0.062],
             [5000, 0.044], [5500, 0.050], [6000, 0.047], [6500, 0.045], [7000, 0.043], [7500, 0.046]]
    assert not training.stops_flat(on, sampler, noisy)  # new best 0.042 at 3500, < 5,000 steps ago
    assert training.stops_flat(on, sampler, noisy + [[8000, 0.041], [8500, 0.044], [9000, 0.043]])  # 0.041: < 5 %
    assert not training.stops_flat(on, sampler, noisy + [[8000, 0.030], [8500, 0.044], [9000, 0.043]])  # new best
