"""``EngineConfig``: every option of the serving engine, in one place, validated once.

    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, kv_cache_tokens=4096)
    engine = LLMEngine(model, tokenizer, config=config)
    llm = LLM.from_model(model, tokenizer, config=config)   # its cap on sequences per call

Checks that need only the numbers run at construction (a wrong type or range names the
option); the ones that need the model (its context, its KV bytes per token) run in
``resolve``, which the engine calls once. ``dataclasses.replace`` re-validates.
"""
from __future__ import annotations

import re
from dataclasses import InitVar, dataclass, replace

# the flags live where the CLI can import them without torch
from ..args import ENGINE_FLAGS
from ..errors import InvalidParameter, ParameterTypeError, positive_int
from .kv_cache_manager import blocks_for_budget

KV_KINDS = ("paged", "slots")
DEFAULT_BLOCK_SIZE = 16


class _Unset:
    def __repr__(self):
        return "<default>"


UNSET = _Unset()   # an option not given: each default is written once, in EngineConfig


def given(**options) -> dict:
    """The options that were given (not ``UNSET``)."""
    return {k: v for k, v in options.items() if v is not UNSET}


def check_budgets(max_num_seqs: int, max_num_batched_tokens: int,
                  seqs_name: str = "max_num_seqs"):
    """What a schedule needs of its two budgets (``seqs_name``: what the caller calls the
    sequence limit, e.g. LLM's ``max_batch_size``, so the error names the caller's argument)."""
    positive_int(seqs_name, max_num_seqs)
    positive_int("max_num_batched_tokens", max_num_batched_tokens)
    if max_num_batched_tokens < max_num_seqs:
        raise InvalidParameter(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                         f"{seqs_name} ({max_num_seqs}): every running sequence decodes "
                         f"one token per step")


@dataclass(frozen=True)
class EngineConfig:
    """``max_num_seqs`` sequences run at once, each step feeds at most
    ``max_num_batched_tokens`` tokens, a sequence holds at most ``max_model_len`` tokens
    (prompt + output; None: the model's context).

    ``kv``: "paged" (PagedAttention's blocks of ``block_size`` tokens, default 16; prefix
    caching unless ``enable_prefix_caching=False``; a budget of ``kv_cache_tokens`` token
    slots or ``kv_cache_bytes`` bytes, default: max_num_seqs full-length sequences, so nobody
    is ever preempted) or "slots" (one contiguous max_model_len slot per sequence)."""
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    kv: str = "paged"
    block_size: int | None = None
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    enable_prefix_caching: bool = True
    seqs_name: InitVar[str] = "max_num_seqs"   # how errors name max_num_seqs (LLM: max_batch_size)

    def __post_init__(self, seqs_name):
        check_budgets(self.max_num_seqs, self.max_num_batched_tokens, seqs_name)
        if self.max_model_len is not None:
            positive_int("max_model_len", self.max_model_len)
        if self.kv not in KV_KINDS:
            raise InvalidParameter(f"kv must be 'paged' or 'slots', got {self.kv!r}")
        for name in ("block_size", "kv_cache_tokens", "kv_cache_bytes"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if not isinstance(self.enable_prefix_caching, bool):
            raise ParameterTypeError(f"enable_prefix_caching must be a bool, got "
                            f"{type(self.enable_prefix_caching).__name__}")
        if self.kv_cache_tokens is not None and self.kv_cache_bytes is not None:
            raise InvalidParameter("give the KV budget as kv_cache_tokens or kv_cache_bytes, "
                                   "not both")
        if self.kv == "slots" and self.paged_options_given:
            raise InvalidParameter("block_size, kv_cache_tokens, kv_cache_bytes and "
                             "enable_prefix_caching are options of kv='paged', not of "
                             "kv='slots'")

    @property
    def paged_options_given(self) -> bool:
        return (self.block_size is not None or self.kv_cache_tokens is not None
                or self.kv_cache_bytes is not None or not self.enable_prefix_caching)

    def resolve(self, model_config, dtype) -> "EngineConfig":
        """The same options made concrete for one model: max_model_len (checked against the
        context), the block size, and a byte budget turned into whole blocks of token slots."""
        ctx = model_config.max_position_embeddings
        mml = ctx if self.max_model_len is None else self.max_model_len
        if not 2 <= mml <= ctx:
            raise InvalidParameter(f"max_model_len must be in [2, {ctx}] (the model's context), "
                             f"got {mml}")
        if self.kv == "slots":
            return replace(self, max_model_len=mml)
        bs = DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size
        if bs > ctx:   # a block longer than any sequence can be only wastes memory
            raise InvalidParameter(f"block_size ({bs}) must not exceed the model's context "
                                   f"({ctx} tokens)")
        tokens = self.kv_cache_tokens
        if self.kv_cache_bytes is not None:
            tokens = bs * blocks_for_budget(model_config, bs, dtype, nbytes=self.kv_cache_bytes)
        return replace(self, max_model_len=mml, block_size=bs, kv_cache_tokens=tokens,
                       kv_cache_bytes=None)

    # ---- the command line: one declaration of the engine's flags for the CLI and the bench ----
    @classmethod
    def from_args(cls, args, **defaults) -> "EngineConfig":
        """The config of flags declared by ``add_engine_args``; ``defaults``: values for the
        options not given on the command line (e.g. a suite's per-device ones). An error
        names the flags as the parser spells them ("--max-batch (8)", not "max_num_seqs")."""
        given = {f: getattr(args, f) for f in ENGINE_FLAGS if getattr(args, f, None) is not None}
        try:
            return cls(**{**defaults, **given})
        except (TypeError, ValueError) as e:
            msg = str(e)
            for field, flag in getattr(args, "_engine_flags", {}).items():
                if field != "kv":     # "options of kv='paged'" reads better as it is
                    msg = re.sub(rf"\b{field}\b", flag, msg)
            raise InvalidParameter(msg) from None
