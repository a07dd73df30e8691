"""Quality metrics (tinyserve.quant.quality) on tiny models, the offline texts (calib.py), and
(slow) the CLI (tinyserve.quant.eval) on SmolLM2 with small settings."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as Fn

import _fixtures as fx
from tinyserve.model import Transformer
from tinyserve.quant import calib, quantizable_linears, quantize_model
from tinyserve.quant.eval import method_spec, quantized_copy
from tinyserve.quant.quality import (_windows, agreement, greedy_agreement, input_grams,
                                     layer_errors, perplexity, summarize_layers)


tiny_model = fx.tiny_model


def ids_of(n, V=300, seed=0):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


# ---- perplexity -------------------------------------------------------------------------------
@pytest.mark.parametrize("L,window,stride", [(100, 32, 32), (100, 32, 8), (65, 64, 64),
                                             (64, 64, 17), (10, 64, 64), (33, 32, 31)])
def test_windows_score_every_token_once(L, window, stride):
    scored = []
    for b, e, n in _windows(L, window, stride):
        assert 0 <= b < e <= L and e - b <= window and 1 <= n <= e - b - 1
        scored += range(e - n, e)
    assert scored == list(range(1, L))


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    m = tiny_model()
    with torch.no_grad():
        m.lm_head.weight.zero_()              # every logit 0: the uniform distribution
    r = perplexity(m, ids_of(150), window=32, stride=16, batch_size=3)
    assert r["ppl"] == pytest.approx(300, rel=1e-5)
    assert r["tokens"] == 149 and r["nll"] == pytest.approx(math.log(300), rel=1e-6)


def test_perplexity_equals_direct_cross_entropy():
    """One window covering the text: exp(mean CE of next-token predictions)."""
    m = tiny_model()
    ids = ids_of(40)
    logits = m.run(ids[None])[0]
    want = math.exp(float(Fn.cross_entropy(logits[:-1], ids[1:])))
    assert perplexity(m, ids, window=64)["ppl"] == pytest.approx(want, rel=1e-5)
    # shorter windows: less context, the same tokens scored once each
    r = perplexity(m, ids, window=16)
    assert r["tokens"] == 39 and math.isfinite(r["ppl"])


def _direct_nll(model, ids, window, stride):
    """Per-token NLL with the context spelled out, one forward per scored token: windows begin
    at 0, stride, 2 stride, ... and end window tokens later (or at the text's end); token t is
    scored by the first window that holds it and some context before it, so its context is
    ids[k * stride : t] for the smallest such k. Independent of quant.quality._windows."""
    L = ids.numel()
    nll = []
    for t in range(1, L):
        k = 0
        while min(k * stride + window, L) <= t:
            k += 1
        b = k * stride
        assert b < t and t - b < window          # at least one token of context, within a window
        logits = model.run(ids[b:t][None])[0, -1]
        nll.append(float(Fn.cross_entropy(logits[None], ids[t:t + 1])))
    return nll


@pytest.mark.parametrize("L,window,stride,batch", [(50, 16, 5, 2), (45, 10, 3, 3), (64, 16, 1, 4),
                                                   (37, 12, 12, 1), (30, 8, 7, 2), (40, 64, 10, 2),
                                                   (29, 9, 4, 1)])
def test_perplexity_windows_keep_their_context(L, window, stride, batch, one_thread):
    """The windowed perplexity equals a direct token-by-token computation with explicit context,
    so a window that kept less context than the recipe promises (or scored a token twice, or
    in the wrong window) changes the number."""
    m = tiny_model(seed=3)
    ids = ids_of(L, seed=L)
    r = perplexity(m, ids, window=window, stride=stride, batch_size=batch)
    want = _direct_nll(m, ids, window, min(stride, window - 1))
    assert r["tokens"] == L - 1 == len(want)
    assert r["nll"] == pytest.approx(sum(want) / len(want), rel=1e-5, abs=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(sum(want) / len(want)), rel=1e-5)


def test_perplexity_bad_arguments():
    m = tiny_model()
    with pytest.raises(ValueError):
        perplexity(m, ids_of(1), window=8)
    with pytest.raises(ValueError):
        perplexity(m, ids_of(10), window=8, stride=9)


# ---- agreement --------------------------------------------------------------------------------
def test_agreement_of_a_model_with_itself_is_one():
    m = tiny_model()
    prompts = [[5, 6, 7], [9], [1, 2, 3, 4, 5, 6]]
    r = greedy_agreement(m, m, prompts, max_new_tokens=6)
    assert r["prefix"] == r["tokens"] == r["exact"] == r["top1"] == 1.0


def test_agreement_counts():
    r = agreement([[1, 2, 3, 4], [1, 2, 3, 4]], [[1, 2, 9, 4], [1, 2, 3, 4]])
    assert r["prefix"] == pytest.approx((2 / 4 + 1) / 2)
    assert r["tokens"] == pytest.approx(7 / 8)
    assert r["exact"] == 0.5


def test_a_quantized_model_agrees_less_than_one_and_more_than_chance():
    m = tiny_model()
    q = quantize_model(copy.deepcopy(m), "int4", group_size=64)
    prompts = [[5, 6, 7], [9, 10], [1, 2, 3, 4, 5, 6], [42]]
    r = greedy_agreement(q, m, prompts, max_new_tokens=8)
    assert 0.3 < r["top1"] <= 1.0 and 0 <= r["prefix"] <= 1.0


# ---- layer errors -----------------------------------------------------------------------------
def test_layer_errors_match_the_activations():
    """output_rel from the Gram matrix equals ||X (W - Wq)^T|| / ||X W^T|| computed from the
    captured inputs themselves; weight_rel is the plain relative Frobenius error."""
    m = tiny_model()
    q = quantize_model(copy.deepcopy(m), "int4", group_size=32)
    ids = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(0))
    names = list(quantizable_linears(m))
    captured = {}
    hooks = [m.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, n=n: captured.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for n in names]
    m.run(ids, last_only=True)
    for h in hooks:
        h.remove()
    errs = layer_errors(m, q, input_grams(m, ids, names, batch_size=2))
    assert set(errs) == set(names)
    for n in names:
        x = torch.cat(captured[n])
        w = m.get_submodule(n).weight
        wq = q.get_submodule(n).qt.dequantize()
        want = float((x @ (w - wq).T).norm() / (x @ w.T).norm())
        assert errs[n]["output_rel"] == pytest.approx(want, rel=1e-3), n
        assert errs[n]["weight_rel"] == pytest.approx(float((w - wq).norm() / w.norm()), rel=1e-5)
    same = layer_errors(m, {n: m.get_submodule(n).weight for n in names},
                        input_grams(m, ids, names))
    assert all(v["weight_rel"] == 0 and v["output_rel"] == 0 for v in same.values())
    s = summarize_layers(errs)
    assert s["layers"] == len(names) and 0 < s["output_rel_mean"] <= s["output_rel_max"]


def test_finer_grids_have_smaller_layer_errors():
    m = tiny_model()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    grams = input_grams(m, ids, list(quantizable_linears(m)))
    err = {name: summarize_layers(layer_errors(m, quantized_copy(m, name), grams))
           ["output_rel_mean"] for name in ("int8", "int4-g32", "int4-g64", "rtn3-g64")}
    assert err["int4-g64"] < err["rtn3-g64"]
    assert err["int8"] < err["int4-g32"] < err["int4-g64"]


def test_method_spec():
    assert method_spec("int4-g64") == ("int4", {"group_size": 64})
    assert method_spec("gptq-g64") == ("gptq", {"group_size": 64})
    assert method_spec("gptq3-g128") == ("gptq", {"group_size": 128, "bits": 3})
    assert method_spec("rtn3-g64") == ("rtn", {"group_size": 64, "bits": 3})
    assert method_spec("none") == (None, {})
    with pytest.raises(ValueError, match="unknown method"):
        method_spec("int5")


# ---- the offline texts ------------------------------------------------------------------------
def test_calibration_and_heldout_texts_are_deterministic_and_disjoint():
    assert not set(calib.CALIB_MODULES) & set(calib.HELDOUT_MODULES)
    c, h = calib.calibration_text(), calib.heldout_text()
    assert len(c) > 50_000 and len(h) > 30_000
    assert " at 0x" not in c and " at 0x" not in h
    entries_c = set(c.split("\n\n"))
    # no held-out docstring entry appears in the calibration text
    for e in calib.module_docs("csv")[:5]:
        assert e not in entries_c
    calib._texts.cache_clear()
    assert calib.calibration_text() == c and calib.heldout_text() == h
    info = calib.text_info()
    assert info["calibration"]["modules"] == list(calib.CALIB_MODULES)


def test_calibration_ids_shape_and_spread():
    class Tok:   # one id per character: enough to check the windowing
        def encode(self, text, add_special_tokens=False):
            return [ord(ch) % 300 for ch in text]
    tok = Tok()
    ids = calib.calibration_ids(tok, n_samples=4, seq_len=64)
    assert ids.shape == (4, 64) and ids.dtype == torch.long
    stream = tok.encode(calib.calibration_text())
    assert ids[0].tolist() == stream[:64] and ids[-1].tolist() == stream[-64:]
    assert calib.heldout_ids(tok, 100).tolist() == tok.encode(calib.heldout_text())[:100]


# ---- the CLI (slow: the real model) -------------------------------------------------------------
@pytest.mark.slow
def test_cli_writes_the_quality_table(smollm2_file, tmp_path, capsys):
    from tinyserve.quant.eval import main
    out = tmp_path / "q.json"
    assert main(["--model", smollm2_file, "--methods", "none,int4-g32,int4-g64",
                 "--heldout-tokens", "128", "--window", "64", "--prompts", "2",
                 "--new-tokens", "4", "--calib-samples", "2", "--calib-len", "64",
                 "--threads", str(torch.get_num_threads()), "--no-progress",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"none", "int4-g32", "int4-g64"}
    # int4 g32 reproduces the file's Q4_1 weights: the same model, exactly
    assert rows["int4-g32"]["perplexity"]["ppl"] == pytest.approx(rows["none"]["perplexity"]["ppl"],
                                                                  rel=1e-5)
    assert rows["int4-g32"]["layer_summary"]["weight_rel_mean"] == 0
    assert rows["int4-g32"]["agreement"]["top1"] == 1.0
    assert rows["int4-g64"]["layer_summary"]["output_rel_mean"] > 0
    assert rows["int4-g64"]["layer_summary_heldout"]["output_rel_mean"] > 0
    # bits per weight of the linears as stored: 4 + 32/g for int4, fp32 for the reference
    assert rows["int4-g32"]["bits_per_weight"] == 5.0 and rows["int4-g64"]["bits_per_weight"] == 4.5
    assert rows["none"]["bits_per_weight"] == 32.0
    assert res["env"]["command"].startswith("python -m tinyserve.quant.eval")
    assert "perplexity" in capsys.readouterr().out
