"""The paged KV layout: what the paged ops accept, and how the references read it.

``k_cache, v_cache: [num_blocks, block_size, Hkv, D]`` per layer (vLLM's layout); sequence b's
token t lives in block ``block_tables[b, t // block_size]`` at offset ``t % block_size``. This
file holds what fills and checks that layout: the argument checks shared by the references
and the kernels, the write of new K/V into their slots (reference and Triton kernel; the
``paged_write`` op that dispatches between them is ``paged_attention.py``'s), the references'
"un-paging" gather, and random fragmented caches for tests and benchmarks. Below
``paged_attention.py`` (which re-exports these names), above nothing but ``attention_common``.
"""
import torch

from ._dispatch import import_triton
from .attention_common import KERNEL_DTYPES, KERNEL_HEAD_DIMS

try:
    triton = import_triton()
    import triton.language as tl
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None


def check_caches(k_cache, v_cache):
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged: k_cache and v_cache must be [num_blocks, block_size, Hkv, D] "
                         f"of equal shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype or k_cache.device != v_cache.device:
        raise ValueError(f"paged: k_cache and v_cache differ in dtype or device "
                         f"({k_cache.dtype}/{v_cache.dtype}, {k_cache.device}/{v_cache.device})")


def check_int(name, t, shape):
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"paged: {name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"paged: {name} must have shape {list(shape)}, got {list(t.shape)}")


def check_paged_args(q, k_cache, v_cache, block_tables, kv_lens, cu_q=None, out=None,
                     kernel=False):
    """q [B, Hq, D] (decode, cu_q None) or [N, Hq, D] packed (cu_q [B+1]). ``kernel``: also
    what the Triton kernels need (head_dim, dtype)."""
    check_caches(k_cache, v_cache)
    if q.dim() != 3:
        raise ValueError(f"paged: q must be [B or N, Hq, D], got {tuple(q.shape)}")
    Hq, D = q.shape[1:]
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"paged: q head_dim {D} != cache head_dim {k_cache.shape[3]}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"paged: {Hq} query heads are not a multiple of {Hkv} KV heads")
    if block_tables.dim() != 2:
        raise ValueError(f"paged: block_tables must be [B, max_blocks], got "
                         f"{tuple(block_tables.shape)}")
    B = block_tables.shape[0]
    check_int("block_tables", block_tables, (B, block_tables.shape[1]))
    check_int("kv_lens", kv_lens, (B,))
    if cu_q is None:
        if q.shape[0] != B:
            raise ValueError(f"paged decode: q has {q.shape[0]} rows, block_tables {B}")
    else:
        check_int("cu_q", cu_q, (B + 1,))
    if q.dtype != k_cache.dtype:
        raise ValueError(f"paged: q is {q.dtype} but the cache is {k_cache.dtype}")
    tensors = [q, k_cache, block_tables, kv_lens] + ([cu_q] if cu_q is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError("paged: q, the caches, block_tables, kv_lens, cu_q must share a device")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):
        raise ValueError(f"paged: out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if kernel and (D not in KERNEL_HEAD_DIMS or q.dtype not in KERNEL_DTYPES):
        raise ValueError(f"paged: the Triton kernels support head_dim in {KERNEL_HEAD_DIMS} and "
                         f"dtypes {KERNEL_DTYPES}, got {D} and {q.dtype} (use backend='ref')")


def gather_blocks(cache, block_tables, kv_lens):
    """The reference's "un-paging": [num_blocks, bs, Hkv, D] -> contiguous [B, Hkv, S, D] with
    S = the longest row rounded up to blocks. Reads B*S*Hkv*D elements, writes as many. Checks
    the table on the host (a sync: fine for the reference, never done by the kernels)."""
    num_blocks, bs = cache.shape[:2]
    width = -(-int(kv_lens.max()) // bs) if kv_lens.numel() else 0
    if width > block_tables.shape[1] or (kv_lens.numel() and int(kv_lens.min()) < 0):
        raise ValueError(f"paged: kv_lens {kv_lens.tolist()} need {width} blocks per row, "
                         f"block_tables has {block_tables.shape[1]} (or a length is negative)")
    bt = block_tables[:, :width].long()
    used = torch.arange(width, device=bt.device)[None, :] * bs < kv_lens[:, None]
    if ((bt < 0) | (bt >= num_blocks))[used].any():
        raise ValueError(f"paged: block_tables lists a block outside [0, {num_blocks})")
    bt = torch.where(used, bt, 0)           # unused entries may be -1: read block 0, masked
    return cache[bt].flatten(1, 2).transpose(1, 2)   # [B, width, bs, Hkv, D] -> [B, Hkv, S, D]


# ---- the write: new K/V into their slots --------------------------------------------------
def _check_write(k_cache, v_cache, k_new, v_new, slot_mapping):
    check_caches(k_cache, v_cache)
    want = (k_cache.shape[2], k_cache.shape[3])
    if k_new.dim() != 3 or v_new.shape != k_new.shape or tuple(k_new.shape[1:]) != want:
        raise ValueError(f"paged_write: k_new, v_new must be [N, {want[0]}, {want[1]}], got "
                         f"{tuple(k_new.shape)} and {tuple(v_new.shape)}")
    if k_new.dtype != k_cache.dtype or v_new.dtype != k_cache.dtype:
        raise ValueError(f"paged_write: new K/V ({k_new.dtype}, {v_new.dtype}) must have the "
                         f"cache's dtype {k_cache.dtype}")
    check_int("slot_mapping", slot_mapping, (k_new.shape[0],))
    if len({t.device for t in (k_cache, k_new, v_new, slot_mapping)}) != 1:
        raise ValueError("paged_write: caches, new K/V and slot_mapping must share a device")


def paged_write_ref(k_cache, v_cache, k_new, v_new, slot_mapping):
    """Token i goes to slot s = slot_mapping[i] (block s // bs, offset s % bs); -1 skips it.
    Slots must be distinct. In place; reads and writes 2*N*Hkv*D elements."""
    _check_write(k_cache, v_cache, k_new, v_new, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if slots.numel() and int(slots.max()) >= k_cache.shape[0] * k_cache.shape[1]:
        raise ValueError(f"paged_write: slot {int(slots.max())} is past the cache's "
                         f"{k_cache.shape[0] * k_cache.shape[1]} slots")
    # flatten(0, 1) is a view of the (block, offset) dims only for caches whose two leading
    # dims are adjacent in memory; index the 4-D tensor instead so any strided cache works.
    bs = k_cache.shape[1]
    k_cache[slots // bs, slots % bs] = k_new[keep]
    v_cache[slots // bs, slots % bs] = v_new[keep]


if triton is not None:
    @triton.jit
    def _paged_write_kernel(KN, VN, KC, VC, Slot,
                            skn_n, skn_h, skn_d, svn_n, svn_h, svn_d,
                            skc_b, skc_t, skc_h, skc_d, svc_b, svc_t, svc_h, svc_d,
                            ss_n, num_slots,
                            H: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        # Program i: reads token i's slot and its Hkv*D keys and values, writes them once.
        i = tl.program_id(0).to(tl.int64)
        slot = tl.load(Slot + i * ss_n).to(tl.int64)
        ok = (slot >= 0) & (slot < num_slots)   # -1 skips; out of range never writes
        slot = tl.where(ok, slot, 0)
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        d_end = tl.where(ok, D, 0)   # a skipped token masks every column (a scalar bool in the
        mask = (offs_h[:, None] < H) & (offs_d[None, :] < d_end)   # mask trips the interpreter)
        k = tl.load(KN + i * skn_n + offs_h[:, None] * skn_h + offs_d[None, :] * skn_d, mask=mask)
        v = tl.load(VN + i * svn_n + offs_h[:, None] * svn_h + offs_d[None, :] * svn_d, mask=mask)
        tl.store(KC + blk * skc_b + off * skc_t + offs_h[:, None] * skc_h + offs_d[None, :] * skc_d,
                 k, mask=mask)
        tl.store(VC + blk * svc_b + off * svc_t + offs_h[:, None] * svc_h + offs_d[None, :] * svc_d,
                 v, mask=mask)


def paged_write_triton(k_cache, v_cache, k_new, v_new, slot_mapping):
    """Same as ``paged_write_ref``; a slot past the cache is skipped (no bounds check on the
    host: it would cost a device sync every layer)."""
    _check_write(k_cache, v_cache, k_new, v_new, slot_mapping)
    N, H, D = k_new.shape
    if N == 0:
        return
    _paged_write_kernel[(N,)](
        k_new, v_new, k_cache, v_cache, slot_mapping, *k_new.stride(), *v_new.stride(),
        *k_cache.stride(), *v_cache.stride(), slot_mapping.stride(0),
        k_cache.shape[0] * k_cache.shape[1], H=H, BLOCK_H=triton.next_power_of_2(H), D=D,
        BLOCK_D=triton.next_power_of_2(D), BLOCK_SIZE=k_cache.shape[1], num_warps=4)


# ---- random caches for tests and benchmarks -----------------------------------------------
def random_paged_cache(kv_lens, Hkv, D, block_size=16, extra_blocks=0, dtype=torch.float32,
                       device="cpu", generator=None):
    """(k_cache, v_cache, block_tables int32) holding random K/V for rows of kv_lens tokens in
    shuffled physical blocks (fragmented, as after many allocations and frees); unused
    table entries are -1. For tests and benchmarks; ``generator`` (CPU) makes it repeatable."""
    need = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    table = torch.full((len(kv_lens), max(need, default=0)), -1, dtype=torch.int32)
    for b, nb in enumerate(need):
        table[b, :nb] = torch.tensor(perm[:nb], dtype=torch.int32)
        perm = perm[nb:]
    shape = (num_blocks, block_size, Hkv, D)
    if generator is None:   # drawn where they live: GB-sized benchmark caches
        k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
    else:                   # a CPU generator: the same values on every device
        k, v = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2))
    return k, v, table.to(device)
