"""Quantized drop-in replacements for ``tinyserve.model.Linear``.

A QuantLinear holds one format dataclass (see ``formats.py``) as buffers (so ``model.to(device)``
moves it and ``state_dict()`` saves it) plus an optional bias, and computes
``tinyserve.ops.quant_linear.quant_linear(x, qt, bias, backend)``: the fused Triton
dequantize-and-multiply kernel on CUDA, dequantize-then-``F.linear`` elsewhere.

Floating-point buffers (fp16 scales, fp32 scales) are held as same-size integer views: a model-wide
``model.to(torch.bfloat16)`` or ``.half()`` casts every floating-point tensor, which would
silently change a format's scale dtype (and round fp16 scales through bf16). Integer views are
left alone; ``.qt`` rebuilds the dataclass with zero-copy ``.view(dtype)``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..ops.quant_linear import quant_linear
from .formats import NF4Weight
from .gguf_format import GGUFWeight
from .int_formats import Int4Weight, Int8Weight
from .quantized_weight import QuantizedWeight

_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class QuantLinear(nn.Module):
    """y = x @ W^T (+ b) with W stored in a quantized format."""
    weight_class: type = QuantizedWeight

    def __init__(self, qt: QuantizedWeight, bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(qt, self.weight_class):
            raise TypeError(f"{type(self).__name__} holds {self.weight_class.__name__}, "
                            f"got {type(qt).__name__}")
        self._meta = {}       # non-tensor fields (group size, qtype, shape), fixed at build time
        self._float_dtypes = {}
        for f in dataclasses.fields(qt):
            v = getattr(qt, f.name)
            if isinstance(v, torch.Tensor):
                if v.is_floating_point():
                    self._float_dtypes[f.name] = v.dtype
                    v = v.contiguous().view(_INT_OF[v.element_size()])
                self.register_buffer(f.name, v)
            elif v is None:             # an optional tensor that is absent
                self.register_buffer(f.name, None)
            else:
                self._meta[f.name] = v
        N, K = qt.shape
        self.in_features, self.out_features = K, N
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        # A zero-size marker that follows model.to(dtype): the dtype of ``.weight`` below.
        self.register_buffer("_dtype_marker", torch.empty(0, dtype=dtype, device=qt.device),
                             persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @property
    def qt(self) -> QuantizedWeight:
        """The format dataclass (a zero-copy view of the buffers, on their device)."""
        kw = dict(self._meta)
        for name in (f.name for f in dataclasses.fields(self.weight_class)):
            if name in self._buffers:
                t = self._buffers[name]
                if t is not None and name in self._float_dtypes:
                    t = t.view(self._float_dtypes[name])
                kw[name] = t
        return self.weight_class(**kw)

    @property
    def format(self) -> str:
        return self.weight_class.format

    @property
    def nbytes(self) -> int:
        """Bytes as stored: the format's nbytes plus the bias."""
        b = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.qt.nbytes + b

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the model's dtype. Materializes N x K values on every
        access: only for code that reads ``.weight`` directly; ``forward`` never does."""
        return self.qt.dequantize(self._dtype_marker.dtype)

    def forward(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        return quant_linear(x, self.qt, self.bias, backend=backend)

    def extra_repr(self) -> str:
        meta = {k: v for k, v in self._meta.items() if k != "shape"}
        extra = "".join(f", {k}={v}" for k, v in meta.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format!r}{extra}, bias={self.bias is not None}")


class Int8Linear(QuantLinear):
    weight_class = Int8Weight


class Int4Linear(QuantLinear):
    weight_class = Int4Weight


class NF4Linear(QuantLinear):
    weight_class = NF4Weight


class GGUFLinear(QuantLinear):
    weight_class = GGUFWeight


LINEAR_CLASSES = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear, "gguf": GGUFLinear}


def make_quant_linear(qt: QuantizedWeight, bias: torch.Tensor | None = None,
                      dtype: torch.dtype | None = None) -> QuantLinear:
    """The QuantLinear subclass for ``qt.format`` holding ``qt`` (and ``bias``)."""
    cls = LINEAR_CLASSES.get(getattr(qt, "format", None))
    if cls is None:
        raise TypeError(f"no quantized linear layer for {type(qt).__name__} "
                        f"(formats: {sorted(LINEAR_CLASSES)})")
    return cls(qt, bias, dtype)
