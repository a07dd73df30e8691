"""PagedAttention: attention over a KV cache stored in fixed-size blocks, through a block table.

Layout (per layer, as vLLM): ``k_cache, v_cache: [num_blocks, block_size, Hkv, D]``, token-major:
one token's Hkv*D values are adjacent. Sequence b's token t lives in physical block
``block_tables[b, t // block_size]`` at offset ``t % block_size`` (``tinyserve.engine.
block_manager`` hands out the blocks). Entries past a row's last block are never read (may be
-1). A block can be listed by several rows: shared prompts, parallel samples, a prefix cache.

Three ops, each a reference and a Triton kernel:
* ``paged_write``: scatter this step's new K/V [N, Hkv, D] into their slots (vLLM's
  reshape_and_cache); slot -1 skips a token. Moves 2*N*Hkv*D elements in and out.
* ``paged_decode_attention``: one query per row, the split-KV flash-decoding kernel of
  ``decode_attention.py`` with one change: a tile of BLOCK_N keys is gathered through the
  block table instead of read from one contiguous run. One key's D values for one head are
  still contiguous (256 bytes at D=128 bf16), so loads stay coalesced; the extra traffic is
  one int32 table entry per key (cached: 16 keys share one), under 1% of the K/V bytes.
  The split heuristic (``launch.py``) and the combine kernel (``softmax.py``) are shared.
* ``paged_prefill_attention``: packed variable-length queries (``cu_q``), causal, over a
  cached prefix plus themselves, FlashAttention-2 tiles as in ``prefill_attention.py``.

The references gather the blocks into a contiguous [B, Hkv, S, D] cache and call
``attention_ref``: "paged equals contiguous" is the definition, and the tests check it. The
argument checks, the write's two implementations, that gather and ``random_paged_cache`` live
in ``paged_layout.py``; this file holds the ops' entry points and the attention kernels.
"""
import torch

from ._dispatch import import_triton, interpreter_on, resolve
from .attention_common import attention_ref, kernel_supports
from .cpu_attention import paged_attention_native, paged_write_native
from .decode_attention import decode_attention_triton     # the benchmarks' contiguous peers
from .launch import (DECODE_BLOCK_N, dot_precision, group_rows, num_kv_splits, prefill_config,
                     qk_scale, sm_count, split_plan)
# paged_write dispatches to the two write implementations through this module's names.
from .paged_layout import (check_paged_args, gather_blocks, paged_write_ref, paged_write_triton,
                           random_paged_cache)
from .prefill_attention import prefill_attention_triton
from .softmax import merge_splits, split_outputs
from .spec import BenchCase

try:
    triton = import_triton()
    import triton.language as tl
    from .softmax import online_softmax_finish, online_softmax_update, tile_scores
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None


# ---- 1. write (implemented in paged_layout.py: it fills the layout) ----------------------
def paged_write(k_cache, v_cache, k_new, v_new, slot_mapping, backend="auto"):
    """Store new K/V [N, Hkv, D] at their slots. backend: ref | triton | native | auto."""
    impl = resolve(backend, k_new)
    if impl == "triton":
        return paged_write_triton(k_cache, v_cache, k_new, v_new, slot_mapping)
    if impl == "native":
        return paged_write_native(k_cache, v_cache, k_new, v_new, slot_mapping)
    return paged_write_ref(k_cache, v_cache, k_new, v_new, slot_mapping)


# ---- 2. decode -----------------------------------------------------------------------------
def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, kv_lens):
    """q [B, Hq, D]: row b's query is its last token (position kv_lens[b] - 1) and attends to
    all kv_lens[b] cached keys -> [B, Hq, D]. A row with kv_len 0 gives zeros."""
    check_paged_args(q, k_cache, v_cache, block_tables, kv_lens)
    k, v = gather_blocks(k_cache, block_tables, kv_lens), gather_blocks(v_cache, block_tables, kv_lens)
    q_pos = (kv_lens - 1)[:, None]
    return attention_ref(q[:, :, None], k, v, q_pos, kv_lens)[:, :, 0]


if triton is not None:
    @triton.jit
    def _paged_decode_split_kernel(Q, KC, VC, BT, KVLen, O, Lse,
                                   sq_b, sq_h, sq_d,
                                   skc_b, skc_t, skc_h, skc_d, svc_b, svc_t, svc_h, svc_d,
                                   sbt_b, sbt_n, sl_b, so_b, so_h, so_s, so_d, se_b, se_h, se_s,
                                   S, keys_per_split, qk_scale,
                                   BLOCK_SIZE: tl.constexpr, G: tl.constexpr,
                                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                                   D: tl.constexpr, USE_DOT: tl.constexpr,
                                   PRECISION: tl.constexpr, SINGLE: tl.constexpr):
        # Program (b, kv head, split), as _decode_split_kernel: reads G query rows, its chunk
        # of K and V once (2 * chunk * D) plus one table entry per key, writes G partials.
        b = tl.program_id(0).to(tl.int64)
        hkv = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        # The query sees every cached key; never past the table's S = max_blocks * bs keys.
        n = tl.minimum(tl.load(KVLen + b * sl_b), S).to(tl.int32)
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, n)
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        heads = hkv * G + offs_g
        g_ok = offs_g < G
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
                    mask=g_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for s0 in range(start, end, BLOCK_N):
            cols = s0 + offs_n
            c_ok = cols < end
            # The paging: key position -> (physical block, offset) -> address of its D values.
            blk = tl.load(BT + b * sbt_b + (cols // BLOCK_SIZE) * sbt_n, mask=c_ok, other=0)
            row = blk.to(tl.int64) * skc_b + (cols % BLOCK_SIZE) * skc_t        # [N]
            k = tl.load(KC + hkv * skc_h + row[:, None] + offs_d[None, :] * skc_d,
                        mask=c_ok[:, None], other=0.0)                           # [N, D]
            s = tl.where(c_ok[None, :], tile_scores(q, k, USE_DOT, PRECISION) * qk_scale,
                         float("-inf"))                                          # [G, N]
            vrow = blk.to(tl.int64) * svc_b + (cols % BLOCK_SIZE) * svc_t
            v = tl.load(VC + hkv * svc_h + vrow[:, None] + offs_d[None, :] * svc_d,
                        mask=c_ok[:, None], other=0.0)                           # [N, D]
            m_i, l_i, acc = online_softmax_update(m_i, l_i, acc, s, v, USE_DOT, PRECISION)
        out, lse = online_softmax_finish(m_i, l_i, acc)
        tl.store(O + b * so_b + heads[:, None] * so_h + split * so_s + offs_d[None, :] * so_d,
                 out.to(O.dtype.element_ty), mask=g_ok[:, None])
        if not SINGLE:
            tl.store(Lse + b * se_b + heads * se_h + split * se_s, lse, mask=g_ok)


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, kv_lens, out=None,
                                  num_splits=None):
    """Same signature and result as ``paged_decode_attention_ref``; ``out`` receives the
    result, ``num_splits`` overrides the heuristic. Splits are sized for the table's width
    (max_blocks * block_size keys): the host does not read kv_lens, so no sync."""
    check_paged_args(q, k_cache, v_cache, block_tables, kv_lens, out=out, kernel=True)
    B, Hq, D = q.shape
    Hkv, bs = k_cache.shape[2], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    if B == 0 or Hq == 0:
        return out
    G = Hq // Hkv
    S = max(1, block_tables.shape[1] * bs)
    ns = num_splits or num_kv_splits(B * Hkv, S, sm_count(q.device))
    ns, keys_per_split = split_plan(S, ns)
    use_dot, block_g = group_rows(G)
    part, lse, part_strides, lse_strides = split_outputs(out, ns)
    _paged_decode_split_kernel[(B, Hkv, ns)](
        q, k_cache, v_cache, block_tables, kv_lens, part, lse, *q.stride(),
        *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), kv_lens.stride(0),
        *part_strides, *lse_strides, S, keys_per_split, qk_scale(D),
        BLOCK_SIZE=bs, G=G, BLOCK_G=block_g, BLOCK_N=DECODE_BLOCK_N, D=D, USE_DOT=use_dot,
        PRECISION=dot_precision(q.dtype), SINGLE=ns == 1, num_warps=4, num_stages=2)
    merge_splits(part, lse, out, ns)
    return out


# ---- 3. prefill over a cached prefix --------------------------------------------------------
def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_q, kv_lens):
    """q [N, Hq, D] packed: sequence b owns rows cu_q[b]:cu_q[b+1] (q_len_b of them), the
    last q_len_b of its kv_lens[b] tokens (K/V already written), at positions
    kv_len_b - q_len_b + i; causal over the cached prefix and themselves -> [N, Hq, D]."""
    check_paged_args(q, k_cache, v_cache, block_tables, kv_lens, cu_q=cu_q)
    q_lens = cu_q[1:] - cu_q[:-1]
    if int(cu_q[0]) != 0 or int(cu_q[-1]) != q.shape[0] or (q_lens < 0).any() \
            or (q_lens > kv_lens).any():
        raise ValueError(f"paged prefill: need cu_q from 0 to N={q.shape[0]}, nondecreasing, "
                         f"q_len <= kv_len; got cu_q {cu_q.tolist()}, kv_lens {kv_lens.tolist()}")
    out = torch.zeros_like(q)
    for b in range(block_tables.shape[0]):   # one row at a time: the reference, not the speed
        s, e = int(cu_q[b]), int(cu_q[b + 1])
        kv = kv_lens[b:b + 1]
        k = gather_blocks(k_cache, block_tables[b:b + 1], kv)
        v = gather_blocks(v_cache, block_tables[b:b + 1], kv)
        q_pos = (kv - (e - s) + torch.arange(e - s, device=q.device))[None]     # [1, T]
        o = attention_ref(q[s:e].transpose(0, 1)[None], k, v, q_pos, kv)       # [1, Hq, T, D]
        out[s:e] = o[0].transpose(0, 1)
    return out


if triton is not None:
    @triton.jit
    def _paged_prefill_kernel(Q, KC, VC, BT, CuQ, KVLen, O,
                              sq_n, sq_h, sq_d,
                              skc_b, skc_t, skc_h, skc_d, svc_b, svc_t, svc_h, svc_d,
                              sbt_b, sbt_n, sc_b, sl_b, so_n, so_h, so_d,
                              Hq, S, qk_scale,
                              BLOCK_SIZE: tl.constexpr, G: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              D: tl.constexpr, PRECISION: tl.constexpr):
        # Program (query block, b * Hq + h), as _prefill_kernel: reads BLOCK_M*D of q, then
        # K and V of head h // G through the block table up to the block's causal limit.
        bh = tl.program_id(1)
        b = (bh // Hq).to(tl.int64)
        h = (bh % Hq).to(tl.int64)
        hkv = h // G
        q0 = tl.load(CuQ + b * sc_b).to(tl.int64)
        q_len = (tl.load(CuQ + (b + 1) * sc_b) - q0).to(tl.int32)
        kvl = tl.load(KVLen + b * sl_b).to(tl.int32)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < q_len            # blocks past a short row's queries do nothing
        qp = tl.where(m_ok, kvl - q_len + offs_m, -1)
        hi = tl.minimum(tl.minimum(tl.max(qp, axis=0) + 1, kvl), S)   # S: the table's width
        rows = q0 + offs_m
        q = tl.load(Q + rows[:, None] * sq_n + h * sq_h + offs_d[None, :] * sq_d,
                    mask=m_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for s0 in range(0, hi, BLOCK_N):
            cols = s0 + offs_n
            c_ok = cols < hi
            blk = tl.load(BT + b * sbt_b + (cols // BLOCK_SIZE) * sbt_n, mask=c_ok, other=0)
            blk = blk.to(tl.int64)
            k = tl.load(KC + blk[:, None] * skc_b + (cols % BLOCK_SIZE)[:, None] * skc_t
                        + hkv * skc_h + offs_d[None, :] * skc_d,
                        mask=c_ok[:, None], other=0.0)                           # [N, D]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale      # [M, N]
            s = tl.where((cols[None, :] <= qp[:, None]) & c_ok[None, :], s, float("-inf"))
            v = tl.load(VC + blk[:, None] * svc_b + (cols % BLOCK_SIZE)[:, None] * svc_t
                        + hkv * svc_h + offs_d[None, :] * svc_d,
                        mask=c_ok[:, None], other=0.0)                           # [N, D]
            m_i, l_i, acc = online_softmax_update(m_i, l_i, acc, s, v, True, PRECISION)
        out, _ = online_softmax_finish(m_i, l_i, acc)   # rows with no visible key: zeros
        tl.store(O + rows[:, None] * so_n + h * so_h + offs_d[None, :] * so_d,
                 out.to(O.dtype.element_ty), mask=m_ok[:, None])


def paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_q, kv_lens, out=None,
                                   max_q_len=None):
    """Same signature and result as ``paged_prefill_attention_ref``. ``max_q_len`` (the
    longest row's query count, known to the scheduler) sizes the grid; without it the
    launcher reads cu_q (one device sync)."""
    check_paged_args(q, k_cache, v_cache, block_tables, kv_lens, cu_q=cu_q, out=out,
                     kernel=True)
    N, Hq, D = q.shape
    B, Hkv, bs = block_tables.shape[0], k_cache.shape[2], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    if max_q_len is None:
        max_q_len = int((cu_q[1:] - cu_q[:-1]).max()) if B else 0
    if N == 0 or B == 0 or Hq == 0 or max_q_len <= 0:
        return out
    block_m, block_n, num_warps, num_stages = prefill_config(max_q_len, D, q.device)
    _paged_prefill_kernel[(triton.cdiv(max_q_len, block_m), B * Hq)](
        q, k_cache, v_cache, block_tables, cu_q, kv_lens, out, *q.stride(),
        *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), cu_q.stride(0),
        kv_lens.stride(0), *out.stride(), Hq, block_tables.shape[1] * bs, qk_scale(D),
        BLOCK_SIZE=bs, G=Hq // Hkv, BLOCK_M=block_m, BLOCK_N=block_n, D=D,
        PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    return out


def paged_attention(q, k_cache, v_cache, block_tables, kv_lens, cu_q=None, backend="auto",
                    max_q_len=None):
    """Attention over a paged cache. cu_q None: decode, q [B, Hq, D] (one query per row);
    else packed queries q [N, Hq, D] (prefill chunks, decodes as q_len 1, or both).
    backend: ref | triton | native (CPU SDPA) | auto (triton on CUDA when the kernels
    support head_dim/dtype).
    ``max_q_len`` (packed only): the longest q_len, known on the host; without it the Triton
    launcher reads it from ``cu_q`` on the device, a sync per call."""
    impl = resolve(backend, q)
    if impl == "triton" and backend == "auto" and not kernel_supports(q, k_cache):
        impl = "ref"   # e.g. the head_dim-8 toy models of the tests, run on a GPU
    if impl == "native":
        return paged_attention_native(q, k_cache, v_cache, block_tables, kv_lens, cu_q)
    if cu_q is None:
        fn = paged_decode_attention_triton if impl == "triton" else paged_decode_attention_ref
        return fn(q, k_cache, v_cache, block_tables, kv_lens)
    if impl == "triton":
        return paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, cu_q, kv_lens,
                                              max_q_len=max_q_len)
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_q, kv_lens)


# ---- benchmark ----------------------------------------------------------------------------
def bench_cases(device, small: bool = False):
    """Paged vs contiguous kernels at the same shapes (Llama-2-7B heads, D=128, bf16, blocks
    of 16 in shuffled order). Peer "contiguous": decode_attention / prefill_attention's
    kernel on a contiguous [B, Hkv, S, D] cache (CUDA only: on CPU it would be the
    interpreter). bytes = K+V read + q + out + block tables."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    has_triton = triton is not None and (dev.type == "cuda" or interpreter_on())
    esz = torch.empty((), dtype=dtype).element_size()
    bs = 16
    if small:
        dec_shapes, heads, D = [(1, 100), (3, 37)], [(4, 4), (4, 2)], 64
        pre_shapes = [(1, 0, 16), (2, 21, 19)]
    else:
        dec_shapes, D = [(1, 32768), (8, 4096), (16, 2048), (1, 4096)], 128
        heads = [(32, 32), (32, 8)]
        pre_shapes = [(1, 0, 512), (1, 0, 2048), (1, 1536, 512), (4, 0, 512)]
    cases = []

    def caches(B, S, Hkv):
        """The paged cache, and the same K/V as contiguous [B, Hkv, S_blocks, D] tensors."""
        kc, vc, bt = random_paged_cache([S] * B, Hkv, D, bs, dtype=dtype, device=dev)
        kv = torch.full((B,), S, dtype=torch.int32, device=dev)
        return kc, vc, bt, kv, gather_blocks(kc, bt, kv).contiguous(), gather_blocks(vc, bt, kv).contiguous()

    for Hq, Hkv in heads:
        for B, S in dec_shapes:
            def setup(B=B, S=S, Hq=Hq, Hkv=Hkv):
                kc, vc, bt, kv, k, v = caches(B, S, Hkv)
                q = torch.randn(B, Hq, D, device=dev, dtype=dtype)
                impls = {"ref": lambda: paged_decode_attention_ref(q, kc, vc, bt, kv)}
                if has_triton:
                    out = torch.empty_like(q)
                    impls["triton"] = lambda: paged_decode_attention_triton(q, kc, vc, bt, kv,
                                                                            out=out)
                if dev.type == "cuda":
                    q4, q_pos = q[:, :, None], (kv - 1)[:, None]
                    o4, k, v = torch.empty_like(q4), k[:, :, :S], v[:, :, :S]
                    impls["contiguous"] = lambda: decode_attention_triton(q4, k, v, q_pos, kv,
                                                                          out=o4)
                return impls
            kv_bytes = 2 * B * Hkv * S * D * esz
            cases.append(BenchCase(
                op="paged_attention", name=f"decode B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} "
                f"bs={bs} {str(dtype)[6:]}", setup=setup,
                bytes=kv_bytes + 2 * B * Hq * D * esz + B * -(-S // bs) * 4,
                flops=4 * B * Hq * S * D, peers=("contiguous", "ref"),
                meta={"kind": "decode", "B": B, "S": S, "Hq": Hq, "Hkv": Hkv, "D": D,
                      "block_size": bs, "kv_bytes": kv_bytes}))
    Hq, Hkv = heads[-1]
    for B, P, T in pre_shapes:
        def setup(B=B, P=P, T=T):
            kc, vc, bt, kv, k, v = caches(B, P + T, Hkv)
            q = torch.randn(B * T, Hq, D, device=dev, dtype=dtype)
            cu_q = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=dev)
            impls = {"ref": lambda: paged_prefill_attention_ref(q, kc, vc, bt, cu_q, kv)}
            if has_triton:
                out = torch.empty_like(q)
                impls["triton"] = lambda: paged_prefill_attention_triton(
                    q, kc, vc, bt, cu_q, kv, out=out, max_q_len=T)
            if dev.type == "cuda":
                q4 = q.view(B, T, Hq, D).transpose(1, 2)
                o4 = torch.empty_like(q4)
                q_pos = (P + torch.arange(T, device=dev)).expand(B, T)
                impls["contiguous"] = lambda: prefill_attention_triton(
                    q4, k[:, :, :P + T], v[:, :, :P + T], q_pos, kv, out=o4)
            return impls
        cases.append(BenchCase(
            op="paged_attention", name=f"prefill B={B} prefix={P} T={T} Hq={Hq} Hkv={Hkv} "
            f"D={D} bs={bs} {str(dtype)[6:]}", setup=setup,
            bytes=2 * B * T * Hq * D * esz + 2 * B * Hkv * (P + T) * D * esz
            + B * -(-(P + T) // bs) * 4,
            flops=2 * B * Hq * D * T * (2 * P + T), peers=("contiguous", "ref"),
            meta={"kind": "prefill", "B": B, "prefix": P, "T": T, "Hq": Hq, "Hkv": Hkv,
                  "D": D, "block_size": bs}))
    return cases
