"""The integer formats: int8 (symmetric, one scale per output channel) and int4 (asymmetric
round-to-nearest, groups along K), with the generic unpacked group quantizer behind int4
(``quantize_asym_codes``, also GPTQ's grid) and its any-width twin ``fake_quantize_asym``.

Layouts and bits per weight: see the table in ``tinyserve.quant.formats``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .quantized_weight import (QuantizedWeight, check_bits, check_divides, check_weight,
                               fp16_round, pack_nibbles, unpack_nibbles)

INT4_GROUP_SIZES = (32, 64, 128)
FAKE_BITS = range(2, 9)      # widths the generic (unpacked) group quantizer accepts


# ---- int8: symmetric, one scale per output channel -----------------------------------------
@dataclass(eq=False, repr=False)
class Int8Weight(QuantizedWeight):
    """W[n, k] ~= qweight[n, k] * scale[n].

    qweight int8 [N, K]: one byte per weight, rows = output features, codes in [-127, 127]
            (-128 is never produced, so the grid is symmetric around an exact zero).
    scale   float32 [N]: absmax(row) / 127 (1.0 for an all-zero row).
    """
    qweight: torch.Tensor
    scale: torch.Tensor
    format: ClassVar[str] = "int8"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.float() * self.scale.float()[:, None]).to(dtype)


def quantize_int8(w: torch.Tensor, bits: int = 8) -> Int8Weight:
    """Round to nearest on a per-row grid of step absmax/127: |error| <= scale/2 per element."""
    check_bits(bits, (8,), "int8")
    w = check_weight(w)
    absmax = w.abs().amax(dim=1)                                          # [N]
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def dequantize_int8(qt: Int8Weight, dtype=torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)


# ---- int4: asymmetric, group-wise along K ---------------------------------------------------
@dataclass(eq=False, repr=False)
class Int4Weight(QuantizedWeight):
    """W[n, k] ~= q[n, k] * scales[n, k // g] + mins[n, k // g], q in 0..15.

    qweight uint8 [N, K/2]: two codes per byte, k = 2j in the low nibble of byte j, k = 2j + 1
            in the high nibble (a group of g weights is g/2 consecutive bytes of its row).
    scales  float16 [N, K/g]: the step (hi - lo) / 15 of each group (rounded UP to fp16).
    mins    float16 [N, K/g]: the float zero point lo = min of the group (rounded DOWN to fp16),
            as GGUF Q4_1 and AWQ's "min" form store it: code 0 is lo, code 15 is >= hi.
    """
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    group_size: int = 128
    format: ClassVar[str] = "int4"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.qweight.shape[1] * 2)

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K = self.shape
        q = self.codes().float().view(N, K // self.group_size, self.group_size)
        w = q * self.scales.float()[..., None] + self.mins.float()[..., None]
        return w.view(N, K).to(dtype)


def quantize_asym_codes(w: torch.Tensor, bits: int, group_size: int):
    """Round-to-nearest asymmetric group quantization, unpacked: -> (codes uint8 [N, K],
    scales fp16 [N, K/g], mins fp16 [N, K/g]) with W ~= codes * scale + min.

    Per group: lo = min(w) rounded down to fp16, s = (max(w) - lo) / (2^bits - 1) rounded up
    to fp16 (0 -> 1), so [lo, lo + (2^bits - 1) s] covers the group and
    |w - (q s + lo)| <= s / 2 for every element. When lo and s are already fp16 values (e.g.
    the dequantized weights of a GGUF Q4_1 file, g = 32) the codes and scales are reproduced
    exactly."""
    check_bits(bits, FAKE_BITS, "group quantization")
    w = check_weight(w)
    N, K = w.shape
    check_divides(K, group_size, "group size")
    qmax = 2 ** bits - 1
    wg = w.reshape(N, K // group_size, group_size)
    lo16 = fp16_round(wg.amin(dim=-1), "down")                          # [N, K/g]
    s = (wg.amax(dim=-1) - lo16.float()) / qmax
    s16 = fp16_round(s, "up")
    s16 = torch.where(s16 == 0, torch.ones_like(s16), s16)               # constant group
    q = torch.round((wg - lo16.float()[..., None]) / s16.float()[..., None])
    q = q.clamp_(0, qmax).to(torch.uint8).view(N, K)
    return q, s16, lo16


def fake_quantize_asym(w: torch.Tensor, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """Quantize then dequantize (fp32), any width 2..8: for error-vs-bits plots."""
    q, s, m = quantize_asym_codes(w, bits, group_size)
    N, K = q.shape
    wq = q.float().view(N, K // group_size, group_size) * s.float()[..., None]
    return (wq + m.float()[..., None]).view(N, K)


def quantize_int4(w: torch.Tensor, group_size: int = 128, bits: int = 4) -> Int4Weight:
    """Asymmetric 4-bit round-to-nearest per group of ``group_size`` (32, 64 or 128) along K."""
    check_bits(bits, (4,), "int4")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4: group_size {group_size!r} is not one of {INT4_GROUP_SIZES}")
    q, scales, mins = quantize_asym_codes(w, 4, group_size)
    return Int4Weight(pack_nibbles(q), scales, mins, group_size)


def dequantize_int4(qt: Int4Weight, dtype=torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)
