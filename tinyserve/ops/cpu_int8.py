"""y = x @ W^T on the CPU from int8 weights with one scale per output row, through PyTorch's
int8 CPU kernel (``torch.ops.aten._weight_int8pack_mm``): w[n, k] = q[n, k] * scale[n].

Why per row: the kernel takes one scale per output feature, not per block. GGUF's Q8_0 stores
one fp16 scale d per block of 32 (w = d q, q in -127..127), so it cannot be held exactly:
``pack_q8_0`` requantizes each row to its largest |w| / 127. That rounds every weight a second
time (|dw| <= row_max / 254, against block_max / 254 in the file); the model that uses it
measures what that costs (quant/cpu_native.py, notebook 03). Bytes per weight read: 1 + 2/K
(the bf16 row scale), against 34/32 in Q8_0 and 4 for the dequantized fp32 weight.

The same per-row layout serves an embedding table: row v of ``W`` is token v's vector, so a
lookup is ``q[ids] * scale[ids]``, exact with respect to the int8 weights (one copy of the
table for the tied embedding and LM head).

Private aten op, so ``int8pack_available()`` probes it once (and checks the convention), and
``pack_*`` raise ``Int8PackUnavailable`` to let the caller fall back to dequantized weights.
Activations: fp32 (exact in fp32, but a scalar loop on many CPUs) or bf16 (vectorized; the
product comes back rounded to bf16) -- the scales are stored in the compute dtype.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .cpu_int4 import require_kernel

__all__ = ["Int8PackUnavailable", "Int8PackedWeight", "int8pack_available", "pack_int8_rows",
           "pack_q8_0"]

_PACK_ROWS = 4096   # rows requantized at a time: bounds the fp32 transient (4 B x rows x K)


class Int8PackUnavailable(RuntimeError):
    """This torch lacks a working int8 CPU kernel: use the dequantized weights instead."""


@functools.lru_cache(maxsize=None)
def _mm():
    return torch.ops.aten._weight_int8pack_mm


@functools.lru_cache(maxsize=None)
def int8pack_available() -> bool:
    """Whether the op exists and computes x @ (q * scale[:, None])^T (a tiny probe, run once).
    Integer x, q and power-of-two scales keep every sum exact in fp32."""
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(-127, 128, (16, 64), generator=g, dtype=torch.int8)
        s = 2.0 ** torch.randint(-4, 2, (16,), generator=g).float()
        x = torch.randint(-2, 3, (3, 64), generator=g).float()
        ref = x @ (q.float() * s[:, None]).T
        yb = _mm()(x.bfloat16(), q, s.bfloat16()).float()
        return bool(torch.equal(_mm()(x, q, s), ref)
                    and torch.allclose(yb, ref, rtol=2.0 ** -8, atol=0))
    except Exception:   # missing op or changed signature: not usable
        return False


@dataclass(eq=False)
class Int8PackedWeight:
    """q int8 [N, K] and scale [N] in the compute dtype: w = q * scale[:, None]."""
    q: torch.Tensor
    scale: torch.Tensor

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x @ W^T [..., N] in x's dtype, computed in ``compute_dtype``."""
        K, N = self.in_features, self.out_features
        if x.dtype == self.compute_dtype and x.dim() == 2 and x.shape[1] == K and x.shape[0] \
                and x.is_contiguous():
            return _mm()(x, self.q, self.scale)             # decode's case: one op
        if x.shape[-1] != K:
            raise ValueError(f"int8 linear: x {tuple(x.shape)} does not end in K={K}")
        x2 = x.reshape(-1, K).to(self.compute_dtype).contiguous()
        if x2.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], N)
        return _mm()(x2, self.q, self.scale).to(x.dtype).view(*x.shape[:-1], N)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` ([...] int) -> [..., K] in the compute dtype."""
        return self.q[ids].to(self.compute_dtype) * self.scale[ids, None]

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]


def pack_int8_rows(rows, N: int, compute_dtype: torch.dtype = torch.bfloat16):
    """Requantize a weight to int8 with one scale per row. ``rows(i, j)`` returns rows i..j-1
    as fp32 [j - i, K] (so a large table is decoded a slice at a time)."""
    require_kernel(int8pack_available(), Int8PackUnavailable, "_weight_int8pack_mm", "int8",
                   compute_dtype)
    q, scale = None, torch.empty(N)
    for i in range(0, N, _PACK_ROWS):
        j = min(i + _PACK_ROWS, N)
        w = rows(i, j)
        if q is None:   # filled in place: no list of slices, no concatenated second copy
            q = torch.empty(N, w.shape[1], dtype=torch.int8)
        # The scale is stored in compute_dtype: round it first and divide by the stored
        # value, so q * scale reproduces w as well as the stored scale allows.
        s = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        s = s.to(compute_dtype).float()
        q[i:j] = (w / s[:, None]).round_().clamp_(-127, 127)
        scale[i:j] = s
    return Int8PackedWeight(q, scale.to(compute_dtype))


def pack_q8_0(pt, compute_dtype: torch.dtype = torch.bfloat16) -> Int8PackedWeight:
    """A GGUF tensor (``weights.gguf_blocks.PackedTensor``, any format it dequantizes, 2-D)
    -> Int8PackedWeight, requantized per row (see the module docstring for what it costs)."""
    if len(pt.shape) != 2:
        raise ValueError(f"pack_q8_0: tensor {pt.name!r} has shape {pt.shape}, expected 2-D")
    N, K = pt.shape
    data = pt.data.reshape(N, -1)
    sub = type(pt)

    def rows(i, j):
        return sub(pt.name, pt.qtype, (j - i, K), data[i:j]).dequantize(torch.float32)
    return pack_int8_rows(rows, N, compute_dtype)
