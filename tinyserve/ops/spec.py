"""What an op declares so the shared runner (``python -m tinyserve.bench ops``) can time it.

Each ``tinyserve/ops/<op>.py`` defines ``bench_cases(device, small) -> list[BenchCase]``.
``small=True`` gives shapes the CPU can run in seconds (CI checks the harness works);
``small=False`` gives the real shapes (e.g. Llama-2-7B projections, 32k-token contexts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class BenchCase:
    op: str                      # "linear", "decode_attention", ...
    name: str                    # the shape, e.g. "M=1 K=4096 N=11008 bf16"
    # Allocates the inputs on the device and returns {implementation: zero-arg callable}.
    # Keys: "triton" (ours), "ref" (our eager reference) and peers such as "cublas" or "sdpa".
    # Lazy so that only one case's tensors are alive at a time.
    setup: Callable[[], dict[str, Callable[[], Any]]]
    bytes: int                   # the minimum bytes one call must move to/from DRAM
    flops: int = 0
    ours: str = "triton"
    peers: tuple[str, ...] = ()  # implementations to report ratios against
    meta: dict = field(default_factory=dict)
