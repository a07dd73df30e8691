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
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

from ..args import positive_int
from ..threads import busy_warning, describe, load_average, set_threads, usable_cores
from ..timing import clock

DEFAULT_OUT = Path("benchmarks") / "results"


# ---- hardware and versions ---------------------------------------------------------------
def slugify(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def num_cpus() -> int:
    """CPUs this process may run on (what ``nproc`` prints)."""
    return usable_cores()


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


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def load_avg() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    return load_average()


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
            "triton": package_version("triton"),
            "transformers": package_version("transformers"),
        },
        "device": str(device),
        "machine": machine_name(device),
        "cpu": cpu_name(),
        "cpu_count": num_cpus(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu_name(device),
        # other work on the machine distorts CPU timings: keep the evidence with the numbers
        "load_avg_1m": load_avg(),
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


# ---- the runner: the flags, the start and the end every suite shares ------------------------
COMMON_FLAGS = {   # a suite's COMMON names the ones it takes; add_arguments declares the rest
    "device": (("--device",), dict(default="auto", help="auto (cuda if available), cpu, cuda")),
    "threads": (("--threads",), dict(type=positive_int, default=None,
                                     help="torch CPU threads (default: OMP_NUM_THREADS if set, "
                                          "else the cores this process may run on)")),
    "seed": (("--seed",), dict(type=int, default=0)),
    "budget": (("--budget-s",), dict(type=float, default=None, help=(
        "start no new measurement after this many seconds (the result says what was "
        "skipped)"))),
    "figures": (("--figures",), dict(default="figures",
                                     help="directory for the plots ('' = none)")),
}


def add_suite_args(p, mod) -> None:
    """A suite's whole command line: --out, the shared flags it names in ``COMMON``, its own."""
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"directory for the result JSON (default: {DEFAULT_OUT})")
    for name in getattr(mod, "COMMON", ()):
        opts, kw = COMMON_FLAGS[name]
        p.add_argument(*opts, **kw)
    mod.add_arguments(p)


def resolve_device(name: str = "auto"):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {name!r} (cpu or cuda)")
    return dev


def start(args) -> tuple:
    """A suite's first step: -> (the device, the environment record). Threads are set first
    (``--threads``, else ``threads.default_threads()``: the record holds them) and logged with
    the load average, with a warning when other work leaves fewer free cores than threads; the
    record is taken before the suite loads anything, so its load average is the machine's,
    not ours."""
    device = resolve_device(args.device)
    n = set_threads(getattr(args, "threads", None))
    load = load_average()
    log(describe(n, load))
    warning = busy_warning(n, load)
    if warning:
        log(warning)
    return device, env_info(device, getattr(args, "argv", None))


def finish(result: dict, args, report: Callable[[dict], str]) -> dict:
    """A suite's last step: print its table, draw its figures (``--figures``, if it has it)."""
    print(report(result))
    if getattr(args, "figures", None):
        from .plots import plot_result
        for path in plot_result(result, args.figures):
            log(f"[{result['suite']}] figure {path}")
    return result


class Budget:
    """``--budget-s``: start no new measurement once this many seconds have passed."""
    SKIPPED = "time budget spent"

    def __init__(self, seconds: float | None):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.t0 > self.seconds


def time_calls(fn: Callable, repeats: int, warmup: int = 1, device=None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (the clock
    waits for ``device``'s queued work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock(device)
        fn()
        times.append(clock(device) - t0)
    return times


def free_memory(device) -> None:
    """Drop what the last model left behind before the next one is built."""
    import gc

    import torch
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def comma_list(s: str, what: str, cast=str, positive=False, empty_ok=False) -> list:
    """``--what`` as a comma list, each item ``cast``: '1,2,4' -> [1, 2, 4]; else a clear error."""
    try:
        vals = [cast(x.strip()) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated {cast.__name__}s, got {s!r}"
                         ) from None
    if not vals and not empty_ok:
        raise ValueError(f"--{what}: empty list")
    if positive and any(not v > 0 for v in vals):
        raise ValueError(f"--{what}: {what} must be > 0, got {s!r}")
    return vals


def fmt(x, spec: str = ".2f", suffix: str = "") -> str:
    """A table cell: '-' for a missing number."""
    return "-" if x is None else format(x, spec) + suffix
