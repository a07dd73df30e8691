"""The source article's ``quantize_group`` snippet (claim C9), reproduced as written, with the
inverse it implies and ``wrap_int8`` (its int8 cast, made defined on every platform): notebook 03
measures its error against the real formats. Not a format the model runs.
"""
from __future__ import annotations

import torch

from .int_formats import FAKE_BITS
from .quantized_weight import check_bits, check_divides, check_weight


def quantize_group_article(w: torch.Tensor, group_size: int = 128, bits: int = 4):
    """The article's ``quantize_group``, faithfully (for the notebook to show its error):

        scales = absmax / (2**(bits-1) - 1)     # a SYMMETRIC step: absmax / 7 for 4 bits
        zeros  = min                            # ... with an ASYMMETRIC (min) zero point
        q      = round((w - zeros) / scales).to(int8)

    -> (q int8 [N*K/g, g], scales [N*K/g, 1], zeros [N*K/g, 1]), the groups taken along K.
    w - min spans max - min <= 2 absmax, i.e. at most 2 * (2^(bits-1) - 1) = 2^bits - 2 steps:
    for 4 bits the codes stay in 0..14 (the int8 cast is harmless, it only wastes 4 bits per
    code), but the step is absmax / 7 however narrow [min, max] is, so lopsided groups use a
    few codes; for 8 bits the codes reach 254 and do not fit int8: they wrap (254 -> -2, see
    ``wrap_int8``). An all-zero group (absmax 0) would divide 0 by 0 in the snippet; we give it
    the step 1 so its codes are 0, as a real quantizer does, instead of casting NaN."""
    check_bits(bits, FAKE_BITS, "quantize_group_article")
    w = check_weight(w)
    N, K = w.shape
    check_divides(K, group_size, "group size")
    w = w.reshape(-1, group_size)
    absmax = w.abs().amax(dim=1, keepdim=True)
    scales = absmax / (2 ** (bits - 1) - 1)
    scales = torch.where(absmax > 0, scales, torch.ones_like(scales))
    zeros = w.amin(dim=1, keepdim=True)
    q = wrap_int8(torch.round((w - zeros) / scales))
    return q, scales, zeros


def wrap_int8(codes: torch.Tensor) -> torch.Tensor:
    """Integer-valued float codes -> int8, wrapping modulo 256 (128 -> -128, 200 -> -56).

    This is what the article's ``.to(torch.int8)`` does to codes above 127 on common builds
    (x86 and ARM convert through a 32-bit integer and keep its low byte), but C and C++ leave
    the conversion of an out-of-range float to a narrower integer undefined, so a build may
    also saturate or return anything. Going through int64 (exact for |x| < 2^63) and taking
    the wrap explicitly gives the same, defined result everywhere."""
    q = codes.to(torch.int64)
    return (torch.remainder(q + 128, 256) - 128).to(torch.int8)


def dequantize_group_article(q, scales, zeros, shape=None) -> torch.Tensor:
    """The inverse the snippet implies: w ~= q * scales + zeros (reshaped to ``shape``)."""
    w = q.float() * scales + zeros
    return w.reshape(shape) if shape is not None else w
