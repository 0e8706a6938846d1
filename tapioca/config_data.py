"""Plain data <-> frozen config dataclasses: range-checked fields, :func:`from_dict` (type, range and key checks
with errors naming the dotted key) and :func:`to_dict`. Generic: it knows no tapioca section; the sections live
in :mod:`tapioca.config`, which re-exports these names."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal, Mapping, Sequence

from tapioca.errors import ConfigError


def _range(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with an allowed numeric range, checked by :func:`from_dict`."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


OMIT_AT_DEFAULT = "omit_at_default"  # field metadata: left out of :func:`to_dict` while at its default


def _added_later(default: Any, *, ge: float | None = None) -> Any:
    """A field added after checkpoints and run directories were written: :func:`to_dict` leaves it out while it
    holds its default, so their recorded configs and training fingerprints (``tapioca/zoo``) still match.
    ``ge``: its allowed minimum, as in :func:`_range`."""
    return field(default=default, metadata={OMIT_AT_DEFAULT: True, "ge": ge, "gt": None, "le": None})


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with checks


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys, types and ranges (errors name ``path.key``)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key; allowed: {sorted(fields)}")
    values = {}
    for key, value in data.items():
        key_path = _join(path, key)
        values[key] = _convert(hints[key], value, key_path)
        _check_range(fields[key].metadata, values[key], key_path)
    return cls(**values)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _bad(path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}: {value!r} is not allowed; expected {allowed}")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert (list -> tuple, int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path)
    if origin is Literal:
        if value not in args:
            raise _bad(path, value, f"one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise _bad(path, value, f"a list of {_type_name(args[0])}")
        return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(path, value, "a mapping")
        return {str(k): v for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(path, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(path, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _bad(path, value, "a number (finite)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(path, value, "a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")  # a bug in the schema, not user input


def _check_range(meta: Mapping[str, Any], value: Any, path: str) -> None:
    if value is None or not meta:
        return
    # negated comparisons, so that NaN (which compares false with everything) is out of range
    if meta.get("ge") is not None and not value >= meta["ge"]:
        raise _bad(path, value, f"a value >= {meta['ge']}")
    if meta.get("gt") is not None and not value > meta["gt"]:
        raise _bad(path, value, f"a value > {meta['gt']}")
    if meta.get("le") is not None and not value <= meta["le"]:
        raise _bad(path, value, f"a value <= {meta['le']}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config (tuples become lists), suitable for YAML/JSON."""
    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x) if not _omitted(f, x)}
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def _omitted(f: dataclasses.Field, obj: Any) -> bool:
    """A field marked :data:`OMIT_AT_DEFAULT` that holds its default."""
    return bool(f.metadata.get(OMIT_AT_DEFAULT)) and getattr(obj, f.name) == f.default
