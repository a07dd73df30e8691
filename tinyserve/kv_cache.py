"""Contiguous, preallocated KV cache: one [B, Hkv, max_seq, D] K and V tensor per layer.

Memory is 2 * layers * B * Hkv * max_seq * D * bytes_per_elem, paid up front (notebook 02 adds
it up; PagedAttention later pays only for what is used). ``lengths[b]`` counts the tokens of row
b already cached; rows may differ, which is what batching prompts of different lengths needs.
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

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor,
              positions: torch.Tensor, valid: torch.Tensor):
        """Store k_new/v_new [B, Hkv, T, D] at ``positions`` [B, T] where ``valid`` [B, T].

        Only valid entries are written: a padded token of a short prompt must not land in
        (and overwrite) a slot another of its row's tokens owns.
        """
        b, t = valid.nonzero(as_tuple=True)
        p = positions[b, t]
        # [B, Hkv, S, D] viewed as [B, S, Hkv, D] so (row, position) index a whole token.
        self.k[layer].transpose(1, 2)[b, p] = k_new.transpose(1, 2)[b, t]
        self.v[layer].transpose(1, 2)[b, p] = v_new.transpose(1, 2)[b, t]

    def write_at(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor):
        """One token per row, k_new/v_new [B, Hkv, 1, D], at positions ``pos`` [B] (on device).

        Plain tensor indexing, no ``nonzero``: no host sync, so a CUDA graph can capture it.
        """
        rows = torch.arange(self.batch_size, device=pos.device)
        self.k[layer][rows, :, pos] = k_new[:, :, 0]
        self.v[layer][rows, :, pos] = v_new[:, :, 0]
