"""Rotary position embedding (RoPE), "rotate-half" layout as in HF transformers.

Dimension i of the first half of a head pairs with dimension i + head_dim/2, and the pair is
rotated by angle pos * theta^(-2i/head_dim). GGUF files store Q/K rows permuted for llama.cpp's
interleaved pairs; the GGUF loader undoes that permutation so this one layout serves both.
"""
import math

import torch

from ._dispatch import check_backend, import_triton, interpreter_on, resolve
from .spec import BenchCase
from .step_cache import PerStep

try:
    triton = import_triton()
    import triton.language as tl
except ImportError:  # `import tinyserve.ops` must work without triton; only "ref" is available
    triton = None


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair angular frequencies, [head_dim/2] fp32."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if freq_factors is not None:  # GGUF rope_freqs.weight: Llama-3 scaling, precomputed
        inv = inv / freq_factors.double()
    elif scaling is not None and scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1+: stretch long wavelengths by `factor`, keep short ones, blend between.
        factor = scaling["factor"]
        lo, hi = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen) - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_ctx / lo, inv / factor,
                          torch.where(wavelen < old_ctx / hi, inv, blended))
    return inv.float()


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """positions: [B, T] int -> cos, sin: [B, T, head_dim] fp32 (each half repeated)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [B, Hq, T, D], k: [B, Hkv, T, D], cos/sin: [B, T, D] -> rotated q, k (input dtype).

    Bytes: reads q and k once and writes them once (2 * (Hq + Hkv) * D elements per token) plus
    2D fp32 of cos/sin per token. Eager PyTorch moves several times that: the fp32 copies, the
    chunk/cat of rotate_half and each product are separate kernels with their own temporaries.
    """
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    qf, kf = q.float(), k.float()
    q_out = qf * cos + _rotate_half(qf) * sin
    k_out = kf * cos + _rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


if triton is not None:
    @triton.jit
    def _rotate_heads(X, Y, x_row, y_row, sxh, syh, H, c1, c2, s1, s2, HALF,
                      BLOCK_H: tl.constexpr, HALF_BLOCK: tl.constexpr):
        # Rotates the H heads of one token, BLOCK_H heads at a time: a [BLOCK_H, HALF_BLOCK]
        # tile of each half. Rotate-half pairs dimension i with i + HALF, so no shuffles needed.
        d = tl.arange(0, HALF_BLOCK)[None, :]
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)[:, None]
            mask = (h < H) & (d < HALF)
            px = X + x_row + h * sxh + d
            py = Y + y_row + h * syh + d
            x1 = tl.load(px, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(px + HALF, mask=mask, other=0.0).to(tl.float32)
            # Same products and sums, in the same order, as the fp32 reference.
            out1 = x1 * c1 + (-x2) * s1
            out2 = x2 * c2 + x1 * s2
            tl.store(py, out1.to(Y.dtype.element_ty), mask=mask)
            tl.store(py + HALF, out2.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(Q, K, QO, KO, COS, SIN, T, Hq, Hkv, HALF,
                     sqb, sqh, sqt, skb, skh, skt, sob, soh, sot, spb, sph, spt,
                     scb, sct, ssb, sst,
                     BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF_BLOCK: tl.constexpr):
        # One program per token (b, t): reads that token's D cos and D sin values once and
        # applies them to all Hq query heads and Hkv key heads (reads and writes each once).
        pid = tl.program_id(0).to(tl.int64)
        b = pid // T
        t = pid % T
        d = tl.arange(0, HALF_BLOCK)[None, :]
        dm = d < HALF
        pc = COS + b * scb + t * sct + d
        ps = SIN + b * ssb + t * sst + d
        c1 = tl.load(pc, mask=dm, other=0.0).to(tl.float32)
        c2 = tl.load(pc + HALF, mask=dm, other=0.0).to(tl.float32)
        s1 = tl.load(ps, mask=dm, other=0.0).to(tl.float32)
        s2 = tl.load(ps + HALF, mask=dm, other=0.0).to(tl.float32)
        _rotate_heads(Q, QO, b * sqb + t * sqt, b * sob + t * sot, sqh, soh, Hq,
                      c1, c2, s1, s2, HALF, BLOCK_HQ, HALF_BLOCK)
        _rotate_heads(K, KO, b * skb + t * skt, b * spb + t * spt, skh, sph, Hkv,
                      c1, c2, s1, s2, HALF, BLOCK_HK, HALF_BLOCK)


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be [B, H, T, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    B, _, T, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"apply_rope: k {tuple(k.shape)} must share B, T, D with q "
                         f"{tuple(q.shape)}")
    if D % 2:
        raise ValueError(f"apply_rope: head_dim must be even for rotate-half, got {D}")
    if cos.shape != (B, T, D) or sin.shape != (B, T, D):
        raise ValueError(f"apply_rope: cos/sin must be {(B, T, D)}, got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not t.is_floating_point():
            raise ValueError(f"apply_rope: {name} must be floating point, got {t.dtype}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # Any strides are fine for the outer dims (the model passes q/k as transposed views of
    # [B, T, H, D], and copying them to [B, H, T, D] would cost a full extra read + write);
    # only the innermost dim must be unit-stride so each head row loads as one coalesced run.
    return t if t.stride(-1) == 1 else t.contiguous()


def apply_rope_triton(q, k, cos, sin, out=None):
    """Same signature and result as ``apply_rope_ref``; ``out`` = (q_out, k_out) to write into.

    New outputs keep the inputs' memory layout (``empty_like``), so a transposed view in gives a
    transposed view out and reads and writes walk memory in the same order.
    """
    _check(q, k, cos, sin)
    q, k, cos, sin = (_unit_last(t) for t in (q, k, cos, sin))
    qo, ko = out if out is not None else (torch.empty_like(q), torch.empty_like(k))
    for o, i in ((qo, q), (ko, k)):
        if o.shape != i.shape or o.dtype != i.dtype or o.stride(-1) != 1:
            raise ValueError(f"apply_rope: out must be {tuple(i.shape)} {i.dtype} with unit "
                             f"stride in the last dim")
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if B * T == 0:
        return qo, ko
    HALF_BLOCK = triton.next_power_of_2(D // 2)
    # ~2048 elements per half-tile per loop step: Llama's 32 x 64 at D=128 in one step.
    cap = max(1, 2048 // HALF_BLOCK)
    BLOCK_HQ = min(triton.next_power_of_2(Hq), cap)
    BLOCK_HK = min(triton.next_power_of_2(Hkv), cap)
    _rope_kernel[(B * T,)](q, k, qo, ko, cos, sin, T, Hq, Hkv, D // 2,
                           q.stride(0), q.stride(1), q.stride(2),
                           k.stride(0), k.stride(1), k.stride(2),
                           qo.stride(0), qo.stride(1), qo.stride(2),
                           ko.stride(0), ko.stride(1), ko.stride(2),
                           cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
                           BLOCK_HQ=BLOCK_HQ, BLOCK_HK=BLOCK_HK, HALF_BLOCK=HALF_BLOCK,
                           num_warps=4)
    return qo, ko


# The step's angles [B, 1, T, D] in the activation dtype, cast once per step, not per layer.
_angles = PerStep(lambda cos, sin, dtype: (cos[:, None].to(dtype), sin[:, None].to(dtype)))


def apply_rope_native(q, k, cos, sin):
    """As ``apply_rope_ref`` computed in the input dtype (bf16 on the native CPU path) with
    fewer ops (no fp32 copies; the multiply-add fused in ``addcmul``): two roundings per
    element instead of one, within bf16's precision of the reference."""
    cos, sin = _angles(cos, sin, q.dtype)
    return (torch.addcmul(q * cos, _rotate_half(q), sin),
            torch.addcmul(k * cos, _rotate_half(k), sin))


def apply_rope(q, k, cos, sin, backend="auto"):
    """Rotate q and k by the per-token angles in cos/sin. backend: ref | triton | native |
    auto."""
    check_backend(backend)
    _check(q, k, cos, sin)
    impl = resolve(backend, q)
    if impl == "triton":
        return apply_rope_triton(q, k, cos, sin)
    if impl == "native":
        return apply_rope_native(q, k, cos, sin)
    return apply_rope_ref(q, k, cos, sin)


def bench_cases(device, small: bool = False):
    """Llama-2-7B attention (32 q and 32 kv heads x 128): decode at batch 1 and 16, and a
    4096-token prefill. q/k are transposed views of [B, T, H, D], as the model passes them."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    Hq, Hkv, D = (4, 2, 16) if small else (32, 32, 128)
    shapes = ((1, 1), (2, 3)) if small else ((1, 1), (16, 1), (1, 4096))   # (B, T)
    has_triton = triton is not None and (dev.type == "cuda" or interpreter_on())
    esz = torch.empty((), dtype=dtype).element_size()
    cases = []
    for B, T in shapes:
        def setup(B=B, T=T):
            q = torch.randn(B, T, Hq, D, device=dev, dtype=dtype).transpose(1, 2)
            k = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype).transpose(1, 2)
            pos = torch.arange(T, device=dev).expand(B, T)
            cos, sin = rope_cos_sin(pos, rope_inv_freq(D, 10000.0))
            impls = {"ref": lambda: apply_rope_ref(q, k, cos, sin)}
            if has_triton:
                impls["triton"] = lambda: apply_rope_triton(q, k, cos, sin)
            return impls
        moved = 2 * B * T * (Hq + Hkv) * D * esz + 2 * B * T * D * 4   # q,k in+out; cos, sin
        cases.append(BenchCase(op="rope", name=f"B={B} T={T} Hq={Hq} Hkv={Hkv} D={D} "
                                                f"{str(dtype)[6:]}",
                               setup=setup, bytes=moved, flops=3 * B * T * (Hq + Hkv) * D,
                               peers=("ref",), meta={"B": B, "T": T, "Hq": Hq, "Hkv": Hkv, "D": D}))
    return cases
