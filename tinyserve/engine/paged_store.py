"""The paged KV store: PagedAttention's memory for the engine (same protocol as ``SlotKVPool``).

K/V live in one pool of fixed-size blocks per layer, ``[num_blocks, block_size, Hkv, D]``
(``tinyserve.ops.paged_attention``'s layout); a ``BlockManager`` hands the blocks out. A
sequence takes blocks as it grows, one every ``block_size`` tokens, so it never holds more
than ``block_size - 1`` empty slots, where a slot of ``SlotKVPool`` reserves ``max_model_len``
tokens from the start. The same memory therefore holds several times more sequences.

Per step (``prepare``, once): the batch's block tables [B, max_blocks] (-1 past a row's
blocks), the slot of every new token [N], the keys each row attends to ``kv_lens`` [B] and the
packed query offsets ``cu_q`` [B + 1], built on the host and copied to the device once, then
reused by every layer. Per layer (``attend``): ``paged_write`` scatters the step's k/v into
their slots, then one ``paged_attention`` call serves the whole batch, decodes and prefill
chunks together (the decode kernel when every row has one query, else the packed prefill
kernel, where a decode is a row of one query). Kernels: the references on CPU, Triton on CUDA
(``backend``, the model's).

Sharing, from the block manager: ``fork`` gives a child the parent's blocks (parallel sampling
prefills the prompt once); when a sequence then writes into a shared, partly filled last block,
``allocate`` receives a copy-on-write pair (src, dst) and ``prepare`` copies block src to dst in
every layer (2 * layers * block_size * Hkv * D elements) before any K/V of the step is written.
With prefix caching, a new sequence's first ``allocate`` returns how many of its tokens are
already cached (whole blocks of an earlier identical prefix): the engine starts its prefill
there. ``mark_computed`` after each forward makes the blocks just filled available to others.
"""
from __future__ import annotations

import torch

from .. import ops
from .block_manager import BlockManager
from .kv_pool import PackedBatch


def blocks_for_budget(config, block_size: int, dtype: torch.dtype, tokens: int | None = None,
                      nbytes: int | None = None) -> int:
    """How many blocks a KV budget of ``tokens`` token slots, or of ``nbytes`` bytes (K and V
    of every layer: ``config.kv_bytes_per_token``), holds; at least one."""
    if (tokens is None) == (nbytes is None):
        raise ValueError("give the KV budget as tokens or as bytes (exactly one of them)")
    for name, v in (("tokens", tokens), ("bytes", nbytes)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"the KV budget in {name} must be a positive int, got {v!r}")
    if nbytes is not None:
        tokens = nbytes // config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())
    blocks = tokens // block_size
    if blocks < 1:
        raise ValueError(f"a KV budget of {tokens} tokens does not hold one block of "
                         f"{block_size} tokens")
    return blocks


class PagedKVStore:
    """``num_blocks`` blocks of ``block_size`` tokens per layer; memory: 2 * layers *
    num_blocks * block_size * Hkv * D * bytes, whoever uses it."""

    def __init__(self, config, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto",
                 enable_prefix_caching: bool = True):
        ops.check_backend(backend)
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.block_size, self.backend = block_size, backend
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.device = self.k[0].device
        self._cow: dict[int, list[tuple[int, int]]] = {}   # seq_id -> copies due before writes

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def num_blocks(self) -> int:
        return self.bm.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.bm.num_free_blocks

    # ---- allocation ----------------------------------------------------------------------
    def can_allocate(self, seq, num_tokens: int) -> bool:
        """A new sequence reserves all its known tokens at once (prompt + output so far, so a
        chunked prefill never runs out half way and the prefix cache sees the whole prompt);
        a running one grows to ``num_tokens``."""
        sid = seq.seq_id
        if sid in self.bm:
            return self.bm.can_append_slots(sid, max(0, num_tokens - self.bm.num_tokens(sid)))
        return self.bm.can_allocate(max(num_tokens, seq.num_tokens))

    def allocate(self, seq, num_tokens: int) -> int:
        """Blocks for ``seq``'s first ``num_tokens`` tokens (on the first call: all its known
        tokens). -> tokens whose K/V are already cached: a prefix-cache hit on the first call
        (a multiple of block_size, the prefill starts there), else 0. Raises
        ``OutOfBlocksError`` (nothing changed) when the blocks run out."""
        sid = seq.seq_id
        if sid not in self.bm:
            return self.bm.allocate(sid, seq.token_ids(0, max(num_tokens, seq.num_tokens)))
        have = self.bm.num_tokens(sid)
        if num_tokens > have:
            pairs = self.bm.append_slots(sid, num_tokens - have, seq.token_ids(have, num_tokens))
            if pairs:
                self._cow.setdefault(sid, []).extend(pairs)
        return 0

    def fork(self, parent, child):
        """``child`` shares all of ``parent``'s blocks (ref counts + 1, nothing copied)."""
        self.bm.fork(parent.seq_id, child.seq_id)

    def free(self, seq):
        """Give the blocks back (a sequence never allocated, e.g. aborted while waiting, is
        fine). Cached full blocks stay reusable by the prefix cache until evicted."""
        if seq.seq_id in self.bm:
            self.bm.free(seq.seq_id)
        self._cow.pop(seq.seq_id, None)   # its private copy is gone with it

    def mark_computed(self, batch: PackedBatch):
        """After the forward: the batch's tokens are written, their full blocks are cacheable."""
        for sid, ctx, n in zip(batch.seq_ids, batch.ctx_lens, batch.q_lens):
            self.bm.mark_computed(sid, ctx + n)

    def reserved_tokens(self) -> int:
        return self.bm.reserved_tokens()

    def used_tokens(self) -> int:
        return self.bm.used_tokens()

    def block_table(self, seq_id) -> list[int]:
        return self.bm.block_table(seq_id)

    # ---- one step --------------------------------------------------------------------------
    def prepare(self, batch: PackedBatch):
        """Copy-on-write copies, then the index tensors every layer's ``attend`` reuses."""
        pairs = [p for sid in batch.seq_ids for p in self._cow.pop(sid, ())]
        if pairs:
            src, dst = (torch.tensor(x, device=self.device) for x in zip(*pairs))
            for cache in self.k + self.v:             # reads and writes 2 * len(pairs) blocks
                cache[dst] = cache[src]
        bm, dev = self.bm, self.device
        tables = [bm.block_table(s) for s in batch.seq_ids]
        width = max(len(t) for t in tables)
        self._tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables],
                                    dtype=torch.int32, device=dev)
        self._slots = torch.tensor(
            [x for sid, ctx, n in zip(batch.seq_ids, batch.ctx_lens, batch.q_lens)
             for x in bm.slot_mapping(sid, ctx, ctx + n)], dtype=torch.int64, device=dev)
        self._kv_lens = torch.tensor([c + n for c, n in zip(batch.ctx_lens, batch.q_lens)],
                                     dtype=torch.int32, device=dev)
        # All decodes: one query per row, the split-KV decode kernel; else packed queries.
        self._cu_q = (None if all(n == 1 for n in batch.q_lens)
                      else torch.tensor(batch.cu_q, dtype=torch.int32, device=dev))
        self._max_q = max(batch.q_lens)

    def attend(self, layer: int, q, k, v, batch: PackedBatch):
        """q [N, Hq, D], k/v [N, Hkv, D] -> o [N, Hq, D] (``prepare(batch)`` ran first)."""
        kc, vc = self.k[layer], self.v[layer]
        ops.paged_write(kc, vc, k, v, self._slots, backend=self.backend)
        return ops.paged_attention(q, kc, vc, self._tables, self._kv_lens, self._cu_q,
                                   backend=self.backend, max_q_len=self._max_q)
