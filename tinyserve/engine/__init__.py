"""Continuous batching: many requests share the model, one iteration at a time.

    EngineConfig       every engine option, validated once (config.py)
    LLMEngine          add_request / step / abort: the serving loop, three calls a step
                       (llm_engine.py)
    Scheduler          iteration-level, FCFS, chunked prefill, token budget, preemption;
                       schedule() -> SchedulerOutput, update_from_output(...) (scheduler.py)
    KVCacheManager     the scheduler's KV bookkeeping, no tensors: PagedAttention's blocks,
                       prefix caching, shared samples (kv_cache_manager.py, on
                       block_manager.py's BlockManager); SlotKVCacheManager: the contiguous
                       baseline, one max-length slot per sequence
    ModelRunner        owns the KV tensors; packs a step's tokens without padding, one
                       forward, samples -> ModelRunnerOutput (model_runner.py)
    Sequence           one sample of a request: waiting -> running -> finished (sequence.py)
    StaticBatcher      the static-batching baseline (static.py)
    workload           seeded Poisson arrivals, heavy-tailed lengths, metrics, slot timelines
"""
from .config import EngineConfig
from .kv_cache_manager import KVCacheManager, SlotKVCacheManager, blocks_for_budget
from .llm_engine import LLMEngine, StepOutput, StepRecord
from .model_runner import ModelRunner, ModelRunnerOutput
from .scheduler import (ScheduledChunk, Scheduler, SchedulerOutput, SequenceUpdate,
                        wait_bound_steps)
from .sequence import FINISH_REASONS, Sequence, SequenceMetrics, SequenceStatus, nth_sample
from .static import StaticBatcher

__all__ = ["EngineConfig", "LLMEngine", "StepOutput", "StepRecord", "Scheduler",
           "SchedulerOutput", "SequenceUpdate", "ScheduledChunk", "wait_bound_steps",
           "KVCacheManager", "SlotKVCacheManager", "blocks_for_budget", "ModelRunner",
           "ModelRunnerOutput", "Sequence", "SequenceMetrics", "SequenceStatus",
           "FINISH_REASONS", "nth_sample", "StaticBatcher"]
