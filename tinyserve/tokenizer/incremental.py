"""Streaming detokenization: token ids in, text deltas out (`IncrementalDecoder`)."""

from __future__ import annotations

from typing import Protocol, Sequence


class _Decodes(Protocol):
    # All the decoder needs of a tokenizer. A protocol rather than `Tokenizer` itself, because
    # core.py (Tokenizer.incremental_decoder) imports this module, not the other way round.
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text deltas.

    Decoding token by token and concatenating goes wrong in two ways: a character such as an
    emoji can span several byte-level tokens, so a lone token decodes to U+FFFD; and some
    decoders treat a token differently at the start of a sequence than in the middle. So we keep
    a small window of recent ids, decode the window, and hand out only the text that grew, and
    only once it no longer ends in an incomplete character ('\\ufffd').
    """

    def __init__(self, tokenizer: _Decodes, skip_special_tokens: bool = False):
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
