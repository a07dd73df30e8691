"""Decode attention (one new query token per row) as split-KV "flash-decoding".

At decode each row's query is one token, so attention is two GEMVs against the whole cache:
every step reads B*Hkv*S*D elements of K and of V for ~2 FLOPs per element. The KV read is the
whole cost, so the kernel has two jobs: read each K/V byte once, and keep every SM reading.

* Once: a program owns one KV head and computes all G = Hq/Hkv query heads that share it, so a
  group's G heads share one read of K/V (a program per query head would read it G times).
* Busy: batch 1 with 32 KV heads is only 32 programs for an H100's 132 SMs. Splitting the
  sequence into NUM_SPLITS chunks makes B*Hkv*NUM_SPLITS programs; each runs an online softmax
  over its chunk and writes a partial output and its log-sum-exp, and a second small kernel
  merges the chunks exactly (FlashDecoding, FlashAttention-2's split-KV path).
"""
import math

import torch

from ._dispatch import interpreter_on, resolve
from .spec import BenchCase
from .attention import attention_ref, check_attention_args
from .launch import LOG2E, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None

BLOCK_N = 64                 # keys per loop step: a 64 x D tile of K and one of V


def decode_attention_ref(q, k, v, q_pos, kv_len):
    """q: [B, Hq, 1, D] -> [B, Hq, 1, D]. Reads K and V (B*Hkv*S*D elements each), q and writes
    out (B*Hq*D each): at 32k context K+V are ~100,000x the q/out bytes."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode_attention: q must be [B, Hq, 1, D], got {tuple(q.shape)}")
    return attention_ref(q, k, v, q_pos, kv_len)


if triton is not None:
    @triton.jit
    def _decode_split_kernel(Q, K, V, QPos, KVLen, O, Lse,
                             sq_b, sq_h, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
                             sp_b, sl_b, so_b, so_h, so_s, so_d, se_b, se_h, se_s,
                             S, keys_per_split, qk_scale,
                             G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                             D: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                             SINGLE: tl.constexpr):
        # Program (b, kv head, split): reads G query rows (G*D elements), then its chunk of K
        # and V once (2 * chunk * D), writes G*D partial outputs (fp32) and G log-sum-exps.
        b = tl.program_id(0).to(tl.int64)      # int64: b * stride passes 2^31 in big caches
        hkv = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        # Visible keys of this row: j <= q_pos and j < kv_len (never past the slice S).
        n = tl.minimum(tl.load(QPos + b * sp_b) + 1, tl.load(KVLen + b * sl_b))
        n = tl.minimum(n, S).to(tl.int32)
        start = split * keys_per_split
        end = tl.minimum(start + keys_per_split, n)
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        heads = hkv * G + offs_g
        g_ok = offs_g < G                       # rows G..BLOCK_G-1 are padding, never stored
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
                    mask=g_ok[:, None], other=0.0)
        k_base = K + b * sk_b + hkv * sk_h
        v_base = V + b * sv_b + hkv * sv_h
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)    # running max (base-2 logits)
        l_i = tl.zeros([BLOCK_G], tl.float32)                  # running sum of exp2
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        # Every step has at least one visible key (s0 < end), so m_i is finite after the first
        # step and no -inf - -inf NaN can arise; an empty chunk skips the loop entirely.
        for s0 in range(start, end, BLOCK_N):
            cols = s0 + offs_n
            c_ok = cols < end
            k = tl.load(k_base + cols[:, None] * sk_s + offs_d[None, :] * sk_d,
                        mask=c_ok[:, None], other=0.0)                           # [N, D]
            if USE_DOT:   # G >= 2: [BLOCK_G>=16, D] x [D, N] on tensor cores
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            else:         # G == 1: a [1, N, D] product summed over D on the CUDA cores
                s = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
            s = tl.where(c_ok[None, :], s * qk_scale, float("-inf"))            # [G, N]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)        # rescales what was summed under the old max
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + cols[:, None] * sv_s + offs_d[None, :] * sv_d,
                        mask=c_ok[:, None], other=0.0)                           # [N, D]
            if USE_DOT:
                pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            else:
                pv = tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        l_pos = tl.where(l_i > 0, l_i, 1.0)    # an empty chunk: acc = 0 gives zeros, no log2(0)
        out = acc / l_pos[:, None]
        tl.store(O + b * so_b + heads[:, None] * so_h + split * so_s + offs_d[None, :] * so_d,
                 out.to(O.dtype.element_ty), mask=g_ok[:, None])
        if not SINGLE:
            lse = tl.where(l_i > 0, m_i + tl.log2(l_pos), float("-inf"))   # base 2
            tl.store(Lse + b * se_b + heads * se_h + split * se_s, lse, mask=g_ok)

    @triton.jit
    def decode_combine_kernel(OPart, LsePart, O, num_splits,
                               sp_b, sp_h, sp_s, se_b, se_h, se_s, so_b, so_h, so_d,
                               BLOCK_S: tl.constexpr, D: tl.constexpr):
        # Program (b, q head): reads NUM_SPLITS partial rows (fp32) and their lse, writes D.
        # out = sum_s 2^(lse_s - m) * o_s / sum_s 2^(lse_s - m): each o_s is already normalised
        # by its own chunk's sum 2^lse_s, so weighting by that sum undoes it exactly.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)
        s_ok = offs_s < num_splits
        lse = tl.load(LsePart + b * se_b + h * se_h + offs_s * se_s, mask=s_ok,
                      other=float("-inf"))
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)   # a row with no visible key: all weights 0
        w = tl.exp2(lse - m)
        den = tl.sum(w, axis=0)
        o = tl.load(OPart + b * sp_b + h * sp_h + offs_s[:, None] * sp_s + offs_d[None, :],
                    mask=s_ok[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, axis=0) / tl.where(den > 0, den, 1.0)
        tl.store(O + b * so_b + h * so_h + offs_d * so_d, out.to(O.dtype.element_ty))


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
    n_blocks = max(1, -(-seq_len // BLOCK_N))
    eff = {}
    for s in range(1, min(max_splits, n_blocks) + 1):
        if s > 1 and -(-n_blocks // s) == -(-n_blocks // (s - 1)):
            continue   # same chunk size as s - 1 splits: really s - 1 splits and an empty one
        waves = batch_kv_heads * s / slots
        eff[s] = waves / math.ceil(waves)
    best = max(eff.values())
    return min(s for s, e in eff.items() if e >= 0.85 * best)


def split_plan(seq_len: int, num_splits: int) -> tuple[int, int]:
    """-> (splits, keys per split) that decode_attention_triton launches for ``num_splits``.

    Chunks are whole BLOCK_N-key tiles, so asking for 57 splits of 32,768 keys (512 tiles) gives
    chunks of ceil(512 / 57) = 9 tiles = 576 keys, and only ceil(512 / 9) = 57 of them start
    before the end: splits that would start past the last key are dropped, never launched empty.
    """
    n_blocks = max(1, -(-seq_len // BLOCK_N))
    blocks_per_split = -(-n_blocks // max(1, num_splits))
    return -(-n_blocks // blocks_per_split), blocks_per_split * BLOCK_N


def decode_attention_triton(q, k, v, q_pos, kv_len, out=None, num_splits=None):
    """Same signature and result as ``decode_attention_ref``; ``out`` receives the result,
    ``num_splits`` overrides the heuristic (the tests force many splits on short contexts)."""
    check_attention_args(q, k, v, q_pos, kv_len, out)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if T != 1:
        raise ValueError(f"decode_attention: q must be [B, Hq, 1, D], got {tuple(q.shape)}")
    if out is None:
        out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=q.device)
    if B == 0 or Hq == 0:
        return out
    G = Hq // Hkv
    ns = num_splits or num_kv_splits(B * Hkv, S, sm_count(q.device))
    ns, keys_per_split = split_plan(S, ns)   # whole tiles per chunk; no chunk past S
    # G >= 2 uses tl.dot, whose M must be >= 16: pad the group to 16 rows (masked, never read
    # or stored). At G = 1 that would waste 15/16 of each MMA, so reduce with tl.sum instead.
    use_dot = G > 1
    block_g = max(16, triton.next_power_of_2(G)) if use_dot else 1
    o2 = out[:, :, 0]                                                   # [B, Hq, D]
    if ns == 1:   # write the final output directly: no partials, no second launch
        part, lse = o2.unsqueeze(2), o2
        part_strides, lse_strides = (o2.stride(0), o2.stride(1), 0, o2.stride(2)), (0, 0, 0)
    else:
        part = torch.empty(B, Hq, ns, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, Hq, ns, dtype=torch.float32, device=q.device)
        part_strides, lse_strides = part.stride(), lse.stride()
    _decode_split_kernel[(B, Hkv, ns)](
        q, k, v, q_pos, kv_len, part, lse,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        q_pos.stride(0), kv_len.stride(0), *part_strides, *lse_strides,
        S, keys_per_split, LOG2E / math.sqrt(D),
        G=G, BLOCK_G=block_g, BLOCK_N=BLOCK_N, D=D, USE_DOT=use_dot,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SINGLE=ns == 1,
        num_warps=4, num_stages=2)
    if ns > 1:
        decode_combine_kernel[(B, Hq)](
            part, lse, o2, ns, part.stride(0), part.stride(1), part.stride(2), *lse.stride(),
            *o2.stride(), BLOCK_S=triton.next_power_of_2(ns), D=D, num_warps=4)
    return out


def decode_attention(q, k, v, q_pos, kv_len, backend="auto"):
    """Attention of one query token per row over its cache. backend: ref | triton | auto."""
    if resolve(backend, q) == "triton":
        return decode_attention_triton(q, k, v, q_pos, kv_len)
    return decode_attention_ref(q, k, v, q_pos, kv_len)


def bench_cases(device, small: bool = False):
    """Llama-2-7B heads (32, D=128) and GQA (32 q / 8 kv heads), bf16. K/V are the live slice
    [:, :, :S] of a cache [B, Hkv, S + 64, D], as the model passes them. bytes = K+V+q+out."""
    import torch.nn.functional as F
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    has_triton = triton is not None and (dev.type == "cuda" or interpreter_on())
    esz = torch.empty((), dtype=dtype).element_size()
    if small:
        shapes, heads, D = [(1, 100), (3, 37)], [(4, 4), (4, 2)], 64
    else:
        shapes, heads, D = [(1, 32768), (8, 4096), (16, 2048), (1, 4096)], [(32, 32), (32, 8)], 128
    cases = []
    for Hq, Hkv in heads:
        for B, S in shapes:
            def setup(B=B, S=S, Hq=Hq, Hkv=Hkv):
                cache = torch.randn(2, B, Hkv, S + 64, D, device=dev, dtype=dtype)
                k, v = cache[0, :, :, :S], cache[1, :, :, :S]
                q = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
                q_pos = torch.full((B, 1), S - 1, device=dev, dtype=torch.long)
                kv_len = torch.full((B,), S, device=dev, dtype=torch.long)
                gqa = {"enable_gqa": True} if Hq != Hkv else {}   # no K/V copies either way
                impls = {"ref": lambda: decode_attention_ref(q, k, v, q_pos, kv_len),
                         "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, **gqa)}
                if has_triton:
                    out = torch.empty_like(q)
                    impls["triton"] = lambda: decode_attention_triton(q, k, v, q_pos, kv_len,
                                                                      out=out)
                return impls
            moved = 2 * B * Hkv * S * D * esz + 2 * B * Hq * D * esz
            cases.append(BenchCase(
                op="decode_attention", name=f"B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} "
                f"{str(dtype)[6:]}", setup=setup, bytes=moved, flops=4 * B * Hq * S * D,
                peers=("sdpa", "ref"),
                meta={"B": B, "S": S, "Hq": Hq, "Hkv": Hkv, "D": D,
                      "sdpa": "enable_gqa=True" if Hq != Hkv else "MHA, no mask (all S keys)",
                      "splits": num_kv_splits(B * Hkv, S, sm_count(dev)) if has_triton else 0}))
    return cases
