"""The vLLM-style offline API on the real model: batching, finish reasons, streaming, seeds."""
import pytest

from tinyserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM.from_model(*smollm2, max_batch_size=4)


def test_batch_of_different_lengths_equals_each_prompt_alone(llm):
    prompts = ["Hi", "The history of the Roman empire begins",
               "def quicksort(xs):\n    ", "1, 2, 3, 4, 5,", "Water boils at"]
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)   # 5 rows: batches of 4 and 1
    for p, out in zip(prompts, batched):
        alone = llm.generate(p, GREEDY, use_tqdm=False)[0]
        assert out.prompt == p
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, p


def test_length_and_stop_token_finish_reasons(llm):
    out = llm.generate("Count: one, two,", SamplingParams(temperature=0, max_tokens=5),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert chat.finish_reason == "stop"
    assert chat.token_ids[-1] in llm.tokenizer.stop_token_ids
    assert "Paris" in chat.text and "<|im_end|>" not in chat.text


def test_stop_string_truncates_text(llm):
    free = llm.generate("The capital of France is", GREEDY, use_tqdm=False)[0].outputs[0].text
    word = free.split()[1]                      # a word the greedy continuation will produce
    out = llm.generate("The capital of France is",
                       SamplingParams(temperature=0, max_tokens=12, stop=[word]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert word not in out.text and free.startswith(out.text)


def test_stream_yields_the_same_text_as_generate(llm):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    deltas = list(llm.stream("Emoji test: 🎉🚀 and accents é à ü:", params))
    full = llm.generate("Emoji test: 🎉🚀 and accents é à ü:", params,
                        use_tqdm=False)[0].outputs[0].text
    assert len(deltas) > 1 and "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas)


def test_seed_reproduces_and_n_samples_differ(llm):
    p = SamplingParams(temperature=1.0, max_tokens=10, seed=1234, n=3, ignore_eos=True)
    a = llm.generate("Once upon a time", p, use_tqdm=False)[0]
    b = llm.generate("Once upon a time", p, use_tqdm=False)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    # the same seeded request gives the same tokens wherever it sits in a batch
    single = SamplingParams(temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    alone = llm.generate("Once upon a time", single, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(["Hello there", "Once upon a time"], [GREEDY, single],
                         use_tqdm=False)[1].outputs[0].token_ids
    assert alone == mixed


def test_bad_requests_raise_clear_errors(llm):
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate("", GREEDY)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[]], GREEDY)
    too_long = [1] * llm.model.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        llm.generate([too_long], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate("hi", SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="top_p"):
        llm.generate("hi", SamplingParams(top_p=1.5))
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["hi"], [GREEDY, GREEDY])
    with pytest.raises(ValueError, match="messages"):
        llm.chat([{"content": "no role"}])
