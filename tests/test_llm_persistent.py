"""``LLM`` keeps one engine across calls: the prefix cache outlives a call, the engine grows
when a call needs more, and a call or stream cut short frees its memory and cannot leak
outputs into the next call. Every output still equals generating that request alone."""
import pytest
import torch
from _fixtures import CharTokenizer, tiny_model

from tinyserve.errors import RequestFailed
from tinyserve.generate import generate_ids
from tinyserve.llm import LLM
from tinyserve.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=3)


def _greedy(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def _alone(model, prompt, n):
    return generate_ids(model, [prompt], max_new_tokens=n, ignore_eos=True)[0]


def _ids(vocab, n, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefix_cache_survives_across_calls(tiny):
    V = tiny.config.vocab_size
    system = _ids(V, 40, seed=1)                 # a shared "system prompt": 10 blocks of 4
    q1, q2 = system + _ids(V, 7, seed=2), system + _ids(V, 5, seed=3)
    llm = LLM.from_model(tiny, None, max_batch_size=4, block_size=4)
    a = llm.generate([q1], _greedy(6), use_tqdm=False)[0]
    engine = llm.engine
    b = llm.generate([q2], _greedy(6), use_tqdm=False)[0]
    assert llm.engine is engine                   # same engine, so the same prefix cache
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 40
    assert b.metrics["cached_tokens"] == 40
    assert a.outputs[0].token_ids == _alone(tiny, q1, 6)
    assert b.outputs[0].token_ids == _alone(tiny, q2, 6)
    # the same prompt again: everything but the last block boundary's remainder is cached
    c = llm.generate([q1], _greedy(6), use_tqdm=False)[0]
    assert c.num_cached_tokens == 44 and c.outputs[0].token_ids == a.outputs[0].token_ids


def test_engine_grows_only_when_a_call_needs_more(tiny):
    V = tiny.config.vocab_size
    llm = LLM.from_model(tiny, None, max_batch_size=4, block_size=4)
    p = [_ids(V, 10, seed=s) for s in range(6)]
    llm.generate(p[:1], _greedy(4), use_tqdm=False)
    first = llm.engine
    assert (first.scheduler.max_num_seqs, first.max_model_len) == (1, 14)
    outs = llm.generate(p[:3], _greedy(20), use_tqdm=False)        # more and longer
    grown = llm.engine
    assert grown is not first and (grown.scheduler.max_num_seqs, grown.max_model_len) == (3, 30)
    llm.generate(p[3:5], _greedy(4), use_tqdm=False)                # fits: kept
    assert llm.engine is grown
    for q, o in zip(p[:3], outs):
        assert o.outputs[0].token_ids == _alone(tiny, q, 20)


def test_stream_closed_early_frees_memory_and_the_next_call_is_clean(tiny):
    llm = LLM.from_model(tiny, CharTokenizer(), max_batch_size=2, block_size=4)
    sp = _greedy(12)
    full = "".join(llm.stream("abcdefg", sp))
    engine = llm.engine
    total = engine.kv_cache_manager.num_free_blocks
    stream = llm.stream("abcdefg", sp)
    assert next(stream) == full[0]
    stream.close()                                             # the reader walks away
    assert engine.unfinished_ids == []
    assert engine.kv_cache_manager.used_tokens() == 0 and engine.kv_cache_manager.num_free_blocks == total
    # a stream left half-read is aborted by the next call, which is not disturbed by it...
    stream = llm.stream("abcdefg", sp)
    assert next(stream) == full[0]
    out = llm.generate(["hijk"], sp, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == _alone(tiny, CharTokenizer().encode("hijk"), 12)
    # ...and the stream says so instead of ending as if it were complete
    with pytest.raises(RequestFailed, match="stream aborted"):
        list(stream)
    assert engine.kv_cache_manager.used_tokens() == 0
