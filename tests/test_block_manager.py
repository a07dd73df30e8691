"""BlockManager: bookkeeping checked against a simulated KV memory, by property and by example.

The simulation writes (token id, position) into the slots the manager hands out, as the model
runner writes K/V, and reads every live sequence back after each operation: a block reused
while still referenced, a wrong prefix-cache hit or a missing copy-on-write shows up as a
sequence whose cache no longer holds its own tokens.
"""
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tinyserve.engine import block_manager
from tinyserve.engine.block_manager import BlockManager, OutOfBlocksError


class Sim:
    """A BlockManager plus the physical memory it manages (slot -> (token, position))."""

    def __init__(self, bm):
        self.bm = bm
        self.mem = {}
        self.tokens = {}      # seq -> its token ids
        self.computed = {}    # seq -> tokens written
        self.next_id = 0

    def write(self, seq, start, end):
        for pos, slot in zip(range(start, end), self.bm.slot_mapping(seq, start, end)):
            self.mem[slot] = (self.tokens[seq][pos], pos)
        self.computed[seq] = end
        self.bm.mark_computed(seq, end)

    def new(self, prompt):
        seq, self.next_id = self.next_id, self.next_id + 1
        before = self.bm.num_free_blocks
        try:
            cached = self.bm.allocate(seq, prompt)
        except OutOfBlocksError:
            assert not self.bm.can_allocate(len(prompt))
            assert seq not in self.bm and self.bm.num_free_blocks == before   # no change
            return None
        assert cached % self.bm.block_size == 0 and 0 <= cached < len(prompt)
        self.tokens[seq], self.computed[seq] = list(prompt), cached
        return seq, cached

    def prefill(self, seq, n):
        c = self.computed[seq]
        self.write(seq, c, min(len(self.tokens[seq]), c + n))

    def append(self, seq, new):
        table = self.bm.block_table(seq)
        ok = self.bm.can_append_slots(seq, len(new))
        try:
            pairs = self.bm.append_slots(seq, len(new), new)
        except OutOfBlocksError:
            assert not ok and self.bm.block_table(seq) == table
            return None
        assert ok
        bs = self.bm.block_size
        for src, dst in pairs:   # the runner copies the shared block before writing into it
            for o in range(bs):
                if src * bs + o in self.mem:
                    self.mem[dst * bs + o] = self.mem[src * bs + o]
        self.tokens[seq] += list(new)
        self.write(seq, self.computed[seq], len(self.tokens[seq]))
        return pairs

    def fork(self, parent):
        child, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.computed[child] = self.computed[parent]
        return child

    def free(self, seq):
        self.bm.free(seq)
        del self.tokens[seq], self.computed[seq]

    def check(self):
        bm = self.bm
        bm.check_invariants()
        bs = bm.block_size
        fill = {}
        for seq, toks in self.tokens.items():
            c = self.computed[seq]
            got = [self.mem.get(s) for s in bm.slot_mapping(seq, 0, c)]
            assert got == [(t, p) for p, t in enumerate(toks[:c])], f"seq {seq} lost its K/V"
            for i, b in enumerate(bm.block_table(seq)):
                fill[b] = min(bs, len(toks) - i * bs)
        assert bm.reserved_tokens() == len(fill) * bs
        assert bm.used_tokens() == sum(fill.values())


def run_workload(sim, draw, steps):
    """Random allocate / prefill chunk / append / fork / free / abort; draw(lo, hi) -> int.
    Prompts start with one of two shared prefixes over a 3-token vocabulary, so prefix hits,
    forks of partly filled blocks, eviction and running out of blocks all happen often."""
    prefixes = [[draw(0, 2) for _ in range(draw(0, 12))] for _ in range(2)]
    for _ in range(steps):
        live = sorted(sim.tokens)
        done = [s for s in live if sim.computed[s] == len(sim.tokens[s])]
        op = draw(0, 5)
        if op == 0 or not live:
            prompt = prefixes[draw(0, 1)] + [draw(0, 2) for _ in range(draw(0, 9))]
            if prompt:
                sim.new(prompt)
        elif op == 1:
            sim.prefill(live[draw(0, len(live) - 1)], draw(1, 10))
        elif op == 2 and done:
            sim.append(done[draw(0, len(done) - 1)], [draw(0, 2) for _ in range(draw(0, 5))])
        elif op == 3:
            sim.fork(live[draw(0, len(live) - 1)])
        elif op >= 4:   # finish, or abort mid-prefill
            sim.free(live[draw(0, len(live) - 1)])
        sim.check()
    for seq in sorted(sim.tokens):
        sim.free(seq)
        sim.check()
    bm = sim.bm
    assert bm.num_free_blocks == bm.num_blocks and bm.reserved_tokens() == bm.used_tokens() == 0


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), block_size=st.sampled_from([1, 2, 4]),
       num_blocks=st.integers(4, 24), caching=st.booleans())
def test_random_workloads_keep_every_sequence_intact_and_leak_nothing(
        data, block_size, num_blocks, caching):
    sim = Sim(BlockManager(num_blocks, block_size, enable_prefix_caching=caching))
    run_workload(sim, lambda lo, hi: data.draw(st.integers(lo, hi)), steps=40)


def _seeded_workloads(seeds=range(30)):
    for seed in seeds:
        rng = random.Random(seed)
        run_workload(Sim(BlockManager(12, 2)), rng.randint, steps=60)


def test_seeded_workloads_pass_and_catch_broken_managers(monkeypatch):
    _seeded_workloads()
    # The same workloads reject a manager that skips copy-on-write, one whose block hash
    # ignores the parent (a block would match the same tokens at another position), and one
    # that frees a shared block on its first release.
    with monkeypatch.context() as m:
        m.setattr(BlockManager, "_needs_cow", lambda self, s, n: False)
        with pytest.raises(AssertionError):
            _seeded_workloads()
    with monkeypatch.context() as m:
        m.setattr(block_manager, "_chain_hash", lambda parent, toks: hash(tuple(toks)))
        with pytest.raises(AssertionError):
            _seeded_workloads()
    real_free = BlockManager.free

    def free_ignoring_refs(self, seq_id):
        for b in self._seqs[seq_id].table:
            self._ref[b] = 1
        real_free(self, seq_id)
    with monkeypatch.context() as m:
        m.setattr(BlockManager, "free", free_ignoring_refs)
        with pytest.raises(AssertionError):
            _seeded_workloads()


def _prompt(n, start=0):
    return list(range(start, start + n))


def test_prefix_cache_hit_shares_blocks_and_counts_cached_tokens():
    bm = BlockManager(10, block_size=4)
    assert bm.allocate("a", _prompt(10)) == 0          # blocks: 4 + 4 + 2 tokens
    bm.mark_computed("a", 10)
    table_a = bm.block_table("a")
    # Same first 8 tokens (two full blocks), then different: 8 tokens need no prefill.
    assert bm.allocate("b", _prompt(8) + [99, 98, 97]) == 8
    assert bm.block_table("b")[:2] == table_a[:2] and bm.block_table("b")[2] != table_a[2]
    assert bm.reserved_tokens() == 4 * 4             # 3 blocks of a + 1 private block of b
    # Diverging inside the first block: nothing reusable.
    assert bm.allocate("c", [0, 1, 2, 7, 4, 5, 6, 7, 8]) == 0
    bm.check_invariants()
    # Freed but still cached: a later request hits the same physical blocks.
    bm.free("a"), bm.free("b")
    free_before = bm.num_free_blocks
    assert bm.allocate("d", _prompt(9)) == 8 and bm.block_table("d")[:2] == table_a[:2]
    assert bm.num_free_blocks == free_before - 3      # 2 cached blocks revived + 1 new
    bm.check_invariants()


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(8, block_size=4)
    bm.allocate("a", _prompt(8))
    bm.mark_computed("a", 8)
    # All 8 tokens are cached, but the runner needs the last token's logits: the last block
    # is recomputed into a fresh block rather than written into the shared cached one.
    assert bm.allocate("b", _prompt(8)) == 4
    assert bm.block_table("b")[0] == bm.block_table("a")[0]
    assert bm.block_table("b")[1] != bm.block_table("a")[1]
    bm.mark_computed("b", 8)   # same prefix already cached elsewhere: b's copy stays private
    bm.free("a"), bm.free("b")
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 8
    bm.check_invariants()


def test_blocks_enter_the_cache_only_once_computed():
    bm = BlockManager(8, block_size=4)
    bm.allocate("a", _prompt(12))
    assert bm.allocate("b", _prompt(12)) == 0        # nothing of a's prompt is written yet
    bm.mark_computed("a", 6)                           # a chunked prefill: 1 full block so far
    assert bm.allocate("c", _prompt(12)) == 4 and bm.num_cached_blocks == 1
    bm.check_invariants()


def test_eviction_takes_cached_blocks_tail_first_and_least_recently_released_first():
    bm = BlockManager(4, block_size=2)
    bm.allocate("x", _prompt(5))                      # blocks x0 x1 (full) + x2 (partial)
    bm.mark_computed("x", 5)
    x0 = bm.block_table("x")[0]
    bm.free("x")                                      # x2 -> free list; x1, x0 stay cached
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    bm.allocate("y", [100, 101, 102])                 # 2 blocks: the free list is now empty
    bm.allocate("z", [200])                           # evicts one cached block: x's tail
    assert bm.num_cached_blocks == 1
    bm.free("y"), bm.free("z")                        # never computed: not cached
    # x's head block survived (2 tokens cached), its tail did not (else 4 would be).
    assert bm.allocate("x again", _prompt(5)) == 2 and bm.block_table("x again")[0] == x0
    bm.check_invariants()

    bm = BlockManager(4, block_size=2)
    for seq, start in (("a", 0), ("b", 10)):          # a released before b
        bm.allocate(seq, _prompt(3, start))
        bm.mark_computed(seq, 3)
        bm.free(seq)
    bm.allocate("c", _prompt(6, 50))                  # 3 blocks: 2 free + the LRU cached one
    bm.free("c")
    assert bm.allocate("a2", _prompt(3)) == 0         # a's block was evicted ...
    assert bm.allocate("b2", _prompt(3, 10)) == 2     # ... b's is still cached
    bm.check_invariants()


def test_copy_on_write_after_fork():
    bm = BlockManager(8, block_size=4)
    bm.allocate("p", _prompt(6))                      # blocks: 4 + 2 tokens
    bm.mark_computed("p", 6)
    bm.fork("p", "c")                                 # n = 2: the child shares both blocks
    full, last = bm.block_table("p")
    assert bm.block_table("c") == [full, last] and bm.reserved_tokens() == 8
    pairs = bm.append_slots("c", 1, [42])             # c writes into the shared partial block
    (src, dst), = pairs
    assert src == last and bm.block_table("c") == [full, dst] and dst not in (full, last)
    assert bm.append_slots("p", 1, [43]) == []        # p now owns `last` alone: in place
    assert bm.block_table("p") == [full, last]
    assert bm.slot_mapping("c", 4, 7) == [dst * 4, dst * 4 + 1, dst * 4 + 2]
    # Forked at a block boundary, the next token opens a new block: nothing to copy.
    bm.append_slots("p", 1, [44])                     # p: 8 tokens, two full blocks
    bm.fork("p", "d")
    assert bm.append_slots("d", 1, [1]) == [] and bm.block_table("d")[:2] == [full, last]
    bm.check_invariants()


def test_out_of_blocks_raises_and_changes_nothing():
    bm = BlockManager(3, block_size=4)
    bm.allocate("a", _prompt(8))                      # 2 blocks
    assert not bm.can_allocate(5) and bm.can_allocate(4)
    with pytest.raises(OutOfBlocksError):
        bm.allocate("b", _prompt(5))
    assert "b" not in bm and bm.num_free_blocks == 1
    bm.append_slots("a", 4, [1, 2, 3, 4])             # fills the third block
    assert not bm.can_append_slots("a", 1)
    with pytest.raises(OutOfBlocksError):
        bm.append_slots("a", 1, [5])
    assert bm.num_tokens("a") == 12 and len(bm.block_table("a")) == 3
    bm.free("a")                                      # preempt: everything comes back
    assert bm.num_free_blocks == 3
    bm.check_invariants()


def test_prefix_caching_off_never_shares():
    bm = BlockManager(8, block_size=2, enable_prefix_caching=False)
    bm.allocate("a", _prompt(6))
    bm.mark_computed("a", 6)
    assert bm.allocate("b", _prompt(6)) == 0 and bm.num_cached_blocks == 0
    bm.free("a")
    assert bm.num_free_blocks == 5                    # straight back to the free list


def test_slot_mapping_and_accounting():
    bm = BlockManager(16, block_size=4)
    bm.allocate("a", _prompt(3))
    bm.allocate("b", _prompt(9, 50))
    ta, tb = bm.block_table("a"), bm.block_table("b")
    assert bm.slot_mapping("b", 2, 6) == [tb[0] * 4 + 2, tb[0] * 4 + 3, tb[1] * 4, tb[1] * 4 + 1]
    assert bm.slot_mapping("a", 1, 1) == []
    assert bm.reserved_tokens() == 4 * (len(ta) + len(tb)) == 16 and bm.used_tokens() == 12


def test_bad_arguments():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_blocks"):
            BlockManager(bad)
        with pytest.raises(ValueError, match="block_size"):
            BlockManager(4, block_size=bad)
    bm = BlockManager(4, block_size=2)
    bm.allocate("a", [1, 2, 3])
    cases = [
        (lambda: bm.allocate("a", [1]), "already allocated"),
        (lambda: bm.allocate("b", []), "empty"),
        (lambda: bm.append_slots("zz", 1, [1]), "unknown sequence"),
        (lambda: bm.append_slots("a", 2, [1]), "token ids"),
        (lambda: bm.append_slots("a", -1, []), "num_new_tokens"),
        (lambda: bm.block_table("zz"), "unknown sequence"),
        (lambda: bm.slot_mapping("a", 2, 4), "slot_mapping"),
        (lambda: bm.slot_mapping("a", 2, 1), "slot_mapping"),
        (lambda: bm.mark_computed("a", 4), "mark_computed"),
        (lambda: bm.fork("a", "a"), "already exists"),
        (lambda: bm.fork("zz", "b"), "unknown sequence"),
        (lambda: bm.free("zz"), "unknown sequence"),
        (lambda: bm.can_allocate(-1), "num_tokens"),
        (lambda: bm.can_append_slots("a", 1.5), "num_new_tokens"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    bm.mark_computed("a", 2)
    with pytest.raises(ValueError, match="mark_computed"):
        bm.mark_computed("a", 1)                       # never backwards
    with pytest.raises(TypeError, match="token_ids"):
        bm.allocate("b", ["x"])
    bm.check_invariants()


def test_ref_count_accessor():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", list(range(6)))
    bm.fork("a", "b")
    assert [bm.ref_count(b) for b in bm.block_table("a")] == [2, 2]
    bm.free("a")
    assert [bm.ref_count(b) for b in bm.block_table("b")] == [1, 1]
    with pytest.raises(ValueError, match="block 4"):
        bm.ref_count(4)
