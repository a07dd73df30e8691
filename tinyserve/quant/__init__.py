"""Weight-only quantization: formats, quantized linear layers, and ``quantize_model``.

    from tinyserve.quant import quantize_model, model_bytes
    quantize_model(model, "int4", group_size=32)     # in place; returns the model
    model_bytes(model)                                 # weights as stored, in bytes

Methods (``known_methods()``):
    "int8"  symmetric, one scale per output channel                  (no group size)
    "int4"  asymmetric round-to-nearest, groups of 32 / 64 / 128 along K (default 32)
    "nf4"   QLoRA NormalFloat-4, blocks of 64 (``double_quant=True`` for 8-bit absmax)
    "gguf"  the GGUF file's own Q4_1 / Q8_0 blocks (``model.packed_weights``), unchanged
Other modules add methods with ``register_method`` (e.g. GPTQ in ``tinyserve.quant.gptq``).

What is replaced: every ``tinyserve.model.Linear`` of the decoder layers (q/k/v/o projections,
gate/up/down) and the LM head:
  * an untied LM head is quantized with the same method (for "gguf": its file blocks, when the
    file stores it as Q4_1 / Q8_0; otherwise it stays in the model dtype);
  * a tied head shares the embedding table, which the embedding lookup still needs in the model
    dtype. With "gguf" and a Q8_0 (or Q4_1) embedding in the file, the head becomes a GGUFLinear
    over those blocks (the same values, read at 8.5 bits per weight); with the other methods it
    stays tied, in the model dtype (quantizing it would add a copy, not save memory).
  The model calls ``model.lm_head(x, backend)`` whenever it has one, so a quantized head runs
  its fused kernel.
The embedding and the norms are never quantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .formats import (DQ_BLOCK_SIZE, FORMATS, GGUF_QTYPES, INT4_GROUP_SIZES, NF4_BLOCK_SIZE,
                      NF4_CODEBOOK, GGUFWeight, Int4Weight, Int8Weight, NF4Weight,
                      QuantizedWeight, dequantize_group_article, dequantize_int4,
                      dequantize_int8, dequantize_nf4, fake_quantize_asym, pack_nibbles,
                      quantize_asym_codes, quantize_gguf, quantize_group_article,
                      quantize_int4, quantize_int8, quantize_nf4, unpack_nibbles, wrap_int8)
from .linear import (GGUFLinear, Int4Linear, Int8Linear, NF4Linear, QuantLinear,
                     make_quant_linear)


# ---- the method registry -------------------------------------------------------------------
@dataclass
class Method:
    """A quantization method.

    ``fn`` is either per layer (``model_level=False``):
        fn(weight [N, K] tensor, *, group_size, name, **kw) -> QuantizedWeight
    or for the whole model (``model_level=True``, e.g. calibrated methods like GPTQ):
        fn(model, targets: {name: Linear}, *, group_size, **kw) -> {name: QuantizedWeight}
    where the result must cover every decoder-layer target (the LM head is optional: one left
    out stays in the model dtype). ``quantize_model`` validates the arguments first, then
    swaps the layers in only after ``fn`` has succeeded for all of them.

    ``group_sizes``: the allowed group sizes (None: the method takes none, e.g. per-channel
    int8); ``default_group_size`` is used when the caller passes None.
    """
    name: str
    fn: Callable
    group_sizes: tuple | None = None
    default_group_size: int | None = None
    model_level: bool = False
    description: str = ""
    quantize_tied_head: bool = False


_METHODS: dict[str, Method] = {}


def register_method(name: str, fn: Callable, *, group_sizes=None, default_group_size=None,
                    model_level: bool = False, description: str = "",
                    quantize_tied_head: bool = False, replace: bool = False) -> Method:
    """Add a method under ``name`` (see ``Method``). Re-registering needs ``replace=True``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a method name is a non-empty string, got {name!r}")
    if name in _METHODS and not replace:
        raise ValueError(f"quantization method {name!r} is already registered")
    if group_sizes is not None:
        group_sizes = tuple(group_sizes)
        if default_group_size is not None and default_group_size not in group_sizes:
            raise ValueError(f"default group size {default_group_size} not in {group_sizes}")
    m = Method(name, fn, group_sizes, default_group_size, model_level, description,
               quantize_tied_head)
    _METHODS[name] = m
    return m


def known_methods() -> list[str]:
    _load_plugins()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    _load_plugins()
    if name not in _METHODS:
        raise ValueError(f"unknown quantization method {name!r}; known methods: "
                         f"{', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def _load_plugins():
    """Methods defined in sibling modules register themselves on import (GPTQ)."""
    import importlib
    for mod in ("gptq",):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


def _int8(w, *, group_size=None, name=None, **kw):
    return quantize_int8(w, **kw)


def _int4(w, *, group_size, name=None, **kw):
    return quantize_int4(w, group_size=group_size, **kw)


def _nf4(w, *, group_size, name=None, **kw):
    return quantize_nf4(w, block_size=group_size, **kw)


def _gguf(model, targets, *, group_size=None, **kw):
    if kw:
        raise ValueError(f"gguf takes no options (got {sorted(kw)}): it runs the file's "
                         f"blocks as they are")
    packed = getattr(model, "packed_weights", None) or {}
    out = {}
    for name in targets:
        key = "embed.weight" if name == "lm_head" and model.lm_head is None else name + ".weight"
        pt = packed.get(key)
        if pt is None or pt.qtype not in GGUF_QTYPES:
            if name == "lm_head":
                continue                       # stays in the model dtype
            have = (f"holds no block tensors" if not packed else
                    f"holds {len(packed)} block tensors, but not this one")
            got = "" if pt is None else f" (it is stored as {pt.qtype})"
            raise ValueError(
                f"gguf: no Q4_1 / Q8_0 block tensor for {key!r}{got}; quantization='gguf' runs "
                f"the blocks of a GGUF file as they are, so load the model from a .gguf file "
                f"whose linear layers are Q4_1 or Q8_0 (model.packed_weights {have})")
        out[name] = GGUFWeight.from_packed(pt).to(model.device)
    return out


register_method("int8", _int8, description="symmetric int8, one fp32 scale per output channel")
register_method("int4", _int4, group_sizes=INT4_GROUP_SIZES, default_group_size=32,
                description="asymmetric 4-bit groups along K: fp16 scale and min per group")
register_method("nf4", _nf4, group_sizes=(NF4_BLOCK_SIZE,), default_group_size=NF4_BLOCK_SIZE,
                description="QLoRA NormalFloat-4, fp16 absmax per block of 64")
register_method("gguf", _gguf, group_sizes=(32,), default_group_size=32, model_level=True,
                quantize_tied_head=True,
                description="the GGUF file's Q4_1 / Q8_0 blocks of 32, as stored")


# ---- the model -----------------------------------------------------------------------------
def quantizable_linears(model) -> dict[str, nn.Module]:
    """{name: Linear} for the decoder layers' linears (``layers.{i}.attn.wq`` ...), plus
    ``lm_head`` when the model has an untied one."""
    from ..model import Linear
    out = {f"layers.{name}": m for name, m in model.layers.named_modules()
           if isinstance(m, Linear)}
    if isinstance(getattr(model, "lm_head", None), Linear):
        out["lm_head"] = model.lm_head
    return out


def is_quantized(model) -> bool:
    return bool(getattr(model, "quantization", None)) or any(
        isinstance(m, QuantLinear) for m in model.modules())


def _set_module(model, name: str, module: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def quantize_model(model, method: str, group_size: int | None = None, **kw):
    """Replace the model's linear layers by quantized ones, in place; returns ``model``.

    ``method``: one of ``known_methods()``. ``group_size``: the method's group / block size
    (None: its default). Other keywords go to the quantizer (e.g. ``double_quant=True`` for
    nf4, ``bits``). Nothing in the model changes unless every layer could be quantized.
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    m = get_method(method)
    if is_quantized(model):
        prev = getattr(model, "quantization", None) or {}
        raise ValueError(f"the model is already quantized ({prev.get('method', 'quantized')} "
                         f"layers present): quantize a freshly loaded model instead of "
                         f"quantizing twice")
    targets = quantizable_linears(model)
    if not targets:
        raise ValueError("the model has no tinyserve.model.Linear layers to quantize")
    tied_head = m.quantize_tied_head and getattr(model, "lm_head", None) is None
    if tied_head:
        targets["lm_head"] = None            # resolved by the method (gguf: the embedding)

    # Group size: allowed for this method, and dividing every layer's in_features.
    if m.group_sizes is None:
        if group_size is not None:
            raise ValueError(f"{method} quantizes each output channel with one scale: "
                             f"group_size does not apply (got {group_size})")
        gs = None
    else:
        gs = m.default_group_size if group_size is None else group_size
        if gs not in m.group_sizes:
            raise ValueError(f"{method}: group size {gs!r} is not allowed; choose one of "
                             f"{m.group_sizes}")
        for name, lin in targets.items():
            K = model.config.hidden_size if lin is None else lin.weight.shape[1]
            if K % gs:
                raise ValueError(f"{method}: group size {gs} does not divide the "
                                 f"in_features {K} of layer {name!r} ({K} % {gs} = {K % gs});"
                                 f" choose a group size from {m.group_sizes} that divides it")

    # Quantize everything first; swap only when all layers succeeded.
    with torch.no_grad():
        if m.model_level:
            qts = m.fn(model, targets, group_size=gs, **kw)
            missing = [n for n in targets if n != "lm_head" and n not in qts]
            if missing:
                raise ValueError(f"method {method!r} did not quantize {missing[:4]}"
                                 f"{' ...' if len(missing) > 4 else ''}")
        else:
            qts = {name: m.fn(lin.weight, group_size=gs, name=name, **kw)
                   for name, lin in targets.items() if lin is not None}
    dtype = model.dtype
    for name, qt in qts.items():
        if not isinstance(qt, QuantizedWeight):
            raise TypeError(f"method {method!r} returned {type(qt).__name__} for {name!r}, "
                            f"not a tinyserve.quant format")
        lin = targets.get(name)
        N, K = (model.config.vocab_size, model.config.hidden_size) if lin is None \
            else tuple(lin.weight.shape)
        if tuple(qt.shape) != (N, K):
            raise ValueError(f"method {method!r} returned shape {tuple(qt.shape)} for "
                             f"{name!r}, expected {(N, K)}")
    for name, qt in qts.items():
        lin = targets.get(name)
        bias = None if lin is None else lin.bias
        _set_module(model, name, make_quant_linear(qt, bias, dtype))
    model.quantization = {"method": method, "group_size": gs, **kw,
                          "layers": len(qts), "lm_head": "lm_head" in qts}
    return model


# ---- memory --------------------------------------------------------------------------------
def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def memory_breakdown(model) -> dict[str, int]:
    """Bytes as stored, by kind: "<format> linears" for quantized layers (codes + scales +
    bias), "dense linears", "embedding", "norms and other". Tied tensors count once;
    non-persistent buffers (RoPE frequencies) do not count."""
    from ..model import Linear
    out: dict[str, int] = {}
    seen: set[int] = set()

    def add(key, n):
        out[key] = out.get(key, 0) + n

    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            add(f"{mod.format} linears", mod.nbytes)
            continue
        key = ("dense linears" if isinstance(mod, Linear) else
               "embedding" if isinstance(mod, nn.Embedding) else "norms and other")
        for p in mod._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                add(key, _tensor_bytes(p))
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set and id(b) not in seen:
                seen.add(id(b))
                add(key, _tensor_bytes(b))
    return out


def model_bytes(model) -> int:
    """The model's weights as stored, in bytes (quantized formats at their packed size)."""
    return sum(memory_breakdown(model).values())


__all__ = [
    "quantize_model", "register_method", "known_methods", "get_method", "Method",
    "quantizable_linears", "is_quantized", "model_bytes", "memory_breakdown",
    "QuantizedWeight", "Int8Weight", "Int4Weight", "NF4Weight", "GGUFWeight", "FORMATS",
    "quantize_int8", "quantize_int4", "quantize_nf4", "quantize_gguf", "dequantize_int8",
    "dequantize_int4", "dequantize_nf4", "quantize_asym_codes", "fake_quantize_asym",
    "quantize_group_article", "dequantize_group_article", "wrap_int8", "pack_nibbles",
    "unpack_nibbles",
    "NF4_CODEBOOK", "INT4_GROUP_SIZES", "NF4_BLOCK_SIZE", "DQ_BLOCK_SIZE",
    "QuantLinear", "Int8Linear", "Int4Linear", "NF4Linear", "GGUFLinear", "make_quant_linear",
]
