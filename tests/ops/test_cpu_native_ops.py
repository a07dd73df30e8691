"""The "native" CPU backend's ops against their references: attention (contiguous and paged,
SDPA), the paged write, RMSNorm, RoPE, and the int8 per-row weight (ops/cpu_int8.py).

Tolerances. fp32: only the summation order differs (SDPA's fused loop vs the reference's
score matrix; F.rms_norm vs the eager formula): 1e-5 on O(1) values. bf16: both sides round
to bf16 (8 significant bits, 2^-8 relative) but at different places (the reference computes in
fp32 and rounds once, the native ops round inputs/intermediates), so a few bf16 ulps:
atol = rtol = 2e-2 on O(1) values (one ulp at 2..4 is 2^-6 = 0.016).
"""
import math

import pytest
import torch

from tinyserve import ops
from tinyserve.ops import _dispatch, cpu_attention as ca, cpu_int8 as ci8
from tinyserve.ops.attention_common import attention_ref
from tinyserve.ops.paged_attention import paged_decode_attention_ref, paged_prefill_attention_ref
from tinyserve.ops.paged_layout import paged_write_ref, random_paged_cache
from tinyserve.ops.rms_norm import rms_norm_native, rms_norm_ref
from tinyserve.ops.rope import apply_rope_native, apply_rope_ref, rope_cos_sin, rope_inv_freq
from tinyserve.weights.gguf_blocks import PackedTensor
from _fixtures import close, encode_tensor

DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]   # (dtype, atol = rtol), see above
HEADS = [(6, 2), (4, 4)]                                   # (Hq, Hkv): GQA and MHA
D = 16


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- contiguous attention -------------------------------------------------------------------
def _contiguous_case(kv_lens, T, Hq, Hkv, dtype, seed=0):
    """Each row's T queries are the last T of its kv_len keys (a row with kv_len 0: padding).
    Keys/values past kv_len are large, so a leak past the mask shows."""
    g = _gen(seed)
    B, S = len(kv_lens), max(kv_lens) + 3
    q = torch.randn(B, Hq, T, D, generator=g)
    k, v = (torch.randn(B, Hkv, S, D, generator=g) for _ in range(2))
    for b, n in enumerate(kv_lens):
        k[b, :, n:], v[b, :, n:] = 50.0, 50.0
    kv = torch.tensor(kv_lens)
    q_pos = kv[:, None] - T + torch.arange(T)[None]
    return q.to(dtype), k.to(dtype), v.to(dtype), q_pos, kv


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("Hq,Hkv", HEADS)
@pytest.mark.parametrize("kv_lens", [[9], [7, 0, 13]])
@pytest.mark.parametrize("T", [1, 4])
def test_attention_native_matches_ref(kv_lens, T, Hq, Hkv, dtype, tol):
    q, k, v, q_pos, kv = _contiguous_case(kv_lens, T, Hq, Hkv, dtype)
    want = attention_ref(q, k, v, q_pos, kv)
    got = ca.attention_native(q, k, v, q_pos, kv)
    assert got.dtype == dtype and got.shape == q.shape
    close("attention_native", got, want, tol, tol)
    for b, n in enumerate(kv_lens):
        if n == 0:
            assert torch.equal(got[b], torch.zeros_like(got[b]))   # no key: zeros, not NaN
    # the dispatcher's backend="native" is this same function
    assert torch.equal(ops.attention(q, k, v, q_pos, kv, backend="native"), got)


def test_native_backend_dispatch():
    """backend="native" is a known backend and resolves to itself on CPU tensors (a CUDA
    tensor must be refused, which needs a GPU to test)."""
    assert _dispatch.check_backend("native") == "native"
    assert _dispatch.resolve("native", torch.zeros(1)) == "native"
    with pytest.raises(ValueError):
        _dispatch.check_backend("nativ")


# ---- paged attention ------------------------------------------------------------------------
KV_LENS = [5, 0, 19, 33]    # block size 4: partial last blocks, an empty row, 9 blocks


def _paged(dtype, Hkv, seed=0, extra=3):
    """Random K/V in shuffled physical blocks (3 spare blocks), -1 past each row's blocks."""
    kc, vc, bt = random_paged_cache(KV_LENS, Hkv, D, 4, extra_blocks=extra, dtype=dtype,
                                    generator=_gen(seed))
    return kc, vc, bt, torch.tensor(KV_LENS, dtype=torch.int32)


def _cu_q(q_lens):
    return torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("Hq,Hkv", HEADS)
def test_paged_attention_native_matches_refs(Hq, Hkv, dtype, tol):
    kc, vc, bt, kv = _paged(dtype, Hkv)
    g = _gen(1)
    # decode: one query per row
    q = torch.randn(len(KV_LENS), Hq, D, generator=g).to(dtype)
    got = ca.paged_attention_native(q, kc, vc, bt, kv)
    close("paged decode", got, paged_decode_attention_ref(q, kc, vc, bt, kv), tol, tol)
    assert torch.equal(got[1], torch.zeros_like(got[1]))           # kv_len 0 -> zeros
    assert torch.equal(ops.paged_attention(q, kc, vc, bt, kv, backend="native"), got)
    # packed: a whole prompt (q_len == kv_len), nothing, a chunk over a cached prefix, a decode
    cu_q = _cu_q([5, 0, 6, 1])
    q = torch.randn(int(cu_q[-1]), Hq, D, generator=g).to(dtype)
    got = ca.paged_attention_native(q, kc, vc, bt, kv, cu_q)
    close("paged packed", got, paged_prefill_attention_ref(q, kc, vc, bt, cu_q, kv), tol, tol)
    assert torch.equal(ops.paged_attention(q, kc, vc, bt, kv, cu_q, backend="native"), got)


def test_slot_index_follows_block_table_changes():
    """The slot index is built once per (block_tables, kv_lens) and reused across layers; an
    in-place write to either tensor (``_version``) or a new tensor must rebuild it."""
    kc, vc, bt, kv = _paged(torch.float32, 2)
    q = torch.randn(len(KV_LENS), 6, D, generator=_gen(2))

    def check():
        close("paged decode", ca.paged_attention_native(q, kc, vc, bt, kv),
              paged_decode_attention_ref(q, kc, vc, bt, kv), 1e-5, 1e-5)

    check()
    rows = ca._slots.value
    check()
    assert ca._slots.value is rows                     # same tensors, unmodified: reused
    # Decode attends to every key, so only a different block (not a reordering) changes
    # the answer: point row 2's first entry at a spare block, in place.
    spare = sorted(set(range(kc.shape[0])) - set(bt.flatten().tolist()))[0]
    before = ca.paged_attention_native(q, kc, vc, bt, kv)
    bt[2, 0] = spare
    check()
    assert not torch.equal(ca.paged_attention_native(q, kc, vc, bt, kv)[2], before[2])
    # a new table tensor with equal contents to an old one, and a new, different one
    bt = bt.clone()
    check()
    bt = bt.clone()
    bt[3, 1] = spare
    check()
    kv = kv.clone()
    kv[0] -= 2                                        # lengths modified in place
    check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_write_native_matches_ref(dtype):
    kc, vc, _, _ = _paged(dtype, 2)
    g = _gen(3)
    N = 11
    slots = torch.randperm(kc.shape[0] * kc.shape[1], generator=g)[:N]
    k_new, v_new = (torch.randn(N, 2, D, generator=g).to(dtype) for _ in range(2))
    pools = []
    for fn, s in ((ca.paged_write_native, slots), (paged_write_ref, slots),
                  (ops.paged_write, slots)):
        k, v = kc.clone(), vc.clone()
        if fn is ops.paged_write:
            fn(k, v, k_new, v_new, s, backend="native")
        else:
            fn(k, v, k_new, v_new, s)
        pools.append((k, v))
    for k, v in pools[1:]:
        assert torch.equal(k, pools[0][0]) and torch.equal(v, pools[0][1])
    assert not torch.equal(pools[0][0], kc)           # it wrote something
    # a -1 slot (skip this token) takes the reference's path: same pools
    skip = slots.clone()
    skip[4] = -1
    (k1, v1), (k2, v2) = (kc.clone(), vc.clone()), (kc.clone(), vc.clone())
    ca.paged_write_native(k1, v1, k_new, v_new, skip)
    paged_write_ref(k2, v2, k_new, v_new, skip)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    bs = kc.shape[1]
    s4 = int(slots[4])
    assert torch.equal(k1[s4 // bs, s4 % bs], kc[s4 // bs, s4 % bs])   # the skipped slot


# ---- RMSNorm and RoPE ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rms_norm_native(dtype, tol):
    """bf16: the reference rounds the normalized x before the weight multiply, F.rms_norm
    after: at most ~1.5 bf16 ulps apart (rtol 1e-2 > 2^-7)."""
    g = _gen(4)
    x, r = (torch.randn(3, 5, 32, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.2 * torch.randn(32, generator=g)).to(dtype)
    close("rms_norm", rms_norm_native(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), tol, tol)
    (y, h), (yr, hr) = rms_norm_native(x, w, 1e-5, r), rms_norm_ref(x, w, 1e-5, r)
    assert torch.equal(h, hr)                          # the residual add is one rounding in both
    close("rms_norm+residual", y, yr, tol, tol)
    assert torch.equal(ops.rms_norm(x, w, 1e-5, backend="native"), rms_norm_native(x, w, 1e-5))


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_apply_rope_native(dtype, tol):
    """bf16: two roundings per element (product, then addcmul) instead of one."""
    g = _gen(5)
    B, T, Hq, Hkv = 2, 5, 6, 2
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype).transpose(1, 2)   # the model's views
    k = torch.randn(B, T, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    pos = torch.tensor([[0, 1, 2, 3, 4], [17, 18, 19, 20, 21]])
    cos, sin = rope_cos_sin(pos, rope_inv_freq(D, 10000.0))
    (qn, kn), (qr, kr) = apply_rope_native(q, k, cos, sin), apply_rope_ref(q, k, cos, sin)
    assert qn.dtype == kn.dtype == dtype
    close("rope q", qn, qr, tol, tol)
    close("rope k", kn, kr, tol, tol)
    qd, kd = ops.apply_rope(q, k, cos, sin, backend="native")
    assert torch.equal(qd, qn) and torch.equal(kd, kn)


# ---- int8 per-row weights -----------------------------------------------------------------
needs_int8 = pytest.mark.skipif(not ci8.int8pack_available(),
                                reason="this torch has no working aten._weight_int8pack_mm")
CDTYPES = [torch.float32, torch.bfloat16]


def _check_rows(pw, w, compute_dtype):
    """|w - q s| <= s/2 (rounding to the grid) with s = bf16(max|w| / 127); the stored scale
    may be rounded down by 2^-9 relative, so the largest |w| may clamp at 127 s: add
    max|w| * 2^-8 in bf16 (2^-23 in fp32)."""
    amax = w.abs().amax(dim=1, keepdim=True)
    slack = amax * (2.0 ** -8 if compute_dtype == torch.bfloat16 else 2.0 ** -23)
    err = (w - pw.dequantize()).abs()
    assert (err <= amax / 254 * (1 + 2.0 ** -8) + slack).all(), err.max()
    assert pw.q.dtype == torch.int8 and pw.scale.dtype == compute_dtype
    assert int(pw.q.abs().max()) == 127               # each row's largest weight uses the range


@needs_int8
@pytest.mark.parametrize("compute_dtype", CDTYPES)
def test_pack_int8_rows_bound_and_linear(compute_dtype, monkeypatch):
    N, K = 45, 64
    w = torch.randn(N, K, generator=_gen(6)) / K ** 0.5
    w[3] *= 1000                                      # rows have their own scales
    whole = ci8.pack_int8_rows(lambda i, j: w[i:j], N, compute_dtype)
    _check_rows(whole, w, compute_dtype)
    monkeypatch.setattr(ci8, "_PACK_ROWS", 16)        # chunked packing: the same result
    pw = ci8.pack_int8_rows(lambda i, j: w[i:j], N, compute_dtype)
    assert torch.equal(pw.q, whole.q) and torch.equal(pw.scale, whole.scale)
    assert (pw.out_features, pw.in_features) == (N, K)
    deq = pw.dequantize()
    x = torch.randn(7, K, generator=_gen(7))
    if compute_dtype == torch.float32:
        # both sides sum K exact fp32 products in different orders: 4 sqrt(K) eps
        tol = 4 * math.sqrt(K) * torch.finfo(torch.float32).eps
        torch.testing.assert_close(pw.linear(x), x @ deq.T, rtol=tol, atol=tol * 1000)
    else:
        # x rounded to bf16 (done here too), products summed in fp32, the result rounded to
        # bf16 once: 2^-8 relative (atol for sums that cancel to ~0)
        xb = x.bfloat16()
        y = pw.linear(xb)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), xb.float() @ deq.T, rtol=2.0 ** -8, atol=1e-2)
        assert torch.equal(pw.linear(x), y.float())   # fp32 x: cast in, cast back
        ids = torch.tensor([[0, 3, 44], [3, 3, 7]])   # embedding: q * s rounded once to bf16
        assert torch.equal(pw.embedding(ids), deq[ids].bfloat16())
    # any leading dims, and no rows at all
    x3 = torch.randn(2, 3, K, generator=_gen(8)).to(compute_dtype)
    assert torch.equal(pw.linear(x3), pw.linear(x3.reshape(6, K)).view(2, 3, N))
    assert pw.linear(x3[:0]).shape == (0, 3, N)
    assert pw.linear(torch.zeros(0, K, dtype=compute_dtype)).shape == (0, N)
    with pytest.raises(ValueError):
        pw.linear(torch.zeros(2, 3, K + 1))


@needs_int8
@pytest.mark.parametrize("compute_dtype", CDTYPES)
def test_pack_q8_0_from_gguf_blocks(compute_dtype, monkeypatch):
    """A real Q8_0 tensor (gguf's own quantizer) requantized per row: within the per-row
    bound of the file's decoded weights, chunking (slices of the block rows) changes nothing."""
    N, K = 48, 96
    w = torch.randn(N, K, generator=_gen(9)) / K ** 0.5
    data, _ = encode_tensor(w.numpy(), "Q8_0")
    pt = PackedTensor("blk.0.attn_q.weight", "Q8_0", (N, K), data)
    ref = pt.dequantize(torch.float32)
    pw = ci8.pack_q8_0(pt, compute_dtype)
    _check_rows(pw, ref, compute_dtype)
    direct = ci8.pack_int8_rows(lambda i, j: ref[i:j], N, compute_dtype)
    assert torch.equal(pw.q, direct.q) and torch.equal(pw.scale, direct.scale)
    monkeypatch.setattr(ci8, "_PACK_ROWS", 20)
    chunked = ci8.pack_q8_0(pt, compute_dtype)
    assert torch.equal(chunked.q, pw.q) and torch.equal(chunked.scale, pw.scale)
    with pytest.raises(ValueError, match="2-D"):
        ci8.pack_q8_0(PackedTensor("v", "F32", (K,), w[0].numpy()))


@needs_int8
def test_int8_unavailable_raises(monkeypatch):
    """A torch whose op is missing (or broken): the probe says so, packing raises
    Int8PackUnavailable (callers fall back to dequantized weights)."""
    def missing():
        raise AttributeError("no _weight_int8pack_mm")
    ci8._mm.cache_clear()
    ci8.int8pack_available.cache_clear()
    try:
        monkeypatch.setattr(ci8, "_mm", missing)
        assert ci8.int8pack_available() is False
        with pytest.raises(ci8.Int8PackUnavailable):
            ci8.pack_int8_rows(lambda i, j: torch.ones(j - i, 32), 4)
    finally:
        monkeypatch.undo()
        ci8.int8pack_available.cache_clear()
        ci8._mm.cache_clear()
    assert ci8.int8pack_available() is True
