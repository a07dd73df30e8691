"""The weight loaders on tiny files written here: GGUF (every type we decode) and HF
safetensors directories (LLaMA and Qwen2, tied/untied, sharded, llama3 RoPE scaling), checked
against the gguf package's decoding and HF transformers' logits; then every kind of broken input,
which must fail with a clear error naming the problem (never a crash from deep inside)."""
import dataclasses
import json
import pickle
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import _fixtures as F
from tinyserve.config import ConfigError, ModelConfig
from tinyserve.model import Transformer, WeightsError
from tinyserve.weights.safetensors import CheckpointError, load_hf_dir

from tinyserve.weights.gguf import (
    BLOCK_FORMATS, GGUFError, dequantize, load_gguf, read_gguf, unpermute_rows)

try:  # the GPU machine has no gguf package: the HF-directory tests still run there
    import gguf
except ImportError:
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="needs the gguf package")


def _ids(vocab, batch=2, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _model(config, state):
    m = Transformer(config).eval()
    m.load_weights(state, "test")
    return m


def _same_config(a: ModelConfig, b: ModelConfig, fields=("vocab_size", "hidden_size",
                 "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "tie_word_embeddings", "attention_bias", "architecture")):
    for f in fields:
        assert getattr(a, f) == getattr(b, f), f


# =========================================================================================
# config helpers
# =========================================================================================
@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True},
                                {"attention_bias": True, "architecture": "qwen2"},
                                {"num_kv_heads": 4, "head_dim": 16}])
def test_weight_shapes_are_what_the_model_expects(kw):
    c = F.tiny_config(**kw)
    shapes = c.weight_shapes()
    assert shapes == Transformer(c).expected_shapes() == F.canonical_shapes(c)
    assert sum(int(np.prod(s)) for s in shapes.values()) == c.num_parameters()


def test_unpermute_rows_inverts_llama_cpp_permute():
    w = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    for heads in (1, 2, 3, 6):
        p = F.llama_cpp_permute(w, heads)
        assert not np.array_equal(p, w)
        assert np.array_equal(unpermute_rows(p, heads), w)
        assert torch.equal(unpermute_rows(torch.from_numpy(p), heads), torch.from_numpy(w))


# =========================================================================================
# HF directories against transformers
# =========================================================================================
HF_CASES = [("llama", False, False), ("llama", True, False), ("llama", False, True),
            ("llama", True, True), ("qwen2", False, False), ("qwen2", True, True)]


@pytest.mark.parametrize("arch,tie,shard", HF_CASES,
                         ids=[f"{a}-{'tied' if t else 'untied'}-{'sharded' if s else 'single'}"
                              for a, t, s in HF_CASES])
def test_hf_dir_matches_transformers(tmp_path, arch, tie, shard):
    d, hf = F.write_hf_dir(tmp_path / "ckpt", arch, tie=tie, shard=shard)
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert (d / "model.safetensors.index.json").is_file() == shard
    assert (len(shards) > 1) == shard
    config, state = load_hf_dir(d)
    assert config.architecture == arch
    assert config.tie_word_embeddings == tie
    assert config.attention_bias == (arch == "qwen2")
    assert ("lm_head.weight" in state) == (not tie)
    assert all(t.dtype == torch.float32 for t in state.values())
    ids = _ids(config.vocab_size)
    with torch.no_grad():
        theirs = hf(ids).logits
    ours = _model(config, state).run(ids)
    diff = (ours - theirs).abs().max().item()
    print(f"{arch} tie={tie} shard={shard}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
    assert theirs.abs().max() > 1.0  # the comparison is not between two near-zero outputs


def test_hf_dir_bf16_load_is_the_fp32_weights_rounded(tmp_path):
    d, _ = F.write_hf_dir(tmp_path / "ckpt")
    _, s32 = load_hf_dir(d)
    _, s16 = load_hf_dir(d, torch.bfloat16)
    assert s16.keys() == s32.keys()
    for k in s32:
        assert s16[k].dtype == torch.bfloat16
        assert torch.equal(s16[k], s32[k].to(torch.bfloat16))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def test_hf_llama3_rope_scaling_matches_transformers(tmp_path):
    d, hf = F.write_hf_dir(tmp_path / "ckpt", rope_scaling=dict(LLAMA3))
    config, state = load_hf_dir(d)
    assert config.rope_scaling and config.rope_scaling["rope_type"] == "llama3"
    assert config.rope_scaling["factor"] == 8.0
    ids = _ids(config.vocab_size, length=48)
    with torch.no_grad():
        theirs = hf(ids).logits
    ours = _model(config, state).run(ids)
    diff = (ours - theirs).abs().max().item()
    print(f"llama3 rope: max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
    # ... and the scaling matters at these positions (else the test would prove nothing)
    plain = _model(dataclasses.replace(config, rope_scaling=None), state).run(ids)
    assert (plain - theirs).abs().max().item() > 1e-3


def test_hf_config_legacy_rope_scaling_key(tmp_path):
    """Older config.json files carry ``rope_scaling`` and a top-level ``rope_theta``."""
    d, hf = F.write_hf_dir(tmp_path / "ckpt", rope_scaling=dict(LLAMA3))
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or cfg.pop("rope_scaling")
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    cfg["rope_scaling"] = rope
    (d / "config.json").write_text(json.dumps(cfg))
    config, state = load_hf_dir(d)
    assert config.rope_scaling["rope_type"] == "llama3"
    ids = _ids(config.vocab_size, length=48)
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (_model(config, state).run(ids) - theirs).abs().max().item() <= 1e-4


def _tokenizer_available():
    try:
        import tinyserve.tokenizer  # noqa: F401
        return True
    except ImportError:
        return False


needs_tokenizer = pytest.mark.skipif(not _tokenizer_available(),
                                     reason="tinyserve.tokenizer not importable yet")


@needs_tokenizer
def test_load_model_hf_dir(tmp_path):
    from tinyserve import load_model
    d, hf = F.write_hf_dir(tmp_path / "ckpt", "qwen2", tie=True, shard=True)
    model, tok = load_model(str(d), device="cpu", dtype=torch.float32)
    ids = torch.tensor([tok.encode("The capital of France is Paris.")])
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (model.run(ids) - theirs).abs().max().item() <= 1e-4
    assert model.packed_weights == {}
    assert model.source == str(d)


@needs_tokenizer
def test_load_model_bf16_keeps_rope_frequencies_fp32(tmp_path):
    from tinyserve import load_model
    d, _ = F.write_hf_dir(tmp_path / "ckpt", rope_scaling=dict(LLAMA3))
    m32, _ = load_model(str(d), device="cpu", dtype=torch.float32)
    m16, _ = load_model(str(d), device="cpu", dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16
    assert m16.inv_freq.dtype == torch.float32
    assert torch.equal(m16.inv_freq, m32.inv_freq)


# =========================================================================================
# GGUF: decoding, round trips, packed tensors
# =========================================================================================
@pytest.mark.parametrize("qtype", F.GGUF_TYPES + ("BF16",))
@needs_gguf
def test_dequantize_equals_gguf_package(qtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 96)) * np.logspace(-3, 2, 96)).astype(np.float32)
    x[3] = 0.0                                   # an all-zero block (scale 0)
    x[4, :32] = 5.0                              # a constant block
    t = gguf.GGMLQuantizationType[qtype]
    data = x if qtype == "F32" else gguf.quants.quantize(x, t)
    if qtype == "F16":
        data = x.astype(np.float16)
    theirs = gguf.quants.dequantize(data, t).astype(np.float32).reshape(x.shape)
    if qtype == "BF16":  # the reader hands BF16 over as raw bytes
        data = data.view(np.uint8)
    ours = dequantize(data, qtype, x.shape).float()
    assert ours.shape == x.shape
    assert torch.equal(ours, torch.from_numpy(theirs))


@pytest.mark.parametrize("qtype", F.GGUF_TYPES)
@needs_gguf
def test_gguf_roundtrip(tmp_path, qtype):
    c = F.tiny_config()
    orig = F.random_state(c)
    path = F.write_gguf(tmp_path / f"tiny-{qtype}.gguf", c, orig, qtype)
    config, state, packed, g = load_gguf(path)
    _same_config(config, c)
    assert config.rope_theta == c.rope_theta
    assert config.max_position_embeddings == c.max_position_embeddings
    assert abs(config.rms_norm_eps - c.rms_norm_eps) < 1e-12
    assert g.metadata["tokenizer.ggml.tokens"] == F.bpe_vocab()[0]

    # the weights: exactly the originals decoded from qtype, Q/K rows back in HF order
    expected = F.gguf_expected_state(c, orig, qtype)
    assert state.keys() == expected.keys()
    for k in expected:
        assert torch.equal(state[k], expected[k]), k
    if qtype == "F32":
        for k in orig:
            assert torch.equal(state[k], orig[k]), k
    else:  # the quantization error is that of the format, not of a mix-up
        rel = max(((state[k] - orig[k]).norm() / orig[k].norm()).item() for k in orig)
        assert rel < {"F16": 1e-3, "Q8_0": 1e-2, "Q4_0": 0.2, "Q4_1": 0.2}[qtype]

    # the model built from them computes what a model of the expected weights computes
    ids = _ids(c.vocab_size)
    ours = _model(config, state).run(ids)
    ref = _model(c, expected).run(ids)
    assert (ours - ref).abs().max().item() <= 1e-5

    # packed block tensors: every matrix, in file encoding, rows consistent with the state dict
    if qtype in BLOCK_FORMATS:
        matrices = {k for k, v in orig.items() if v.dim() == 2}
        assert set(packed) == matrices
        block, nbytes = BLOCK_FORMATS[qtype]
        for name, pt in packed.items():
            assert pt.qtype == qtype
            assert pt.shape == tuple(state[name].shape)
            assert pt.data.dtype == np.uint8
            assert pt.data.shape == (pt.shape[0], pt.shape[1] // block * nbytes)
            assert pt.nbytes == pt.data.size
            assert torch.equal(pt.dequantize(), state[name]), name
    else:
        assert packed == {}


@needs_gguf
def test_gguf_qk_permutation_matches_transformers(tmp_path):
    """Weights of an HF LlamaForCausalLM, written the way convert_hf_to_gguf.py does (Q/K rows
    permuted), must load into a model that computes HF's logits."""
    hf = F.hf_model("llama")
    hf_to_canon = {
        "model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "mlp_norm.weight",
             "self_attn.q_proj.weight": "attn.wq.weight",
             "self_attn.k_proj.weight": "attn.wk.weight",
             "self_attn.v_proj.weight": "attn.wv.weight",
             "self_attn.o_proj.weight": "attn.wo.weight",
             "mlp.gate_proj.weight": "mlp.w_gate.weight", "mlp.up_proj.weight": "mlp.w_up.weight",
             "mlp.down_proj.weight": "mlp.w_down.weight"}
    state = {}
    for k, v in hf.state_dict().items():
        if k in hf_to_canon:
            state[hf_to_canon[k]] = v
        else:
            _, _, i, rest = k.split(".", 3)
            state[f"layers.{i}.{layer[rest]}"] = v
    c = F.tiny_config(rms_norm_eps=hf.config.rms_norm_eps)
    path = F.write_gguf(tmp_path / "from-hf.gguf", c, state, "F32")
    config, loaded, _, _ = load_gguf(path)
    ids = _ids(c.vocab_size)
    with torch.no_grad():
        theirs = hf(ids).logits
    assert (_model(config, loaded).run(ids) - theirs).abs().max().item() <= 1e-4


@needs_gguf
def test_gguf_qwen2_has_biases_and_no_permutation(tmp_path):
    c = F.tiny_config(architecture="qwen2", attention_bias=True)
    orig = F.random_state(c)
    path = F.write_gguf(tmp_path / "qwen2.gguf", c, orig, "Q8_0")
    config, state, packed, _ = load_gguf(path)
    assert config.architecture == "qwen2" and config.attention_bias
    expected = F.gguf_expected_state(c, orig, "Q8_0")
    for k in expected:
        assert torch.equal(state[k], expected[k]), k
    assert torch.equal(packed["layers.0.attn.wq.weight"].dequantize(),
                       state["layers.0.attn.wq.weight"])


@needs_gguf
def test_gguf_tied_embeddings(tmp_path):
    c = F.tiny_config(tie_word_embeddings=True)
    orig = F.random_state(c)
    config, state, packed, _ = load_gguf(F.write_gguf(tmp_path / "tied.gguf", c, orig, "Q4_0"))
    assert config.tie_word_embeddings
    assert "lm_head.weight" not in state
    _model(config, state)  # loads: names and shapes complete


@needs_gguf
def test_gguf_rope_freqs_tensor(tmp_path):
    c = F.tiny_config()
    factors = np.array([1.0, 2.0, 4.0, 8.0], dtype=np.float32)
    path = F.write_gguf(tmp_path / "l3.gguf", c, F.random_state(c),
                        raw_tensors={"rope_freqs.weight": (factors, None)})
    config, state, _, _ = load_gguf(path)
    assert torch.equal(config.extra["rope_freq_factors"], torch.from_numpy(factors))
    assert "rope_freqs.weight" not in state


@needs_tokenizer
@needs_gguf
def test_load_model_gguf(tmp_path):
    from tinyserve import load_model
    c = F.tiny_config()
    orig = F.random_state(c)
    path = F.write_gguf(tmp_path / "tiny.gguf", c, orig, "Q4_1")
    model, tok = load_model(str(path), device="cpu", dtype=torch.float32)
    ids = torch.tensor([tok.encode("The capital of France is Paris.")])
    ref = _model(c, F.gguf_expected_state(c, orig, "Q4_1")).run(ids)
    assert (model.run(ids) - ref).abs().max().item() <= 1e-5
    assert set(model.packed_weights) == {k for k, v in orig.items() if v.dim() == 2}
    assert torch.equal(model.packed_weights["layers.1.attn.wk.weight"].dequantize(),
                       model.layers[1].attn.wk.weight)


@pytest.mark.slow
@needs_gguf
def test_real_smollm2_packed_qk_rows_equal_loaded_weights(smollm2_file):
    config, state, packed, _ = load_gguf(smollm2_file)
    assert config.num_layers == 30 and config.num_heads == 9 and config.num_kv_heads == 3
    qtypes = set()
    for i in range(config.num_layers):
        for proj in ("wq", "wk"):
            name = f"layers.{i}.attn.{proj}.weight"
            pt = packed[name]
            qtypes.add(pt.qtype)
            assert torch.equal(pt.dequantize(), state[name]), name
    assert qtypes <= set(BLOCK_FORMATS)
    # the rest of the packed tensors too
    for name, pt in packed.items():
        assert torch.equal(pt.dequantize(), state[name]), name


# =========================================================================================
# broken input: each fails with its own clear error
# =========================================================================================
@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    """A valid Q4_1 file (tokenizer metadata included) that tests copy and then damage."""
    c = F.tiny_config()
    path = F.write_gguf(tmp_path_factory.mktemp("good") / "good.gguf", c, F.random_state(c),
                        "Q4_1")
    load_gguf(path)  # it is fine before damage
    return path


@pytest.fixture
def bad_gguf(good_gguf, tmp_path):
    p = tmp_path / "damaged.gguf"
    shutil.copy(good_gguf, p)
    return p


def _raises(exc, fn, *args, must_name=(), **kw):
    t0 = time.perf_counter()
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    assert time.perf_counter() - t0 < 10, "took too long to fail"
    msg = str(info.value)
    print(f"{type(info.value).__name__}: {msg}")
    for s in must_name:
        assert str(s) in msg, f"{s!r} not in {msg!r}"
    return msg


def test_missing_files(tmp_path):
    from tinyserve.loader import resolve_source
    _raises(FileNotFoundError, load_gguf, tmp_path / "nope.gguf", must_name=["nope.gguf"])
    _raises(FileNotFoundError, read_gguf, tmp_path / "nope.gguf", must_name=["nope.gguf"])
    _raises(FileNotFoundError, load_hf_dir, tmp_path / "nodir", must_name=["nodir"])
    _raises(FileNotFoundError, resolve_source, str(tmp_path / "nope.gguf"),
            must_name=["nope.gguf"])


@needs_gguf
def test_gguf_path_is_a_directory(tmp_path):
    _raises(GGUFError, load_gguf, tmp_path, must_name=[tmp_path.name, "not a file"])


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    _raises(GGUFError, load_gguf, p, must_name=["empty.gguf", "not a GGUF file"])


@pytest.mark.parametrize("where", ["magic", "header", "metadata-key", "tokens-array",
                                   "tensor-info", "before-data", "tensor-data", "last-byte"])
@needs_gguf
def test_truncated_gguf(bad_gguf, where):
    lay = F.gguf_layout(bad_gguf)
    kv = lay["kv"]["tokenizer.ggml.tokens"]
    last = max(lay["tensors"], key=lambda n: lay["tensors"][n]["data_pos"])
    cut = {"magic": 2, "header": 13, "metadata-key": lay["kv_start"] + 5,
           "tokens-array": (kv["value_pos"] + kv["end"]) // 2,
           "tensor-info": (lay["tensor_info_start"] + lay["data_start"]) // 2,
           "before-data": lay["data_start"] - 1,
           "tensor-data": lay["tensors"][last]["data_pos"] + 7,
           "last-byte": lay["size"] - 1}[where]
    data = bad_gguf.read_bytes()[:cut]
    bad_gguf.write_bytes(data)
    must = ["damaged.gguf", "not a GGUF file" if where == "magic" else "truncated"]
    if where in ("tensor-data", "last-byte"):
        must.append(last)
    _raises(GGUFError, load_gguf, bad_gguf, must_name=must)


@needs_gguf
def test_wrong_magic(bad_gguf):
    F.patch_bytes(bad_gguf, 0, b"GGML")
    _raises(GGUFError, load_gguf, bad_gguf, must_name=["damaged.gguf", "not a GGUF file"])


@needs_gguf
def test_unsupported_version(bad_gguf):
    F.patch_bytes(bad_gguf, 4, struct.pack("<I", 1))
    _raises(GGUFError, load_gguf, bad_gguf, must_name=["damaged.gguf", "version 1"])


@pytest.mark.parametrize("seed", range(3))
@needs_gguf
def test_random_bytes(tmp_path, seed):
    rng = np.random.default_rng(seed)
    p = tmp_path / "random.gguf"
    p.write_bytes(rng.bytes(4096))
    _raises(GGUFError, load_gguf, p, must_name=["random.gguf", "not a GGUF file"])
    # the same behind a valid magic and version: the header parser must cope too
    p.write_bytes(b"GGUF" + struct.pack("<I", 3) + rng.bytes(4096))
    _raises(GGUFError, load_gguf, p, must_name=["random.gguf"])


@needs_gguf
def test_random_header_damage_never_crashes(good_gguf, tmp_path):
    """Flip bytes in the header (metadata and tensor infos) of a valid file: every result must
    be a clean load or a GGUFError, quickly (no IndexError, struct.error, hang, huge alloc)."""
    lay = F.gguf_layout(good_gguf)
    good = bytearray(good_gguf.read_bytes())
    rng = np.random.default_rng(1234)
    p = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    t0 = time.perf_counter()
    for trial in range(400):
        data = bytearray(good)
        # damage favours the places that steer parsing: lengths, counts, types, dims, offsets
        lo = lay["tensor_info_start"] if trial % 2 else 8  # half the trials: tensor infos only
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(lo, lay["data_start"]))
            data[pos] = int(rng.integers(0, 256))
        p.write_bytes(bytes(data))
        try:
            load_gguf(p)
            outcomes["ok"] += 1
        except GGUFError as e:
            assert "fuzz.gguf" in str(e)
            outcomes["error"] += 1
    print(outcomes, f"{time.perf_counter() - t0:.1f}s")
    assert outcomes["error"] > 100
    assert time.perf_counter() - t0 < 40


@pytest.mark.parametrize("key", ["tokenizer.ggml.token_type", "tokenizer.ggml.tokens"])
@needs_gguf
def test_huge_metadata_array_length_fails_fast(bad_gguf, key):
    """An array whose length runs past the end of the file (gguf's reader would loop on it)."""
    kv = F.gguf_layout(bad_gguf)["kv"][key]
    F.patch_bytes(bad_gguf, kv["value_pos"] + 4, struct.pack("<Q", 1 << 40))
    _raises(GGUFError, load_gguf, bad_gguf, must_name=["damaged.gguf", key])


@needs_gguf
def test_tensor_offset_past_end_of_file(bad_gguf):
    lay = F.gguf_layout(bad_gguf)
    name = "blk.0.ffn_up.weight"
    past = -(-(lay["size"] - lay["data_start"]) // 32) * 32
    F.patch_bytes(bad_gguf, lay["tensors"][name]["offset_pos"], struct.pack("<Q", past))
    _raises(GGUFError, load_gguf, bad_gguf, must_name=["damaged.gguf", name, "past the end"])
    F.patch_bytes(bad_gguf, lay["tensors"][name]["offset_pos"], struct.pack("<Q", 1 << 62))
    _raises(GGUFError, load_gguf, bad_gguf, must_name=[name, "past the end"])


@needs_gguf
def test_tensor_offset_misaligned(bad_gguf):
    lay = F.gguf_layout(bad_gguf)
    name = "blk.1.attn_k.weight"
    t = lay["tensors"][name]
    F.patch_bytes(bad_gguf, t["offset_pos"], struct.pack("<Q", t["offset"] + 2))
    _raises(GGUFError, load_gguf, bad_gguf, must_name=[name, "alignment"])


@needs_gguf
def test_overlapping_tensors(bad_gguf):
    lay = F.gguf_layout(bad_gguf)
    a, b = "blk.0.attn_q.weight", "blk.0.attn_k.weight"
    F.patch_bytes(bad_gguf, lay["tensors"][b]["offset_pos"],
                  struct.pack("<Q", lay["tensors"][a]["offset"]))
    _raises(GGUFError, load_gguf, bad_gguf, must_name=[a, b, "overlap"])


@needs_gguf
def test_tensor_shape_overflows_file(bad_gguf):
    lay = F.gguf_layout(bad_gguf)
    name = "token_embd.weight"
    t = lay["tensors"][name]
    F.patch_bytes(bad_gguf, t["dims_pos"] + 8, struct.pack("<Q", 10 ** 6))  # rows (ne1)
    _raises(GGUFError, load_gguf, bad_gguf, must_name=[name, "past the end", "1000000"])
    F.patch_bytes(bad_gguf, t["dims_pos"], struct.pack("<QQ", 1 << 40, 1 << 40))  # 2^80 elems
    _raises(GGUFError, load_gguf, bad_gguf, must_name=[name, "past the end"])


@needs_gguf
def test_tensor_row_not_whole_blocks(bad_gguf):
    lay = F.gguf_layout(bad_gguf)
    name = "blk.0.ffn_down.weight"
    F.patch_bytes(bad_gguf, lay["tensors"][name]["dims_pos"], struct.pack("<Q", 48))
    _raises(GGUFError, load_gguf, bad_gguf, must_name=[name, "Q4_1", "block size"])


@needs_gguf
def test_tensor_too_many_dims(bad_gguf):
    lay = F.gguf_layout(bad_gguf)
    name = "output_norm.weight"
    F.patch_bytes(bad_gguf, lay["tensors"][name]["dims_pos"] - 4, struct.pack("<I", 9))
    _raises(GGUFError, load_gguf, bad_gguf, must_name=[name, "9 dimensions"])


@needs_gguf
def test_tensor_shape_does_not_match_config(tmp_path):
    c = F.tiny_config()
    state = F.random_state(c)
    wrong = np.random.default_rng(0).standard_normal((24, 32)).astype(np.float32)
    path = F.write_gguf(tmp_path / "shape.gguf", c, state, "F32",
                        skip={"layers.0.attn.wq.weight"},
                        raw_tensors={"blk.0.attn_q.weight": (wrong, None)})
    _raises(GGUFError, load_gguf, path,
            must_name=["shape.gguf", "blk.0.attn_q.weight", "(24, 32)", "(32, 32)"])


@needs_gguf
def test_gguf_missing_tensor(tmp_path):
    c = F.tiny_config()
    path = F.write_gguf(tmp_path / "missing.gguf", c, F.random_state(c), "Q8_0",
                        skip={"layers.1.mlp.w_up.weight"})
    _raises(GGUFError, load_gguf, path, must_name=["missing.gguf", "blk.1.ffn_up.weight"])


@needs_gguf
def test_gguf_unexpected_tensor(tmp_path):
    c = F.tiny_config()
    extra = np.zeros(32, dtype=np.float32)
    path = F.write_gguf(tmp_path / "extra.gguf", c, F.random_state(c), "F32",
                        raw_tensors={"blk.2.attn_norm.weight": (extra, None)})
    _raises(GGUFError, load_gguf, path, must_name=["extra.gguf", "blk.2.attn_norm.weight"])
    path = F.write_gguf(tmp_path / "extra2.gguf", c, F.random_state(c), "F32",
                        raw_tensors={"blk.0.attn_q.bias": (np.zeros(32, np.float32), None)})
    _raises(GGUFError, load_gguf, path, must_name=["extra2.gguf", "blk.0.attn_q.bias"])
    path = F.write_gguf(tmp_path / "extra3.gguf", c, F.random_state(c), "F32",
                        raw_tensors={"mystery.weight": (np.zeros(32, np.float32), None)})
    _raises(GGUFError, load_gguf, path, must_name=["extra3.gguf", "mystery.weight"])


@needs_gguf
def test_unsupported_tensor_type_q8_1(tmp_path):
    """Q8_1 is a type neither tinyserve nor the gguf package dequantizes."""
    c = F.tiny_config()
    rows, cols = 32, 32
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    raw = np.zeros((rows, cols // block * size), dtype=np.uint8)
    path = F.write_gguf(tmp_path / "q81.gguf", c, F.random_state(c), "F32",
                        skip={"layers.0.attn.wq.weight"},
                        raw_tensors={"blk.0.attn_q.weight": (raw, gguf.GGMLQuantizationType.Q8_1)})
    _raises(GGUFError, load_gguf, path, must_name=["q81.gguf", "blk.0.attn_q.weight", "Q8_1"])


@needs_gguf
def test_unsupported_tensor_type_integer(tmp_path):
    c = F.tiny_config()
    path = F.write_gguf(tmp_path / "i32.gguf", c, F.random_state(c), "F32",
                        skip={"layers.1.mlp.w_down.weight"},
                        raw_tensors={"blk.1.ffn_down.weight": (np.zeros((32, 64), np.int32), None)})
    _raises(GGUFError, load_gguf, path, must_name=["i32.gguf", "blk.1.ffn_down.weight", "I32"])


@needs_gguf
def test_unknown_tensor_type_id(bad_gguf):
    lay = F.gguf_layout(bad_gguf)
    name = "blk.0.attn_v.weight"
    F.patch_bytes(bad_gguf, lay["tensors"][name]["type_pos"], struct.pack("<I", 99))
    _raises(GGUFError, load_gguf, bad_gguf, must_name=[name, "99"])


@needs_gguf
def test_unknown_gguf_architecture(tmp_path):
    c = dataclasses.replace(F.tiny_config(), architecture="falcon")
    path = F.write_gguf(tmp_path / "falcon.gguf", c, F.random_state(F.tiny_config()), "F32")
    _raises(GGUFError, load_gguf, path, must_name=["falcon.gguf", "'falcon'", "llama"])


@needs_gguf
def test_gguf_metadata_missing_or_wrong_type(tmp_path):
    c, s = F.tiny_config(), F.random_state(F.tiny_config())
    p = F.write_gguf(tmp_path / "nokey.gguf", c, s, metadata={"llama.block_count": None})
    _raises(GGUFError, load_gguf, p, must_name=["nokey.gguf", "llama.block_count"])
    p = F.write_gguf(tmp_path / "strkey.gguf", c, s, metadata={"llama.block_count": "two"})
    _raises(GGUFError, load_gguf, p, must_name=["strkey.gguf", "llama.block_count", "'two'"])
    p = F.write_gguf(tmp_path / "heads.gguf", c, s,
                     metadata={"llama.attention.head_count_kv": ("uint32", 3)})
    _raises(GGUFError, load_gguf, p, must_name=["heads.gguf", "num_kv_heads"])
    p = F.write_gguf(tmp_path / "scaling.gguf", c, s,
                     metadata={"llama.rope.scaling.type": "yarn"})
    _raises(GGUFError, load_gguf, p, must_name=["scaling.gguf", "yarn"])


@needs_gguf
def test_gguf_absurd_block_count_fails_fast(tmp_path):
    c, s = F.tiny_config(), F.random_state(F.tiny_config())
    p = F.write_gguf(tmp_path / "layers.gguf", c, s,
                     metadata={"llama.block_count": ("uint32", 2 ** 31)})
    _raises(GGUFError, load_gguf, p, must_name=["layers.gguf", str(2 ** 31)])


@needs_gguf
def test_gguf_rope_freqs_wrong_shape(tmp_path):
    c = F.tiny_config()
    p = F.write_gguf(tmp_path / "rf.gguf", c, F.random_state(c),
                     raw_tensors={"rope_freqs.weight": (np.ones(8, np.float32), None)})
    _raises(GGUFError, load_gguf, p, must_name=["rf.gguf", "rope_freqs.weight", "(8,)"])


# ---- HF directories ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    d, _ = F.write_hf_dir(tmp_path_factory.mktemp("hf") / "good", shard=False)
    load_hf_dir(d)
    return d


@pytest.fixture(scope="module")
def good_hf_sharded(tmp_path_factory):
    d, _ = F.write_hf_dir(tmp_path_factory.mktemp("hf") / "good-sharded", shard=True)
    load_hf_dir(d)
    return d


@pytest.fixture
def bad_hf(good_hf, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good_hf, d)
    return d


def test_hf_dir_without_config(bad_hf):
    (bad_hf / "config.json").unlink()
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=["config.json", "ckpt"])


def test_hf_config_invalid_json(bad_hf):
    (bad_hf / "config.json").write_text('{"model_type": "llama", "hidden_size": 32,,}')
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=["config.json", "not valid JSON"])
    (bad_hf / "config.json").write_bytes(b"\xff\xfe garbage")
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=["config.json", "not valid JSON"])
    (bad_hf / "config.json").write_text("[1, 2, 3]")
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=["config.json", "JSON object"])


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def test_hf_config_missing_or_bad_values(bad_hf):
    _edit_config(bad_hf, hidden_size=None)
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=["config.json", "'hidden_size'"])
    _edit_config(bad_hf, hidden_size="thirty-two")
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=["hidden_size", "'thirty-two'"])
    _edit_config(bad_hf, hidden_size=32, num_key_value_heads=3)
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=["num_kv_heads (3)"])
    _edit_config(bad_hf, num_key_value_heads=2, num_attention_heads=0)
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=["num_attention_heads", "0"])
    _edit_config(bad_hf, num_attention_heads=4, rope_parameters={"rope_type": "llama3"})
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=["rope_scaling.factor"])


def test_hf_unknown_architecture(bad_hf):
    _edit_config(bad_hf, model_type="gpt_neox")
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=["'gpt_neox'", "llama", "qwen2"])


@pytest.mark.parametrize("change,needle", [
    ({"hidden_act": "gelu"}, "gelu"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ({"quantization_config": {"quant_method": "gptq"}}, "gptq"),
])
def test_hf_config_features_we_do_not_compute_are_refused(bad_hf, change, needle):
    _edit_config(bad_hf, **change)
    _raises(ConfigError, load_hf_dir, bad_hf, must_name=[needle])


def _rewrite_safetensors(path, fn):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path))
    save_file(fn(tensors), str(path), metadata={"format": "pt"})


def test_hf_missing_tensor(bad_hf):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_safetensors(bad_hf / "model.safetensors",
                         lambda t: {k: v for k, v in t.items() if k != name})
    _raises(CheckpointError, load_hf_dir, bad_hf, must_name=["ckpt", name, "missing"])


def test_hf_wrong_shaped_tensor(bad_hf):
    name = "model.layers.0.self_attn.k_proj.weight"

    def fn(t):
        t[name] = torch.zeros(24, 32)
        return t
    _rewrite_safetensors(bad_hf / "model.safetensors", fn)
    _raises(CheckpointError, load_hf_dir, bad_hf,
            must_name=["model.safetensors", name, "(24, 32)", "(16, 32)"])


def test_hf_unexpected_tensor(bad_hf):
    def fn(t):
        t["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
        return t
    _rewrite_safetensors(bad_hf / "model.safetensors", fn)
    _raises(CheckpointError, load_hf_dir, bad_hf,
            must_name=["model.safetensors", "model.layers.0.self_attn.o_proj.bias"])


def test_hf_integer_tensor(bad_hf):
    name = "model.norm.weight"

    def fn(t):
        t[name] = torch.ones(32, dtype=torch.int32)
        return t
    _rewrite_safetensors(bad_hf / "model.safetensors", fn)
    _raises(CheckpointError, load_hf_dir, bad_hf, must_name=[name, "int32"])


def test_hf_index_lists_missing_shard(good_hf_sharded, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good_hf_sharded, d)
    shard = sorted(d.glob("*.safetensors"))[1]
    shard.unlink()
    _raises(CheckpointError, load_hf_dir, d,
            must_name=["model.safetensors.index.json", shard.name])


def test_hf_index_invalid(good_hf_sharded, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good_hf_sharded, d)
    index = d / "model.safetensors.index.json"
    index.write_text("{not json")
    _raises(CheckpointError, load_hf_dir, d, must_name=[index.name, "not a valid"])
    index.write_text(json.dumps({"metadata": {}}))
    _raises(CheckpointError, load_hf_dir, d, must_name=[index.name, "weight_map"])
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../../etc/x.safetensors"}}))
    _raises(CheckpointError, load_hf_dir, d, must_name=[index.name, "../../etc/x.safetensors"])


def test_hf_shard_missing_a_tensor_listed_in_index(good_hf_sharded, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(good_hf_sharded, d)
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_proj.weight"
    _rewrite_safetensors(d / wm[name], lambda t: {k: v for k, v in t.items() if k != name})
    _raises(CheckpointError, load_hf_dir, d, must_name=[name, "missing"])


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_hf_unreadable_safetensors(bad_hf, damage):
    f = bad_hf / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"random": np.random.default_rng(0).bytes(len(data)),
                   "truncated": data[:len(data) // 2], "empty": b""}[damage])
    _raises(CheckpointError, load_hf_dir, bad_hf, must_name=["model.safetensors", "unreadable"])


def test_hf_only_pickle_checkpoint_is_never_unpickled(bad_hf, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))
    for f in bad_hf.glob("*.safetensors"):
        f.unlink()
    (bad_hf / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    _raises(CheckpointError, load_hf_dir, bad_hf,
            must_name=["pytorch_model.bin", "safetensors", "ckpt"])
    assert not marker.exists()


def test_load_model_rejects_single_checkpoint_file(good_hf):
    from tinyserve.loader import load_model
    _raises(CheckpointError, load_model, str(good_hf / "model.safetensors"), device="cpu",
            must_name=["model.safetensors", "directory"])


def test_unknown_model_name_lists_known_names():
    from tinyserve.loader import resolve_source
    from tinyserve.weights import registry
    msg = _raises(ValueError, resolve_source, "no-such-model-anywhere",
                  must_name=["no-such-model-anywhere"])
    assert all(n in msg for n in registry.known_names())
    assert "smollm2" in msg


def test_error_classes_are_value_errors():
    from tinyserve.weights.gguf import GGUFError as G
    for cls in (G, CheckpointError, ConfigError, WeightsError):
        assert issubclass(cls, ValueError)
