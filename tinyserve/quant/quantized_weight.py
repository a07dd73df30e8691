"""QuantizedWeight, the base of every format in ``tinyserve.quant``, and the helpers they share.

Every format (``int_formats``: int8 / int4, ``formats``: nf4, ``gguf_format``: GGUF blocks, and
the article's snippet in ``article_snippet``) checks its input weight W [N, K] the same way;
int4 and nf4 also round their fp16 scales toward -inf or +inf (so the stored value brackets the
exact one) and pack two 4-bit codes per byte in one nibble order. Those pieces live here, below
the formats, so each format module imports them from one place.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

_FP16_MAX = 65504.0


# ---- shared helpers ------------------------------------------------------------------------
def check_weight(w: torch.Tensor, what: str = "weight") -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{what} must be a 2-D tensor [out_features, in_features], got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {w.dtype}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"{what} holds inf or nan: it cannot be quantized")
    return w


def check_bits(bits: int, allowed, method: str):
    if bits not in allowed:
        allowed = list(allowed)
        raise ValueError(f"{method}: bits={bits!r} is out of range; this format stores "
                         f"{allowed[0] if len(allowed) == 1 else allowed}-bit codes")


def check_divides(K: int, g: int, what: str):
    if K % g:
        raise ValueError(f"{what} {g} does not divide in_features {K} (K % {g} = {K % g})")


def fp16_round(x: torch.Tensor, direction: str) -> torch.Tensor:
    """fp32 -> fp16 rounded toward -inf ("down") or +inf ("up"), so the stored value brackets x.

    Works on the int16 bit pattern (device-agnostic): for a finite fp16, the next value toward
    -inf is pattern - 1 when positive, pattern + 1 when negative (sign-magnitude), and -2^-24
    from zero; toward +inf the mirror image."""
    if x.numel() and float(x.abs().max()) > _FP16_MAX:
        raise ValueError(f"a scale or minimum of {float(x.abs().max()):.4g} does not fit in "
                         f"float16 (max {_FP16_MAX})")
    h = x.half()
    b = h.view(torch.int16)
    hf = h.float()
    zero = (b == 0) | (b == -32768)                      # +0.0 / -0.0
    neg = (b < 0) & ~zero
    if direction == "down":
        fix = hf > x
        step = torch.where(neg, b + 1, b - 1)
        step = torch.where(zero, torch.full_like(b, -32767), step)     # 0x8001 = -2^-24
    else:
        fix = hf < x
        step = torch.where(neg, b - 1, b + 1)
        step = torch.where(zero, torch.ones_like(b), step)              # 0x0001 = +2^-24
    return torch.where(fix, step, b).view(torch.float16)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] -> uint8 [N, K/2]; byte j = codes[2j] | codes[2j+1] << 4."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of 4-bit codes ({codes.shape[-1]})")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K] (the inverse of ``pack_nibbles``)."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class QuantizedWeight:
    """Base of the format dataclasses: tensors by field name, moving, byte counts."""
    format: ClassVar[str] = "?"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to(self, device=None, non_blocking: bool = False):
        """The same weight with every tensor on ``device`` (dtypes never change)."""
        return self.replace(**{k: v.to(device, non_blocking=non_blocking)
                               for k, v in self.tensors().items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    @property
    def nbytes(self) -> int:
        """Bytes as stored: codes plus every scale / minimum / offset."""
        return sum(tensor_nbytes(t) for t in self.tensors().values())

    @property
    def nbytes_compute(self) -> int:
        """Bytes a matmul reads (equal to ``nbytes`` except for double-quantized nf4)."""
        return self.nbytes

    @property
    def bits_per_weight(self) -> float:
        N, K = self.shape
        return 8 * self.nbytes / (N * K)

    def __repr__(self):
        return (f"{type(self).__name__}(format={self.format!r}, shape={tuple(self.shape)}, "
                f"nbytes={self.nbytes}, device={self.device})")
