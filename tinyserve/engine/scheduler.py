"""Iteration-level scheduling: which sequences run in the next step, and with how many tokens.

Every step is planned afresh (Orca's iteration-level scheduling), so a sequence that finishes
leaves the batch at once and a waiting one takes its place in the very next step. A step spends
a budget of ``max_num_batched_tokens`` tokens, in this order:

1. every running sequence in decode: 1 token each (``max_num_batched_tokens >= max_num_seqs``
   is required, so decodes always fit and a running sequence never stalls);
2. running sequences whose prompt is not fully consumed yet: the next chunk of it;
3. waiting sequences, first come first served, while ``max_num_seqs``, the token budget and the
   KV cache allow: each gets the first chunk of its prompt (nobody, in a step that preempted).

A prompt longer than what is left of the budget is cut into chunks over several steps (chunked
prefill): a 2,000-token prompt does not freeze the decodes of everybody else for one long step,
and the budget bounds every step's work. A sequence is sampled only in the step whose chunk
consumes the last of its pending tokens.

No starvation. Admission is strictly FCFS: when the head of the queue cannot be admitted (no
free slot or KV memory) nobody behind it is, so a later request never overtakes an earlier one,
and the head is never blocked by the token budget (it is chunked instead). Requests that arrive
*after* a request r cannot delay r at all: they wait behind it. The bound on r's wait, in
steps, follows from the budget. Let P be the prompt tokens not yet prefilled of all sequences
ahead of r (running or waiting) when r arrives, and D <= max_num_seqs - 1 the decodes that run
each step while r waits. Each step gives at least ``max_num_batched_tokens - D`` tokens to
the work ahead of r, and r gets its first chunk in the first step with budget left over, so

    steps until r is first scheduled <= floor(P / (max_num_batched_tokens - D)) + 1

provided a slot (KV memory) is free for r then (``wait_bound_steps``). When every slot is
taken, r waits in addition for a running sequence to finish: at most the smallest remaining
``max_tokens`` (plus prefill steps) of the running ones. ``tests/test_engine_scheduler.py``
checks both: the bound under a flood of long prompts, and that later arrivals change nothing.

Preemption by recomputation, for KV caches that can run out of memory mid-sequence (a paged
cache grows each sequence block by block): when a running sequence cannot grow, the most
recently admitted running sequence is preempted (``preempt``: running -> head of the queue, KV
freed, prompt + output re-prefilled when it is admitted again), as vLLM does. The slot pool
never runs out: a sequence's slot holds ``max_model_len`` tokens from its admission on.

Prefix caching: on admission the manager may answer that the first tokens of a sequence are
already cached (a paged cache's blocks of an identical earlier prefix); the sequence starts
with those computed and only the rest is prefilled. Parallel sampling: a request of n samples
is admitted as sample 0 with ``n - 1`` seats kept for its ``forks``, which join the running
sequences (``fork``) once sample 0's prompt is computed.

Ownership (vLLM's V1 split). The scheduler owns the ``KVCacheManager`` (who holds which
blocks; no tensors) and every ``Sequence``'s state. ``schedule()`` returns a
``SchedulerOutput`` (which sequences, how many tokens each, their block tables, the KV copies
due first, which sequences sample from which logits row); the model runner turns it into one
forward and returns a ``ModelRunnerOutput``; ``update_from_output`` then advances the state:
tokens computed, forks, sampled tokens appended, stops checked, finished sequences freed.
Nothing advances for a step that failed, so a failure never leaves the state half-moved.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..generate import append_token
from .config import check_budgets
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int                 # tokens fed this step: seq's tokens [ctx, ctx + num_tokens)

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence's pending tokens: sample after it."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step's plan, everything the model runner needs and nothing it may change."""
    chunks: list[ScheduledChunk] = field(default_factory=list)   # in packing order
    block_tables: list[list[int]] = field(default_factory=list)  # per chunk (a slot: [slot])
    kv_copies: list = field(default_factory=list)     # due before the step writes any K/V
    sampled: list[Sequence] = field(default_factory=list)        # who draws a token after it
    sample_rows: list[int] = field(default_factory=list)  # each one's row among the sampling
    #   chunks' logits (the n samples of a request draw from their prompt's one row)
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)  # (parent, child)

    def __bool__(self) -> bool:
        return bool(self.chunks)


@dataclass
class SequenceUpdate:
    """What ``update_from_output`` did to one sequence."""
    seq: Sequence
    token_ids: list[int]            # the token appended (none for an error)
    text_delta: str
    error: str | None = None        # why it finished with "error"


def wait_bound_steps(tokens_ahead: int, max_num_batched_tokens: int, decodes: int) -> int:
    """The no-starvation bound of the module docstring (a free slot assumed)."""
    return tokens_ahead // (max_num_batched_tokens - decodes) + 1


class Scheduler:
    """``kv_cache_manager``: a ``KVCacheManager`` or ``SlotKVCacheManager``; ``tokenizer``
    (optional) detokenizes sampled tokens and enables stop strings."""

    def __init__(self, kv_cache_manager, max_num_seqs: int, max_num_batched_tokens: int,
                 tokenizer=None):
        check_budgets(max_num_seqs, max_num_batched_tokens)
        self.kv_cache_manager, self.tokenizer = kv_cache_manager, tokenizer
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []        # in admission order

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning a step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        chunks = self._chunks()
        kv = self.kv_cache_manager
        out = SchedulerOutput(chunks, [kv.block_table(c.seq) for c in chunks],
                              kv.take_copies([c.seq for c in chunks]))
        row = 0
        for c in chunks:
            if c.samples:
                # A request's other samples start from sample 0's prompt K/V once it is
                # computed, and draw their first token, each with its own generator, from
                # the same logits row.
                for s in [c.seq, *c.seq.forks]:
                    out.sampled.append(s)
                    out.sample_rows.append(row)
                out.forks += [(c.seq, child) for child in c.seq.forks]
                row += 1
        return out

    def _chunks(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        kv, out = self.kv_cache_manager, []
        queue = ([s for s in self.running if not s.in_prefill]        # decodes first
                 + [s for s in self.running if s.in_prefill])
        n_waiting = len(self.waiting)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_pending, budget)
            if not self._make_room(seq, seq.num_computed + n, queue):
                continue                                  # seq itself was preempted
            kv.allocate(seq, seq.num_computed + n)        # the slot pool: already has room
            out.append(ScheduledChunk(seq, n))
            budget -= n
        # If memory ran short (someone was preempted back into the queue), admit nobody this
        # step: the preempted would come straight back and be preempted again.
        admit = len(self.waiting) == n_waiting and self._may_admit()
        seats = len(self.running) + sum(len(s.forks) for s in self.running)   # forks to come
        while admit and self.waiting and budget > 0:
            seq = self.waiting[0]
            n = min(seq.num_pending, budget)
            if (seats + 1 + len(seq.forks) > self.max_num_seqs
                    or not kv.can_allocate(seq, seq.num_computed + n)):
                break                                     # FCFS: nobody overtakes the head
            self.waiting.popleft()
            # Nothing of a waiting sequence is computed; the cache may hold a prefix of it.
            seq.num_computed = kv.allocate(seq, seq.num_computed + n)
            if seq.metrics is not None and seq.metrics.cached_tokens is None:
                seq.metrics.cached_tokens = seq.num_computed    # vLLM's num_cached_tokens
            n = min(seq.num_pending, budget)
            seq.admit()
            self.running.append(seq)
            seats += 1 + len(seq.forks)
            out.append(ScheduledChunk(seq, n))
            budget -= n
        return out

    def _may_admit(self) -> bool:
        """Iteration-level scheduling: a waiting request may join at any step."""
        return True

    @property
    def seated(self) -> list[Sequence]:
        """The sequences holding a seat (and KV memory) now, in admission order."""
        return self.running

    def _make_room(self, seq: Sequence, num_tokens: int, queue: list) -> bool:
        """A running ``seq`` must grow to ``num_tokens``: while the cache says no, preempt the
        most recently admitted sequence not yet served this step (``seq`` itself if it is the
        latest). -> False if ``seq`` was preempted. Never happens with slots."""
        while not self.kv_cache_manager.can_allocate(seq, num_tokens):
            victim = max(queue + [seq], key=self.running.index)
            self.preempt(victim)
            if victim is seq:
                return False
            queue.remove(victim)
        return True

    # ---- after the step ----------------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, result) -> list[SequenceUpdate]:
        """Advance the state by one step the runner finished (``result``: its
        ``ModelRunnerOutput``). A step whose forward failed ends all its sequences (and the
        samples waiting to fork from them) with "error"; a sequence whose sampling failed ends
        alone. -> one update per sequence that moved, in ``sched.sampled`` order."""
        if result.error is not None:
            failed = [s for c in sched.chunks for s in [c.seq, *c.seq.forks]]
            for c in sched.chunks:
                c.seq.forks = []
            return [self._fail(s, result.error) for s in failed]
        kv = self.kv_cache_manager
        for c in sched.chunks:
            c.seq.num_computed += c.num_tokens
            kv.mark_computed(c.seq)       # written now: its full blocks may be shared
        for parent, child in sched.forks:
            self.fork(parent, child)
            parent.forks = []
        updates = []
        for seq, tok, err in zip(sched.sampled, result.token_ids, result.errors):
            if err is not None:
                updates.append(self._fail(seq, err))
                continue
            delta = append_token(seq, tok, self.tokenizer)
            if seq.finish_reason is not None:
                self.finish(seq, seq.finish_reason)       # its memory is free at once
            updates.append(SequenceUpdate(seq, [tok], delta))
        return updates

    def _fail(self, seq: Sequence, message: str) -> SequenceUpdate:
        self.finish(seq, "error")
        seq.error = message
        return SequenceUpdate(seq, [], "", message)

    # ---- transitions -----------------------------------------------------------------------
    def preempt(self, seq: Sequence):
        """Running -> head of the queue, its KV memory freed: it will be recomputed (prompt +
        output so far re-prefilled) when admitted again, before anybody who came later."""
        self.running.remove(seq)
        seq.preempt()
        self.kv_cache_manager.free(seq)
        self.waiting.appendleft(seq)

    def fork(self, parent: Sequence, child: Sequence):
        """``child`` (a sample in ``parent.forks``, seat kept) starts running with the
        parent's computed prompt: the cache shares or copies its K/V."""
        self.kv_cache_manager.fork(parent, child)
        child.num_computed = parent.num_computed
        child.admit()
        self.running.append(child)

    def finish(self, seq: Sequence, reason: str):
        """Retire ``seq`` (finished, aborted or failed) and free its KV memory at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:         # not a sample still to be forked (in no queue)
            self.waiting.remove(seq)
        seq.finish(reason)
        self.kv_cache_manager.free(seq)
