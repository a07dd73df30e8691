"""From checked arguments to what a command runs: the model name (checked without loading
anything), the ``LLM`` with its EngineConfig, and the SamplingParams.

Their constructors' ValueErrors become UsageErrors, so a bad combination prints one line.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..weights import registry
from .exits import Failure, UsageError


def check_model_name(name: str) -> None:
    """Reject a model that is neither an existing path nor a registered name, without
    loading (or downloading) anything."""
    p = Path(name)
    if p.exists():
        return
    try:
        registry.resolve(name)
        return
    except ValueError:
        pass
    if os.sep in name or name.endswith(".gguf"):
        raise UsageError(f"model file or directory not found: {name}")
    raise UsageError(f"unknown model {name!r}: not a file or directory, and not one of the "
                     f"named models ({', '.join(registry.known_names())})")


def _dtype_arg(dtype: str):
    return None if dtype in (None, "auto") else dtype


def load_llm(model: str, device: str = "auto", dtype: str | None = None, config=None,
             threads: int | None = None):
    """Build the ``LLM`` (``config``: its EngineConfig, None = LLM's defaults; ``threads``:
    None = LLM's default). Tests replace this function to reuse one loaded model."""
    from ..llm import LLM  # lazy: imports torch, so --help and bad arguments stay instant
    return LLM(model, device=device, dtype=_dtype_arg(dtype), config=config, threads=threads)


def _engine_config(args):
    """The EngineConfig of the engine flags (None for a command without them), checked
    before anything is loaded."""
    if not hasattr(args, "_engine_flags"):
        return None
    from ..engine.config import EngineConfig  # lazy: the engine package imports torch
    try:
        return EngineConfig.from_args(args)
    except ValueError as e:   # e.g. --max-num-batched-tokens below --max-num-seqs
        raise UsageError(str(e)) from None


def llm_from_args(args):
    """The ``LLM`` of ``--model``, ``--device``, ``--dtype``, ``--threads`` and the engine
    flags."""
    check_model_name(args.model)
    config = _engine_config(args)
    try:
        return load_llm(args.model, args.device, args.dtype, config=config,
                        threads=getattr(args, "threads", None))
    except (ValueError, FileNotFoundError, registry.ModelFetchError, ImportError) as e:
        if getattr(args, "debug", False):
            raise                     # --debug: the traceback, not the one line
        if isinstance(e, (ValueError, FileNotFoundError)):   # bad device, file or model
            raise UsageError(str(e)) from None
        raise Failure(str(e)) from None   # no network, `gguf` missing, ...


def sampling_params_from_args(args):
    """The SamplingParams of the sampling flags."""
    from ..sampling import SamplingParams  # lazy: imports torch
    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_tokens, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
