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
import torch
import torch.nn.functional as F

from ._dispatch import import_triton, interpreter_on, resolve
from .attention_common import attention_ref, check_attention_args
# The split heuristic and tile size live in launch.py: paged decode shares them.
from .launch import (DECODE_BLOCK_N, dot_precision, group_rows, num_kv_splits, qk_scale, sm_count,
                     split_plan)
from .softmax import merge_splits, split_outputs
from .spec import BenchCase

try:
    triton = import_triton()
    import triton.language as tl
    from .softmax import online_softmax_finish, online_softmax_update, tile_scores
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None


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
        # step (the update's -inf guard never fires here); an empty chunk skips the loop.
        for s0 in range(start, end, BLOCK_N):
            cols = s0 + offs_n
            c_ok = cols < end
            k = tl.load(k_base + cols[:, None] * sk_s + offs_d[None, :] * sk_d,
                        mask=c_ok[:, None], other=0.0)                           # [N, D]
            s = tile_scores(q, k, USE_DOT, PRECISION)    # G >= 2: tensor cores; G = 1: tl.sum
            s = tl.where(c_ok[None, :], s * qk_scale, float("-inf"))            # [G, N]
            v = tl.load(v_base + cols[:, None] * sv_s + offs_d[None, :] * sv_d,
                        mask=c_ok[:, None], other=0.0)                           # [N, D]
            m_i, l_i, acc = online_softmax_update(m_i, l_i, acc, s, v, USE_DOT, PRECISION)
        out, lse = online_softmax_finish(m_i, l_i, acc)   # an empty chunk: zeros, lse -inf
        tl.store(O + b * so_b + heads[:, None] * so_h + split * so_s + offs_d[None, :] * so_d,
                 out.to(O.dtype.element_ty), mask=g_ok[:, None])
        if not SINGLE:
            tl.store(Lse + b * se_b + heads * se_h + split * se_s, lse, mask=g_ok)   # base 2


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
    use_dot, block_g = group_rows(G)
    o2 = out[:, :, 0]                                                   # [B, Hq, D]
    part, lse, part_strides, lse_strides = split_outputs(o2, ns)
    _decode_split_kernel[(B, Hkv, ns)](
        q, k, v, q_pos, kv_len, part, lse,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        q_pos.stride(0), kv_len.stride(0), *part_strides, *lse_strides,
        S, keys_per_split, qk_scale(D),
        G=G, BLOCK_G=block_g, BLOCK_N=DECODE_BLOCK_N, D=D, USE_DOT=use_dot,
        PRECISION=dot_precision(q.dtype), SINGLE=ns == 1, num_warps=4, num_stages=2)
    merge_splits(part, lse, o2, ns)
    return out


def decode_attention(q, k, v, q_pos, kv_len, backend="auto"):
    """Attention of one query token per row over its cache. backend: ref | triton | auto."""
    if resolve(backend, q) == "triton":
        return decode_attention_triton(q, k, v, q_pos, kv_len)
    return decode_attention_ref(q, k, v, q_pos, kv_len)


def bench_cases(device, small: bool = False):
    """Llama-2-7B heads (32, D=128) and GQA (32 q / 8 kv heads), bf16. K/V are the live slice
    [:, :, :S] of a cache [B, Hkv, S + 64, D], as the model passes them. bytes = K+V+q+out."""
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
