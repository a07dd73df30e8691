"""Prefill attention (T > 1 new tokens per row) as causal FlashAttention-2.

Eager attention materialises the [T, S] score matrix in DRAM (written, read by softmax, written,
read by the PV matmul): 4*T*S*4 bytes per head, far more than q, K, V and out themselves. Flash
attention never writes it: a program holds a BLOCK_M block of queries in registers, streams K/V
tiles of BLOCK_N keys past it and keeps a running softmax (max m, sum l, unnormalised output),
rescaling what it has summed whenever the max grows. DRAM traffic is q + out once and K/V once
per query block (mostly L2 hits), and the FLOPs run on tensor cores via tl.dot.

The same kernel serves a first prefill (q_pos = 0..T-1), chunked prefill or a verify step that
appends to an existing cache (q_pos starts at the cache length), and right-padded batches (a
row's keys stop at kv_len; a query with no visible key outputs zeros, not NaN).
"""
import torch
import torch.nn.functional as F

from ._dispatch import import_triton, interpreter_on, resolve
from .attention_common import attention_ref, check_attention_args
from .launch import dot_precision, prefill_config, qk_scale
from .spec import BenchCase

try:
    triton = import_triton()
    import triton.language as tl
    from .softmax import online_softmax_finish, online_softmax_update
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None


def prefill_attention_ref(q, k, v, q_pos, kv_len):
    """q: [B, Hq, T, D] -> [B, Hq, T, D]. Eager reads K, V and q, writes out, and round-trips
    the B*Hq*T*S fp32 scores and probabilities through DRAM several times."""
    return attention_ref(q, k, v, q_pos, kv_len)


if triton is not None:
    @triton.jit
    def _prefill_kernel(Q, K, V, QPos, KVLen, O,
                        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d,
                        sp_b, sp_t, sl_b, so_b, so_h, so_t, so_d,
                        T, S, Hq, qk_scale,
                        G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        D: tl.constexpr, PRECISION: tl.constexpr):
        # Program (query block, b * Hq + h): reads BLOCK_M*D of q, then K and V of KV head
        # h // G up to the block's causal limit (BLOCK_N*D each per step), writes BLOCK_M*D.
        bh = tl.program_id(1)
        b = (bh // Hq).to(tl.int64)
        h = (bh % Hq).to(tl.int64)
        hkv = h // G                      # GQA: the G query heads of a group share this K/V
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        m_ok = offs_m < T
        qp = tl.load(QPos + b * sp_b + offs_m * sp_t, mask=m_ok, other=-1).to(tl.int32)
        kvl = tl.minimum(tl.load(KVLen + b * sl_b), S).to(tl.int32)
        # Keys any query of the block may see: [0, hi). Past hi every score is masked, so the
        # causal upper triangle is skipped block-wise (about half the work of a full prefill).
        hi = tl.minimum(tl.max(qp, axis=0) + 1, kvl)
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d,
                    mask=m_ok[:, None], other=0.0)
        k_base = K + b * sk_b + hkv * sk_h
        v_base = V + b * sv_b + hkv * sv_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for s0 in range(0, hi, BLOCK_N):
            cols = s0 + offs_n
            c_ok = cols < hi
            k = tl.load(k_base + cols[:, None] * sk_s + offs_d[None, :] * sk_d,
                        mask=c_ok[:, None], other=0.0)                           # [N, D]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale      # [M, N]
            ok = (cols[None, :] <= qp[:, None]) & (cols[None, :] < kvl)
            # A query that sees no key (q_pos < 0, or the tail rows t >= T of the last block)
            # has an all -inf row: the update keeps it at zero weight, not NaN.
            s = tl.where(ok, s, float("-inf"))
            v = tl.load(v_base + cols[:, None] * sv_s + offs_d[None, :] * sv_d,
                        mask=c_ok[:, None], other=0.0)                           # [N, D]
            m_i, l_i, acc = online_softmax_update(m_i, l_i, acc, s, v, True, PRECISION)
        out, _ = online_softmax_finish(m_i, l_i, acc)          # no visible key: zeros
        tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :] * so_d,
                 out.to(O.dtype.element_ty), mask=m_ok[:, None])


def prefill_attention_triton(q, k, v, q_pos, kv_len, out=None):
    """Same signature and result as ``prefill_attention_ref``; ``out`` receives the result."""
    check_attention_args(q, k, v, q_pos, kv_len, out)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    if B == 0 or Hq == 0 or T == 0:
        return out
    block_m, block_n, num_warps, num_stages = prefill_config(T, D, q.device)
    grid = (triton.cdiv(T, block_m), B * Hq)   # query blocks of one head adjacent: K/V in L2
    _prefill_kernel[grid](
        q, k, v, q_pos, kv_len, out, *q.stride(), *k.stride(), *v.stride(),
        q_pos.stride(0), q_pos.stride(1), kv_len.stride(0), *out.stride(),
        T, S, Hq, qk_scale(D), G=Hq // Hkv, BLOCK_M=block_m, BLOCK_N=block_n, D=D,
        PRECISION=dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    return out


def prefill_attention(q, k, v, q_pos, kv_len, backend="auto"):
    """Causal attention of T query tokens per row over their cache. backend: ref|triton|auto."""
    if resolve(backend, q) == "triton":
        return prefill_attention_triton(q, k, v, q_pos, kv_len)
    return prefill_attention_ref(q, k, v, q_pos, kv_len)


def bench_cases(device, small: bool = False):
    """Llama-2-7B heads (32, D=128), batch 1, a fresh causal prefill of T tokens, bf16.
    bytes = q + K + V + out (the floor; scores never reach DRAM); FLOPs count the causal half."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    has_triton = triton is not None and (dev.type == "cuda" or interpreter_on())
    esz = torch.empty((), dtype=dtype).element_size()
    B, Hq, Hkv, D = (1, 4, 2, 64) if small else (1, 32, 32, 128)
    cases = []
    for T in ((16, 40) if small else (512, 2048)):
        def setup(T=T):
            q = torch.randn(B, Hq, T, D, device=dev, dtype=dtype)
            cache = torch.randn(2, B, Hkv, T + 64, D, device=dev, dtype=dtype)
            k, v = cache[0, :, :, :T], cache[1, :, :, :T]
            q_pos = torch.arange(T, device=dev).expand(B, T)
            kv_len = torch.full((B,), T, device=dev, dtype=torch.long)
            gqa = {"enable_gqa": True} if Hq != Hkv else {}
            impls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa),
                     "ref": lambda: prefill_attention_ref(q, k, v, q_pos, kv_len)}
            if has_triton:
                out = torch.empty_like(q)
                impls["triton"] = lambda: prefill_attention_triton(q, k, v, q_pos, kv_len, out=out)
            return impls
        moved = 2 * B * Hq * T * D * esz + 2 * B * Hkv * T * D * esz
        cases.append(BenchCase(
            op="prefill_attention", name=f"B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} {str(dtype)[6:]}",
            setup=setup, bytes=moved, flops=2 * B * Hq * T * T * D, peers=("sdpa", "ref"),
            meta={"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "D": D, "sdpa": "is_causal=True"}))
    return cases
