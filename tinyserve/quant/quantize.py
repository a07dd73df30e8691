"""Swapping a model's linear layers for quantized ones: ``quantize_model`` (in place, all or
nothing) and the layers it targets (``quantizable_linears``). What is replaced and what is not
is described in ``tinyserve.quant``; the methods themselves are in ``tinyserve.quant.methods``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model import Linear
from .linear import QuantLinear, make_quant_linear
from .methods import get_method
from .quantized_weight import QuantizedWeight


def quantizable_linears(model) -> dict[str, nn.Module]:
    """{name: Linear} for the decoder layers' linears (``layers.{i}.attn.wq`` ...), plus
    ``lm_head`` when the model has an untied one."""
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
