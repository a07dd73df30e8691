"""cpu_int4: GGUF Q4_1 and tinyserve int4 weights through PyTorch's int4 CPU kernel.

The packed weight must represent the source weights exactly (fp32 mode) or within the bf16
rounding of its scales and zeros (bf16 mode), and ``linear`` must equal x @ dequantize()^T up to
the order of fp32 summation. Shapes: SmolLM2-135M's projections and its 49152-row LM head.
"""
import math

import pytest
import torch

from tinyserve.ops import cpu_int4 as ci
from tinyserve.quant.gguf_format import quantize_gguf
from tinyserve.quant.int_formats import quantize_int4

pytestmark = pytest.mark.skipif(not ci.int4pack_available(),
                                reason="this torch has no working aten._weight_int4pack_mm_for_cpu")

SMOLLM2 = [(576, 576), (1536, 576), (576, 1536), (192, 576)]   # (N, K) of q/o, gate/up, down, k/v
U32 = 2.0 ** -24          # fp32 unit roundoff
U16B = 2.0 ** -8          # bf16 unit roundoff (8 significant bits, 7 stored)


def weight(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) / K ** 0.5


def x_rows(M, K, seed=1):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed))


def sz_of(pw):
    """(scale, zero) as fp32 [N, K] broadcasts, for the element-wise bounds."""
    sz = pw.scales_and_zeros.float()
    rep = lambda t: t.T.repeat_interleave(pw.group_size, dim=1)
    return rep(sz[..., 0]), rep(sz[..., 1])


def assert_exact_mapping(pw, ref):
    """fp32 mode: the only roundings are zero = fl(min + 8 s) and fl((q - 8) s + zero); the
    file's reference rounds fl(q s + min) once. So |got - ref| <= u (|zero| + |got| + |ref|)."""
    got = pw.dequantize()
    _, zero = sz_of(pw)
    bound = U32 * (zero.abs() + got.abs() + ref.abs())
    assert ((got - ref).abs() <= bound).all()
    print(f"[{pw.out_features}x{pw.in_features}] dequantize == reference for "
          f"{(got == ref).float().mean().item():.4%} of weights")
    return got


def check_linear(pw, w, M):
    """fp32 mode: both sides accumulate K fp32 products in different orders: random-sign
    rounding errors ~ sqrt(K) ulps of the O(1) outputs; 4 sqrt(K) eps as in test_quant_linear."""
    x = x_rows(M, pw.in_features, seed=M)
    tol = 4 * math.sqrt(pw.in_features) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(pw.linear(x), x @ w.T, atol=tol, rtol=tol)


@pytest.mark.parametrize("N,K", SMOLLM2)
def test_q4_1_exact_and_linear(N, K):
    gw = quantize_gguf(weight(N, K), "Q4_1")
    ref = gw.dequantize()                     # weights.gguf_blocks' decoder: the reference
    pw = ci.pack_q4_1(gw)
    assert (pw.group_size, pw.out_features, pw.in_features) == (32, N, K)
    assert pw.nbytes == N * K // 2 + (K // 32) * N * 2 * 4     # nibbles + fp32 (scale, zero)
    deq = assert_exact_mapping(pw, ref)
    for M in (1, 7):
        check_linear(pw, deq, M)
    # raw bytes + shape give the same packing as the GGUFWeight object
    assert torch.equal(ci.pack_q4_1(gw.data.numpy(), (N, K)).packed, pw.packed)


def test_q4_1_lm_head():
    """49152 x 576 (SmolLM2's vocabulary): the packing covers every row; compared through
    ``linear`` only (dequantize's K x K probe is the slow part at this size)."""
    N, K = 49152, 576
    gw = quantize_gguf(weight(N, K), "Q4_1")
    pw = ci.pack_q4_1(gw)
    ref = gw.dequantize()
    for M in (1, 7):
        check_linear(pw, ref, M)


def test_kernel_multiplies_by_dequantize():
    """dequantize() is what the kernel multiplies by: with x = I each output is one product
    1 * w (others are 0 * w = 0), so linear(I)^T is the kernel's weight, bit for bit."""
    pw = ci.pack_q4_1(quantize_gguf(weight(192, 576), "Q4_1"))
    assert torch.equal(pw.linear(torch.eye(576)).T, pw.dequantize())


@pytest.mark.parametrize("N,K", [(576, 576), (192, 576)])
def test_q4_1_bf16_mode(N, K):
    """bf16 mode rounds scale and zero to bf16: |w - ref| <= 2^-8 (8 |s| + |z|) (|q - 8| <= 8),
    plus the fp32 terms above. Its linear rounds x and y to bf16: 2 bf16 ulps + fp32 ordering."""
    gw = quantize_gguf(weight(N, K), "Q4_1")
    ref, pw = gw.dequantize(), ci.pack_q4_1(gw, compute_dtype=torch.bfloat16)
    assert pw.scales_and_zeros.dtype == torch.bfloat16
    got = pw.dequantize()
    s, z = ci.pack_q4_1(gw).scales_and_zeros.float().unbind(-1)
    rep = lambda t: t.T.repeat_interleave(32, dim=1)
    bound = U16B * (8 * rep(s).abs() + rep(z).abs()) + U32 * 4 * (rep(z).abs() + ref.abs())
    assert ((got - ref).abs() <= bound).all()
    x = x_rows(7, K)
    tol = 2 * torch.finfo(torch.bfloat16).eps + 4 * math.sqrt(K) * torch.finfo(torch.float32).eps
    want = x.bfloat16().float() @ got.T
    torch.testing.assert_close(pw.linear(x), want, atol=tol, rtol=tol)
    assert pw.linear(x.bfloat16()).dtype == torch.bfloat16       # caller's dtype preserved


@pytest.mark.parametrize("N,K,g", [(576, 576, 32), (1536, 576, 64), (576, 1536, 128),
                                   (192, 576, 32)])
def test_int4_groupwise_exact_and_linear(N, K, g):
    qt = quantize_int4(weight(N, K, seed=2), group_size=g)
    ref = qt.dequantize()
    pw = ci.pack_int4_groupwise(qt)
    assert pw.group_size == g
    deq = assert_exact_mapping(pw, ref)
    for M in (1, 7):
        check_linear(pw, deq, M)
    same = ci.pack_int4_groupwise(qt.qweight, qt.scales, qt.mins, g)
    assert torch.equal(same.packed, pw.packed)


def test_linear_shapes_and_dtypes():
    pw = ci.pack_q4_1(quantize_gguf(weight(64, 96), "Q4_1"))
    deq = pw.dequantize()
    x = x_rows(6, 96).view(2, 3, 96)
    torch.testing.assert_close(pw.linear(x), x @ deq.T, atol=1e-5, rtol=1e-5)   # 3-D input
    xt = x_rows(96, 4).T                                                      # non-contiguous
    torch.testing.assert_close(pw.linear(xt), xt @ deq.T, atol=1e-5, rtol=1e-5)
    assert pw.linear(torch.empty(0, 96)).shape == (0, 64)
    assert pw.linear(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="K=96"):
        pw.linear(torch.zeros(1, 95))


def test_chunked_packing_matches_whole(monkeypatch):
    codes = torch.randint(0, 16, (208, 64), dtype=torch.uint8)
    s, z = torch.rand(208, 2), torch.randn(208, 2)
    whole = ci.pack_int4_codes(codes, s, z, 32)
    monkeypatch.setattr(ci, "_PACK_ROWS", 64)                                 # 64+64+64+16 rows
    assert torch.equal(ci.pack_int4_codes(codes, s, z, 32).packed, whole.packed)
    assert torch.equal(whole.codes(), codes)


@pytest.mark.parametrize("N,K,g,match", [(8, 64, 32, "N=8"), (24, 64, 32, "multiple of 16"),
                                         (16, 48, 32, "K=48"), (16, 64, 16, "group size"),
                                         (16, 96, 64, "K=96")])
def test_bad_shapes_raise(N, K, g, match):
    with pytest.raises(ValueError, match=match):
        ci.pack_int4_codes(torch.zeros(N, K, dtype=torch.uint8), torch.ones(N, max(1, K // g)),
                           torch.zeros(N, max(1, K // g)), g)


def test_bad_inputs_raise():
    gw = quantize_gguf(weight(32, 64), "Q4_1")
    with pytest.raises(ValueError, match="Q8_0"):
        ci.pack_q4_1(quantize_gguf(weight(32, 64), "Q8_0"))
    with pytest.raises(ValueError, match="bytes"):
        ci.pack_q4_1(gw.data[:, :20], (32, 64))
    with pytest.raises(ValueError, match="K=40"):
        ci.pack_q4_1(gw.data, (32, 40))
    with pytest.raises(ValueError, match="scale and zero"):
        ci.pack_int4_codes(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 3),
                           torch.zeros(16, 3), 32)
    with pytest.raises(ValueError, match="compute_dtype"):
        ci.pack_q4_1(gw, compute_dtype=torch.float16)


def test_unavailable_raises_clear_error(monkeypatch):
    monkeypatch.setattr(ci, "int4pack_available", lambda: False)
    with pytest.raises(ci.Int4PackUnavailable, match="dequantized"):
        ci.pack_q4_1(quantize_gguf(weight(32, 64), "Q4_1"))
    with pytest.raises(ci.Int4PackUnavailable):
        ci.pack_int4_groupwise(quantize_int4(weight(32, 64), group_size=32))


def _probe_with(monkeypatch, ops) -> bool:
    """int4pack_available() with ``_ops`` replaced; the real probe is restored after."""
    ci.int4pack_available.cache_clear()
    monkeypatch.setattr(ci, "_ops", ops)
    try:
        return ci.int4pack_available()
    finally:
        ci.int4pack_available.cache_clear()
        monkeypatch.undo()
        assert ci.int4pack_available() is True


def test_probe_false_when_op_missing(monkeypatch):
    """A torch without the ops (or with a changed signature) reads as unavailable, no raise."""
    def gone():
        raise AttributeError("_weight_int4pack_mm_for_cpu")
    assert _probe_with(monkeypatch, gone) is False


def test_probe_false_when_convention_changes(monkeypatch):
    """An op that computed q * scale + zero (no -8 offset) would be caught by the probe."""
    convert, mm = ci._ops()

    def shifted_mm(x, packed, g, sz):                   # = (q - 8) s + z + 8 s = q s + z
        sz2 = sz.clone()
        sz2[..., 1] += 8 * sz[..., 0]
        return mm(x, packed, g, sz2)
    assert _probe_with(monkeypatch, lambda: (convert, shifted_mm)) is False


def test_real_smollm2_blocks(smollm2_file):
    """The file's own Q4_1 blocks (real d/m ranges, not our encoder's): one tensor per shape.
    Read through the header scanner and an mmap (the full gguf reader takes seconds)."""
    import mmap
    from pathlib import Path

    import numpy as np
    from tinyserve.weights.gguf_blocks import PackedTensor
    from tinyserve.weights.gguf_header import scan_gguf
    path = Path(smollm2_file)
    seen = {}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _, infos, start, _ = scan_gguf(path, buf)
        for t in infos:                                     # ggml type 3 = Q4_1; dims inner first
            shape = tuple(reversed(t.dims))
            if t.type_id == 3 and shape not in seen:
                n = shape[0] * shape[1] // 32 * 20
                raw = np.frombuffer(buf, np.uint8, n, start + t.offset).copy()
                seen[shape] = PackedTensor(t.name, "Q4_1", shape, raw)
    assert set(seen) >= set(SMOLLM2)
    for pt in seen.values():
        assert_exact_mapping(ci.pack_q4_1(pt), pt.dequantize())
