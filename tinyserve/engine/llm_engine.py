"""The serving engine: requests come and go, one model step at a time.

    engine = LLMEngine(model, tokenizer, max_num_seqs=8, max_num_batched_tokens=256,
                       max_model_len=1024)
    engine.add_request("a", "The capital of France is", SamplingParams(max_tokens=16))
    while engine.has_unfinished():
        for out in engine.step():          # one StepOutput per sequence that moved
            print(out.request_id, out.text_delta, out.finish_reason)

Each ``step()`` is three calls (vLLM's V1 engine core): the ``Scheduler`` plans the step
(``SchedulerOutput``: which sequences, how many tokens each, their block tables), the
``ModelRunner`` runs it as one packed forward and samples (``ModelRunnerOutput``), and the
scheduler advances its state from that (tokens computed, forks, tokens appended, stops,
finished sequences freed); the engine turns the updates into ``StepOutput``s and metrics.
``add_request`` and ``abort`` may be called between steps.

Faults stay with the request that caused them. A sequence whose sampling raises (a logits
processor, a parameter that slipped past validation) finishes with ``finish_reason="error"``
and the message in ``StepOutput.error``; its KV memory is freed and every other sequence gets
exactly the tokens it would have got alone. If the model step itself raises, the sequences of
that step finish with "error" (nothing of the step is kept: the prefix cache never learns its
blocks) and the engine goes on with the others: no request is lost silently and none can jam
the engine.

The KV cache is paged by default (``KVCacheManager``: blocks taken as sequences grow, prefix
caching, the n samples of a request sharing their prompt's blocks, preemption when the blocks
run out); ``kv="slots"`` selects the contiguous baseline (``SlotKVCacheManager``).
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Hashable

from ..errors import InvalidParameter
from ..generate import check_prompt
from ..sampling import SamplingParams
from .config import UNSET, EngineConfig, given
from .kv_cache_manager import KVCacheManager, SlotKVCacheManager, blocks_for_budget
from .model_runner import ModelRunner, check_kv_fits
from .scheduler import Scheduler, SchedulerOutput, SequenceUpdate
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
    """The options are ``EngineConfig``'s, given one by one (in its field order) or as
    ``config`` (not both): ``max_num_seqs`` sequences run at once, each step feeding at most
    ``max_num_batched_tokens`` tokens; a sequence holds at most ``max_model_len`` tokens
    (prompt + output; default: the model's context); ``record_steps`` keeps a ``StepRecord``
    per step in ``history``.

    The KV cache is allocated up front at 2 * layers * kv_heads * head_dim * bytes per token
    (SmolLM2 in fp32: 46 KB), by ``kv``:
      "paged" (default)  blocks of ``block_size`` tokens (default 16), ``kv_cache_tokens``
                         tokens in all (default: max_num_seqs * max_model_len rounded up to
                         blocks, the slots' memory, so nobody is ever preempted; less memory,
                         or more max_num_seqs in the same memory, is what paging makes
                         possible); prefix caching unless ``enable_prefix_caching=False``;
      "slots"            ``max_num_seqs`` slots of ``max_model_len`` tokens (16 slots of
                         SmolLM2's full 8K context take 6 GB: size ``max_model_len`` to the
                         requests)."""

    scheduler_cls = Scheduler     # the scheduling policy (``StaticBatcher``: static batches)

    def __init__(self, model, tokenizer=None, max_num_seqs=UNSET, max_num_batched_tokens=UNSET,
                 max_model_len=UNSET, kv=UNSET, record_steps: bool = False,
                 block_size=UNSET, kv_cache_tokens=UNSET, enable_prefix_caching=UNSET, *,
                 config: EngineConfig | None = None):
        options = given(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, kv=kv, block_size=block_size,
            kv_cache_tokens=kv_cache_tokens, enable_prefix_caching=enable_prefix_caching)
        if config is not None and options:
            raise ValueError("give the engine's options one by one or as config=, not both")
        self.config = config = (config or EngineConfig(**options)).resolve(model.config,
                                                                              model.dtype)
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = config.max_model_len
        self.eos_ids = tuple(tokenizer.stop_token_ids) if tokenizer is not None else ()
        num_blocks = _num_blocks(config, model)
        check_kv_fits(config, num_blocks, model)   # before the block manager counts them out
        self.scheduler = self.scheduler_cls(_make_manager(config, num_blocks),
                                            config.max_num_seqs, config.max_num_batched_tokens,
                                            tokenizer)
        self.runner = ModelRunner(model, config, num_blocks)
        self._requests: dict[Hashable, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self._pending: list[StepOutput] = []      # abort notices, returned by the next step
        self.step_count = 0
        self.history: list[StepRecord] | None = [] if record_steps else None

    @property
    def kv_cache_manager(self):
        """Who holds which KV memory (the scheduler's): reserved/used tokens, free blocks."""
        return self.scheduler.kv_cache_manager

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
        sched = self.scheduler.schedule()
        if not sched:
            return outputs
        start = time.perf_counter()
        record = self._note_scheduled(sched, start)
        result = self.runner.execute(sched)
        updates = self.scheduler.update_from_output(sched, result)
        now = time.perf_counter()
        outputs += [self._output(u, now) for u in updates]
        if record is not None:
            record.end = now
            self.history.append(record)
        self.step_count += 1
        return outputs

    def _note_scheduled(self, sched: SchedulerOutput, start: float) -> StepRecord | None:
        """First-scheduled times, and the step's record for timelines (``record_steps``)."""
        for c in sched.chunks:
            for s in [c.seq, *c.seq.forks]:
                m = s.metrics
                if m.first_scheduled_time is None:
                    m.first_scheduled_time, m.first_scheduled_step = start, self.step_count
        if self.history is None:
            return None
        # Running sequences left out of this step's budget still hold their memory: 0 tokens.
        slot_of = getattr(self.kv_cache_manager, "slot_of", lambda _: None)
        fed = {id(c.seq): c for c in sched.chunks}
        return StepRecord(self.step_count, start, start, [
            (s.request_id, s.index, slot_of(s.seq_id), fed[id(s)].num_tokens if id(s) in fed
             else 0, id(s) in fed and fed[id(s)].samples) for s in self.scheduler.seated])

    def _output(self, u: SequenceUpdate, now: float) -> StepOutput:
        seq, m = u.seq, u.seq.metrics
        if u.token_ids:
            m.output_tokens += len(u.token_ids)
            if m.first_token_time is None:
                m.first_token_time, m.first_token_step = now, self.step_count
        done = seq.is_finished
        if done:
            m.finish_time, m.finish_step = now, self.step_count
            self._forget(seq.request_id)
        return StepOutput(seq.request_id, seq.index, u.token_ids, u.text_delta,
                          seq.finish_reason, m if done else None, u.error)

    def _forget(self, request_id):
        seqs = self._requests.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self._requests[request_id]


def _num_blocks(config: EngineConfig, model) -> int | None:
    """The paged cache's size in blocks for a resolved ``config`` (None: slots)."""
    if config.kv == "slots":
        return None
    bs = config.block_size
    per_seq = -(-config.max_model_len // bs)          # blocks of one full-length sequence
    blocks = (config.max_num_seqs * per_seq if config.kv_cache_tokens is None
              else blocks_for_budget(model.config, bs, model.dtype,
                                     tokens=config.kv_cache_tokens))
    if blocks < per_seq:
        raise InvalidParameter(f"kv_cache_tokens={config.kv_cache_tokens} holds {blocks} "
                               f"blocks of {bs} tokens, less than one sequence of "
                               f"max_model_len={config.max_model_len} needs ({per_seq} blocks)")
    return blocks


def _make_manager(config: EngineConfig, num_blocks: int | None):
    """The scheduler's KV cache manager: who holds which memory (no tensors)."""
    if num_blocks is None:
        return SlotKVCacheManager(config.max_num_seqs, config.max_model_len)
    return KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
