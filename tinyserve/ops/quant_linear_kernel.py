"""The fused dequantize-and-multiply Triton kernel of ``quant_linear.py`` and its launcher.

One kernel serves every format (a constexpr FORMAT selects the decode math in ``_weight_tile``)
and both paths (launch shapes, not separate code):
    skinny (M <= 16, decode): ops/linear.py's split-K GEMV. BLOCK_M = 1 for one row
          (elementwise multiply-add, one reduction at the end), BLOCK_M = 16 for 2..16 rows
          (tl.dot, rows padded to one mma tile). K is split so enough programs are in flight.
    wide (M > 16, prefill): a tiled GEMM over (N tiles, M tiles), whole K per program, the
          weight tile dequantized to the activation dtype in registers before each tl.dot.
Every weight tile is produced as two halves [BLOCK_N, BLOCK_K/2] plus the K index of each
half's columns: for 4-bit formats these are the low and high nibbles of the same bytes (each
byte loaded once, split in registers; no interleaving shuffle of the weights), for 8-bit formats
simply the two halves of the tile. The consumer multiplies each half with the x columns it
holds (for int4/nf4, the even and odd columns: x is loaded contiguously and deinterleaved).
A tile never straddles a quantization group (BLOCK_K divides the group), so its scale (and
min) is one value per row: a [BLOCK_N] load per tile, not one per element. Integer codes become
floats by bit tricks (``_code_to_f32``), not by the slow int-to-float conversion unit.

Checked only offline, without a GPU: ``triton.compile`` (triton 3.9) of the autotune configs
below for sm_90 gives vectorized weight loads, but also register spills: small with bf16
activations (at most 76 bytes), large with fp32 activations. What they cost has not been
measured on a GPU. Speed is measured by ``python -m tinyserve.bench ops --ops quant_linear``.
"""
import functools

import torch

from ._dispatch import import_triton, interpreter_on
from .launch import dot_precision
from .linear import MAX_M, output_buffer, split_k_for
from .quant_linear_common import check_quant_linear_args, kernel_operands, quant_linear_ref

try:
    triton = import_triton()
    import triton.language as tl
    from .linear import splitk_reduce
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None


if triton is not None:
    @triton.jit
    def _fp16_at(p, mask):
        # GGUF keeps each block's fp16 scale inside the byte stream (a 20- or 34-byte block):
        # load its two bytes (little-endian) and reinterpret the 16 bits as an fp16.
        lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _code_to_f32(q):
        # Unsigned integer code (0..255) -> fp32 without an int-to-float conversion, which the
        # CUDA guide rates at 16 per clock per SM on sm_80/sm_90 (fp32 FMA: 64-128): at two per
        # byte it, not DRAM, would bound a 4-bit GEMV. Instead OR the code into the low mantissa
        # bits of 2^23 (0x4B000000), reinterpret as fp32 (= 2^23 + q exactly), subtract 2^23.
        return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _int8_to_f32(q):
        # Signed int8 -> fp32 the same way: flipping the sign bit maps -128..127 to 0..255
        # (q + 128), so the result is 2^23 + 128 + q; subtract both.
        u = q.to(tl.uint8, bitcast=True) ^ 0x80
        return (u.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _weight_tile(Q, S, Z, CB, rows, n_ok, k0, K, stride_qn, stride_sn,
                     FORMAT: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
        """The weight tile W[rows, k0 : k0 + BLOCK_K], dequantized to fp32, as two halves.

        -> (wa, wb, ka, kb): wa, wb [BLOCK_N, BLOCK_K // 2] and the K indices of their columns
        ka, kb [BLOCK_K // 2]. Row i of the tile is output feature rows[i] (int64)."""
        j = tl.arange(0, BLOCK_K // 2)
        q_row = Q + rows[:, None] * stride_qn                    # [BLOCK_N, 1] row starts
        row_ok = n_ok[:, None]
        if FORMAT == "int8":
            # 1 B per weight, contiguous along K; K need not be a multiple of anything (masked).
            ka = k0 + j
            kb = ka + BLOCK_K // 2
            qa = tl.load(q_row + ka[None, :], mask=row_ok & (ka < K)[None, :], other=0)
            qb = tl.load(q_row + kb[None, :], mask=row_ok & (kb < K)[None, :], other=0)
            s = tl.load(S + rows, mask=n_ok, other=0.0)[:, None]        # fp32 per row
            wa = _int8_to_f32(qa) * s
            wb = _int8_to_f32(qb) * s
        elif FORMAT == "int4" or FORMAT == "nf4":
            # BLOCK_K / 2 bytes per row, each read once: low nibble = element k0 + 2j,
            # high nibble = k0 + 2j + 1. Both lie in group k0 // GROUP (BLOCK_K divides GROUP).
            byte = tl.load(q_row + (k0 // 2 + j)[None, :], mask=row_ok, other=0)
            lo = byte & 0xF
            hi = byte >> 4
            ka = k0 + 2 * j
            kb = ka + 1
            g = k0 // GROUP
            s = tl.load(S + rows * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if FORMAT == "int4":
                m = tl.load(Z + rows * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                wa = _code_to_f32(lo) * s + m
                wb = _code_to_f32(hi) * s + m
            else:
                # NF4: the code indexes a 16-entry fp32 codebook (64 bytes, cache-resident).
                wa = tl.load(CB + lo.to(tl.int32)) * s
                wb = tl.load(CB + hi.to(tl.int32)) * s
        elif FORMAT == "q4_1":
            # One 20-byte block per tile: [d fp16][m fp16][16 B codes]; byte i of the codes holds
            # element i (low nibble) and element 16 + i (high nibble).
            tl.static_assert(BLOCK_K == 32)
            blk = q_row + (k0 // 32) * 20
            d = _fp16_at(blk, row_ok)
            m = _fp16_at(blk + 2, row_ok)
            byte = tl.load(blk + 4 + j[None, :], mask=row_ok, other=0)
            ka = k0 + j
            kb = ka + 16
            wa = _code_to_f32(byte & 0xF) * d + m
            wb = _code_to_f32(byte >> 4) * d + m
        else:
            # "q8_0": one 34-byte block per tile: [d fp16][32 x int8]; halves = elements 0..15
            # and 16..31, both scaled by the block's d.
            tl.static_assert(BLOCK_K == 32)
            blk = q_row + (k0 // 32) * 34
            d = _fp16_at(blk, row_ok)
            qa = tl.load(blk + 2 + j[None, :], mask=row_ok, other=0).to(tl.int8, bitcast=True)
            qb = tl.load(blk + 18 + j[None, :], mask=row_ok, other=0).to(tl.int8, bitcast=True)
            ka = k0 + j
            kb = ka + 16
            wa = _int8_to_f32(qa) * d
            wb = _int8_to_f32(qb) * d
        return wa, wb, ka, kb

    @triton.jit
    def _x_halves(x_rows, m_ok, k0, ka, kb, K, FORMAT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr):
        """x[rows, ka] and x[rows, kb], [BLOCK_M, BLOCK_K // 2]: the columns meeting wa and wb."""
        if FORMAT == "int4" or FORMAT == "nf4":
            # ka, kb interleave (even, odd k): load x[rows, k0 : k0 + BLOCK_K] contiguously
            # (wide, pipelined loads) and deinterleave in registers. Full tiles: K % BLOCK_K == 0.
            xk = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=m_ok[:, None],
                         other=0.0)
            xa, xb = tl.split(tl.reshape(xk, [BLOCK_M, BLOCK_K // 2, 2]))
        else:
            # Each half is a contiguous run of columns.
            xa = tl.load(x_rows + ka[None, :], mask=m_ok[:, None] & (ka < K)[None, :], other=0.0)
            xb = tl.load(x_rows + kb[None, :], mask=m_ok[:, None] & (kb < K)[None, :], other=0.0)
        return xa, xb

    @triton.jit
    def _quant_linear_kernel(X, Q, S, Z, CB, B, Y, WS, M, N, K, stride_xm, stride_qn, stride_sn,
                             stride_ym, K_PER_SPLIT, M_BUCKET,
                             FORMAT: tl.constexpr, GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
                             HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        # Program (pid_n, pid_k, pid_m) owns outputs [pid_m*BLOCK_M, +BLOCK_M) x
        # [pid_n*BLOCK_N, +BLOCK_N) over the K range [pid_k*K_PER_SPLIT, +K_PER_SPLIT).
        # Skinny launches: one M tile, SPLIT_K >= 1 (each packed byte read by one program).
        # Wide launches: SPLIT_K = 1, many M tiles (a weight tile is re-read per M tile, from L2).
        # M_BUCKET only keys the autotuner (prefill lengths vary; configs depend on their scale).
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        rows = offs_n.to(tl.int64)                        # int64: N * row bytes can pass 2^31
        x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        if BLOCK_M == 1:
            # One row of x: a plain GEMV, multiply-add elementwise in fp32 into a
            # [BLOCK_N, BLOCK_K/2] accumulator and reduce along K once at the end.
            acc2 = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                wa, wb, ka, kb = _weight_tile(Q, S, Z, CB, rows, n_ok, k0, K, stride_qn,
                                              stride_sn, FORMAT, GROUP, BLOCK_K)
                xa, xb = _x_halves(x_rows, m_ok, k0, ka, kb, K, FORMAT, BLOCK_M, BLOCK_K)
                acc2 += wa * xa.to(tl.float32) + wb * xb.to(tl.float32)   # [1, BK/2] broadcast
            acc = tl.sum(acc2, axis=1)[None, :]                  # [1, BLOCK_N]
        else:
            # 2+ rows: each half-tile meets the x columns it holds in tl.dot, the weights
            # dequantized to x's dtype first (as the reference does), fp32 accumulation.
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                wa, wb, ka, kb = _weight_tile(Q, S, Z, CB, rows, n_ok, k0, K, stride_qn,
                                              stride_sn, FORMAT, GROUP, BLOCK_K)
                xa, xb = _x_halves(x_rows, m_ok, k0, ka, kb, K, FORMAT, BLOCK_M, BLOCK_K)
                acc = tl.dot(xa, tl.trans(wa.to(xa.dtype)), acc, input_precision=PRECISION)
                acc = tl.dot(xb, tl.trans(wb.to(xb.dtype)), acc, input_precision=PRECISION)
        y_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :],
                     acc.to(Y.dtype.element_ty), mask=y_mask)
        else:
            # Partial sum -> workspace [SPLIT_K, M, N] fp32; linear.py's reduce kernel adds them
            # in a fixed order (deterministic) and applies the bias.
            tl.store(WS + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=y_mask)


# Under the interpreter: one small fixed config per path (fast tests) that still leaves ragged
# N, M and (int8) K edges, splits K 4 ways and puts several tiles in one int4/nf4 group.
_INTERP_SKINNY = dict(BLOCK_N=16, BLOCK_K=32, num_warps=4)
_INTERP_WIDE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, num_warps=4)
# On CUDA: autotuned, each list filtered to BLOCK_K <= the format's largest tile (its group).
# Compiled offline for sm_90 (triton 3.9), never on a GPU: they spill registers (module doc).
# Skinny (BLOCK_N, BLOCK_K, warps): 4-bit formats read BLOCK_K/2 bytes per row per tile, so
# tall tiles (many rows) keep enough bytes in flight per program when the group is small.
_GPU_SKINNY = [(64, 32, 4), (128, 32, 4), (256, 32, 4), (256, 32, 8), (512, 32, 8),
               (32, 64, 4), (64, 64, 4), (128, 64, 4), (128, 64, 8), (256, 64, 8),
               (32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 128, 8),
               (16, 256, 4), (32, 256, 4), (64, 256, 8)]
# Wide (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): ordinary GEMM tiles.
_GPU_WIDE = [(64, 64, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3),
             (128, 256, 32, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
             (64, 128, 64, 8, 3), (128, 128, 64, 8, 3)]


@functools.lru_cache(maxsize=None)
def _tuned(path: str, max_block_k: int):
    """The autotuned kernel for one path and one bound on BLOCK_K (-> (kernel, K alignment))."""
    if path == "skinny":
        cfgs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3)
                for bn, bk, w in _GPU_SKINNY if bk <= max_block_k]
    else:
        cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                              num_stages=s)
                for bm, bn, bk, w, s in _GPU_WIDE if bk <= max_block_k]
    align = max(c.kwargs["BLOCK_K"] for c in cfgs)
    kernel = triton.autotune(cfgs, key=["FORMAT", "GROUP", "BLOCK_M", "M_BUCKET", "N", "K",
                                        "SPLIT_K"])(_quant_linear_kernel)
    return kernel, align


def quant_linear_triton(x, qt, bias=None, out=None, split_k: int | None = None,
                        path: str | None = None):
    """Same result as ``quant_linear_ref``; ``out`` ([..., N], contiguous, x.dtype) receives y.

    ``path`` forces "skinny" (split-K GEMV, any M in tiles of 16 rows) or "wide" (tiled GEMM);
    by default M <= 16 is skinny. ``split_k`` forces the skinny path's number of K splits.
    """
    if triton is None:
        raise RuntimeError("quant_linear: backend='triton' needs the triton package")
    N, K = check_quant_linear_args(x, qt, bias)
    fmt, group, max_bk, (q, s, z, cb), stride_qn, stride_sn = kernel_operands(qt, x.device)
    if any(t.device != x.device for t in (q, s, z, cb)) or (
            bias is not None and bias.device != x.device):
        raise ValueError(f"quant_linear: x ({x.device}), the quantized weight and bias must be "
                         f"on the same device")
    out = output_buffer(x, N, out, "quant_linear")
    M = out.numel() // N if N else 0
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.copy_(quant_linear_ref(x, qt, bias))
        return out
    path = path or ("skinny" if M <= MAX_M else "wide")
    if path not in ("skinny", "wide"):
        raise ValueError(f"quant_linear: path must be 'skinny' or 'wide', got {path!r}")
    x2 = x.reshape(M, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y2 = out.view(M, N)
    b = bias.contiguous() if bias is not None else y2       # dummy pointer: HAS_BIAS=False
    on_gpu = x.is_cuda and not interpreter_on()
    meta = dict(FORMAT=fmt, GROUP=group, HAS_BIAS=bias is not None,
                PRECISION=dot_precision(x.dtype))
    m_bucket = min(triton.next_power_of_2(M), 4096)
    if path == "skinny":
        kernel, align = _tuned("skinny", max_bk) if on_gpu else (None, _INTERP_SKINNY["BLOCK_K"])
        split = split_k if split_k is not None else split_k_for(N, K, x.device, align)
        # Whole K tiles per split (so no tile crosses a split or a group); drop empty splits.
        k_per_split = triton.cdiv(triton.cdiv(K, max(1, split)), align) * align
        split = triton.cdiv(K, k_per_split)
        ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 \
            else y2
        block_m = 1 if M == 1 else 16
        args = (x2, q, s, z, cb, b, y2, ws, M, N, K, x2.stride(0), stride_qn, stride_sn,
                y2.stride(0), k_per_split, m_bucket)
        meta.update(SPLIT_K=split, BLOCK_M=block_m)
        grid_m = triton.cdiv(M, block_m)
        if on_gpu:
            kernel[lambda c: (triton.cdiv(N, c["BLOCK_N"]), split, grid_m)](*args, **meta)
        else:
            grid = (triton.cdiv(N, _INTERP_SKINNY["BLOCK_N"]), split, grid_m)
            _quant_linear_kernel[grid](*args, **meta, **_INTERP_SKINNY)
        if split > 1:
            splitk_reduce(ws, bias, y2, split)
    else:
        args = (x2, q, s, z, cb, b, y2, y2, M, N, K, x2.stride(0), stride_qn, stride_sn,
                y2.stride(0), K, m_bucket)
        meta.update(SPLIT_K=1)
        if on_gpu:
            kernel, _ = _tuned("wide", max_bk)
            kernel[lambda c: (triton.cdiv(N, c["BLOCK_N"]), 1, triton.cdiv(M, c["BLOCK_M"]))](
                *args, **meta)
        else:
            cfg = _INTERP_WIDE
            grid = (triton.cdiv(N, cfg["BLOCK_N"]), 1, triton.cdiv(M, cfg["BLOCK_M"]))
            _quant_linear_kernel[grid](*args, **meta, **cfg)
    return out
