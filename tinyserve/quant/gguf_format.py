"""GGUF Q4_1 / Q8_0 blocks as stored in the file (``GGUFWeight``), their decoder on any device,
and an encoder after ggml's reference quantizers (for tests and random-weight benchmarks).

Layout and bits per weight: see the table in ``tinyserve.quant.formats``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

# The block byte counts the kernel reads are defined once in ops, below this package.
from ..ops.quant_layout import GGUF_BLOCK, GGUF_BLOCK_BYTES
from ..weights.gguf_blocks import dequantize as dequantize_file_blocks
from .quantized_weight import QuantizedWeight, check_divides, check_weight

GGUF_QTYPES = GGUF_BLOCK_BYTES   # bytes per block of GGUF_BLOCK weights


@dataclass(eq=False, repr=False)
class GGUFWeight(QuantizedWeight):
    """llama.cpp blocks of 32 weights along K, kept exactly as in the file.

    data uint8 [N, K/32 * bytes_per_block], each row a run of blocks:
      Q4_1, 20 bytes: fp16 d | fp16 m | 16 bytes of codes; byte i holds element i of the block
            in its low nibble and element i + 16 in its high nibble; w = d * q + m.
      Q8_0, 34 bytes: fp16 d | 32 int8 codes; w = d * q.
    (fp16 fields are little-endian and unaligned: a kernel reads them as two bytes.)
    """
    data: torch.Tensor
    qtype: str
    shape: tuple
    format: ClassVar[str] = "gguf"

    def __post_init__(self):
        if self.qtype not in GGUF_QTYPES:
            raise ValueError(f"gguf: block type {self.qtype!r} is not supported by the "
                             f"quantized kernels (supported: {sorted(GGUF_QTYPES)})")
        self.shape = tuple(int(s) for s in self.shape)
        N, K = self.shape
        want = (N, K // GGUF_BLOCK * GGUF_QTYPES[self.qtype])
        if K % GGUF_BLOCK or tuple(self.data.shape) != want or self.data.dtype != torch.uint8:
            raise ValueError(f"gguf {self.qtype} data for shape {self.shape} must be uint8 "
                             f"{want}, got {self.data.dtype} {tuple(self.data.shape)}")

    @property
    def bytes_per_block(self) -> int:
        return GGUF_QTYPES[self.qtype]

    @classmethod
    def from_packed(cls, pt) -> "GGUFWeight":
        """From a ``tinyserve.weights.gguf.PackedTensor`` (copies the memory-mapped bytes)."""
        if len(pt.shape) != 2:
            raise ValueError(f"gguf tensor {pt.name!r} has shape {pt.shape}: not a matrix")
        data = torch.from_numpy(np.array(pt.data, dtype=np.uint8, copy=True))
        return cls(data.reshape(pt.shape[0], -1), pt.qtype, tuple(pt.shape))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.data.device.type == "cpu":   # the file reader's decoder, the reference
            return dequantize_file_blocks(self.data.numpy(), self.qtype, self.shape).to(dtype)
        return _dequantize_blocks_torch(self.data, self.qtype, self.shape).to(dtype)


def _dequantize_blocks_torch(data: torch.Tensor, qtype: str, shape) -> torch.Tensor:
    """The same arithmetic as ``weights.gguf.dequantize``, on whatever device ``data`` is."""
    raw = data.reshape(-1, GGUF_QTYPES[qtype])
    d = raw[:, :2].contiguous().view(torch.float16).float()
    if qtype == "Q8_0":
        w = d * raw[:, 2:].contiguous().view(torch.int8).float()
    else:
        qs = raw[:, 4:]
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
        w = d * codes + raw[:, 2:4].contiguous().view(torch.float16).float()
    return w.reshape(shape)


def quantize_gguf(w: torch.Tensor, qtype: str = "Q4_1") -> GGUFWeight:
    """Encode W into llama.cpp blocks, following ggml's reference quantizers
    (quantize_row_q4_1_ref / quantize_row_q8_0_ref), for tests and random-weight benchmarks.
    Models loaded from a GGUF file use the file's own blocks instead."""
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"gguf: block type {qtype!r} is not one of {sorted(GGUF_QTYPES)}")
    w = check_weight(w)
    N, K = w.shape
    check_divides(K, GGUF_BLOCK, "the gguf block size")
    x = w.view(-1, GGUF_BLOCK)
    if qtype == "Q8_0":
        d = x.abs().amax(dim=1) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        x0 = x * inv[:, None]
        q = (torch.sign(x0) * torch.floor(x0.abs() + 0.5)).to(torch.int8)   # C roundf: half away

        blocks = torch.cat([d.half().view(-1, 1).view(torch.uint8), q.view(torch.uint8)], dim=1)
    else:
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        d = (hi - lo) / 15
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        # ggml: MIN(15, (int8_t)(x0 + 0.5f)) with x0 >= 0, i.e. round half up, truncating
        q = torch.clamp(torch.floor((x - lo[:, None]) * inv[:, None] + 0.5), max=15).to(torch.uint8)
        qs = q[:, :16] | (q[:, 16:] << 4)
        blocks = torch.cat([d.half().view(-1, 1).view(torch.uint8),
                            lo.half().view(-1, 1).view(torch.uint8), qs], dim=1)
    return GGUFWeight(blocks.reshape(N, -1).contiguous(), qtype, (N, K))
