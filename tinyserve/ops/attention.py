"""Causal grouped-query attention over a (possibly cached) key/value sequence.

One masked reference covers prefill (T query tokens) and decode (T = 1): query token t of row b
sits at absolute position ``q_pos[b, t]`` and may attend to key positions ``j <= q_pos[b, t]``
with ``j < kv_len[b]``. Rows of a batch may be at different lengths (continuous batching).
"""
import math

import torch

from ._dispatch import check_backend


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  q_pos: torch.Tensor, kv_len: torch.Tensor) -> torch.Tensor:
    """q: [B, Hq, T, D]; k, v: [B, Hkv, S, D]; q_pos: [B, T]; kv_len: [B] -> [B, Hq, T, D].

    Bytes: reads B*Hkv*S*D elements of K and of V once per call (shared by the Hq/Hkv query
    heads of a group); at decode that KV read dominates, growing linearly with context.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # Group query heads by their KV head instead of repeating K/V G times in memory.
    qg = q.float().reshape(B, Hkv, G * T, D)
    scores = qg @ k.float().transpose(-1, -2) / math.sqrt(D)            # [B, Hkv, G*T, S]
    j = torch.arange(S, device=q.device)
    allowed = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < kv_len[:, None, None])
    allowed = allowed[:, None, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A padded query row (past its sequence's end) may have no allowed key: give it zeros
    # rather than NaN so it cannot poison anything downstream.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = probs @ v.float()                                              # [B, Hkv, G*T, D]
    return out.view(B, Hq, T, D).to(q.dtype)


def attention(q, k, v, q_pos, kv_len, backend="auto"):
    check_backend(backend)
    return attention_ref(q, k, v, q_pos, kv_len)
