"""GPTQ (tinyserve.quant.gptq and gptq_model): lower output error than round-to-nearest on
correlated inputs, exactly RTN with an identity Hessian, the int4 layout (same kernels), the
model-level method registered in quantize_model, and (slow) two blocks of the real SmolLM2."""
import copy

import pytest
import torch
import torch.nn.functional as Fn

import _fixtures as fx
from tinyserve.model import Transformer
from tinyserve.quant import (Int4Linear, Int4Weight, known_methods, quantizable_linears,
                             quantize_int4, quantize_model)
from tinyserve.quant import gptq_model as gptq_model_module
from tinyserve.quant.gptq import Hessian, gptq_quantize, output_error
from tinyserve.quant.gptq_model import gptq_model


def correlated_layer(N=48, K=256, n=1024, seed=0):
    """A weight [N, K] and inputs X [n, K] with strongly correlated features (as real
    activations are), and their Hessian."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + 0.2 * torch.eye(K)
    x = torch.randn(n, K, generator=g) @ mix
    h = Hessian(K)
    h.add(x[: n // 2])
    h.add(x[n // 2:])           # accumulates over batches
    return w, x, h.value()


def rel_out_err(x, w, wq):
    return float((x @ (w - wq).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_beats_rtn_on_correlated_inputs(group_size):
    w, x, H = correlated_layer()
    qg = gptq_quantize(w, H, group_size)
    qr = quantize_int4(w, group_size)
    eg, er = rel_out_err(x, w, qg.dequantize()), rel_out_err(x, w, qr.dequantize())
    assert eg < 0.85 * er, (eg, er)
    # output_error computes the same thing from H alone
    assert output_error(w, qg.dequantize(), H) == pytest.approx(eg, rel=1e-3)
    # ... at the price of a larger plain weight error (it trades it for output error)
    assert (w - qg.dequantize()).norm() > (w - qr.dequantize()).norm()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_identity_hessian_is_exactly_rtn(group_size):
    w, _, _ = correlated_layer(seed=1)
    r = quantize_int4(w, group_size)
    for H in (torch.eye(w.shape[1]), 3.0 * torch.eye(w.shape[1]), None):
        q = gptq_quantize(w, H, group_size)
        assert isinstance(q, Int4Weight) and q.group_size == group_size
        assert torch.equal(q.qweight, r.qweight)
        assert torch.equal(q.scales, r.scales) and torch.equal(q.mins, r.mins)


def test_block_size_does_not_change_the_result():
    """Lazy batch updates reorder arithmetic, not the algorithm."""
    w, _, H = correlated_layer(N=16, K=256, seed=2)
    a = gptq_quantize(w, H, 32, block_size=32).dequantize()
    b = gptq_quantize(w, H, 32, block_size=256).dequantize()
    assert (a - b).abs().max() < 1e-4 * w.abs().max()
    assert (a != b).float().mean() < 0.01


def test_fewer_bits_on_the_int4_layout():
    w, x, H = correlated_layer(seed=3)
    prev = 0.0
    for bits in (4, 3, 2):
        q = gptq_quantize(w, H, 64, bits=bits)
        assert int(q.codes().max()) <= 2 ** bits - 1
        r = gptq_quantize(w, None, 64, bits=bits)       # RTN on the same grid
        eg, er = rel_out_err(x, w, q.dequantize()), rel_out_err(x, w, r.dequantize())
        assert eg < er and eg > prev
        prev = eg


def test_the_kernel_layout_runs_it():
    """Same tensors as RTN int4: quant_linear (Triton under the interpreter) equals the ref."""
    from tinyserve.ops.quant_linear import quant_linear
    w, x, H = correlated_layer(N=32, K=128, n=256)
    qt = gptq_quantize(w, H, 64)
    xs = x[:3].contiguous()
    assert torch.allclose(quant_linear(xs, qt, backend="triton"),
                          Fn.linear(xs, qt.dequantize()), rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    w, _, H = correlated_layer(N=8, K=96, n=64)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, H, 32, bits=5)
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(w, H, 64)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, H, 48)
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(w, torch.eye(32), 32)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="nan"):
        gptq_quantize(bad, H, 32)


def test_singular_hessian_is_dampened():
    """Dead inputs (a column of zeros) and rank-deficient X: damping keeps Cholesky working."""
    w, x, _ = correlated_layer(N=8, K=64, n=16)        # n < K: H has rank 16
    x[:, 5] = 0
    h = Hessian(64)
    h.add(x)
    q = gptq_quantize(w, h.value(), 32)
    assert torch.isfinite(q.dequantize()).all()
    assert rel_out_err(x, w, q.dequantize()) < rel_out_err(x, w, quantize_int4(w, 32).dequantize())
    zero = gptq_quantize(w, torch.zeros(64, 64), 32)       # no signal at all: plain rounding
    assert torch.equal(zero.qweight, quantize_int4(w, 32).qweight)


# ---- the model-level method ------------------------------------------------------------------
tiny_model = fx.tiny_model


def calib(n=8, T=32, V=300, seed=0):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def test_gptq_is_a_registered_method():
    assert "gptq" in known_methods()


def test_quantize_model_gptq_replaces_every_linear_and_beats_rtn():
    from tinyserve.quant.quality import input_grams, layer_errors, summarize_layers
    ref = tiny_model()
    ids = calib()
    stats = {}
    q = quantize_model(copy.deepcopy(ref), "gptq", group_size=32, calib_ids=ids,
                       progress=False, stats=stats)
    targets = quantizable_linears(ref)
    assert "lm_head" in targets                          # untied: quantized too
    for name in targets:
        assert isinstance(q.get_submodule(name), Int4Linear), name
    assert q.quantization["method"] == "gptq" and q.quantization["group_size"] == 32
    # the method's own objective (inputs from the quantized prefix): lower in every layer
    for name, s in stats["layers"].items():
        assert s["gptq_output_rel"] < s["rtn_output_rel"], name
    # on the reference model's inputs, averaged over layers: lower than RTN int4 g32
    rtn = quantize_model(copy.deepcopy(ref), "int4", group_size=32)
    grams = input_grams(ref, ids, list(targets))
    eg = summarize_layers(layer_errors(ref, q, grams))["output_rel_mean"]
    er = summarize_layers(layer_errors(ref, rtn, grams))["output_rel_mean"]
    assert eg < er, (eg, er)
    # and end to end, on other token ids, the logits are closer to the reference's
    x = calib(4, 16, seed=5)
    want = ref.run(x)
    assert (q.run(x) - want).norm() < (rtn.run(x) - want).norm()


def test_gptq_default_group_size_and_bits():
    q = quantize_model(tiny_model(), "gptq", calib_ids=calib(4, 16), bits=3, progress=False)
    lin = q.layers[0].mlp.w_down
    assert lin.qt.group_size == 64 and int(lin.qt.codes().max()) <= 7


def test_gptq_errors_leave_the_model_unchanged(monkeypatch):
    m = tiny_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="bits"):
        quantize_model(m, "gptq", group_size=32, bits=5, calib_ids=calib())
    with pytest.raises(ValueError, match="calib_ids must lie"):
        quantize_model(m, "gptq", group_size=32, calib_ids=calib() + 1000)
    with pytest.raises(ValueError, match="calibration token ids"):
        quantize_model(m, "gptq", group_size=32)          # no source file, no ids
    # a failure half-way (here: the 4th layer) restores the weights already replaced
    real, calls = gptq_model_module.gptq_quantize, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return real(*a, **kw)
    monkeypatch.setattr(gptq_model_module, "gptq_quantize", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_model(m, "gptq", group_size=32, calib_ids=calib(), progress=False)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not getattr(m, "quantization", None)


def test_gptq_model_on_some_layers_only():
    """Targets in block 0 only: nothing else is touched, and block 1 is never run."""
    m = tiny_model()
    targets = {n: l for n, l in quantizable_linears(m).items() if n.startswith("layers.0.")}
    calls = []
    h = m.layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = gptq_model(m, targets, group_size=32, calib_ids=calib(), progress=False)
    finally:
        h.remove()
    assert set(out) == set(targets) and not calls


# ---- the real model ------------------------------------------------------------------------
@pytest.mark.slow
def test_gptq_on_two_blocks_of_smollm2_beats_rtn_g64(smollm2):
    """On the first two decoder blocks of SmolLM2, with the stdlib-docstring calibration text:
    every one of the 14 layers has a lower output error (on the reference model's inputs) with
    GPTQ than with round-to-nearest int4 at group size 64."""
    from tinyserve.quant.calib import calibration_ids
    from tinyserve.quant.quality import input_grams, layer_errors
    model, tok = smollm2
    m = copy.deepcopy(model)
    ids = calibration_ids(tok, n_samples=8, seq_len=256)
    targets = {n: l for n, l in quantizable_linears(m).items()
               if n.startswith(("layers.0.", "layers.1."))}
    qts = gptq_model(m, targets, group_size=64, calib_ids=ids, progress=False)
    rtn = {n: quantize_int4(l.weight, 64) for n, l in targets.items()}
    assert all(torch.equal(m.get_submodule(n).weight, model.get_submodule(n).weight)
               for n in targets)                                # weights restored
    grams = input_grams(model, ids, list(targets))
    eg, er = layer_errors(model, qts, grams), layer_errors(model, rtn, grams)
    for n in targets:
        assert eg[n]["output_rel"] < er[n]["output_rel"], (n, eg[n], er[n])
    mean = lambda e: sum(v["output_rel"] for v in e.values()) / len(e)   # noqa: E731
    assert mean(eg) < 0.8 * mean(er), (mean(eg), mean(er))
