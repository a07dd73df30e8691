"""Contiguous, preallocated KV cache: one [B, Hkv, max_seq, D] K and V tensor per layer.

Memory is 2 * layers * B * Hkv * max_seq * D * bytes_per_elem, paid up front (notebook 02 adds
it up; PagedAttention later pays only for what is used). ``lengths[b]`` counts the tokens of row
b already cached; rows may differ, which is what batching prompts of different lengths needs.
Writing into it and attending over it is ``tinyserve.attention.ContiguousBackend``'s job.
"""
from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_seq_len >= 1, "
                             f"got {batch_size} and {max_seq_len}")
        shape = (batch_size, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # What Transformer.forward takes as kv_caches: (K, V) of each layer (views, no copy).
        self.layers = list(zip(self.k, self.v))
        self.batch_size, self.max_seq_len = batch_size, max_seq_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self):
        self.lengths.zero_()

    def truncate(self, lengths: torch.Tensor | list[int]):
        """Roll rows back to shorter lengths (entries past them are dead; later writes reuse them)."""
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device)
        if (lengths > self.lengths).any() or (lengths < 0).any():
            raise ValueError(f"truncate to {lengths.tolist()} but cached lengths are "
                             f"{self.lengths.tolist()}")
        self.lengths.copy_(lengths)

    def check_room(self, num_new: torch.Tensor):
        need = self.lengths + num_new
        if (need > self.max_seq_len).any():
            raise ValueError(f"KV cache holds {self.max_seq_len} tokens per sequence; "
                             f"this step needs {int(need.max())}")
