"""Sampling: turning next-token logits into token ids.

``SamplingParams`` mirrors the subset of vLLM's offline API that tinyserve
supports.  The logit processors below are pure functions on a batch of logits
``[B, V]``; each per-row parameter may be a Python number (same for every row)
or a tensor of shape ``[B]`` (one value per row), so a batch of requests with
different settings is processed in one vectorized pass.

Pipeline, in vLLM's order (order matters: every stage renormalises over the
survivors of the previous one, so e.g. top-p measures cumulative probability
*after* top-k and temperature have reshaped the distribution)::

    logits -> apply_temperature -> top_k_mask -> top_p_mask -> min_p_mask
           -> softmax (float32) -> multinomial  (or argmax when temperature == 0)

Masked entries are set to ``-inf`` so that softmax gives them exactly zero
probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import torch

__all__ = [
    "SamplingParams",
    "apply_temperature",
    "top_k_mask",
    "top_p_mask",
    "min_p_mask",
    "logits_to_probs",
    "sample",
    "apply_logits_processors",
    "make_generator",
]

RowParam = Union[float, int, Sequence[float], torch.Tensor]
# vLLM's signature: (the request's output token ids so far, its next-token logits [V]) -> logits
LogitsProcessor = Callable[[list, torch.Tensor], torch.Tensor]

# Top-p and min-p compare float32 probabilities against a threshold.  A set of
# tokens whose mass is exactly p in real arithmetic (e.g. 0.5 + 0.2 vs p = 0.7)
# comes out of softmax a few ulps above *or* below p, so without slack the
# answer at the boundary would depend on rounding.  Anything within this
# distance of the threshold counts as reaching it.  It is far below any
# probability difference that matters for sampling.
_BOUNDARY_EPS = 1e-6


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
    disabled (``0`` is accepted as an alias), ``stop`` and ``stop_token_ids``
    are always lists (possibly empty).

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
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")

        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        self.temperature = float(self.temperature)

        # Written as `not (0 < x <= 1)` so that NaN is rejected too.
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.top_p = float(self.top_p)

        if not _is_int(self.top_k) or not (self.top_k in (-1, 0) or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 or 0 (disabled) or an int >= 1, got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1

        if not _is_real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        self.min_p = float(self.min_p)

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")

        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)

        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

        procs = self.logits_processors
        if procs is None:
            procs = []
        if not isinstance(procs, (list, tuple)) or not all(callable(f) for f in procs):
            raise ValueError(f"logits_processors must be a list of callables "
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
            raise ValueError(f"stop must be a str, a list of str or None, got {stop!r}")
        for s in stop:
            # An empty stop string would match at every position and end
            # generation immediately; that is never what the caller meant.
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain only non-empty strings, got {s!r} in {stop!r}")
        return stop

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of int or None, got {ids!r}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must contain only ints >= 0, got {t!r} in {ids!r}")
        return list(ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def greedy(cls, max_tokens: int = 16, **kwargs) -> "SamplingParams":
        """Deterministic argmax decoding (``temperature=0``)."""
        return cls(temperature=0.0, max_tokens=max_tokens, **kwargs)


# --------------------------------------------------------------------------- #
# Logit processors
# --------------------------------------------------------------------------- #


def _row_param(x: RowParam, logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scalar or per-row parameter as a ``[B, 1]`` column broadcastable against ``logits``."""
    t = torch.as_tensor(x, dtype=dtype, device=logits.device)
    if t.dim() == 0:
        return t.expand(logits.shape[0]).unsqueeze(-1)
    if t.shape != (logits.shape[0],):
        raise ValueError(f"per-row parameter must be a scalar or have shape [{logits.shape[0]}], got {tuple(t.shape)}")
    return t.unsqueeze(-1)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [B, V], got {tuple(logits.shape)}")


def apply_temperature(logits: torch.Tensor, t: RowParam) -> torch.Tensor:
    """Divide each row by its temperature: ``t < 1`` sharpens, ``t > 1`` flattens.

    Masks nothing.  Rows with ``t == 0`` (greedy) are returned unchanged rather
    than divided by zero: greedy rows are decoded by argmax, which is invariant
    to positive scaling, so their logits only need to stay finite.
    """
    _check_logits(logits)
    t = _row_param(t, logits, logits.dtype)
    return logits / torch.where(t == 0, torch.ones_like(t), t)


def top_k_mask(logits: torch.Tensor, k: RowParam) -> torch.Tensor:
    """Keep each row's ``k`` highest logits; set the rest to ``-inf``.

    ``k <= 0`` (vLLM's ``-1``, or ``0``) disables the filter for that row and
    ``k >= V`` keeps everything.  Tokens tied with the k-th largest logit are
    all kept, so the result does not depend on how the sort orders ties.
    """
    _check_logits(logits)
    vocab = logits.shape[-1]
    k = _row_param(k, logits, torch.long)
    k = torch.where(k <= 0, vocab, k).clamp(max=vocab)
    if k.numel() == 0:  # empty batch: nothing to mask, and k.max() would fail
        return logits.clone()
    # topk up to the largest k in the batch is cheaper than a full vocab sort
    # when every row asks for a small k.
    top = logits.topk(int(k.max()), dim=-1).values
    kth = top.gather(-1, k - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: RowParam) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of highest-probability tokens whose
    cumulative probability is ``>= p``; set the rest to ``-inf``.

    Probabilities are the softmax of ``logits`` as given, so tokens already at
    ``-inf`` (e.g. removed by top-k) do not count.  The top token is always
    kept, ``p >= 1`` disables the filter, and tokens tied with the last kept
    token are kept too.
    """
    _check_logits(logits)
    p = _row_param(p, logits)
    sorted_logits, _ = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1, dtype=torch.float32)
    # Probability mass strictly above each sorted position.  Position i is
    # needed iff the tokens before it have not yet reached p.  Because this is
    # non-decreasing, the kept positions form a prefix and counting them is
    # enough to find the cut.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    n_keep = (mass_before < p - _BOUNDARY_EPS).sum(dim=-1, keepdim=True).clamp(min=1)
    # p == 1 must keep the whole vocabulary, but the float32 cumsum can reach
    # 1 - eps before the tail of tiny probabilities, which would drop them.
    n_keep = torch.where(p >= 1.0, logits.shape[-1], n_keep)
    cutoff = sorted_logits.gather(-1, n_keep - 1)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def min_p_mask(logits: torch.Tensor, min_p: RowParam) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's top
    probability; set them to ``-inf``.

    ``min_p == 0`` disables the filter; ``min_p == 1`` keeps only the tokens
    tied for the maximum.  Because the threshold is relative to the maximum,
    the filter adapts to the model's confidence: a peaked distribution keeps
    few tokens, a flat one keeps many.
    """
    _check_logits(logits)
    min_p = _row_param(min_p, logits)
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    top = probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < (min_p - _BOUNDARY_EPS) * top, float("-inf"))


def per_row_params(params: SamplingParams | Sequence[SamplingParams], batch: int,
                   what: str = "rows") -> list[SamplingParams]:
    """One SamplingParams for every row, or exactly one per row."""
    if isinstance(params, SamplingParams):
        return [params] * batch
    params = list(params)
    if len(params) != batch:
        raise ValueError(f"{len(params)} SamplingParams for {batch} {what}")
    return params


def logits_to_probs(
    logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams]
) -> torch.Tensor:
    """Float32 probabilities ``[B, V]`` that :func:`sample` draws each row from.

    Applies temperature, top-k, top-p and min-p in that order (vLLM's), then a
    float32 softmax.  Greedy rows (``temperature == 0``) get a one-hot on their
    argmax: the distribution they are actually decoded from.
    """
    _check_logits(logits)
    rows = per_row_params(params, logits.shape[0])
    # float32 before any arithmetic: bf16/fp16 logits divided by a small
    # temperature lose too much precision for top-p's cumulative sum.
    x = logits.float()

    x = apply_temperature(x, [r.temperature for r in rows])
    # Each stage is skipped when no row uses it; top-k and top-p sort the vocab.
    if any(r.top_k > 0 for r in rows):
        x = top_k_mask(x, [r.top_k for r in rows])
    if any(r.top_p < 1.0 for r in rows):
        x = top_p_mask(x, [r.top_p for r in rows])
    if any(r.min_p > 0.0 for r in rows):
        x = min_p_mask(x, [r.min_p for r in rows])
    probs = x.softmax(dim=-1)

    greedy = torch.tensor([r.is_greedy for r in rows], device=logits.device)
    if greedy.any():
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(-1), one_hot, probs)
    return probs


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device``, or ``None`` (use the
    global RNG) when ``seed`` is ``None``.  The device must match the logits'."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def apply_logits_processors(logits: torch.Tensor, rows: Sequence[SamplingParams],
                            output_token_ids: Sequence[Sequence[int]] | None) -> torch.Tensor:
    """Each row's ``logits_processors``, in order, on that row alone (a new tensor when any
    row has one; ``logits`` is not modified). A processor sees a copy of the request's output
    so far and its row ``[V]``, and must return a tensor of the same shape."""
    todo = [i for i, r in enumerate(rows) if r.logits_processors]
    if not todo:
        return logits
    if output_token_ids is None or len(output_token_ids) != len(rows):
        raise ValueError("logits_processors need each row's output token ids so far")
    logits = logits.clone()
    for i in todo:
        row = logits[i]
        for fn in rows[i].logits_processors:
            row = fn(list(output_token_ids[i]), row)
            if not isinstance(row, torch.Tensor) or row.shape != logits.shape[1:]:
                raise ValueError(f"logits processor {getattr(fn, '__name__', fn)!r} returned "
                                 f"{type(row).__name__} {tuple(getattr(row, 'shape', ()))}, "
                                 f"expected a tensor of shape {tuple(logits.shape[1:])}")
        logits[i] = row
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Pick one token id per row: ``LongTensor [B]``.

    ``params`` is one ``SamplingParams`` for every row or one per row.  Greedy
    rows take ``torch.argmax`` of the raw logits (first index on ties).  Other
    rows draw from :func:`logits_to_probs` with ``torch.multinomial``; a row
    with a generator draws with it alone, so its tokens depend only on its seed
    and not on which other requests share the batch.  Rows without a generator
    share one batched draw from the global RNG. Rows with ``logits_processors``
    are first passed through them (``output_token_ids``: each row's output so far).
    """
    _check_logits(logits)
    batch = logits.shape[0]
    rows = per_row_params(params, batch)
    logits = apply_logits_processors(logits, rows, output_token_ids)
    if generators is None:
        generators = [None] * batch
    elif len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch} rows")

    tokens = logits.argmax(dim=-1)  # final answer for greedy rows
    random_rows = [i for i, r in enumerate(rows) if not r.is_greedy]
    if not random_rows:
        return tokens

    probs = logits_to_probs(logits[random_rows], [rows[i] for i in random_rows])
    unseeded = [j for j, i in enumerate(random_rows) if generators[i] is None]
    if unseeded:
        drawn = torch.multinomial(probs[unseeded], num_samples=1).squeeze(-1)
        tokens[[random_rows[j] for j in unseeded]] = drawn
    for j, i in enumerate(random_rows):
        g = generators[i]
        if g is not None:
            tokens[i] = torch.multinomial(probs[j], num_samples=1, generator=g)[0]
    return tokens
