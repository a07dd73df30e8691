"""Weight-only quantization: formats, quantized linear layers, and ``quantize_model``.

    from tinyserve.quant import quantize_model, model_bytes
    quantize_model(model, "int4", group_size=32)     # in place; returns the model
    model_bytes(model)                                 # weights as stored, in bytes

Methods (``known_methods()``):
    "int8"  symmetric, one scale per output channel                  (no group size)
    "int4"  asymmetric round-to-nearest, groups of 32 / 64 / 128 along K (default 32)
    "nf4"   QLoRA NormalFloat-4, blocks of 64 (``double_quant=True`` for 8-bit absmax)
    "gguf"  the GGUF file's own Q4_1 / Q8_0 blocks (``model.packed_weights``), unchanged
    "gptq"  GPTQ (``tinyserve.quant.gptq``) to the int4 layout, calibrated on ``calib`` text
Other methods can be added with ``register_method`` (``tinyserve.quant.methods``).

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

# This package's public API: each name is defined in the module it is imported from.
from ..ops.quant_layout import NF4_BLOCK_SIZE
from .article_snippet import dequantize_group_article, quantize_group_article, wrap_int8
from .formats import DQ_BLOCK_SIZE, FORMATS, NF4_CODEBOOK, NF4Weight, dequantize_nf4, quantize_nf4
from .gguf_format import GGUFWeight, quantize_gguf
from .int_formats import (INT4_GROUP_SIZES, Int4Weight, Int8Weight, dequantize_int4,
                          dequantize_int8, fake_quantize_asym, quantize_asym_codes, quantize_int4,
                          quantize_int8)
from .linear import (GGUFLinear, Int4Linear, Int8Linear, NF4Linear, QuantLinear,
                     make_quant_linear)
from .memory import memory_breakdown, model_bytes
from .methods import Method, get_method, known_methods, register_method
from .quantize import is_quantized, quantizable_linears, quantize_model
from .quantized_weight import QuantizedWeight, pack_nibbles, unpack_nibbles

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
