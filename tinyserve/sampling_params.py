"""``SamplingParams``: per-request sampling settings, validated at construction (a subset of
``vllm.SamplingParams``, in a module of the same name). The sampler is ``tinyserve.sampling``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import InvalidParameter

SAMPLING_EPS = 1e-5                    # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
TOP_K_MAX = 2**31 - 1                  # a larger top_k is stored as this (no vocabulary is larger)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1   # torch.Generator.manual_seed's range

# vLLM's signature: (the request's output token ids so far, its next-token logits [V]) -> logits
LogitsProcessor = Callable[[list, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- #
# Parameters
# --------------------------------------------------------------------------- #


def _is_int(x: object) -> bool:
    # bool is a subclass of int; `max_tokens=True` is a bug, not a 1.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Per-request sampling settings (a subset of ``vllm.SamplingParams``).

    After construction the fields are normalised: ``top_k`` is ``-1`` when
    disabled (``0`` is accepted as an alias) and at most ``TOP_K_MAX``, a
    ``temperature`` below ``SAMPLING_EPS`` (1e-5) is 0 (greedy), ``stop`` and
    ``stop_token_ids`` are always lists (possibly empty). A bad value raises
    ``tinyserve.errors.InvalidParameter`` (a ValueError).

    ``seed`` is not consumed here: the engine should create one generator per
    request with :func:`make_generator` and keep it for the request's whole
    lifetime.  Re-seeding at every step would repeat the same random draw at
    each position.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise InvalidParameter(f"n must be an int >= 1, got {self.n!r}")

        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise InvalidParameter(f"temperature must be a finite number >= 0, got {t!r}")
        # Below SAMPLING_EPS, logits / temperature overflows (1e-40 turns every logit into
        # +-inf and softmax into NaN): such a temperature means greedy, as in vLLM.
        self.temperature = 0.0 if self.temperature < SAMPLING_EPS else float(self.temperature)

        # Written as `not (0 < x <= 1)` so that NaN is rejected too.
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidParameter(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.top_p = float(self.top_p)

        if not _is_int(self.top_k) or not (self.top_k in (-1, 0) or self.top_k >= 1):
            raise InvalidParameter(f"top_k must be -1 or 0 (disabled) or an int >= 1, "
                                   f"got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1
        # Any k past the vocabulary keeps every token; clamp it to a size torch can hold
        # (top_k=2**63 would overflow the int64 tensor it becomes).
        self.top_k = min(self.top_k, TOP_K_MAX)

        if not _is_real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise InvalidParameter(f"min_p must be in [0, 1], got {self.min_p!r}")
        self.min_p = float(self.min_p)

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidParameter(f"max_tokens must be >= 1, got {self.max_tokens!r}")

        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)

        if self.seed is not None and (not _is_int(self.seed)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise InvalidParameter(f"seed must be None or an int in [{SEED_MIN}, {SEED_MAX}] "
                                   f"(what torch.Generator takes), got {self.seed!r}")

        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameter(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

        procs = self.logits_processors
        if procs is None:
            procs = []
        if not isinstance(procs, (list, tuple)) or not all(callable(f) for f in procs):
            raise InvalidParameter(f"logits_processors must be a list of callables "
                             f"fn(output_token_ids, logits) -> logits, got {procs!r}")
        self.logits_processors = list(procs)

    @staticmethod
    def _normalise_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):
            stop = list(stop)
        else:
            raise InvalidParameter(f"stop must be a str, a list of str or None, got {stop!r}")
        for s in stop:
            # An empty stop string would match at every position and end
            # generation immediately; that is never what the caller meant.
            if not isinstance(s, str) or not s:
                raise InvalidParameter(f"stop must contain only non-empty strings, "
                                       f"got {s!r} in {stop!r}")
        return stop

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise InvalidParameter(f"stop_token_ids must be a list of int or None, got {ids!r}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise InvalidParameter(f"stop_token_ids must contain only ints >= 0, "
                                       f"got {t!r} in {ids!r}")
        return list(ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def greedy(cls, max_tokens: int = 16, **kwargs) -> "SamplingParams":
        """Deterministic argmax decoding (``temperature=0``)."""
        return cls(temperature=0.0, max_tokens=max_tokens, **kwargs)
