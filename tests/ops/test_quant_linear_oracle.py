"""quant_linear (reference and fused kernel) and the formats' dequantizers against a
dequantization written here from the layouts as documented (nibble order, GGUF block bytes,
NF4 derived from normal quantiles), followed by an fp64 matmul.

Bound: each dequantized weight q*s (+ m) costs two fp32 roundings of |q s| + |m| ("mag"); the
reference then rounds W to x's dtype (u |w|), and every path sums K + 1 exact products in fp32
(Higham's gamma_n) and rounds y to the dtype once.
"""
import importlib

import numpy as np
import pytest
import torch

from tinyserve.quant import formats
from _oracle import DEV, U32, unit, within

qcommon = importlib.import_module("tinyserve.ops.quant_linear_common")
qkernel = importlib.import_module("tinyserve.ops.quant_linear_kernel")
N = 19


def nf4_codebook():
    """QLoRA's NF4 (bitsandbytes ``create_normal_map(0.9677083, use_extra_value=True)``): 8
    positive and 7 negative quantiles of N(0, 1) at evenly spaced probabilities from 0.9677083
    to 0.5 (exclusive), an exact 0, scaled to [-1, 1]. fp64."""
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    cb = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return cb / cb.max()


# bitsandbytes' table holds these quantiles computed from fp32 probabilities: within 2e-7.
NF4_TABLE_ERR = 2e-7


def nibbles(packed):
    """uint8 [N, K/2] -> codes [N, K]: element 2j is the low nibble of byte j, 2j+1 the high."""
    p = packed.cpu().long()
    out = torch.empty(p.shape[0], 2 * p.shape[1], dtype=torch.long)
    out[:, 0::2], out[:, 1::2] = p % 16, p // 16
    return out


def gguf_blocks(qt):
    """llama.cpp blocks of 32, parsed from the raw bytes with numpy (little-endian fp16 d, m)
    -> (W, |d q| + |m|) fp64 [N, K]."""
    Nr, K = qt.shape
    raw = qt.data.cpu().numpy().reshape(Nr, K // 32, qt.bytes_per_block)
    d = raw[..., 0:2].copy().view("<f2").astype(np.float64)             # [N, K/32, 1]
    if qt.qtype == "Q8_0":
        q = raw[..., 2:34].copy().view(np.int8).astype(np.float64)     # [N, K/32, 32]
        m = np.zeros_like(d)
    else:   # Q4_1: d, m, then 16 bytes: element i in the low nibble of byte i, i+16 the high
        m = raw[..., 2:4].copy().view("<f2").astype(np.float64)
        qs = raw[..., 4:20]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float64)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).reshape(Nr, K)
    return t(d * q + m), t(np.abs(d * q) + np.abs(m))


def dequant(qt):
    """-> (W, mag, err) fp64 [N, K]: the weight, |q s| + |m|, and how far an fp32 dequantizer
    may be from W (two fp32 roundings of mag, plus NF4's table precision)."""
    if qt.format == "int8":
        qs = qt.qweight.cpu().double() * qt.scale.cpu().double()[:, None]
        W, mag = qs, qs.abs()
    elif qt.format == "int4":
        g = qt.group_size
        qs = nibbles(qt.qweight).double() * qt.scales.cpu().double().repeat_interleave(g, 1)
        m = qt.mins.cpu().double().repeat_interleave(g, 1)
        W, mag = qs + m, qs.abs() + m.abs()
    elif qt.format == "nf4":
        a = qt.absmax.cpu().double().repeat_interleave(qt.block_size, 1)
        W = nf4_codebook()[nibbles(qt.qweight)] * a
        return W, W.abs(), 2 * U32 * W.abs() + NF4_TABLE_ERR * a
    else:
        W, mag = gguf_blocks(qt)
    return W, mag, 2 * U32 * mag


FORMATS = ["int8", "int4-g32", "int4-g128", "nf4", "nf4-dq", "gguf-Q4_1", "gguf-Q8_0"]


def make(fmt, K=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    if fmt == "int8":
        return formats.quantize_int8(w)
    if fmt.startswith("int4"):
        return formats.quantize_int4(w, group_size=int(fmt.split("-g")[1]))
    if fmt.startswith("nf4"):
        return formats.quantize_nf4(w, double_quant=fmt.endswith("-dq"))
    return formats.quantize_gguf(w, fmt.split("-")[1])


def test_nf4_codebook_is_the_normal_quantiles():
    within("NF4 table", formats.NF4_CODEBOOK, nf4_codebook(), NF4_TABLE_ERR)


def test_double_quantized_absmax_decodes_from_its_codes():
    """absmax (what the kernel reads) = int8 code * scale of its block of 256 + offset."""
    qt = make("nf4-dq", K=256)
    codes = qt.absmax_q.double().view(-1, formats.DQ_BLOCK_SIZE)
    flat = (codes * qt.absmax_scale.double()[:, None]).flatten() + qt.absmax_offset.double()
    exact = flat[:qt.absmax.numel()].view(qt.absmax.shape)
    within("absmax", qt.absmax, exact, unit(torch.float16) * exact.abs() + 4 * U32 * exact.abs())


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_the_layout(fmt):
    qt = make(fmt, K=123 if fmt == "int8" else 128)
    W, _, err = dequant(qt)
    within(f"{fmt} dequantize", qt.dequantize(torch.float32), W, err)


def oracle_and_bound(x, qt, bias, rounds_w):
    """fp64 y = x W^T + b, and its bound; ``rounds_w``: the path rounds W to x's dtype."""
    W, mag, err = dequant(qt)
    K = W.shape[1]
    xd = x.double().cpu().reshape(-1, K)
    w_err = err + (unit(x.dtype) * mag if rounds_w else 0)       # per weight, as multiplied
    exact = xd @ W.T
    allowed = xd.abs() @ w_err.T + (K + 1) * U32 * (xd.abs() @ (mag + w_err).T)
    if bias is not None:
        exact = exact + bias.double().cpu()
        allowed = allowed + (K + 1) * U32 * bias.double().cpu().abs()
    return exact, allowed


# Each format's kernel once, the three launch paths spread over them (M=1: one-row GEMV;
# M=3: skinny tl.dot; M=20: wide tiled GEMM), fp16 where tl.dot is reliable in the interpreter.
KERNEL_CASES = [("int8", 1, torch.float32), ("int4-g32", 3, torch.float16),
                ("int4-g128", 20, torch.float32), ("nf4", 1, torch.float32),
                ("nf4-dq", 20, torch.float16), ("gguf-Q4_1", 3, torch.float32),
                ("gguf-Q8_0", 20, torch.float16)]


@pytest.mark.parametrize("fmt,M,dtype", [(f, 3, torch.float32) for f in FORMATS]
                         + [("int4-g32", 2, torch.float16), ("gguf-Q4_1", 2, torch.bfloat16)])
def test_reference_matches_oracle(fmt, M, dtype):
    K = 123 if fmt == "int8" else 128
    qt = make(fmt, K)
    g = torch.Generator().manual_seed(1)
    x, b = torch.randn(M, K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    exact, allowed = oracle_and_bound(x, qt, b, rounds_w=dtype != torch.float32)
    got = qcommon.quant_linear_ref(x, qt, b)
    within(f"ref {fmt} M={M} {dtype}", got, exact, allowed + unit(dtype) * exact.abs())


@pytest.mark.parametrize("fmt,M,dtype", KERNEL_CASES)
def test_kernel_matches_oracle(fmt, M, dtype):
    K = 123 if fmt == "int8" else 128
    qt = make(fmt, K, seed=2).to(DEV)
    g = torch.Generator().manual_seed(3)
    x, b = torch.randn(M, K, generator=g).to(DEV, dtype), torch.randn(N, generator=g).to(DEV)
    b = b.to(dtype)
    # the kernel rounds dequantized weights to x's dtype for tl.dot (M > 1), not for M = 1
    exact, allowed = oracle_and_bound(x, qt, b, rounds_w=dtype != torch.float32 and M > 1)
    got = qkernel.quant_linear_triton(x, qt, b).cpu()
    within(f"kernel {fmt} M={M} {dtype}", got, exact,
           allowed + unit(dtype, triton=True) * exact.abs())
