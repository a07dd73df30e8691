"""apply_rope: the Triton kernel (interpreter on CPU) against the eager reference."""
import importlib

import pytest
import torch

from tinyserve.ops import apply_rope, apply_rope_ref, rope_cos_sin
from tinyserve.ops.rope import rope_inv_freq
from _fixtures import close

mod = importlib.import_module("tinyserve.ops.rope")
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 1e-3)]
# (B, Hq, Hkv, T, D): tiny, non-power-of-2 half (12), SmolLM2's 9/3 heads x 64, and enough
# heads at D=128 / 256 that the kernel's head loop takes more than one step.
SHAPES = [(1, 1, 1, 1, 2), (2, 4, 2, 7, 24), (2, 9, 3, 13, 64), (1, 40, 8, 3, 128),
          (1, 20, 4, 2, 256)]



def _inputs(B, Hq, Hkv, T, D, dtype, transposed=True, device="cpu", start=0):
    if transposed:   # as the model makes them: [B, T, H, D] projections viewed as [B, H, T, D]
        q = torch.randn(B, T, Hq, D, dtype=dtype, device=device).transpose(1, 2)
        k = torch.randn(B, T, Hkv, D, dtype=dtype, device=device).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, T, D, dtype=dtype, device=device)
        k = torch.randn(B, Hkv, T, D, dtype=dtype, device=device)
    pos = torch.arange(T, device=device) + start + 31 * torch.arange(B, device=device)[:, None]
    cos, sin = rope_cos_sin(pos, rope_inv_freq(D, 10000.0))
    return q, k, cos, sin


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_ref(shape, transposed, dtype, atol, rtol):
    torch.manual_seed(0)
    q, k, cos, sin = _inputs(*shape, dtype, transposed, start=5)
    qo, ko = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    got = mod.apply_rope_triton(q, k, cos, sin, out=(qo, ko))
    assert got[0] is qo and got[1] is ko
    want = apply_rope_ref(q, k, cos, sin)
    close(f"q {shape}", got[0], want[0], atol, rtol)
    close(f"k {shape}", got[1], want[1], atol, rtol)


def test_layout_and_general_cos_sin():
    """Outputs keep the input layout; cos/sin halves need not repeat (the kernel reads both)."""
    torch.manual_seed(1)
    q, k, _, _ = _inputs(2, 4, 2, 5, 32, torch.float32)
    cos, sin = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    qo, ko = mod.apply_rope_triton(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    want = apply_rope_ref(q, k, cos, sin)
    close("q", qo, want[0], 1e-5, 1e-5)
    close("k", ko, want[1], 1e-5, 1e-5)
    # a contiguous output for a transposed input, and cos broadcast over the batch (stride 0)
    c1, s1 = cos[:1].expand(2, 5, 32), sin[:1].expand(2, 5, 32)
    outs = (torch.full((2, 4, 5, 32), float("nan")), torch.full((2, 2, 5, 32), float("nan")))
    got = mod.apply_rope_triton(q, k, c1, s1, out=outs)
    want = apply_rope_ref(q, k, c1, s1)
    close("q contiguous out", got[0], want[0], 1e-5, 1e-5)
    close("k contiguous out", got[1], want[1], 1e-5, 1e-5)


def test_dispatch(monkeypatch):
    q, k, cos, sin = _inputs(1, 2, 1, 3, 8, torch.float32)
    for backend in ("ref", "triton", "auto"):
        got = apply_rope(q, k, cos, sin, backend=backend)
        want = apply_rope_ref(q, k, cos, sin)
        close(backend, got[0], want[0], 1e-5, 1e-5)
    calls = []
    monkeypatch.setattr(mod, "apply_rope_triton", lambda *a, **kw: calls.append("triton"))
    monkeypatch.setattr(mod, "apply_rope_ref", lambda *a, **kw: calls.append("ref"))
    apply_rope(q, k, cos, sin)                      # auto on CPU tensors -> ref
    apply_rope(q, k, cos, sin, backend="triton")    # the interpreter is on (conftest)
    assert calls == ["ref", "triton"]
    with pytest.raises(ValueError, match="backend"):
        apply_rope(q, k, cos, sin, backend="gpu")


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_bad_arguments(backend):
    q, k, cos, sin = _inputs(2, 4, 2, 5, 16, torch.float32)
    bad = [((q[0], k, cos, sin), "B, H, T, D"),
           ((q, k[:, :, :4], cos, sin), "share"),
           ((q[..., :15], k[..., :15], cos[..., :15], sin[..., :15]), "even"),
           ((q, k, cos[:, :4], sin), "cos/sin"),
           ((q.long(), k, cos, sin), "floating")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            apply_rope(*args, backend=backend)


def test_bench_cases_small():
    cases = mod.bench_cases("cpu", small=True)
    assert cases and all(c.op == "rope" and c.bytes > 0 and "ref" in c.peers for c in cases)
    for c in cases:
        impls = c.setup()
        for g, w in zip(impls["triton"](), impls["ref"]()):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T", [(1, 1), (16, 1), (1, 4096), (3, 17)])
def test_gpu_bf16(B, T):
    torch.manual_seed(2)
    q, k, cos, sin = _inputs(B, 32, 8, T, 128, torch.bfloat16, device="cuda", start=1000)
    outs = (torch.full_like(q, float("nan")), torch.full_like(k, float("nan")))
    got = mod.apply_rope_triton(q, k, cos, sin, out=outs)
    want = apply_rope_ref(q, k, cos, sin)
    close("q bf16", got[0], want[0], 2e-2, 1.6e-2)
    close("k bf16", got[1], want[1], 2e-2, 1.6e-2)
