"""User-facing errors: the CLI prints these as one line (no traceback unless --debug)."""

from __future__ import annotations

from typing import Any


class TapiocaError(Exception):
    """Base class for errors caused by bad input rather than by a bug."""


class ConfigError(TapiocaError, ValueError):
    """A configuration key, type or value is not allowed."""


class CheckpointError(TapiocaError):
    """A checkpoint is missing, incomplete or corrupt."""


class DataError(TapiocaError, ValueError):
    """A split is empty or too small, or data contains NaN/inf."""


def check_finite(values: Any, where: str) -> None:
    """Raise :class:`DataError` if ``values`` (a tensor or array, one row per example) holds NaN or inf.
    ``where`` names the model and data, e.g. "model runs/m0 on distribution x_scale_3 (selection)"."""
    import torch  # lazily: this module stays free of heavy imports

    bad = ~torch.isfinite(torch.as_tensor(values))
    bad = bad.reshape(1) if bad.dim() == 0 else bad
    rows = int(bad.flatten(1).any(1).sum()) if bad.dim() > 1 else int(bad.sum())
    if rows:
        prefix = f"{where}: " if where else ""
        raise DataError(f"{prefix}{rows} of {bad.shape[0]} rows are non-finite (NaN or inf); "
                        "the weights may be damaged")
