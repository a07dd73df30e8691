"""Drafts: what proposes the tokens the target verifies. One small interface, several drafts.

A draft shares the target's tokenizer (its token ids are the target's). The loop calls

    start(context, max_len, hidden)     a new sequence: context = prompt + the first token
    propose(context, k, params, gen)    -> (tokens [<= k], q [n, V] or None), every round
    commit(context, n_new, hidden)      the round's verdict: context grew by n_new tokens

``q[i]`` is the distribution token i was drawn from, over the target's whole vocabulary, made
with ``logits_to_probs`` under the request's SamplingParams (use ``draw``). ``q = None``
states that the proposal is a deterministic function of the context (q one-hot on each
proposed token): true of prompt lookup always, and of any draft under greedy params, where
drafts take the argmax. A sampling draft must not return None: the rule would then assume
one-hot and the output would no longer follow the target's distribution.

Drafts with ``uses_hidden = True`` also receive the target's final hidden states: ``hidden``
[m, D] are those at the positions *before* the last m tokens of ``context`` (hidden[j] is what
the LM head turned into the distribution of the j-th of those tokens). Anything a draft did
speculatively in ``propose`` (e.g. KV-cache entries of its own proposals) is its own to roll
back in ``commit``, which sees the accepted context.

Drafts here: ``PromptLookupDraft`` (copy the continuation of the latest n-gram match, no model),
``ModelDraft`` (any smaller model with the same vocabulary, with its own KV cache), and two
built from the target itself: ``early_exit_draft`` (its first N layers, sharing its tensors)
and ``quantized_draft`` (an int4 copy). The trained EAGLE-style head is in ``head.py``.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch
from torch import nn

from ..kv_cache import KVCache
from ..model import Transformer
from ..quant import quantize_model
from ..sampling import SamplingParams, logits_to_probs


class Draft:
    """Base class of drafts (see the module docstring). Subclasses implement ``propose``."""
    name = "draft"
    uses_hidden = False               # give me the target's hidden states
    vocab_size: int | None = None     # a model draft's vocabulary (checked against the target)

    def start(self, context: list[int], max_len: int, hidden: torch.Tensor | None) -> None:
        """A new sequence of at most ``max_len`` tokens begins with ``context``."""

    def propose(self, context: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        raise NotImplementedError

    def commit(self, context: list[int], n_new: int, hidden: torch.Tensor | None) -> None:
        """``context`` now ends with ``n_new`` accepted tokens (drafts, then the target's)."""

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


def draw(logits: torch.Tensor, params: SamplingParams,
         generator) -> tuple[int, torch.Tensor | None]:
    """One draft token from logits [V] under ``params`` -> (token, q [V] float32, or None
    under greedy params: the argmax, q one-hot). Same processors as the target's p."""
    if params.is_greedy:
        return int(logits.argmax()), None
    q = logits_to_probs(logits[None], params)[0]
    return int(torch.multinomial(q, 1, generator=generator)), q


class NoDraft(Draft):
    """Proposes nothing: every step verifies the pending token alone, i.e. plain decoding
    through the speculative loop (what the bench compares the loop's overhead with)."""
    name = "none"

    def propose(self, context, k, params, generator):
        return [], None


# ---- prompt lookup -------------------------------------------------------------------------
class PromptLookupDraft(Draft):
    """Propose what followed the latest earlier occurrence of the context's last n tokens
    (n from ``max_ngram`` down to ``min_ngram``), up to k tokens; nothing when none occurs.

    No model, almost no cost: it pays when the output copies its input (editing, summarising,
    code that repeats names). Deterministic, so q is None (one-hot).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = f"prompt-lookup (n<={max_ngram})"

    def propose(self, context, k, params, generator):
        L = len(context)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            tail = context[L - n:]
            for i in range(L - n - 1, -1, -1):         # latest match first
                if context[i + n - 1] == tail[-1] and context[i:i + n] == tail:
                    return list(context[i + n:i + n + k]), None
        return [], None


# ---- a model with its own KV cache ---------------------------------------------------------
def _agreed(cached: Sequence[int], context: Sequence[int], n_new: int) -> int:
    """Length of the common prefix of ``cached`` and ``context``; everything before the
    ``n_new`` new tokens of context is known to agree (it was the previous context)."""
    n = min(len(context) - n_new, len(cached))
    while n < len(cached) and n < len(context) and cached[n] == context[n]:
        n += 1
    return n


class ModelDraft(Draft):
    """A separate (smaller, quantized, truncated) Transformer with the target's vocabulary.

    It keeps a KV cache of ``self.cached`` tokens, always a prefix of the context it has seen.
    ``propose`` feeds the context tokens it lacks in one forward, then draws k tokens one
    forward each (the last one is never fed: only an accepted draft needs its K/V). ``commit``
    truncates the cache to the longest prefix the accepted context agrees with.
    """

    def __init__(self, model, name: str | None = None):
        self.model = model
        self.vocab_size = model.config.vocab_size
        self.name = name or f"model ({model.config.num_layers} layers)"

    def start(self, context, max_len, hidden=None):
        m = self.model
        self.cache = KVCache(m.config, 1, max_len, dtype=m.dtype, device=m.device)
        self.cached: list[int] = []

    @torch.no_grad()
    def propose(self, context, k, params, generator):
        dev = self.model.device
        feed = torch.tensor([list(context[len(self.cached):])], device=dev)
        logits = self.model.run(feed, self.cache, last_only=True)[0, -1]
        tokens, qs = [], []
        for i in range(k):
            tok, q = draw(logits, params, generator)
            tokens.append(tok)
            qs.append(q)
            if i + 1 < k:
                logits = self.model.run(torch.tensor([[tok]], device=dev), self.cache)[0, -1]
        self.cached = list(context) + tokens[:-1]
        return tokens, None if params.is_greedy else torch.stack(qs)

    def commit(self, context, n_new, hidden=None):
        n = _agreed(self.cached, context, n_new)
        self.cache.truncate([n])
        self.cached = self.cached[:n]


def early_exit_view(model, n_layers: int):
    """A Transformer made of ``model``'s embedding, first ``n_layers`` layers, final norm and
    LM head: the same tensors (no copy), so it costs no memory, only its own KV cache."""
    L = model.config.num_layers
    if not isinstance(n_layers, int) or not 1 <= n_layers < L:
        raise ValueError(f"n_layers must be an int in [1, {L - 1}] for a {L}-layer target, "
                         f"got {n_layers!r}")
    cfg = dataclasses.replace(model.config, num_layers=n_layers)
    with torch.device("meta"):           # allocate nothing: every tensor is replaced below
        view = Transformer(cfg, backend=model.backend)
    view.embed, view.norm, view.lm_head = model.embed, model.norm, model.lm_head
    view.layers = nn.ModuleList(model.layers[:n_layers])
    view.inv_freq = model.inv_freq
    return view.eval()


def early_exit_draft(model, n_layers: int) -> ModelDraft:
    """The target's first ``n_layers`` layers + final norm + LM head as the draft."""
    return ModelDraft(early_exit_view(model, n_layers), name=f"early-exit {n_layers}")


def quantized_draft(model, method: str = "int4", group_size: int | None = None) -> ModelDraft:
    """A quantized copy of the target (``tinyserve.quant.quantize_model``) as the draft.

    The teaching contrast: on a GPU an int4 copy reads ~1/4 of the bytes per step, but at
    SmolLM2's size the fp32/bf16 embedding/LM head it keeps is a large share, and on the CPU
    the reference path dequantizes every weight on every call, so it costs more than the target.
    """
    q = quantize_model(copy.deepcopy(model), method, group_size=group_size)
    return ModelDraft(q, name=f"{method} copy")
