"""What attention means, and what its Triton kernels accept: below every attention module.

``attention_ref`` is the definition of correct for all of them (contiguous or paged, decode or
prefill); ``check_attention_args`` and ``kernel_supports`` say which inputs the kernels take.
``attention.py`` (the dispatcher), the kernel modules and ``paged_attention.py`` import from
here, so imports flow one way: dispatcher -> kernels -> this file.
"""
import math

import torch

KERNEL_HEAD_DIMS = (64, 128)   # what the Triton kernels are compiled for (LLaMA-family sizes)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  q_pos: torch.Tensor, kv_len: torch.Tensor) -> torch.Tensor:
    """q: [B, Hq, T, D]; k, v: [B, Hkv, S, D]; q_pos: [B, T]; kv_len: [B] -> [B, Hq, T, D].

    Bytes: reads B*Hkv*S*D elements of K and of V once per call (shared by the Hq/Hkv query
    heads of a group); at decode that KV read dominates, growing linearly with context.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # Group query heads by their KV head instead of repeating K/V G times in memory.
    qg = q.float().reshape(B, Hkv, G * T, D)
    scores = qg @ k.float().transpose(-1, -2) / math.sqrt(D)            # [B, Hkv, G*T, S]
    j = torch.arange(S, device=q.device)
    allowed = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < kv_len[:, None, None])
    allowed = allowed[:, None, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A padded query row (past its sequence's end) may have no allowed key: give it zeros
    # rather than NaN so it cannot poison anything downstream. Only those rows: a NaN that
    # comes from the inputs (damaged weights) must still show, not be zeroed on the way.
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    out = probs @ v.float()                                              # [B, Hkv, G*T, D]
    return out.view(B, Hq, T, D).to(q.dtype)


def check_attention_args(q, k, v, q_pos, kv_len, out=None):
    """What the Triton kernels rely on; a ValueError that names the offending argument."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention: need q [B, Hq, T, D] and k, v [B, Hkv, S, D] of equal "
                         f"shape, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    Bk, Hkv, S, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in "
                         f"batch or head_dim")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: {Hq} query heads are not a multiple of {Hkv} KV heads")
    if D not in KERNEL_HEAD_DIMS:
        raise ValueError(f"attention: the Triton kernels support head_dim in {KERNEL_HEAD_DIMS}, "
                         f"got {D} (use backend='ref')")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"attention: q, k, v must share one dtype of {KERNEL_DTYPES}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if tuple(q_pos.shape) != (B, T) or tuple(kv_len.shape) != (B,):
        raise ValueError(f"attention: need q_pos [{B}, {T}] and kv_len [{B}], got "
                         f"{tuple(q_pos.shape)} and {tuple(kv_len.shape)}")
    if q_pos.is_floating_point() or kv_len.is_floating_point():
        raise ValueError(f"attention: q_pos and kv_len must be integer tensors, got "
                         f"{q_pos.dtype} and {kv_len.dtype}")
    if len({t.device for t in (q, k, v, q_pos, kv_len)}) != 1:
        raise ValueError("attention: q, k, v, q_pos, kv_len must be on one device")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):
        raise ValueError(f"attention: out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")


def kernel_supports(q, k) -> bool:
    return (q.shape[-1] in KERNEL_HEAD_DIMS and q.dtype in KERNEL_DTYPES
            and q.dtype == k.dtype)
