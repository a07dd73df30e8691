"""Fault isolation: one request that fails cannot hurt the others or jam the engine.

A request whose sampling raises (its logits processor, an unsampleable distribution) finishes
with finish_reason "error" and the message; its KV blocks are freed; every other request in
the same batch produces exactly the tokens it produces alone, seeded samplers included. A model
step that raises ends that step's requests with "error" and leaves the engine usable. And
``SamplingParams.logits_processors`` is a real feature: it sees the output so far and steers
the tokens, on the engine and on the single-batch ``decode_loop``.
"""
import pytest
import torch
from _fixtures import CharTokenizer, tiny_model

from tinyserve.engine import LLMEngine
from tinyserve.engine.workload import replay_by_steps
from tinyserve.errors import RequestFailed
from tinyserve.generate import decode_loop
from tinyserve.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=1)


def _prompts(vocab, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(L),), generator=g).tolist()
            for L in torch.randint(3, 30, (n,), generator=g)]


def _engine(model, **kw):
    return LLMEngine(model, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                     kv_cache_tokens=256, block_size=8, **kw)


def _run(model, reqs):
    """reqs: [(request_id, prompt, params)] all added before step 0 -> outputs by (id, index)."""
    return replay_by_steps(_engine(model), [(0, rid, p, sp) for rid, p, sp in reqs])


def _raising(after: int):
    def proc(out, logits):
        if len(out) >= after:
            raise RuntimeError(f"processor gave up after {len(out)} tokens")
        return logits
    return proc


def _good_params():
    # greedy, seeded sampling and two seeded samples of one request: all must be unaffected
    return [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.9, top_k=20, seed=7, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=1.1, top_p=0.9, seed=3, n=2, max_tokens=9,
                           ignore_eos=True)]


@pytest.mark.parametrize("bad", [
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                   logits_processors=[_raising(after=3)]),
    # every logit -inf: softmax is NaN and multinomial raises inside the batched draw, after
    # the seeded rows before it may already have drawn (their generators must be rewound)
    SamplingParams(temperature=0.7, seed=1, max_tokens=12, ignore_eos=True,
                   logits_processors=[lambda out, lg: torch.full_like(lg, float("-inf"))]),
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                   logits_processors=[lambda out, lg: lg[:5]]),          # wrong shape
], ids=["raises-after-3", "all-minus-inf", "wrong-shape"])
def test_failing_request_leaves_the_batch_alone(tiny, bad):
    V = tiny.config.vocab_size
    prompts = _prompts(V, 4)
    good = _good_params()
    alone = {rid: _run(tiny, [(rid, prompts[rid], good[rid])]) for rid in range(3)}
    engine = _engine(tiny)
    free0 = engine.kv_cache_manager.num_free_blocks
    # the bad request sits in the middle of the batch, between seeded neighbours
    reqs = [(0, prompts[0], good[0]), (1, prompts[1], good[1]), ("bad", prompts[3], bad),
            (2, prompts[2], good[2])]
    outs = replay_by_steps(engine, [(0, rid, p, sp) for rid, p, sp in reqs])
    b = outs[("bad", 0)]
    assert b["finish_reason"] == "error"
    for rid in range(3):
        for k in range(good[rid].n):
            assert outs[(rid, k)]["token_ids"] == alone[rid][(rid, k)]["token_ids"], (rid, k)
            assert outs[(rid, k)]["finish_reason"] == "length"
    assert not engine.has_unfinished() and engine.kv_cache_manager.num_free_blocks == free0
    assert engine.scheduler.running == [] and not engine.scheduler.waiting


def test_error_message_and_partial_output(tiny):
    """The error names what raised; the tokens produced before it are kept."""
    V = tiny.config.vocab_size
    engine = _engine(tiny)
    engine.add_request("x", _prompts(V, 1)[0], SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, logits_processors=[_raising(after=3)]))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.finish_reason for o in outs] == [None, None, None, "error"]
    assert sum(len(o.token_ids) for o in outs) == 3
    assert "RuntimeError: processor gave up after 3 tokens" in outs[-1].error
    assert outs[-1].metrics is not None and outs[-1].metrics.output_tokens == 3


def test_model_step_failure_ends_that_steps_requests_and_engine_goes_on(tiny, monkeypatch):
    V = tiny.config.vocab_size
    prompts = _prompts(V, 6, seed=5)
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine = _engine(tiny)
    free0 = engine.kv_cache_manager.num_free_blocks
    for i in range(3):
        engine.add_request(i, prompts[i], sp)
    first = engine.step()                                   # prefill of all three
    assert [o.finish_reason for o in first] == [None] * 3

    def boom(*args, **kwargs):          # the runner's one forward fails (a device fault)
        raise RuntimeError("injected device fault")
    monkeypatch.setattr(tiny, "forward", boom)
    failed = engine.step()
    assert sorted(o.request_id for o in failed) == [0, 1, 2]
    assert all(o.finish_reason == "error" and "injected device fault" in o.error for o in failed)
    assert not engine.has_unfinished() and engine.kv_cache_manager.num_free_blocks == free0
    # usable again: new requests (one sharing a prompt, so the prefix cache is involved) come
    # out exactly as on a fresh engine
    monkeypatch.undo()
    later = [(10 + i, prompts[i], sp) for i in (0, 3, 4, 5)]
    outs = replay_by_steps(engine, [(0, rid, p, s) for rid, p, s in later])
    fresh = _run(tiny, later)
    assert {k: v["token_ids"] for k, v in outs.items()} == \
        {k: v["token_ids"] for k, v in fresh.items()}


def test_logits_processor_steers_engine_and_decode_loop(tiny):
    """A processor that bans the greedy token changes the output; it sees the output so far."""
    V = tiny.config.vocab_size
    prompt = _prompts(V, 1, seed=9)[0]
    plain = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    base = _run(tiny, [(0, prompt, plain)])[(0, 0)]["token_ids"]
    banned, seen = base[0], []

    def ban(out, logits):
        seen.append(list(out))
        logits = logits.clone()
        logits[banned] = float("-inf")
        return logits
    steered = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                             logits_processors=[ban])
    got = _run(tiny, [(0, prompt, steered)])[(0, 0)]["token_ids"]
    assert banned not in got and got != base
    assert seen == [got[:i] for i in range(10)]             # the output so far, every step
    loop = [u.token_id for ups in decode_loop(tiny, [prompt], [steered]) for u in ups]
    assert loop == got


def test_logits_processors_validated():
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=[1])
    with pytest.raises(ValueError, match="logits_processors"):
        SamplingParams(logits_processors=print)
    assert SamplingParams(logits_processors=None).logits_processors == []


def test_request_failed_is_raised_by_stream(tiny):
    from tinyserve.llm import LLM

    llm = LLM.from_model(tiny, CharTokenizer(), max_batch_size=2, max_num_batched_tokens=64)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                        logits_processors=[_raising(after=2)])
    with pytest.raises(RequestFailed, match="processor gave up after 2 tokens"):
        list(llm.stream("abc", sp))
    out = llm.generate(["abc", "abd"], [sp, SamplingParams(temperature=0.0, max_tokens=6,
                                                           ignore_eos=True)], use_tqdm=False)
    assert out[0].outputs[0].finish_reason == "error" and "gave up" in out[0].outputs[0].error
    assert out[1].outputs[0].finish_reason == "length" and len(out[1].outputs[0].token_ids) == 6
