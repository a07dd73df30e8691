"""Where the engine keeps K/V: the KV store protocol, and a pool of per-sequence slots.

The engine talks to its KV store only through this protocol, so PagedAttention's block
store (``paged_store.PagedKVStore``, the engine's default) and ``SlotKVPool`` are
interchangeable under the scheduler, runner and engine:

    can_allocate(seq, num_tokens) -> bool   could ``seq`` hold ``num_tokens`` tokens in all?
                                            (False for a running one: the scheduler preempts)
    allocate(seq, num_tokens) -> int        make sure it can (first call: take memory for it);
                                            -> leading tokens of ``seq`` already in the store
                                            (a prefix-cache hit on the first call, else 0):
                                            the scheduler skips their prefill
    fork(parent, child)                     parallel sampling: ``child`` starts with the K/V
                                            the parent has (shared by blocks, or copied)
    free(seq)                               give its memory back, at once
    prepare(batch)                          once per step, before the forward: build the index
                                            tensors every layer's ``attend`` will use
    attend(layer, q, k, v, batch) -> o      write this step's k/v [N, Hkv, D] where each
                                            sequence keeps them, then attention for every
                                            sequence of the batch: q [N, Hq, D] -> o [N, Hq, D]
    mark_computed(batch)                    after the forward: the batch's K/V are written
    reserved_tokens(), used_tokens()        token capacity held vs tokens really stored, so
                                            waste = (reserved - used) / reserved

(``num_free_slots`` and ``slot_of`` are the slot pool's own: slot timelines and its tests.)

``SlotKVPool`` is the simplest store: one ``KVCache`` with one row ("slot") per sequence, each
``max_model_len`` tokens long, reserved in full on a sequence's first ``allocate``. That
contiguous max-length reservation is what serving systems before PagedAttention did, and what
issue 7 measures its waste against: a sequence that stops after 20 tokens still holds
``max_model_len``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..kv_cache import KVCache


@dataclass
class PackedBatch:
    """One step's sequences, in the order their tokens are packed (built by the ModelRunner).

    Sequence i owns tokens ``cu_q[i]:cu_q[i+1]`` of the step; they sit at positions
    ``ctx_lens[i] ..`` (``ctx_lens[i]`` tokens of it are already in the store).
    """
    seq_ids: list[int]
    q_lens: list[int]               # new tokens per sequence (1 for a decode)
    ctx_lens: list[int]             # tokens cached before this step
    cu_q: list[int]                 # [B + 1] prefix sums of q_lens
    positions: torch.Tensor         # [N] long, on the model's device

    @property
    def num_tokens(self) -> int:
        return self.cu_q[-1]


class SlotKVPool:
    """``num_slots`` sequences of up to ``max_model_len`` tokens each, in one ``KVCache``.

    Memory: 2 * layers * num_slots * Hkv * max_model_len * D * bytes, paid up front.
    """

    def __init__(self, config, num_slots: int, max_model_len: int,
                 dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto"):
        ops.check_backend(backend)
        self.cache = KVCache(config, num_slots, max_model_len, dtype=dtype, device=device)
        self.num_slots, self.max_model_len, self.backend = num_slots, max_model_len, backend
        self.device = self.cache.lengths.device
        self._free = list(range(num_slots))       # lowest slot first: easy timelines to read
        self._slot: dict[int, int] = {}           # seq_id -> slot
        self._tokens: dict[int, int] = {}         # seq_id -> tokens allocated

    # ---- allocation ----------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def slot_of(self, seq_id: int) -> int | None:
        return self._slot.get(seq_id)

    def can_allocate(self, seq, num_tokens: int) -> bool:
        return num_tokens <= self.max_model_len and (seq.seq_id in self._slot or bool(self._free))

    def allocate(self, seq, num_tokens: int) -> int:
        """-> 0: slots cache no prefixes, every token is computed."""
        if not self.can_allocate(seq, num_tokens):
            raise ValueError(f"sequence {seq.seq_id}: cannot hold {num_tokens} tokens "
                             f"({self.num_free_slots} free slots of {self.max_model_len} tokens)")
        if seq.seq_id not in self._slot:
            self._slot[seq.seq_id] = self._free.pop(0)
        self._tokens[seq.seq_id] = max(num_tokens, self._tokens.get(seq.seq_id, 0))
        return 0

    def fork(self, parent, child):
        """The child gets a slot of its own and a copy of the parent's K/V: 2 * layers * Hkv *
        tokens * D elements read and written, the bytes a paged store shares instead."""
        n = parent.num_computed
        self.allocate(child, n)
        src, dst = self._slot[parent.seq_id], self._slot[child.seq_id]
        for cache in self.cache.k + self.cache.v:
            cache[dst, :, :n] = cache[src, :, :n]

    def free(self, seq):
        slot = self._slot.pop(seq.seq_id, None)
        if slot is not None:
            self._tokens.pop(seq.seq_id)
            self._free.append(slot)
            self._free.sort()

    def reserved_tokens(self) -> int:
        return len(self._slot) * self.max_model_len

    def used_tokens(self) -> int:
        return sum(self._tokens.values())

    def mark_computed(self, batch: PackedBatch):
        """Nothing to record: a slot's K/V are never shared or looked up by prefix."""

    # ---- one step --------------------------------------------------------------------------
    def prepare(self, batch: PackedBatch):
        """Per-step index tensors, built once and reused by every layer."""
        dev = self.device
        slots = [self._slot[s] for s in batch.seq_ids]
        q_lens = torch.tensor(batch.q_lens, device=dev)
        # Token t of the step goes to (slot_idx[t], positions[t]) of the cache.
        self._slot_idx = torch.tensor(slots, device=dev).repeat_interleave(q_lens)
        self._pos = batch.positions
        # Decode rows (one query) share one attention call. A 1-token prefill chunk is the
        # same computation, so it joins them.
        dec = [i for i, n in enumerate(batch.q_lens) if n == 1]
        self._dec = None
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
            tok = torch.tensor([batch.cu_q[i] for i in dec], device=dev)
            q_pos = torch.zeros(n_rows, 1, dtype=torch.long, device=dev)
            q_pos[where, 0] = self._pos[tok]
            kv_len = torch.ones(n_rows, dtype=torch.long, device=dev)
            kv_len[where] = torch.tensor([batch.ctx_lens[i] + 1 for i in dec], device=dev)
            S = max(batch.ctx_lens[i] for i in dec) + 1
            self._dec = (tok, rows, where, n_rows, S, q_pos, kv_len)
        # Prefill chunks: one attention call each, over a view of their own slot.
        self._pre = []
        for i, n in enumerate(batch.q_lens):
            if n > 1:
                s, e, kv = batch.cu_q[i], batch.cu_q[i + 1], batch.ctx_lens[i] + n
                self._pre.append((s, e, slots[i], kv, self._pos[s:e][None],
                                  torch.tensor([kv], device=dev)))

    def attend(self, layer: int, q, k, v, batch: PackedBatch):
        """q [N, Hq, D], k/v [N, Hkv, D] -> o [N, Hq, D] (``prepare(batch)`` ran first)."""
        K, V = self.cache.k[layer], self.cache.v[layer]         # [slots, Hkv, L, D]
        # [slots, Hkv, L, D] viewed as [slots, L, Hkv, D]: (slot, position) index one token.
        K.transpose(1, 2)[self._slot_idx, self._pos] = k
        V.transpose(1, 2)[self._slot_idx, self._pos] = v
        o = torch.empty_like(q)
        if self._dec is not None:
            tok, rows, where, n_rows, S, q_pos, kv_len = self._dec
            qd = q.new_zeros(n_rows, q.shape[1], 1, q.shape[2])   # [rows, Hq, 1, D]
            qd[where, :, 0] = q[tok]
            od = ops.attention(qd, K[rows, :, :S], V[rows, :, :S], q_pos, kv_len,
                               backend=self.backend)
            o[tok] = od[where, :, 0]
        for s, e, slot, kv, q_pos, kv_len in self._pre:
            qp = q[s:e].transpose(0, 1)[None]                     # [1, Hq, T, D]
            op = ops.attention(qp, K[slot:slot + 1, :, :kv], V[slot:slot + 1, :, :kv],
                               q_pos, kv_len, backend=self.backend)
            o[s:e] = op[0].transpose(0, 1)
        return o
