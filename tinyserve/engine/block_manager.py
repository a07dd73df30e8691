"""PagedAttention's block manager: KV memory as virtual memory, pure host-side bookkeeping.

The KV cache of every layer is one pool of ``num_blocks`` physical blocks of ``block_size``
token slots (the tensors live with the model runner: ``[num_blocks, block_size, Hkv, D]``).
A sequence owns a *block table*, the list of physical blocks holding its tokens 0, 1, 2, ...:
token ``t`` lives in slot ``table[t // block_size] * block_size + t % block_size``. As with
pages of virtual memory, a sequence's blocks need not be adjacent, and only the last block is
partly empty, so at most ``block_size - 1`` slots per sequence are wasted (a contiguous cache
reserves the whole maximum length up front).

Sharing. A block can appear in several tables; ``ref[block]`` counts the table entries.
* ``fork(parent, child)``: parallel sampling (n > 1) or beam search -- the child shares every
  block of the parent. A full shared block is only read. When a sequence appends into a shared
  partly-filled last block, ``append_slots`` copies it first (copy-on-write) and returns the
  ``(src, dst)`` pair: the runner copies those slots' K/V before writing the new token.
* Prefix caching. A block full of tokens whose K/V are written (``mark_computed``) is
  registered under a hash of ``(parent block's hash, its block_size token ids)``, so a hash
  names the whole prefix up to the block's end. ``allocate`` looks the prompt's full blocks
  up, reuses the longest cached run and says how many prompt tokens need no prefill. A block
  freed by every sequence stays cached (reusable) until its slots are needed: then the least
  recently released cached block is evicted (LRU). Python's 64-bit tuple hash is used: a
  collision (probability ~ n^2/2^64 for n cached blocks) would reuse a wrong block; vLLM
  offers sha256 for that reason.

How a model runner drives it, per step and scheduled sequence:
    cached = allocate(seq, prompt_ids)           # new: prefill only prompt_ids[cached:]
    pairs = append_slots(seq, 1, [token])        # decode: copy each (src, dst) block first
    slot_mapping(seq, start, end), block_table(seq)   # where to write K/V, what to read
    mark_computed(seq, n)                        # after the forward: n tokens are written
    free(seq)                                    # finished, aborted or preempted
A chunked prefill calls ``allocate`` once (it reserves the whole prompt) and
``mark_computed`` after each chunk.

Every block is in exactly one state: free (in the free list), referenced (ref > 0), or cached
and unreferenced (ref 0, evictable). ``check_invariants`` verifies that, and the tests call it
after every operation of random workloads.

When blocks run out, ``allocate``/``append_slots`` raise ``OutOfBlocksError`` and change
nothing, so the scheduler can preempt a sequence (``free`` it, recompute it later) and retry.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from ..errors import TinyserveError, positive_int


class OutOfBlocksError(TinyserveError, RuntimeError):
    """Not enough free or evictable blocks; nothing was changed (preempt someone and retry)."""


ROOT_HASH = 0   # the "parent" of a sequence's first block


class _Seq:
    __slots__ = ("table", "tokens", "num_computed", "hashes")

    def __init__(self):
        self.table: list[int] = []       # logical block i -> physical block
        self.tokens: list[int] = []      # token ids whose slots are allocated
        self.num_computed = 0            # tokens whose K/V the runner has written
        self.hashes: list[int] = []      # prefix hashes of the blocks full of computed tokens


def _chain_hash(parent: int, block_tokens) -> int:
    return hash((parent, tuple(block_tokens)))


def _token_list(token_ids) -> list[int]:
    try:
        return [int(t) for t in token_ids]
    except (TypeError, ValueError) as e:
        raise TypeError(f"BlockManager: token_ids must be a sequence of ints ({e})") from None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        self.num_blocks = positive_int("BlockManager: num_blocks", num_blocks)
        self.block_size = positive_int("BlockManager: block_size", block_size)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._free = deque(range(num_blocks))        # never cached, or evicted
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, int] = {}           # cached block -> its prefix hash
        self._cached: dict[int, int] = {}            # prefix hash -> cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()   # ref-0 cached, LRU first
        self._seqs: dict = {}

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: the free list plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Room for a new sequence of ``num_tokens`` tokens, not counting prefix-cache hits
        (conservative: a hit only lowers what ``allocate`` takes)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"BlockManager.can_allocate: num_tokens must be an int >= 0, "
                             f"got {num_tokens!r}")
        return self._blocks_for(num_tokens) <= self.num_free_blocks

    def can_append_slots(self, seq_id, num_new_tokens: int = 1) -> bool:
        return self._append_cost(self._get(seq_id), num_new_tokens) <= self.num_free_blocks

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def num_tokens(self, seq_id) -> int:
        return len(self._get(seq_id).tokens)

    def block_table(self, seq_id) -> list[int]:
        return list(self._get(seq_id).table)

    def slot_mapping(self, seq_id, start: int, end: int) -> list[int]:
        """Physical slot (block * block_size + offset) of token positions start..end-1."""
        s = self._get(seq_id)
        if not 0 <= start <= end <= len(s.tokens):
            raise ValueError(f"BlockManager.slot_mapping: need 0 <= start <= end <= "
                             f"{len(s.tokens)} (tokens of {seq_id!r}), got {start}..{end}")
        bs = self.block_size
        return [s.table[t // bs] * bs + t % bs for t in range(start, end)]

    def ref_count(self, block: int) -> int:
        """How many block-table entries point at physical ``block`` (> 1: shared)."""
        if not 0 <= block < len(self._ref):
            raise ValueError(f"BlockManager.ref_count: block {block} is not in "
                             f"[0, {len(self._ref)})")
        return self._ref[block]

    def reserved_tokens(self) -> int:
        """Slots of the blocks sequences hold (each shared block counted once)."""
        return sum(1 for r in self._ref if r > 0) * self.block_size

    def used_tokens(self) -> int:
        """Slots of held blocks that hold a token (each shared block counted once); waste is
        (reserved - used) / reserved: only the partly filled last blocks."""
        filled = {}
        bs = self.block_size
        for s in self._seqs.values():
            for i, b in enumerate(s.table):
                filled[b] = min(bs, len(s.tokens) - i * bs)
        return sum(filled.values())

    # ---- allocation ----------------------------------------------------------------------
    def _get(self, seq_id) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise ValueError(f"BlockManager: unknown sequence {seq_id!r}") from None

    def _take(self, n: int) -> list[int]:
        """n blocks from the free list, then by evicting the LRU unreferenced cached blocks."""
        if n > self.num_free_blocks:
            raise OutOfBlocksError(f"BlockManager: need {n} blocks, {self.num_free_blocks} "
                                   f"free or evictable of {self.num_blocks}")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash_of.pop(b)]
            self._ref[b] = 1
            out.append(b)
        return out

    def allocate(self, seq_id, token_ids) -> int:
        """Blocks for a new sequence's prompt; returns how many prompt tokens are already in
        the cache (a multiple of block_size: the runner prefills only the rest).

        At most (len - 1) // block_size blocks are reused, so at least the last prompt token
        is computed (its logits are needed) and no token is ever written into a cached block.
        """
        if seq_id in self._seqs:
            raise ValueError(f"BlockManager.allocate: sequence {seq_id!r} is already allocated")
        tokens = _token_list(token_ids)
        if not tokens:
            raise ValueError("BlockManager.allocate: the prompt is empty")
        bs = self.block_size
        hits, hashes, h = [], [], ROOT_HASH
        if self.enable_prefix_caching:
            for i in range((len(tokens) - 1) // bs):
                h = _chain_hash(h, tokens[i * bs:(i + 1) * bs])
                if h not in self._cached:
                    break
                hits.append(self._cached[h])
                hashes.append(h)
        need = self._blocks_for(len(tokens)) - len(hits)
        idle_hits = sum(1 for b in hits if self._ref[b] == 0)
        if need > self.num_free_blocks - idle_hits:     # reusing an idle hit un-frees it
            raise OutOfBlocksError(f"BlockManager.allocate: {seq_id!r} needs {need} new "
                                   f"blocks, {self.num_free_blocks - idle_hits} available")
        for b in hits:
            self._evictable.pop(b, None)
            self._ref[b] += 1
        s = _Seq()
        s.table = hits + self._take(need)
        s.tokens, s.hashes = tokens, hashes
        s.num_computed = len(hits) * bs
        self._seqs[seq_id] = s
        return s.num_computed

    def _needs_cow(self, s: _Seq, n: int) -> bool:
        """Writing n > 0 tokens into a partly filled last block that another table shares."""
        return n > 0 and len(s.tokens) % self.block_size > 0 and self._ref[s.table[-1]] > 1

    def _append_cost(self, s: _Seq, n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"BlockManager: num_new_tokens must be an int >= 0, got {n!r}")
        return self._blocks_for(len(s.tokens) + n) - len(s.table) + self._needs_cow(s, n)

    def append_slots(self, seq_id, num_new_tokens: int, token_ids) -> list[tuple[int, int]]:
        """Slots for ``num_new_tokens`` more tokens (their ids: ``token_ids``). Returns the
        copy-on-write pairs (src block, dst block): the last block was partly filled and shared,
        so this sequence gets a private copy (copy src's slots to dst before writing)."""
        s = self._get(seq_id)
        cost = self._append_cost(s, num_new_tokens)      # also checks num_new_tokens
        tokens = _token_list(token_ids)
        if len(tokens) != num_new_tokens:
            raise ValueError(f"BlockManager.append_slots: {num_new_tokens} new tokens but "
                             f"{len(tokens)} token ids")
        if cost > self.num_free_blocks:
            raise OutOfBlocksError(f"BlockManager.append_slots: {seq_id!r} needs {cost} "
                                   f"blocks, {self.num_free_blocks} available")
        pairs = []
        if self._needs_cow(s, num_new_tokens):
            src, (dst,) = s.table[-1], self._take(1)
            self._ref[src] -= 1                  # still > 0: another sequence holds it
            s.table[-1] = dst
            pairs.append((src, dst))
        s.table += self._take(self._blocks_for(len(s.tokens) + num_new_tokens) - len(s.table))
        s.tokens += tokens
        return pairs

    def mark_computed(self, seq_id, num_tokens: int) -> None:
        """The runner has written the K/V of the sequence's first ``num_tokens`` tokens. Blocks
        now full of written tokens enter the prefix cache (not before: another request must
        never reuse a block whose K/V a chunked prefill has not produced yet)."""
        s = self._get(seq_id)
        if not s.num_computed <= num_tokens <= len(s.tokens):
            raise ValueError(f"BlockManager.mark_computed: need {s.num_computed} <= num_tokens "
                             f"<= {len(s.tokens)} for {seq_id!r}, got {num_tokens}")
        bs = self.block_size
        s.num_computed = num_tokens
        if not self.enable_prefix_caching:
            return
        for i in range(len(s.hashes), num_tokens // bs):        # blocks that just filled up
            parent = s.hashes[-1] if s.hashes else ROOT_HASH
            h = _chain_hash(parent, s.tokens[i * bs:(i + 1) * bs])
            s.hashes.append(h)
            b = s.table[i]
            # Already cached (this very block: shared by a fork or a prefix hit), or the same
            # prefix is cached in another block (two identical prompts prefilled at once):
            # keep the existing entry, this block stays private and is freed normally.
            if b not in self._hash_of and h not in self._cached:
                self._hash_of[b] = h
                self._cached[h] = b

    def fork(self, parent_id, child_id) -> None:
        """The child shares every block of the parent (refs += 1); writes then copy-on-write."""
        p = self._get(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"BlockManager.fork: sequence {child_id!r} already exists")
        c = _Seq()
        c.table, c.tokens, c.num_computed = list(p.table), list(p.tokens), p.num_computed
        c.hashes = list(p.hashes)
        for b in c.table:
            self._ref[b] += 1
        self._seqs[child_id] = c

    def free(self, seq_id) -> None:
        """Release a finished, aborted or preempted sequence. Its blocks go back in reverse
        order: a prefix's tail is then evicted before its head (a chain without its head can
        never be hit again, while a head alone still serves shorter shared prefixes)."""
        s = self._seqs.pop(seq_id, None)
        if s is None:
            raise ValueError(f"BlockManager.free: unknown sequence {seq_id!r}")
        for b in reversed(s.table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None    # most recently released: evicted last
                else:
                    self._free.append(b)

    # ---- tests -------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (used by the tests)."""
        bs = self.block_size
        counts = [0] * self.num_blocks
        for sid, s in self._seqs.items():
            assert len(s.table) == self._blocks_for(len(s.tokens)), f"{sid}: table size"
            assert 0 <= s.num_computed <= len(s.tokens), f"{sid}: num_computed"
            h = ROOT_HASH
            for i, b in enumerate(s.table):
                counts[b] += 1
                if (i + 1) * bs <= len(s.tokens):
                    h = _chain_hash(h, s.tokens[i * bs:(i + 1) * bs])
                    if i < len(s.hashes):
                        assert s.hashes[i] == h, f"{sid}: stale prefix hash of block {i}"
                    if b in self._hash_of:   # a cached block holds exactly this prefix
                        assert self._hash_of[b] == h, f"{sid}: block {b} cached under another hash"
                else:
                    assert b not in self._hash_of, f"{sid}: partly filled block {b} is cached"
        assert counts == self._ref, "reference counts differ from the table entries"
        free = set(self._free)
        assert len(free) == len(self._free), "a block is twice in the free list"
        for b in range(self.num_blocks):
            states = [b in free, self._ref[b] > 0, b in self._evictable]
            assert sum(states) == 1, f"block {b}: free/referenced/evictable = {states}"
            if b in self._evictable or b in free:
                assert (b in self._hash_of) == (b in self._evictable), f"block {b}: cache state"
        assert {self._cached[h]: h for h in self._cached} == self._hash_of, "cache maps differ"
