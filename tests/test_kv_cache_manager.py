"""KV cache managers and attention backends together, as the engine's model runner uses them:
``KVCacheManager`` (blocks) + ``PagedBackend`` give the model's one packed forward the same
logits as ``SlotKVCacheManager`` (slots) + ``SlotBackend`` (and as the model run on each whole
sequence), over fragmented block tables, chunked prefills mixed with decodes, copy-on-write
after a fork and prefix-cache hits. The manager's bookkeeping (out of blocks, budgets, bad
arguments) is checked on its own.
"""
from dataclasses import dataclass, field

import pytest
import torch
from _fixtures import tiny_model

from tinyserve.attention import PagedBackend, SlotBackend
from tinyserve.engine import LLMEngine
from tinyserve.engine.block_manager import OutOfBlocksError
from tinyserve.engine.kv_cache_manager import (KVCacheManager, SlotKVCacheManager,
                                               blocks_for_budget)
from tinyserve.engine.sequence import Sequence, SequenceMetrics
from tinyserve.errors import InvalidParameter
from tinyserve.generate import generate_ids
from tinyserve.kv_cache import KVCache
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


@dataclass
class Store:
    """What the model runner holds: a manager (bookkeeping), a backend and the KV tensors."""
    kv: object                  # KVCacheManager | SlotKVCacheManager
    attn: object                # PagedBackend | SlotBackend
    caches: list                # one (K, V) per layer, in the backend's layout
    tables: dict = field(default_factory=dict)   # seq_id -> its last block table fed

    @property
    def device(self):
        return self.caches[0][0].device


def paged(config, num_blocks, block_size=16, dtype=torch.float32, device="cpu",
          kernels="auto", enable_prefix_caching=True) -> Store:
    attn = PagedBackend(block_size, kernels)
    return Store(KVCacheManager(num_blocks, block_size, enable_prefix_caching), attn,
                 attn.allocate(config, num_blocks, dtype, device))


def slots(config, num_slots, max_model_len, dtype=torch.float32, device="cpu") -> Store:
    return Store(SlotKVCacheManager(num_slots, max_model_len), SlotBackend(),
                 KVCache(config, num_slots, max_model_len, dtype, device).layers)


def _forward(model, store, chunks):
    """One packed step of [(seq, num_tokens)] through ``store``, as ``ModelRunner`` does it
    (allocate, copies due, metadata from the block tables, the model's one forward);
    -> logits of every token. Nothing advances: see ``_advance``."""
    ids, pos, cu = [], [], [0]
    for s, n in chunks:
        c = s.num_computed
        ids += s.token_ids(c, c + n)
        pos += range(c, c + n)
        cu.append(cu[-1] + n)
        store.kv.allocate(s, c + n)
    dev = store.device
    pos = torch.tensor(pos, device=dev)
    tables = [store.kv.block_table(s) for s, _ in chunks]
    store.tables.update({s.seq_id: t for (s, _), t in zip(chunks, tables)})
    store.attn.copy(store.caches, store.kv.take_copies([s for s, _ in chunks]))
    meta = store.attn.build(tables, [s.num_computed for s, _ in chunks],
                            [n for _, n in chunks], pos)
    logits = model(torch.tensor(ids, device=dev)[None], pos[None], store.caches, meta,
                   torch.arange(len(ids), device=dev))
    return logits, cu


def _advance(chunks, *stores):
    """After the step (the scheduler's update): the tokens are computed, and each manager
    learns it (full blocks become cacheable)."""
    for s, n in chunks:
        s.num_computed += n
        for store in stores:
            store.kv.mark_computed(s)


def _fragment(store, seed=0):
    """Shuffle the free list: allocate the whole pool in sequences of 1-3 blocks and free
    them in random order, as after a long run of allocations and frees."""
    bm, bs = store.kv.bm, store.kv.block_size
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
    once through slots (SlotKVCacheManager + SlotBackend); logits must agree. -> the sequences
    (out = greedy tokens)."""
    contiguous = slots(model.config, len(prompts), 128)
    seqs = [_seq(i, p, n) for i, (p, n) in enumerate(zip(prompts, news))]
    bm, step = paged.kv.bm, 0
    while any(len(s.out) < s.limit for s in seqs):
        chunks = [(s, min(chunk, s.num_pending)) for i, s in enumerate(seqs)
                  if i * start_every <= step and len(s.out) < s.limit]
        got, cu = _forward(model, paged, chunks)
        want, _ = _forward(model, contiguous, chunks)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=f"step {step}")
        _advance(chunks, paged, contiguous)
        for j, (s, n) in enumerate(chunks):
            if s.num_pending == 0:                       # the chunk ends the pending tokens
                s.out.append(int(got[cu[j + 1] - 1].argmax()))
        bm.check_invariants()
        live = sum(1 for s in seqs if s.seq_id in bm)
        assert 0 <= paged.kv.reserved_tokens() - paged.kv.used_tokens() < \
            live * paged.kv.block_size
        step += 1
        for s in seqs:
            if len(s.out) == s.limit and s.seq_id in bm:
                paged.kv.free(s)
                contiguous.kv.free(s)
    return seqs


def test_paged_equals_slots_fragmented_and_chunked(tiny):
    """5 sequences, prompts 1..37 tokens prefilled in chunks of 6 while others decode, blocks
    of 4 handed out from a shuffled free list: same logits as slots at every step, and
    every sequence's greedy tokens equal generate_ids on it alone."""
    store = paged(tiny.config, 48, block_size=4, enable_prefix_caching=False)
    _fragment(store)
    prompts = [_prompt(n, n) for n in (13, 1, 37, 4, 22)]
    news = [9, 6, 5, 11, 7]
    seqs = _run_both(tiny, store, prompts, news, chunk=6)
    for s, p, n in zip(seqs, prompts, news):
        assert s.out == generate_ids(tiny, [p], n, ignore_eos=True)[0], s.seq_id
    # the tables fed (each sequence's last, its longest) really are fragmented: some
    # sequence's blocks are not one ascending run
    assert len(store.tables) == 5
    assert any(t != list(range(t[0], t[0] + len(t))) for t in store.tables.values())
    assert store.kv.reserved_tokens() == 0 and store.kv.bm.num_free_blocks == 48


def test_fork_shares_blocks_and_copy_on_write_keeps_both_exact(tiny):
    """A prompt of 10 (blocks of 4: the third block half full) prefilled once, then forked:
    both share its 3 blocks; the first decode copies the half-full block (copy-on-write) and
    each sample continues with its own tokens, exactly as if prefilled alone."""
    store = paged(tiny.config, 16, block_size=4)
    kv = store.kv
    p = _prompt(10, 3)
    parent, child = _seq(0, p), _seq(1, p)
    logits, _ = _forward(tiny, store, [(parent, 10)])
    _advance([(parent, 10)], store)
    child.num_computed = 10
    kv.fork(parent, child)
    assert kv.block_table(child) == kv.block_table(parent) and kv.bm.ref_count(
        kv.block_table(parent)[0]) == 2
    free_before = kv.num_free_blocks
    # the samples differ: the parent takes the argmax, the child the second best token
    top2 = logits[-1].topk(2).indices.tolist()
    parent.out.append(top2[0])
    child.out.append(top2[1])
    for step in range(5):
        got, _ = _forward(tiny, store, [(parent, 1), (child, 1)])
        _advance([(parent, 1), (child, 1)], store)
        for s, row in ((parent, got[0]), (child, got[1])):
            ref = tiny.run(torch.tensor([s.prompt + s.out]))[0, -1]
            torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-5,
                                       msg=f"step {step} seq {s.seq_id}")
            s.out.append(int(row.argmax()))
        if step == 0:
            tp, tc = kv.block_table(parent), kv.block_table(child)
            assert tp[:2] == tc[:2] and tp[2] != tc[2]    # full blocks shared, last copied
            assert kv.num_free_blocks == free_before - 1
        assert kv.take_copies([parent, child]) == []     # each copy made once, by _forward
        kv.bm.check_invariants()
    kv.free(parent)
    kv.free(child)
    assert kv.num_free_blocks == 16


def test_prefix_cache_hit_skips_the_cached_blocks(tiny):
    """A's 13-token prompt is prefilled (two chunks) and freed; B shares its first 9
    tokens: B's allocate reports 8 cached tokens (two full blocks, A's own), only tokens 8..
    are fed, and B's logits equal the model on B's whole prompt."""
    store = paged(tiny.config, 12, block_size=4)
    kv = store.kv
    pa = _prompt(13, 5)
    a = _seq(0, pa)
    for n in (7, 6):
        _forward(tiny, store, [(a, n)])
        _advance([(a, n)], store)
    assert a.num_computed == 13
    a_blocks = kv.block_table(a)
    kv.free(a)
    pb = pa[:9] + _prompt(3, 6)
    b = _seq(1, pb)
    assert kv.can_allocate(b, len(pb))
    cached = kv.allocate(b, len(pb))
    assert cached == 8 and kv.block_table(b)[:2] == a_blocks[:2]
    b.num_computed = cached
    got, _ = _forward(tiny, store, [(b, len(pb) - cached)])
    torch.testing.assert_close(got, tiny.run(torch.tensor([pb]))[0, cached:], atol=1e-5, rtol=1e-5)
    # a different first block: nothing cached
    c = _seq(2, [pb[0] + 1] + pb[1:])
    assert kv.allocate(c, len(pb)) == 0
    kv.bm.check_invariants()


def test_out_of_blocks_changes_nothing():
    store = KVCacheManager(3, block_size=4, enable_prefix_caching=False)
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
    with pytest.raises(InvalidParameter, match="num_blocks must be >= 1"):
        KVCacheManager(0)
    with pytest.raises(InvalidParameter, match="block_size must be >= 1"):
        KVCacheManager(4, block_size=0)
    with pytest.raises(ValueError, match="unknown backend"):
        PagedBackend(4, "cuda")
    # 4 blocks of 4 tokens: 2 * layers * 4 * 4 * Hkv * D fp32 elements, zeroed, per layer
    want = 2 * c.num_layers * 4 * 4 * c.num_kv_heads * c.head_dim * 4
    caches = PagedBackend(4).allocate(c, 4, torch.float32, "cpu")
    assert len(caches) == c.num_layers and all(
        t.shape == (4, 4, c.num_kv_heads, c.head_dim) and not t.any() for kv in caches for t in kv)
    assert sum(t.numel() * t.element_size() for kv in caches for t in kv) == want
    # the engine's runner holds exactly that for a budget of 16 token slots in blocks of 4
    engine = LLMEngine(tiny, None, 2, 8, 16, block_size=4, kv_cache_tokens=16)
    assert engine.kv_cache_manager.num_blocks == 4 and engine.runner.kv_cache_bytes == want


def _kernel_model(device="cpu", dtype=torch.float32, head_dim=64):
    return tiny_model(seed=6, head_dim=head_dim, hidden_size=4 * head_dim, num_heads=4,
                      num_kv_heads=2, intermediate_size=128).to(device, dtype)


def test_paged_backend_triton_kernels_equal_slots():
    """The Triton write/decode/prefill kernels (interpreter) inside PagedBackend, over a
    fragmented pool: a chunk after a cached prefix next to a fresh prompt, then a fresh
    prompt next to two decodes (the packed kernel), then decode-only steps."""
    model = _kernel_model()
    store = paged(model.config, 12, block_size=4, kernels="triton", enable_prefix_caching=False)
    _fragment(store, seed=1)
    _run_both(model, store, [_prompt(7, 1), _prompt(3, 2), _prompt(4, 3)], [3, 4, 4],
              chunk=5, start_every=1, tol=1e-4)


@pytest.mark.gpu
def test_paged_backend_bf16_on_cuda():
    """Real shapes (head_dim 128, bf16) on the GPU kernels vs the slot backend's kernels."""
    model = _kernel_model("cuda", torch.bfloat16, head_dim=128)
    store = paged(model.config, 64, block_size=16, dtype=torch.bfloat16, device="cuda")
    _fragment(store, seed=2)
    prompts = [_prompt(n, n) for n in (40, 3, 70, 17)]
    contiguous = slots(model.config, 4, 128, dtype=torch.bfloat16, device="cuda")
    seqs = [_seq(i, p, 6) for i, p in enumerate(prompts)]
    for step in range(8):
        chunks = [(s, min(32, s.num_pending)) for s in seqs]
        got, _ = _forward(model, store, [(s, n) for s, n in chunks])
        want, cu = _forward(model, contiguous, [(s, n) for s, n in chunks])
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
        _advance(chunks, store, contiguous)
        for j, (s, n) in enumerate(chunks):
            if s.num_pending == 0:
                s.out.append(int(want[cu[j + 1] - 1].argmax()))
