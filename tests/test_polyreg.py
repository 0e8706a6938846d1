"""Tests for tapioca.tasks.polyreg and tapioca.tasks.references."""

from __future__ import annotations

import dataclasses
import math
import zlib

import pytest
import torch

from tapioca.config import SamplerParams, TaskConfig, load_config
from tapioca.errors import ConfigError, DataError
from tapioca.tasks.polyreg import ROLES, PolyBatch, PolyRegTask, check_finite, sample_prompts, split_seed
from tapioca.tasks.references import REFERENCES, context_mean, least_squares, nearest_neighbours

from conftest import assert_close_scaled

N = 512


@pytest.fixture(scope="module")
def task() -> PolyRegTask:
    return PolyRegTask(TaskConfig())


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ls_relative_error(batch: PolyBatch) -> float:
    """Largest |least squares - y| at the query, relative to the spread of y."""
    err = (least_squares(batch) - batch.query_y.double()).abs()
    return float(err.max() / batch.query_y.double().std())


# ---------------------------------------------------------------- determinism and splits


def test_same_arguments_same_prompts(task: PolyRegTask) -> None:
    a = task.data("x_scale_2", "heldout", 3, 64)
    b = PolyRegTask(TaskConfig()).data("x_scale_2", "heldout", 3, 64)
    assert torch.equal(a.xs, b.xs) and torch.equal(a.ys, b.ys) and torch.equal(a.degrees, b.degrees)
    assert a.xs.shape == (64, 41) and a.degrees.shape == (64,)


def test_roles_seeds_and_distributions_give_different_prompts(task: PolyRegTask) -> None:
    base = task.data("id", "heldout", 0, 32)
    others = [task.data("id", role, 0, 32) for role in ROLES if role != "heldout"]
    others += [task.data("id", "heldout", 1, 32), task.data("coef_scale_3", "heldout", 0, 32)]
    for other in others:
        assert not torch.isclose(base.xs, other.xs).any()


def test_split_seed_is_stable_and_distinct() -> None:
    # crc32, not Python's salted hash(): the same across processes
    assert split_seed(0, "id", "heldout") == zlib.crc32(b"id/heldout")
    assert split_seed(2, "id", "select") != split_seed(2, "id", "heldout")
    assert split_seed(1, "id", "heldout") != split_seed(0, "id", "heldout")


def test_bad_split_arguments(task: PolyRegTask) -> None:
    with pytest.raises(DataError, match="empty"):
        task.data("id", "heldout", 0, 0)
    with pytest.raises(DataError):
        task.data("id", "select", 0, -3)
    with pytest.raises(ValueError, match="unknown split role 'test'"):
        task.data("id", "test", 0, 4)
    with pytest.raises(ConfigError, match="'nope'"):
        task.data("nope", "heldout", 0, 4)


# ---------------------------------------------------------------- the prompts are polynomials


def test_noiseless_prompts_are_exact_polynomials_of_their_degree(task: PolyRegTask) -> None:
    batch = task.data("id", "heldout", 0, N)
    assert set(batch.degrees.tolist()) == {1, 2, 3}
    assert ls_relative_error(batch) < 1e-6
    # and not of a lower degree: fitting degree d - 1 leaves a clear error on the degree >= 2 prompts
    higher = batch.degrees >= 2
    lowered = PolyBatch(batch.xs[higher], batch.ys[higher], batch.degrees[higher] - 1)
    assert ls_relative_error(lowered) > 1e-2


def test_coefficients_are_standard_normal_and_zero_above_degree() -> None:
    # with the same random stream, only the coefficient scale differs: ys scale exactly
    base = SamplerParams()
    a = sample_prompts(base, 256, gen(5))
    b = sample_prompts(dataclasses.replace(base, coef_scale=3.0), 256, gen(5))
    assert torch.equal(a.xs, b.xs) and torch.equal(a.degrees, b.degrees)
    assert_close_scaled(b.ys, 3.0 * a.ys)  # float32 sums of terms rounded differently
    # degree 0: constant prompts, y = c_0 ~ N(0, 1)
    c = sample_prompts(dataclasses.replace(base, degrees=(0,)), 4096, gen(1))
    assert torch.equal(c.ys, c.ys[:, :1].expand_as(c.ys))
    assert abs(float(c.ys[:, 0].mean())) < 0.1 and abs(float(c.ys[:, 0].std()) - 1) < 0.05


# ---------------------------------------------------------------- shifts change the right statistic


def test_x_scale_shift(task: PolyRegTask) -> None:
    xs = task.data("x_scale_3", "heldout", 0, N).xs
    assert abs(float(xs.std()) - 3.0) < 0.1
    assert abs(float(xs.mean())) < 0.1
    assert abs(float(task.data("id", "heldout", 0, N).xs.std()) - 1.0) < 0.03
    same = sample_prompts(SamplerParams(), 16, gen(2))
    scaled = sample_prompts(dataclasses.replace(SamplerParams(), x_scale=3.0), 16, gen(2))
    assert torch.allclose(scaled.xs, 3.0 * same.xs)


def test_x_shift_shift(task: PolyRegTask) -> None:
    xs = task.data("x_shift_1", "heldout", 0, N).xs
    assert abs(float(xs.mean()) - 1.0) < 0.05
    assert abs(float(xs.std()) - 1.0) < 0.05
    same = sample_prompts(SamplerParams(), 16, gen(2))
    shifted = sample_prompts(dataclasses.replace(SamplerParams(), x_shift=1.0), 16, gen(2))
    assert torch.allclose(shifted.xs, same.xs + 1.0)


def test_uniform_x_is_bounded_with_the_same_std(task: PolyRegTask) -> None:
    params = task.params("uniform_x")
    assert params.x_dist == "uniform" and params.x_scale == 2.0
    xs = task.data("uniform_x", "heldout", 0, N).xs
    bound = 2.0 * math.sqrt(3.0)
    assert float(xs.abs().max()) <= bound + 1e-6
    assert float(xs.abs().max()) > 0.99 * bound  # fills its support
    assert abs(float(xs.std()) - 2.0) < 0.05
    # flat histogram: each quarter of the support holds about a quarter of the points
    counts = torch.histc(xs, bins=4, min=-bound, max=bound) / xs.numel()
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)
    # with a shift, the support moves: [shift - scale sqrt 3, shift + scale sqrt 3]
    moved = sample_prompts(SamplerParams(x_dist="uniform", x_scale=0.5, x_shift=1.0), 256, gen(3)).xs
    half = 0.5 * math.sqrt(3.0)
    assert float(moved.min()) >= 1.0 - half - 1e-6 and float(moved.max()) <= 1.0 + half + 1e-6


def test_degree_shift(task: PolyRegTask) -> None:
    batch = task.data("degree_5", "heldout", 0, N)
    assert (batch.degrees == 5).all()
    rel = ls_relative_error(batch)
    assert rel < 1e-5  # exact up to float32 rounding of the degree-5 values
    lowered = PolyBatch(batch.xs, batch.ys, batch.degrees - 1)
    assert ls_relative_error(lowered) > 100 * rel
    assert (task.data("degree_4", "heldout", 0, 16).degrees == 4).all()


def test_noise_shift_makes_least_squares_inexact(task: PolyRegTask) -> None:
    batch = task.data("noise_0.5", "heldout", 0, N)
    err = least_squares(batch) - batch.query_y.double()
    # the query y carries N(0, 0.25) noise the context cannot predict
    assert 0.2 < float(err.square().mean()) < 0.35
    assert ls_relative_error(task.data("id", "heldout", 0, N)) < 1e-6


def test_n_points_shifts_change_the_shape(task: PolyRegTask) -> None:
    assert task.data("more_points", "heldout", 0, 8).xs.shape == (8, 61)
    assert task.data("fewer_points", "heldout", 0, 8).ys.shape == (8, 11)
    assert task.data("id", "heldout", 0, 8).xs.shape == (8, 41)


def test_user_shift_combination_changes_all_its_parameters() -> None:
    cfg = load_config(None, ["task.shifts.combo.x_scale=3.0", "task.shifts.combo.degrees=[5]",
                             "task.shifts.combo.x_dist=uniform"])
    batch = PolyRegTask(cfg.task).data("combo", "heldout", 0, 256)
    assert (batch.degrees == 5).all()
    assert float(batch.xs.abs().max()) <= 3.0 * math.sqrt(3.0) + 1e-6
    assert abs(float(batch.xs.std()) - 3.0) < 0.1


# ---------------------------------------------------------------- Var_ID(y)


def test_y_var_of_default_mix_is_nine(task: PolyRegTask) -> None:
    # degree d gives sum_{j<=d} E[x^{2j}] = 2, 5, 20 for d = 1, 2, 3 -> mean 9
    assert task.y_var == pytest.approx(9.0, rel=1e-12)


@pytest.mark.parametrize("overrides", [
    {"degrees": (1, 2), "x_shift": 1.0, "x_scale": 0.5},
    {"degrees": (2,), "x_dist": "uniform", "x_shift": -0.5, "x_scale": 1.5},
    {"degrees": (1,), "noise_std": 0.7, "coef_scale": 2.0},
])
def test_y_var_formula_matches_sampled_variance(overrides: dict) -> None:
    from tapioca.tasks.polyreg import sample_prompts, y_variance

    params = dataclasses.replace(SamplerParams(), n_points=1, **overrides)
    ys = sample_prompts(params, 200_000, torch.Generator().manual_seed(0)).ys.double()
    assert y_variance(params) == pytest.approx(float(ys.var()), rel=0.03)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"degrees": (1,)}, 2.0),  # 1 + E[x^2]
        ({"degrees": (1,), "x_scale": 2.0}, 5.0),  # 1 + 4
        ({"degrees": (1,), "coef_scale": 0.5}, 0.5),  # 0.25 * 2
        ({"degrees": (2,)}, 5.0),  # 1 + 1 + 3
    ],
)
def test_y_var_analytic_light_tailed(overrides: dict, expected: float) -> None:
    sampler = dataclasses.replace(SamplerParams(), **overrides)
    task = PolyRegTask(TaskConfig(sampler=sampler, shifts={}))
    assert task.y_var == pytest.approx(expected, rel=1e-12)


def test_y_var_ignores_shifts() -> None:
    a = PolyRegTask(TaskConfig())
    b = PolyRegTask(TaskConfig(shifts={"wide": {"x_scale": 10.0}}))
    assert a.y_var == b.y_var


# ---------------------------------------------------------------- NaN / inf detection


def test_check_finite_raises_data_error() -> None:
    xs = torch.zeros(3, 5)
    ys = torch.zeros(3, 5)
    ok = PolyBatch(xs, ys, torch.ones(3, dtype=torch.long))
    assert check_finite(ok, "ok") is ok
    ys_nan = ys.clone()
    ys_nan[1, 2] = float("nan")
    ys_nan[2, 0] = float("inf")
    with pytest.raises(DataError, match=r"here: 2 non-finite value\(s\).*ys"):
        check_finite(PolyBatch(xs, ys_nan, ok.degrees), "here")
    xs_nan = xs.clone()
    xs_nan[0, 0] = float("nan")
    with pytest.raises(DataError, match="in xs"):
        check_finite(PolyBatch(xs_nan, ys, ok.degrees), "there")


def test_overflowing_shift_is_caught_when_data_is_drawn() -> None:
    cfg = load_config(None, ["task.shifts.huge.x_scale=1.0e30", "task.shifts.huge.degrees=[3]"])
    with pytest.raises(DataError, match="huge/heldout"):
        PolyRegTask(cfg.task).data("huge", "heldout", 0, 4)


# ---------------------------------------------------------------- metrics


def test_perfect_prediction_metrics(task: PolyRegTask) -> None:
    batch = task.data("id", "heldout", 0, 64)
    m = task.metrics(batch.query_y.clone(), batch)
    assert m["nmse"].shape == (64,) and torch.equal(m["nmse"], torch.zeros(64, dtype=torch.double))
    assert torch.equal(m["tol_acc"], torch.ones(64, dtype=torch.double))
    assert torch.equal(task.score(batch.query_y, batch, "nmse"), -m["nmse"])
    assert torch.equal(task.score(batch.query_y, batch, "tol_acc"), m["tol_acc"])


def test_metrics_with_known_errors(task: PolyRegTask) -> None:
    batch = task.data("id", "heldout", 0, 64)
    std = math.sqrt(task.y_var)
    near = task.metrics(batch.query_y.double() + 0.05 * std, batch)  # inside the 0.1 std tolerance
    far = task.metrics(batch.query_y.double() - 0.2 * std, batch)  # outside
    assert torch.allclose(near["nmse"], torch.full((64,), 0.0025, dtype=torch.double))
    assert torch.allclose(far["nmse"], torch.full((64,), 0.04, dtype=torch.double))
    assert near["tol_acc"].min() == 1 and far["tol_acc"].max() == 0
    with pytest.raises(ValueError, match="unknown metric 'acc'"):
        task.score(batch.query_y, batch, "acc")


# ---------------------------------------------------------------- references


def test_reference_shapes_and_mean(task: PolyRegTask) -> None:
    batch = task.data("id", "heldout", 0, 32)
    for name, fn in REFERENCES.items():
        out = fn(batch)
        assert out.shape == (32,), name
        assert torch.isfinite(out).all(), name
    assert torch.allclose(context_mean(batch), batch.ys[:, :-1].double().mean(1))
    assert not torch.allclose(context_mean(batch), batch.query_y.double())


def test_nearest_neighbours_by_hand() -> None:
    xs = torch.tensor([[0.0, 1.0, 2.0, 10.0, 1.9]])
    ys = torch.tensor([[5.0, 6.0, 7.0, 8.0, 0.0]])
    batch = PolyBatch(xs, ys, torch.tensor([1]))
    assert nearest_neighbours(batch, k=1).item() == 7.0  # x = 2 is closest to the query 1.9
    assert nearest_neighbours(batch, k=2).item() == pytest.approx(6.5)  # x = 2 and x = 1
    assert nearest_neighbours(batch, k=99).item() == pytest.approx(6.5)  # clipped to the 4 context points
    assert context_mean(batch).item() == pytest.approx(6.5)


def test_reference_ranking_in_distribution(task: PolyRegTask) -> None:
    batch = task.data("id", "heldout", 0, N)
    nmse = {name: float(task.metrics(fn(batch), batch)["nmse"].mean()) for name, fn in REFERENCES.items()}
    assert nmse["least_squares"] < 1e-10
    assert nmse["least_squares"] < nmse["knn"] < nmse["mean"]
