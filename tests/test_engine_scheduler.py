"""The scheduler: token budget, decodes first, chunked prefill, FCFS without starvation, and a
long random run with aborts that must end with every request finished and every slot free."""
import random

import pytest
import torch
from _fixtures import tiny_model

from tinyserve.engine import LLMEngine, SlotKVCacheManager, wait_bound_steps
from tinyserve.engine import llm_engine
from tinyserve.engine.workload import replay_by_steps
from tinyserve.generate import generate_ids
from tinyserve.sampling import SamplingParams


# Many small ops: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=1)


def _greedy(n, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def _prompt(n, seed):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_budget_decodes_first_and_chunked_prefill(tiny):
    engine = LLMEngine(tiny, None, max_num_seqs=4, max_num_batched_tokens=16,
                       max_model_len=80, record_steps=True)
    replay_by_steps(engine, [(0, "a", _prompt(5, 0), _greedy(20)),
                             (0, "b", _prompt(3, 1), _greedy(20)),
                             (2, "long", _prompt(40, 2), _greedy(3))])
    steps = engine.history
    assert all(sum(e[3] for e in r.entries) <= 16 for r in steps)
    # "long" arrives at step 2 while a and b decode: it gets what the budget leaves, 14 per
    # step, and a and b keep decoding in every one of those steps.
    chunks = [(r.step, e[3]) for r in steps for e in r.entries if e[0] == "long" and e[3] > 1]
    assert chunks == [(2, 14), (3, 14), (4, 12)]
    for r in steps[2:5]:
        assert {(e[0], e[3]) for e in r.entries if e[0] != "long"} == {("a", 1), ("b", 1)}
    # sampled only once its whole prompt is in: at step 4, not before
    assert [r.step for r in steps for e in r.entries if e[0] == "long" and e[4]][0] == 4


def test_fcfs_admission_order(tiny):
    """Eight requests queued at once for two slots start in the order they came."""
    engine = LLMEngine(tiny, None, 2, 8, 64)
    outs = replay_by_steps(engine, [(0, i, _prompt(3 + (7 * i) % 11, i), _greedy(1 + i % 4))
                                    for i in range(8)])
    firsts = [outs[(i, 0)]["metrics"].first_scheduled_step for i in range(8)]
    assert firsts == sorted(firsts) and firsts[:2] == [0, 0]


def _flood(tiny, later: int):
    """Six 48-token prompts arrive at step 0, a 3-token request at step 1, then ``later``
    more long prompts, one per step. -> (short request's metrics, engine)."""
    engine = LLMEngine(tiny, None, max_num_seqs=8, max_num_batched_tokens=16,
                       max_model_len=64, record_steps=True)
    arrivals = [(0, f"long{i}", _prompt(48, i), _greedy(3)) for i in range(6)]
    arrivals.append((1, "short", _prompt(3, 99), _greedy(2)))
    arrivals += [(2 + i, f"later{i}", _prompt(48, 50 + i), _greedy(3)) for i in range(later)]
    return replay_by_steps(engine, arrivals)[("short", 0)]["metrics"], engine


def test_a_flood_of_long_prompts_does_not_starve_a_short_one(tiny):
    m, engine = _flood(tiny, later=0)
    # When "short" arrives (before step 1) step 0 has prefilled 16 of the 6 * 48 prompt
    # tokens ahead of it; at most 7 sequences decode in any step while it waits.
    bound = wait_bound_steps(6 * 48 - 16, 16, decodes=8 - 1)
    waited = m.first_scheduled_step - 1
    assert 0 < waited <= bound, (waited, bound)
    assert m.first_token_step == m.first_scheduled_step      # 3 tokens: one chunk
    # The budget is spent on the requests ahead of it in every step it waits.
    for r in engine.history[1:m.first_scheduled_step]:
        assert sum(e[3] for e in r.entries) == 16
    # Requests arriving after it wait behind it: a continuing flood changes nothing.
    m2, _ = _flood(tiny, later=30)
    assert (m2.first_scheduled_step, m2.first_token_step) == (m.first_scheduled_step,
                                                              m.first_token_step)


def test_a_flood_of_short_requests_does_not_starve_a_long_prompt(tiny):
    """A 60-token prompt at the head is chunked, never skipped for the short ones behind."""
    engine = LLMEngine(tiny, None, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=80)
    arrivals = [(0, "s0", _prompt(2, 0), _greedy(30)), (0, "s1", _prompt(2, 1), _greedy(30)),
                (1, "long", _prompt(60, 2), _greedy(2))]
    arrivals += [(2 + i, f"s{i + 2}", _prompt(2, i + 2), _greedy(4)) for i in range(40)]
    outs = replay_by_steps(engine, arrivals)
    m = outs[("long", 0)]["metrics"]
    assert m.first_scheduled_step == 1
    # at most 3 other sequences decode meanwhile: >= 8 - 3 prompt tokens per step
    assert m.first_token_step - 1 <= -(-60 // (8 - 3))
    later = [outs[(f"s{i + 2}", 0)]["metrics"].first_scheduled_step for i in range(40)]
    assert min(later) >= m.first_scheduled_step


class TokenCapManager(SlotKVCacheManager):
    """Slots, plus a cap on the tokens all sequences hold together: like a paged cache with
    few blocks, a running sequence can fail to grow."""

    def __init__(self, *args, max_tokens, **kw):
        super().__init__(*args, **kw)
        self.max_tokens = max_tokens

    def can_allocate(self, seq, num_tokens):
        others = self.used_tokens() - self._tokens.get(seq.seq_id, 0)
        return super().can_allocate(seq, num_tokens) and others + num_tokens <= self.max_tokens


def test_preemption_when_the_store_runs_out_recomputes_exactly(tiny, monkeypatch):
    """Four slots but memory for 64 tokens (a request needs 24 to 39): running sequences cannot
    all grow, the latest admitted are preempted and later recomputed, every output is exact.
    The engine is built on the capped manager (its runner: 4 slots of 64 tokens)."""
    pool = TokenCapManager(4, 64, max_tokens=64)
    monkeypatch.setattr(llm_engine, "_make_manager", lambda config, num_blocks: pool)
    engine = LLMEngine(tiny, None, 4, 32, 64, kv="slots")
    assert engine.kv_cache_manager is pool
    assert engine.runner.kv_caches[0][0].shape[:3] == (4, tiny.config.num_kv_heads, 64)
    reqs = [(_prompt(10 + 2 * i, i), 14 + i) for i in range(6)]
    for i, (p, n) in enumerate(reqs):
        engine.add_request(i, p, _greedy(n))
    toks, metrics = {}, {}
    while engine.has_unfinished():
        for o in engine.step():
            toks.setdefault(o.request_id, []).extend(o.token_ids)
            metrics[o.request_id] = o.metrics
        assert pool.used_tokens() <= 64
    for i, (p, n) in enumerate(reqs):
        assert toks[i] == generate_ids(tiny, [p], n, ignore_eos=True)[0], i
    assert sum(m.preemptions for m in metrics.values()) >= 3
    assert metrics[0].preemptions == 0          # the oldest request is never the victim
    assert pool.num_free_slots == 4 and pool.used_tokens() == 0


def test_500_random_requests_with_aborts_all_finish_and_free_every_slot(tiny):
    rng = random.Random(0)
    S, B, L = 6, 24, 64
    engine = LLMEngine(tiny, None, max_num_seqs=S, max_num_batched_tokens=B, max_model_len=L,
                       record_steps=True, kv="slots")
    reqs, step = {}, 0
    for i in range(500):
        step += rng.choice((0, 0, 0, 1, 1, 2))                   # bursts and gaps
        p = [rng.randrange(300) for _ in range(rng.randint(1, 40))]
        stop = [rng.randrange(300)] if rng.random() < 0.2 else []
        reqs[i] = (step, p, _greedy(rng.randint(1, L - len(p)), stop_token_ids=stop))
    finished, aborted, t, i = {}, set(), 0, 0
    kv = engine.kv_cache_manager
    order = sorted(reqs)
    while i < len(order) or engine.has_unfinished():
        while i < len(order) and reqs[order[i]][0] <= t:
            _, p, sp = reqs[order[i]]
            engine.add_request(order[i], p, sp)
            i += 1
        if rng.random() < 0.15 and engine.num_unfinished:       # abort a live request
            victim = rng.choice(engine.unfinished_ids)
            assert engine.abort(victim)
            aborted.add(victim)
            assert kv.num_free_slots + len(engine.scheduler.running) == S
        for o in engine.step():
            toks, _ = finished.get(o.request_id, ([], None))
            assert o.request_id not in finished or finished[o.request_id][1] is None
            finished[o.request_id] = (toks + o.token_ids, o.finish_reason)
        running = engine.scheduler.running
        assert len(running) <= S
        assert len({kv.slot_of(s.seq_id) for s in running}) == len(running)
        t += 1
    assert all(sum(e[3] for e in r.entries) <= B for r in engine.history)
    assert sorted(finished) == list(range(500))
    assert kv.num_free_slots == S and kv.reserved_tokens() == 0
    assert kv.used_tokens() == 0 and engine.num_unfinished == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert 40 < len(aborted) < 200
    reasons = {r for _, r in finished.values()}
    assert reasons == {"length", "stop", "abort"}
    # every output is what the request alone would have produced (a prefix, if aborted)
    for rid, (toks, reason) in finished.items():
        _, p, sp = reqs[rid]
        alone = generate_ids(tiny, [p], params=sp, stop_token_ids=())[0]
        if reason == "abort":
            assert rid in aborted and toks == alone[:len(toks)], rid
        else:
            assert toks == alone, rid
