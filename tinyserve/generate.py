"""Autoregressive generation with the KV cache: one batched prefill, then one token per step.

    prefill:  model(all prompt tokens, cache)  -> logits of each prompt's last token
    decode:   model(one new token per row, cache) -> next logits, repeated until every row stops

Prompts of different lengths are right-padded into one batch; the cache keeps a length per row,
so each row's positions and attention span are its own and padding never reaches the output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .cuda_graph import GraphedDecodeStep
from .errors import InvalidParameter
from .kv_cache import KVCache
from .sampling import SamplingParams, make_generator, sample
from .timing import clock


@dataclass
class Update:
    """What one step did to one request row: the token it appended and the new text."""
    row: int
    token_id: int
    text_delta: str
    finish_reason: str | None  # "stop" | "length" | None while running


@dataclass
class Row:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    stop_ids: set[int]
    limit: int                        # tokens this row may generate (max_tokens, capped by context)
    out: list[int] = field(default_factory=list)
    text: str = ""                    # decoded output, truncated at a stop string
    emitted: int = 0                  # characters of `text` already streamed
    finish_reason: str | None = None

    @classmethod
    def create(cls, prompt, params: SamplingParams, context: int, device, tokenizer=None,
               eos_ids: Sequence[int] = (), **extra):
        """Check one request and build its row (``extra``: a subclass's own fields)."""
        check_prompt(prompt, context)
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        return cls(list(prompt), params, make_generator(params.seed, device), stop_ids,
                   min(params.max_tokens, context - len(prompt)), **extra)


def check_prompt(prompt: Sequence[int], context: int):
    if len(prompt) == 0:
        raise InvalidParameter("empty prompt: give at least one token (or non-empty text)")
    if len(prompt) >= context:
        raise InvalidParameter(f"prompt has {len(prompt)} tokens but the model's context is "
                               f"{context}: no room to generate")


def _update_text(row: Row, tokenizer) -> str:
    """Re-decode the output, apply stop strings, and return the text safe to stream now."""
    ids = row.out[:-1] if row.out and row.out[-1] in row.stop_ids else row.out
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for s in row.params.stop:
        at = text.find(s)
        if at != -1:
            text, row.finish_reason = text[:at], "stop"
    row.text = text
    if row.finish_reason is None:
        # Hold back an incomplete UTF-8 sequence, and any tail that may be the start of a stop
        # string, until the next tokens settle it.
        hold = max((len(s) - 1 for s in row.params.stop), default=0)
        safe = len(text) - hold
        while safe > row.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
    else:
        safe = len(text)
    delta, row.emitted = text[row.emitted:max(safe, row.emitted)], max(safe, row.emitted)
    return delta


def append_token(row: Row, tok: int, tokenizer=None) -> str:
    """Add one sampled token to ``row``, settle its finish reason; -> the text delta.

    Shared by ``decode_loop`` and the engine (``tinyserve.engine``), so both stop alike."""
    row.out.append(tok)
    if tok in row.stop_ids:
        row.finish_reason = "stop"
    delta = _update_text(row, tokenizer) if tokenizer is not None else ""
    if row.finish_reason is None and len(row.out) >= row.limit:
        row.finish_reason = "length"
        if tokenizer is not None:
            delta += _update_text(row, tokenizer)
    return delta


@torch.no_grad()
def decode_loop(model, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                tokenizer=None, eos_ids: Sequence[int] = (), stats: dict | None = None
                ) -> Iterator[list[Update]]:
    """Run a batch to completion, yielding the list of row updates after every step.

    ``eos_ids`` end a row unless its params say ``ignore_eos``; ``tokenizer`` (optional) turns
    tokens into text deltas and enables stop strings. ``stats`` receives timings and counts.
    """
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    ctx, dev = model.config.max_position_embeddings, model.device
    rows = []
    for p, sp in zip(prompts, params):
        rows.append(Row.create(p, sp, ctx, dev, tokenizer, eos_ids))
    B = len(rows)
    max_len = max(len(r.prompt) + r.limit for r in rows)
    cache = KVCache(model.config, B, max_len, dtype=model.dtype, device=dev)

    T = max(len(r.prompt) for r in rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r.prompt)] = torch.tensor(r.prompt)
    num_new = torch.tensor([len(r.prompt) for r in rows], device=dev)
    t0 = time.perf_counter()
    logits = model.run(ids.to(dev), cache, num_new=num_new, last_only=True)[:, 0]
    if dev.type == "cuda":  # kernels run asynchronously: wait before reading the clock
        torch.cuda.synchronize()
    t_prefill = time.perf_counter() - t0
    steps = 0
    while True:
        active = [b for b, r in enumerate(rows) if r.finish_reason is None]
        next_ids = sample(logits[active], [rows[b].params for b in active],
                          [rows[b].generator for b in active],
                          [rows[b].out for b in active]).tolist()
        updates = []
        for b, tok in zip(active, next_ids):
            delta = append_token(rows[b], tok, tokenizer)
            updates.append(Update(b, tok, delta, rows[b].finish_reason))
        yield updates
        steps += 1
        live = torch.tensor([r.finish_reason is None for r in rows], device=dev)
        if not live.any():
            break
        # Finished rows ride along with num_new = 0: nothing of theirs is written or read.
        step_ids = torch.tensor([[r.out[-1]] for r in rows], device=dev)
        logits = model.run(step_ids, cache, num_new=live.long(), last_only=True)[:, 0]
    if stats is not None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        stats.update(prefill_s=t_prefill, total_s=time.perf_counter() - t0,
                     prompt_tokens=int(num_new.sum()),
                     generated_tokens=sum(len(r.out) for r in rows), steps=steps)


def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 params: SamplingParams | None = None, stop_token_ids: Sequence[int] = (),
                 ignore_eos: bool = False) -> list[list[int]]:
    """Token-level generation (greedy unless ``params`` say otherwise): -> new ids per prompt."""
    if params is None:
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=ignore_eos)
    out = [[] for _ in prompts]
    for updates in decode_loop(model, prompts, [params] * len(prompts), eos_ids=stop_token_ids):
        for u in updates:
            out[u.row].append(u.token_id)
    return out


@torch.no_grad()
def benchmark_decode(model, input_ids: torch.Tensor, max_new_tokens: int,
                     cuda_graph: bool | None = None) -> dict:
    """The lean greedy path the decode benchmark times: prefill, then ``max_new_tokens - 1``
    decode steps, every row running to the end (no stop tokens, no text).

    input_ids: [B, T] (all rows the same length). Tokens stay on the device (no per-step
    sync). ``cuda_graph`` defaults to True on CUDA. Returns tokens [B, N], prefill_s, decode_s
    (time of the decode steps only; graph capture is reported separately as capture_s).
    """
    dev = model.device
    B, T = input_ids.shape
    N = max_new_tokens
    if N < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {N}")
    use_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
    warmup = 2 if use_graph else 0
    cache = KVCache(model.config, B, T + N + warmup, dtype=model.dtype, device=dev)
    tokens = torch.empty(B, N, dtype=torch.long, device=dev)
    t0 = clock(dev)
    logits = model.run(input_ids.to(dev), cache, last_only=True)
    tokens[:, 0] = logits[:, 0].argmax(-1)
    t1 = clock(dev)
    step = GraphedDecodeStep(model, cache, warmup) if use_graph else (
        lambda ids: model.decode_step(ids, cache))
    t2 = clock(dev)
    for i in range(1, N):
        logits = step(tokens[:, i - 1:i])
        tokens[:, i] = logits[:, 0].argmax(-1)
    t3 = clock(dev)
    return dict(tokens=tokens, prefill_s=t1 - t0, capture_s=t2 - t1, decode_s=t3 - t2,
                cuda_graph=use_graph)
