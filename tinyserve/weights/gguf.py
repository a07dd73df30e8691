"""Reading GGUF files (llama.cpp's format) into tinyserve's canonical state dict.

``read_gguf`` has ``gguf_header`` read the header, checking every length and offset (a file
may be truncated or lie), then ``load_gguf`` maps llama.cpp's tensor names and Q/K row order
onto the canonical state dict of ``tinyserve.model`` and decodes the tensors with
``gguf_blocks``. The ``gguf`` package (its table of ggml types) is imported only when a file
is opened, so ``import tinyserve`` works without it. The block formats, ``PackedTensor``,
``dequantize`` and ``GGUFError`` are re-exported here, where callers have always imported
them from.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, ModelConfig
# PLAIN_TYPES and dequantize are not used here: re-exported for callers (see the docstring).
from .gguf_blocks import BLOCK_FORMATS, PLAIN_TYPES, GGUFError, PackedTensor, dequantize
from .gguf_header import check_tensor_extents, scan_gguf

__all__ = ["BLOCK_FORMATS", "PLAIN_TYPES", "GGUFError", "GGUFFile", "PackedTensor",
           "canonical_name", "dequantize", "gguf_name", "load_gguf", "read_gguf",
           "unpermute_rows"]


@dataclass
class GGUFFile:
    path: Path
    metadata: dict
    tensors: dict[str, PackedTensor]
    mapping: np.memmap | None = None   # the file, memory-mapped: every tensor's data views it

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident memory (they stay in the OS
        page cache; a later read maps them back in). After the native CPU path has packed
        the weights, the file is only read again by long prefills: ~98 MB for SmolLM2."""
        m = getattr(self.mapping, "_mmap", None)
        if m is not None and hasattr(mmap, "MADV_DONTNEED"):
            m.madvise(mmap.MADV_DONTNEED)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file: header, metadata, and every tensor's extent. Tensor data
    are zero-copy views of the memory-mapped file (pages are read when first touched)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise GGUFError(f"{path} is not a file (a GGUF model is a single .gguf file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if head != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (magic {head!r}, expected b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            metadata, infos, data_start, alignment = scan_gguf(path, buf)
    try:
        extents = check_tensor_extents(path, infos, data_start, alignment, size)
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    file = np.memmap(path, dtype=np.uint8, mode="r") if extents else None
    tensors = {}
    for name, e in extents.items():
        raw = file[e.start:e.start + e.nbytes]
        if e.qtype in _NUMPY_PLAIN:   # float values in their own dtype, the tensor's shape
            data = raw.view(_NUMPY_PLAIN[e.qtype]).reshape(e.shape)
        else:                         # blocks (and bf16 words): uint8 [rows, bytes per row]
            data = raw.reshape(-1, e.row_bytes)
        tensors[name] = PackedTensor(name, e.qtype, e.shape, data)
    return GGUFFile(path, metadata, tensors, file)


_NUMPY_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


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


# canonical name -> llama.cpp name, for error messages.
def gguf_name(canonical: str) -> str:
    parts = canonical.split(".")
    if parts[0] == "layers":
        key = ".".join(["layers", "{i}"] + parts[2:])
        for g, c in _NAMES.items():
            if c == key:
                return g.format(i=parts[1])
    for g, c in _NAMES.items():
        if c == canonical:
            return g
    return canonical


def load_gguf(path, dtype: torch.dtype = torch.float32, dequantize: bool = True):
    """-> (ModelConfig, state dict of dequantized ``dtype`` tensors, packed tensors, GGUFFile).

    ``dequantize=False`` leaves the block-format tensors (Q4_1, Q8_0, Q4_0) out of the state
    dict: they are only in ``packed``, as the file's bytes (the native CPU path runs on those
    and never builds the fp32 copy, 4 bytes a weight).

    Names and shapes are checked against the config from the metadata before anything is
    decoded, so a file that does not describe a consistent model fails fast and says why."""
    g = read_gguf(path)
    try:
        config = ModelConfig.from_gguf_fields(g.metadata)
    except ConfigError as e:
        raise GGUFError(f"{g.path}: {e}") from None
    config.tie_word_embeddings = "output.weight" not in g.tensors
    if len(g.tensors) < 9 * config.num_layers:  # each block has at least 9 tensors
        raise GGUFError(f"{g.path}: the metadata says {config.num_layers} layers "
                        f"({config.architecture}.block_count) but the file holds only "
                        f"{len(g.tensors)} tensors")
    expected = config.weight_shapes()
    if "rope_freqs.weight" in g.tensors:
        rf = g.tensors["rope_freqs.weight"]
        if rf.shape != (config.head_dim // 2,):
            raise GGUFError(f"{g.path}: tensor 'rope_freqs.weight' has shape {rf.shape}, "
                            f"expected ({config.head_dim // 2},) (head_dim / 2)")
        config.extra["rope_freq_factors"] = _decode(g, rf, torch.float32)
    named = {}
    for gname, pt in g.tensors.items():
        if gname in _IGNORED:
            continue
        name = canonical_name(gname)
        if name is None or name not in expected:
            why = ("not a tensor of this architecture" if name is None else
                   f"the metadata describes {config.num_layers} layers"
                   f"{', no q/k/v biases' if not config.attention_bias else ''}")
            raise GGUFError(f"{g.path}: unexpected tensor {gname!r} for a "
                            f"{config.architecture} model ({why})")
        if pt.shape != expected[name]:
            raise GGUFError(f"{g.path}: tensor {gname!r} has shape {pt.shape}, but the model "
                            f"described by the metadata needs {expected[name]} "
                            f"({_dims_summary(config)})")
        named[name] = pt
    missing = [gguf_name(n) for n in expected if n not in named]
    if missing:
        raise GGUFError(f"{g.path}: missing tensor(s) {missing[:8]}"
                        f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    # llama.cpp permutes Q/K for LLaMA-style (interleaved) RoPE; Qwen2 files use NeoX RoPE.
    permuted = config.architecture in ("llama", "mistral")
    heads = {"wq": config.num_heads, "wk": config.num_kv_heads}
    state, packed = {}, {}
    for name, pt in named.items():
        proj = name.split(".")[-2]
        unpermute = permuted and proj in heads  # (convert_hf_to_gguf permutes q/k biases alike)
        if pt.qtype in BLOCK_FORMATS:
            if unpermute and len(pt.shape) == 2:   # whole rows of blocks move as they are
                pt = PackedTensor(pt.name, pt.qtype, pt.shape,
                                  unpermute_rows(pt.data, heads[proj]))
                unpermute = False
            packed[name] = pt
            if not dequantize:
                continue
        w = _decode(g, pt, torch.float32)
        if unpermute:
            w = unpermute_rows(w, heads[proj])
        state[name] = w.to(dtype)
    return config, state, packed, g


def _decode(g: GGUFFile, pt: PackedTensor, dtype) -> torch.Tensor:
    try:
        return pt.dequantize(dtype)
    except GGUFError as e:
        raise GGUFError(f"{g.path}: {e}") from None


def _dims_summary(c: ModelConfig) -> str:
    return (f"vocab {c.vocab_size}, hidden {c.hidden_size}, ffn {c.intermediate_size}, "
            f"{c.num_heads} heads / {c.num_kv_heads} kv heads of {c.head_dim}")
