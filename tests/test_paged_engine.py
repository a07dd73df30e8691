"""The engine on the paged KV cache (its default) equals generation one request at a time.

Under load, with prefix-cache hits, after preemption by recomputation in a tiny block pool,
with n samples sharing their prompt's blocks, and over 500 random requests with aborts: every
greedy output equals ``generate_ids`` for that request alone, seeded samples equal the same
samples drawn without sharing, prefills that the cache makes unnecessary are really skipped
(tokens fed to the model are counted), and at the end every block is free.
"""
import random

import pytest
import torch
from _fixtures import tiny_model
from test_engine import _requests

from tinyserve import LLM
from tinyserve.attention import PagedBackend
from tinyserve.engine import KVCacheManager, LLMEngine, ModelRunner, SlotKVCacheManager
from tinyserve.engine.workload import replay_by_steps
from tinyserve.generate import generate_ids
from tinyserve.sampling import SamplingParams


# Many small ops: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=1)


@pytest.fixture
def fed(monkeypatch):
    """Counts the tokens every ModelRunner feeds to the model (prefill chunks + decodes)."""
    count = {"tokens": 0}
    execute = ModelRunner.execute

    def counting(self, sched):
        count["tokens"] += sum(c.num_tokens for c in sched.chunks)
        return execute(self, sched)
    monkeypatch.setattr(ModelRunner, "execute", counting)
    return count


def _greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _alone(model, p, n):
    return generate_ids(model, [p], max_new_tokens=n, ignore_eos=True)[0]


def _all_free(engine):
    kv = engine.kv_cache_manager
    kv.bm.check_invariants()
    assert kv.reserved_tokens() == kv.used_tokens() == 0
    assert kv.num_free_blocks == kv.num_blocks and not engine.scheduler.running


def _check_alone(model, engine, reqs, every):
    outs = replay_by_steps(engine, [(i * every, i, p, _greedy(n))
                                    for i, (p, n) in enumerate(reqs)])
    for i, (p, n) in enumerate(reqs):
        assert outs[(i, 0)]["token_ids"] == _alone(model, p, n), f"request {i}"
    _all_free(engine)
    return outs


# ---- equal to each request alone ----------------------------------------------------------------
@pytest.mark.parametrize("seqs,budget,every,bs", [(4, 16, 1, 16), (3, 7, 2, 4), (8, 64, 0, 1),
                                                  (1, 5, 3, 8)])
def test_paged_engine_under_load_equals_each_request_alone(tiny, seqs, budget, every, bs):
    engine = LLMEngine(tiny, None, max_num_seqs=seqs, max_num_batched_tokens=budget,
                       max_model_len=64, block_size=bs)
    kv, blocks = engine.kv_cache_manager, seqs * -(-64 // bs)
    assert isinstance(kv, KVCacheManager) and kv.num_blocks == blocks
    # the runner's tensors: one pool of exactly those blocks per layer, read by PagedBackend
    assert isinstance(engine.runner.attn, PagedBackend) and engine.runner.attn.block_size == bs
    assert len(engine.runner.kv_caches) == tiny.config.num_layers
    assert all(t.shape == (blocks, bs, tiny.config.num_kv_heads, tiny.config.head_dim)
               for kv_pair in engine.runner.kv_caches for t in kv_pair)
    _check_alone(tiny, engine, _requests(tiny.config.vocab_size, 16, seed=seqs * budget), every)


@pytest.mark.slow
def test_paged_engine_equals_alone_on_smollm2(smollm2):
    """The real model: 4 prompts (one chunked), blocks of 8, 3 sequences at once."""
    model, tok = smollm2
    texts = ["The capital of France is", "def fibonacci(n):", "Water boils at",
             "Once upon a time, in a small village at the edge of a great forest, there lived "
             "an old clockmaker who"]
    reqs = [(tok.encode(t), 6 + i) for i, t in enumerate(texts)]
    engine = LLMEngine(model, tok, max_num_seqs=3, max_num_batched_tokens=16, max_model_len=48,
                       block_size=8)
    _check_alone(model, engine, reqs, 1)


# ---- prefix caching ---------------------------------------------------------------------------
def test_prefix_cache_hits_skip_prefill_and_change_nothing(tiny, fed):
    """A 21-token shared "system prompt" + distinct tails; request 0 arrives first, the others
    after its prefill: each later request skips the cached full blocks of the shared part
    (blocks of 4: 20 tokens), counted in the tokens fed to the model; outputs are exactly
    those with the cache off and those of each request alone."""
    V = tiny.config.vocab_size
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, V, (21,), generator=g).tolist()
    tails = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 1, 9, 3)]
    reqs = [(shared + t, 4 + i) for i, t in enumerate(tails)]
    arrivals = [(0 if i == 0 else 2 + i, i, p, _greedy(n)) for i, (p, n) in enumerate(reqs)]
    outs, count = {}, {}
    for cache in (True, False):
        fed["tokens"] = 0
        engine = LLMEngine(tiny, None, 4, 64, 48, block_size=4, enable_prefix_caching=cache)
        outs[cache] = replay_by_steps(engine, arrivals)
        count[cache] = fed["tokens"]
        _all_free(engine)
    for i, (p, n) in enumerate(reqs):
        assert outs[True][(i, 0)]["token_ids"] == outs[False][(i, 0)]["token_ids"] \
            == _alone(tiny, p, n)
    # every prompt token + every decode without the cache; 20 fewer per later request with it
    assert count[False] == sum(len(p) + n - 1 for p, n in reqs)
    assert count[False] - count[True] == 20 * (len(reqs) - 1)


# ---- preemption -------------------------------------------------------------------------------
def test_preempted_requests_resume_exactly_in_a_tiny_block_pool(tiny):
    """6 sequences may run but 16 blocks of 4 hold only 64 tokens: running sequences cannot
    all grow, the latest admitted are preempted (blocks freed) and recomputed later; every
    output is the request's own, and nothing leaks."""
    reqs = [(torch.randint(0, 300, (10 + 3 * i,), generator=torch.Generator().manual_seed(i))
             .tolist(), 14 + i) for i in range(8)]
    engine = LLMEngine(tiny, None, max_num_seqs=6, max_num_batched_tokens=32, max_model_len=64,
                       block_size=4, kv_cache_tokens=64)
    assert engine.kv_cache_manager.num_blocks == 16
    step = engine.step

    def checked():
        out = step()
        engine.kv_cache_manager.bm.check_invariants()
        return out
    engine.step = checked
    outs = _check_alone(tiny, engine, reqs, 0)
    preemptions = [outs[(i, 0)]["metrics"].preemptions for i in range(len(reqs))]
    assert sum(preemptions) >= 3 and preemptions[0] == 0   # the oldest is never the victim


# ---- parallel sampling ------------------------------------------------------------------------
def test_n_samples_share_the_prompt_blocks_and_equal_unshared_samples(tiny, fed):
    """n=3 seeded samples: one prefill (tokens fed counted), the prompt's full blocks are held
    by all three (ref count 3) until they diverge, and the samples are exactly those of the
    slot pool (which copies the prompt's K/V) and of three separate requests with seeds
    s, s+1, s+2 (three prefills)."""
    p = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(9)).tolist()
    sp = SamplingParams(temperature=1.0, top_k=50, max_tokens=10, seed=11, n=3,
                        ignore_eos=True)
    engine = LLMEngine(tiny, None, 4, 64, 64, block_size=8)
    engine.add_request("n", p, sp)
    engine.step()                                     # the prefill; samples 1, 2 fork here
    seqs = engine._requests["n"]
    kv = engine.kv_cache_manager
    tables = [kv.block_table(s) for s in seqs]
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == 4
    assert [kv.bm.ref_count(b) for b in tables[0]] == [3, 3, 3, 3]
    engine.step()                                     # each writes its token: copy-on-write
    tables = [kv.block_table(s) for s in seqs]
    assert tables[0][:3] == tables[1][:3] == tables[2][:3]
    assert len({t[3] for t in tables}) == 3            # the partly filled block: one each
    assert [kv.bm.ref_count(b) for b in tables[0]] == [3, 3, 3, 1]
    outs = replay_by_steps(engine, [])
    shared = [seqs[k].out for k in range(3)]
    assert fed["tokens"] == len(p) + 3 * (10 - 1)       # one prefill, then 3 x 9 decodes
    _all_free(engine)
    assert all(outs[("n", k)]["finish_reason"] == "length" for k in range(3))
    slots = replay_by_steps(LLMEngine(tiny, None, 4, 64, 64, kv="slots"), [(0, "n", p, sp)])
    assert [slots[("n", k)]["token_ids"] for k in range(3)] == shared
    fed["tokens"] = 0
    apart = replay_by_steps(LLMEngine(tiny, None, 4, 64, 64, block_size=8), [
        (0, k, p, SamplingParams(temperature=1.0, top_k=50, max_tokens=10, seed=11 + k,
                                 ignore_eos=True)) for k in range(3)])
    assert fed["tokens"] == 3 * (len(p) + 10 - 1)      # three prefills
    assert [apart[(k, 0)]["token_ids"] for k in range(3)] == shared
    assert len({tuple(s) for s in shared}) == 3         # own generators: the samples differ


def test_llm_generate_n_samples_prefills_once(tiny, fed):
    llm = LLM.from_model(tiny, None, max_batch_size=4, max_num_batched_tokens=64)
    p = list(range(5, 25))
    sp = SamplingParams(temperature=1.0, max_tokens=6, seed=3, n=4, ignore_eos=True)
    out = llm.generate([p], sp, use_tqdm=False)[0]
    assert fed["tokens"] == len(p) + 4 * 5
    slots = LLM.from_model(tiny, None, max_batch_size=4, max_num_batched_tokens=64, kv="slots")
    assert [o.token_ids for o in out.outputs] == [
        o.token_ids for o in slots.generate([p], sp, use_tqdm=False)[0].outputs]
    assert out.metrics["output_tokens"] == 24


# ---- a long random run ------------------------------------------------------------------------
def test_500_random_requests_with_aborts_leave_every_block_free(tiny):
    """Bursts of requests (a third share one of two prefixes, some ask for n=2 greedy samples)
    through 48 blocks of 4 tokens for up to 8 sequences: prefix hits, forks, preemptions and
    aborts all happen; after every step the block manager's invariants hold; every output is
    the request's own (a prefix of it if aborted); at the end every block is free."""
    rng = random.Random(0)
    S, B, L = 8, 24, 64
    engine = LLMEngine(tiny, None, max_num_seqs=S, max_num_batched_tokens=B, max_model_len=L,
                       block_size=4, kv_cache_tokens=192)
    cached = []                                   # what each admission found in the cache
    kv = engine.kv_cache_manager
    allocate = kv.allocate

    def counting(seq, num_tokens):
        cached.append(allocate(seq, num_tokens))
        return cached[-1]
    kv.allocate = counting
    prefixes = [[rng.randrange(300) for _ in range(n)] for n in (9, 17)]
    reqs, step = {}, 0
    for i in range(500):
        step += rng.choice((0, 0, 0, 1, 1, 2))
        p = [rng.randrange(300) for _ in range(rng.randint(1, 30))]
        if rng.random() < 0.35:
            p = rng.choice(prefixes) + p
        n = 2 if rng.random() < 0.1 else 1
        reqs[i] = (step, p, _greedy(rng.randint(1, L - len(p)), n=n))
    done, aborted, preempted, t, i = {}, set(), 0, 0, 0
    while i < len(reqs) or engine.has_unfinished():
        while i < len(reqs) and reqs[i][0] <= t:
            engine.add_request(i, *reqs[i][1:])
            i += 1
        if rng.random() < 0.15 and engine.num_unfinished:       # abort a live request
            victim = rng.choice(engine.unfinished_ids)
            assert engine.abort(victim)
            aborted.add(victim)
        for o in engine.step():
            toks = done.setdefault((o.request_id, o.index), [[], None])
            assert toks[1] is None, "output after the finish"
            toks[0] += o.token_ids
            toks[1] = o.finish_reason
            preempted += o.metrics.preemptions if o.metrics else 0
        kv.bm.check_invariants()
        assert len(engine.scheduler.running) <= S
        t += 1
    _all_free(engine)
    assert engine.num_unfinished == 0 and not engine.scheduler.waiting
    assert {r for r, _ in done} == set(range(500)) and {r for _, r in done.values()} == \
        {"length", "abort"}
    completed = sum(1 for (_, k), (_, r) in done.items() if k == 0 and r == "length")
    print(f"{completed} completed, {len(aborted)} aborted, {preempted} preemptions, "
          f"{sum(c > 0 for c in cached)} cache hits")
    assert completed > 200 and len(aborted) > 40          # both kinds of ending, many times
    for (rid, k), (toks, reason) in done.items():
        _, p, sp = reqs[rid]
        want = _alone(tiny, p, sp.max_tokens)
        assert toks == (want if reason == "length" else want[:len(toks)]), (rid, k)
    forked = sum(1 for (rid, k), (_, r) in done.items() if k == 1 and r == "length")
    assert sum(c > 0 for c in cached) > 20 and preempted > 0 and forked > 10


# ---- arguments -----------------------------------------------------------------------------------
def test_bad_kv_arguments(tiny):
    with pytest.raises(ValueError, match="kv must be 'paged' or 'slots'"):
        LLMEngine(tiny, None, kv="pages")
    with pytest.raises(ValueError, match="options of kv='paged'"):
        LLMEngine(tiny, None, 2, 8, 32, kv="slots", block_size=8)
    # kv= names a kind; a manager object is no longer accepted in its place, and says so
    with pytest.raises(ValueError, match="kv must be 'paged' or 'slots', got <"):
        LLMEngine(tiny, None, 2, 8, 32, kv=SlotKVCacheManager(2, 32))
    with pytest.raises(ValueError, match="less than one sequence of max_model_len=64"):
        LLMEngine(tiny, None, 2, 8, 64, block_size=16, kv_cache_tokens=48)
    with pytest.raises(TypeError, match="block_size must be an int"):
        LLMEngine(tiny, None, 2, 8, 32, block_size=2.0)
    e = LLMEngine(tiny, None, 2, 8, 32)
    with pytest.raises(ValueError, match="n=3 samples of a request run together, but "
                                         "max_num_seqs is 2"):
        e.add_request(0, [1, 2], SamplingParams(n=3))
    with pytest.raises(ValueError, match="kv must be 'paged' or 'slots'"):
        LLM.from_model(tiny, None, kv="blocks")
    with pytest.raises(ValueError, match="not both"):
        LLM.from_model(tiny, None, kv_cache_tokens=64, kv_cache_bytes=10 ** 6)
    with pytest.raises(ValueError, match="max_batch_size \\(2\\) must be >= n"):
        LLM.from_model(tiny, None, max_batch_size=2).generate([[1, 2]], SamplingParams(n=3))
    # bytes -> whole blocks of 16 -> token slots
    per_token = tiny.config.kv_bytes_per_token(4)
    llm = LLM.from_model(tiny, None, kv_cache_bytes=per_token * 100)
    assert llm.config.kv_cache_tokens == 96 and llm.config.kv_cache_bytes is None


def test_llm_in_a_small_kv_budget_preempts_and_stays_exact(tiny):
    """LLM with 8 sequences allowed but 128 token slots of KV: outputs equal each alone."""
    reqs = _requests(tiny.config.vocab_size, 10, seed=21)
    llm = LLM.from_model(tiny, None, max_batch_size=8, max_num_batched_tokens=32,
                         kv_cache_tokens=128, block_size=4)
    outs = llm.generate([p for p, _ in reqs], [_greedy(n) for _, n in reqs], use_tqdm=False)
    for (p, n), o in zip(reqs, outs):
        assert o.outputs[0].token_ids == _alone(tiny, p, n)
    assert sum(o.metrics["preemptions"] for o in outs) > 0


@pytest.mark.gpu
def test_paged_engine_on_cuda_with_the_triton_kernels_equals_each_request_alone():
    """fp32 on CUDA: the paged write / decode / prefill kernels inside the engine."""
    model = tiny_model(seed=6, head_dim=64, hidden_size=256, num_heads=4, num_kv_heads=2,
                       intermediate_size=512).cuda()
    engine = LLMEngine(model, None, max_num_seqs=4, max_num_batched_tokens=24, max_model_len=64,
                       block_size=16, kv_cache_tokens=128)
    _check_alone(model, engine, _requests(model.config.vocab_size, 10, seed=8), 1)
