"""y = x @ W^T (+ b), W stored [out_features, in_features] as in PyTorch and HF checkpoints.

At decode, x has M = 1..16 rows (one per sequence in the batch) and the call is a GEMV: every
weight byte is read once and used for only M multiply-adds, so the time is N*K*elem_size bytes
over the memory bandwidth, flat in M. The kernel's job is therefore to read W exactly once, with
coalesced wide loads, from enough programs at once to keep every SM's loads in flight.
"""
import functools

import torch
import torch.nn.functional as F

from ._dispatch import check_backend, import_triton, interpreter_on, resolve
from .launch import dot_precision, sm_count
from .spec import BenchCase

try:
    triton = import_triton()
    import triton.language as tl
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None

MAX_M = 16          # rows the decode kernel takes; wider activations go to cuBLAS
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    # x: [..., K], weight: [N, K]. Reads N*K weight elements once per call: for decode
    # (1-16 rows of x) that weight traffic is the whole cost, which is why decode is memory-bound.
    # Also reads M*K of x (+ N of bias) and writes M*N: noise next to N*K while M << N, K.
    return F.linear(x, weight, bias)


if triton is not None:
    @triton.jit
    def _linear_splitk_kernel(X, W, B, Y, WS, M, N, K, stride_xm, stride_wn, stride_ym,
                              K_PER_SPLIT, M_PAD: tl.constexpr, SPLIT_K: tl.constexpr,
                              HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program (pid_n, pid_k) owns output features [pid_n*BLOCK_N, +BLOCK_N) and the K range
        # [pid_k*K_PER_SPLIT, +K_PER_SPLIT). It reads its BLOCK_N x K_PER_SPLIT slice of W once,
        # in [BLOCK_N, BLOCK_K] tiles contiguous along K (each weight row is a coalesced run),
        # and the matching M x K_PER_SPLIT slice of x (tiny, shared by all pid_n via L2).
        # The programs tile W exactly: each weight byte is read by exactly one program.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, M_PAD)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N
        m_ok = offs_m < M
        w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn   # int64: N*K can pass 2^31
        k_lo = pid_k * K_PER_SPLIT
        if M_PAD == 1:
            # One row of x: a plain GEMV. Multiply-add elementwise into a [BLOCK_N, BLOCK_K]
            # fp32 accumulator and reduce along K once at the end (no shuffles in the loop).
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
                k = k0 + offs_k
                k_ok = k < K
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                xv = tl.load(X + k, mask=k_ok, other=0.0)
                acc2 += w.to(tl.float32) * xv.to(tl.float32)[None, :]
            acc = tl.sum(acc2, axis=1)[None, :]                      # [1, BLOCK_N]
        else:
            # 2..16 rows: all of them (padded to one 16-row mma tile, padding rows masked so they
            # read nothing) meet each weight tile in tl.dot. The tensor cores idle 90% of the time
            # on a 16-row tile, but they are not the bottleneck: W's bytes are. tl.dot also lets
            # Triton pipeline the weight loads through shared memory (num_stages).
            acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
            x_rows = X + offs_m[:, None] * stride_xm
            for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
                k = k0 + offs_k
                k_ok = k < K
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                acc = tl.dot(xt, tl.trans(w), acc, input_precision=PRECISION)
        y_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            # Whole K in this program: finish here (bias, cast), no workspace, no second launch.
            if HAS_BIAS:
                acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :],
                     acc.to(Y.dtype.element_ty), mask=y_mask)
        else:
            # Partial sum over this K range -> workspace [SPLIT_K, M, N] fp32 (M*N*4 bytes).
            tl.store(WS + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=y_mask)

    @triton.jit
    def splitk_reduce_kernel(WS, B, Y, M, N, stride_ym, SPLIT_K: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # Sums the SPLIT_K partials of BLOCK outputs in a fixed order (deterministic, unlike
        # atomics): reads SPLIT_K*BLOCK*4 bytes (still in L2 from the first kernel), writes BLOCK.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M * N
        acc = tl.load(WS + offs, mask=ok, other=0.0)
        for s in range(1, SPLIT_K):
            acc += tl.load(WS + s * M * N + offs, mask=ok, other=0.0)
        m = offs // N
        n = offs % N
        if HAS_BIAS:
            acc += tl.load(B + n, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + m * stride_ym + n, acc.to(Y.dtype.element_ty), mask=ok)


def splitk_reduce(ws, bias, y2, split: int):
    """y2 [M, N] (+ bias, or None) = the sum of ws's ``split`` partials [split, M, N], in
    order."""
    M, N, BLOCK = y2.shape[0], y2.shape[1], 1024
    b = bias.contiguous() if bias is not None else y2   # dummy pointer: HAS_BIAS=False
    splitk_reduce_kernel[(triton.cdiv(M * N, BLOCK),)](
        ws, b, y2, M, N, y2.stride(0), SPLIT_K=split, HAS_BIAS=bias is not None,
        BLOCK=BLOCK, num_warps=4)


# Under the interpreter: one small fixed config (fast tests) that still splits K 4 ways and
# leaves ragged N and K edges, so both kernels and all masks are exercised.
_INTERP = dict(BLOCK_N=16, BLOCK_K=32, num_warps=4)
_INTERP_SPLIT_K = 4
# On CUDA: autotuned. Every config keeps the GEMV accumulator at <= 64 fp32 registers per
# thread (BLOCK_N*BLOCK_K <= 2048*num_warps) so M=1 does not spill.
_GPU_TILES = [(16, 128, 4), (16, 256, 4), (32, 64, 4), (32, 128, 4), (32, 256, 4), (64, 64, 4),
              (64, 128, 4), (128, 64, 4), (32, 256, 8), (64, 128, 8), (64, 256, 8),
              (128, 64, 8), (128, 128, 8), (256, 64, 8)]
_GPU_K_ALIGN = 256  # the largest BLOCK_K: each split is a whole number of K tiles for any config


@functools.lru_cache(maxsize=None)
def _tuned_kernel():
    # SPLIT_K is a function of (N, K, device) unless a caller forces it; keyed to be safe.
    return triton.autotune([triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                                          num_stages=3) for bn, bk, w in _GPU_TILES],
                           key=["M_PAD", "N", "K", "SPLIT_K"])(_linear_splitk_kernel)


def split_k_for(N: int, K: int, device: torch.device, align: int) -> int:
    """K splits so that >= 2 waves of programs exist even for N = 4096 (64 tiles of 64 rows)."""
    if device.type != "cuda":
        return _INTERP_SPLIT_K
    waves = 2 * sm_count(device)
    split = triton.next_power_of_2(triton.cdiv(waves, triton.cdiv(N, 64)))  # nominal BLOCK_N
    # Keep >= 2 aligned K tiles per program, or the loop is all prologue and epilogue.
    return max(1, min(split, K // (2 * align), 64))


def _check(x, weight, bias):
    if weight.dim() != 2:
        raise ValueError(f"linear: weight must be [N, K], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x must be [..., K] with K = weight.shape[1] = "
                         f"{weight.shape[1]}, got x {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")


def output_buffer(x, N: int, out, op: str):
    """The [..., N] result in x's dtype: ``out`` checked (tests pass a poisoned one) or new."""
    out_shape = (*x.shape[:-1], N)
    if out is None:
        return torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != out_shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous {out_shape} {x.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    return out


def linear_triton(x, weight, bias=None, out=None, split_k: int | None = None):
    """Same signature and result as ``linear_ref``; ``out`` ([..., N], contiguous) receives y.

    ``split_k`` forces the number of K splits (tests, benchmarks); by default it is picked from
    N, K and the SM count. M > 16 rows is not decode: it goes to F.linear (cuBLAS on CUDA).
    """
    if triton is None:
        raise RuntimeError("linear: backend='triton' needs the triton package")
    _check(x, weight, bias)
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if len(dtypes) != 1 or x.dtype not in DTYPES:
        raise ValueError(f"linear: x, weight (and bias) must share one dtype of {DTYPES}, got "
                         f"{sorted(map(str, dtypes))}")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError("linear: x, weight and bias must be on the same device")
    K, N = weight.shape[1], weight.shape[0]
    out = output_buffer(x, N, out, "linear")
    M = out.numel() // N if N else 0
    if M > MAX_M or M == 0 or N == 0 or K == 0:
        out.copy_(F.linear(x, weight, bias))   # not a decode shape: cuBLAS does it well
        return out
    x2 = x.reshape(M, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()   # rows must be contiguous
    y2 = out.view(M, N)
    b = bias.contiguous() if bias is not None else y2   # dummy pointer: HAS_BIAS=False
    on_gpu = x.is_cuda and not interpreter_on()
    align = _GPU_K_ALIGN if on_gpu else _INTERP["BLOCK_K"]
    split = split_k if split_k is not None else split_k_for(N, K, x.device, align)
    # Round each split up to whole K tiles, then drop splits that would be empty.
    k_per_split = triton.cdiv(triton.cdiv(K, max(1, split)), align) * align
    split = triton.cdiv(K, k_per_split)
    ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else y2
    m_pad = 1 if M == 1 else 16
    args = (x2, w, b, y2, ws, M, N, K, x2.stride(0), w.stride(0), y2.stride(0), k_per_split)
    meta = dict(M_PAD=m_pad, SPLIT_K=split, HAS_BIAS=bias is not None,
                PRECISION=dot_precision(x.dtype))
    if on_gpu:
        _tuned_kernel()[lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), split)](*args, **meta)
    else:
        grid = (triton.cdiv(N, _INTERP["BLOCK_N"]), split)
        _linear_splitk_kernel[grid](*args, **meta, **_INTERP)
    if split > 1:
        splitk_reduce(ws, bias, y2, split)
    return out


def linear(x, weight, bias=None, backend="auto"):
    """y = x @ weight^T (+ bias). backend: ref | triton | auto.

    "auto" runs the Triton kernel only on CUDA and only for M <= 16 rows (decode); wider
    activations (prefill) are compute-bound GEMMs where cuBLAS, via F.linear, is already
    near the matmul roofline. "triton" forces the kernel (which itself hands M > 16 to F.linear).
    """
    check_backend(backend)
    _check(x, weight, bias)
    impl = resolve(backend, x)
    if backend == "auto" and (triton is None or x.numel() // max(1, x.shape[-1]) > MAX_M):
        impl = "ref"
    if impl == "triton":
        return linear_triton(x, weight, bias)
    return linear_ref(x, weight, bias)


LLAMA2_7B = (("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016),
             ("down", 11008, 4096))   # (projection, K, N), QKV and gate/up fused


def bench_cases(device, small: bool = False):
    """The four Llama-2-7B projections at M = 1 and 16 rows (bf16); tiny shapes when small."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if (dev.type == "cuda" or not small) else torch.float32
    shapes = (("tiny", 256, 384), ("tiny-odd", 200, 123)) if small else LLAMA2_7B
    has_triton = triton is not None and (dev.type == "cuda" or interpreter_on())
    esz = torch.empty((), dtype=dtype).element_size()
    cases = []
    for proj, K, N in shapes:
        for M in (1, 16):
            def setup(M=M, K=K, N=N):
                x = torch.randn(M, K, device=dev, dtype=dtype)
                w = torch.randn(N, K, device=dev, dtype=dtype) / K ** 0.5
                impls = {"ref": lambda: linear_ref(x, w), "cublas": lambda: F.linear(x, w)}
                if has_triton:
                    impls["triton"] = lambda: linear_triton(x, w)
                return impls
            moved = (N * K + M * K + M * N) * esz   # weight once, x in, y out
            cases.append(BenchCase(op="linear", name=f"{proj} M={M} K={K} N={N} "
                                   f"{str(dtype)[6:]}", setup=setup, bytes=moved,
                                   flops=2 * M * N * K, peers=("cublas", "ref"),
                                   meta={"proj": proj, "M": M, "K": K, "N": N}))
    return cases
