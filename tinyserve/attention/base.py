"""What every backend's metadata has in common."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class AttentionMetadata:
    """Built once per forward by ``backend``; every layer calls
    ``backend.forward(q, k, v, kv_cache, metadata)`` with its own ``kv_cache``.

    q [B, Hq, T, D] and k, v [B, Hkv, T, D] are this forward's tokens after RoPE (the packed
    backends see B = 1, T = N tokens of many sequences); the result is o [B, Hq, T, D]."""
    backend: Any
