"""swiglu: the Triton kernel (interpreter on CPU) against the eager reference."""
import importlib

import pytest
import torch

from tinyserve.ops import swiglu, swiglu_ref
from _fixtures import close

mod = importlib.import_module("tinyserve.ops.swiglu")
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 1e-3)]
# 1025 and 2049 straddle the 1024-element block; 1823 is an odd tail.
SHAPES = [(1,), (7,), (3, 123), (2, 1025), (2, 3, 1823), (1, 2049)]



@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_ref(shape, dtype, atol, rtol):
    torch.manual_seed(0)
    g, u = torch.randn(shape, dtype=dtype) * 4, torch.randn(shape, dtype=dtype)
    out = torch.full(shape, float("nan"), dtype=dtype)
    y = mod.swiglu_triton(g, u, out=out)
    assert y is out
    close(f"{shape} {dtype}", y, swiglu_ref(g, u), atol, rtol)


@pytest.mark.filterwarnings("ignore:overflow encountered")   # numpy, under the interpreter
@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
def test_extreme_gates(dtype, atol, rtol):
    """exp(-g) overflows for very negative g: the result must be -0 * up, not NaN."""
    g = torch.tensor([-1e4, -200.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 200.0, 3e4],
                     dtype=dtype)
    u = torch.linspace(-2, 2, g.numel(), dtype=dtype)
    y = mod.swiglu_triton(g, u)
    assert torch.isfinite(y).all()
    close(f"extreme {dtype}", y, swiglu_ref(g, u), atol, rtol)


def test_halves_of_fused_projection():
    """gate and up as the two halves of one [rows, 2F] projection (row stride 2F, no copy)."""
    torch.manual_seed(1)
    gu = torch.randn(3, 4, 2 * 300)
    g, u = gu[..., :300], gu[..., 300:]
    close("halves", mod.swiglu_triton(g, u), swiglu_ref(g, u), 1e-5, 1e-5)
    gt = torch.randn(50, 6).t()                 # non-unit stride along F: copied first
    close("transposed", mod.swiglu_triton(gt, gt), swiglu_ref(gt, gt), 1e-5, 1e-5)


def test_dispatch(monkeypatch):
    g, u = torch.randn(2, 16), torch.randn(2, 16)
    for backend in ("ref", "triton", "auto"):
        close(backend, swiglu(g, u, backend=backend), swiglu_ref(g, u), 1e-5, 1e-5)
    calls = []
    monkeypatch.setattr(mod, "swiglu_triton", lambda *a, **kw: calls.append("triton"))
    monkeypatch.setattr(mod, "swiglu_ref", lambda *a, **kw: calls.append("ref"))
    swiglu(g, u)                                   # auto on CPU tensors -> ref
    swiglu(g, u, backend="triton")                 # the interpreter is on (conftest)
    assert calls == ["ref", "triton"]
    with pytest.raises(ValueError, match="backend"):
        swiglu(g, u, backend="fast")


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_bad_arguments(backend):
    g = torch.randn(2, 16)
    for a, b, msg in [(g, torch.randn(2, 15), "same shape"), (g, g.half(), "same shape"),
                      (g.long(), g.long(), "floating"),
                      (torch.tensor(1.0), torch.tensor(1.0), "floating")]:
        with pytest.raises(ValueError, match=msg):
            swiglu(a, b, backend=backend)
    with pytest.raises(ValueError, match="out"):
        mod.swiglu_triton(g, g, out=torch.empty(2, 16).t())


def test_bench_cases_small():
    cases = mod.bench_cases("cpu", small=True)
    assert cases and all(c.op == "swiglu" and c.bytes > 0 and "ref" in c.peers for c in cases)
    for c in cases:
        impls = c.setup()
        torch.testing.assert_close(impls["triton"](), impls["ref"](), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 4096, 33])
def test_gpu_bf16(rows):
    torch.manual_seed(2)
    g = torch.randn(rows, 11008, device="cuda", dtype=torch.bfloat16) * 4
    u = torch.randn(rows, 11008, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(g, float("nan"))
    close(f"bf16 rows={rows}", mod.swiglu_triton(g, u, out=out), swiglu_ref(g, u), 2e-2, 1.6e-2)
