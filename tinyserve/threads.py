"""How many CPU threads torch should use, and whether the machine has that many free.

Measured on a 2-core machine (issue 14): when a benchmark used more threads than there were
free cores, every engine (llama.cpp, HF, tinyserve) fell to a few tokens/s. Thread choice
matters as much as kernels, so it is made here, explicitly, not left to torch: torch's count
comes from its OpenMP runtime at start-up (torch 2.13's Linux CPU wheel follows the affinity
mask: ``taskset -c 0`` gives 1; other builds and platforms may count every core) and then is
whatever an earlier ``torch.set_num_threads`` in the process left. The default here is the
cores this process may run on, a number a benchmark can hand every engine it compares, and
the benchmarks say when the machine is busy.

    usable_cores()         cores this process may run on (its affinity mask)
    default_threads()      OMP_NUM_THREADS if set, else usable_cores()
    set_threads(n)         check n and apply it (None: the default) -> the count used
    busy_warning(n)        one line when other work leaves fewer free cores than n, else None

No torch import here until a thread count is applied (the CLI parser imports this module).
A CPU quota (``docker --cpus``) is not seen: only the affinity mask is.
"""
from __future__ import annotations

import operator
import os


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask (``nproc``), else all of them."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):   # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def default_threads() -> int:
    """The thread count used when none is given. An explicit ``OMP_NUM_THREADS`` wins (the
    standard knob, read by torch too; the test runner uses it to give each worker and every
    process it starts its share of the cores); else every usable core.

    Busy cores are deliberately not subtracted: the load average is a trailing 1-minute mean
    that includes this very process's own recent work (a notebook that just generated would
    shrink its next default), so the count would change from run to run. A busy machine gets
    a warning instead (``busy_warning``), and ``threads=`` / ``--threads`` choose."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:   # "4,2" (nested levels) or junk: ignored
        return int(env)
    return usable_cores()


def check_threads(n) -> int:
    """``n`` if it is a thread count (an int >= 1; not a bool, float or str), else ValueError."""
    try:
        if isinstance(n, bool):
            raise TypeError
        v = operator.index(n)           # ints, numpy ints; not 2.5 or "2"
    except TypeError:
        v = None
    if v is None or v < 1:
        raise ValueError(f"threads must be an integer >= 1 (this process may use "
                         f"{usable_cores()} cores), got {n!r}")
    return v


def set_threads(n: int | None = None) -> int:
    """Set torch's CPU thread count to ``n`` (None: ``default_threads()``) -> the count used."""
    n = default_threads() if n is None else check_threads(n)
    import torch   # lazy: see the module docstring
    torch.set_num_threads(n)
    return n


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable tasks), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_cores(load: float | None = None) -> int:
    """Cores other work keeps busy: the 1-minute load average to the nearest whole core (a
    load under 0.5 is a shell or a daemon waking up, not a competitor), at most every core."""
    load = load_average() if load is None else load
    return 0 if load is None else min(os.cpu_count() or 1, int(load + 0.5))


def free_cores(load: float | None = None) -> int:
    """Usable cores that no other work keeps busy. The load average is machine-wide: with an
    affinity mask narrower than the machine (a container's cpuset) we cannot tell on which
    cores it runs, so it is taken as spread over all of them."""
    total = max(os.cpu_count() or 1, usable_cores())
    return max(0, min(usable_cores(), total - busy_cores(load)))


def busy_warning(threads: int, load: float | None = None) -> str | None:
    """One line when ``threads`` is more than the free cores (``load``: the 1-minute load
    average, default the machine's now), else None. Call it before this process starts
    working, or the load it sees includes its own."""
    load = load_average() if load is None else load
    if load is None:
        return None
    free = free_cores(load)
    if threads <= free:
        return None
    return (f"warning: machine busy: load average {load:.2f} (1 min) leaves {free} of "
            f"{usable_cores()} usable cores free for {threads} threads; threads beyond the "
            f"free cores spin against each other and timings collapse: try --threads "
            f"{max(1, free)} or wait")


def describe(threads: int, load: float | None = None) -> str:
    """The start-of-run line: thread count, usable cores, load average."""
    load = load_average() if load is None else load
    la = "n/a" if load is None else f"{load:.2f}"
    return f"threads: {threads} (usable cores: {usable_cores()}, load average 1 min: {la})"
