"""Builders for tiny model files written by tests: GGUF files and HF checkpoint directories.

Everything here is written independently of the loaders under test (own name tables, own
llama.cpp Q/K permutation), so that a round trip through them checks the loaders honestly.

    tokens, merges = bpe_vocab()                       # tiny byte-level BPE (gpt2 style)
    cfg = tiny_config()                                # vocab = len(tokens), hidden 32, 2 layers
    state = random_state(cfg)                          # canonical tinyserve state dict, fp32
    write_gguf(path, cfg, state, "Q4_1")               # llama.cpp layout, Q/K rows permuted
    expected = gguf_expected_state(cfg, state, "Q4_1") # what a correct loader must return
    hf_dir, hf_model = write_hf_dir(path, arch="qwen2", tie=True, shard=True)
"""
from __future__ import annotations

import functools
import inspect
import json
import struct
from pathlib import Path

import numpy as np
import torch

from tinyserve.config import ModelConfig

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID = 1, 2  # as in SmolLM2: <|im_start|> and <|im_end|>
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)",
    "In 1969, Neil Armstrong became the first person to walk on the moon.",
    "the theory of the thing is that there are three of them there",
] * 4
BPE_VOCAB_SIZE = 320

# ggml type names used by the tests -> gguf.GGMLQuantizationType member names.
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")


# ---- tokenizer ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def bpe_tokenizer():
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) trained on a few sentences:
    3 special tokens, the 256 byte-level symbols, then merges up to BPE_VOCAB_SIZE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


@functools.lru_cache(maxsize=None)
def bpe_vocab() -> tuple[list[str], list[str]]:
    """-> (tokens in id order, merges as "a b" strings), as GGUF's tokenizer.ggml.* stores them."""
    data = json.loads(bpe_tokenizer().to_str())
    vocab = dict(data["model"]["vocab"])
    for added in data["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert None not in tokens
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges


# ---- model weights -----------------------------------------------------------------------
def tiny_config(**overrides) -> ModelConfig:
    """LLaMA-shaped: hidden 32, 2 layers, 4 heads, 2 kv heads (head_dim 8), ffn 64."""
    kw = dict(vocab_size=len(bpe_vocab()[0]), hidden_size=32, intermediate_size=64,
              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
              rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False)
    kw.update(overrides)
    return ModelConfig(**kw)


def canonical_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Written out independently of ModelConfig.weight_shapes (which the tests check)."""
    d, f, V, hd = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    shapes = {"embed.weight": (V, d), "norm.weight": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    for i in range(c.num_layers):
        p = f"layers.{i}"
        shapes[f"{p}.attn_norm.weight"] = (d,)
        shapes[f"{p}.mlp_norm.weight"] = (d,)
        shapes[f"{p}.attn.wq.weight"] = (c.num_heads * hd, d)
        shapes[f"{p}.attn.wk.weight"] = (c.num_kv_heads * hd, d)
        shapes[f"{p}.attn.wv.weight"] = (c.num_kv_heads * hd, d)
        shapes[f"{p}.attn.wo.weight"] = (d, c.num_heads * hd)
        if c.attention_bias:
            shapes[f"{p}.attn.wq.bias"] = (c.num_heads * hd,)
            shapes[f"{p}.attn.wk.bias"] = (c.num_kv_heads * hd,)
            shapes[f"{p}.attn.wv.bias"] = (c.num_kv_heads * hd,)
        shapes[f"{p}.mlp.w_gate.weight"] = (f, d)
        shapes[f"{p}.mlp.w_up.weight"] = (f, d)
        shapes[f"{p}.mlp.w_down.weight"] = (d, f)
    return shapes


def random_state(c: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random canonical weights, scaled so activations stay O(1) and logits differ visibly."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in canonical_shapes(c).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.3 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        state[name] = t.float()
    return state


# ---- GGUF --------------------------------------------------------------------------------
_GGUF_NAMES = {
    "embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "attn_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ffn_norm.weight",
    "attn.wq.weight": "attn_q.weight", "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight", "attn.wo.weight": "attn_output.weight",
    "attn.wq.bias": "attn_q.bias", "attn.wk.bias": "attn_k.bias", "attn.wv.bias": "attn_v.bias",
    "mlp.w_gate.weight": "ffn_gate.weight", "mlp.w_up.weight": "ffn_up.weight",
    "mlp.w_down.weight": "ffn_down.weight",
}


def to_gguf_name(name: str) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"blk.{i}.{_GGUF_NAMES[rest]}"
    return _GGUF_NAMES[name]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, rows [first half; second half]
    become interleaved pairs, for llama.cpp's adjacent-pair RoPE."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _is_matrix(name: str) -> bool:
    return name.endswith(".weight") and "norm" not in name


def _permute_heads(c: ModelConfig, name: str) -> int | None:
    if c.architecture not in ("llama", "mistral") or not _is_matrix(name):
        return None
    if name.endswith("attn.wq.weight"):
        return c.num_heads
    if name.endswith("attn.wk.weight"):
        return c.num_kv_heads
    return None


def encode_tensor(arr: np.ndarray, qtype: str):
    """float32 array -> (file array, GGMLQuantizationType) as GGUFWriter.add_tensor takes it."""
    import gguf
    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return arr.astype(np.float32), t
    if qtype == "F16":
        return arr.astype(np.float16), t
    return gguf.quants.quantize(arr.astype(np.float32), t), t


def gguf_roundtrip(arr: np.ndarray, qtype: str) -> np.ndarray:
    """What a tensor becomes after being stored as ``qtype``: gguf's own decoding."""
    import gguf
    data, t = encode_tensor(arr, qtype)
    return gguf.quants.dequantize(data, t).astype(np.float32).reshape(arr.shape)


def gguf_expected_state(c: ModelConfig, state: dict, qtype: str) -> dict[str, torch.Tensor]:
    """The state dict a correct loader returns for write_gguf(.., c, state, qtype): matrices
    decoded from ``qtype`` (rows are quantized independently, so permuting Q/K rows before
    quantizing and un-permuting after is the same as not permuting at all), 1-D tensors exact."""
    out = {}
    for name, t in state.items():
        arr = t.numpy()
        out[name] = torch.from_numpy(gguf_roundtrip(arr, qtype) if _is_matrix(name) else arr)
    return out


def write_gguf(path, c: ModelConfig, state: dict, qtype: str = "F32", *, tokenizer: bool = True,
               metadata: dict | None = None, types: dict | None = None,
               raw_tensors: dict | None = None, skip=()) -> Path:
    """Write ``state`` (canonical names, unpermuted) as a llama.cpp-style GGUF file.

    Matrices are stored as ``qtype`` (1-D norms and biases as F32, like llama.cpp), Q/K rows
    permuted for llama/mistral. ``metadata`` adds or overrides keys (value None removes one);
    ``types`` overrides the type per canonical name; ``raw_tensors`` maps GGUF names to
    (numpy array, GGMLQuantizationType or None) written as is; ``skip`` leaves tensors out.
    """
    import gguf
    path = Path(path)
    arch = c.architecture
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        f"{arch}.vocab_size": ("uint32", c.vocab_size),
        f"{arch}.context_length": ("uint32", c.max_position_embeddings),
        f"{arch}.embedding_length": ("uint32", c.hidden_size),
        f"{arch}.feed_forward_length": ("uint32", c.intermediate_size),
        f"{arch}.block_count": ("uint32", c.num_layers),
        f"{arch}.attention.head_count": ("uint32", c.num_heads),
        f"{arch}.attention.head_count_kv": ("uint32", c.num_kv_heads),
        f"{arch}.rope.freq_base": ("float32", c.rope_theta),
        f"{arch}.attention.layer_norm_rms_epsilon": ("float32", c.rms_norm_eps),
        f"{arch}.rope.dimension_count": ("uint32", c.head_dim),
        "general.name": ("string", "tiny-test-model"),
        "general.file_type": ("uint32", 0),
    }
    if tokenizer:
        tokens, merges = bpe_vocab()
        ttype = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]  # 3 = control, 1 = normal
        meta.update({
            "tokenizer.ggml.model": ("string", "gpt2"),
            "tokenizer.ggml.pre": ("string", "smollm"),
            "tokenizer.ggml.tokens": ("array", tokens),
            "tokenizer.ggml.token_type": ("array", ttype),
            "tokenizer.ggml.merges": ("array", merges),
            "tokenizer.ggml.bos_token_id": ("uint32", BOS_ID),
            "tokenizer.ggml.eos_token_id": ("uint32", EOS_ID),
            "tokenizer.ggml.unknown_token_id": ("uint32", 0),
            "tokenizer.ggml.padding_token_id": ("uint32", EOS_ID),
            "tokenizer.ggml.add_bos_token": ("bool", False),
            "tokenizer.chat_template": ("string", CHATML),
        })
    for k, v in (metadata or {}).items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v if isinstance(v, tuple) else (_guess_kind(v), v)
    for k, (kind, v) in meta.items():
        if k == "general.architecture":
            continue
        getattr(w, f"add_{kind}")(k, v)
    for name, t in state.items():
        if name in skip:
            continue
        arr = t.detach().float().numpy()
        heads = _permute_heads(c, name)
        if heads is not None:
            arr = llama_cpp_permute(arr, heads)
        tq = (types or {}).get(name, qtype if _is_matrix(name) else "F32")
        data, raw = encode_tensor(arr, tq)
        w.add_tensor(to_gguf_name(name), data, raw_dtype=raw)
    for gname, (arr, raw) in (raw_tensors or {}).items():
        w.add_tensor(gname, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _guess_kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "uint32"
    if isinstance(v, float):
        return "float32"
    if isinstance(v, str):
        return "string"
    return "array"


def gguf_layout(path) -> dict:
    """Byte positions inside a GGUF file, for tests that damage it on purpose:
    {"kv_start", "tensor_info_start", "data_start", "size",
     "kv": {key: {"type_pos", "value_pos", "end"}},
     "tensors": {name: {"dims_pos", "n_dims", "type_pos", "offset_pos", "offset", "data_pos"}}}.
    A minimal independent parser (little-endian GGUF v3)."""
    buf = Path(path).read_bytes()
    pos = 4 + 4
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
    pos += 16
    kv_start = pos
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    alignment = 32

    def skip_value(pos, vt):
        if vt in sizes:
            return pos + sizes[vt]
        if vt == 8:
            (n,) = struct.unpack_from("<Q", buf, pos)
            return pos + 8 + n
        assert vt == 9
        it, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        for _ in range(n):
            pos = skip_value(pos, it)
        return pos

    kv = {}
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8:pos + 8 + klen].decode()
        pos += 8 + klen
        (vt,) = struct.unpack_from("<I", buf, pos)
        type_pos, pos = pos, pos + 4
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", buf, pos)
        end = skip_value(pos, vt)
        kv[key] = dict(type_pos=type_pos, value_pos=pos, end=end)
        pos = end
    tensor_info_start = pos
    tensors = {}
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", buf, pos)
        name = buf[pos + 8:pos + 8 + nlen].decode()
        pos += 8 + nlen
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims_pos = pos + 4
        pos = dims_pos + 8 * n_dims
        type_pos = pos
        offset_pos = pos + 4
        (offset,) = struct.unpack_from("<Q", buf, offset_pos)
        pos = offset_pos + 8
        tensors[name] = dict(dims_pos=dims_pos, n_dims=n_dims, type_pos=type_pos,
                             offset_pos=offset_pos, offset=offset)
    data_start = -(-pos // alignment) * alignment
    for t in tensors.values():
        t["data_pos"] = data_start + t["offset"]
    return dict(kv_start=kv_start, tensor_info_start=tensor_info_start, data_start=data_start,
                size=len(buf), kv=kv, tensors=tensors)


def patch_bytes(path, pos: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(data)


# ---- HF directories ----------------------------------------------------------------------
def write_hf_tokenizer(directory) -> None:
    directory = Path(directory)
    bpe_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[EOS_ID], "unk_token": SPECIAL_TOKENS[0],
        "add_bos_token": False, "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256,
    }, indent=1))


def hf_model(arch: str = "llama", *, tie: bool = False, rope_scaling: dict | None = None,
             seed: int = 0, **overrides):
    """A tiny transformers model (LlamaForCausalLM or Qwen2ForCausalLM) with random weights
    of a visible size (transformers' default init is too small for a meaningful comparison)."""
    import pytest
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=len(bpe_vocab()[0]), hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if rope_scaling is not None:
        kw["rope_scaling"] = rope_scaling
    kw.update(overrides)
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


def write_hf_dir(directory, arch: str = "llama", *, tie: bool = False, shard: bool = False,
                 rope_scaling: dict | None = None, tokenizer: bool = True, seed: int = 0,
                 **overrides):
    """Save a tiny random transformers model as an HF checkpoint directory (safetensors;
    ``shard`` makes several files plus model.safetensors.index.json) -> (dir, model)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = hf_model(arch, tie=tie, rope_scaling=rope_scaling, seed=seed, **overrides)
    kw = {}
    params = inspect.signature(model.save_pretrained).parameters
    if "safe_serialization" in params:  # transformers < 5 (later: always safetensors)
        kw["safe_serialization"] = True
    if shard:
        kw["max_shard_size"] = "20KB"
    model.save_pretrained(str(directory), **kw)
    if tokenizer:
        write_hf_tokenizer(directory)
    return directory, model


def tiny_model(seed=0, dtype=None, **over):
    """A random tiny Transformer for the quantization tests (hidden 64 unless overridden)."""
    import torch
    from tinyserve.model import Transformer
    kw = dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
              vocab_size=300)
    kw.update(over)
    c = tiny_config(**kw)
    m = Transformer(c)
    m.load_weights(random_state(c, seed))
    return m.to(dtype or torch.float32).eval()


def close(name, got, want, atol, rtol):
    """assert_close that first prints the worst mismatch and where it is (kernel tests run
    with -s show it), and names an unwritten (NaN-poisoned) output as such."""
    err = (got.float() - want.float()).abs()
    at = [int(i) for i in torch.unravel_index(err.argmax(), err.shape)] if err.numel() else []
    print(f"{name}: worst |diff| {err.max().item() if err.numel() else 0:.3g} at {at}")
    assert not got.isnan().any(), f"{name}: NaN in the output (an element left unwritten?)"
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


class CharTokenizer:
    """The least ``LLM`` needs of a tokenizer, for tiny random models: one id per character
    (a..z), so text deltas exist and streaming can be tested without a real vocabulary."""
    stop_token_ids = ()

    def encode(self, text: str) -> list[int]:
        return [(ord(c) - 97) % 26 for c in text]

    def decode(self, ids, **kw) -> str:
        return "".join(chr(97 + i % 26) for i in ids)
