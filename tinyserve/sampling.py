"""Sampling: turning next-token logits into token ids.

``SamplingParams`` (``sampling_params.py``) mirrors the subset of vLLM's offline
API that tinyserve supports.  The logit processors below are pure functions on a batch of logits
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

from typing import Sequence, Union

import torch

from .errors import InvalidParameter, ParameterTypeError
from .sampling_params import SamplingParams

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

# Top-p and min-p compare float32 probabilities against a threshold.  A set of
# tokens whose mass is exactly p in real arithmetic (e.g. 0.5 + 0.2 vs p = 0.7)
# comes out of softmax a few ulps above *or* below p, so without slack the
# answer at the boundary would depend on rounding.  Anything within this
# distance of the threshold counts as reaching it.  It is far below any
# probability difference that matters for sampling.
_BOUNDARY_EPS = 1e-6


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
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams)
                                                        for p in params):
        raise ParameterTypeError(f"params must be a SamplingParams or a list of them, got "
                                 f"{type(params).__name__} (build one: "
                                 f"SamplingParams(**your_dict))")
    if len(params) != batch:
        raise InvalidParameter(f"{len(params)} SamplingParams for {batch} {what}")
    return list(params)


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
