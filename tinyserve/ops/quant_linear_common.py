"""The quantized linear's reference and what every backend shares: the weight -> operands map.

``quant_linear_ref`` is the definition of correct (dequantize, then an ordinary GEMM);
``kernel_operands`` turns a quantized weight (``tinyserve.quant.formats``) into the tensors and
constants the kernel (``quant_linear_kernel.py``) reads, and ``weight_bytes`` in
``quant_linear.py`` counts them; ``check_quant_linear_args`` validates a call once for all.
"""
import functools

import torch
import torch.nn.functional as F

from .linear import DTYPES
from .quant_layout import GGUF_BLOCK, GGUF_BLOCK_BYTES, NF4_BLOCK_SIZE, NF4_CODEBOOK_VALUES

FORMATS = ("int8", "int4", "nf4", "gguf")
# qtype -> (kernel FORMAT, bytes per block of GGUF_BLOCK weights)
GGUF_BLOCKS = {q: (q.lower(), GGUF_BLOCK_BYTES[q]) for q in ("Q4_1", "Q8_0")}
_INT8_MAX_BLOCK_K = 256   # int8 has no groups: any tile width


def quant_linear_ref(x: torch.Tensor, qt, bias: torch.Tensor | None = None):
    # The definition of correct: expand W to x's dtype in memory, then an ordinary GEMM.
    # Bytes of W read per weight (the part of the traffic a quantized *kernel* pays):
    #   int8        1 B + 4 B scale per row            ~1.00 B  (bf16: 2 B)
    #   int4 g      0.5 B + 4 B (fp16 scale + min) per group of g: 0.625 B at g=32, 0.53 at 128
    #   nf4         0.5 B + 2 B (fp16 absmax) per 64   ~0.53 B
    #   gguf Q4_1   20 B per 32                        0.625 B
    #   gguf Q8_0   34 B per 32                        1.06 B
    # This reference pays those bytes, then writes and re-reads N*K*elem_size of dequantized W:
    # more traffic than the unquantized layer. It is correct and slow on purpose.
    w = qt.dequantize(x.dtype)                                   # N*K*elem_size written
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))   # ...and read again


def kernel_operands(qt, device):
    """-> (FORMAT, GROUP, max BLOCK_K, (Q, S, Z, CB), stride_qn, stride_sn) for ``qt``."""
    fmt = getattr(qt, "format", None)
    if fmt == "int8":
        q, s = qt.qweight.contiguous(), qt.scale.float().contiguous()
        return "int8", 1, _INT8_MAX_BLOCK_K, (q, s, s, s), q.stride(0), 0
    if fmt == "int4":
        g = int(qt.group_size)
        q, s, m = (t.contiguous() for t in (qt.qweight, qt.scales, qt.mins))
        return "int4", g, g, (q, s, m, s), q.stride(0), s.stride(0)
    if fmt == "nf4":
        g = int(getattr(qt, "block_size", NF4_BLOCK_SIZE))
        q, a = qt.qweight.contiguous(), qt.absmax.contiguous()
        return "nf4", g, g, (q, a, a, _nf4_codebook(qt, device)), q.stride(0), a.stride(0)
    if fmt == "gguf":
        if qt.qtype not in GGUF_BLOCKS:
            raise ValueError(f"quant_linear: GGUF qtype {qt.qtype!r} has no kernel (supported: "
                             f"{', '.join(GGUF_BLOCKS)})")
        kfmt, _ = GGUF_BLOCKS[qt.qtype]
        d = qt.data.contiguous()
        return kfmt, GGUF_BLOCK, GGUF_BLOCK, (d, d, d, d), d.stride(0), 0
    raise ValueError(f"quant_linear: unknown weight format {fmt!r} (expected one of {FORMATS})")


@functools.lru_cache(maxsize=None)
def _codebook_on(device: torch.device, values: tuple) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _nf4_codebook(qt, device) -> torch.Tensor:
    """The 16 NF4 values (fp32) on ``device``: the weight's own, else QLoRA's table (the one
    tinyserve.quant.formats quantizes with; both read it from quant_layout.py)."""
    cb = getattr(qt, "codebook", None)
    if cb is None:
        cb = NF4_CODEBOOK_VALUES
    if isinstance(cb, torch.Tensor):
        if cb.device == device and cb.dtype == torch.float32 and cb.is_contiguous():
            return cb
        cb = cb.tolist()
    return _codebook_on(device, tuple(float(v) for v in cb))


def check_quant_linear_args(x, qt, bias):
    if getattr(qt, "format", None) not in FORMATS:
        raise ValueError(f"quant_linear: unknown weight format {getattr(qt, 'format', None)!r} "
                         f"(expected one of {FORMATS})")
    N, K = (int(v) for v in qt.shape)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"quant_linear: x must be [..., K] with K = {K} (the weight is "
                         f"[{N}, {K}]), got x {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"quant_linear: x dtype must be one of {DTYPES}, got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"quant_linear: bias must have shape ({N},), got {tuple(bias.shape)}")
    return N, K
