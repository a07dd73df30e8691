"""The continuous-batching engine equals generation one request at a time.

Under load (staggered arrivals, mixed lengths, chunked prefill, a queue longer than the batch)
every request's greedy tokens equal ``generate_ids`` for that request alone, on tiny random
models and on the real SmolLM2; the model's one forward over packed tokens (slot metadata)
and the slot backend's attention equal their references; sampling is per request; abort
frees a slot at once; bad arguments are refused.
"""
import pytest
import torch
from _fixtures import tiny_model

from tinyserve import ops
from tinyserve.attention import SlotBackend
from tinyserve.engine import LLMEngine, SequenceStatus, SlotKVCacheManager, StaticBatcher
from tinyserve.engine.sequence import Sequence, SequenceMetrics
from tinyserve.engine.workload import replay_by_steps
from tinyserve.generate import decode_loop, generate_ids
from tinyserve.kv_cache import KVCache
from tinyserve.sampling import SamplingParams


# Many small ops: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=1)


def _requests(vocab, n, seed, max_prompt=40, max_new=14):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_prompt + 1, (n,), generator=g).tolist()
    news = torch.randint(1, max_new + 1, (n,), generator=g).tolist()
    return [(torch.randint(0, vocab, (p,), generator=g).tolist(), m) for p, m in zip(lens, news)]


def _greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def _check_equal_alone(model, engine, reqs, every):
    """Request i arrives before step i * every; each must equal generate_ids alone."""
    outs = replay_by_steps(engine, [(i * every, i, p, _greedy(n)) for i, (p, n) in
                                    enumerate(reqs)])
    for i, (p, n) in enumerate(reqs):
        alone = generate_ids(model, [p], max_new_tokens=n, ignore_eos=True)[0]
        assert outs[(i, 0)]["token_ids"] == alone, f"request {i} (prompt {len(p)}, new {n})"
        assert outs[(i, 0)]["finish_reason"] == "length"
    kv = engine.kv_cache_manager
    assert kv.num_free_slots == kv.num_slots and kv.used_tokens() == 0


# ---- the packed forward and the slot backend ------------------------------------------------
def test_forward_packed_equals_forward_per_sequence(tiny):
    """Three sequences packed in one row (B = 1, T = N) through the model's one forward with
    SlotBackend metadata, some with cached context, vs ``tiny.run`` on each sequence alone."""
    g = torch.Generator().manual_seed(0)
    V = tiny.config.vocab_size
    full = [torch.randint(0, V, (n,), generator=g) for n in (9, 1, 14)]
    ctx = [0, 0, 6]                       # sequence 2 has 6 tokens cached by an earlier step
    manager, cache, attn = SlotKVCacheManager(3, 32), KVCache(tiny.config, 3, 32), SlotBackend()
    seqs = [Sequence.create(f.tolist(), _greedy(4), 32, "cpu", seq_id=i,
                            metrics=SequenceMetrics(0.0)) for i, f in enumerate(full)]
    for s, f in zip(seqs, full):
        manager.allocate(s, len(f))

    def step(parts):                      # parts: [(seq index, start, end)]
        ids = torch.cat([full[i][a:b] for i, a, b in parts])
        pos = torch.cat([torch.arange(a, b) for i, a, b in parts])
        q = [b - a for _, a, b in parts]
        cu = [0]
        for n in q:
            cu.append(cu[-1] + n)
        meta = attn.build([manager.block_table(seqs[i]) for i, _, _ in parts],
                          [a for _, a, _ in parts], q, pos)
        return tiny(ids[None], pos[None], cache.layers, meta, torch.arange(len(ids))), cu

    step([(2, 0, 6)])
    logits, cu = step([(0, 0, 9), (1, 0, 1), (2, 6, 14)])
    for j, (i, a) in enumerate(zip((0, 1, 2), ctx)):
        ref = tiny.run(full[i][None])[0, a:]
        torch.testing.assert_close(logits[cu[j]:cu[j + 1]], ref, atol=1e-5, rtol=1e-5)


def _attend_case(backend, dtype, slots, D, device="cpu"):
    """A step of 2 decodes and 2 prefill chunks (one continuing a cached prefix) through
    SlotBackend.forward on a KVCache's layer vs attention_ref over each sequence's whole
    history (sequence i lives in slot ``slots[i]`` of 5)."""
    from tinyserve.config import ModelConfig
    cfg = ModelConfig(vocab_size=8, hidden_size=4 * D, intermediate_size=8, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=D, max_position_embeddings=64)
    g = torch.Generator().manual_seed(0)
    ctx, q_lens = [7, 3, 0, 5], [1, 1, 6, 4]
    cache = KVCache(cfg, 5, 24, dtype=dtype, device=device)
    attn = SlotBackend(backend)
    hist = []
    for i, (c, n) in enumerate(zip(ctx, q_lens)):    # earlier tokens, written straight in
        k, v = (torch.randn(c + n, 2, D, generator=g).to(device, dtype) for _ in range(2))
        cache.k[0][slots[i], :, :c] = k[:c].transpose(0, 1)
        cache.v[0][slots[i], :, :c] = v[:c].transpose(0, 1)
        hist.append((k, v))
    N = sum(q_lens)
    q = torch.randn(N, 4, D, generator=g).to(device, dtype)
    cu = [0, 1, 2, 8, 12]
    pos = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, q_lens)]).to(device)
    meta = attn.build([[s] for s in slots[:4]], ctx, q_lens, pos)
    k_new = torch.cat([k[c:] for (k, _), c in zip(hist, ctx)])
    v_new = torch.cat([v[c:] for (_, v), c in zip(hist, ctx)])
    # the backend's packed layout: q [1, Hq, N, D], k/v [1, Hkv, N, D] -> o [1, Hq, N, D]
    packed = [t.transpose(0, 1)[None] for t in (q, k_new, v_new)]
    out = attn.forward(*packed, cache.layers[0], meta)[0].transpose(0, 1)     # [N, Hq, D]
    for i, (c, n) in enumerate(zip(ctx, q_lens)):
        k, v = hist[i]
        ref = ops.attention_ref(q[cu[i]:cu[i + 1]].transpose(0, 1)[None],
                                k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                pos[cu[i]:cu[i + 1]][None], torch.tensor([c + n], device=device))
        tol = 1e-5 if dtype == torch.float32 else 2e-3 if dtype == torch.float16 else 2e-2
        torch.testing.assert_close(out[cu[i]:cu[i + 1]], ref[0].transpose(0, 1), atol=tol,
                                   rtol=tol, msg=f"sequence {i} (ctx {c}, new {n})")
        # this step's k/v landed in the sequence's slot at their positions
        torch.testing.assert_close(cache.k[0][slots[i], :, :c + n], k.transpose(0, 1))
        torch.testing.assert_close(cache.v[0][slots[i], :, :c + n], v.transpose(0, 1))


# the two decodes sit in slots 0, 1 (a view), 3, 1 (a view of 1..3 with a dummy row for slot
# 2) or 0, 4 (far apart: gathered)
@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [3, 1, 4, 0], [0, 4, 1, 2]],
                         ids=["view", "view-with-hole", "gather"])
def test_slot_backend_forward_ref(slots):
    _attend_case("ref", torch.float32, slots, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slots", [[3, 1, 4, 0], [0, 4, 1, 2]], ids=["view", "gather"])
def test_slot_backend_forward_triton(dtype, slots):
    _attend_case("triton", dtype, slots, 64)


@pytest.mark.gpu
def test_slot_backend_forward_triton_bf16_gpu():
    _attend_case("triton", torch.bfloat16, [3, 1, 4, 0], 128, "cuda")


# ---- the engine under load ------------------------------------------------------------------
@pytest.mark.parametrize("seqs,budget,every", [(4, 16, 1), (3, 7, 2), (8, 64, 0), (1, 5, 3)])
def test_engine_under_load_equals_each_request_alone(tiny, seqs, budget, every):
    reqs = _requests(tiny.config.vocab_size, 12, seed=seqs * budget)
    engine = LLMEngine(tiny, None, max_num_seqs=seqs, max_num_batched_tokens=budget,
                       max_model_len=64, kv="slots")
    _check_equal_alone(tiny, engine, reqs, every)


def test_engine_on_gqa_mha_and_tied_models():
    for model in (tiny_model(seed=2, num_kv_heads=4, tie_word_embeddings=True),
                  tiny_model(seed=3, num_kv_heads=1, head_dim=8, hidden_size=32)):
        reqs = _requests(model.config.vocab_size, 6, seed=5, max_prompt=20, max_new=6)
        _check_equal_alone(model, LLMEngine(model, None, 3, 10, 32, kv="slots"), reqs, 1)


@pytest.mark.gpu
def test_engine_on_cuda_with_the_triton_kernels_equals_each_request_alone():
    """fp32 on CUDA: every op (attention included) runs its Triton kernel."""
    model = tiny_model(seed=6, head_dim=64, hidden_size=256, num_heads=4, num_kv_heads=2,
                       intermediate_size=512).cuda()
    reqs = _requests(model.config.vocab_size, 10, seed=8)
    engine = LLMEngine(model, None, max_num_seqs=4, max_num_batched_tokens=24, max_model_len=64,
                       kv="slots")
    _check_equal_alone(model, engine, reqs, 1)


@pytest.mark.slow
def test_engine_under_load_equals_alone_on_smollm2(smollm2):
    """The real model: 7 prompts of 3..41 tokens arriving every other step, 3 slots, a token
    budget of 24 (prompts are chunked while others decode), 12-16 new tokens each."""
    model, tok = smollm2
    texts = ["The capital of France is", "def fibonacci(n):",
             "Once upon a time, in a small village at the edge of a great forest, there lived "
             "an old clockmaker who repaired every clock in the valley and never",
             "1, 2, 3, 4,", "Water boils at", "The three primary colours are",
             "Photosynthesis is the process by which plants"]
    reqs = [(tok.encode(t), 12 + i % 5) for i, t in enumerate(texts)]
    assert max(len(p) for p, _ in reqs) > 24           # at least one prompt is chunked
    engine = LLMEngine(model, tok, max_num_seqs=3, max_num_batched_tokens=24,
                       max_model_len=64, kv="slots")
    _check_equal_alone(model, engine, reqs, 2)


@pytest.mark.slow
def test_stop_tokens_strings_and_text_equal_decode_loop(smollm2):
    """Per-request stop strings / stop tokens / max_tokens / eos in one batch: the same
    tokens, text and finish reason as decode_loop gives each request alone."""
    model, tok = smollm2
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True))
    free = generate_ids(model, [prompt], 12, ignore_eos=True)[0]
    cases = [SamplingParams(temperature=0, max_tokens=40),                  # ends on eos
             SamplingParams(temperature=0, max_tokens=5),                   # length
             SamplingParams(temperature=0, max_tokens=12, stop=["France"]),  # stop string
             SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free[3]]),
             SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    engine = LLMEngine(model, tok, max_num_seqs=5, max_num_batched_tokens=64,
                       max_model_len=len(prompt) + 40)
    outs = replay_by_steps(engine, [(i, i, prompt, sp) for i, sp in enumerate(cases)])
    reasons = []
    for i, sp in enumerate(cases):
        ids, text, reason = [], "", None
        for ups in decode_loop(model, [prompt], [sp], tok, tok.stop_token_ids):
            ids.append(ups[0].token_id)
            text += ups[0].text_delta
            reason = ups[0].finish_reason
        got = outs[(i, 0)]
        assert (got["token_ids"], got["text"], got["finish_reason"]) == (ids, text, reason), i
        reasons.append(reason)
    assert reasons == ["stop", "length", "stop", "stop", "length"]
    assert "France" not in outs[(2, 0)]["text"] and outs[(0, 0)]["token_ids"][-1] in \
        tok.stop_token_ids


def test_seeded_sampling_is_per_request(tiny):
    """A seeded request's tokens do not depend on its neighbours; n samples = n seeds."""
    V = tiny.config.vocab_size
    p = _requests(V, 3, seed=9)
    seeded = SamplingParams(temperature=1.0, top_k=50, max_tokens=10, seed=11, ignore_eos=True)

    def run(arrivals, seqs=4):
        return replay_by_steps(LLMEngine(tiny, None, seqs, 32, 64), arrivals)
    alone = run([(0, "x", p[0][0], seeded)])[("x", 0)]["token_ids"]
    mixed = run([(0, "a", p[1][0], SamplingParams(temperature=1.0, max_tokens=7)),
                 (0, "b", p[2][0], _greedy(5)), (1, "x", p[0][0], seeded)])
    assert mixed[("x", 0)]["token_ids"] == alone
    three = run([(0, "n", p[0][0], SamplingParams(temperature=1.0, top_k=50, max_tokens=10,
                                                  seed=11, n=3, ignore_eos=True))])
    assert three[("n", 0)]["token_ids"] == alone
    for k in (1, 2):   # sample k is the request with seed 11 + k
        sk = SamplingParams(temperature=1.0, top_k=50, max_tokens=10, seed=11 + k,
                            ignore_eos=True)
        assert three[("n", k)]["token_ids"] == run([(0, 0, p[0][0], sk)])[(0, 0)]["token_ids"]
    assert len({tuple(three[("n", k)]["token_ids"]) for k in range(3)}) == 3


def test_recompute_after_preemption_continues_exactly(tiny):
    """Running -> waiting (KV dropped) -> re-admitted: prompt + output so far are re-prefilled,
    in chunks, and generation continues with the tokens it would have made."""
    (p, _), = _requests(tiny.config.vocab_size, 1, seed=4, max_prompt=30)
    engine = LLMEngine(tiny, None, 2, 8, 64, kv="slots")
    engine.add_request(0, p, _greedy(12))
    toks = []
    while len(toks) < 5:
        toks += [t for o in engine.step() for t in o.token_ids]
    seq = engine.scheduler.running[0]
    engine.scheduler.preempt(seq)
    assert seq.status is SequenceStatus.WAITING and seq.num_computed == 0
    assert engine.kv_cache_manager.num_free_slots == 2
    while engine.has_unfinished():
        toks += [t for o in engine.step() for t in o.token_ids]
    assert toks == generate_ids(tiny, [p], 12, ignore_eos=True)[0]
    assert seq.metrics.preemptions == 1


# ---- abort --------------------------------------------------------------------------------------
def test_abort_frees_the_slot_at_once(tiny):
    V = tiny.config.vocab_size
    (p0, _), (p1, _), (p2, _) = _requests(V, 3, seed=7)
    engine = LLMEngine(tiny, None, max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                       kv="slots")
    engine.add_request("a", p0, _greedy(30))
    engine.add_request("b", p1, _greedy(30))
    engine.add_request("c", p2, _greedy(4))          # waits: both slots are taken
    engine.step()
    engine.step()
    kv = engine.kv_cache_manager
    assert kv.num_free_slots == 0 and len(engine.scheduler.waiting) == 1
    assert engine.abort("a") is True
    assert kv.num_free_slots == 1                     # at once, not at the next step
    assert kv.reserved_tokens() == 64
    outs = engine.step()                              # "c" takes a's slot in this step
    assert [(o.request_id, o.finish_reason) for o in outs if o.request_id == "a"] == \
        [("a", "abort")]
    assert engine.scheduler.running[-1].request_id == "c"
    assert engine.abort("a") is False and engine.abort("nope") is False
    assert engine.abort("c") is True                  # abort while running, then drain
    while engine.has_unfinished():
        engine.step()
    assert kv.num_free_slots == 2 and engine.num_unfinished == 0


def test_abort_a_waiting_request(tiny):
    engine = LLMEngine(tiny, None, 1, 8, 64)
    engine.add_request(1, [5, 6, 7], _greedy(3))
    engine.add_request(2, [8, 9], _greedy(3))
    engine.step()
    assert engine.abort(2)
    outs = replay_by_steps(engine, [])
    assert outs[(2, 0)]["finish_reason"] == "abort" and outs[(2, 0)]["token_ids"] == []
    assert outs[(1, 0)]["finish_reason"] == "length"


# ---- bad arguments ------------------------------------------------------------------------------
def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        LLMEngine(tiny, None, max_num_seqs=0)
    with pytest.raises(TypeError, match="max_num_seqs must be an int"):
        LLMEngine(tiny, None, max_num_seqs=2.5)
    with pytest.raises(TypeError, match="max_num_batched_tokens must be an int"):
        LLMEngine(tiny, None, max_num_batched_tokens=True)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(4\) must be >= "
                                         r"max_num_seqs \(8\)"):
        LLMEngine(tiny, None, max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="max_model_len must be in"):
        LLMEngine(tiny, None, max_model_len=10_000)
    with pytest.raises(ValueError, match="unknown backend"):
        SlotBackend("cuda")
    e = LLMEngine(tiny, None, 2, 16, max_model_len=16)
    with pytest.raises(TypeError, match="needs a tokenizer"):
        e.add_request(0, "hello")
    with pytest.raises(TypeError, match="list of token ids"):
        e.add_request(0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 300\)"):
        e.add_request(0, [1, 300])
    with pytest.raises(ValueError, match="empty prompt"):
        e.add_request(0, [])
    with pytest.raises(ValueError, match="max_model_len is 16"):
        e.add_request(0, [1] * 16)
    with pytest.raises(ValueError, match="context"):
        e.add_request(0, [1] * tiny.config.max_position_embeddings)
    with pytest.raises(TypeError, match="SamplingParams"):
        e.add_request(0, [1], {"max_tokens": 3})
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        e.add_request(0, [1], SamplingParams(stop=["x"]))
    e.add_request(0, [1, 2], _greedy(2))
    with pytest.raises(ValueError, match="already running"):
        e.add_request(0, [3], _greedy(2))
    with pytest.raises(ValueError, match="one sample per request"):
        StaticBatcher(tiny).add_request(0, [1], SamplingParams(n=2))
    with pytest.raises(ValueError, match="max_batch_size"):
        StaticBatcher(tiny, max_batch_size=0)
    seq = e.scheduler.waiting[0]
    with pytest.raises(RuntimeError, match="cannot go from waiting to waiting"):
        seq.preempt()
    with pytest.raises(ValueError, match="finish reason"):
        seq.finish("done")


def test_llm_generate_runs_on_the_engine(tiny):
    from tinyserve import LLM
    llm = LLM.from_model(tiny, None, max_batch_size=2, max_num_batched_tokens=8)
    reqs = _requests(tiny.config.vocab_size, 5, seed=3)
    outs = llm.generate([p for p, _ in reqs], [_greedy(n) for _, n in reqs], use_tqdm=False)
    for (p, n), o in zip(reqs, outs):
        assert o.outputs[0].token_ids == generate_ids(tiny, [p], n, ignore_eos=True)[0]
        m = o.metrics
        assert (m["prompt_tokens"], m["output_tokens"]) == (len(p), n)
        assert 0 <= m["queue_s"] <= m["ttft_s"] <= m["e2e_s"]
    # two slots: the fifth request waits for a free one
    assert outs[0].metrics["first_scheduled_step"] == 0 < outs[4].metrics["first_scheduled_step"]
    two = llm.generate([reqs[0][0]], SamplingParams(temperature=1.0, max_tokens=4, n=2, seed=5,
                                                    ignore_eos=True), use_tqdm=False)[0]
    assert two.metrics["output_tokens"] == 8 and len(two.outputs) == 2
    assert llm.generate([], _greedy(2)) == []


def test_llm_refuses_a_budget_below_the_batch(tiny):
    from tinyserve import LLM
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(2\) must be >= "
                                         r"max_batch_size \(4\)"):
        LLM.from_model(tiny, None, max_batch_size=4, max_num_batched_tokens=2)
