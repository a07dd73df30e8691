"""Weight-only quantization formats: reference quantizers and dequantizers in plain PyTorch.

This file is the definition of correct for every quantized kernel in ``tinyserve.ops.quant_linear``.
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

Nibble order (int4, nf4): weight k = 2j sits in the LOW nibble of byte j of its row, k = 2j + 1
in the HIGH nibble: byte = q[2j] | q[2j+1] << 4. (GGUF Q4_1 differs inside a block: the low
nibbles of its 16 bytes are elements 0..15, the high nibbles 16..31; we keep the file's order.)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

# The layout constants the kernel reads (the NF4 codebook, block sizes, GGUF block bytes) are
# defined once in ops, below this package: quant imports ops, never the reverse.
from ..ops.quant_layout import GGUF_BLOCK, GGUF_BLOCK_BYTES, NF4_BLOCK_SIZE, NF4_CODEBOOK_VALUES

NF4_CODEBOOK = torch.tensor(NF4_CODEBOOK_VALUES, dtype=torch.float32)   # QLoRA's 16 values

INT4_GROUP_SIZES = (32, 64, 128)
DQ_BLOCK_SIZE = 256          # QLoRA's block for the second (double) quantization
GGUF_QTYPES = GGUF_BLOCK_BYTES   # bytes per block of GGUF_BLOCK weights
FAKE_BITS = range(2, 9)      # widths the generic (unpacked) group quantizer accepts
_FP16_MAX = 65504.0


# ---- shared helpers ------------------------------------------------------------------------
def _check_weight(w: torch.Tensor, what: str = "weight") -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{what} must be a 2-D tensor [out_features, in_features], got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {w.dtype}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError(f"{what} holds inf or nan: it cannot be quantized")
    return w


def _check_bits(bits: int, allowed, method: str):
    if bits not in allowed:
        allowed = list(allowed)
        raise ValueError(f"{method}: bits={bits!r} is out of range; this format stores "
                         f"{allowed[0] if len(allowed) == 1 else allowed}-bit codes")


def _check_divides(K: int, g: int, what: str):
    if K % g:
        raise ValueError(f"{what} {g} does not divide in_features {K} (K % {g} = {K % g})")


def _fp16_round(x: torch.Tensor, direction: str) -> torch.Tensor:
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


def _nbytes(t: torch.Tensor) -> int:
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
        return sum(_nbytes(t) for t in self.tensors().values())

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
    _check_bits(bits, (8,), "int8")
    w = _check_weight(w)
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
    _check_bits(bits, FAKE_BITS, "group quantization")
    w = _check_weight(w)
    N, K = w.shape
    _check_divides(K, group_size, "group size")
    qmax = 2 ** bits - 1
    wg = w.reshape(N, K // group_size, group_size)
    lo16 = _fp16_round(wg.amin(dim=-1), "down")                          # [N, K/g]
    s = (wg.amax(dim=-1) - lo16.float()) / qmax
    s16 = _fp16_round(s, "up")
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
    _check_bits(bits, (4,), "int4")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4: group_size {group_size!r} is not one of {INT4_GROUP_SIZES}")
    q, scales, mins = quantize_asym_codes(w, 4, group_size)
    return Int4Weight(pack_nibbles(q), scales, mins, group_size)


def dequantize_int4(qt: Int4Weight, dtype=torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)


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
            return _nbytes(self.qweight) + _nbytes(self.absmax)
        return _nbytes(self.qweight) + sum(_nbytes(t) for t in (
            self.absmax_q, self.absmax_scale, self.absmax_offset))

    @property
    def nbytes_stored(self) -> int:
        return self.nbytes

    @property
    def nbytes_compute(self) -> int:
        return _nbytes(self.qweight) + _nbytes(self.absmax)

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
    _check_bits(bits, (4,), "nf4")
    if block_size != NF4_BLOCK_SIZE:
        raise ValueError(f"nf4: block size {block_size!r} is not supported (the NF4 layout "
                         f"uses blocks of {NF4_BLOCK_SIZE})")
    w = _check_weight(w)
    N, K = w.shape
    _check_divides(K, block_size, "nf4 block size")
    wb = w.reshape(N, K // block_size, block_size)
    amax = wb.abs().amax(dim=-1)                                          # fp32 [N, K/64]
    dq = {}
    if double_quant:
        q2, s2, off, absmax16 = _double_quantize(amax)
        dq = dict(absmax_q=q2, absmax_scale=s2, absmax_offset=off)
    else:
        absmax16 = _fp16_round(amax, "up")
    a = absmax16.float()
    a = torch.where(a == 0, torch.ones_like(a), a)   # an all-zero block: every code is 0.0
    absmax16 = a.half()
    codes = nf4_encode(wb / a[..., None]).view(N, K)
    return NF4Weight(pack_nibbles(codes), absmax16, block_size, **dq)


def dequantize_nf4(qt: NF4Weight, dtype=torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)


# ---- GGUF Q4_1 / Q8_0 blocks, as in the file ------------------------------------------------
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
        import numpy as np
        if len(pt.shape) != 2:
            raise ValueError(f"gguf tensor {pt.name!r} has shape {pt.shape}: not a matrix")
        data = torch.from_numpy(np.array(pt.data, dtype=np.uint8, copy=True))
        return cls(data.reshape(pt.shape[0], -1), pt.qtype, tuple(pt.shape))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.data.device.type == "cpu":
            from ..weights.gguf import dequantize   # the file reader's decoder, the reference
            return dequantize(self.data.numpy(), self.qtype, self.shape).to(dtype)
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
    w = _check_weight(w)
    N, K = w.shape
    _check_divides(K, GGUF_BLOCK, "the gguf block size")
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


# ---- the source article's snippet (claim C9), reproduced as written -------------------------
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
    _check_bits(bits, FAKE_BITS, "quantize_group_article")
    w = _check_weight(w)
    N, K = w.shape
    _check_divides(K, group_size, "group size")
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
