"""The native CPU path (quant/cpu_native.py, ``load_model(native=True)``) against the fp32
reference, on tiny random GGUF files and on the real SmolLM2 file; and ``read_gguf``'s own
header parser against ``gguf.GGUFReader``.

Tolerance for logits: the native model runs bf16 activations (8 significant bits) through
every layer, int4 weights with bf16 scales/zeros, and int8 per-row requantized tables; the
reference is fp32 on the file's exact weights. Measured: ~1.5-2% of max |logit| on the tiny
2-layer models, 2.5-4% on SmolLM2's 30 layers. Bounds: 5% and 8% of max |logit|.
"""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import _fixtures as F
from tinyserve import load_model, loader
from tinyserve.kv_cache import KVCache
from tinyserve.loader import native_reason
from tinyserve.model import Linear
from tinyserve.ops import cpu_int4 as ci4, cpu_int8 as ci8
from tinyserve.quant import cpu_native as cn
from tinyserve.weights.gguf import GGUFError, read_gguf
from tinyserve.weights.gguf_blocks import PackedTensor

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not (ci4.int4pack_available() and ci8.int8pack_available()),
                                reason="this torch lacks the int4/int8 CPU kernels")
TINY_REL = 0.05
SMOLLM2_REL = 0.08
MIXED = {f"layers.{i}.attn.wq.weight": "Q8_0" for i in range(2)}   # wq Q8_0, wk/wv Q4_1
FILES = {   # name -> (tiny_config overrides, qtype, types)
    "Q4_1": ({}, "Q4_1", None),
    "Q8_0": ({}, "Q8_0", None),
    "F32": ({}, "F32", None),
    "mixed": ({}, "Q4_1", MIXED),
    # q/k/v of 64 rows each (hidden 64, 2 heads of 32) instead of 32/16/16
    "Q4_1-64rows": (dict(hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=32), "Q4_1",
                    None),
    "qwen2-bias": (dict(architecture="qwen2", attention_bias=True), "Q8_0", None),
}
KIND = {"Q4_1": ci4.Int4PackedWeight, "Q8_0": ci8.Int8PackedWeight, "F32": cn.DenseWeight}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("native")
    out = {}
    for name, (over, qtype, types) in FILES.items():
        c = F.tiny_config(**over)
        out[name] = F.write_gguf(d / f"{name}.gguf", c, F.random_state(c), qtype, types=types)
    return out


def _ids(vocab, B=2, T=12, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _assert_logits_close(got, want, rel, what):
    diff, top = (got.float() - want).abs().max().item(), want.abs().max().item()
    print(f"{what}: max |diff| {diff:.3g}, max |logit| {top:.3g} ({diff / top:.2%})")
    assert diff <= rel * top, f"{what}: max |logit diff| {diff:.3g} > {rel:.0%} of {top:.3g}"


@pytest.mark.parametrize("name", list(FILES))
def test_native_model_matches_reference(tiny_files, name):
    path = tiny_files[name]
    model, tok = load_model(path, device="cpu", native=True)
    ref, _ = load_model(path, device="cpu", dtype=torch.float32)
    assert model.dtype == torch.bfloat16 and model.backend == "native"
    assert isinstance(model.embed, cn.NativeEmbedding)
    assert isinstance(model.lm_head, cn.NativeLinear) and model.lm_head.out_dtype == torch.float32
    qtype = FILES[name][1]
    for blk in model.layers:
        a, m = blk.attn, blk.mlp
        if name == "mixed":   # formats differ: q/k/v stay three calls
            assert a.wqkv is None
            assert isinstance(a.wq.w, ci8.Int8PackedWeight)
            assert isinstance(a.wk.w, ci4.Int4PackedWeight)
            assert isinstance(a.wv.w, ci4.Int4PackedWeight)
        else:
            assert a.wq is None and a.wk is None and a.wv is None
            assert isinstance(a.wqkv, cn.NativeLinear) and isinstance(a.wqkv.w, KIND[qtype])
            assert a.wqkv.w.out_features == sum(ref.layers[0].attn.qkv_sizes)
            assert (a.wqkv.bias is not None) == ref.config.attention_bias
        assert m.w_gate is None and m.w_up is None and isinstance(m.w_gate_up.w, KIND[qtype])
        assert isinstance(a.wo, cn.NativeLinear) and isinstance(m.w_down, cn.NativeLinear)
    ids = _ids(model.config.vocab_size)
    _assert_logits_close(model.run(ids), ref.run(ids), TINY_REL, name)


def test_fused_int4_equals_parts():
    """A fused weight (the parts' Q4_1 rows stacked, packed once) must equal the parts stacked,
    whatever the part sizes (the tiny models' q 32, k 16, v 16 rows; 64-row parts). Packing
    the parts apart and concatenating does not work: the int4 packing interleaves 64-row tiles."""
    g = torch.Generator().manual_seed(0)
    for rows in [(64, 64), (32, 16, 16)]:
        parts = [PackedTensor(f"p{n}", "Q4_1", (n, 64),
                              F.encode_tensor(torch.randn(n, 64, generator=g).numpy(), "Q4_1")[0])
                 for n in rows]
        fused = cn.native_weight(cn.stack_rows(parts))
        want = torch.cat([ci4.pack_q4_1(p, compute_dtype=cn.COMPUTE_DTYPE).dequantize()
                          for p in parts])
        assert torch.equal(fused.dequantize(), want), f"fuse of {rows} rows"


def test_dense_prefill_matches_per_row_path(tiny_files):
    """From DENSE_ROWS rows on, NativeLinear multiplies by the weights decoded from the file's
    blocks (dense bf16); below, the int4/int8 kernels. A 100-token prompt in one call (dense)
    against the same tokens in chunks of 50 through a KV cache (kernels): the weights differ
    only by bf16 rounding of scales, so the same tolerance as against the reference."""
    path = tiny_files["Q4_1-64rows"]
    model, _ = load_model(path, device="cpu", native=True)
    T = 100
    assert T >= cn.DENSE_ROWS > T // 2
    ids = _ids(model.config.vocab_size, B=1, T=T, seed=1)
    calls = []
    orig = cn.NativeLinear.dense
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cn.NativeLinear, "dense", lambda self: calls.append(1) or orig(self))
        dense = model.run(ids)
        assert calls, "a 100-token prompt did not take the dense path"
        calls.clear()
        cache = KVCache(model.config, 1, T, dtype=model.dtype)
        rows = torch.cat([model.run(ids[:, :50], cache), model.run(ids[:, 50:], cache)], dim=1)
        assert not calls
    _assert_logits_close(rows, dense.float(), TINY_REL, "per-row vs dense")


def test_native_reason(tiny_files, tmp_path, monkeypatch):
    gg = Path(tiny_files["Q4_1"])
    cpu = torch.device("cpu")
    assert native_reason(gg, cpu, None) is None
    assert "cuda" in native_reason(gg, torch.device("cuda"), None)   # only .type is read
    assert "float32" in native_reason(gg, cpu, "float32")
    assert native_reason(gg, cpu, torch.bfloat16) is not None
    hf = tmp_path / "hf"
    hf.mkdir()
    assert "GGUF" in native_reason(hf, cpu, None)
    monkeypatch.setattr(loader, "int8pack_available", lambda: False)   # the name it calls
    assert "int4/int8" in native_reason(gg, cpu, None)


def test_native_with_dtype_loads_reference(tiny_files):
    model, _ = load_model(tiny_files["Q4_1"], device="cpu", native=True, dtype="float32")
    assert model.dtype == torch.float32 and not cn.native_linears(model)
    assert isinstance(model.layers[0].attn.wq, Linear) and model.layers[0].attn.wqkv is None


def test_llm_default_is_native_on_cpu(tiny_files):
    from tinyserve import LLM
    path = str(tiny_files["Q4_1"])
    assert cn.native_linears(LLM(path, device="cpu").model)
    assert not cn.native_linears(LLM(path, device="cpu", dtype="float32").model)
    # a quantization method applies to the (dequantized) reference model
    llm = LLM(path, device="cpu", quantization="int8")
    assert not cn.native_linears(llm.model) and llm.model.dtype == torch.float32


def test_int4_quantization_runs_on_the_int4_kernel(tiny_files):
    """quantize_model(.., "int4") layers moved onto the int4 CPU kernel compute the same
    product (the mapping is exact; bf16 compute rounds scales, x and y: TINY_REL), layers
    the kernel cannot take stay, and LLM(quantization="int4") does the move on the CPU."""
    from tinyserve import LLM
    from tinyserve.quant import quantize_model
    from tinyserve.quant.linear import QuantLinear
    path = tiny_files["Q4_1"]
    ref, _ = load_model(path, device="cpu", dtype=torch.float32)
    quantize_model(ref, "int4", group_size=32)
    fast = copy.deepcopy(ref)
    n_quant = sum(isinstance(m, QuantLinear) for m in fast.modules())
    assert cn.int4_to_native(fast) == n_quant > 0
    assert not any(isinstance(m, QuantLinear) for m in fast.modules())
    ids = _ids(ref.config.vocab_size)
    _assert_logits_close(fast.run(ids), ref.run(ids), TINY_REL, "int4 kernel vs QuantLinear")
    assert cn.int4_to_native(fast) == 0                      # nothing left to move
    other, _ = load_model(path, device="cpu", dtype=torch.float32)
    quantize_model(other, "int8")
    assert cn.int4_to_native(other) == 0                     # not int4: left alone
    llm = LLM(str(path), device="cpu", quantization={"method": "int4", "group_size": 32})
    assert len(cn.native_linears(llm.model)) == n_quant


# ---- read_gguf's own parser vs gguf.GGUFReader -------------------------------------------
def _check_against_reader(path):
    g, reader = read_gguf(path), gguf.GGUFReader(str(path))
    header = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}   # reader-only fields
    assert set(g.metadata) == set(reader.fields) - header
    for key, field in reader.fields.items():
        if key not in header:
            assert g.metadata[key] == field.contents(), key
    assert set(g.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        pt = g.tensors[t.name]
        assert pt.qtype == t.tensor_type.name, t.name
        assert pt.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert np.array_equal(pt.data, t.data), t.name
    return g


def test_read_gguf_matches_gguf_reader_tiny(tiny_files, tmp_path):
    g = _check_against_reader(tiny_files["mixed"])
    assert {pt.qtype for pt in g.tensors.values()} == {"Q4_1", "Q8_0", "F32"}
    # a truncated file still fails cleanly (the full set of cases: test_loaders.py)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(Path(tiny_files["mixed"]).read_bytes()[:-7])
    with pytest.raises(GGUFError, match="past the end"):
        read_gguf(bad)


def test_read_gguf_matches_gguf_reader_smollm2(smollm2_file):
    g = _check_against_reader(smollm2_file)
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152


# ---- the real model -----------------------------------------------------------------------
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]


def test_smollm2_native_teacher_forced(smollm2, smollm2_file):
    """Prompt + the reference's 16 greedy tokens through both models: logits within
    SMOLLM2_REL of max |logit|, and the same argmax wherever the reference's top-1 leads its
    top-2 by more than twice that bound (closer calls may flip under bf16 rounding)."""
    from tinyserve.quant.quality import greedy_tokens
    ref, tok = smollm2
    model, _ = load_model(smollm2_file, device="cpu", native=True)
    assert model.dtype == torch.bfloat16 and cn.native_linears(model)
    prompts = [tok.encode(p) for p in PROMPTS]
    for p, cont in zip(prompts, greedy_tokens(ref, prompts, 16)):
        ids = torch.tensor([p + cont])
        want, got = ref.run(ids)[0], model.run(ids)[0]
        bound = SMOLLM2_REL * want.abs().max().item()
        _assert_logits_close(got, want, SMOLLM2_REL, repr(tok.decode(p)))
        top2 = want.topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * bound
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
