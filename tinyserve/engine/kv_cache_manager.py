"""Who holds which KV memory: the scheduler's bookkeeping, no tensors (after vLLM's
KVCacheManager). The model runner owns the cache tensors and reads the answers from the
``SchedulerOutput``: each scheduled sequence's block table, and the copies due first.

Two managers, one protocol, interchangeable under the scheduler:

    can_allocate(seq, num_tokens) -> bool   could ``seq`` hold ``num_tokens`` tokens in all?
                                            (False for a running one: the scheduler preempts)
    allocate(seq, num_tokens) -> int        make sure it can (first call: take memory for it);
                                            -> leading tokens of ``seq`` already cached (a
                                            prefix-cache hit on the first call, else 0): the
                                            scheduler skips their prefill
    fork(parent, child)                     parallel sampling: ``child`` starts with the K/V
                                            the parent has (shared by blocks, or copied)
    free(seq)                               give its memory back, at once
    mark_computed(seq)                      after a step: its first num_computed tokens' K/V
                                            are written (full blocks become cacheable)
    block_table(seq) -> list[int]           where its tokens live (blocks; a slot: [slot])
    take_copies(seqs) -> list               copies the runner makes before the step's writes
    reserved_tokens(), used_tokens()        token capacity held vs tokens really stored, so
                                            waste = (reserved - used) / reserved

``KVCacheManager`` is PagedAttention's (``block_manager.BlockManager`` underneath): a sequence
takes a block every ``block_size`` tokens as it grows, so it never holds more than
``block_size - 1`` empty slots; full blocks are shared by prefix (prefix caching) and by the
n samples of a request (copy-on-write of a shared, partly filled last block).
``SlotKVCacheManager`` is the contiguous baseline: one ``max_model_len`` slot per sequence,
reserved in full at admission, which is what serving systems before PagedAttention did: a
sequence that stops after 20 tokens still holds ``max_model_len``.
"""
from __future__ import annotations

import torch

from .block_manager import BlockManager


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


class KVCacheManager:
    """``num_blocks`` blocks of ``block_size`` tokens (per layer, in the runner's tensors)."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self._cow: dict[int, list[tuple[int, int]]] = {}   # seq_id -> copies due before writes

    @property
    def num_blocks(self) -> int:
        return self.bm.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.bm.num_free_blocks

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

    def mark_computed(self, seq):
        self.bm.mark_computed(seq.seq_id, seq.num_computed)

    def block_table(self, seq) -> list[int]:
        return self.bm.block_table(seq.seq_id)

    def take_copies(self, seqs) -> list[tuple[int, int]]:
        """Copy-on-write (src, dst) block pairs due before these sequences write."""
        return [p for s in seqs for p in self._cow.pop(s.seq_id, ())]

    def reserved_tokens(self) -> int:
        return self.bm.reserved_tokens()

    def used_tokens(self) -> int:
        return self.bm.used_tokens()


class SlotKVCacheManager:
    """``num_slots`` sequences of up to ``max_model_len`` tokens each."""

    def __init__(self, num_slots: int, max_model_len: int):
        self.num_slots, self.max_model_len = num_slots, max_model_len
        self._free = list(range(num_slots))       # lowest slot first: easy timelines to read
        self._slot: dict[int, int] = {}           # seq_id -> slot
        self._tokens: dict[int, int] = {}         # seq_id -> tokens allocated
        self._copies: dict[int, list[tuple[int, int, int]]] = {}   # seq_id -> fork copies due

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
        """The child gets a slot of its own; the runner copies the parent's K/V into it (2 *
        layers * Hkv * tokens * D elements, the bytes a paged cache shares instead)."""
        n = parent.num_computed
        self.allocate(child, n)
        self._copies[child.seq_id] = [(self._slot[parent.seq_id], self._slot[child.seq_id], n)]

    def free(self, seq):
        slot = self._slot.pop(seq.seq_id, None)
        if slot is not None:
            self._tokens.pop(seq.seq_id)
            self._free.append(slot)
            self._free.sort()
        self._copies.pop(seq.seq_id, None)

    def mark_computed(self, seq):
        """Nothing to record: a slot's K/V are never shared or looked up by prefix."""

    def block_table(self, seq) -> list[int]:
        return [self._slot[seq.seq_id]]

    def take_copies(self, seqs) -> list[tuple[int, int, int]]:
        """(src slot, dst slot, tokens) copies due before these sequences run (forks)."""
        return [c for s in seqs for c in self._copies.pop(s.seq_id, ())]

    def reserved_tokens(self) -> int:
        return len(self._slot) * self.max_model_len

    def used_tokens(self) -> int:
        return sum(self._tokens.values())
