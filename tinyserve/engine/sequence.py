"""One sample of one request, as the engine tracks it: a small state machine.

    WAITING --admit--> RUNNING --stop / length--> FINISHED
       ^                  |
       +----preempt-------+        (any live state) --abort / error--> FINISHED

A Sequence is a ``generate.Row`` (prompt, params, generator, stop ids, token limit, output,
streamed text) plus what scheduling needs. ``num_computed`` counts the leading tokens of
``prompt + out`` whose K/V are in the KV cache; the rest are *pending* and are fed to the model
by the next steps: the whole prompt at first (in chunks when it is long), then exactly one token
per decode step (the last sampled one). A sequence is sampled in a step only when that step's
chunk consumes all its pending tokens. Preemption (``preempt``) drops the KV and sets
``num_computed = 0``: the sequence goes back to waiting and later re-prefills ``prompt + out``
(recomputation; what a prefix cache still holds is skipped), continuing exactly where it stopped.

Parallel sampling (n > 1): samples 1..n-1 of a request wait in sample 0's ``forks``, in no
queue. Once sample 0's prompt is computed they are forked from it (``Scheduler.fork``): they
start from its K/V (one prefill for all) and sample their first token from the same logits.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Hashable

from ..generate import Row
from ..sampling import SamplingParams

FINISH_REASONS = ("stop", "length", "abort", "error")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SequenceMetrics:
    """Wall-clock times (``time.perf_counter``) and engine step numbers of one sequence."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    first_scheduled_step: int | None = None
    first_token_step: int | None = None
    finish_step: int | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    cached_tokens: int | None = None    # prompt tokens the prefix cache held at admission

    @classmethod
    def merge(cls, ms: list["SequenceMetrics"]) -> "SequenceMetrics":
        """One request's metrics from its n samples': first events, last finish, all tokens."""
        def first(name):
            vals = [getattr(m, name) for m in ms if getattr(m, name) is not None]
            return min(vals) if vals else None
        fin = [m.finish_time for m in ms]
        return cls(ms[0].arrival_time, first("first_scheduled_time"), first("first_token_time"),
                   None if None in fin else max(fin), first("first_scheduled_step"),
                   first("first_token_step"),
                   None if None in fin else max(m.finish_step for m in ms),
                   ms[0].prompt_tokens, sum(m.output_tokens for m in ms),
                   sum(m.preemptions for m in ms), ms[0].cached_tokens)

    def as_dict(self) -> dict:
        d = dict(vars(self))
        t0 = self.arrival_time
        for name in ("first_scheduled", "first_token", "finish"):
            t = d[f"{name}_time"]
            d[f"{name}_s"] = None if t is None else t - t0   # relative to arrival
        d["queue_s"] = d.pop("first_scheduled_s")
        d["ttft_s"] = d.pop("first_token_s")
        d["e2e_s"] = d.pop("finish_s")
        n, ft, fin = self.output_tokens, self.first_token_time, self.finish_time
        # time per output token after the first (None when there is no second token)
        d["tpot_s"] = (fin - ft) / (n - 1) if n > 1 and fin is not None else None
        return d


def nth_sample(params: SamplingParams, k: int) -> SamplingParams:
    """The k-th of a request's n samples: its own seed (seed + k), so the samples differ
    reproducibly and each one's tokens do not depend on its batch neighbours."""
    return replace(params, n=1, seed=None if params.seed is None else params.seed + k)


@dataclass
class Sequence(Row):
    seq_id: int = -1
    request_id: Hashable = None
    index: int = 0                    # which of the request's n samples
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0             # leading tokens of prompt + out with K/V in the cache
    metrics: SequenceMetrics | None = field(default=None, repr=False)
    forks: list["Sequence"] = field(default_factory=list, repr=False, compare=False)
    error: str | None = None          # why it finished with "error"

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.out)

    @property
    def num_pending(self) -> int:
        """Tokens to feed before the next sample: the (rest of the) prompt, or 1 in decode."""
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_pending > 1 or not self.out

    def token_ids(self, start: int, end: int) -> list[int]:
        p = len(self.prompt)
        return (self.prompt[start:end] if end <= p
                else self.prompt[start:] + self.out[max(start - p, 0):end - p])

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # ---- transitions (each checks where it comes from: a wrong one is an engine bug) ----
    def _move(self, frm: tuple, to: SequenceStatus):
        if self.status not in frm:
            raise RuntimeError(f"sequence {self.seq_id}: cannot go from {self.status.value} "
                               f"to {to.value}")
        self.status = to

    def admit(self):
        self._move((SequenceStatus.WAITING,), SequenceStatus.RUNNING)

    def preempt(self):
        """Running -> waiting; its KV is gone (the caller frees it), so all is pending again."""
        self._move((SequenceStatus.RUNNING,), SequenceStatus.WAITING)
        self.num_computed = 0
        self.metrics.preemptions += 1

    def finish(self, reason: str):
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        self._move((SequenceStatus.WAITING, SequenceStatus.RUNNING), SequenceStatus.FINISHED)
        self.finish_reason = reason
