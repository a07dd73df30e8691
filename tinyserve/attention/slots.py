"""The engine's contiguous baseline: one ``KVCache`` row ("slot") of ``max_model_len`` tokens
per sequence, the step's tokens packed into one row of N (vLLM before PagedAttention).

Per step (``build``): token t of the step goes to (slot_idx[t], positions[t]) of the cache.
Decode rows (one query; a 1-token prefill chunk is the same computation) share one attention
call; each prefill chunk gets its own call over a view of its slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .base import AttentionMetadata


@dataclass
class SlotMetadata(AttentionMetadata):
    slot_idx: torch.Tensor      # [N] slot of each token
    positions: torch.Tensor     # [N] its position
    decode: tuple | None        # (tok, rows, where, n_rows, S, q_pos, kv_len) of the decode rows
    prefill: list[tuple]        # (start, end, slot, kv, q_pos, kv_len) per prefill chunk


class SlotBackend:
    def __init__(self, kernels: str = "auto"):
        ops.check_backend(kernels)
        self.kernels = kernels

    @staticmethod
    def copy(kv_caches, copies: list[tuple[int, int, int]]):
        """Fork: slot src's first n tokens -> slot dst, (src, dst, n) each: 2 * layers * Hkv *
        n * D elements read and written, the bytes a paged cache shares instead."""
        for src, dst, n in copies:
            for K, V in kv_caches:
                K[dst, :, :n], V[dst, :, :n] = K[src, :, :n], V[src, :, :n]

    def build(self, block_tables: list[list[int]], ctx_lens: list[int], q_lens: list[int],
              positions: torch.Tensor) -> SlotMetadata:
        """Row i (its table: [slot]) has ``ctx_lens[i]`` tokens cached and feeds the next
        ``q_lens[i]``, at ``positions`` [N]."""
        dev, slots = positions.device, [t[0] for t in block_tables]
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        slot_idx = torch.tensor(slots, device=dev).repeat_interleave(
            torch.tensor(q_lens, device=dev))
        dec, decode = [i for i, n in enumerate(q_lens) if n == 1], None
        if dec:
            dslots = [slots[i] for i in dec]
            lo, hi = min(dslots), max(dslots) + 1
            if hi - lo <= 2 * len(dec):
                # A view of the slot range [lo, hi): nothing copied. Slots in the range that do
                # not decode now get a dummy query (position 0, one key), its output dropped.
                rows, where, n_rows = slice(lo, hi), [s - lo for s in dslots], hi - lo
            else:
                # A few decodes spread over many slots: gather them, which copies
                # Bd * Hkv * S * D elements of K and of V per layer before attention reads them.
                rows, where, n_rows = (torch.tensor(dslots, device=dev), list(range(len(dec))),
                                       len(dec))
            where = torch.tensor(where, device=dev)
            tok = torch.tensor([cu[i] for i in dec], device=dev)
            q_pos = torch.zeros(n_rows, 1, dtype=torch.long, device=dev)
            q_pos[where, 0] = positions[tok]
            kv_len = torch.ones(n_rows, dtype=torch.long, device=dev)
            kv_len[where] = torch.tensor([ctx_lens[i] + 1 for i in dec], device=dev)
            S = max(ctx_lens[i] for i in dec) + 1
            decode = (tok, rows, where, n_rows, S, q_pos, kv_len)
        prefill = [(cu[i], cu[i + 1], slots[i], ctx_lens[i] + n, positions[cu[i]:cu[i + 1]][None],
                    torch.tensor([ctx_lens[i] + n], device=dev))
                   for i, n in enumerate(q_lens) if n > 1]
        return SlotMetadata(self, slot_idx, positions, decode, prefill)

    def forward(self, q, k, v, kv_cache, meta: SlotMetadata):
        """q [1, Hq, N, D], k/v [1, Hkv, N, D] (packed) -> o [1, Hq, N, D]."""
        K, V = kv_cache                                           # [slots, Hkv, L, D]
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))       # [N, H, D] views
        # [slots, Hkv, L, D] viewed as [slots, L, Hkv, D]: (slot, position) index one token.
        K.transpose(1, 2)[meta.slot_idx, meta.positions] = k
        V.transpose(1, 2)[meta.slot_idx, meta.positions] = v
        o = torch.empty_like(q)
        if meta.decode is not None:
            tok, rows, where, n_rows, S, q_pos, kv_len = meta.decode
            qd = q.new_zeros(n_rows, q.shape[1], 1, q.shape[2])   # [rows, Hq, 1, D]
            qd[where, :, 0] = q[tok]
            od = ops.attention(qd, K[rows, :, :S], V[rows, :, :S], q_pos, kv_len,
                               backend=self.kernels)
            o[tok] = od[where, :, 0]
        for s, e, slot, kv, q_pos, kv_len in meta.prefill:
            qp = q[s:e].transpose(0, 1)[None]                     # [1, Hq, T, D]
            op = ops.attention(qp, K[slot:slot + 1, :, :kv], V[slot:slot + 1, :, :kv],
                               q_pos, kv_len, backend=self.kernels)
            o[s:e] = op[0].transpose(0, 1)
        return o.transpose(0, 1)[None]
