"""Atomic writes and run-directory helpers: a kill never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_result(path: str | Path, what: str, missing_hint: str, corrupt_hint: str = "") -> dict[str, Any]:
    """The JSON mapping a run wrote at ``path`` (``what``: e.g. "results"); a one-line
    :class:`~tapioca.errors.CheckpointError` naming the file when it is missing (with ``missing_hint``), not
    JSON or not a mapping (with ``corrupt_hint``)."""
    from tapioca.errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {missing_hint}")
    hint = f"; {corrupt_hint}" if corrupt_hint else ""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt {what} file ({err}){hint}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: corrupt {what} file (top level is {type(data).__name__}, not a mapping)")
    return data


def write_yaml(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as YAML (key order kept)."""
    atomic_write_bytes(path, yaml.safe_dump(obj, sort_keys=False).encode())


def environment() -> dict[str, Any]:
    """Versions, platform and git commit, recorded in every run directory."""
    import torch
    import transformers

    from tapioca import __version__

    return {
        "tapioca": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def save_arrays(path: str | Path, arrays: dict[str, Any]) -> None:
    """Atomically write named numpy arrays to one ``.npz`` file (an empty dict makes an empty file)."""
    import io as _io

    import numpy as np

    buffer = _io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
