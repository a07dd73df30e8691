"""PagedKVStore: the paged KV store gives the engine's packed forward the same logits as the
contiguous slot pool (and as the model run on each whole sequence), over fragmented block
tables, chunked prefills mixed with decodes, copy-on-write after a fork and prefix-cache hits.
"""
import pytest
import torch
from _fixtures import tiny_model

from tinyserve.engine import PackedBatch, SlotKVPool
from tinyserve.engine.block_manager import OutOfBlocksError
from tinyserve.engine.paged_store import PagedKVStore, blocks_for_budget
from tinyserve.engine.sequence import Sequence, SequenceMetrics
from tinyserve.generate import generate_ids
from tinyserve.sampling import SamplingParams


# Many small ops: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=4)


def _seq(sid, prompt, n=8):
    return Sequence.create(list(prompt), SamplingParams(temperature=0.0, max_tokens=n,
                                                        ignore_eos=True),
                           256, "cpu", seq_id=sid, metrics=SequenceMetrics(0.0))


def _prompt(n, seed, V=300):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _forward(model, store, chunks):
    """One packed step of [(seq, num_tokens)] through ``store``; -> logits of every token."""
    ids, pos, cu = [], [], [0]
    for s, n in chunks:
        c = s.num_computed
        ids += s.token_ids(c, c + n)
        pos += range(c, c + n)
        cu.append(cu[-1] + n)
        store.allocate(s, c + n)
    pos = torch.tensor(pos)
    batch = PackedBatch([s.seq_id for s, _ in chunks], [n for _, n in chunks],
                        [s.num_computed for s, _ in chunks], cu, pos)
    store.prepare(batch)
    logits = model.forward_packed(torch.tensor(ids), pos, store, batch, torch.arange(len(ids)))
    if hasattr(store, "mark_computed"):
        store.mark_computed(batch)
    return logits, cu


def _fragment(store, seed=0):
    """Shuffle the free list: allocate the whole pool in sequences of 1-3 blocks and free
    them in random order, as after a long run of allocations and frees."""
    bm, bs = store.bm, store.block_size
    g = torch.Generator().manual_seed(seed)
    ids, left = [], bm.num_blocks
    while left:
        nb = min(left, int(torch.randint(1, 4, (1,), generator=g)))
        bm.allocate(("hole", len(ids)), [len(ids)] * (nb * bs))   # distinct: no cache hits
        ids.append(("hole", len(ids)))
        left -= nb
    for i in torch.randperm(len(ids), generator=g).tolist():
        bm.free(ids[i])
    assert bm.num_free_blocks == bm.num_blocks


def _run_both(model, paged, prompts, news, chunk, start_every=1, tol=1e-5):
    """A small engine loop: sequence i starts at step i * start_every, prefills in chunks of
    ``chunk`` tokens, then decodes greedily. Each step runs once through the paged store and
    once through a SlotKVPool; logits must agree. -> the sequences (out = greedy tokens)."""
    slots = SlotKVPool(model.config, len(prompts), 128)
    seqs = [_seq(i, p, n) for i, (p, n) in enumerate(zip(prompts, news))]
    step = 0
    while any(len(s.out) < s.limit for s in seqs):
        chunks = [(s, min(chunk, s.num_pending)) for i, s in enumerate(seqs)
                  if i * start_every <= step and len(s.out) < s.limit]
        got, cu = _forward(model, paged, chunks)
        want, _ = _forward(model, slots, chunks)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=f"step {step}")
        for j, (s, n) in enumerate(chunks):
            s.num_computed += n
            if s.num_pending == 0:                       # the chunk ends the pending tokens
                s.out.append(int(got[cu[j + 1] - 1].argmax()))
        paged.bm.check_invariants()
        live = sum(1 for s in seqs if s.seq_id in paged.bm)
        assert 0 <= paged.reserved_tokens() - paged.used_tokens() < live * paged.block_size
        step += 1
        for s in seqs:
            if len(s.out) == s.limit and s.seq_id in paged.bm:
                paged.free(s)
                slots.free(s)
    return seqs


def test_paged_store_equals_slot_pool_fragmented_and_chunked(tiny):
    """5 sequences, prompts 1..37 tokens prefilled in chunks of 6 while others decode, blocks
    of 4 handed out from a shuffled free list: same logits as the slot pool at every step, and
    every sequence's greedy tokens equal generate_ids on it alone."""
    paged = PagedKVStore(tiny.config, 48, block_size=4, enable_prefix_caching=False)
    _fragment(paged)
    prompts = [_prompt(n, n) for n in (13, 1, 37, 4, 22)]
    news = [9, 6, 5, 11, 7]
    tables = {}
    orig_prepare = paged.prepare

    def spy(batch):                        # keep every sequence's longest table
        orig_prepare(batch)
        for sid in batch.seq_ids:
            tables[sid] = paged.block_table(sid)
    paged.prepare = spy
    seqs = _run_both(tiny, paged, prompts, news, chunk=6)
    for s, p, n in zip(seqs, prompts, news):
        assert s.out == generate_ids(tiny, [p], n, ignore_eos=True)[0], s.seq_id
    # the tables really are fragmented: some sequence's blocks are not one ascending run
    assert any(t != list(range(t[0], t[0] + len(t))) for t in tables.values())
    assert paged.reserved_tokens() == 0 and paged.bm.num_free_blocks == 48


def test_fork_shares_blocks_and_copy_on_write_keeps_both_exact(tiny):
    """A prompt of 10 (blocks of 4: the third block half full) prefilled once, then forked:
    both share its 3 blocks; the first decode copies the half-full block (copy-on-write) and
    each sample continues with its own tokens, exactly as if prefilled alone."""
    store = PagedKVStore(tiny.config, 16, block_size=4)
    p = _prompt(10, 3)
    parent, child = _seq(0, p), _seq(1, p)
    logits, _ = _forward(tiny, store, [(parent, 10)])
    parent.num_computed = child.num_computed = 10
    store.fork(parent, child)
    assert store.block_table(1) == store.block_table(0) and store.bm.ref_count(
        store.block_table(0)[0]) == 2
    free_before = store.num_free_blocks
    # the samples differ: the parent takes the argmax, the child the second best token
    top2 = logits[-1].topk(2).indices.tolist()
    parent.out.append(top2[0])
    child.out.append(top2[1])
    for step in range(5):
        got, _ = _forward(tiny, store, [(parent, 1), (child, 1)])
        for s, row in ((parent, got[0]), (child, got[1])):
            ref = tiny(torch.tensor([s.prompt + s.out]))[0, -1]
            torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-5,
                                       msg=f"step {step} seq {s.seq_id}")
            s.num_computed += 1
            s.out.append(int(row.argmax()))
        if step == 0:
            tp, tc = store.block_table(0), store.block_table(1)
            assert tp[:2] == tc[:2] and tp[2] != tc[2]    # full blocks shared, last copied
            assert store.num_free_blocks == free_before - 1
        store.bm.check_invariants()
    store.free(parent)
    store.free(child)
    assert store.num_free_blocks == 16


def test_prefix_cache_hit_skips_the_cached_blocks(tiny):
    """A's 13-token prompt is prefilled (two chunks) and freed; B shares its first 9
    tokens: B's allocate reports 8 cached tokens (two full blocks, A's own), only tokens 8..
    are fed, and B's logits equal the model on B's whole prompt."""
    store = PagedKVStore(tiny.config, 12, block_size=4)
    pa = _prompt(13, 5)
    a = _seq(0, pa)
    _forward(tiny, store, [(a, 7)])
    a.num_computed = 7
    _forward(tiny, store, [(a, 6)])
    a.num_computed = 13
    a_blocks = store.block_table(0)
    store.free(a)
    pb = pa[:9] + _prompt(3, 6)
    b = _seq(1, pb)
    assert store.can_allocate(b, len(pb))
    cached = store.allocate(b, len(pb))
    assert cached == 8 and store.block_table(1)[:2] == a_blocks[:2]
    b.num_computed = cached
    got, _ = _forward(tiny, store, [(b, len(pb) - cached)])
    torch.testing.assert_close(got, tiny(torch.tensor([pb]))[0, cached:], atol=1e-5, rtol=1e-5)
    # a different first block: nothing cached
    c = _seq(2, [pb[0] + 1] + pb[1:])
    assert store.allocate(c, len(pb)) == 0
    store.bm.check_invariants()


def test_out_of_blocks_changes_nothing(tiny):
    store = PagedKVStore(tiny.config, 3, block_size=4, enable_prefix_caching=False)
    a, b = _seq(0, _prompt(9, 1)), _seq(1, _prompt(5, 2))
    assert store.can_allocate(a, 9) and store.allocate(a, 9) == 0     # 3 blocks
    assert not store.can_allocate(b, 5)
    with pytest.raises(OutOfBlocksError):
        store.allocate(b, 5)
    a.num_computed = 9
    a.out.append(7)
    assert store.can_allocate(a, 9) and not store.can_allocate(a, 13)
    store.free(b)                                           # never allocated: a no-op
    assert store.used_tokens() == 9 and store.reserved_tokens() == 12


def test_blocks_for_budget_and_bad_arguments(tiny):
    c = tiny.config
    assert blocks_for_budget(c, 16, torch.float32, tokens=1000) == 62
    per_token = c.kv_bytes_per_token(4)
    assert blocks_for_budget(c, 16, torch.float32, nbytes=per_token * 64 + 5) == 4
    assert blocks_for_budget(c, 16, torch.float16, nbytes=per_token * 64) == 8
    with pytest.raises(ValueError, match="exactly one"):
        blocks_for_budget(c, 16, torch.float32)
    with pytest.raises(ValueError, match="exactly one"):
        blocks_for_budget(c, 16, torch.float32, tokens=64, nbytes=10 ** 6)
    with pytest.raises(ValueError, match="positive int"):
        blocks_for_budget(c, 16, torch.float32, tokens=0)
    with pytest.raises(ValueError, match="does not hold one block"):
        blocks_for_budget(c, 16, torch.float32, tokens=15)
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        PagedKVStore(c, 0)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        PagedKVStore(c, 4, block_size=0)
    with pytest.raises(ValueError, match="unknown backend"):
        PagedKVStore(c, 4, backend="cuda")
    store = PagedKVStore(c, 4, block_size=4)
    assert store.nbytes == 2 * c.num_layers * 4 * 4 * c.num_kv_heads * c.head_dim * 4


def _kernel_model(device="cpu", dtype=torch.float32, head_dim=64):
    return tiny_model(seed=6, head_dim=head_dim, hidden_size=4 * head_dim, num_heads=4,
                      num_kv_heads=2, intermediate_size=128).to(device, dtype)


def test_paged_store_triton_kernels_equal_slot_pool():
    """The Triton write/decode/prefill kernels (interpreter) inside the store, over a
    fragmented pool: a chunk after a cached prefix next to a fresh prompt, then a fresh
    prompt next to two decodes (the packed kernel), then decode-only steps."""
    model = _kernel_model()
    paged = PagedKVStore(model.config, 12, block_size=4, backend="triton",
                         enable_prefix_caching=False)
    _fragment(paged, seed=1)
    _run_both(model, paged, [_prompt(7, 1), _prompt(3, 2), _prompt(4, 3)], [3, 4, 4],
              chunk=5, start_every=1, tol=1e-4)


@pytest.mark.gpu
def test_paged_store_bf16_on_cuda():
    """Real shapes (head_dim 128, bf16) on the GPU kernels vs the slot pool's kernels."""
    model = _kernel_model("cuda", torch.bfloat16, head_dim=128)
    paged = PagedKVStore(model.config, 64, block_size=16, dtype=torch.bfloat16, device="cuda")
    _fragment(paged, seed=2)
    prompts = [_prompt(n, n) for n in (40, 3, 70, 17)]
    slots = SlotKVPool(model.config, 4, 128, dtype=torch.bfloat16, device="cuda")
    seqs = [_seq(i, p, 6) for i, p in enumerate(prompts)]
    for step in range(8):
        chunks = [(s, min(32, s.num_pending)) for s in seqs]
        got, _ = _forward(model, paged, [(s, n) for s, n in chunks])
        want, cu = _forward(model, slots, [(s, n) for s, n in chunks])
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
        for j, (s, n) in enumerate(chunks):
            s.num_computed += n
            if s.num_pending == 0:
                s.out.append(int(want[cu[j + 1] - 1].argmax()))
