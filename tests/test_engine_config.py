"""EngineConfig: one place for the engine's options, checked once, taken by the engine and
by LLM alike (and the same errors whichever way the options arrive)."""
from dataclasses import replace

import pytest
from _fixtures import tiny_model

from tinyserve import EngineConfig, SamplingParams
from tinyserve.engine import LLMEngine
from tinyserve.llm import LLM


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=2)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(max_num_seqs=0), ValueError, "max_num_seqs must be >= 1"),
    (dict(max_num_seqs=2.5), TypeError, "max_num_seqs must be an int"),
    (dict(max_num_batched_tokens=True), TypeError, "max_num_batched_tokens must be an int"),
    (dict(max_num_seqs=8, max_num_batched_tokens=4), ValueError,
     r"max_num_batched_tokens \(4\) must be >= max_num_seqs \(8\)"),
    (dict(max_model_len=0), ValueError, "max_model_len must be >= 1"),
    (dict(kv="pages"), ValueError, "kv must be 'paged' or 'slots'"),
    (dict(block_size=2.0), TypeError, "block_size must be an int"),
    (dict(kv_cache_tokens=-5), ValueError, "kv_cache_tokens must be >= 1"),
    (dict(kv_cache_tokens=64, kv_cache_bytes=10 ** 6), ValueError, "not both"),
    (dict(kv="slots", kv_cache_bytes=10 ** 6), ValueError, "options of kv='paged'"),
    (dict(enable_prefix_caching="yes"), TypeError, "enable_prefix_caching must be a bool"),
])
def test_bad_options_are_refused_at_construction(kw, err, msg):
    with pytest.raises(err, match=msg):
        EngineConfig(**kw)
    ok = EngineConfig()
    with pytest.raises(err, match=msg):          # replace() checks again
        replace(ok, **kw)


def test_resolve_against_the_model(tiny):
    ctx = tiny.config.max_position_embeddings
    r = EngineConfig(max_num_seqs=2, max_num_batched_tokens=8).resolve(tiny.config, tiny.dtype)
    assert (r.max_model_len, r.block_size, r.kv_cache_tokens) == (ctx, 16, None)
    per_token = tiny.config.kv_bytes_per_token(4)
    r = EngineConfig(kv_cache_bytes=per_token * 100, block_size=8).resolve(tiny.config,
                                                                            tiny.dtype)
    assert (r.kv_cache_tokens, r.kv_cache_bytes) == (96, None)     # whole blocks of 8
    with pytest.raises(ValueError, match=rf"max_model_len must be in \[2, {ctx}\]"):
        EngineConfig(max_model_len=ctx + 1).resolve(tiny.config, tiny.dtype)


def test_engine_and_llm_take_a_config(tiny):
    cfg = EngineConfig(max_num_seqs=3, max_num_batched_tokens=24, max_model_len=40,
                       block_size=8, kv_cache_tokens=128)
    e = LLMEngine(tiny, None, config=cfg)
    assert (e.scheduler.max_num_seqs, e.max_model_len, e.kv_cache_manager.num_blocks) == (3, 40, 16)
    assert e.config.block_size == 8
    with pytest.raises(ValueError, match="not both"):
        LLMEngine(tiny, None, max_num_seqs=3, config=cfg)
    llm = LLM.from_model(tiny, None, config=cfg)
    assert llm.max_batch_size == 3 and llm.config.kv_cache_tokens == 128
    with pytest.raises(ValueError, match="not both"):
        LLM.from_model(tiny, None, max_batch_size=4, config=cfg)
    with pytest.raises(TypeError, match="config must be an EngineConfig"):
        LLM.from_model(tiny, None, config={"max_num_seqs": 3})
    # LLM names its own argument in the budget error
    with pytest.raises(ValueError, match=r"must be >= max_batch_size \(4\)"):
        LLM.from_model(tiny, None, max_batch_size=4, max_num_batched_tokens=2)
    # a configured max_model_len caps every call
    with pytest.raises(ValueError, match=r"exceeds the configured max_model_len \(40\)"):
        llm.generate([[1] * 30], SamplingParams(max_tokens=20),
                     use_tqdm=False)


# ---- the shared command-line flags (the CLI and the bench suites declare them this way) ---------
def _parse(argv, *names, flags=None, **defaults):
    import argparse

    from tinyserve.args import add_engine_args
    p = argparse.ArgumentParser()
    add_engine_args(p, *names, flags=flags, **defaults)
    return p.parse_args(argv)


def test_from_args_builds_the_config():
    from tinyserve.args import ENGINE_FLAGS
    from tinyserve.engine.config import KV_KINDS
    assert set(ENGINE_FLAGS) == set(EngineConfig.__dataclass_fields__) - {"seqs_name"}
    assert ENGINE_FLAGS["kv"][1]["choices"] == KV_KINDS
    assert EngineConfig.from_args(_parse([])) == EngineConfig()     # nothing given: defaults
    args = _parse(["--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--block-size", "8",
                   "--kv-cache-tokens", "256", "--max-model-len", "100", "--no-prefix-caching"])
    assert EngineConfig.from_args(args) == EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=64, block_size=8, kv_cache_tokens=256,
        max_model_len=100, enable_prefix_caching=False)
    # a caller's defaults fill only what the command line left out
    assert EngineConfig.from_args(_parse(["--max-num-seqs", "3"]), max_num_seqs=9,
                                  kv="slots") == EngineConfig(max_num_seqs=3, kv="slots")
    # a parser default (shown in --help) counts as given
    assert EngineConfig.from_args(_parse([], block_size=32)).block_size == 32


@pytest.mark.parametrize("argv", [["--max-num-seqs", "0"], ["--block-size", "2.5"],
                                  ["--kv", "pages"], ["--kv-cache-bytes", "-1"]])
def test_bad_flag_values_fail_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit):
        _parse(argv)
    assert argv[0] in capsys.readouterr().err


def test_from_args_errors_name_the_flags():
    args = _parse(["--max-num-seqs", "8", "--max-num-batched-tokens", "4"])
    with pytest.raises(ValueError, match=r"--max-num-batched-tokens \(4\) must be >= "
                                         r"--max-num-seqs \(8\)"):
        EngineConfig.from_args(args)
    # a caller's own spelling of a flag is the one errors name; the canonical one still works
    flags = {"max_num_seqs": "--max-batch"}
    for spelling in ("--max-batch", "--max-num-seqs"):
        args = _parse([spelling, "8"], "max_num_seqs", "max_num_batched_tokens", flags=flags)
        with pytest.raises(ValueError, match=r"must be >= --max-batch \(8\)"):
            EngineConfig.from_args(args, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="--block-size, --kv-cache-tokens.* are options of "
                                         "kv='paged'"):
        EngineConfig.from_args(_parse(["--kv", "slots", "--block-size", "8"]))
