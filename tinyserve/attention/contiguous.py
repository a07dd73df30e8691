"""Attention over rows of a contiguous ``KVCache``: [B, T] batches, row b continuing after the
``lengths[b]`` tokens it has cached (or, without a cache, the T tokens are everything).

Three shapes of step, one backend:
* no cache: recompute-everything baseline; the keys are exactly this call's tokens;
* ``batch``: row b appends its first ``num_new[b]`` tokens (right padding is never written);
  attention spans the live prefix ``[0, max kv_len)`` only, found on the host once per forward;
* ``decode``: one token per row, every row live, no host synchronisation at all (attention
  spans the whole cache, masked at kv_len on the device), so a CUDA graph can capture it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .base import AttentionMetadata


@dataclass
class ContiguousMetadata(AttentionMetadata):
    positions: torch.Tensor            # [B, T] position of every query token
    kv_len: torch.Tensor               # [B] keys each row attends after this step's writes
    max_kv_len: int | None             # host copy of kv_len.max(); None: span the whole cache
    rows: torch.Tensor | None          # [W] row of each token written (None: one per row)
    cols: torch.Tensor | None          # [W] its column in the step's T


class ContiguousBackend:
    def __init__(self, kernels: str = "auto"):
        ops.check_backend(kernels)
        self.kernels = kernels

    def no_cache(self, num_new: torch.Tensor, T: int) -> ContiguousMetadata:
        """Whole sequences, no cache: row b's first ``num_new[b]`` of T tokens are real."""
        positions = torch.arange(T, device=num_new.device)[None].expand(len(num_new), T)
        return ContiguousMetadata(self, positions, num_new, None, None, None)

    def batch(self, lengths: torch.Tensor, num_new: torch.Tensor, T: int) -> ContiguousMetadata:
        """Row b appends its first ``num_new[b]`` of T tokens after ``lengths[b]`` cached."""
        t = torch.arange(T, device=lengths.device)
        positions = lengths[:, None] + t                                  # [B, T]
        rows, cols = (t[None, :] < num_new[:, None]).nonzero(as_tuple=True)
        kv_len = lengths + num_new
        return ContiguousMetadata(self, positions, kv_len, int(kv_len.max()), rows, cols)

    def decode(self, lengths: torch.Tensor) -> ContiguousMetadata:
        """One token per row at position ``lengths[b]``; nothing read back to the host."""
        return ContiguousMetadata(self, lengths[:, None], lengths + 1, None, None, None)

    def forward(self, q, k, v, kv_cache, meta: ContiguousMetadata):
        """kv_cache: this layer's (K, V) [B, Hkv, max_len, D], or None."""
        if kv_cache is not None:
            K, V = kv_cache
            if meta.rows is None:          # decode: token b goes to (b, positions[b, 0])
                b = torch.arange(K.shape[0], device=K.device)
                K[b, :, meta.positions[:, 0]] = k[:, :, 0]
                V[b, :, meta.positions[:, 0]] = v[:, :, 0]
            else:
                # [B, Hkv, S, D] viewed as [B, S, Hkv, D] so (row, position) index one token.
                p = meta.positions[meta.rows, meta.cols]
                K.transpose(1, 2)[meta.rows, p] = k.transpose(1, 2)[meta.rows, meta.cols]
                V.transpose(1, 2)[meta.rows, p] = v.transpose(1, 2)[meta.rows, meta.cols]
            S = K.shape[2] if meta.max_kv_len is None else meta.max_kv_len
            k, v = K[:, :, :S], V[:, :, :S]
        return ops.attention(q, k, v, meta.positions, meta.kv_len, backend=self.kernels)
