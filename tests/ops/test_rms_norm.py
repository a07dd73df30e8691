"""rms_norm: the Triton kernel (interpreter on CPU) against the eager reference."""
import importlib

import pytest
import torch

from tinyserve.ops import rms_norm, rms_norm_ref
from _fixtures import close

mod = importlib.import_module("tinyserve.ops.rms_norm")   # the module, not the function
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 1e-3)]
SHAPES = [(1, 1), (1, 7), (7, 123), (2, 3, 64), (3, 1823), (2, 8192)]



def _poisoned(like, dtype=None):
    return torch.full(like.shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_ref(shape, dtype, atol, rtol):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3
    w = torch.randn(shape[-1], dtype=dtype)
    out = _poisoned(x)
    y = mod.rms_norm_triton(x, w, 1e-6, out=out)
    assert y is out
    close(f"{shape} {dtype}", y, rms_norm_ref(x, w, 1e-6), atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("shape", [(1, 7), (7, 123), (2, 3, 1823)])
def test_fused_residual_matches_ref(shape, dtype, atol, rtol):
    torch.manual_seed(1)
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) * 4
    w = torch.randn(shape[-1], dtype=dtype)
    out, h_out = _poisoned(x), _poisoned(x)
    y, h = mod.rms_norm_triton(x, w, 1e-5, residual=r, out=out, residual_out=h_out)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-5, residual=r)
    close("h", h, h_ref, atol, rtol)
    close("y", y, y_ref, atol, rtol)
    # The fused path equals the two-step one; the reference's default behaviour is unchanged.
    torch.testing.assert_close(y_ref, rms_norm_ref(x + r, w, 1e-5))


def test_strided_input_and_weight_promotion():
    torch.manual_seed(2)
    base = torch.randn(5, 2 * 96, dtype=torch.float16)
    x = base[:, ::2]                                  # non-unit stride along D: copied
    xt = torch.randn(96, 5, dtype=torch.float16).t()  # transposed view
    w = torch.randn(96, dtype=torch.float32)          # fp32 weight promotes the output to fp32
    for inp in (x, xt):
        y = mod.rms_norm_triton(inp, w, 1e-6)
        assert y.dtype == torch.float32
        close("strided", y, rms_norm_ref(inp, w, 1e-6), 1e-3, 1e-3)
    rows = base.view(5, 2, 96)[:, 1]                   # row stride 192, unit stride in D: a view
    close("row-strided", mod.rms_norm_triton(rows, w, 1e-6), rms_norm_ref(rows, w, 1e-6),
           1e-3, 1e-3)


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(mod, "rms_norm_triton", lambda *a, **k: calls.append("triton") or "T")
    monkeypatch.setattr(mod, "rms_norm_ref", lambda *a, **k: calls.append("ref") or "R")
    x, w = torch.randn(2, 8), torch.ones(8)
    assert rms_norm(x, w, 1e-6) == "R"                      # auto on CPU tensors -> ref
    assert rms_norm(x, w, 1e-6, backend="ref") == "R"
    assert rms_norm(x, w, 1e-6, backend="triton") == "T"    # the interpreter is on (conftest)
    assert calls == ["ref", "ref", "triton"]
    with pytest.raises(ValueError, match="backend"):
        rms_norm(x, w, 1e-6, backend="cuda")


def test_dispatch_end_to_end():
    x, r, w = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40)
    for backend in ("ref", "triton", "auto"):
        y, h = rms_norm(x, w, 1e-6, residual=r, backend=backend)
        close(backend, y, rms_norm_ref(x + r, w, 1e-6), 1e-5, 1e-5)
        torch.testing.assert_close(h, x + r)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_bad_arguments(backend):
    x, w = torch.randn(3, 16), torch.ones(16)
    bad = [((x, torch.ones(15), 1e-6), {}, "weight"),
           ((x, torch.ones(16, 1), 1e-6), {}, "weight"),
           ((x.long(), w, 1e-6), {}, "floating"),
           ((x, w, 1e-6), {"residual": torch.randn(3, 15)}, "residual"),
           ((x, w, 1e-6), {"residual": torch.randn(3, 16).half()}, "residual")]
    for args, kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            rms_norm(*args, backend=backend, **kw)
    with pytest.raises(ValueError, match="out"):
        mod.rms_norm_triton(x, w, 1e-6, out=torch.empty(3, 16, dtype=torch.float16))


def test_bench_cases_small():
    cases = mod.bench_cases("cpu", small=True)
    assert cases and all(c.op == "rms_norm" and c.bytes > 0 and "ref" in c.peers for c in cases)
    for c in cases:
        impls = c.setup()
        want, got = impls["ref"](), impls["triton"]()
        for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,D", [(1, 4096), (16, 4096), (4096, 4096), (7, 8192), (33, 576)])
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_bf16(rows, D, fused):
    torch.manual_seed(3)
    dev, dt = "cuda", torch.bfloat16
    x, r = torch.randn(rows, D, device=dev, dtype=dt), torch.randn(rows, D, device=dev, dtype=dt)
    w = torch.randn(D, device=dev, dtype=dt)
    out, h_out = _poisoned(x), _poisoned(x)
    res = mod.rms_norm_triton(x, w, 1e-5, residual=r if fused else None, out=out,
                              residual_out=h_out if fused else None)
    want = rms_norm_ref(x, w, 1e-5, residual=r if fused else None)
    for g, wt in zip(*(t if isinstance(t, tuple) else (t,) for t in (res, want))):
        close(f"bf16 rows={rows} D={D}", g, wt, 2e-2, 1.6e-2)
