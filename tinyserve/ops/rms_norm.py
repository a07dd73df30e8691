"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, optionally fused with the residual add.

In a pre-norm decoder every norm follows a residual add (``h = x + residual; y = norm(h)``).
Unfused that is two passes over the row: the add reads 2D and writes D, then the norm reads D
again and writes D (5D elements moved). Fused, one program reads x and residual once and writes
h and y (4D), and the row never leaves registers in between.
"""
import torch
import torch.nn.functional as F

from ._dispatch import check_backend, import_triton, interpreter_on, resolve
from .spec import BenchCase

try:
    triton = import_triton()
    import triton.language as tl
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None

MAX_D = 65536  # one program holds a whole row in registers; beyond this, spills dominate


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
    """x: [..., D], weight: [D] -> y (or (y, h) with h = x + residual when residual is given)."""
    h = None
    if residual is not None:
        h = x + residual      # reads 2D elements per row, writes D (eager materialises h)
        x = h
    # x: [..., D] reads D elements per row, writes D; weight: [D] read once.
    # Statistics in fp32 even for bf16 inputs: the sum of squares of 576+ values overflows
    # bf16's 8-bit mantissa long before it overflows its range.
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # Cast back before the weight multiply, as HF LLaMA does, so fp16/bf16 results match it.
    y = weight * (xf * inv_rms).to(x.dtype)
    return y if h is None else (y, h)


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(X, R, W, Y, H, stride_x, stride_r, stride_y, stride_h, D, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        # One program per row: reads D elements of x (and D of residual), D of weight (shared by
        # all rows, so it stays in L2), writes D of y (and D of h). BLOCK >= D, masked.
        row = tl.program_id(0).to(tl.int64)   # int64: rows * stride can pass 2^31 at long T
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            # Add in fp32 and round to the input dtype, exactly as eager `x + residual` does;
            # the statistics below then see the same rounded h as the reference.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(H + row * stride_h + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)   # masked lanes add 0
        normed = (xf * inv_rms).to(x.dtype)   # the reference's cast before the weight multiply
        w = tl.load(W + cols, mask=mask, other=0.0)
        y = w.to(tl.float32) * normed.to(tl.float32)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


def _check(x, weight, residual):
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rms_norm: x must have a non-empty last dimension, got {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight must have shape ({D},), got {tuple(weight.shape)}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"rms_norm: x and weight must be floating point, got {x.dtype}, "
                         f"{weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [rows, D] with unit stride along D (a view when the layout allows it)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_triton(x, weight, eps, residual=None, out=None, residual_out=None):
    """Same signature and result as ``rms_norm_ref``; ``out``/``residual_out`` receive y/h."""
    _check(x, weight, residual)
    D = x.shape[-1]
    if D > MAX_D:
        raise ValueError(f"rms_norm: D={D} exceeds the one-row-per-program limit {MAX_D}")
    out_dtype = torch.result_type(weight, x)   # weight * y promotes, as in the reference
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.shape != x.shape or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"rms_norm: out must be contiguous {tuple(x.shape)} {out_dtype}")
    has_res = residual is not None
    if has_res:
        if residual_out is None:
            residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if (residual_out.shape != x.shape or residual_out.dtype != x.dtype
                or not residual_out.is_contiguous()):
            raise ValueError(f"rms_norm: residual_out must be contiguous {tuple(x.shape)} {x.dtype}")
    x2 = _rows(x)
    rows = x2.shape[0]
    if rows == 0:
        return (out, residual_out) if has_res else out
    r2 = _rows(residual) if has_res else x2           # dummies are never read: HAS_RES=False
    h2 = residual_out.view(-1, D) if has_res else out.view(-1, D)
    y2 = out.view(-1, D)
    BLOCK = triton.next_power_of_2(D)
    # Enough warps that each thread holds ~8-16 elements: 4 warps to D=2048, 16 at 8192.
    num_warps = 4 if BLOCK <= 2048 else 8 if BLOCK <= 4096 else 16
    _rms_norm_kernel[(rows,)](x2, r2, weight.contiguous(), y2, h2,
                              x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), D, eps,
                              HAS_RES=has_res, BLOCK=BLOCK, num_warps=num_warps)
    return (out, residual_out) if has_res else out


def rms_norm_native(x, weight, eps, residual=None):
    """As ``rms_norm_ref`` in two ops: the residual add, then torch's ``F.rms_norm`` (stats
    in fp32 for bf16 input; it multiplies by the weight before casting back, so bf16 results
    may differ from the reference's by one rounding)."""
    h = None if residual is None else x + residual
    y = F.rms_norm(x if h is None else h, (x.shape[-1],), weight, eps)
    return y if h is None else (y, h)


def rms_norm(x, weight, eps, residual=None, backend="auto"):
    """RMSNorm of x (or of h = x + residual, returning (y, h)).
    backend: ref | triton | native | auto."""
    check_backend(backend)
    _check(x, weight, residual)
    impl = resolve(backend, x)
    if impl == "triton":
        return rms_norm_triton(x, weight, eps, residual=residual)
    if impl == "native":
        return rms_norm_native(x, weight, eps, residual=residual)
    return rms_norm_ref(x, weight, eps, residual=residual)


def bench_cases(device, small: bool = False):
    """Llama-2-7B hidden size 4096 at 1 / 16 / 4096 rows, plain and with the fused residual."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    D, row_counts = (64, (1, 7)) if small else (4096, (1, 16, 4096))
    has_triton = triton is not None and (dev.type == "cuda" or interpreter_on())
    esz = torch.empty((), dtype=dtype).element_size()
    cases = []
    for rows in row_counts:
        for fused in (False, True):
            def setup(rows=rows, fused=fused):
                x = torch.randn(rows, D, device=dev, dtype=dtype)
                r = torch.randn(rows, D, device=dev, dtype=dtype) if fused else None
                w = torch.randn(D, device=dev, dtype=dtype)
                impls = {"ref": lambda: rms_norm_ref(x, w, 1e-5, residual=r)}
                if has_triton:
                    impls["triton"] = lambda: rms_norm_triton(x, w, 1e-5, residual=r)
                return impls
            moved = (4 if fused else 2) * rows * D * esz + D * esz   # rows in/out + weight
            name = f"rows={rows} D={D} {'+residual ' if fused else ''}{str(dtype)[6:]}"
            cases.append(BenchCase(op="rms_norm", name=name, setup=setup, bytes=moved,
                                   flops=(4 if fused else 3) * rows * D, peers=("ref",),
                                   meta={"rows": rows, "D": D, "residual": fused}))
    return cases
