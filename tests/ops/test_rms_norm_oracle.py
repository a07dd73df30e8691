"""rms_norm (reference and Triton kernel) against oracles that share none of its code:
``torch.nn.functional.rms_norm`` in fp64, and HF transformers' LlamaRMSNorm.

Inputs are scaled so that eps matters (a mean square near eps, and an all-zero row, where
y = 0 with eps and 0 * inf = NaN without): a reference that drops or misplaces eps fails here,
not only in the model-level tests. bf16 runs the elementwise kernel under the interpreter.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from _oracle import DEV, U32, roundings, unit, within

mod = importlib.import_module("tinyserve.ops.rms_norm")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (scale of x, eps): ordinary activations, and activations whose mean square (1e-6) is a tenth
# of eps, so that y depends on eps by a factor ~3.
REGIMES = [(3.0, 1e-6), (1e-3, 1e-5)]


def oracle(x, w, eps, r=None):
    """fp64 RMSNorm of x (+ r): torch's own rms_norm, or the definition on an old torch."""
    h = x.double() if r is None else x.double() + r.double()
    if hasattr(F, "rms_norm"):
        return F.rms_norm(h, (h.shape[-1],), w.double(), eps)
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def bound(exact, dtype, D, triton, fused):
    """Roundings of y: the normalised row cast to dtype, the weight product cast to dtype, and,
    fused, h = x + r rounded to dtype (that moves h_i and the row's rms: two more). The fp32
    statistics add at most ~D fp32 roundings (sum of D squares), halved by the square root."""
    k = 2 + (2 if fused else 0)
    rel = roundings(k, unit(dtype, triton)) + (D + 4) * U32
    fi = torch.finfo(dtype)
    return rel * exact.abs() + 4 * fi.tiny * fi.eps   # subnormal results: an absolute spacing


def inputs(shape, dtype, scale, fused, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    x.view(-1, shape[-1])[1] = 0                      # an all-zero row: eps is all that is left
    r = None
    if fused:
        r = torch.randn(shape, generator=g) * scale
        r.view(-1, shape[-1])[1] = 0
        r.view(-1, shape[-1])[2] = -x.view(-1, shape[-1])[2]   # h = x + r = 0 exactly
    w = torch.randn(shape[-1], generator=g)
    cast = lambda t: None if t is None else t.to(DEV, dtype)
    return cast(x), cast(w), cast(r)


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("scale,eps", REGIMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_functional_rms_norm(dtype, scale, eps, fused, impl):
    shape = (2, 3, 77)                 # D = 77: masked lanes in the kernel's 128-wide block
    x, w, r = inputs(shape, dtype, scale, fused, seed=0)
    fn = mod.rms_norm_ref if impl == "ref" else mod.rms_norm_triton
    res = fn(x, w, eps, residual=r)
    y, h = res if fused else (res, None)
    exact = oracle(x, w, eps, r)
    name = f"{impl} {dtype} scale={scale} eps={eps} fused={fused}"
    assert y.dtype == dtype
    within(name, y, exact, bound(exact, dtype, shape[-1], impl == "triton", fused))
    assert (y.view(-1, shape[-1])[1] == 0).all()     # the zero row (and, fused, h = 0 rows)
    if fused:
        hx = x.double() + r.double()
        within(name + " h", h, hx, unit(dtype, impl == "triton") * hx.abs())
        assert (y.view(-1, shape[-1])[2] == 0).all()


@pytest.mark.slow   # imports HF transformers (seconds)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_hf_llama_rms_norm(dtype):
    """HF's LlamaRMSNorm casts exactly as our reference does (fp32 statistics, cast to the
    input dtype before the weight multiply), so the two agree to the dtype's own tolerance."""
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    x, w, _ = inputs((4, 96), dtype, 1e-3, False, seed=1)
    norm = modeling.LlamaRMSNorm(96, eps=1e-5).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        want = norm(x)
    torch.testing.assert_close(mod.rms_norm_ref(x, w, 1e-5), want)
