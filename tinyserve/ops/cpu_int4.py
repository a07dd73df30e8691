"""y = x @ W^T on the CPU straight from 4-bit weights, with PyTorch's int4 CPU kernel.

Decode on a CPU is memory-bound like on a GPU (see ops/linear.py): each token reads every weight
once. fp32 weights cost 4 bytes each; this kernel reads 0.5 byte (two 4-bit codes per byte) plus
one (scale, zero) pair per group of g weights along K: 2 x 4 B / 32 = 0.25 B/weight in fp32, or
0.125 B/weight in bf16, at g = 32. So bf16 mode moves 5 bits/weight (what the GGUF Q4_1 file
holds: 20 B per 32 weights) and fp32 mode 6, against 32 for the dequantized fp32 weight.

The kernel (``torch.ops.aten._weight_int4pack_mm_for_cpu``) computes, per group along K,
    w = (q - 8) * scale + zero,     q in 0..15,
so any asymmetric "w = q * s + min" format maps onto it with scale = s and zero = min + 8 s:
  - GGUF Q4_1 (blocks of 32: fp16 d, fp16 m, 16 bytes; byte i holds element i of the block in
    its low nibble and element i + 16 in its high nibble): w = d q + m -> scale d, zero m + 8d.
  - tinyserve's int4 (``quant.int_formats.Int4Weight``: element 2j in the low nibble of byte j,
    2j + 1 in the high one, fp16 scales and mins per group): scale s, zero min + 8s.
Exactness: in fp32 mode d, m, s are fp16 values, exact in fp32; (q-8)d is exact (15 significant
bits); the only roundings are zero = fl(m + 8d) and the final add, so each weight is within
2^-24 (|zero| + 2|w|) of the file's fl(d q + m), and in practice equal (tests/ops/test_cpu_int4.py).
bf16 mode is NOT exact: the kernel wants scales_and_zeros in the activation dtype, and bf16 keeps
8 significant bits, so scale and zero are rounded (|dw| <= 2^-8 (8|d| + |zero|)), x is rounded to
bf16 and y comes back in bf16. It is however the only vectorized path (fp32 and fp16
activations fall back to a scalar loop 20-40x slower, slower than fp32 F.linear), so the native
CPU model (quant/cpu_native.py) uses it; notebook 03 section 9b measures its cost in quality.
``compute_dtype`` picks the mode at pack time.

These are private aten ops: they may change or vanish between torch versions, so
``int4pack_available()`` probes them once (and checks the convention above numerically), and
every ``pack_*`` raises ``Int4PackUnavailable`` (catch it to fall back to the fp32 path).
Kernel constraints (torch 2.13): N % 16 == 0, group size in {32, 64, 128, 256}, K % group == 0,
x 2-D contiguous in the dtype of scales_and_zeros. ``linear`` handles the reshaping and casts.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Int4PackUnavailable", "Int4PackedWeight", "int4pack_available", "check_int4_shape",
           "pack_int4_codes", "pack_q4_1", "pack_int4_groupwise", "GROUP_SIZES", "N_MULTIPLE"]

GROUP_SIZES = (32, 64, 128, 256)   # what the kernel accepts as qGroupSize
N_MULTIPLE = 16                    # the packing wants N (output features) divisible by 16
INNER_K_TILES = 2                  # required by the op's signature; the CPU packing ignores it
_PACK_ROWS = 4096                  # rows packed at a time: the op wants int32 codes (4 B/weight),
#                                    so chunking bounds that transient copy (113 MB for the LM head)
Q4_1_BLOCK, Q4_1_BYTES = 32, 20


class Int4PackUnavailable(RuntimeError):
    """This torch lacks a working int4 CPU kernel: use the dequantized (fp32) path instead."""


@functools.lru_cache(maxsize=None)   # looking ops up costs microseconds per call at decode
def _ops():
    return (torch.ops.aten._convert_weight_to_int4pack_for_cpu,
            torch.ops.aten._weight_int4pack_mm_for_cpu)


@functools.lru_cache(maxsize=None)
def int4pack_available() -> bool:
    """Whether both private ops exist AND compute w = (q - 8) scale + zero, in fp32 and bf16
    (a tiny probe, run once)."""
    try:
        convert, mm = _ops()
        # Values on coarse binary grids (x in {-1, 0, 1}, scales k/4, zeros k/2): every product
        # and partial sum is exact in fp32 whatever the summation order, so fp32 must match
        # bit for bit and bf16 within the rounding of its output (2^-8 relative).
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (N_MULTIPLE, 64), generator=g, dtype=torch.int32)
        sz = torch.stack([torch.randint(1, 5, (2, N_MULTIPLE), generator=g) / 4,
                          torch.randint(-4, 5, (2, N_MULTIPLE), generator=g) / 2], dim=-1)
        x = torch.randint(-1, 2, (3, 64), generator=g).float()
        w = ((q.float() - 8).view(N_MULTIPLE, 2, 32) * sz[..., 0].T[..., None]
             + sz[..., 1].T[..., None]).view(N_MULTIPLE, 64)
        packed = convert(q, INNER_K_TILES)
        y = mm(x, packed, 32, sz)
        yb = mm(x.bfloat16(), packed, 32, sz.bfloat16()).float()   # codes() uses bf16
        return bool(torch.equal(y, x @ w.T)
                    and torch.allclose(yb, x @ w.T, rtol=2.0 ** -8, atol=0))
    except Exception:   # missing op, changed signature or convention: all mean "not usable"
        return False


def require_kernel(available: bool, error: type, op: str, what: str, compute_dtype) -> None:
    """Before packing for one of these private CPU kernels (int4 here, int8 in ``cpu_int8``):
    ``error`` unless the op works in this torch, ValueError unless it takes ``compute_dtype``."""
    if not available:
        raise error(f"torch {torch.__version__} has no working aten.{op}: use the "
                    f"dequantized weights")
    if compute_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{what} CPU kernel: compute_dtype must be float32 or bfloat16, "
                         f"got {compute_dtype}")


def check_int4_shape(N: int, K: int, group_size: int) -> None:
    """Raise ValueError (naming the shape) unless the kernel accepts an [N, K] weight."""
    where = f"int4 CPU kernel: weight [N={N}, K={K}], group size {group_size}"
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{where}: group size must be one of {GROUP_SIZES}")
    if N <= 0 or N % N_MULTIPLE:
        raise ValueError(f"{where}: N (out features) must be a positive multiple of {N_MULTIPLE}")
    if K <= 0 or K % group_size:
        raise ValueError(f"{where}: K (in features) must be a positive multiple of {group_size}")


@dataclass(eq=False)
class Int4PackedWeight:
    """An [out_features, in_features] weight in the kernel's layout.

    packed            uint8 [N, K/2], the op's private nibble layout (only the op reads it).
    scales_and_zeros  [K/g, N, 2] in the compute dtype (float32 or bfloat16): [..., 0] = scale,
                      [..., 1] = zero, w = (q - 8) * scale + zero.
    """
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    out_features: int
    in_features: int

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] (any float dtype) -> x @ W^T [..., N] in x's dtype; computed in
        ``compute_dtype`` (x is cast to it, the result cast back)."""
        K, N = self.in_features, self.out_features
        if x.dtype == self.compute_dtype and x.dim() == 2 and x.shape[1] == K \
                and x.shape[0] and x.is_contiguous():   # decode's common case: one op, ~us count
            return _ops()[1](x, self.packed, self.group_size, self.scales_and_zeros)
        if x.shape[-1] != K:
            raise ValueError(f"int4 linear: x {tuple(x.shape)} does not end in K={K}")
        x2 = x.reshape(-1, K)
        if x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        if x2.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], N)
        y = _ops()[1](x2.contiguous(), self.packed, self.group_size, self.scales_and_zeros)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], N)

    def codes(self) -> torch.Tensor:
        """The 4-bit codes, uint8 [N, K], recovered through the kernel itself (its layout is
        private): with scale 1 and zero 8 it returns q exactly, and x = I picks W^T (every
        product but one is q * 0 = 0; integers <= 15 are exact in bf16, the fast mode)."""
        K, N = self.in_features, self.out_features
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).expand(K // self.group_size, N, 2)
        eye = torch.eye(K, dtype=torch.bfloat16)
        q = _ops()[1](eye, self.packed, self.group_size, unit.contiguous())   # [K, N] = q^T
        return q.T.round().to(torch.uint8).contiguous()

    def dequantize(self) -> torch.Tensor:
        """The fp32 [N, K] weight the kernel multiplies by: (q - 8) * scale + zero, in fp32 with
        the (widened) scales and zeros it holds. Costs one [K x K] call: tests and references."""
        N, K, g = self.out_features, self.in_features, self.group_size
        sz = self.scales_and_zeros.float()
        q = (self.codes().float() - 8).view(N, K // g, g)
        return (q * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]).view(N, K)


def pack_int4_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    group_size: int,
                    compute_dtype: torch.dtype = torch.float32) -> Int4PackedWeight:
    """codes uint8 [N, K] in 0..15, scale and zero [N, K/g] (w = (q - 8) scale + zero) ->
    Int4PackedWeight. The common step under ``pack_q4_1`` and ``pack_int4_groupwise``."""
    require_kernel(int4pack_available(), Int4PackUnavailable, "_weight_int4pack_mm_for_cpu",
                   "int4", compute_dtype)
    N, K = codes.shape
    check_int4_shape(N, K, group_size)
    if codes.dtype != torch.uint8 or int(codes.max()) > 15:   # the op would silently wrap
        raise ValueError(f"int4 CPU kernel: codes for [N={N}, K={K}] must be uint8 in 0..15")
    if tuple(scale.shape) != (N, K // group_size) or tuple(zero.shape) != tuple(scale.shape):
        raise ValueError(f"int4 CPU kernel: weight [N={N}, K={K}] with group {group_size} needs "
                         f"scale and zero of shape {(N, K // group_size)}, got "
                         f"{tuple(scale.shape)} and {tuple(zero.shape)}")
    convert = _ops()[0]
    packed = torch.cat([convert(codes[i:i + _PACK_ROWS].to(torch.int32).contiguous(), INNER_K_TILES)
                        for i in range(0, N, _PACK_ROWS)])   # it packs 64-row tiles: 4096 is 64 of them
    sz = torch.stack([scale.T, zero.T], dim=-1).to(compute_dtype).contiguous()   # [K/g, N, 2]
    return Int4PackedWeight(packed, sz, group_size, N, K)


def _zero_from_min(scale16: torch.Tensor, min16: torch.Tensor) -> torch.Tensor:
    """zero = min + 8 scale in fp32 (8 scale is exact; one rounding at most)."""
    return min16.float() + 8 * scale16.float()


def pack_q4_1(blocks, shape=None, compute_dtype: torch.dtype = torch.float32) -> Int4PackedWeight:
    """GGUF Q4_1 -> Int4PackedWeight: scale = d, zero = m + 8d, group 32.

    ``blocks``: a ``weights.gguf_blocks.PackedTensor`` / ``quant.gguf_format.GGUFWeight`` (with
    ``qtype``, ``shape``, ``data``), or the raw bytes (numpy or torch uint8, [N, K/32 * 20] or
    flat) with ``shape=(N, K)``."""
    if hasattr(blocks, "qtype"):
        if blocks.qtype != "Q4_1":
            raise ValueError(f"pack_q4_1: tensor {getattr(blocks, 'name', '?')!r} is "
                             f"{blocks.qtype}, not Q4_1")
        shape, blocks = blocks.shape, blocks.data
    if shape is None or len(shape) != 2:
        raise ValueError(f"pack_q4_1: need a 2-D shape (N, K), got {shape}")
    N, K = (int(s) for s in shape)
    check_int4_shape(N, K, Q4_1_BLOCK)
    raw = blocks if isinstance(blocks, torch.Tensor) else torch.from_numpy(np.array(blocks))
    if raw.dtype != torch.uint8 or raw.numel() != N * K // Q4_1_BLOCK * Q4_1_BYTES:
        raise ValueError(f"pack_q4_1: weight [N={N}, K={K}] needs {N * K // 32 * 20} uint8 "
                         f"bytes, got {raw.dtype} {tuple(raw.shape)}")
    raw = raw.reshape(N, K // Q4_1_BLOCK, Q4_1_BYTES)
    d = raw[..., 0:2].contiguous().view(torch.float16)[..., 0]        # [N, K/32]
    m = raw[..., 2:4].contiguous().view(torch.float16)[..., 0]
    qs = raw[..., 4:].contiguous()   # [N, K/32, 16]; bit ops on the strided view are ~50x slower
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(N, K)     # low nibbles = 0..15
    return pack_int4_codes(codes, d.float(), _zero_from_min(d, m), Q4_1_BLOCK, compute_dtype)


def pack_int4_groupwise(qweight, scales=None, mins=None, group_size=None,
                        compute_dtype: torch.dtype = torch.float32) -> Int4PackedWeight:
    """tinyserve's int4 (w = q * s + min, q 0..15 in group g along K) -> Int4PackedWeight:
    scale = s, zero = min + 8s. Pass an ``Int4Weight`` (``qweight``, ``scales``, ``mins``,
    ``group_size``) or those four. qweight uint8 [N, K/2]: element 2j low nibble of byte j."""
    if hasattr(qweight, "qweight"):
        qweight, scales, mins, group_size = (qweight.qweight, qweight.scales, qweight.mins,
                                             qweight.group_size)
    if scales is None or mins is None or group_size is None:
        raise ValueError("pack_int4_groupwise: need qweight, scales, mins and group_size")
    N, K = qweight.shape[0], qweight.shape[1] * 2
    check_int4_shape(N, K, group_size)
    codes = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(N, K)
    return pack_int4_codes(codes, scales.float(), _zero_from_min(scales, mins), group_size,
                           compute_dtype)
