"""Polynomial in-context regression: a prompt of (x, f(x)) pairs, then a query x.

f(x) = sum_{j=0..d} c_j x^j with c_j ~ N(0, coef_scale^2) (family "polynomial", the default). Family
"sinusoid": f(x) = sum_{k=1..d} a_k sin(k x + phi_k) with a_k ~ N(0, 2 coef_scale^2 / d) and phi_k ~ U(0, 2 pi),
so Var f(x) = coef_scale^2 for every x and degree d >= 1 (a trigonometric polynomial of degree d). With several
``families`` each prompt draws one uniformly (a training mixture). Every distribution (ID or a named OOD shift)
is a :class:`~tapioca.config.SamplerParams`; a shift is never a code branch.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import torch
from torch import Tensor

from tapioca.config import SamplerParams, TaskConfig, distributions, shift_params
from tapioca.errors import DataError
from tapioca.models.gates import Gates, gated
from tapioca.tasks.roles import split_role

ROLES = ("select", "heldout", "train", "reference")


@dataclass(frozen=True)
class PolyBatch:
    """A batch of prompts. ``xs``, ``ys``: (B, n_points); the last pair is the query. ``degrees``: (B,)."""

    xs: Tensor
    ys: Tensor
    degrees: Tensor

    def __len__(self) -> int:
        return self.xs.shape[0]

    @property
    def query_y(self) -> Tensor:
        """Targets at the query position, (B,)."""
        return self.ys[:, -1]

    def slice(self, start: int, stop: int) -> "PolyBatch":
        return PolyBatch(self.xs[start:stop], self.ys[start:stop], self.degrees[start:stop])

    def to(self, device: torch.device | str) -> "PolyBatch":
        return PolyBatch(self.xs.to(device), self.ys.to(device), self.degrees.to(device))


def split_seed(seed: int, distribution: str, role: str) -> int:
    """A stable 63-bit seed for one (seed, distribution, role): different roles never share prompts."""
    return (seed * 1_000_003 + zlib.crc32(f"{distribution}/{role}".encode())) % (1 << 63)


def sample_x(params: SamplerParams, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Inputs x with mean ``x_shift`` and std ``x_scale`` (normal, or uniform of the same std)."""
    if params.x_dist == "normal":
        z = torch.randn(shape, generator=gen)
    else:
        z = (torch.rand(shape, generator=gen) * 2 - 1) * math.sqrt(3.0)
    return params.x_shift + params.x_scale * z


def sample_prompts(params: SamplerParams, n: int, gen: torch.Generator) -> PolyBatch:
    """``n`` prompts of ``params.n_points`` pairs each, degrees drawn uniformly from ``params.degrees`` and
    functions from one of ``params.families`` (uniformly per prompt when there are several). The polynomial
    family alone draws exactly the random numbers it always drew (same prompts as before families existed)."""
    families = tuple(params.families)
    if not families:
        raise DataError("sampler families is empty; give one or more of 'polynomial', 'sinusoid'")
    if len(families) == 1:
        return FAMILY_SAMPLERS[families[0]](params, n, gen)
    which = torch.randint(len(families), (n,), generator=gen)  # (n,) family index of each prompt
    xs = torch.empty((n, params.n_points))
    ys = torch.empty((n, params.n_points))
    degrees = torch.empty(n, dtype=torch.long)
    for f, family in enumerate(families):
        rows = (which == f).nonzero().flatten()
        if len(rows):
            part = FAMILY_SAMPLERS[family](params, len(rows), gen)
            xs[rows], ys[rows], degrees[rows] = part.xs, part.ys, part.degrees
    return PolyBatch(xs, ys, degrees)


def polynomial_prompts(params: SamplerParams, n: int, gen: torch.Generator) -> PolyBatch:
    """``n`` polynomial prompts: f(x) = sum_{j<=d} c_j x^j, c_j ~ N(0, coef_scale^2). xs, ys: (n, n_points)."""
    k = params.n_points
    degree_choices = torch.tensor(params.degrees, dtype=torch.long)
    degrees = degree_choices[torch.randint(len(degree_choices), (n,), generator=gen)]
    max_degree = int(degree_choices.max())
    coefs = torch.randn((n, max_degree + 1), generator=gen) * params.coef_scale
    powers = torch.arange(max_degree + 1)
    coefs = coefs * (powers[None, :] <= degrees[:, None])  # zero above each prompt's degree
    xs = sample_x(params, (n, k), gen)
    ys = (xs[..., None] ** powers * coefs[:, None, :]).sum(-1)
    if params.noise_std > 0:
        ys = ys + params.noise_std * torch.randn((n, k), generator=gen)
    return PolyBatch(xs, ys, degrees)


def sinusoid_prompts(params: SamplerParams, n: int, gen: torch.Generator) -> PolyBatch:
    """``n`` sinusoid prompts: f(x) = sum_{k=1..d} a_k sin(k x + phi_k), a_k ~ N(0, 2 coef_scale^2 / d),
    phi_k ~ U(0, 2 pi), so Var f(x) = coef_scale^2 at every x (degree 0: f = 0). xs, ys: (n, n_points)."""
    k = params.n_points
    degree_choices = torch.tensor(params.degrees, dtype=torch.long)
    degrees = degree_choices[torch.randint(len(degree_choices), (n,), generator=gen)]
    max_degree = max(int(degree_choices.max()), 1)
    harmonics = torch.arange(1, max_degree + 1)  # (H,)
    scale = params.coef_scale * torch.sqrt(2.0 / degrees.clamp(min=1).double()).float()  # (n,)
    amps = torch.randn((n, max_degree), generator=gen) * scale[:, None]
    amps = amps * (harmonics[None, :] <= degrees[:, None])  # zero above each prompt's degree
    phases = torch.rand((n, max_degree), generator=gen) * (2 * math.pi)
    xs = sample_x(params, (n, k), gen)
    ys = (amps[:, None, :] * torch.sin(xs[..., None] * harmonics + phases[:, None, :])).sum(-1)
    if params.noise_std > 0:
        ys = ys + params.noise_std * torch.randn((n, k), generator=gen)
    return PolyBatch(xs, ys, degrees)


FAMILY_SAMPLERS: dict[str, Callable[[SamplerParams, int, torch.Generator], PolyBatch]] = {
    "polynomial": polynomial_prompts,
    "sinusoid": sinusoid_prompts,
}


class PolyRegTask:
    """ID sampler plus named shifts, fixed data splits per (distribution, role, seed), and metrics."""

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.distributions: list[str] = distributions(cfg)

    def params(self, distribution: str) -> SamplerParams:
        return shift_params(self.cfg, distribution)

    def data(self, distribution: str, role: str, seed: int, n: int) -> PolyBatch:
        """The ``n`` prompts of one split; the same arguments always give the same prompts."""
        if split_role(role)[0] not in ROLES:
            raise ValueError(f"unknown split role {role!r}; allowed: {list(ROLES)}")
        if n < 1:
            raise DataError(f"the {role} split of {distribution!r} is empty (n={n}); ask for at least 1 prompt")
        gen = torch.Generator().manual_seed(split_seed(seed, distribution, role))
        return check_finite(sample_prompts(self.params(distribution), n, gen), f"{distribution}/{role}")

    @cached_property
    def y_var(self) -> float:
        """Var_ID(y) at the query position, the NMSE normaliser (exact, see :func:`y_variance`)."""
        return y_variance(self.cfg.sampler)

    def metrics(self, pred: Tensor, batch: PolyBatch) -> dict[str, Tensor]:
        """Per-example metrics at the query, each (B,): normalised squared error and tolerance accuracy."""
        err = pred.double() - batch.query_y.double().to(pred.device)
        return {
            "nmse": err.square() / self.y_var,
            "tol_acc": (err.abs() <= self.cfg.tolerance * math.sqrt(self.y_var)).double(),
        }

    def score(self, pred: Tensor, batch: PolyBatch, metric: str) -> Tensor:
        """Per-example selection score, higher is better: -NMSE or tolerance accuracy. (B,)"""
        values = self.metrics(pred, batch)
        if metric not in values:
            raise ValueError(f"unknown metric {metric!r}; allowed: {list(values)}")
        return -values["nmse"] if metric == "nmse" else values[metric]


def x_moment(params: SamplerParams, k: int) -> float:
    """E[x^k] under the sampler's x distribution (exact)."""
    mu, sigma = params.x_shift, params.x_scale
    if params.x_dist == "uniform":
        lo, hi = mu - sigma * math.sqrt(3.0), mu + sigma * math.sqrt(3.0)
        return (hi ** (k + 1) - lo ** (k + 1)) / ((k + 1) * (hi - lo))
    # E[(mu + sigma z)^k] with E[z^i] = (i - 1)!! for even i, 0 for odd i
    return sum(math.comb(k, i) * mu ** (k - i) * sigma**i * _double_factorial(i - 1) for i in range(0, k + 1, 2))


def _double_factorial(n: int) -> int:
    return math.prod(range(n, 0, -2)) if n > 0 else 1


def y_variance(params: SamplerParams) -> float:
    """Var(y) of one sampled point. Polynomials: coefficients are independent with mean 0, so
    Var(y) = mean over degrees d of coef_scale^2 * sum_{j<=d} E[x^(2j)], plus noise_std^2. Sinusoids: the phases
    are uniform, so Var(y) = coef_scale^2 (0 at degree 0) whatever x, plus noise_std^2. A mixture of families
    (each mean 0): the mean of the families' variances."""
    families = tuple(params.families)
    if families == ("polynomial",):
        return _polynomial_variance(params)
    per_family = [_polynomial_variance(params) if f == "polynomial" else _sinusoid_variance(params) for f in families]
    return sum(per_family) / len(per_family)


def _polynomial_variance(params: SamplerParams) -> float:
    per_degree = [sum(x_moment(params, 2 * j) for j in range(d + 1)) for d in params.degrees]
    return params.coef_scale**2 * sum(per_degree) / len(per_degree) + params.noise_std**2


def _sinusoid_variance(params: SamplerParams) -> float:
    per_degree = [1.0 if d >= 1 else 0.0 for d in params.degrees]
    return params.coef_scale**2 * sum(per_degree) / len(per_degree) + params.noise_std**2


def check_finite(batch: PolyBatch, where: str) -> PolyBatch:
    """Raise :class:`DataError` if the prompts hold NaN or inf."""
    for name in ("xs", "ys"):
        values = getattr(batch, name)
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise DataError(f"{where}: {bad} non-finite value(s) (NaN or inf) in {name}; check the sampler parameters")
    return batch


@torch.no_grad()
def context_errors(model: Any, batch: PolyBatch, gates: Gates | None = None, chunk: int = 1024) -> Tensor:
    """Mean squared error (B,) float64 of the model's predictions at the n - 1 in-context x positions before the
    query, against their y (part of the prompt); the query's y is never read. ``model(xs, ys)`` must give
    predictions at every x position, (B, n) (an :class:`~tapioca.models.icl.ICLModel`'s forward, which
    computes every position, unlike its query-only ``run``), under block ``gates``."""
    if batch.xs.shape[1] < 2:
        raise DataError("context errors need prompts of 2 points or more (a context pair before the query)")
    out = []
    for start in range(0, len(batch), chunk):
        sub = batch.slice(start, start + chunk).to(model.device)
        context_ys = sub.ys[:, :-1]
        with gated(model.blocks, gates):
            preds = model(sub.xs, torch.cat([context_ys, torch.zeros_like(sub.ys[:, -1:])], 1))[:, :-1]  # (b, n - 1)
        out.append((preds.double() - context_ys.double()).square().mean(1).cpu())
    return torch.cat(out)


def context_error_scorer(model: Any, batch: PolyBatch, chunk: int = 1024) -> Callable[[Gates], Tensor]:
    """Label-free scorer (gates -> (B,) float64, higher is better): minus :func:`context_errors`, the model's
    own in-context error on the prompts of ``batch`` (for SLEB-style searches; query labels are not used)."""
    return lambda gates: -context_errors(model, batch, gates, chunk)
