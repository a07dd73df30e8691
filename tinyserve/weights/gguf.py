"""GGUF files (llama.cpp's format): metadata, tensors, and the block quantization formats.

The ``gguf`` package parses the file; everything here is about trusting it as little as
possible (a file may be truncated or lie about offsets) and about turning llama.cpp's layout
into the canonical state dict of ``tinyserve.model``. ``gguf`` is imported only when a file is
opened, so ``import tinyserve`` works without it.
"""
from __future__ import annotations

import mmap
import os
import struct
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
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "F64": torch.float64}


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
        raw = torch.from_numpy(np.array(data)).reshape(-1, nbytes)  # [nblocks, B] (a copy:
        #                                                             the mmap is read-only)
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
                        f"(supported: {', '.join([*PLAIN_TYPES, *BLOCK_FORMATS])} and what the "
                        f"gguf package dequantizes; {type(e).__name__}: {e})") from None
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


@dataclass
class GGUFFile:
    path: Path
    metadata: dict
    tensors: dict[str, PackedTensor]
    reader: object  # gguf.GGUFReader, for the tokenizer


# ---- validating the file before the gguf package parses it ---------------------------------
# gguf.GGUFReader trusts every length in the file: a truncated or corrupt file makes it fail
# with IndexError/struct-like errors deep inside, or loop for a very long time (an array whose
# claimed length runs past the end of the file). So first walk the header ourselves, checking
# every length against the bytes that are really there, and only then hand it to the reader.

# GGUF metadata value types: id -> (name, fixed size in bytes or None).
_VALUE_TYPES = {0: ("UINT8", 1), 1: ("INT8", 1), 2: ("UINT16", 2), 3: ("INT16", 2),
                4: ("UINT32", 4), 5: ("INT32", 4), 6: ("FLOAT32", 4), 7: ("BOOL", 1),
                8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", 8), 11: ("INT64", 8),
                12: ("FLOAT64", 8)}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 4            # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 8
_DEFAULT_ALIGNMENT = 32


@dataclass
class _TensorInfo:
    name: str
    dims: tuple[int, ...]   # ggml order: ne0 (the contiguous, inner dimension) first
    type_id: int
    offset: int             # relative to the start of the data section


class _Cursor:
    """Bounds-checked little-endian reads from a bytes-like buffer."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF file: {what} needs {n} bytes "
                            f"at offset {self.pos}, but the file has {self.size} bytes")

    def read(self, fmt: str, n: int, what: str):
        self.need(n, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.read("I", 4, what)

    def u64(self, what: str) -> int:
        return self.read("Q", 8, what)

    def skip(self, n: int, what: str):
        self.need(n, what)
        self.pos += n

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8 ({raw[:40]!r}): "
                            f"corrupt GGUF file") from None


def _scan_value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    """Step over one metadata value; return it for scalars and strings (None for arrays)."""
    if vtype not in _VALUE_TYPES:
        raise GGUFError(f"{cur.path}: metadata {key!r} has unknown value type {vtype}: "
                        f"corrupt GGUF file")
    name, size = _VALUE_TYPES[vtype]
    if size is not None:
        fmt = {"UINT8": "B", "INT8": "b", "UINT16": "H", "INT16": "h", "UINT32": "I",
               "INT32": "i", "FLOAT32": "f", "BOOL": "?", "UINT64": "Q", "INT64": "q",
               "FLOAT64": "d"}[name]
        return cur.read(fmt, size, f"the value of metadata {key!r}")
    if vtype == _STRING:
        return cur.string(f"the value of metadata {key!r}")
    itype = cur.u32(f"the element type of metadata array {key!r}")
    count = cur.u64(f"the length of metadata array {key!r}")
    if itype not in _VALUE_TYPES:
        raise GGUFError(f"{cur.path}: metadata array {key!r} has unknown element type {itype}: "
                        f"corrupt GGUF file")
    isize = _VALUE_TYPES[itype][1]
    left = cur.size - cur.pos
    # Every element takes at least 8 bytes (string/array headers) or its fixed size: a count
    # the rest of the file cannot hold is rejected before looping over it.
    if count * (isize or 8) > left:
        raise GGUFError(f"{cur.path}: metadata array {key!r} claims {count} elements, more than "
                        f"the remaining {left} bytes of the file can hold (truncated or corrupt)")
    if isize is not None:
        cur.skip(count * isize, f"metadata array {key!r}")
    elif itype == _STRING:
        for i in range(count):
            n = cur.u64(f"element {i} of metadata array {key!r}")
            cur.skip(n, f"element {i} of metadata array {key!r} ({n} bytes)")
    else:
        if depth >= _MAX_ARRAY_NESTING:
            raise GGUFError(f"{cur.path}: metadata array {key!r} is nested too deeply")
        for i in range(count):  # each element: its own element type, length and items
            _scan_value(cur, _ARRAY, f"{key}[{i}]", depth + 1)
    return None


def _scan_gguf(path: Path, buf) -> tuple[dict, list[_TensorInfo], int, int]:
    """Walk the header of a GGUF file held in ``buf``, checking every length.

    -> (scalar/string metadata values, tensor infos, offset where the data section starts,
    alignment)."""
    cur = _Cursor(buf, path)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("the header (version)")
    if version & 0xFFFF == 0 and version:
        raise GGUFError(f"{path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    n_tensors = cur.u64("the header (tensor count)")
    n_kv = cur.u64("the header (metadata count)")
    left = cur.size - cur.pos
    if n_kv * 12 > left or n_tensors * 24 > left:  # smallest possible entries
        raise GGUFError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata entries, "
                        f"more than the remaining {left} bytes can hold (truncated or corrupt)")
    values, types = {}, {}
    for i in range(n_kv):
        key = cur.string(f"the key of metadata entry {i}")
        if key in types:
            raise GGUFError(f"{path}: metadata key {key!r} appears twice")
        types[key] = cur.u32(f"the type of metadata {key!r}")
        values[key] = _scan_value(cur, types[key], key)
    infos, names = [], set()
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}")
        if name in names:
            raise GGUFError(f"{path}: tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.u32(f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions "
                            f"(must be 1..{_MAX_DIMS}): corrupt GGUF file")
        dims = tuple(cur.u64(f"the shape of tensor {name!r}") for _ in range(n_dims))
        type_id = cur.u32(f"the type of tensor {name!r}")
        offset = cur.u64(f"the data offset of tensor {name!r}")
        infos.append(_TensorInfo(name, dims, type_id, offset))
    alignment = _DEFAULT_ALIGNMENT
    if "general.alignment" in values:
        alignment = values["general.alignment"]
        if types["general.alignment"] != _UINT32 or alignment <= 0 \
                or alignment & (alignment - 1):
            raise GGUFError(f"{path}: general.alignment must be a power of two (uint32), "
                            f"got {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    if infos and data_start > cur.size:
        raise GGUFError(f"{path}: truncated GGUF file: the file ends ({cur.size} bytes) before "
                        f"its tensor data section starts (offset {data_start})")
    return values, infos, data_start, alignment


def _check_tensor_extents(path: Path, infos, data_start: int, alignment: int, size: int):
    """Every tensor: known type, whole blocks per row, aligned, inside the file, no overlaps."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    spans = []
    for t in infos:
        try:
            qtype = GGMLQuantizationType(t.type_id)
        except ValueError:
            raise GGUFError(f"{path}: tensor {t.name!r} has unknown ggml type id {t.type_id} "
                            f"(not a type this version of the gguf package knows)") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(t.dims))
        if any(d == 0 for d in t.dims):
            raise GGUFError(f"{path}: tensor {t.name!r} has an empty dimension (shape {shape})")
        if t.dims[0] % block:
            raise GGUFError(f"{path}: tensor {t.name!r} of type {qtype.name} has rows of "
                            f"{t.dims[0]} elements, not a multiple of its block size {block}")
        if t.offset % alignment:
            raise GGUFError(f"{path}: tensor {t.name!r} has data offset {t.offset}, not a multiple "
                            f"of the file's alignment {alignment}: corrupt GGUF file")
        n = 1
        for d in t.dims:
            n *= d
        start = data_start + t.offset
        end = start + n // block * type_size
        if end > size:
            raise GGUFError(f"{path}: tensor {t.name!r} ({qtype.name}, shape {shape}) needs bytes "
                            f"{start}..{end}, past the end of the file ({size} bytes): the file "
                            f"is truncated, or the tensor's offset or shape is wrong")
        spans.append((start, end, t.name))
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise GGUFError(f"{path}: tensors {an!r} and {bn!r} overlap in the file "
                            f"(bytes {a0}..{a1} and {b0}..{b1})")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file: header, metadata, and every tensor's extent."""
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
            _, infos, data_start, alignment = _scan_gguf(path, buf)
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    _check_tensor_extents(path, infos, data_start, alignment, size)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the checks above should leave nothing for it to trip on
        raise GGUFError(f"{path}: damaged GGUF file ({type(e).__name__}: {e})") from None
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception as e:
            raise GGUFError(f"{path}: unreadable metadata field {key!r} "
                            f"({type(e).__name__}: {e})") from None
    tensors = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml lists ne0 (inner) first
        end = int(t.data_offset) + int(t.n_bytes)
        if int(t.data_offset) < 0 or end > size or t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path}: tensor {t.name!r} claims bytes {t.data_offset}..{end} but "
                            f"the file has {size} bytes (truncated or lying offsets)")
        tensors[t.name] = PackedTensor(t.name, qtype, shape, t.data)
    return GGUFFile(path, metadata, tensors, reader)


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


def load_gguf(path, dtype: torch.dtype = torch.float32):
    """-> (ModelConfig, state dict of dequantized ``dtype`` tensors, packed tensors, GGUFFile).

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
        w = _decode(g, pt, torch.float32)
        proj = name.split(".")[-2]
        if permuted and proj in heads:  # (convert_hf_to_gguf permutes q/k biases alike)
            w = unpermute_rows(w, heads[proj])
            if pt.qtype in BLOCK_FORMATS and w.dim() == 2:
                pt = PackedTensor(pt.name, pt.qtype, pt.shape,
                                  unpermute_rows(pt.data, heads[proj]))
        state[name] = w.to(dtype)
        if pt.qtype in BLOCK_FORMATS:
            packed[name] = pt
    return config, state, packed, g


def _decode(g: GGUFFile, pt: PackedTensor, dtype) -> torch.Tensor:
    try:
        return pt.dequantize(dtype)
    except GGUFError as e:
        raise GGUFError(f"{g.path}: {e}") from None


def _dims_summary(c: ModelConfig) -> str:
    return (f"vocab {c.vocab_size}, hidden {c.hidden_size}, ffn {c.intermediate_size}, "
            f"{c.num_heads} heads / {c.num_kv_heads} kv heads of {c.head_dim}")
