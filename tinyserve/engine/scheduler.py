"""Iteration-level scheduling: which sequences run in the next step, and with how many tokens.

Every step is planned afresh (Orca's iteration-level scheduling), so a sequence that finishes
leaves the batch at once and a waiting one takes its place in the very next step. A step spends
a budget of ``max_num_batched_tokens`` tokens, in this order:

1. every running sequence in decode: 1 token each (``max_num_batched_tokens >= max_num_seqs``
   is required, so decodes always fit and a running sequence never stalls);
2. running sequences whose prompt is not fully consumed yet: the next chunk of it;
3. waiting sequences, first come first served, while ``max_num_seqs``, the token budget and the
   KV store allow: each gets the first chunk of its prompt (nobody, in a step that preempted).

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

Preemption by recomputation, for KV stores that can run out of memory mid-sequence (a paged
store grows each sequence block by block): when a running sequence cannot grow, the most
recently admitted running sequence is preempted (``preempt``: running -> head of the queue, KV
freed, prompt + output re-prefilled when it is admitted again), as vLLM does. The slot pool
never runs out: a sequence's slot holds ``max_model_len`` tokens from its admission on.

Prefix caching: on admission the store may answer that the first tokens of a sequence are
already cached (a paged store's blocks of an identical earlier prefix); the sequence starts
with those computed and only the rest is prefilled. Parallel sampling: a request of n samples
is admitted as sample 0 with ``n - 1`` seats kept for its ``forks``, which join the running
sequences (``fork``) once sample 0's prompt is computed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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


def wait_bound_steps(tokens_ahead: int, max_num_batched_tokens: int, decodes: int) -> int:
    """The no-starvation bound of the module docstring (a free slot assumed)."""
    return tokens_ahead // (max_num_batched_tokens - decodes) + 1


class Scheduler:
    def __init__(self, kv, max_num_seqs: int, max_num_batched_tokens: int):
        check_budgets(max_num_seqs, max_num_batched_tokens)
        self.kv = kv
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []        # in admission order

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        out = []
        queue = ([s for s in self.running if not s.in_prefill]        # decodes first
                 + [s for s in self.running if s.in_prefill])
        n_waiting = len(self.waiting)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = min(seq.num_pending, budget)
            if not self._make_room(seq, seq.num_computed + n, queue):
                continue                                  # seq itself was preempted
            self.kv.allocate(seq, seq.num_computed + n)   # the slot pool: already has room
            out.append(ScheduledChunk(seq, n))
            budget -= n
        # If memory ran short (someone was preempted back into the queue), admit nobody this
        # step: the preempted would come straight back and be preempted again.
        admit = len(self.waiting) == n_waiting
        seats = len(self.running) + sum(len(s.forks) for s in self.running)   # forks to come
        while admit and self.waiting and budget > 0:
            seq = self.waiting[0]
            n = min(seq.num_pending, budget)
            if (seats + 1 + len(seq.forks) > self.max_num_seqs
                    or not self.kv.can_allocate(seq, seq.num_computed + n)):
                break                                     # FCFS: nobody overtakes the head
            self.waiting.popleft()
            # Nothing of a waiting sequence is computed; the store may hold a cached prefix.
            seq.num_computed = self.kv.allocate(seq, seq.num_computed + n)
            if seq.metrics is not None and seq.metrics.cached_tokens is None:
                seq.metrics.cached_tokens = seq.num_computed    # vLLM's num_cached_tokens
            n = min(seq.num_pending, budget)
            seq.admit()
            self.running.append(seq)
            seats += 1 + len(seq.forks)
            out.append(ScheduledChunk(seq, n))
            budget -= n
        return out

    def _make_room(self, seq: Sequence, num_tokens: int, queue: list) -> bool:
        """A running ``seq`` must grow to ``num_tokens``: while the store says no, preempt the
        most recently admitted sequence not yet served this step (``seq`` itself if it is the
        latest). -> False if ``seq`` was preempted. Never happens with the slot pool."""
        while not self.kv.can_allocate(seq, num_tokens):
            victim = max(queue + [seq], key=self.running.index)
            self.preempt(victim)
            if victim is seq:
                return False
            queue.remove(victim)
        return True

    def preempt(self, seq: Sequence):
        """Running -> head of the queue, its KV memory freed: it will be recomputed (prompt +
        output so far re-prefilled) when admitted again, before anybody who came later."""
        self.running.remove(seq)
        seq.preempt()
        self.kv.free(seq)
        self.waiting.appendleft(seq)

    def fork(self, parent: Sequence, child: Sequence):
        """``child`` (a sample in ``parent.forks``, seat kept) starts running with the
        parent's computed prompt: the store shares or copies its K/V."""
        self.kv.fork(parent, child)
        child.num_computed = parent.num_computed
        child.admit()
        self.running.append(child)

    def finish(self, seq: Sequence, reason: str):
        """Retire ``seq`` (finished or aborted) and free its KV memory at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:         # not a sample still to be forked (in no queue)
            self.waiting.remove(seq)
        seq.finish(reason)
        self.kv.free(seq)
