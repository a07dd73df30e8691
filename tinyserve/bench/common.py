"""What every benchmark suite shares: the environment record, result files, timing helpers.

A result file is ``<out>/<machine>-<suite>.json`` where ``machine`` names the hardware that
was measured: the CUDA device name slugified (``nvidia-h100-80gb-hbm3``) or ``cpu-<n>core``.
Every file records the date, the command line, the versions and the hardware, so a number can
always be traced back to how it was made.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from ..timing import clock, synchronize  # noqa: F401  (the suites time with these)

DEFAULT_OUT = Path("benchmarks") / "results"


# ---- hardware and versions ---------------------------------------------------------------
def slugify(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def num_cpus() -> int:
    """CPUs this process may run on (what ``nproc`` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name(device) -> str | None:
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def machine_name(device) -> str:
    """The result-file prefix: the GPU's name when measuring on CUDA, else cpu-<n>core."""
    name = gpu_name(device)
    return slugify(name) if name else f"cpu-{num_cpus()}core"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def env_info(device, argv: Sequence[str] | None = None, prog: str = "python -m tinyserve.bench"
             ) -> dict:
    """Date, command line, versions, platform and hardware for a result file."""
    import shlex

    import torch

    import tinyserve
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": prog + (" " + shlex.join(argv) if argv else ""),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "tinyserve": getattr(tinyserve, "__version__", None),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
        },
        "device": str(device),
        "machine": machine_name(device),
        "cpu": cpu_name(),
        "cpu_count": num_cpus(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_name(device),
        # other work on the machine distorts CPU timings: keep the evidence with the numbers
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["gpu_sm_count"] = int(props.multi_processor_count)
    return info


# ---- result files ------------------------------------------------------------------------
def result_path(out_dir, machine: str, suite: str) -> Path:
    return Path(out_dir) / f"{machine}-{suite}.json"


def write_result(result: dict, out_dir, machine: str, suite: str) -> Path:
    """Write ``result`` as pretty JSON (atomically: a crash never leaves half a file)."""
    path = result_path(out_dir, machine, suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False, default=jsonable) + "\n")
    os.replace(tmp, path)
    return path


def jsonable(x):
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return str(x)


# ---- timing ------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict:
    """Median (the number we report), min, max and the raw values of repeated measurements."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "values": vals}


def repeat(fn: Callable[[], dict], repeats: int, warmup: int = 1) -> list[dict]:
    """Call ``fn`` ``warmup`` times unrecorded, then ``repeats`` times; -> their results."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


def log(*args) -> None:
    """Progress goes to stderr, so stdout holds only the tables."""
    print(*args, file=sys.stderr, flush=True)


def table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    """A plain fixed-width text table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def set_threads(n: int | None) -> None:
    """``--threads``: torch's CPU thread count (None keeps torch's choice). On a busy machine
    fewer threads than cores avoids threads spinning against each other."""
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}")
        import torch
        torch.set_num_threads(n)


# ---- argparse types shared by the suites and the CLI: bad values fail at parse time ----------
def _int_at_least(s: str, low: int) -> int:
    import argparse
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
    return v


def positive_int(s: str) -> int:
    return _int_at_least(s, 1)


def nonnegative_int(s: str) -> int:
    return _int_at_least(s, 0)
