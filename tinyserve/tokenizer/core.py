"""`Tokenizer`: encode/decode, the vocabulary, special and stop ids, and the chat template.

Building the backend from files lives in gguf_bpe.py and hf_dir.py, compiling the chat template
in chat_template.py, streaming detokenization in incremental.py.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer as _RustTokenizer

from .chat_template import render as render_template
from .errors import TokenizerError
from .gguf_bpe import load_gguf_tokenizer
from .hf_dir import load_dir_tokenizer
from .incremental import IncrementalDecoder

# Tokens that end a turn in common chat formats (ChatML, GPT-2 style, Llama 3, Phi 3). A chat model
# often stops with one of these rather than with its nominal eos, so generation must stop on all.
_STOP_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")


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
        """Rebuild the tokenizer described by a GGUF file's metadata (a path, the metadata dict
        of `tinyserve.weights.gguf.read_gguf`, or a `gguf.GGUFReader`)."""
        backend, settings = load_gguf_tokenizer(path_or_reader)
        return cls(backend, **settings)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load an HF-style directory: `tokenizer.json`, plus `tokenizer_config.json`,
        `chat_template.jinja` and `generation_config.json` when present."""
        backend, settings = load_dir_tokenizer(path)
        return cls(backend, **settings)

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

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
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
        return render_template(template, variables)
