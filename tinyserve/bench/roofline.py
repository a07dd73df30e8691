"""Suite ``roofline``: the two physical limits every other number is a fraction of.

    python -m tinyserve.bench roofline [--device auto]

    copy bandwidth   dst.copy_(src) of one large buffer (2 GiB on CUDA, 256 MiB on CPU), counted
                     as bytes read + bytes written. A plain copy is the fastest a real kernel
                     streams DRAM, so it is the practical bandwidth ceiling (the datasheet
                     number is not reachable). Best of several runs.
    matmul rate      torch.matmul of two square matrices (8192^3 bf16 on CUDA, cuBLAS; 1024^3
                     fp32 on CPU): the compute ceiling. Best of several runs.

On CUDA each number comes from ``triton.testing.do_bench`` (CUDA events, L2 flushed between
runs); on CPU from a wall-clock timer. ``measure(device)`` caches its result per process, so
the ops and decode suites of one run share one measurement.
"""
from __future__ import annotations

from .common import log, resolve_device, start, table, time_calls

NAME = "roofline"
HELP = "measured copy bandwidth and matmul rate of this device (the ceilings)"
COMMON = ("device", "threads")
_CACHE: dict = {}


def add_arguments(p) -> None:
    p.add_argument("--copy-mib", type=int, default=None,
                   help="copy buffer size in MiB (default: 2048 on CUDA, 256 on CPU)")


def best_seconds(fn, device, repeats: int = 5, warmup: int = 1) -> float:
    """Fastest of ``repeats`` calls: do_bench (min) on CUDA, perf_counter on CPU."""
    import torch
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench
        fn()
        torch.cuda.synchronize(device)
        return do_bench(fn, warmup=25, rep=200, return_mode="min") * 1e-3   # ms -> s
    return min(time_calls(fn, repeats, warmup))


def measure(device="auto", copy_mib: int | None = None) -> dict:
    """{copy_bandwidth_Bps, matmul_flops_per_s, ...} for ``device``, measured once per process."""
    import torch
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    cuda = dev.type == "cuda"
    mib = copy_mib or (2048 if cuda else 256)
    key = (str(dev), mib, None if cuda else torch.get_num_threads())
    if key in _CACHE:
        return dict(_CACHE[key])
    log(f"[roofline] copy {mib} MiB and matmul on {dev} ...")

    n_bytes = mib * 2**20
    src = torch.empty(n_bytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    copy_s = best_seconds(lambda: dst.copy_(src), dev, repeats=5)
    del src, dst

    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    mm_s = best_seconds(lambda: torch.matmul(a, b), dev, repeats=3)
    del a, b
    if cuda:
        torch.cuda.empty_cache()

    res = {
        "device": str(dev),
        "torch_threads": None if cuda else torch.get_num_threads(),
        "method": "triton.testing.do_bench, min (CUDA events, L2 flushed)" if cuda
                  else "perf_counter, min of repeats",
        "copy_buffer_bytes": n_bytes,
        "copy_bytes_moved": 2 * n_bytes,           # read src + write dst
        "copy_s": copy_s,
        "copy_bandwidth_Bps": 2 * n_bytes / copy_s,
        "matmul_n": n,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_s": mm_s,
        "matmul_flops_per_s": 2 * n**3 / mm_s,
    }
    _CACHE[key] = res
    return dict(res)


def describe(r: dict) -> str:
    return (f"copy {r['copy_bandwidth_Bps'] / 1e9:.1f} GB/s (read+write), "
            f"matmul {r['matmul_n']}^3 {r['matmul_dtype']} {r['matmul_flops_per_s'] / 1e12:.2f} "
            f"TFLOP/s")


def run(args) -> dict:
    dev, env = start(args)
    r = measure(dev, args.copy_mib)
    print(f"roofline on {env['gpu'] or env['cpu']} ({dev})")
    print(table([["copy bandwidth", f"{r['copy_bandwidth_Bps'] / 1e9:.1f} GB/s",
                  f"{r['copy_buffer_bytes'] / 2**20:.0f} MiB buffer, read + write"],
                 ["matmul", f"{r['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s",
                  f"{r['matmul_n']}^3 {r['matmul_dtype']}"]], ["", "best", "how"]))
    return {"suite": NAME, "env": env, "roofline": r}
