"""y = x @ dequant(W)^T (+ b) for weight-only quantized W [N, K], dequantized in registers.

Decode is memory-bound (see ops/linear.py): a GEMV's time is the bytes of W over the bandwidth.
Storing W in 8 or 4 bits cuts those bytes 2-4x, but only if the kernel reads the *packed* bytes
and expands them on chip. Dequantizing to a bf16 copy in memory first (``quant_linear_ref``)
moves more bytes than the unquantized model. So the kernel reads each packed byte exactly once,
splits nibbles in registers, applies the group's scale (and min, or codebook) and multiplies.

Formats (the tensors come from ``tinyserve.quant.formats``; W is [N, K], rows = output features):
    int8  qweight int8 [N, K], scale fp32 [N]                   W = q * scale[n]
    int4  qweight uint8 [N, K/2] (element 2j low nibble of byte j, 2j+1 high), scales and mins
          fp16 [N, K/g], g in {32, 64, 128}                    W = q * s + min
    nf4   qweight as int4, absmax fp16 [N, K/64], a 16-value codebook   W = codebook[q] * absmax
    gguf  llama.cpp's blocks of 32 as they are in the file, data uint8 [N, K/32 * bytes]:
          Q4_1 20 B = fp16 d, fp16 m, 16 B codes (low nibbles elements 0..15, high 16..31)
          Q8_0 34 B = fp16 d, 32 x int8                        W = d * q (+ m)

Modules: this one is the op (backend dispatch, ``weight_bytes``, the benchmark cases);
``quant_linear_common.py`` the reference and the weight -> kernel operands map;
``quant_linear_kernel.py`` the Triton kernel (one for every format, decode and prefill).
"""
import torch
import torch.nn.functional as F

from ._dispatch import check_backend, import_triton, interpreter_on, resolve
from .linear import MAX_M
from .quant_layout import GGUF_BLOCK
from .quant_linear_common import (GGUF_BLOCKS, check_quant_linear_args, kernel_operands,
                                  quant_linear_ref)
from .quant_linear_kernel import quant_linear_triton
from .spec import BenchCase

try:
    triton = import_triton()
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None


def quant_linear(x, qt, bias=None, backend="auto"):
    """y = x @ dequant(qt)^T (+ bias). backend: ref | triton | auto.

    "auto" runs the fused kernel on CUDA tensors (skinny path for M <= 16 rows, wide for more)
    and the reference elsewhere; "triton" forces the kernel (the interpreter on CPU).
    """
    check_backend(backend)
    check_quant_linear_args(x, qt, bias)
    impl = resolve(backend, x)
    if backend == "auto" and triton is None:
        impl = "ref"
    if impl == "triton":
        return quant_linear_triton(x, qt, bias)
    return quant_linear_ref(x, qt, bias)


def weight_bytes(qt) -> int:
    """Bytes of the tensors the kernel reads for ``qt`` (packed codes + scales/mins/absmax)."""
    _, _, _, tensors, _, _ = kernel_operands(qt, torch.device("cpu"))
    seen, total = set(), 0
    for t in tensors[:3]:   # the codebook (64 B) is not part of the weight
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


LLAMA2_7B = (("q/o", 4096, 4096), ("gate/up", 4096, 11008), ("down", 11008, 4096))  # (proj, K, N)
# (name, quantizer keyword arguments)
BENCH_FORMATS = (("int8", {}), ("int4-g128", {"group_size": 128}), ("int4-g32", {"group_size": 32}),
                 ("nf4", {}), ("gguf-Q4_1", {}), ("gguf-Q8_0", {}))


def bench_cases(device, small: bool = False, quantize=None):
    """Llama-2-7B projections x formats at M = 1, 16 (skinny) and 512 (wide), bf16 activations.

    ``quantize(w, name)`` makes each weight (``tinyserve.quant.formats.quantize_as``; the bench
    runner passes it): quantizers live above ops, which imports nothing above itself.
    bytes = the packed weight with its scales + activations in and out; peers: "cublas_bf16"
    (F.linear on the dequantized bf16 weight: what the unquantized layer pays) and "ref"."""
    if quantize is None:
        raise ValueError("quant_linear.bench_cases needs quantize= (e.g. tinyserve.quant."
                         "formats.quantize_as): ops cannot import the quantizers")
    dev = torch.device(device)
    dtype = torch.bfloat16 if (dev.type == "cuda" or not small) else torch.float32
    shapes = (("tiny", 256, 96),) if small else LLAMA2_7B
    rows = (1, 16, 40) if small else (1, 16, 512)
    has_triton = triton is not None and (dev.type == "cuda" or interpreter_on())
    esz = torch.empty((), dtype=dtype).element_size()
    cases = []
    for proj, K, N in shapes:
        for fmt, kw in BENCH_FORMATS:
            for M in rows:
                def setup(M=M, K=K, N=N, fmt=fmt, kw=kw):
                    # A random [N, K] weight ~ N(0, 1/K), quantized in ``fmt``.
                    w32 = torch.randn(N, K, device=dev, dtype=torch.float32) / K ** 0.5
                    qt = quantize(w32, fmt)
                    w = qt.dequantize(dtype)
                    x = torch.randn(M, K, device=dev, dtype=dtype)
                    impls = {"ref": lambda: quant_linear_ref(x, qt),
                             "cublas_bf16": lambda: F.linear(x, w)}
                    if has_triton:
                        impls["triton"] = lambda: quant_linear_triton(x, qt)
                    return impls
                wbytes = _packed_bytes(fmt, kw, N, K)
                path = "skinny" if M <= MAX_M else "wide"
                cases.append(BenchCase(
                    op="quant_linear", name=f"{proj} {fmt} M={M} K={K} N={N} {str(dtype)[6:]}",
                    setup=setup, bytes=wbytes + (M * K + M * N) * esz, flops=2 * M * N * K,
                    peers=("cublas_bf16", "ref"),
                    meta={"proj": proj, "format": fmt, "M": M, "K": K, "N": N, "path": path,
                          "weight_bytes": wbytes, "bf16_weight_bytes": 2 * N * K}))
    return cases


def _packed_bytes(fmt: str, kw: dict, N: int, K: int) -> int:
    """Bytes the kernel reads for an [N, K] weight in ``fmt`` (no allocation needed)."""
    if fmt == "int8":
        return N * K + 4 * N
    if fmt.startswith("int4"):
        return N * K // 2 + 4 * N * (K // kw["group_size"])
    if fmt == "nf4":
        return N * K // 2 + 2 * N * (K // 64)
    return N * (K // GGUF_BLOCK) * GGUF_BLOCKS[fmt.split("-")[1]][1]
