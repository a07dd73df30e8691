"""The ``tinyserve`` command line: generate, chat and info.

    tinyserve generate "The capital of France is" --max-tokens 32 --temperature 0
    tinyserve generate "What is the capital of France?" --chat
    tinyserve chat --system "You are a terse assistant."
    tinyserve info smollm2

``generate`` streams the completion to stdout and prints one line of statistics to stderr, so
``tinyserve generate ... > out.txt`` keeps only the text. Bad arguments print one
``error: ...`` line to stderr and exit with status 2; any of the package's own errors (a bad
file, option or input: ``tinyserve.errors``) prints one line too, and ``--debug`` shows its
traceback instead.

Heavy imports (torch, the model) happen after the arguments are checked, so ``--help`` and
argument errors are instant.

Modules: ``parser`` (subcommands, flags, argument types), ``loading`` (model name check,
``LLM``, EngineConfig and SamplingParams from the arguments), one per command (``generate``,
``chat``, ``info``), ``exits`` (exit statuses and the CLI's two errors); ``main`` is here.
"""
from __future__ import annotations

import os
import sys

from ..errors import InvalidParameter, RequestFailed, TinyserveError
from .exits import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Failure, UsageError
from .parser import build_parser

__all__ = ["main"]


def _check_text(args) -> None:
    """Text from argv that is not valid UTF-8 (Python keeps such bytes as lone surrogates)
    would reach the tokenizer as a str it cannot encode."""
    prompt = getattr(args, "prompt", None)
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError("the prompt is not valid UTF-8 text") from None


def main(argv=None) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        _check_text(args)
        return args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (Failure, RequestFailed) as e:   # RequestFailed: the generation itself raised
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `tinyserve generate ... | head -c 10`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except (TinyserveError, ValueError, OSError) as e:   # a bad file, option or input (after
        #                                                 BrokenPipeError, an OSError too)
        if getattr(args, "debug", False):
            raise
        print(f"error: {e} (--debug shows where)", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, InvalidParameter) else EXIT_FAILURE
