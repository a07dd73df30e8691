"""Rebuilding a byte-level BPE tokenizer from a GGUF file's metadata.

llama.cpp stores the vocabulary, the BPE merges, the token types and the special ids as
metadata, not as a `tokenizer.json`, so we rebuild the tokenizer from those pieces. Only
byte-level BPE (`tokenizer.ggml.model == "gpt2"`, used by SmolLM2, Llama 3, Qwen 2, ...) is
implemented.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.models import BPE

from .errors import TokenizerError

# llama.cpp's `token_type` values (gguf.TokenType); only these two matter here.
_CONTROL = 3
_USER_DEFINED = 4

# How text is cut into "words" before BPE, keyed by `tokenizer.ggml.pre`. The merges were learned
# on words cut this way, so a different split yields valid-looking but different (worse) ids.
# None means the GPT-2 split that `pre_tokenizers.ByteLevel(use_regex=True)` has built in.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    # SmolLM: see the note in _byte_level_pre_tokenizer.
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table.

    Byte-level BPE works on bytes, but its vocabulary is stored as text, so each byte is spelled
    as a visible unicode character (space becomes 'Ġ', newline 'Ċ', printable ASCII stays itself).
    This is the same table `pre_tokenizers.ByteLevel.alphabet()` uses, written out so the mapping
    from byte value to character is explicit.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre not in _PRE_SPLITS:
        warnings.warn(
            f"unknown tokenizer.ggml.pre {pre!r}; using the GPT-2 split, ids may differ from the "
            "model's own tokenizer",
            # Point at the caller of Tokenizer.from_gguf (-> load_gguf_tokenizer -> here).
            stacklevel=4,
        )
    split = _PRE_SPLITS.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                # The split is done; ByteLevel only has to map bytes to the alphabet.
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    # Note on "smollm": llama.cpp (and, as far as we know, SmolLM's own tokenizer.json) first
    # cut out every digit (\p{N}) on its own and only then apply the GPT-2 split. HF
    # transformers' GGUF converter does not, and we follow transformers, our test oracle. The
    # vocabulary has no multi-digit tokens, so plain numbers agree either way, but the digit
    # split also moves chunk boundaries around digits: "x  1" is "x","ĠĠ","1" with it and
    # "x","Ġ","Ġ","1" without; a space before a non-ASCII numeral ("Ⅻ", "٣") likewise.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    if isinstance(reader, Mapping):   # ``weights.gguf.read_gguf``'s metadata dict
        return reader.get(key, default)
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    # Older gguf: scalar/array values are the parts indexed by `field.data`.
    import gguf

    parts = [field.parts[i] for i in field.data]
    if field.types[-1] == gguf.GGUFValueType.STRING:
        values = [bytes(p).decode("utf-8") for p in parts]
    else:
        values = [p.tolist()[0] for p in parts]
    return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def load_gguf_tokenizer(path_or_reader: str | os.PathLike | Any) -> tuple[_RustTokenizer, dict]:
    """The backend tokenizer and the `Tokenizer(...)` keyword arguments (special ids, bos/eos
    flags, chat template) described by a GGUF file's metadata (a path, the metadata dict of
    `tinyserve.weights.gguf.read_gguf`, or a `gguf.GGUFReader`)."""
    if isinstance(path_or_reader, (str, os.PathLike)):
        path = Path(path_or_reader)
        if not path.is_file():
            raise TokenizerError(f"GGUF file not found: {path}")
        from ..weights.gguf import read_gguf   # lazy: the tokenizer package stands alone
        reader = read_gguf(path).metadata
    else:
        reader = path_or_reader

    def meta(key: str, default: Any = None) -> Any:
        return _gguf_value(reader, f"tokenizer.{key}", default)

    model = meta("ggml.model")
    if model != "gpt2":
        raise TokenizerError(
            f"unsupported GGUF tokenizer model {model!r}: only byte-level BPE ('gpt2') is "
            "implemented"
        )
    tokens: list[str] = meta("ggml.tokens")
    merges: list[str] | None = meta("ggml.merges")
    if not tokens:
        raise TokenizerError("GGUF file has no tokenizer.ggml.tokens")
    if merges is None:
        # Without merges BPE would emit one id per byte: valid ids, but not the model's.
        # (HF can rebuild merges from the vocabulary; no file we load needs that.)
        raise TokenizerError("GGUF file has no tokenizer.ggml.merges for its BPE vocabulary")
    token_types: list[int] = meta("ggml.token_type") or [1] * len(tokens)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError("tokenizer.ggml.tokens must be an array of strings")
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        raise TokenizerError("tokenizer.ggml.merges must be an array of strings 'left right'")
    if not isinstance(token_types, list) or len(token_types) != len(tokens):
        raise TokenizerError(f"tokenizer.ggml.token_type must be an array of one int per token "
                             f"({len(tokens)})")

    # Every ordinary byte-level token is written in the byte alphabet. llama.cpp writes some
    # user-defined tokens as raw text instead (e.g. ones containing a real space); BPE only
    # ever produces alphabet spellings, so those are respelled to stay reachable.
    alphabet = set(_byte_alphabet().values())
    byte_of = _byte_alphabet()

    def spelled(tok: str) -> bool:
        return set(tok) <= alphabet

    vocab = {
        (t if spelled(t) else "".join(byte_of[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:
        bpe = BPE(vocab=vocab, merges=pairs, fuse_unk=False)
    except Exception as e:   # e.g. a merge naming a token that is not in the vocabulary
        raise TokenizerError(f"tokenizer.ggml.merges does not fit tokenizer.ggml.tokens "
                             f"({type(e).__name__}: {e})") from None
    backend = _RustTokenizer(bpe)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta("ggml.pre"))
    backend.decoder = decoders.ByteLevel()

    # BPE alone would cut "<|im_start|>" into '<', '|', 'im', '_', ... exactly like any other
    # text, so a ChatML prompt would reach the model as ordinary characters and it would not
    # see a turn boundary at all. Registering control tokens as *special* added tokens makes
    # the tokenizer match them whole in the input before BPE runs (and lets decode skip them).
    # User-defined tokens (e.g. "<think>") are matched whole too, but are normal text.
    # A control token outside the byte alphabet cannot be one of the model's real byte-level
    # tokens (llama.cpp mislabels a few); adding it would append an id past the embedding
    # table, so, like HF's converter, we leave it out.
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, token_types)
        if kind == _CONTROL and spelled(t)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, token_types)
        if kind == _USER_DEFINED and t in vocab
    ]
    if special:
        backend.add_special_tokens(special)
    if user:
        backend.add_tokens(user)

    return backend, dict(
        bos_token_id=meta("ggml.bos_token_id"),
        eos_token_id=meta("ggml.eos_token_id"),
        unk_token_id=meta("ggml.unknown_token_id"),
        pad_token_id=meta("ggml.padding_token_id"),
        add_bos=bool(meta("ggml.add_bos_token", False)),
        add_eos=bool(meta("ggml.add_eos_token", False)),
        chat_template=meta("chat_template"),
    )
