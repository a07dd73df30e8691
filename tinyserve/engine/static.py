"""The static-batching baseline: a batch is formed, runs to its longest member, then the next.

    batcher = StaticBatcher(model, tokenizer, max_batch_size=8)
    batcher.add_request(0, prompt_ids, params)      # same calls as LLMEngine
    while batcher.has_unfinished():
        outs = batcher.step()

When no batch is running, ``step`` takes the waiting requests (all that have arrived, up to
``max_batch_size``) and starts them as one padded batch on the existing path,
``tinyserve.generate.decode_loop``: one right-padded prefill, then one decode step per call.
Every member stays in the batch until the LAST one finishes: a finished row rides along (its
slot is held, its compute is spent, nothing of it is written) and nobody new can join. That is
what "static" means, and what continuous batching removes (claim C14). Requests that arrive
meanwhile queue for the next batch.

Generous to the baseline: each row's tokens are handed out as they are made, so a request's
finish time is its own last token, not the end of its batch (HF ``generate``, measured beside
it by the serving benchmark, returns everything at the end of the batch).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Hashable

from ..generate import check_prompt, decode_loop
from ..sampling import SamplingParams
from .llm_engine import StepOutput, StepRecord
from .sequence import SequenceMetrics


class StaticBatcher:
    def __init__(self, model, tokenizer=None, max_batch_size: int = 16,
                 record_steps: bool = False):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.eos_ids = tuple(tokenizer.stop_token_ids) if tokenizer is not None else ()
        self.waiting: deque = deque()      # (request_id, prompt ids, params, metrics)
        self._loop = None                  # the running batch's decode_loop generator
        self._batch: list = []
        self._done: list[bool] = []
        self.step_count = 0
        self.history: list[StepRecord] | None = [] if record_steps else None

    def add_request(self, request_id: Hashable, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None):
        params = SamplingParams() if params is None else params
        if params.n != 1:
            raise ValueError("the static baseline runs one sample per request: use n=1")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt(ids, self.model.config.max_position_embeddings)
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        self.waiting.append((request_id, ids, params,
                             SequenceMetrics(arrival, prompt_tokens=len(ids))))

    def has_unfinished(self) -> bool:
        return self._loop is not None or bool(self.waiting)

    def step(self) -> list[StepOutput]:
        start = time.perf_counter()
        new = self._loop is None
        if new:
            if not self.waiting:
                return []
            n = min(self.max_batch_size, len(self.waiting))
            self._batch = [self.waiting.popleft() for _ in range(n)]
            self._done = [False] * n
            for *_, m in self._batch:
                m.first_scheduled_time, m.first_scheduled_step = start, self.step_count
            self._loop = decode_loop(self.model, [b[1] for b in self._batch],
                                     [b[2] for b in self._batch], self.tokenizer, self.eos_ids)
        # Tokens each row feeds this step: its prompt at the prefill, then 1 while it runs.
        fed = [len(b[1]) for b in self._batch] if new else [0 if d else 1 for d in self._done]
        updates = next(self._loop)
        now = time.perf_counter()
        outputs = []
        for u in updates:
            rid, _, _, m = self._batch[u.row]
            m.output_tokens += 1
            if m.first_token_time is None:
                m.first_token_time, m.first_token_step = now, self.step_count
            if u.finish_reason is not None:
                self._done[u.row] = True
                m.finish_time, m.finish_step = now, self.step_count
            outputs.append(StepOutput(rid, 0, [u.token_id], u.text_delta, u.finish_reason,
                                      m if u.finish_reason else None))
        if self.history is not None:   # finished rows still hold their slot: 0 tokens
            self.history.append(StepRecord(self.step_count, start, now, [
                (rid, 0, row, n, n > 0)
                for row, ((rid, *_), n) in enumerate(zip(self._batch, fed))]))
        if all(self._done):
            self._loop.close()
            self._loop = None
        self.step_count += 1
        return outputs
