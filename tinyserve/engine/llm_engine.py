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

Faults stay with the request that caused them. A sequence whose sampling raises (a logits
processor, a parameter that slipped past validation) finishes with ``finish_reason="error"``
and the message in ``StepOutput.error``; its KV memory is freed and every other sequence gets
exactly the tokens it would have got alone (seeded generators are rewound before the rows are
retried one by one). If the model step itself raises, the sequences of that step finish with
"error" (nothing of the step is kept: the prefix cache never learns its blocks) and the engine
goes on with the others: no request is lost silently and none can jam the engine.

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

from ..generate import append_token, check_prompt
from ..sampling import SamplingParams, sample
from .config import KV_KINDS, EngineConfig
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
    finish_reason: str | None            # "stop" | "length" | "abort" | "error" | None
    metrics: SequenceMetrics | None = None   # set once finished
    error: str | None = None             # what raised, when finish_reason is "error"


@dataclass
class StepRecord:
    """One engine step, for timelines: who ran, in which KV slot, with how many tokens."""
    step: int
    start: float
    end: float
    # (request_id, index, slot or None, tokens fed, sampled this step)
    entries: list[tuple] = field(default_factory=list)


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
                 kv_cache_tokens: int | None = None, enable_prefix_caching: bool = True, *,
                 config: EngineConfig | None = None):
        """The options are ``EngineConfig``'s: pass them one by one or as ``config`` (not
        both). ``kv`` may also be a KV store object, used as is."""
        store = None
        if not isinstance(kv, str):
            if block_size is not None or kv_cache_tokens is not None or not enable_prefix_caching:
                raise ValueError("block_size, kv_cache_tokens and enable_prefix_caching "
                                 "configure the engine's own paged store, not a store passed "
                                 "as kv")
            store, kv = kv, "paged"
        elif kv not in KV_KINDS:
            raise ValueError(f"kv must be 'paged', 'slots' or a KV store, got {kv!r}")
        options = (max_num_seqs, max_num_batched_tokens, max_model_len, kv, block_size,
                   kv_cache_tokens, enable_prefix_caching)
        if config is None:
            config = EngineConfig(max_num_seqs, max_num_batched_tokens, max_model_len, kv,
                                  block_size, kv_cache_tokens, None, enable_prefix_caching)
        elif options != _DEFAULT_OPTIONS or store is not None:
            raise ValueError("give the engine's options one by one or as config=, not both")
        self.config = config = config.resolve(model.config, model.dtype)
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = config.max_model_len
        self.eos_ids = tuple(tokenizer.stop_token_ids) if tokenizer is not None else ()
        self.kv = store if store is not None else _make_store(config, model)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
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
        try:
            logits = self.runner.execute(chunks)
        except Exception as e:     # the whole step failed: its sequences end, the rest go on
            msg = f"model step failed: {type(e).__name__}: {e}"
            now = time.perf_counter()
            for c in chunks:
                outputs += [self._fail(s, msg, now) for s in [c.seq, *c.seq.forks]]
                c.seq.forks = []
            return self._end_step(outputs, record, now)
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
        tokens, errors = self._sample(logits, sampled) if sampled else ([], {})
        now = time.perf_counter()
        for i, (seq, tok) in enumerate(zip(sampled, tokens)):
            if i in errors:
                outputs.append(self._fail(seq, errors[i], now))
                continue
            delta = append_token(seq, tok, self.tokenizer)
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
        return self._end_step(outputs, record, now)

    def _end_step(self, outputs, record, now) -> list[StepOutput]:
        if record is not None:
            record.end = now
            self.history.append(record)
        self.step_count += 1
        return outputs

    @staticmethod
    def _sample(logits, seqs) -> tuple[list[int], dict[int, str]]:
        """One token per sequence, and {row: message} for rows whose sampling raised. The
        batch is tried whole first; if it raises, seeded generators are rewound and each row
        is retried alone, so one bad row cannot change its neighbours' tokens."""
        params, gens = [s.params for s in seqs], [s.generator for s in seqs]
        outs = [s.out for s in seqs]
        states = [None if g is None else g.get_state() for g in gens]
        try:
            return sample(logits, params, gens, outs).tolist(), {}
        except Exception:
            for g, st in zip(gens, states):
                if g is not None:
                    g.set_state(st)
        tokens, errors = [], {}
        for i in range(len(seqs)):
            try:
                tokens.append(int(sample(logits[i:i + 1], params[i:i + 1], gens[i:i + 1],
                                         outs[i:i + 1])[0]))
            except Exception as e:
                tokens.append(-1)
                errors[i] = f"sampling failed: {type(e).__name__}: {e}"
        return tokens, errors

    def _fail(self, seq: Sequence, message: str, now: float) -> StepOutput:
        """Finish ``seq`` with "error" (its KV memory freed) -> its last StepOutput."""
        self.scheduler.finish(seq, "error")
        seq.error = message
        m = seq.metrics
        m.finish_time, m.finish_step = now, self.step_count
        self._forget(seq.request_id)
        return StepOutput(seq.request_id, seq.index, [], "", "error", m, error=message)

    def _forget(self, request_id):
        seqs = self._requests.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self._requests[request_id]


_DEFAULT_OPTIONS = (16, 512, None, "paged", None, None, True)   # LLMEngine's own defaults


def _make_store(config: EngineConfig, model):
    """The engine's own KV store for a resolved ``config``."""
    c, args = model.config, (model.dtype, model.device, model.backend)
    if config.kv == "slots":
        return SlotKVPool(c, config.max_num_seqs, config.max_model_len, *args)
    bs = config.block_size
    per_seq = -(-config.max_model_len // bs)          # blocks of one full-length sequence
    blocks = (config.max_num_seqs * per_seq if config.kv_cache_tokens is None
              else blocks_for_budget(c, bs, model.dtype, tokens=config.kv_cache_tokens))
    if blocks < per_seq:
        raise ValueError(f"kv_cache_tokens={config.kv_cache_tokens} holds {blocks} blocks of "
                         f"{bs} tokens, less than one sequence of max_model_len="
                         f"{config.max_model_len} needs ({per_seq} blocks)")
    return PagedKVStore(c, blocks, bs, *args, enable_prefix_caching=config.enable_prefix_caching)
