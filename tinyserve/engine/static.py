"""The static-batching baseline: a batch is formed, runs to its longest member, then the next.

    batcher = StaticBatcher(model, tokenizer, max_batch_size=8, max_model_len=512)
    batcher.add_request(0, prompt_ids, params)      # it is an LLMEngine: same calls
    while batcher.has_unfinished():
        outs = batcher.step()

Static batching is only a scheduling policy, so the baseline is the engine itself (the same
scheduler, model runner and forward) with ``StaticScheduler`` in place of the iteration-level
one: waiting requests (all that have arrived, up to ``max_batch_size``) are admitted together,
and only when the previous batch has completely finished. Every member keeps its seat and its
KV slot until the LAST one finishes, and nobody new can join: that is what "static" means, and
what continuous batching removes (claim C14). Requests that arrive meanwhile queue for the next
batch. The batch's prompts are prefilled together in one step (the token budget is sized for
it), as a padded batch would.

Generous to the baseline, on two counts. A finished member holds its seat but costs no compute
(the runner packs tokens, so there is no padding row to carry), where a padded static batch
keeps computing it. And each row's tokens are handed out as they are made, so a request's
finish time is its own last token, not the end of its batch (HF ``generate``, measured beside
it by the serving benchmark, returns everything at the end of the batch).
"""
from __future__ import annotations

from ..errors import positive_int
from .config import EngineConfig
from .llm_engine import LLMEngine
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus


class StaticScheduler(Scheduler):
    """Admits a batch only when the last one has finished; finished members hold their seat
    and KV memory (``held``) until then."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held: list[Sequence] = []

    def _may_admit(self) -> bool:
        return not self.running

    @property
    def seated(self) -> list[Sequence]:
        return sorted(self.running + self.held, key=lambda s: s.seq_id)

    def finish(self, seq: Sequence, reason: str):
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            seq.finish(reason)
            self.held.append(seq)
        else:
            super().finish(seq, reason)
        if not self.running:               # the batch is over: every seat is free at once
            for s in self.held:
                self.kv_cache_manager.free(s)
            self.held = []


class StaticBatcher(LLMEngine):
    """Up to ``max_batch_size`` requests per batch, one contiguous KV slot of
    ``max_model_len`` tokens each (default: the model's context; size it to the requests:
    16 slots of SmolLM2's 8K context take 6 GB). One sample per request."""
    scheduler_cls = StaticScheduler

    def __init__(self, model, tokenizer=None, max_batch_size: int = 16,
                 record_steps: bool = False, max_model_len: int | None = None):
        positive_int("max_batch_size", max_batch_size)
        mml = model.config.max_position_embeddings if max_model_len is None else max_model_len
        config = EngineConfig(max_batch_size, max_batch_size * mml, mml, "slots",
                              seqs_name="max_batch_size")
        super().__init__(model, tokenizer, record_steps=record_steps, config=config)

    def add_request(self, request_id, prompt, params=None, arrival_time=None):
        if params is not None and getattr(params, "n", 1) != 1:
            raise ValueError("the static baseline runs one sample per request: use n=1")
        super().add_request(request_id, prompt, params, arrival_time)
