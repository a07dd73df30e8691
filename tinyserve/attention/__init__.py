"""One attention interface for the model, several ways to keep K/V (after vLLM's backends).

The model computes q, k, v (after RoPE) and hands them to ``attn_metadata.backend.forward``
with its layer's cache; it never asks what kind of cache that is. A backend is chosen once,
by whoever owns the cache tensors (``LLMEngine``'s model runner, ``Transformer.run``), and
builds one metadata object per forward that every layer reads:

    ContiguousBackend  rows of a preallocated ``KVCache`` [B, Hkv, max_len, D] (generate,
                       speculative decoding, CUDA graphs), or no cache at all (recompute)
    SlotBackend        the engine's contiguous baseline: one max-length KVCache row ("slot")
                       per sequence, the step's tokens packed into one row of N
    PagedBackend       PagedAttention: block pools [num_blocks, block_size, Hkv, D] per layer,
                       a block table per sequence, packed tokens

Kernels (``ops.attention``, ``ops.paged_attention``, ...) are picked by the kernel backend
string ("ref" | "triton" | "auto") every backend is built with: the model's.
"""
from .base import AttentionMetadata
from .contiguous import ContiguousBackend, ContiguousMetadata
from .paged import PagedBackend, PagedMetadata
from .slots import SlotBackend, SlotMetadata

__all__ = ["AttentionMetadata", "ContiguousBackend", "ContiguousMetadata", "PagedBackend",
           "PagedMetadata", "SlotBackend", "SlotMetadata"]
