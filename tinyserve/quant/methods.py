"""The quantization methods ``quantize_model`` knows, by name: a registry (``register_method``,
``known_methods``, ``get_method``) and the built-in methods registered in it: "int8", "int4",
"nf4", "gguf" (see ``tinyserve.quant``) and "gptq" (``tinyserve.quant.gptq_model``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..ops.quant_layout import NF4_BLOCK_SIZE
from .formats import quantize_nf4
from .gguf_format import GGUF_QTYPES, GGUFWeight
from .gptq import DEFAULT_GROUP_SIZE as GPTQ_DEFAULT_GROUP_SIZE
from .gptq_model import gptq_model
from .int_formats import INT4_GROUP_SIZES, quantize_int4, quantize_int8


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
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown quantization method {name!r}; known methods: "
                         f"{', '.join(sorted(_METHODS))}")
    return _METHODS[name]


# ---- the built-in methods ------------------------------------------------------------------
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


def _gptq(model, targets, *, group_size=GPTQ_DEFAULT_GROUP_SIZE, **kw):
    return gptq_model(model, {n: m for n, m in targets.items() if m is not None},
                      group_size=group_size, **kw)


register_method("gptq", _gptq, group_sizes=INT4_GROUP_SIZES,
                default_group_size=GPTQ_DEFAULT_GROUP_SIZE, model_level=True,
                description="GPTQ (Frantar et al. 2022): Hessian-aware rounding on "
                            "calibration text to asymmetric int4 groups (bits=2..4)")
