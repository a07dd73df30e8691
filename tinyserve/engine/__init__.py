"""Continuous batching: many requests share the model, one iteration at a time.

    EngineConfig   every engine option, validated once (config.py)
    LLMEngine      add_request / step / abort: the serving loop (llm_engine.py)
    Scheduler      iteration-level, FCFS, chunked prefill, token budget (scheduler.py)
    ModelRunner    packs a step's tokens without padding, one forward (model_runner.py)
    PagedKVStore   the default KV store: PagedAttention's blocks, prefix caching, shared
                   samples (paged_store.py, on block_manager.py's BlockManager)
    SlotKVPool     the contiguous baseline: one max-length slot per sequence (kv_pool.py,
                   which also documents the store protocol both implement)
    Sequence       one sample of a request: waiting -> running -> finished (sequence.py)
    StaticBatcher  the static-batching baseline (static.py)
    workload       seeded Poisson arrivals, heavy-tailed lengths, metrics, slot timelines
"""
from .config import EngineConfig
from .kv_pool import PackedBatch, SlotKVPool
from .llm_engine import LLMEngine, StepOutput, StepRecord
from .model_runner import ModelRunner
from .paged_store import PagedKVStore
from .scheduler import ScheduledChunk, Scheduler, wait_bound_steps
from .sequence import FINISH_REASONS, Sequence, SequenceMetrics, SequenceStatus, nth_sample
from .static import StaticBatcher

__all__ = ["EngineConfig", "LLMEngine", "StepOutput", "StepRecord", "Scheduler", "ScheduledChunk",
           "wait_bound_steps", "ModelRunner", "PagedKVStore", "SlotKVPool", "PackedBatch",
           "Sequence", "SequenceMetrics", "SequenceStatus", "FINISH_REASONS", "nth_sample",
           "StaticBatcher"]
