"""Launch plumbing and device constants shared by the kernels (one place, not one per op).

Host-side only: how big a grid is, which tile sizes and dot precision a launch uses. The
attention kernels' shared device code (the online softmax) is ``softmax.py``.
"""
import functools
import math

import torch

from ._dispatch import import_triton, interpreter_on

try:
    triton = import_triton()
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None

# Softmax in base 2: exp2 is one instruction, exp is exp2 and a multiply. The kernels fold
# LOG2E into the 1/sqrt(D) scale once, so their online softmax runs on exp2 throughout.
LOG2E = 1.4426950408889634

INTERPRETER_SMS = 4   # off CUDA (the interpreter): pretend to be a small GPU so the tests split

DECODE_BLOCK_N = 64   # decode kernels: keys per loop step, a 64 x D tile of K and one of V


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (grids are sized in waves of them)."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 inputs stay exact ("ieee"); 16-bit ones use the tensor
    cores, where "tf32" only matters for fp32 and is ignored for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def qk_scale(head_dim: int) -> float:
    """1/sqrt(D) with LOG2E folded in: scores come out as base-2 logits for exp2."""
    return LOG2E / math.sqrt(head_dim)


def group_rows(G: int) -> tuple[bool, int]:
    """-> (USE_DOT, BLOCK_G) for a decode program that owns the G query heads of one KV head.

    G >= 2 uses tl.dot, whose M must be >= 16: pad the group to 16 rows (masked, never read or
    stored). At G = 1 that would waste 15/16 of each MMA, so reduce with tl.sum instead."""
    use_dot = G > 1
    return use_dot, (max(16, triton.next_power_of_2(G)) if use_dot else 1)


def num_kv_splits(batch_kv_heads: int, seq_len: int, num_sms: int, max_splits: int = 64) -> int:
    """How many chunks to cut each row's KV into (FlashAttention-2's num_splits_heuristic).

    Assumes ~4 resident programs per SM (4 warps each, small shared memory). If B*Hkv programs
    already nearly fill those slots, 1 split (no combine pass). Otherwise pick the fewest splits
    whose last wave is >= 85% as full as the best choice: H100, batch 1, 32 KV heads, 32k
    context -> 14 chunks of 2368 keys = 448 programs on 528 slots.
    """
    slots = 4 * num_sms
    if batch_kv_heads >= 0.8 * slots:
        return 1
    n_blocks = max(1, -(-seq_len // DECODE_BLOCK_N))
    eff = {}
    for s in range(1, min(max_splits, n_blocks) + 1):
        if s > 1 and -(-n_blocks // s) == -(-n_blocks // (s - 1)):
            continue   # same chunk size as s - 1 splits: really s - 1 splits and an empty one
        waves = batch_kv_heads * s / slots
        eff[s] = waves / math.ceil(waves)
    best = max(eff.values())
    return min(s for s, e in eff.items() if e >= 0.85 * best)


def split_plan(seq_len: int, num_splits: int) -> tuple[int, int]:
    """-> (splits, keys per split) that the decode launchers use for ``num_splits``.

    Chunks are whole DECODE_BLOCK_N-key tiles, so asking for 57 splits of 32,768 keys (512
    tiles) gives chunks of ceil(512 / 57) = 9 tiles = 576 keys, and only ceil(512 / 9) = 57 of
    them start before the end: splits that would start past the last key are dropped, never
    launched empty.
    """
    n_blocks = max(1, -(-seq_len // DECODE_BLOCK_N))
    blocks_per_split = -(-n_blocks // max(1, num_splits))
    return -(-n_blocks // blocks_per_split), blocks_per_split * DECODE_BLOCK_N


def prefill_config(T: int, D: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernels (contiguous and paged).
    Untuned but safe on H100/H200: 64x64 tiles of D=128 bf16 are 16 KB each, 2 stages of K and
    V plus q use ~80 KB of shared memory."""
    if device.type != "cuda" and interpreter_on():
        return 16, 32, 4, 1   # small tiles: the tests reach several query and key blocks
    block_m = 64 if T >= 64 else max(16, triton.next_power_of_2(T))
    return block_m, 64, 4, 2
