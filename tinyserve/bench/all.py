"""Suite ``all``: roofline, ops, decode and (when it can run) generate, one JSON file each.

    python -m tinyserve.bench all [--small] [--device auto] [--out benchmarks/results]

Each suite runs with its defaults for this device and writes ``<out>/<machine>-<suite>.json``
as if run on its own; the roofline is measured once and shared. ``generate`` needs the ``gguf``
package and the cached SmolLM2 file (``make model``); without them it is skipped with a note.
This command's own file, ``<machine>-all.json``, holds the roofline, where each result went,
and what was skipped or failed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util

from .common import add_suite_args, comma_list, log, start, write_result

NAME = "all"
HELP = "roofline + ops + decode (+ generate if gguf and the model file are here), one JSON each"
PARTS = ("roofline", "ops", "decode", "generate")
COMMON = ("device", "threads", "figures")


def add_arguments(p) -> None:
    p.add_argument("--small", action="store_true", help="ops: small shapes (always on CPU)")
    p.add_argument("--skip", default="", help=f"comma list of parts to skip ({', '.join(PARTS)})")


def _sub_args(modname: str, argv: list[str]):
    """The suite's own parser and defaults, as if it were run as ``SUITE argv``."""
    mod = importlib.import_module(f"tinyserve.bench.{modname}")
    p = argparse.ArgumentParser(prog=f"all:{modname}")
    add_suite_args(p, mod)
    args = p.parse_args(argv)
    args.argv = [modname, *argv]
    return mod, args


def generate_unavailable() -> str | None:
    """Why the generate suite cannot run here (None if it can)."""
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (it reads the SmolLM2 file)"
    from ..weights import registry
    if registry.cached_path("smollm2") is None:
        return "SmolLM2 GGUF not cached (run `make model`)"
    return None


def run(args) -> dict:
    skip = set(comma_list(args.skip, "skip", empty_ok=True))
    if skip - set(PARTS):
        raise ValueError(f"--skip: unknown part(s) {sorted(skip - set(PARTS))}; parts: {PARTS}")
    device, env = start(args)
    common = ["--device", str(device)] + (["--threads", str(args.threads)] if args.threads else [])
    figs = ["--figures", args.figures]
    plan = {
        "roofline": common,
        "ops": common + figs + (["--small"] if args.small else []),
        "decode": common + figs,
        "generate": ["--device", device.type] + common[2:],
    }
    files, notes, errors = {}, {}, {}
    roof = None
    for part, argv in plan.items():
        if part in skip:
            notes[part] = "--skip"
            continue
        if part == "generate":
            why = generate_unavailable()
            if why:
                notes[part] = f"skipped: {why}"
                log(f"[all] generate {notes[part]}")
                continue
        log(f"[all] {part} ...")
        try:
            mod, sub = _sub_args(part, argv)
            res = mod.run(sub)
        except Exception as e:   # one failing part must not lose the others' results
            errors[part] = f"{type(e).__name__}: {e}"[:500]
            log(f"[all] {part} failed: {errors[part]}")
            continue
        if part == "roofline":
            roof = res["roofline"]
        files[part] = str(write_result(res, args.out, res["env"]["machine"], part))
        log(f"[all] saved {files[part]}")
    return {"suite": NAME, "env": env, "roofline": roof, "files": files, "notes": notes,
            "errors": errors}
