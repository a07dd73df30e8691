"""Suite ``ops``: every op's kernel against its peers, as a fraction of the measured roofline.

    python -m tinyserve.bench ops [--small] [--ops linear,rms_norm] [--figures figures]

Each ``tinyserve/ops/<op>.py`` that defines ``bench_cases(device, small)`` is imported; every
case's ``setup()`` allocates its inputs and returns ``{implementation: fn}``. Per implementation:

    time        CUDA: triton.testing.do_bench median (CUDA events, L2 flushed, after a first
                call that compiles/autotunes); CPU: median of a few perf_counter runs
    GB/s        case.bytes / time (bytes = the minimum DRAM traffic one call needs)
    frac_bw     GB/s / measured copy bandwidth (the roofline suite, measured first in this run)
    TFLOP/s     case.flops / time, and frac_matmul against the measured matmul rate
    speedup     for ours (case.ours, "triton"): time(peer) / time(ours) per peer, > 1 = faster

On CPU the "triton" implementation is never timed: it would run under the Triton interpreter,
whose speed says nothing about the kernel. Each such entry records why it was skipped.
Small shapes (``--small``, always on CPU) only check that the harness runs.
"""
from __future__ import annotations

import importlib
import pkgutil
import statistics

from ..args import positive_int
from .common import Budget, comma_list, finish, free_memory, log, start, table, time_calls

NAME = "ops"
HELP = "each op's Triton kernel vs its peers (cuBLAS, SDPA, eager ref), fraction of roofline"
CPU_TRITON_SKIP = ("CPU: triton would run under the interpreter, whose speed means nothing "
                   "(time it on a GPU)")


COMMON = ("device", "threads", "budget", "figures")


def add_arguments(p) -> None:
    p.add_argument("--small", action="store_true",
                   help="small shapes (always on CPU): checks the harness, measures nothing")
    p.add_argument("--ops", default=None,
                   help="comma-separated op modules to run (default: every op with bench_cases)")
    p.add_argument("--warmup-ms", type=float, default=25, help="do_bench warmup (CUDA)")
    p.add_argument("--rep-ms", type=float, default=100, help="do_bench measuring time (CUDA)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per impl on CPU")


def discover(only: list[str] | None = None) -> tuple[dict, dict]:
    """-> ({op module name: bench_cases}, {op module name: import error})."""
    import tinyserve.ops as pkg
    found, errors = {}, {}
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; available: {', '.join(names)}")
        names = [n for n in names if n in only]
    for name in names:
        try:
            mod = importlib.import_module(f"tinyserve.ops.{name}")
        except Exception as e:  # an op being rewritten must not take the others down
            errors[name] = f"import failed: {type(e).__name__}: {e}"
            continue
        fn = getattr(mod, "bench_cases", None)
        if callable(fn):
            # ops imports nothing above itself: an op whose cases need quantized weights
            # (quant_linear) takes the quantizer from here, above both ops and quant.
            import inspect
            if "quantize" in inspect.signature(fn).parameters:
                import functools
                from tinyserve.quant.formats import quantize_as
                fn = functools.partial(fn, quantize=quantize_as)
            found[name] = fn
    return found, errors


def time_call(fn, device, warmup_ms=25, rep_ms=100, repeats=5) -> dict:
    """Median seconds of ``fn()`` (see the module docstring for how)."""
    import torch
    fn()  # compile / autotune / allocate outside the measurement
    if device.type == "cuda":
        from triton.testing import do_bench
        torch.cuda.synchronize(device)
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return {"time_s": ms * 1e-3, "method": "do_bench median"}
    return {"time_s": statistics.median(time_calls(fn, repeats, warmup=0)),
            "method": f"perf_counter median of {repeats}"}


def _derive(entry: dict, case, roof: dict) -> dict:
    t = entry["time_s"]
    entry["time_us"] = t * 1e6
    entry["gb_s"] = case.bytes / t / 1e9
    entry["frac_bw"] = case.bytes / t / roof["copy_bandwidth_Bps"]
    if case.flops:
        entry["tflop_s"] = case.flops / t / 1e12
        entry["frac_matmul"] = case.flops / t / roof["matmul_flops_per_s"]
    return entry


def _record(case) -> dict:
    return {"op": case.op, "name": case.name, "bytes": case.bytes, "flops": case.flops,
            "ours": case.ours, "peers": list(case.peers), "meta": dict(case.meta), "impls": {}}


def run_case(case, device, roof: dict, args) -> dict:
    rec = _record(case)
    try:
        impls = case.setup()
    except Exception as e:
        rec["error"] = f"setup failed: {type(e).__name__}: {e}"
        return rec
    wanted = list(dict.fromkeys([case.ours, *case.peers, *impls]))
    for impl in wanted:
        if impl not in impls:
            why = ("not offered on this device (no triton, or CPU without TRITON_INTERPRET=1)"
                   if impl == "triton" else "not offered by the op's setup()")
            rec["impls"][impl] = {"skipped": why}
        elif impl == "triton" and device.type != "cuda":
            rec["impls"][impl] = {"skipped": CPU_TRITON_SKIP}
        else:
            try:
                t = time_call(impls[impl], device, args.warmup_ms, args.rep_ms, args.repeats)
                rec["impls"][impl] = _derive(t, case, roof)
            except Exception as e:  # one broken impl must not lose the others' numbers
                rec["impls"][impl] = {"error": f"{type(e).__name__}: {e}"[:500]}
    del impls
    if device.type == "cuda":
        free_memory(device)
    ours = rec["impls"].get(case.ours, {})
    if "time_s" in ours:
        ours["speedup"] = {p: rec["impls"][p]["time_s"] / ours["time_s"]
                           for p in case.peers if "time_s" in rec["impls"].get(p, {})}
    return rec


def run(args) -> dict:
    from . import roofline
    found, errors = discover(comma_list(args.ops, "ops") if args.ops else None)   # a bad
    device, env = start(args)                 # --ops fails before anything is logged
    small = args.small or device.type != "cuda"
    roof = roofline.measure(device)
    log(f"[ops] roofline: {roofline.describe(roof)}")
    budget = Budget(args.budget_s)
    cases, notes = [], []
    if device.type != "cuda":
        notes.append("triton implementations skipped: " + CPU_TRITON_SKIP)
    for op, bench_cases in found.items():
        try:
            op_cases = bench_cases(device, small=small)
        except Exception as e:
            errors[op] = f"bench_cases failed: {type(e).__name__}: {e}"
            continue
        for case in op_cases:
            if budget.spent():
                cases.append({**_record(case), "skipped": Budget.SKIPPED})
                continue
            log(f"[ops] {case.op}: {case.name}")
            cases.append(run_case(case, device, roof, args))
    result = {
        "suite": NAME,
        "env": env,
        "config": {"device": str(device), "small": small, "ops": list(found),
                   "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "repeats": args.repeats,
                   "budget_s": args.budget_s},
        "roofline": roof,
        "cases": cases,
        "op_errors": errors,
        "notes": notes,
    }
    return finish(result, args, report)


def report(result: dict) -> str:
    roof = result["roofline"]
    env = result["env"]
    rows = []
    for c in result["cases"]:
        if "skipped" in c or "error" in c:
            rows.append([c["op"], c["name"], "-", c.get("skipped") or c.get("error"),
                         "", "", "", ""])
            continue
        for impl, e in c["impls"].items():
            if "time_s" not in e:
                rows.append([c["op"], c["name"], impl, "skipped" if "skipped" in e else "error",
                             "", "", "", ""])
                continue
            sp = e.get("speedup")
            rows.append([c["op"], c["name"], impl, f"{e['time_us']:.1f}", f"{e['gb_s']:.1f}",
                         f"{100 * e['frac_bw']:.1f}%",
                         f"{e['tflop_s']:.2f}" if "tflop_s" in e else "-",
                         " ".join(f"{p}:{v:.2f}x" for p, v in sp.items()) if sp else ""])
    head = (f"ops on {env['gpu'] or env['cpu']} ({result['config']['device']}); roofline: "
            f"copy {roof['copy_bandwidth_Bps'] / 1e9:.1f} GB/s, matmul "
            f"{roof['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s")
    lines = [head, table(rows, ["op", "case", "impl", "us", "GB/s", "% copy bw", "TFLOP/s",
                                "speedup vs peer"])]
    for op, err in result.get("op_errors", {}).items():
        lines.append(f"{op}: {err}")
    lines += result.get("notes", [])
    return "\n".join(lines)
