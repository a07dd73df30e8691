"""Text <-> token ids, built on HF's Rust `tokenizers` library.

Two sources are supported:

* a GGUF file (`Tokenizer.from_gguf`): llama.cpp stores the vocabulary, the BPE merges, the
  token types and the special ids as metadata, not as a `tokenizer.json`, so we rebuild the
  tokenizer from those pieces. Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`, used by
  SmolLM2, Llama 3, Qwen 2, ...) is implemented.
* an HF-style directory (`Tokenizer.from_dir`) holding a `tokenizer.json`.

HF transformers is deliberately not used here: it is a heavy import and is only the test oracle
(`tests/test_tokenizer.py` checks our ids against it on the real SmolLM2 file).
"""

from __future__ import annotations

import json
import os
import warnings
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.models import BPE

__all__ = ["Tokenizer", "TokenizerError", "IncrementalDecoder"]


class TokenizerError(ValueError):
    """A tokenizer could not be built or used (missing file, unsupported model, no template...)."""


# llama.cpp's `token_type` values (gguf.TokenType); only these two matter here.
_CONTROL = 3
_USER_DEFINED = 4

# Tokens that end a turn in common chat formats (ChatML, GPT-2 style, Llama 3, Phi 3). A chat model
# often stops with one of these rather than with its nominal eos, so generation must stop on all.
_STOP_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")

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
            stacklevel=3,
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


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


class Tokenizer:
    """A text tokenizer plus the model's special ids and chat template.

    Build it with `from_gguf` or `from_dir`; the constructor takes an already built
    `tokenizers.Tokenizer` for the cases those do not cover.
    """

    def __init__(
        self,
        backend: _RustTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        unk_token_id: int | None = None,
        pad_token_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
    ):
        self._tok = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.pad_token_id = pad_token_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        self._extra_stop_ids = {int(i) for i in extra_stop_ids}
        # A tokenizer.json may already carry a post-processor that adds bos/eos; we add them
        # ourselves only where it does not, so they are never doubled.
        probe = backend.encode("a", add_special_tokens=True).ids
        self._prepend_bos = add_bos and bos_token_id is not None and probe[:1] != [bos_token_id]
        self._append_eos = add_eos and eos_token_id is not None and probe[-1:] != [eos_token_id]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike | Any) -> "Tokenizer":
        """Rebuild the tokenizer described by a GGUF file's metadata (path or `gguf.GGUFReader`)."""
        import gguf  # lazy: `import tinyserve` must not need it

        if isinstance(path_or_reader, (str, os.PathLike)):
            path = Path(path_or_reader)
            if not path.is_file():
                raise TokenizerError(f"GGUF file not found: {path}")
            reader = gguf.GGUFReader(path)
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
        bpe = BPE(vocab=vocab, merges=pairs, fuse_unk=False)
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

        return cls(
            backend,
            bos_token_id=meta("ggml.bos_token_id"),
            eos_token_id=meta("ggml.eos_token_id"),
            unk_token_id=meta("ggml.unknown_token_id"),
            pad_token_id=meta("ggml.padding_token_id"),
            add_bos=bool(meta("ggml.add_bos_token", False)),
            add_eos=bool(meta("ggml.add_eos_token", False)),
            chat_template=meta("chat_template"),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load an HF-style directory: `tokenizer.json`, plus `tokenizer_config.json`,
        `chat_template.jinja` and `generation_config.json` when present."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"missing tokenizer.json in {root} (looked for {tok_file})")
        backend = _RustTokenizer.from_file(str(tok_file))

        def load_json(name: str) -> dict:
            f = root / name
            return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

        config = load_json("tokenizer_config.json")
        gen = load_json("generation_config.json")

        def token_id(name: str) -> int | None:
            text = _token_text(config.get(name))
            return backend.token_to_id(text) if text else None

        bos, eos = token_id("bos_token"), token_id("eos_token")
        gen_eos = gen.get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos is None and gen_eos_ids:
            eos = gen_eos_ids[0]
        if bos is None and isinstance(gen.get("bos_token_id"), int):
            bos = gen["bos_token_id"]

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        jinja_file = root / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            unk_token_id=token_id("unk_token"),
            pad_token_id=token_id("pad_token"),
            add_bos=bool(config.get("add_bos_token", False)),
            add_eos=bool(config.get("add_eos_token", False)),
            chat_template=template,
            extra_stop_ids=gen_eos_ids,
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. Special tokens written in the text (e.g. `<|im_start|>`) always
        become their single id; `add_special_tokens` only controls the bos/eos added around it."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self._prepend_bos:
                ids = [self.bos_token_id, *ids]
            if self._append_eos:
                ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids`. Bytes that do not form complete UTF-8 come out as U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary entry (byte-level spelling, e.g. 'Ġthe'), or None if out of range."""
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _token(self, i: int | None) -> str | None:
        return None if i is None else self._tok.id_to_token(i)

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token(self.eos_token_id)

    @property
    def stop_token_ids(self) -> set[int]:
        """Ids that end generation: eos, any extra eos from generation_config.json, and the
        end-of-turn markers of common chat formats that exist in this vocabulary."""
        stops = set(self._extra_stop_ids)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        for marker in _STOP_MARKERS:
            i = self._tok.token_to_id(marker)
            if i is not None:
                stops.add(i)
        return stops

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's own Jinja
        chat template, as HF transformers does with `tokenize=False`. Extra keyword arguments
        become template variables."""
        template = chat_template if chat_template is not None else self.chat_template
        if not template:
            raise TokenizerError(
                "this tokenizer has no chat template (none in the GGUF metadata / "
                "tokenizer_config.json); pass chat_template=... or format the prompt yourself"
            )
        variables: dict[str, Any] = {}
        # Templates write e.g. `{{ bos_token }}`; an unset token must render as nothing (jinja's
        # Undefined), not as the string "None", so only the known ones are passed.
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = self._token(getattr(self, f"{name}_id"))
            if value is not None:
                variables[name] = value
        variables.update(kwargs)
        variables["messages"] = [dict(m) for m in messages]
        variables["add_generation_prompt"] = add_generation_prompt
        return _compile_template(template).render(**variables)


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
def _compile_template(source: str):
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


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text deltas.

    Decoding token by token and concatenating goes wrong in two ways: a character such as an
    emoji can span several byte-level tokens, so a lone token decodes to U+FFFD; and some
    decoders treat a token differently at the start of a sequence than in the middle. So we keep
    a small window of recent ids, decode the window, and hand out only the text that grew, and
    only once it no longer ends in an incomplete character ('\\ufffd').
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context that has already been returned
        self._read = 0  # ids before this have been returned as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def step(self, token_id: int) -> str:
        """Feed one id; return the text it completes ('' while a character is still partial)."""
        self._ids.append(int(token_id))
        shown = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(shown) :]
        return ""

    __call__ = step

    def flush(self) -> str:
        """End of stream: return whatever is still held back, incomplete bytes as U+FFFD."""
        shown = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(shown) :]
