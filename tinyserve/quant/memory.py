"""A model's weights in bytes as stored: quantized formats at their packed size, by kind
(``memory_breakdown``, ``model_bytes``), and the linear layers alone (``linear_footprint``,
which gives the bits per weight of the quality table).
"""
from __future__ import annotations

from torch import nn

from ..model import Linear
from .linear import QuantLinear
from .quantized_weight import tensor_nbytes


def memory_breakdown(model) -> dict[str, int]:
    """Bytes as stored, by kind: "<format> linears" for quantized layers (codes + scales +
    bias), "dense linears", "embedding", "norms and other". Tied tensors count once;
    non-persistent buffers (RoPE frequencies) do not count."""
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
                add(key, tensor_nbytes(p))
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set and id(b) not in seen:
                seen.add(id(b))
                add(key, tensor_nbytes(b))
    return out


def model_bytes(model) -> int:
    """The model's weights as stored, in bytes (quantized formats at their packed size)."""
    return sum(memory_breakdown(model).values())


def linear_footprint(model) -> tuple[int, int]:
    """(bytes as stored, number of weights) of the model's linear layers, quantized or dense
    (a tied head that is the embedding table is not a linear layer and does not count)."""
    nbytes = n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            nbytes += m.nbytes
            n += m.in_features * m.out_features
        elif isinstance(m, Linear):
            nbytes += sum(t.numel() * t.element_size() for t in (m.weight, m.bias)
                          if t is not None)
            n += m.weight.numel()
    return nbytes, n
