"""Reading a GGUF file's header and checking its tensor extents.

A file may be truncated or lie: every length is checked against the bytes that are really
there before it is used. ``scan_gguf`` walks the header (metadata values, tensor infos);
``check_tensor_extents`` checks every tensor's type, alignment and byte range and says where
each one's bytes are. ``tinyserve.weights.gguf.read_gguf`` builds on both. (``gguf.GGUFReader``
is not used to read files: it trusts every length, and it builds a numpy view per metadata
item, ~3 s for SmolLM2's 49k-token vocabulary, against ~0.1 s here. The ``gguf`` package is
still needed for its table of ggml types.)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gguf_blocks import GGUFError

__all__ = ["TensorExtent", "check_tensor_extents", "scan_gguf"]


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


_FMT = {"UINT8": "B", "INT8": "b", "UINT16": "H", "INT16": "h", "UINT32": "I", "INT32": "i",
        "FLOAT32": "f", "BOOL": "?", "UINT64": "Q", "INT64": "q", "FLOAT64": "d"}


def _scan_value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    """Read one metadata value (scalar, string, or array as a list), checking every length."""
    if vtype not in _VALUE_TYPES:
        raise GGUFError(f"{cur.path}: metadata {key!r} has unknown value type {vtype}: "
                        f"corrupt GGUF file")
    name, size = _VALUE_TYPES[vtype]
    if size is not None:
        return cur.read(_FMT[name], size, f"the value of metadata {key!r}")
    if vtype == _STRING:
        return cur.string(f"the value of metadata {key!r}")
    itype = cur.u32(f"the element type of metadata array {key!r}")
    count = cur.u64(f"the length of metadata array {key!r}")
    if itype not in _VALUE_TYPES:
        raise GGUFError(f"{cur.path}: metadata array {key!r} has unknown element type {itype}: "
                        f"corrupt GGUF file")
    iname, isize = _VALUE_TYPES[itype]
    left = cur.size - cur.pos
    # Every element takes at least 8 bytes (string/array headers) or its fixed size: a count
    # the rest of the file cannot hold is rejected before looping over it.
    if count * (isize or 8) > left:
        raise GGUFError(f"{cur.path}: metadata array {key!r} claims {count} elements, more than "
                        f"the remaining {left} bytes of the file can hold (truncated or corrupt)")
    if isize is not None:   # one numpy read (a vocabulary's scores: 49k floats)
        cur.need(count * isize, f"metadata array {key!r}")
        out = np.frombuffer(cur.buf, np.dtype("<" + _FMT[iname]), count, cur.pos).tolist()
        cur.pos += count * isize
        return out
    if itype == _STRING:   # a vocabulary or merge list: ~50k short strings
        return _string_array(cur, count, key)
    if depth >= _MAX_ARRAY_NESTING:
        raise GGUFError(f"{cur.path}: metadata array {key!r} is nested too deeply")
    return [_scan_value(cur, _ARRAY, f"{key}[{i}]", depth + 1) for i in range(count)]


_U64 = struct.Struct("<Q")


def _string_array(cur: _Cursor, count: int, key: str) -> list[str]:
    """``count`` length-prefixed UTF-8 strings: ``_Cursor.string``'s checks in one tight loop
    (a vocabulary is ~50k of them; the message for an error is built only if one occurs)."""
    buf, pos, size, out = cur.buf, cur.pos, cur.size, []
    for i in range(count):
        if pos + 8 > size:
            break
        n = _U64.unpack_from(buf, pos)[0]
        if pos + 8 + n > size:
            break
        raw = bytes(buf[pos + 8:pos + 8 + n])
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise GGUFError(f"{cur.path}: element {i} of metadata array {key!r} is not valid "
                            f"UTF-8 ({raw[:40]!r}): corrupt GGUF file") from None
        pos += 8 + n
    cur.pos = pos
    if len(out) < count:   # ran out of bytes: let the cursor say where, as for any read
        cur.string(f"element {len(out)} of metadata array {key!r}")
    return out


def scan_gguf(path: Path, buf) -> tuple[dict, list[_TensorInfo], int, int]:
    """Walk the header of a GGUF file held in ``buf``, checking every length.

    -> (metadata values, tensor infos, offset where the data section starts,
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


@dataclass
class TensorExtent:
    qtype: str               # ggml type name: "F32", "Q4_1", ...
    shape: tuple[int, ...]   # torch order (outer first)
    start: int               # absolute byte offset in the file
    row_bytes: int           # bytes of one row (shape[-1] elements)
    nbytes: int


def check_tensor_extents(path: Path, infos, data_start: int, alignment: int,
                         size: int) -> dict[str, TensorExtent]:
    """Every tensor: known type, whole blocks per row, aligned, inside the file, no overlaps.
    -> {name: TensorExtent}."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    spans, out = [], {}
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
        out[t.name] = TensorExtent(qtype.name, shape, start, t.dims[0] // block * type_size,
                                   end - start)
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise GGUFError(f"{path}: tensors {an!r} and {bn!r} overlap in the file "
                            f"(bytes {a0}..{a1} and {b0}..{b1})")
    return out
