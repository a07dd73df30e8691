"""Compiling a model's Jinja chat template in a sandbox, with the helpers HF templates expect
(`raise_exception`, `strftime_now`, a prompt-safe `tojson`), and rendering it within bounds.

A template is untrusted code that arrives with a model file. jinja's sandbox keeps it away from
Python internals and caps `range` at 100,000 items; on top of that, `render` stops a rendering
whose output passes MAX_CHARS or that runs past MAX_SECONDS (checked as output is produced),
and a `*` or `**` that would build a value larger than MAX_CHARS is refused before it is
computed ('a' * 10**10 used to exhaust memory first).
"""

from __future__ import annotations

import json
from datetime import datetime
import time
from functools import lru_cache

from .errors import TokenizerError

MAX_CHARS = 1_000_000     # a rendered prompt; SmolLM2's whole context is 8k tokens
MAX_SECONDS = 5.0


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & for HTML, which would corrupt a prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _bounded_sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])    # the two that can build huge values

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise TokenizerError(f"chat template: {left!r:.20} ** {right!r:.20} refused "
                                     f"(exponents above 64 are not allowed)")
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                        and len(seq) * n > MAX_CHARS:
                    raise TokenizerError(f"chat template: a value of {len(seq)} x {n} items "
                                         f"refused (the limit is {MAX_CHARS:,})")
            return super().call_binop(context, operator, left, right)
    return BoundedSandbox


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled `jinja2.Template` for `source` (cached: a template is rendered every turn)."""
    import jinja2
    import jinja2.ext

    # Chat templates come with downloaded models, i.e. they are untrusted code: the sandbox stops
    # them from reaching Python internals. trim_blocks/lstrip_blocks are what HF renders with, and
    # templates are written against that whitespace handling, so prompts match byte for byte.
    env = _bounded_sandbox()(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template has a syntax error at line {e.lineno}: "
                             f"{e.message}") from None


def render(source: str, variables: dict) -> str:
    """The template rendered with ``variables``, within MAX_CHARS and MAX_SECONDS; a template
    that fails (its own raise_exception, an undefined operation, a limit) -> TokenizerError."""
    import jinja2

    template = compile_template(source)
    out, size, t0 = [], 0, time.perf_counter()
    try:
        for piece in template.generate(**variables):
            out.append(piece)
            size += len(piece)
            if size > MAX_CHARS:
                raise TokenizerError(f"the chat template's output passed {MAX_CHARS:,} "
                                     f"characters: stopped")
            if time.perf_counter() - t0 > MAX_SECONDS:
                raise TokenizerError(f"the chat template ran longer than {MAX_SECONDS} s: "
                                     f"stopped")
    except (jinja2.TemplateError, OverflowError, MemoryError) as e:
        raise TokenizerError(f"the chat template failed: {type(e).__name__}: {e}") from None
    return "".join(out)
