"""Decode without launch overhead: capture one decode step in a CUDA graph, replay per token.

A decode step of a small model is ~10 kernels per layer, each only a few microseconds of work:
launched one by one from Python, the CPU cannot keep the GPU busy. A CUDA graph records the
whole step once (same kernels, same buffers) and replays it with one launch. That needs static
shapes and addresses: a fixed batch, input ids copied into one buffer, the cache preallocated,
and no host synchronisation inside the step (``Transformer.decode_step`` is written for that).
"""
from __future__ import annotations

import torch

from .kv_cache import KVCache


class GraphedDecodeStep:
    """``step(ids [B, 1]) -> logits [B, 1, V]`` for one (model, cache) pair, via graph replay.

    Each replay appends one token per row to ``cache``, exactly like ``model.decode_step``.
    The returned logits live in a static buffer overwritten by the next replay.
    """

    def __init__(self, model, cache: KVCache, warmup: int = 2):
        if not model.device.type == "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        B = cache.batch_size
        if int(cache.lengths.max()) + warmup + 1 > cache.max_seq_len:
            raise ValueError("cache has no room for the warm-up and capture steps")
        self.model, self.cache = model, cache
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=model.device)
        saved = cache.lengths.clone()
        # Warm up on a side stream (Triton autotuning, cuBLAS workspaces, allocator) before
        # capture; those steps write junk past each row's length and are then rolled back.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                model.decode_step(self.ids, cache)
        torch.cuda.current_stream().wait_stream(side)
        cache.lengths.copy_(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.ids, cache)
        cache.lengths.copy_(saved)  # capture does not run the kernels, but be explicit

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids.view_as(self.ids))
        self.graph.replay()
        return self.logits
