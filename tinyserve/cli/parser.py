"""The ``tinyserve`` argument parser: its subcommands, their flags, and the argument types.

Every value is checked here, before anything heavy is imported, and a bad one raises
UsageError (one ``error: ...`` line) instead of argparse's usage text and ``sys.exit(2)``.
"""
from __future__ import annotations

import argparse

from .. import __version__
from ..args import add_engine_args, positive_int
from ..threads import default_threads
from .chat import cmd_chat
from .exits import UsageError
from .generate import cmd_generate
from .info import cmd_info

LLM_BATCHED_TOKENS = 2048   # LLM's own default (EngineConfig's is 512): same engine as LLM()
DTYPE_CHOICES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and call sys.exit(2)
        raise UsageError(message)


# ---- argument types (checked before anything heavy is imported) --------------------------
def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _temperature(s: str) -> float:
    v = _float(s)
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def _top_p(s: str) -> float:
    v = _float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def _top_k(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < -1:
        raise argparse.ArgumentTypeError(f"must be -1 or 0 (disabled) or >= 1, got {v}")
    return v


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _add_model_args(p, positional: bool = False):
    if positional:
        p.add_argument("model", help="a named model (e.g. smollm2), a .gguf file or an HF "
                                     "directory")
    else:
        p.add_argument("--model", "-m", default="smollm2",
                       help="a named model, a .gguf file or an HF directory (default: smollm2)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights and activations (default: bf16 on CUDA; on the CPU a GGUF "
                        "file runs natively, int4/int8 kernels with bf16 activations, and "
                        "anything else in fp32)")
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback instead of one line")
    # None: LLM's default_threads(), resolved there (the help shows what it is here and now)
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help=f"torch CPU threads (default: OMP_NUM_THREADS if set, else the cores "
                        f"this process may run on: {default_threads()} here)")


def _add_sampling_args(p, max_tokens: int):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=positive_int, default=max_tokens,
                   help=f"most new tokens per reply (default: {max_tokens})")
    g.add_argument("--temperature", "-t", type=_temperature, default=0.7,
                   help="0 = greedy (default: 0.7)")
    g.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus mass in (0, 1] (default: 1)")
    g.add_argument("--top-k", type=_top_k, default=-1, help="-1 = off (default)")
    g.add_argument("--seed", type=_int, default=None, help="for reproducible sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tinyserve", description="Run a small LLM with tinyserve.")
    parser.add_argument("--version", action="version", version=f"tinyserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("generate", help="complete one prompt, streaming to stdout",
                       description="Complete PROMPT, streaming the text to stdout; "
                                   "statistics go to stderr.")
    p.add_argument("prompt", help="the prompt text")
    _add_model_args(p)
    _add_sampling_args(p, max_tokens=128)
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as one user message through the model's chat template")
    add_engine_args(p, max_num_batched_tokens=LLM_BATCHED_TOKENS)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (/reset clears history, /exit quits)",
                       description="A chat REPL. /reset clears the history, /exit or EOF "
                                   "(Ctrl-D) quits, Ctrl-C stops the current reply.")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    _add_sampling_args(p, max_tokens=512)
    add_engine_args(p, max_num_batched_tokens=LLM_BATCHED_TOKENS)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="config, parameter count and memory footprint of a model",
                       description="Print a model's config, parameter count, weight bytes per "
                                   "dtype, on-disk size and KV-cache bytes per token.")
    _add_model_args(p, positional=True)
    p.set_defaults(func=cmd_info)
    return parser
