"""Rotary position embedding (RoPE), "rotate-half" layout as in HF transformers.

Dimension i of the first half of a head pairs with dimension i + head_dim/2, and the pair is
rotated by angle pos * theta^(-2i/head_dim). GGUF files store Q/K rows permuted for llama.cpp's
interleaved pairs; the GGUF loader undoes that permutation so this one layout serves both.
"""
import math

import torch

from ._dispatch import check_backend


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair angular frequencies, [head_dim/2] fp32."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if freq_factors is not None:  # GGUF rope_freqs.weight: Llama-3 scaling, precomputed
        inv = inv / freq_factors.double()
    elif scaling is not None and scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1+: stretch long wavelengths by `factor`, keep short ones, blend between.
        factor = scaling["factor"]
        lo, hi = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen) - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_ctx / lo, inv / factor,
                          torch.where(wavelen < old_ctx / hi, inv, blended))
    return inv.float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """positions: [B, T] int -> cos, sin: [B, T, head_dim] fp32 (each half repeated)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [B, Hq, T, D], k: [B, Hkv, T, D], cos/sin: [B, T, D] -> rotated q, k (input dtype)."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    qf, kf = q.float(), k.float()
    q_out = qf * cos + _rotate_half(qf) * sin
    k_out = kf * cos + _rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


def apply_rope(q, k, cos, sin, backend="auto"):
    check_backend(backend)
    return apply_rope_ref(q, k, cos, sin)
