"""The serving engine: requests come and go, one model step at a time.

    engine = LLMEngine(model, tokenizer, max_num_seqs=8, max_num_batched_tokens=256,
                       max_model_len=1024)
    engine.add_request("a", "The capital of France is", SamplingParams(max_tokens=16))
    while engine.has_unfinished():
        for out in engine.step():          # one StepOutput per sequence that moved
            print(out.request_id, out.text_delta, out.finish_reason)

Each ``step()`` asks the ``Scheduler`` for this iteration's sequences and chunk sizes, runs them
as one packed forward (``ModelRunner``), samples the sequences whose pending tokens are all
consumed (``tinyserve.sampling.sample``, per-request SamplingParams and seeded generators, so a
seeded request's tokens do not depend on its neighbours), and retires the finished ones, whose
KV memory is free for the next step. ``add_request`` and ``abort`` may be called between steps.

The KV store is PagedAttention's ``PagedKVStore`` by default (blocks taken as sequences grow,
prefix caching, the n samples of a request sharing their prompt's blocks, preemption when the
blocks run out); ``kv="slots"`` selects the contiguous ``SlotKVPool`` baseline.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Hashable

from ..generate import _append_token, check_prompt
from ..sampling import SamplingParams, sample
from .kv_pool import SlotKVPool
from .model_runner import ModelRunner
from .paged_store import PagedKVStore, blocks_for_budget
from .scheduler import Scheduler
from .sequence import Sequence, SequenceMetrics, nth_sample


@dataclass
class StepOutput:
    """What one step did for one sequence (sample ``index`` of request ``request_id``)."""
    request_id: Hashable
    index: int
    token_ids: list[int]                 # new tokens (one, or none for an abort)
    text_delta: str                      # text safe to stream now ("" without a tokenizer)
    finish_reason: str | None            # "stop" | "length" | "abort" | None while running
    metrics: SequenceMetrics | None = None   # set once finished


@dataclass
class StepRecord:
    """One engine step, for timelines: who ran, in which KV slot, with how many tokens."""
    step: int
    start: float
    end: float
    # (request_id, index, slot or None, tokens fed, sampled this step)
    entries: list[tuple] = field(default_factory=list)


def _positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


class LLMEngine:
    """``max_num_seqs`` sequences run at once, each step feeding at most
    ``max_num_batched_tokens`` tokens; a sequence holds at most ``max_model_len`` tokens
    (prompt + output; default: the model's context). ``record_steps`` keeps a ``StepRecord``
    per step in ``history``.

    ``kv``: the KV store (see ``kv_pool``), allocated up front at 2 * layers * kv_heads *
    head_dim * bytes per token (SmolLM2 in fp32: 46 KB):
      "paged" (default)  a ``PagedKVStore`` of blocks of ``block_size`` tokens (default 16),
                         ``kv_cache_tokens`` tokens in all (default: max_num_seqs *
                         max_model_len rounded up to blocks, the slot pool's memory, so
                         nobody is ever preempted; less memory, or more max_num_seqs in the
                         same memory, is what paging makes possible); prefix caching unless
                         ``enable_prefix_caching=False``;
      "slots"            a ``SlotKVPool``: ``max_num_seqs`` slots of ``max_model_len`` tokens
                         (16 slots of SmolLM2's full 8K context take 6 GB: size
                         ``max_model_len`` to the requests);
      a store object     used as is."""

    def __init__(self, model, tokenizer=None, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, max_model_len: int | None = None,
                 kv="paged", record_steps: bool = False, block_size: int | None = None,
                 kv_cache_tokens: int | None = None, enable_prefix_caching: bool = True):
        ctx = model.config.max_position_embeddings
        max_model_len = ctx if max_model_len is None else max_model_len
        _positive_int("max_num_seqs", max_num_seqs)
        _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        _positive_int("max_model_len", max_model_len)
        if not 2 <= max_model_len <= ctx:
            raise ValueError(f"max_model_len must be in [2, {ctx}] (the model's context), "
                             f"got {max_model_len}")
        self.model, self.tokenizer, self.max_model_len = model, tokenizer, max_model_len
        self.eos_ids = tuple(tokenizer.stop_token_ids) if tokenizer is not None else ()
        self.kv = _make_store(kv, model, max_num_seqs, max_model_len, block_size,
                              kv_cache_tokens, enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv)
        self._requests: dict[Hashable, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self._pending: list[StepOutput] = []      # abort notices, returned by the next step
        self.step_count = 0
        self.history: list[StepRecord] | None = [] if record_steps else None

    # ---- requests ------------------------------------------------------------------------
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError("a text prompt needs a tokenizer: pass token ids, or give the "
                                "engine a tokenizer")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, Seq) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise TypeError(f"a prompt is a str or a list of token ids, got "
                            f"{type(prompt).__name__}")
        V = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"token ids must be in [0, {V}), got {bad[:4]}")
        return list(prompt)

    def add_request(self, request_id: Hashable, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None):
        """Queue a request (text or token ids); ``params.n`` samples become n sequences."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        ids = self._encode(prompt)
        check_prompt(ids, self.model.config.max_position_embeddings)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but the engine's max_model_len is "
                             f"{self.max_model_len}: no room to generate")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} samples of a request run together, but "
                             f"max_num_seqs is {self.scheduler.max_num_seqs}")
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        seqs = [Sequence.create(ids, nth_sample(params, k), self.max_model_len, self.model.device,
                                self.tokenizer, self.eos_ids, seq_id=next(self._seq_ids),
                                request_id=request_id, index=k,
                                metrics=SequenceMetrics(arrival, prompt_tokens=len(ids)))
                for k in range(params.n)]
        self._requests[request_id] = seqs
        seqs[0].forks = seqs[1:]        # one prefill: the other samples fork from sample 0
        self.scheduler.add(seqs[0])

    def abort(self, request_id: Hashable) -> bool:
        """Stop a request now and free its KV memory at once. False if it is not running
        (unknown, or already finished: a race a server must tolerate)."""
        seqs = self._requests.pop(request_id, None)
        if seqs is None:
            return False
        now = time.perf_counter()
        for s in seqs:
            if not s.is_finished:
                self.scheduler.finish(s, "abort")
                s.metrics.finish_time, s.metrics.finish_step = now, self.step_count
                self._pending.append(StepOutput(request_id, s.index, [], "", "abort", s.metrics))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    @property
    def unfinished_ids(self) -> list:
        """The requests still waiting or running, in the order they were added."""
        return list(self._requests)

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    # ---- one iteration ---------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs, self._pending = self._pending, []
        chunks = self.scheduler.schedule()
        if not chunks:
            return outputs
        start = time.perf_counter()
        for c in chunks:
            m = c.seq.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time, m.first_scheduled_step = start, self.step_count
        record = None
        if self.history is not None:
            # Running sequences left out of this step's budget still hold their memory: 0 tokens.
            slot_of = getattr(self.kv, "slot_of", lambda _: None)
            fed = {id(c.seq): c for c in chunks}
            record = StepRecord(self.step_count, start, start, [
                (s.request_id, s.index, slot_of(s.seq_id), fed[id(s)].num_tokens if id(s) in fed
                 else 0, id(s) in fed and fed[id(s)].samples) for s in self.scheduler.running])
        logits = self.runner.execute(chunks)
        sampled = [c.seq for c in chunks if c.samples]
        for c in chunks:
            c.seq.num_computed += c.num_tokens
        # A request's other samples start now from sample 0's prompt K/V (shared by a paged
        # store) and draw their first token, with their own generators, from the same logits.
        rows = list(range(len(sampled)))
        for i, seq in enumerate(sampled[:]):
            for child in seq.forks:
                self.scheduler.fork(seq, child)
                child.metrics.first_scheduled_time = seq.metrics.first_scheduled_time
                child.metrics.first_scheduled_step = seq.metrics.first_scheduled_step
                sampled.append(child)
                rows.append(i)
            seq.forks = []
        if len(rows) > len(logits):
            logits = logits[rows]
        tokens = sample(logits, [s.params for s in sampled],
                        [s.generator for s in sampled]).tolist() if sampled else []
        now = time.perf_counter()
        for seq, tok in zip(sampled, tokens):
            delta = _append_token(seq, tok, self.tokenizer)
            m = seq.metrics
            m.output_tokens += 1
            if m.first_token_time is None:
                m.first_token_time, m.first_token_step = now, self.step_count
            done = seq.finish_reason is not None
            if done:
                self.scheduler.finish(seq, seq.finish_reason)   # its slot is free at once
                m.finish_time, m.finish_step = now, self.step_count
                self._forget(seq.request_id)
            outputs.append(StepOutput(seq.request_id, seq.index, [tok], delta,
                                      seq.finish_reason, m if done else None))
        if record is not None:
            record.end = now
            self.history.append(record)
        self.step_count += 1
        return outputs

    def _forget(self, request_id):
        seqs = self._requests.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self._requests[request_id]


def _make_store(kv, model, max_num_seqs, max_model_len, block_size, kv_cache_tokens,
                enable_prefix_caching):
    """The engine's KV store from its ``kv`` argument (see ``LLMEngine``)."""
    paged_opts = block_size is not None or kv_cache_tokens is not None or not enable_prefix_caching
    if not isinstance(kv, str):
        if paged_opts:
            raise ValueError("block_size, kv_cache_tokens and enable_prefix_caching configure "
                             "the engine's own paged store, not a store passed as kv")
        return kv
    c, args = model.config, (model.dtype, model.device, model.backend)
    if kv == "slots":
        if paged_opts:
            raise ValueError("block_size, kv_cache_tokens and enable_prefix_caching are "
                             "options of kv='paged', not of kv='slots'")
        return SlotKVPool(c, max_num_seqs, max_model_len, *args)
    if kv != "paged":
        raise ValueError(f"kv must be 'paged', 'slots' or a KV store, got {kv!r}")
    bs = 16 if block_size is None else _positive_int("block_size", block_size)
    per_seq = -(-max_model_len // bs)                 # blocks of one full-length sequence
    blocks = (max_num_seqs * per_seq if kv_cache_tokens is None
              else blocks_for_budget(c, bs, model.dtype, tokens=kv_cache_tokens))
    if blocks < per_seq:
        raise ValueError(f"kv_cache_tokens={kv_cache_tokens} holds {blocks} blocks of {bs} "
                         f"tokens, less than one sequence of max_model_len={max_model_len} "
                         f"needs ({per_seq} blocks)")
    return PagedKVStore(c, blocks, bs, *args, enable_prefix_caching=enable_prefix_caching)
