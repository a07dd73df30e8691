"""Wall-clock timing that waits for the device: a low module that generation and the
benchmarks both use (so ``generate`` need not import ``bench``)."""
from __future__ import annotations

import time


def synchronize(device) -> None:
    """Wait for queued GPU work, so a clock read after it measures the work, not the launch."""
    import torch    # here, not at the top: the CLI imports bench.common before torch is needed
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device=None) -> float:
    """perf_counter after synchronizing ``device`` (if it is a CUDA device)."""
    if device is not None:
        synchronize(device)
    return time.perf_counter()
