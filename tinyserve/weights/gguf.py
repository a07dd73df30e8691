"""GGUF files (llama.cpp's format): metadata, tensors, and the block quantization formats.

The ``gguf`` package parses the file; everything here is about trusting it as little as
possible (a file may be truncated or lie about offsets) and about turning llama.cpp's layout
into the canonical state dict of ``tinyserve.model``. ``gguf`` is imported only when a file is
opened, so ``import tinyserve`` works without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, ModelConfig


class GGUFError(ValueError):
    """A GGUF file that cannot be read or does not describe a model we can run."""


# Block formats we decode ourselves: name -> (elements per block, bytes per block).
#   Q8_0: fp16 scale d, 32 x int8 q                 -> w = d * q
#   Q4_0: fp16 scale d, 16 bytes of 4-bit codes     -> w = d * (code - 8)
#   Q4_1: fp16 scale d, fp16 min m, 16 bytes codes  -> w = d * code + m
# In Q4_x the low nibbles of the 16 bytes hold elements 0..15, the high nibbles 16..31.
BLOCK_FORMATS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class PackedTensor:
    """A tensor in its file encoding. ``data`` is uint8 [rows, bytes_per_row] for block
    formats (a zero-copy view of the memory-mapped file), ``shape`` the logical torch shape."""
    name: str
    qtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape, self.name).to(dtype)


def dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...], name: str = "?"):
    """Decode file bytes to an fp32 (or native float) torch tensor of ``shape``."""
    if qtype in PLAIN_TYPES:
        if qtype == "BF16":  # numpy has no bfloat16: reinterpret the 16-bit words
            return torch.from_numpy(np.array(data).view(np.int16)).view(
                torch.bfloat16).reshape(shape)
        return torch.from_numpy(np.array(data)).reshape(shape)
    if qtype in BLOCK_FORMATS:
        block, nbytes = BLOCK_FORMATS[qtype]
        raw = torch.from_numpy(np.array(data)).reshape(-1, nbytes)  # copy: the mmap is read-only  # [nblocks, B]
        d = raw[:, :2].contiguous().view(torch.float16).float()                 # [nblocks, 1]
        if qtype == "Q8_0":
            w = d * raw[:, 2:].contiguous().view(torch.int8).float()
        else:
            qs = raw[:, 4:] if qtype == "Q4_1" else raw[:, 2:]
            codes = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()              # [nblocks, 32]
            if qtype == "Q4_1":
                m = raw[:, 2:4].contiguous().view(torch.float16).float()
                w = d * codes + m
            else:
                w = d * (codes - 8)
        return w.reshape(shape)
    # Anything else (K-quants, IQ-quants, ...): let the gguf package decode it if it can.
    from gguf import GGMLQuantizationType, quants
    try:
        out = quants.dequantize(np.asarray(data), GGMLQuantizationType[qtype])
    except (NotImplementedError, KeyError, ValueError) as e:
        raise GGUFError(f"tensor {name!r} has type {qtype}, which tinyserve cannot decode "
                        f"({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


@dataclass
class GGUFFile:
    path: Path
    metadata: dict
    tensors: dict[str, PackedTensor]
    reader: object  # gguf.GGUFReader, for the tokenizer


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file: header, metadata, and every tensor's extent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the parser fails in many ways on a damaged file
        raise GGUFError(f"{path}: damaged or truncated GGUF file "
                        f"({type(e).__name__}: {e})") from None
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception as e:
            raise GGUFError(f"{path}: unreadable metadata field {key!r} ({e})") from None
    tensors = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml lists ne0 (inner) first
        end = int(t.data_offset) + int(t.n_bytes)
        if int(t.data_offset) < 0 or end > size:
            raise GGUFError(f"{path}: tensor {t.name!r} claims bytes {t.data_offset}..{end} but "
                            f"the file has {size} bytes (truncated or lying offsets)")
        if t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path}: tensor {t.name!r} has {t.data.nbytes} bytes of data, its "
                            f"shape {shape} and type {qtype} need {t.n_bytes}")
        tensors[t.name] = PackedTensor(t.name, qtype, shape, t.data)
    _check_overlaps(path, reader)
    return GGUFFile(path, metadata, tensors, reader)


def _check_overlaps(path, reader):
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name)
                   for t in reader.tensors)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise GGUFError(f"{path}: tensors {an!r} and {bn!r} overlap in the file "
                            f"(bytes {a0}..{a1} and {b0}..{b1})")


# llama.cpp name -> canonical name ("{i}" is the layer index).
_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.mlp_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attn.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attn.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attn.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attn.wo.weight",
    "blk.{i}.attn_q.bias": "layers.{i}.attn.wq.bias",
    "blk.{i}.attn_k.bias": "layers.{i}.attn.wk.bias",
    "blk.{i}.attn_v.bias": "layers.{i}.attn.wv.bias",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.w_gate.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.w_up.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.w_down.weight",
}
_IGNORED = {"rope_freqs.weight"}  # folded into the config instead


def canonical_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        key = ".".join(["blk", "{i}"] + parts[2:])
        return _NAMES[key].format(i=parts[1]) if key in _NAMES else None
    return _NAMES.get(gguf_name)


def unpermute_rows(rows: torch.Tensor | np.ndarray, n_heads: int):
    """Undo llama.cpp's Q/K row permutation (rows of each head: interleaved -> rotate-half).

    convert_hf_to_gguf reorders each head's rows from [first half; second half] to pairs
    (0, D/2), (1, D/2+1), ... so its RoPE can rotate adjacent elements. Rows are output
    features, so the same reordering applies to packed quantized rows byte for byte.
    """
    n, rest = rows.shape[0], tuple(rows.shape[1:])
    d = n // n_heads
    if isinstance(rows, np.ndarray):
        return rows.reshape(n_heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(n, *rest)
    return rows.reshape(n_heads, d // 2, 2, *rest).transpose(1, 2).reshape(n, *rest)


def load_gguf(path, dtype: torch.dtype = torch.float32):
    """-> (ModelConfig, state dict of dequantized ``dtype`` tensors, packed tensors, GGUFFile)."""
    g = read_gguf(path)
    try:
        config = ModelConfig.from_gguf_fields(g.metadata)
    except ConfigError as e:
        raise GGUFError(f"{g.path}: {e}") from None
    config.tie_word_embeddings = "output.weight" not in g.tensors
    if "rope_freqs.weight" in g.tensors:
        config.extra["rope_freq_factors"] = g.tensors["rope_freqs.weight"].dequantize()
    # llama.cpp permutes Q/K for LLaMA-style (interleaved) RoPE; Qwen2 files use NeoX RoPE.
    permuted = config.architecture in ("llama", "mistral")
    heads = {"wq": config.num_heads, "wk": config.num_kv_heads}
    state, packed = {}, {}
    for gname, pt in g.tensors.items():
        if gname in _IGNORED:
            continue
        name = canonical_name(gname)
        if name is None:
            raise GGUFError(f"{g.path}: unexpected tensor {gname!r} for a "
                            f"{config.architecture} model")
        w = pt.dequantize(torch.float32)
        proj = name.split(".")[-2]
        if permuted and proj in heads:
            w = unpermute_rows(w, heads[proj])
            if pt.qtype in BLOCK_FORMATS and w.dim() == 2:
                pt = PackedTensor(pt.name, pt.qtype, pt.shape,
                                  unpermute_rows(pt.data, heads[proj]))
        state[name] = w.to(dtype)
        if pt.qtype in BLOCK_FORMATS:
            packed[name] = pt
    return config, state, packed, g
