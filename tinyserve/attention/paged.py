"""PagedAttention over block pools: each layer's K/V live in [num_blocks, block_size, Hkv, D]
(``ops.paged_attention``'s layout) and a sequence's block table lists the blocks holding its
tokens 0, 1, 2, ...: token t sits in slot ``table[t // block_size] * block_size + t % block_size``.

Once per step (``build``, on the host, copied to the device once): the block tables
[B, max_blocks] (-1 past a row's blocks), the slot of every new token [N], the keys each row
attends ``seq_lens`` [B] and the packed query offsets ``query_start_loc`` [B + 1]. Per layer
(``forward``): ``paged_write`` scatters the step's k/v into their slots, then one
``paged_attention`` call serves the whole batch, decodes and prefill chunks together (the
split-KV decode kernel when every row has one query, else the packed prefill kernel, where a
decode is a row of one query).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .base import AttentionMetadata


@dataclass
class PagedMetadata(AttentionMetadata):
    slot_mapping: torch.Tensor             # [N] int64 slot of each new token
    block_tables: torch.Tensor             # [B, max_blocks] int32, -1 padded
    seq_lens: torch.Tensor                 # [B] int32 keys per row after this step
    query_start_loc: torch.Tensor | None   # [B + 1] int32; None: all decodes (one query each)
    max_query_len: int


class PagedBackend:
    def __init__(self, block_size: int, kernels: str = "auto"):
        ops.check_backend(kernels)
        self.block_size, self.kernels = block_size, kernels

    def allocate(self, model_config, num_blocks: int, dtype, device) -> list[tuple]:
        """Zeroed (K, V) pools, one pair per layer: 2 * layers * num_blocks * block_size *
        Hkv * D elements."""
        shape = (num_blocks, self.block_size, model_config.num_kv_heads, model_config.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device),
                 torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(model_config.num_layers)]

    @staticmethod
    def copy(kv_caches, pairs: list[tuple[int, int]]):
        """Copy-on-write: block src -> dst in every layer, before the step writes anything
        (reads and writes 2 * layers * len(pairs) blocks)."""
        if not pairs:
            return
        dev = kv_caches[0][0].device
        src, dst = (torch.tensor(x, device=dev) for x in zip(*pairs))
        for K, V in kv_caches:
            K[dst], V[dst] = K[src], V[src]

    def build(self, block_tables: list[list[int]], ctx_lens: list[int], q_lens: list[int],
              positions: torch.Tensor) -> PagedMetadata:
        """Row i has ``ctx_lens[i]`` tokens cached and feeds the next ``q_lens[i]``, at
        ``positions`` [N] (their device is the metadata's)."""
        bs, device = self.block_size, positions.device
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [-1] * (width - len(t)) for t in block_tables],
                              dtype=torch.int32, device=device)
        slots = torch.tensor([t[p // bs] * bs + p % bs
                              for t, c, n in zip(block_tables, ctx_lens, q_lens)
                              for p in range(c, c + n)], dtype=torch.int64, device=device)
        seq_lens = torch.tensor([c + n for c, n in zip(ctx_lens, q_lens)], dtype=torch.int32,
                                device=device)
        cu = None
        if any(n != 1 for n in q_lens):
            cu = torch.tensor([0] + q_lens, dtype=torch.int32, device=device).cumsum(0,
                                                                      dtype=torch.int32)
        return PagedMetadata(self, slots, tables, seq_lens, cu, max(q_lens))

    def forward(self, q, k, v, kv_cache, meta: PagedMetadata):
        """q [1, Hq, N, D], k/v [1, Hkv, N, D] (packed) -> o [1, Hq, N, D]."""
        K, V = kv_cache
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))             # [N, H, D] views
        ops.paged_write(K, V, k, v, meta.slot_mapping, backend=self.kernels)
        o = ops.paged_attention(q, K, V, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                backend=self.kernels, max_q_len=meta.max_query_len)
        return o.transpose(0, 1)[None]
