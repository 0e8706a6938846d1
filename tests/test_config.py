"""Tests for tapioca.config: defaults, YAML + --set overrides, checks with clear errors, shifts, round trips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tapioca.config import (
    DEFAULT_SHIFTS,
    Config,
    SamplerParams,
    distributions,
    from_dict,
    load_config,
    parse_override,
    replace,
    shift_params,
    to_dict,
)
from tapioca.errors import ConfigError, TapiocaError

# ---------------------------------------------------------------- defaults


def test_defaults_build_and_match_documented_values() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.task.sampler == SamplerParams()
    assert cfg.task.sampler.degrees == (1, 2, 3)
    assert cfg.task.sampler.n_points == 41
    assert cfg.evaluation.seeds == (0, 1, 2, 3, 4)
    assert cfg.model.checkpoint is None
    assert list(cfg.task.shifts) == list(DEFAULT_SHIFTS)
    assert distributions(cfg.task) == ["id", *DEFAULT_SHIFTS]


def test_config_errors_are_value_errors_and_tapioca_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.steps=abc"])
    assert isinstance(info.value, ValueError) and isinstance(info.value, TapiocaError)


# ---------------------------------------------------------------- overrides and their types


def test_parse_override_parses_yaml_types() -> None:
    assert parse_override("train.steps=20") == (["train", "steps"], 20)
    assert parse_override("train.lr=0.5") == (["train", "lr"], 0.5)
    assert parse_override("evaluation.seeds=[3, 4]") == (["evaluation", "seeds"], [3, 4])
    assert parse_override("pruning.max_drop=null") == (["pruning", "max_drop"], None)
    assert parse_override("run.out=runs/x=y") == (["run", "out"], "runs/x=y")  # split on the first '=' only


@pytest.mark.parametrize("text", ["train.lr=1e-3", "train.lr=1.0e-3", "train.lr=+1E-3"])
def test_scientific_notation_is_a_float(text: str) -> None:
    # PyYAML's YAML 1.1 resolver reads "1e-3" as a string; --set train.lr=1e-3 must still work
    assert load_config(None, [text]).train.lr == pytest.approx(1e-3)


def test_set_overrides_with_types() -> None:
    cfg = load_config(
        None,
        [
            "train.steps=50",
            "train.lr=0.002",
            "task.tolerance=1",  # an int is accepted for a float and converted
            "evaluation.seeds=[3, 4]",
            "pruning.max_drop=2",
            "run.threads=null",
            "model.checkpoint=some/folder",
            "task.sampler.degrees=[2]",
            "pruning.protocol=from-id",
        ],
    )
    assert cfg.train.steps == 50 and type(cfg.train.steps) is int
    assert cfg.train.lr == 0.002
    assert cfg.task.tolerance == 1.0 and type(cfg.task.tolerance) is float
    assert cfg.evaluation.seeds == (3, 4)  # lists become tuples
    assert cfg.pruning.max_drop == 2
    assert cfg.run.threads is None
    assert cfg.model.checkpoint == "some/folder"
    assert cfg.task.sampler.degrees == (2,)
    assert cfg.pruning.protocol == "from-id"
    # untouched values keep their defaults
    assert cfg.train.batch_size == Config().train.batch_size
    # null back to a value and to null again
    assert load_config(None, ["pruning.max_drop=3", "pruning.max_drop=null"]).pruning.max_drop is None


def test_yaml_file_then_overrides(tmp_path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(
        "model:\n  n_layer: 4\n  n_embd: 32\ntrain:\n  steps: 100\n  lr: 3.0e-4\n"
        "task:\n  sampler:\n    x_scale: 1.5\n"
    )
    cfg = load_config(path, ["train.steps=7"])
    assert cfg.model.n_layer == 4 and cfg.model.n_embd == 32
    assert cfg.model.n_head == Config().model.n_head  # sections merge with the defaults
    assert cfg.train.steps == 7  # --set wins over the file
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.task.sampler.x_scale == 1.5
    assert cfg.task.sampler.degrees == (1, 2, 3)
    assert list(cfg.task.shifts) == list(DEFAULT_SHIFTS)


def test_yaml_file_shifts_replace_the_default_shifts(tmp_path) -> None:
    path = tmp_path / "shifts.yaml"
    path.write_text("task:\n  shifts:\n    wide: {x_scale: 4.0}\n")
    cfg = load_config(path)
    assert distributions(cfg.task) == ["id", "wide"]
    assert shift_params(cfg.task, "wide").x_scale == 4.0


def test_yaml_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stpes: unknown key"):
        load_config(typo)


def test_empty_yaml_file_gives_defaults(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


# ---------------------------------------------------------------- errors name the key, the value and what's allowed


def test_unknown_key_names_dotted_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.stpes=3"])
    msg = str(info.value)
    assert "train.stpes" in msg and "unknown key" in msg
    for allowed in ("steps", "batch_size", "lr", "warmup_steps"):
        assert allowed in msg


def test_unknown_section_names_allowed_sections() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["trian.steps=3"])
    msg = str(info.value)
    assert "trian" in msg
    for section in ("model", "task", "train", "pruning", "evaluation", "run"):
        assert section in msg


def test_override_below_a_value_is_not_a_section() -> None:
    with pytest.raises(ConfigError, match=r"'train\.steps' is not a section"):
        load_config(None, ["train.steps.x=3"])


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="key is empty"):
        load_config(None, ["=3"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["evaluation.seeds=[1, 2"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(None, ["train=3"])


@pytest.mark.parametrize(
    "override, key, value, allowed",
    [
        ("train.steps=abc", "train.steps", "'abc'", "an integer"),
        ("train.steps=1.5", "train.steps", "1.5", "an integer"),
        ("train.steps=true", "train.steps", "True", "an integer"),
        ("train.lr=fast", "train.lr", "'fast'", "a number"),
        ("train.lr=0", "train.lr", "0", "> 0"),
        ("train.lr=-0.1", "train.lr", "-0.1", "> 0"),
        ("train.lr=.nan", "train.lr", "nan", "a number (finite)"),
        ("train.lr=.inf", "train.lr", "inf", "a number (finite)"),
        ("train.steps=0", "train.steps", "0", ">= 1"),
        ("evaluation.confidence=1.5", "evaluation.confidence", "1.5", "<= 0.999"),
        ("evaluation.confidence=.nan", "evaluation.confidence", "nan", "evaluation.confidence"),
        ("task.sampler.x_scale=0", "task.sampler.x_scale", "0", "> 0"),
        ("task.sampler.degrees=3", "task.sampler.degrees", "3", "a list of int"),
        ("task.sampler.degrees=[1, two]", "task.sampler.degrees[1]", "'two'", "an integer"),
        ("task.sampler.x_dist=cauchy", "task.sampler.x_dist", "'cauchy'", "['normal', 'uniform']"),
        ("pruning.protocol=random", "pruning.protocol", "'random'", "'target'"),
        ("pruning.max_drop=0", "pruning.max_drop", "0", ">= 1"),
        ("model.checkpoint=5", "model.checkpoint", "5", "a string"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override: str, key: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert msg.startswith(f"{key}:"), msg
    assert value in msg and allowed in msg, msg


def test_duplicate_or_empty_seeds_rejected() -> None:
    with pytest.raises(ConfigError, match=r"evaluation\.seeds: \[1, 1\]"):
        load_config(None, ["evaluation.seeds=[1, 1]"])
    with pytest.raises(ConfigError, match=r"evaluation\.seeds"):
        load_config(None, ["evaluation.seeds=[]"])


# ---------------------------------------------------------------- shifts


def test_shift_with_unknown_sampler_parameter_names_it_and_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["task.shifts.odd.x_scael=2"])
    msg = str(info.value)
    assert "task.shifts.odd.x_scael" in msg and "x_scael" in msg
    for name in (f.name for f in dataclasses.fields(SamplerParams)):
        assert name in msg


def test_user_written_shift_combination_needs_no_code(tmp_path) -> None:
    path = tmp_path / "combo.yaml"
    path.write_text("task:\n  shifts:\n    combo: {x_scale: 3.0, degrees: [5], x_dist: uniform}\n")
    cfg = load_config(path)
    params = shift_params(cfg.task, "combo")
    assert isinstance(params, SamplerParams)
    assert params == dataclasses.replace(SamplerParams(), x_scale=3.0, degrees=(5,), x_dist="uniform")
    # untouched parameters come from the ID sampler, including non-default ones
    cfg2 = load_config(path, ["task.sampler.coef_scale=2.0"])
    assert shift_params(cfg2.task, "combo").coef_scale == 2.0
    assert shift_params(cfg2.task, "id") == cfg2.task.sampler


def test_add_shift_with_set() -> None:
    cfg = load_config(None, ["task.shifts.big.x_scale=5"])
    assert distributions(cfg.task) == ["id", *DEFAULT_SHIFTS, "big"]  # added, defaults kept
    params = shift_params(cfg.task, "big")
    assert params.x_scale == 5.0 and type(params.x_scale) is float
    assert params.degrees == cfg.task.sampler.degrees
    # a second parameter for the same new shift merges into it
    cfg = load_config(None, ["task.shifts.big.x_scale=5", "task.shifts.big.degrees=[4]"])
    assert shift_params(cfg.task, "big") == dataclasses.replace(SamplerParams(), x_scale=5.0, degrees=(4,))


def test_shift_values_are_checked_like_sampler_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["task.shifts.big.x_scale=abc"])
    assert "task.shifts.big.x_scale" in str(info.value) and "a number" in str(info.value)
    with pytest.raises(ConfigError, match=r"task\.shifts\.neg\.x_scale: -1"):
        load_config(None, ["task.shifts.neg.x_scale=-1"])
    with pytest.raises(ConfigError, match="reserved"):
        load_config(None, ["task.shifts.id.x_scale=2"])
    with pytest.raises(ConfigError, match=r"task\.shifts\.flat: 3 is not allowed"):
        load_config(None, ["task.shifts.flat=3"])


def test_unknown_distribution_lists_allowed() -> None:
    cfg = load_config()
    with pytest.raises(ConfigError) as info:
        shift_params(cfg.task, "x_scale_9")
    assert "x_scale_9" in str(info.value) and "'id'" in str(info.value) and "'degree_5'" in str(info.value)


def test_n_positions_too_small_for_a_shift() -> None:
    # more_points (61 pairs) needs 121 tokens
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.n_positions=120"])
    msg = str(info.value)
    assert "model.n_positions" in msg and "120" in msg and "more_points" in msg and "121" in msg
    assert load_config(None, ["model.n_positions=121"]).model.n_positions == 121
    # a user-added shift is checked as well, and so is the ID sampler
    with pytest.raises(ConfigError, match="'long'"):
        load_config(None, ["task.shifts.long.n_points=70"])
    with pytest.raises(ConfigError, match="'id'"):
        load_config(None, ["task.sampler.n_points=65"])


# ---------------------------------------------------------------- round trips and immutability


def test_to_dict_from_dict_round_trip() -> None:
    cfg = load_config(
        None, ["task.shifts.big.x_scale=5", "evaluation.seeds=[7]", "pruning.max_drop=2", "train.lr=0.01"]
    )
    tree = to_dict(cfg)
    assert isinstance(tree["evaluation"]["seeds"], list)
    assert from_dict(Config, tree) == cfg
    # also through JSON (what checkpoints and run folders store)
    assert from_dict(Config, json.loads(json.dumps(tree))) == cfg
    assert replace(cfg) == cfg
    assert replace(cfg, "train.steps=9").train.steps == 9


def test_replace_applies_the_same_checks() -> None:
    cfg = load_config()
    with pytest.raises(ConfigError, match=r"train\.lr"):
        replace(cfg, "train.lr=0")


def test_config_dataclasses_are_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = cfg.model  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.task.sampler.x_scale = 2.0  # type: ignore[misc]


def test_shipped_default_yaml_is_the_built_in_default():
    assert load_config("configs/default.yaml") == Config()


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    if cfg.lm is not None:  # the task section is checked where the task is built
        from tapioca.tasks.text import TextTaskConfig

        assert set(cfg.lm.task) <= set(TextTaskConfig.__dataclass_fields__)
