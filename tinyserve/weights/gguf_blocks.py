"""GGML block quantization formats and how to decode them (plus GGUFError, the loader's error).

What a tensor's bytes mean, independent of the file around them: ``PackedTensor`` (a tensor in its
file encoding) and ``dequantize`` (bytes -> torch tensor). Q8_0/Q4_0/Q4_1 are decoded here; any
other ggml type is handed to the ``gguf`` package, imported only then (optional dependency).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import TinyserveError

__all__ = ["BLOCK_FORMATS", "PLAIN_TYPES", "GGUFError", "PackedTensor", "dequantize"]


class GGUFError(TinyserveError, ValueError):
    """A GGUF file that cannot be read or does not describe a model we can run."""


# Block formats we decode ourselves: name -> (elements per block, bytes per block).
#   Q8_0: fp16 scale d, 32 x int8 q                 -> w = d * q
#   Q4_0: fp16 scale d, 16 bytes of 4-bit codes     -> w = d * (code - 8)
#   Q4_1: fp16 scale d, fp16 min m, 16 bytes codes  -> w = d * code + m
# In Q4_x the low nibbles of the 16 bytes hold elements 0..15, the high nibbles 16..31.
BLOCK_FORMATS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "F64": torch.float64}


@dataclass
class PackedTensor:
    """A tensor in its file encoding. ``data`` is uint8 [rows, bytes_per_row] for block
    formats (a zero-copy view of the memory-mapped file), ``shape`` the logical torch shape."""
    name: str
    qtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape, self.name).to(dtype)


def dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...], name: str = "?"):
    """Decode file bytes to an fp32 (or native float) torch tensor of ``shape``."""
    if qtype in PLAIN_TYPES:
        if qtype == "BF16":  # numpy has no bfloat16: reinterpret the 16-bit words
            return torch.from_numpy(np.array(data).view(np.int16)).view(
                torch.bfloat16).reshape(shape)
        return torch.from_numpy(np.array(data)).reshape(shape)
    if qtype in BLOCK_FORMATS:
        block, nbytes = BLOCK_FORMATS[qtype]
        raw = torch.from_numpy(np.array(data)).reshape(-1, nbytes)  # [nblocks, B] (a copy:
        #                                                             the mmap is read-only)
        d = raw[:, :2].contiguous().view(torch.float16).float()                 # [nblocks, 1]
        if qtype == "Q8_0":
            w = d * raw[:, 2:].contiguous().view(torch.int8).float()
        else:
            qs = raw[:, 4:] if qtype == "Q4_1" else raw[:, 2:]
            codes = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()              # [nblocks, 32]
            if qtype == "Q4_1":
                m = raw[:, 2:4].contiguous().view(torch.float16).float()
                w = d * codes + m
            else:
                w = d * (codes - 8)
        return w.reshape(shape)
    # Anything else (K-quants, IQ-quants, ...): let the gguf package decode it if it can.
    from gguf import GGMLQuantizationType, quants
    try:
        out = quants.dequantize(np.asarray(data), GGMLQuantizationType[qtype])
    except (NotImplementedError, KeyError, ValueError) as e:
        raise GGUFError(f"tensor {name!r} has type {qtype}, which tinyserve cannot decode "
                        f"(supported: {', '.join([*PLAIN_TYPES, *BLOCK_FORMATS])} and what the "
                        f"gguf package dequantizes; {type(e).__name__}: {e})") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)
