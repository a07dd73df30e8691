"""Compiling a model's Jinja chat template in a sandbox, with the helpers HF templates expect
(`raise_exception`, `strftime_now`, a prompt-safe `tojson`)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & for HTML, which would corrupt a prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled `jinja2.Template` for `source` (cached: a template is rendered every turn)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Chat templates come with downloaded models, i.e. they are untrusted code: the sandbox stops
    # them from reaching Python internals. trim_blocks/lstrip_blocks are what HF renders with, and
    # templates are written against that whitespace handling, so prompts match byte for byte.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
