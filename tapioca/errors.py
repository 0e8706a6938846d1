"""User-facing errors: the CLI prints these as one line (no traceback unless --debug)."""

from __future__ import annotations


class TapiocaError(Exception):
    """Base class for errors caused by bad input rather than by a bug."""


class ConfigError(TapiocaError, ValueError):
    """A configuration key, type or value is not allowed."""


class CheckpointError(TapiocaError):
    """A checkpoint is missing, incomplete or corrupt."""


class DataError(TapiocaError, ValueError):
    """A split is empty or too small, or data contains NaN/inf."""
