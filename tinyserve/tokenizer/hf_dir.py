"""Loading an HF-style tokenizer directory: `tokenizer.json`, plus `tokenizer_config.json`,
`chat_template.jinja` and `generation_config.json` when present."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from tokenizers import Tokenizer as _RustTokenizer

from .errors import TokenizerError


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def load_dir_tokenizer(path: str | os.PathLike) -> tuple[_RustTokenizer, dict]:
    """The backend tokenizer and the `Tokenizer(...)` keyword arguments (special ids, bos/eos
    flags, chat template, extra stop ids) of an HF-style directory."""
    root = Path(path)
    tok_file = root / "tokenizer.json"
    if not tok_file.is_file():
        raise TokenizerError(f"missing tokenizer.json in {root} (looked for {tok_file})")
    try:
        backend = _RustTokenizer.from_file(str(tok_file))
    except Exception as e:   # the library raises a bare Exception for unreadable files
        raise TokenizerError(f"{tok_file}: not a tokenizer the `tokenizers` library can read "
                             f"({e})") from None
    vocab = backend.get_vocab_size(with_added_tokens=True)

    def load_json(name: str) -> dict:
        f = root / name
        if not f.is_file():
            return {}
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:   # JSONDecodeError and UnicodeDecodeError included
            raise TokenizerError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise TokenizerError(f"{f}: must hold a JSON object, got {type(data).__name__}")
        return data

    def check_id(v, what: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
            raise TokenizerError(f"{root / 'generation_config.json'}: {what} must be a token id "
                                 f"in [0, {vocab}), got {v!r}")
        return v

    config = load_json("tokenizer_config.json")
    gen = load_json("generation_config.json")

    def token_id(name: str) -> int | None:
        text = _token_text(config.get(name))
        return backend.token_to_id(text) if text else None

    bos, eos = token_id("bos_token"), token_id("eos_token")
    gen_eos = gen.get("eos_token_id")
    gen_eos = [] if gen_eos is None else gen_eos if isinstance(gen_eos, list) else [gen_eos]
    gen_eos_ids = [check_id(t, "eos_token_id") for t in gen_eos]
    if eos is None and gen_eos_ids:
        eos = gen_eos_ids[0]
    gen_bos = gen.get("bos_token_id")
    if gen_bos is not None:
        gen_bos = check_id(gen_bos, "bos_token_id")
        bos = gen_bos if bos is None else bos

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                   and isinstance(t.get("template"), str) for t in template):
            raise TokenizerError(f"{root / 'tokenizer_config.json'}: a chat_template list "
                                 f"holds objects with a 'name' and a 'template' string")
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    jinja_file = root / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")

    return backend, dict(
        bos_token_id=bos,
        eos_token_id=eos,
        unk_token_id=token_id("unk_token"),
        pad_token_id=token_id("pad_token"),
        add_bos=bool(config.get("add_bos_token", False)),
        add_eos=bool(config.get("add_eos_token", False)),
        chat_template=template,
        extra_stop_ids=gen_eos_ids,
    )
