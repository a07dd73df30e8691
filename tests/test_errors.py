"""Bad input gets the package's own clear error (issue 15, first part): the error family,
SamplingParams, prompts and messages at the LLM boundary, and the CLI's one-line errors.

Table-driven: each case is (input, what must happen). Property-based (hypothesis): any
SamplingParams values either construct or raise InvalidParameter, and whatever constructs
generates on a real (tiny) engine without leaking a KV block.
"""
import math
import time

import pytest
import torch

import _fixtures as F
from tinyserve import LLM, SamplingParams
from tinyserve.cli import main
from tinyserve.config import ConfigError
from tinyserve.engine.block_manager import OutOfBlocksError
from tinyserve.errors import InvalidParameter, ParameterTypeError, RequestFailed, TinyserveError
from tinyserve.model import WeightsError
from tinyserve.sampling_params import SAMPLING_EPS, SEED_MAX, SEED_MIN, TOP_K_MAX
from tinyserve.tokenizer.errors import TokenizerError
from tinyserve.weights.cache import ModelFetchError
from tinyserve.weights.gguf_blocks import GGUFError
from tinyserve.weights.safetensors import CheckpointError

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@pytest.mark.parametrize("cls, builtin", [
    (InvalidParameter, ValueError), (ParameterTypeError, TypeError), (ConfigError, ValueError),
    (GGUFError, ValueError), (CheckpointError, ValueError), (WeightsError, ValueError),
    (TokenizerError, ValueError), (ModelFetchError, RuntimeError),
    (OutOfBlocksError, RuntimeError), (RequestFailed, RuntimeError)])
def test_every_error_is_one_family_and_its_builtin(cls, builtin):
    assert issubclass(cls, TinyserveError) and issubclass(cls, builtin)


# ---- SamplingParams ----------------------------------------------------------------------
OK = object()
SAMPLING_CASES = [
    # (kwargs, OK and the normalised fields, or an error class and a message fragment)
    (dict(temperature=1e-38), (OK, dict(temperature=0.0))),
    (dict(temperature=1e-45), (OK, dict(temperature=0.0))),
    (dict(temperature=SAMPLING_EPS / 2), (OK, dict(temperature=0.0))),
    (dict(temperature=SAMPLING_EPS), (OK, dict(temperature=SAMPLING_EPS))),
    (dict(temperature=-1e-45), (InvalidParameter, "temperature")),
    (dict(temperature=math.nan), (InvalidParameter, "temperature")),
    (dict(top_k=2**63), (OK, dict(top_k=TOP_K_MAX))),
    (dict(top_k=10**30), (OK, dict(top_k=TOP_K_MAX))),
    (dict(top_k=TOP_K_MAX), (OK, dict(top_k=TOP_K_MAX))),
    (dict(top_k=0), (OK, dict(top_k=-1))),
    (dict(top_k=-2), (InvalidParameter, "top_k")),
    (dict(top_k=2.5), (InvalidParameter, "top_k")),
    (dict(seed=SEED_MAX), (OK, dict(seed=SEED_MAX))),
    (dict(seed=SEED_MIN), (OK, dict(seed=SEED_MIN))),
    (dict(seed=SEED_MAX + 1), (InvalidParameter, "seed")),
    (dict(seed=SEED_MIN - 1), (InvalidParameter, "seed")),
    (dict(seed="1"), (InvalidParameter, "seed")),
    (dict(seed=True), (InvalidParameter, "seed")),
    (dict(n=0), (InvalidParameter, "n must be")),
    (dict(max_tokens=10**100), (OK, dict(max_tokens=10**100))),   # capped by the context
    (dict(max_tokens=0), (InvalidParameter, "max_tokens")),
    (dict(top_p=0.0), (InvalidParameter, "top_p")),
    (dict(stop=[""]), (InvalidParameter, "stop")),
    (dict(stop_token_ids=[1.5]), (InvalidParameter, "stop_token_ids")),
]


@pytest.mark.parametrize("kwargs, want", SAMPLING_CASES, ids=[str(c[0]) for c in SAMPLING_CASES])
def test_sampling_params_table(kwargs, want):
    kind, detail = want
    if kind is OK:
        p = SamplingParams(**kwargs)
        for k, v in detail.items():
            assert getattr(p, k) == v, k
    else:
        with pytest.raises(kind, match=detail):
            SamplingParams(**kwargs)


# ---- the LLM boundary, on a tiny real model ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    pytest.importorskip("gguf")
    c = F.tiny_config()
    path = F.write_gguf(tmp_path_factory.mktemp("err") / "t.gguf", c, F.random_state(c), "F32")
    return LLM(str(path), device="cpu", dtype=torch.float32, max_batch_size=4)


def _free_blocks_all(llm) -> bool:
    m = llm.engine.kv_cache_manager
    return m.num_free_blocks == m.bm.num_blocks


V = F.tiny_config().vocab_size
PROMPT_CASES = [
    ({"prompt_token_ids": "123"}, ParameterTypeError, "list of ints"),
    ([1.7, 2.2], ParameterTypeError, "token ids must be ints"),
    ([True, 1], ParameterTypeError, "token ids must be ints"),
    ([-1], InvalidParameter, "outside the vocabulary"),
    ([V], InvalidParameter, "outside the vocabulary"),
    ({"prompt_token_ids": [1, 2], "extra": 1}, InvalidParameter, "one key"),
    ({}, InvalidParameter, "one key"),
    ({"prompt": ""}, InvalidParameter, "empty prompt"),
    ("", InvalidParameter, "empty prompt"),
    (3.5, ParameterTypeError, "a prompt is"),
    (None, ParameterTypeError, "a prompt is"),
]


@pytest.mark.parametrize("prompt, err, match", PROMPT_CASES,
                         ids=[repr(c[0])[:30] for c in PROMPT_CASES])
def test_bad_prompts_raise_before_any_work(tiny_llm, prompt, err, match):
    with pytest.raises(err, match=match):
        tiny_llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)


def test_good_prompts_of_every_form_generate(tiny_llm):
    p = SamplingParams(temperature=0, max_tokens=3)
    outs = tiny_llm.generate(["hello", [1, 2, 3], (4, 5), {"prompt": "hi"},
                              {"prompt_token_ids": [6, 7]}], p, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3] * 5
    assert _free_blocks_all(tiny_llm)


@pytest.mark.parametrize("params, match", [({"temperature": 0}, "SamplingParams"),
                                           ("greedy", "SamplingParams"),
                                           ([SamplingParams(), {}], "SamplingParams")])
def test_params_of_the_wrong_type(tiny_llm, params, match):
    with pytest.raises(ParameterTypeError, match=match):
        tiny_llm.generate(["a", "b"], params, use_tqdm=False)


@pytest.mark.parametrize("messages", [[], "hello", [{"role": "user"}], [[]], None])
def test_bad_chat_messages(tiny_llm, messages):
    with pytest.raises(InvalidParameter, match="messages|conversation"):
        tiny_llm.chat(messages, use_tqdm=False)


def test_tiny_temperature_and_huge_top_k_generate_greedily(tiny_llm):
    """The issue's reproductions: they used to kill sampling ("probability tensor contains
    inf/nan", "Overflow when unpacking long long"); now they are greedy / no top-k."""
    greedy = tiny_llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=4),
                               use_tqdm=False)[0].outputs[0].token_ids
    for p in (SamplingParams(temperature=1e-40, max_tokens=4),
              SamplingParams(temperature=1e-38, top_k=2**63, max_tokens=4, seed=SEED_MAX)):
        out = tiny_llm.generate(["hello"], p, use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "length" and out.token_ids == greedy
    assert _free_blocks_all(tiny_llm)


# Values across every type a caller might pass, including the edges of each range.
_ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                 st.lists(st.integers(-3, 3), max_size=3))


@hypothesis.settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(temperature=_ANY, top_p=_ANY, top_k=_ANY, min_p=_ANY, seed=_ANY, n=_ANY,
                  max_tokens=st.one_of(_ANY, st.integers(1, 3)))
def test_any_sampling_params_either_generate_or_raise_our_error(tiny_llm, temperature, top_p,
                                                               top_k, min_p, seed, n,
                                                               max_tokens):
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, n=n,
              max_tokens=max_tokens)
    try:
        p = SamplingParams(**kw)
    except InvalidParameter:
        return
    p.n, p.max_tokens = min(p.n, 3), min(p.max_tokens, 3)    # bounded work per example
    t = time.perf_counter()
    out = tiny_llm.generate([[1, 2, 3]], p, use_tqdm=False)[0]
    assert time.perf_counter() - t < 30
    assert len(out.outputs) == p.n
    assert all(o.finish_reason in ("length", "stop") for o in out.outputs), out.outputs
    assert _free_blocks_all(tiny_llm)


@hypothesis.settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(prompt=st.one_of(_ANY, st.lists(_ANY, max_size=4),
                                   st.dictionaries(st.sampled_from(["prompt", "prompt_token_ids",
                                                                    "x"]), _ANY, max_size=2)))
def test_any_prompt_either_generates_or_raises_our_error(tiny_llm, prompt):
    try:
        out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2,
                                                         ignore_eos=True), use_tqdm=False)[0]
    except InvalidParameter:
        return
    assert len(out.outputs[0].token_ids) == 2
    assert _free_blocks_all(tiny_llm)


# ---- the CLI: one line, --debug for the traceback ------------------------------------------
def test_cli_invalid_utf8_prompt_is_a_usage_error(capsys):
    assert main(["generate", "abc\udcff"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid UTF-8" in err


def test_cli_bad_file_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)   # truncated header
    assert main(["generate", "hi", "--model", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    with pytest.raises(GGUFError):
        main(["generate", "hi", "--model", str(bad), "--device", "cpu", "--debug"])


# ---- model configuration and device ----------------------------------------------------------
_HF = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_L3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
           original_max_position_embeddings=8192)


@pytest.mark.parametrize("over, match", [
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(tie_word_embeddings=1), "tie_word_embeddings must be true or false"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be a positive integer"),
    (dict(max_position_embeddings=-5), "max_position_embeddings must be a positive integer"),
    (dict(rope_scaling={**_L3, "low_freq_factor": 0}), "low_freq_factor must be a positive"),
    (dict(rope_scaling={**_L3, "factor": 0}), "factor must be a positive"),
    (dict(rope_scaling={**_L3, "factor": -1}), "factor must be a positive"),
    (dict(rope_scaling={**_L3, "original_max_position_embeddings": 0}),
     "original_max_position_embeddings must be a positive"),
])
def test_bad_config_values_are_config_errors(over, match):
    from tinyserve.config import ModelConfig
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict({**_HF, **over})


def test_good_config_values_still_load():
    from tinyserve.config import ModelConfig
    c = ModelConfig.from_hf_dict({**_HF, "tie_word_embeddings": True, "rope_scaling": _L3,
                                  "max_position_embeddings": None})
    assert c.tie_word_embeddings and c.max_position_embeddings == 2048 and c.rope_scaling


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:x", 3.5])
def test_unknown_devices(device):
    from tinyserve.loader import resolve_device
    with pytest.raises(InvalidParameter, match="device must be"):
        resolve_device(device)


# ---- tokenizer files -----------------------------------------------------------------------
@pytest.mark.parametrize("name, content, match", [
    ("tokenizer.json", "not json", "tokenizer.json: not a tokenizer"),
    ("tokenizer.json", "{}", "tokenizer.json: not a tokenizer"),
    ("tokenizer_config.json", "[1, 2]", "must hold a JSON object"),
    ("tokenizer_config.json", "{", "tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", '{"chat_template": [{"template": "x"}]}', "'name'"),
    ("generation_config.json", '{"eos_token_id": [1.5]}', "eos_token_id must be a token id"),
    ("generation_config.json", '{"eos_token_id": 1000000000000000000000000000000}',
     "eos_token_id must be a token id"),
    ("generation_config.json", '{"eos_token_id": true}', "eos_token_id must be a token id"),
    ("generation_config.json", '{"bos_token_id": -1}', "bos_token_id must be a token id"),
    ("generation_config.json", "{oops", "generation_config.json: not valid JSON"),
])
def test_bad_tokenizer_files_name_the_file(tmp_path, name, content, match):
    from tinyserve.tokenizer import Tokenizer
    F.write_hf_tokenizer(tmp_path)
    (tmp_path / name).write_text(content)
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_dir(tmp_path)


# ---- numbers inside the weights ------------------------------------------------------------
def test_nan_in_the_weights_fails_the_requests_saying_why(tmp_path):
    """A NaN norm weight made every logit NaN; sampling then died with torch's "probability
    tensor contains inf/nan" (or greedy decoded garbage). Now each request ends with
    finish_reason "error" naming the cause, and the engine frees its blocks."""
    pytest.importorskip("gguf")
    c = F.tiny_config()
    state = F.random_state(c)
    state["norm.weight"][3] = float("nan")
    path = F.write_gguf(tmp_path / "nan.gguf", c, state, "F32")
    llm = LLM(str(path), device="cpu", dtype=torch.float32)
    outs = llm.generate(["hello", [1, 2]], [SamplingParams(temperature=0, max_tokens=3),
                                           SamplingParams(temperature=0.8, max_tokens=3)],
                        use_tqdm=False)
    for o in outs:
        assert o.outputs[0].finish_reason == "error" and "non-finite logits" in o.outputs[0].error
    assert _free_blocks_all(llm)


# ---- resources -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(kv_cache_tokens=10**12), "kv_cache_tokens needs .* GiB, more than"),
    (dict(block_size=10**9), "block_size .* must not exceed the model's context"),
    (dict(kv_cache_tokens=16), "less than one sequence"),
])
def test_absurd_kv_requests_are_refused_before_allocating(tmp_path, kw, match):
    pytest.importorskip("gguf")
    c = F.tiny_config()
    path = F.write_gguf(tmp_path / "t.gguf", c, F.random_state(c), "F32")
    t = time.perf_counter()
    with pytest.raises(InvalidParameter, match=match):
        llm = LLM(str(path), device="cpu", dtype=torch.float32, **kw)
        llm.generate(["hello"], SamplingParams(max_tokens=100), use_tqdm=False)
    assert time.perf_counter() - t < 10       # refused, not attempted


@pytest.mark.parametrize("kw, err", [(dict(max_batch_size=2.5), ParameterTypeError),
                                     (dict(max_batch_size=0), InvalidParameter),
                                     (dict(block_size=True), ParameterTypeError),
                                     (dict(kv="blocks"), InvalidParameter)])
def test_engine_options_are_family_errors(kw, err):
    """Checked before the (slow) load: the model name need not even exist."""
    with pytest.raises(err):
        LLM("no-such-model", **kw)


# ---- chat templates: untrusted code with bounds ---------------------------------------------
@pytest.mark.parametrize("template, match", [
    ("{{ 'a' * 10**10 }}", "refused"),
    ("{{ [1] * 10**9 }}", "refused"),
    ("{{ 2 ** 100000 }}", "exponents above 64"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}xy{% endfor %}{% endfor %}",
     "passed 1,000,000 characters"),
    ("{% if %}", "syntax error at line 1"),
    ("{% for m in messages %}", "syntax error"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ messages.__class__.__mro__ }}", "failed"),            # the sandbox, as before
])
def test_bad_chat_templates_are_tokenizer_errors(template, match):
    from tinyserve.tokenizer import Tokenizer
    tok = Tokenizer(F.bpe_tokenizer())
    t = time.perf_counter()
    with pytest.raises(TokenizerError, match=match):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template)
    assert time.perf_counter() - t < 15


@pytest.mark.parametrize("meta, match", [
    ({"tokenizer.ggml.merges": ["zzzq yyyq"]}, "merges does not fit"),
    ({"tokenizer.ggml.merges": [1, 2]}, "merges must be an array of strings"),
    ({"tokenizer.ggml.merges": ["nospace"]}, "merges must be an array of strings"),
    ({"tokenizer.ggml.token_type": [1]}, "token_type must be an array"),
])
def test_bad_gguf_tokenizer_metadata(tmp_path, meta, match):
    pytest.importorskip("gguf")
    from tinyserve import load_model
    c = F.tiny_config()
    path = F.write_gguf(tmp_path / "t.gguf", c, F.random_state(c), "F32", metadata=meta)
    with pytest.raises(TokenizerError, match=match):
        load_model(str(path), device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("qtype, native", [("F32", False), ("Q4_1", True)])
def test_check_finite_names_the_damaged_tensor_at_load(tmp_path, qtype, native):
    pytest.importorskip("gguf")
    from tinyserve import load_model
    c = F.tiny_config(hidden_size=64, num_heads=2, head_dim=32)   # Q4_1 rows: multiples of 64
    state = F.random_state(c)
    state["layers.1.mlp_norm.weight"][0] = float("inf")
    path = F.write_gguf(tmp_path / "t.gguf", c, state, qtype)
    load_model(str(path), device="cpu", native=native)             # off by default: loads
    with pytest.raises(WeightsError, match=r"NaN or inf in 1 tensor\(s\) \['layers.1.mlp_norm"):
        load_model(str(path), device="cpu", native=native, check_finite=True)
    good = F.write_gguf(tmp_path / "g.gguf", c, F.random_state(c), qtype)
    load_model(str(good), device="cpu", native=native, check_finite=True)


def test_a_folder_named_model_safetensors_is_a_checkpoint_error(tmp_path):
    from tinyserve import load_model
    F.write_hf_dir(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    (tmp_path / "model.safetensors").mkdir()     # used to fail with "OSError: No such device"
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        load_model(str(tmp_path), device="cpu")


def test_reference_attention_lets_a_nan_through_but_zeroes_empty_rows():
    """It used to nan_to_num its probabilities, which also hid NaNs from damaged weights."""
    from tinyserve.ops.attention_common import attention_ref
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    q_pos, kv_len = torch.tensor([[2, 3, 9]]), torch.tensor([4])
    out = attention_ref(q, k, v, q_pos, kv_len)
    assert torch.isfinite(out).all()
    empty = attention_ref(q, k, v, torch.tensor([[2, 3, 4]]), torch.tensor([0]))
    assert torch.equal(empty, torch.zeros_like(empty))       # no allowed key: zeros
    k[0, 1, 1, 0] = float("nan")
    bad = attention_ref(q, k, v, q_pos, kv_len)
    assert bad[0, 1].isnan().all() and torch.isfinite(bad[0, 0]).all()   # only that head
