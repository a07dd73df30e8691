"""Weight-only quantization formats: reference quantizers and dequantizers in plain PyTorch.

This module and the ones it imports are the definition of correct for every quantized kernel in
``tinyserve.ops.quant_linear``.
A weight W is [N, K] = [out_features, in_features], row-major (one row per output feature), as
in ``tinyserve.model.Linear``. Each format is a small dataclass of plain tensors:

    format   tensors (N x K weight)                                      bits / weight
    int8     qweight int8 [N, K], scale fp32 [N]                         8 + 32/K
    int4     qweight uint8 [N, K/2], scales fp16 [N, K/g], mins fp16      4 + 32/g
    nf4      qweight uint8 [N, K/2], absmax fp16 [N, K/64]                4 + 16/64
             (+ double quant: absmax as int8 codes per 256, fp32 scales)  4 + 8/64 + 32/(64*256)
             (bitsandbytes keeps the absmax in fp32, 4 + 32/64 = 4.5 bits, and its double
             quantization codes them as 8-bit floats, not int8: same 4.127 bits)
    gguf     data uint8 [N, K/32 * bytes_per_block] (Q4_1: 20, Q8_0: 34)  Q4_1: 5, Q8_0: 8.5

Each has ``.format``, ``.shape`` (N, K), ``.nbytes`` (bytes as stored, scales included),
``.dequantize(dtype)`` and ``.to(device)``; ``.tensors()`` lists its tensors by field name.

Where each lives: the shared base and helpers in ``quantized_weight``, int8 and int4 in
``int_formats``, GGUF blocks in ``gguf_format``, the article's snippet in ``article_snippet``;
this module holds NF4 and the name -> format tables (``FORMATS``, ``QUANTIZERS``, ``quantize_as``).

Nibble order (int4, nf4): weight k = 2j sits in the LOW nibble of byte j of its row, k = 2j + 1
in the HIGH nibble: byte = q[2j] | q[2j+1] << 4. (GGUF Q4_1 differs inside a block: the low
nibbles of its 16 bytes are elements 0..15, the high nibbles 16..31; we keep the file's order.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

# The layout constants the kernel reads (here the NF4 codebook and block size) are defined
# once in ops, below this package: quant imports ops, never the reverse.
from ..ops.quant_layout import NF4_BLOCK_SIZE, NF4_CODEBOOK_VALUES
from .gguf_format import GGUFWeight, quantize_gguf
from .int_formats import Int4Weight, Int8Weight, quantize_int4, quantize_int8
from .quantized_weight import (QuantizedWeight, check_bits, check_divides, check_weight,
                               fp16_round, pack_nibbles, tensor_nbytes, unpack_nibbles)

NF4_CODEBOOK = torch.tensor(NF4_CODEBOOK_VALUES, dtype=torch.float32)   # QLoRA's 16 values
DQ_BLOCK_SIZE = 256          # QLoRA's block for the second (double) quantization


# ---- nf4: QLoRA's NormalFloat-4, absmax per block of 64 ------------------------------------
@dataclass(eq=False, repr=False)
class NF4Weight(QuantizedWeight):
    """W[n, k] ~= NF4_CODEBOOK[q[n, k]] * absmax[n, k // 64].

    qweight uint8 [N, K/2]: 4-bit codebook indices, same nibble order as int4.
    absmax  float16 [N, K/64]: the block's scale, what the kernel reads. Without double quant
            it is max|w| of the block rounded up to fp16 (so |w / absmax| <= 1).
    Double quantization (QLoRA section 3): the fp32 absmax are stored as
      absmax_q      int8 [ceil(N*K/64 / 256) * 256]: (absmax - offset) / absmax_scale, rounded,
                    over the row-major flattened absmax in blocks of 256 (zero-padded);
      absmax_scale  float32 [ceil(N*K/64 / 256)]: absmax of each block of 256 / 127;
      absmax_offset float32 [1]: the mean of all absmax, subtracted first (QLoRA centers them).
    and ``absmax`` is their decoded fp16 value (built once for compute, not counted by nbytes).
    """
    qweight: torch.Tensor
    absmax: torch.Tensor
    block_size: int = NF4_BLOCK_SIZE
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    format: ClassVar[str] = "nf4"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.qweight.shape[0], self.qweight.shape[1] * 2)

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def nbytes(self) -> int:
        """As stored: with double quant the int8 absmax codes replace the fp16 absmax."""
        if not self.double_quant:
            return tensor_nbytes(self.qweight) + tensor_nbytes(self.absmax)
        return tensor_nbytes(self.qweight) + sum(tensor_nbytes(t) for t in (
            self.absmax_q, self.absmax_scale, self.absmax_offset))

    @property
    def nbytes_stored(self) -> int:
        return self.nbytes

    @property
    def nbytes_compute(self) -> int:
        return tensor_nbytes(self.qweight) + tensor_nbytes(self.absmax)

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K = self.shape
        vals = NF4_CODEBOOK.to(self.qweight.device)[self.codes().long()]
        w = vals.view(N, K // self.block_size, self.block_size) * self.absmax.float()[..., None]
        return w.view(N, K).to(dtype)


def _double_quantize(absmax: torch.Tensor):
    """fp32 absmax [N, B] -> (int8 codes, fp32 scale per 256, fp32 offset, decoded fp16 [N, B])."""
    flat = absmax.reshape(-1)
    offset = flat.mean().reshape(1)
    c = flat - offset
    pad = (-c.numel()) % DQ_BLOCK_SIZE
    c = torch.cat([c, c.new_zeros(pad)]).view(-1, DQ_BLOCK_SIZE)
    amax = c.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(c / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    decoded = (q.float() * scale[:, None]).reshape(-1)[:flat.numel()] + offset
    return q.reshape(-1), scale, offset, decoded.view(absmax.shape).half()


def nf4_encode(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value for each element of x (x already divided by absmax):
    a binary search over the 15 midpoints between neighbouring codes (ties go to the lower)."""
    cb = NF4_CODEBOOK.to(x.device)
    mid = (cb[1:] + cb[:-1]) / 2
    return torch.bucketize(x.contiguous(), mid).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, block_size: int = NF4_BLOCK_SIZE, double_quant: bool = False,
                 bits: int = 4) -> NF4Weight:
    """NF4 with one absmax per block of 64 along K; each code is the nearest codebook value
    to w / absmax, with absmax the value the kernel will read (after double quant, if any)."""
    check_bits(bits, (4,), "nf4")
    if block_size != NF4_BLOCK_SIZE:
        raise ValueError(f"nf4: block size {block_size!r} is not supported (the NF4 layout "
                         f"uses blocks of {NF4_BLOCK_SIZE})")
    w = check_weight(w)
    N, K = w.shape
    check_divides(K, block_size, "nf4 block size")
    wb = w.reshape(N, K // block_size, block_size)
    amax = wb.abs().amax(dim=-1)                                          # fp32 [N, K/64]
    dq = {}
    if double_quant:
        q2, s2, off, absmax16 = _double_quantize(amax)
        dq = dict(absmax_q=q2, absmax_scale=s2, absmax_offset=off)
    else:
        absmax16 = fp16_round(amax, "up")
    a = absmax16.float()
    a = torch.where(a == 0, torch.ones_like(a), a)   # an all-zero block: every code is 0.0
    absmax16 = a.half()
    codes = nf4_encode(wb / a[..., None]).view(N, K)
    return NF4Weight(pack_nibbles(codes), absmax16, block_size, **dq)


def dequantize_nf4(qt: NF4Weight, dtype=torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)


# ---- formats by name ------------------------------------------------------------------------
QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "nf4": quantize_nf4}


def quantize_as(w: torch.Tensor, name: str) -> QuantizedWeight:
    """Quantize ``w`` in a format named as the benchmarks spell it: "int8", "int4-g<g>",
    "nf4", "nf4-dq" (double-quantized absmax), "gguf-Q4_1", "gguf-Q8_0"."""
    if name == "int8":
        return quantize_int8(w)
    if name.startswith("int4-g"):
        return quantize_int4(w, group_size=int(name[len("int4-g"):]))
    if name in ("nf4", "nf4-dq"):
        return quantize_nf4(w, double_quant=name == "nf4-dq")
    if name.startswith("gguf-"):
        return quantize_gguf(w, name[len("gguf-"):])
    raise ValueError(f"quantize_as: unknown format name {name!r}")


FORMATS = {"int8": Int8Weight, "int4": Int4Weight, "nf4": NF4Weight, "gguf": GGUFWeight}
