"""argparse pieces shared by the ``tinyserve`` CLI and the benchmarks, importable without torch
(so ``--help`` and bad arguments stay instant): integer types, and the engine's flags.

    add_engine_args(parser)                 # --max-num-seqs, --block-size, ... (one group)
    config = EngineConfig.from_args(args)   # validated once, errors name the flags
"""
from __future__ import annotations

import argparse


def _int_at_least(s: str, low: int) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
    return v


def positive_int(s: str) -> int:
    return _int_at_least(s, 1)


def nonnegative_int(s: str) -> int:
    return _int_at_least(s, 0)


# EngineConfig field -> (canonical flag, argparse keywords, help); vLLM's spelling where it has
# one. Bad values of one flag fail at parse time; EngineConfig checks the combinations.
ENGINE_FLAGS = {
    "max_num_seqs": ("--max-num-seqs", {}, "most sequences running at once"),
    "max_num_batched_tokens": ("--max-num-batched-tokens", {}, "most tokens fed per step "
                               "(longer prompts are chunked)"),
    "max_model_len": ("--max-model-len", {}, "most tokens per sequence, prompt + output "
                      "(default: the model's context)"),
    "kv": ("--kv", {"choices": ("paged", "slots")},        # = engine.config.KV_KINDS
           "KV store: paged blocks, or one contiguous slot per sequence"),
    "block_size": ("--block-size", {}, "tokens per KV block (paged)"),
    "kv_cache_tokens": ("--kv-cache-tokens", {}, "KV budget in token slots (paged)"),
    "kv_cache_bytes": ("--kv-cache-bytes", {}, "KV budget in bytes, whole blocks (paged)"),
    "enable_prefix_caching": ("--no-prefix-caching", {"action": "store_const", "const": False},
                              "do not reuse the KV blocks of a shared prompt prefix"),
}


def add_engine_args(parser, *names: str, flags: dict | None = None, **defaults):
    """Declare the engine's flags (``names``: some of ``ENGINE_FLAGS``, default all) as one
    group of ``parser``; ``EngineConfig.from_args(args)`` builds the config. A flag not given
    is None, so EngineConfig's default applies, unless ``defaults`` sets one (shown in --help).
    ``flags``: a caller's own spelling ({"max_num_seqs": "--max-batch"}), kept first (errors
    name it) with the canonical flag as an alias. -> the argument group."""
    group = parser.add_argument_group("engine (tinyserve.EngineConfig)")
    spelled = {}
    for name in names or ENGINE_FLAGS:
        canonical, kw, help_ = ENGINE_FLAGS[name]
        opts = [f for f in ((flags or {}).get(name), canonical) if f]
        spelled[name] = opts[0]
        kw = kw or {"type": positive_int, "metavar": "N"}
        if name in defaults:
            help_ += f" (default: {defaults[name]})"
        group.add_argument(*opts, dest=name, default=defaults.get(name), help=help_, **kw)
    parser.set_defaults(_engine_flags=spelled)
    return group
