"""SwiGLU activation of the LLaMA MLP: silu(gate) * up."""
import torch
import torch.nn.functional as F

from ._dispatch import check_backend, import_triton, interpreter_on, resolve
from .spec import BenchCase

try:
    triton = import_triton()
    import triton.language as tl
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None

BLOCK = 1024  # elements per program: 2 KiB of bf16 per input, 4 warps x 8 elements per thread


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # gate, up: [..., F]; reads 2F elements, writes F. Eager PyTorch materialises silu(gate)
    # as a temporary, i.e. one extra write + read of F elements that a fused kernel avoids.
    return F.silu(gate) * up


if triton is not None:
    @triton.jit
    def _swiglu_kernel(G, U, Y, Fdim, sg, su, sy, BLOCK: tl.constexpr):
        # Grid (rows, cdiv(F, BLOCK)): each program reads BLOCK elements of gate and of up and
        # writes BLOCK of y. Row strides let gate/up be halves of one fused [.., 2F] projection.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < Fdim
        g = tl.load(G + row * sg + cols, mask=mask, other=0.0)
        u = tl.load(U + row * su + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        # Sigmoid in fp32 (exp of a bf16 would lose the tail); for very negative g, exp(-g) is
        # inf and g / inf = -0, the right limit. Rounding silu to the input dtype before the
        # multiply mirrors eager `F.silu(gate) * up`, so we match the reference, not just approx.
        silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        y = silu.to(tl.float32) * u.to(tl.float32)
        tl.store(Y + row * sy + cols, y.to(Y.dtype.element_ty), mask=mask)


def _check(gate, up):
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must have the same shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if gate.dim() < 1 or not gate.is_floating_point():
        raise ValueError(f"swiglu: expected floating-point [..., F] inputs, got "
                         f"{tuple(gate.shape)} {gate.dtype}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [rows, F] with unit stride along F (a view when the layout allows it)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def swiglu_triton(gate, up, out=None):
    """Same signature and result as ``swiglu_ref``; ``out`` (contiguous) receives the result."""
    _check(gate, up)
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.shape != gate.shape or out.dtype != gate.dtype or not out.is_contiguous():
        raise ValueError(f"swiglu: out must be contiguous {tuple(gate.shape)} {gate.dtype}")
    if out.numel() == 0:
        return out
    g2, u2 = _rows(gate), _rows(up)
    y2 = out.view(-1, gate.shape[-1])
    rows, Fdim = g2.shape
    _swiglu_kernel[(rows, triton.cdiv(Fdim, BLOCK))](g2, u2, y2, Fdim, g2.stride(0),
                                                     u2.stride(0), y2.stride(0),
                                                     BLOCK=BLOCK, num_warps=4)
    return out


def swiglu(gate, up, backend="auto"):
    """silu(gate) * up. backend: ref | triton | auto."""
    check_backend(backend)
    _check(gate, up)
    if resolve(backend, gate) == "triton":
        return swiglu_triton(gate, up)
    return swiglu_ref(gate, up)


def bench_cases(device, small: bool = False):
    """Llama-2-7B MLP (intermediate 11008) at 1, 16 and 4096 token rows."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    Fdim, row_counts = (176, (1, 7)) if small else (11008, (1, 16, 4096))
    has_triton = triton is not None and (dev.type == "cuda" or interpreter_on())
    esz = torch.empty((), dtype=dtype).element_size()
    cases = []
    for rows in row_counts:
        def setup(rows=rows):
            g = torch.randn(rows, Fdim, device=dev, dtype=dtype)
            u = torch.randn(rows, Fdim, device=dev, dtype=dtype)
            impls = {"ref": lambda: swiglu_ref(g, u)}
            if has_triton:
                impls["triton"] = lambda: swiglu_triton(g, u)
            return impls
        cases.append(BenchCase(op="swiglu", name=f"rows={rows} F={Fdim} {str(dtype)[6:]}",
                               setup=setup, bytes=3 * rows * Fdim * esz,
                               flops=5 * rows * Fdim, peers=("ref",),
                               meta={"rows": rows, "F": Fdim}))
    return cases
