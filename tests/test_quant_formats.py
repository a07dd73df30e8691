"""The reference quantizers (tinyserve/quant/formats.py): error bounds derived from each format's
grid, exactness where the grid already fits, byte layouts and byte counts, and the source
article's snippet (claim C9) measured against ours."""
import numpy as np
import pytest
import torch

from tinyserve.quant import gguf_format
from tinyserve.quant import (GGUFWeight, Int4Weight, NF4_CODEBOOK,
                             dequantize_group_article, fake_quantize_asym, make_quant_linear,
                             pack_nibbles, quantize_gguf, quantize_group_article, quantize_int4,
                             quantize_int8, quantize_nf4, unpack_nibbles, wrap_int8)

FP32_EPS = torch.finfo(torch.float32).eps


def weights(N=48, K=256, seed=0, kind="normal"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    if kind == "mixed":   # rows with offsets, heavy tails, a zero row, a constant block
        w[1] += 0.3
        w[2] = torch.rand(K, generator=g) ** 3
        w[3] *= torch.where(torch.rand(K, generator=g) < 0.02, 30.0, 1.0)
        w[4] = 0
        w[5, :128] = -0.125
    return w


def rounding_slack(w):
    """fp32 rounding of the dequantization arithmetic (q * s + m): a few ulps of |w|."""
    return 4 * FP32_EPS * (w.abs() + 1e-30)


# ---- int8 -------------------------------------------------------------------------------------
def test_int8_error_is_at_most_half_a_step_per_element():
    w = weights(kind="mixed")
    qt = quantize_int8(w)
    assert qt.qweight.dtype == torch.int8 and qt.scale.dtype == torch.float32
    assert qt.shape == tuple(w.shape) and qt.format == "int8"
    assert int(qt.qweight.abs().max()) <= 127                      # symmetric: -128 unused
    # Round to nearest on the grid {j * scale}, |j| <= 127, which spans [-absmax, absmax]:
    # no element is clamped, so each is within half a step of its code.
    err = (qt.dequantize() - w).abs()
    bound = qt.scale[:, None] / 2 + rounding_slack(w)
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    assert torch.allclose(qt.scale, torch.where(w.abs().amax(1) > 0, w.abs().amax(1) / 127,
                                                torch.ones(w.shape[0])))
    assert (qt.qweight[4] == 0).all() and qt.scale[4] == 1         # an all-zero row


# ---- int4 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(g):
    w = weights(kind="mixed")
    qt = quantize_int4(w, group_size=g)
    N, K = w.shape
    assert qt.qweight.shape == (N, K // 2) and qt.qweight.dtype == torch.uint8
    assert qt.scales.shape == qt.mins.shape == (N, K // g)
    assert qt.scales.dtype == qt.mins.dtype == torch.float16
    wg = w.view(N, K // g, g)
    # mins are the group minimum rounded DOWN to fp16 and the step is rounded UP, so the grid
    # lo + j s (j = 0..15) covers [min, max] of the group: no element is clamped, and each is
    # within s / 2 of its code.
    assert (qt.mins.float() <= wg.amin(-1)).all()
    assert (qt.mins.float() + 15 * qt.scales.float() >= wg.amax(-1) * (1 - 1e-6) - 1e-30).all()
    err = (qt.dequantize() - w).abs().view(N, K // g, g)
    bound = qt.scales.float()[..., None] / 2 + rounding_slack(wg)
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    # The step is the group's range / 15 up to fp16 rounding (not a looser one).
    rng = (wg.amax(-1) - wg.amin(-1)) / 15
    live = rng > 0
    assert torch.allclose(qt.scales.float()[live], rng[live], rtol=2e-3, atol=1e-7)
    # The constant block (row 5, first 128 weights) and the zero row are reproduced exactly.
    wq = qt.dequantize()
    assert torch.equal(wq[4], w[4]) and torch.equal(wq[5, :128], w[5, :128])


def test_int4_groups_are_more_accurate_when_smaller():
    w = weights(N=64, K=512)
    rms = [(quantize_int4(w, g).dequantize() - w).pow(2).mean().sqrt() for g in (32, 64, 128)]
    assert rms[0] < rms[1] < rms[2]


def test_nibble_order_low_nibble_is_the_even_element():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(unpack_nibbles(packed), codes)
    # The same order inside Int4Weight: element 0 in the low nibble of byte 0.
    q = torch.tensor([[0x5A] + [0] * 15], dtype=torch.uint8)           # K = 32, one group
    one, zero = torch.ones(1, 1, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.float16)
    qt = Int4Weight(q, one, zero, 32)
    assert qt.dequantize()[0, :3].tolist() == [10.0, 5.0, 0.0]


def test_int4_reproduces_a_q4_1_grid_exactly():
    """Weights already on a GGUF Q4_1 grid (fp16 d and m per 32, codes 0..15 including both
    ends) come back bit for bit with g = 32: lo = m and s = (hi - lo) / 15 = d are exact."""
    w = weights(N=64, K=256, kind="mixed")
    g4 = quantize_gguf(w, "Q4_1")
    wq = g4.dequantize()
    qt = quantize_int4(wq, group_size=32)
    assert torch.equal(qt.dequantize(), wq)
    blocks = g4.data.view(64, 8, 20)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
    live = d != 0
    assert torch.equal(qt.scales[live], d[live]) and torch.equal(qt.mins, m)


def test_int4_bad_arguments():
    w = weights(K=96)
    with pytest.raises(ValueError, match="group size 64 does not divide in_features 96"):
        quantize_int4(w, group_size=64)
    with pytest.raises(ValueError, match=r"group_size 16 is not one of \(32, 64, 128\)"):
        quantize_int4(weights(), group_size=16)
    with pytest.raises(ValueError, match="bits=3 is out of range"):
        quantize_int4(weights(), group_size=32, bits=3)
    with pytest.raises(ValueError, match="bits=4 is out of range"):
        quantize_int8(weights(), bits=4)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int4(torch.randn(64))
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_int8(torch.full((2, 32), float("nan")))
    with pytest.raises(ValueError, match="float16"):
        quantize_int4(torch.full((2, 32), 1e6), group_size=32)


def test_fake_quantize_error_falls_with_bits():
    w = weights(N=32, K=256)
    rms = [(fake_quantize_asym(w, b, 64) - w).pow(2).mean().sqrt().item() for b in range(2, 9)]
    assert all(a > 1.8 * b for a, b in zip(rms, rms[1:])), rms      # ~2x per extra bit
    for bad in (1, 9):
        with pytest.raises(ValueError, match="out of range"):
            fake_quantize_asym(w, bad, 64)


# ---- nf4 ---------------------------------------------------------------------------------------
def test_nf4_codebook_is_qlora_s():
    cb = NF4_CODEBOOK
    assert cb.shape == (16,) and cb[0] == -1 and cb[-1] == 1 and (cb == 0).sum() == 1
    assert (cb[1:] > cb[:-1]).all()
    assert (cb < 0).sum() == 7 and (cb > 0).sum() == 8              # asymmetric, as published
    assert cb[8].item() == pytest.approx(0.07958029955625534)


def _nearest_ok(x, codes):
    d = (x[..., None] - NF4_CODEBOOK).abs()                          # [.., 16]
    return (d.gather(-1, codes.long()[..., None]).squeeze(-1) <= d.amin(-1) + 1e-7).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_code_is_the_nearest_codebook_value(double_quant):
    w = weights(kind="mixed")
    qt = quantize_nf4(w, double_quant=double_quant)
    N, K = w.shape
    assert qt.qweight.shape == (N, K // 2) and qt.absmax.shape == (N, K // 64)
    assert qt.absmax.dtype == torch.float16
    x = w.view(N, K // 64, 64) / qt.absmax.float()[..., None]        # what the kernel scales by
    assert _nearest_ok(x, qt.codes().view(N, K // 64, 64))
    err = (qt.dequantize() - w).abs().view(N, K // 64, 64)
    if not double_quant:
        # absmax is rounded up, so |w / absmax| <= 1: every value lies between two codes and
        # is within half the widest gap (0.7229568 -> 1.0) of one.
        half_gap = ((NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]) / 2).max()
        bound = qt.absmax.float()[..., None] * half_gap + rounding_slack(err)
        assert (err <= bound).all()
        assert (qt.absmax.float() >= w.view(N, K // 64, 64).abs().amax(-1)).all()


def test_nf4_double_quant_saves_bytes_and_stays_close():
    w = weights(N=64, K=1024, kind="mixed")
    plain, dq = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    n_abs = 64 * 1024 // 64
    n_blk = -(-n_abs // 256)
    assert dq.absmax_q.dtype == torch.int8 and dq.absmax_q.numel() == n_blk * 256
    assert dq.absmax_scale.shape == (n_blk,) and dq.absmax_offset.shape == (1,)
    assert plain.nbytes == 64 * 512 + 2 * n_abs                      # codes + fp16 absmax
    assert dq.nbytes == 64 * 512 + n_blk * 256 + 4 * n_blk + 4 < plain.nbytes
    assert dq.nbytes_compute == plain.nbytes
    # The decoded absmax is within half an int8 step (+ fp16 rounding) of the true one.
    true = w.view(64, 16, 64).abs().amax(-1).reshape(-1)
    step = dq.absmax_scale.repeat_interleave(256)[:true.numel()]
    dec = dq.absmax.float().reshape(-1)
    live = true > 0
    assert ((dec - true).abs()[live] <= step[live] / 2 + 2 ** -10 * true[live] + 1e-6).all()
    e_plain = (plain.dequantize() - w).pow(2).mean().sqrt()
    e_dq = (dq.dequantize() - w).pow(2).mean().sqrt()
    assert e_dq < 1.05 * e_plain


def test_nf4_beats_int4_on_normal_weights_at_equal_bytes():
    """NF4's levels are quantiles of N(0, 1): on Gaussian weights it beats uniform levels at
    the same storage (4.25 bits/weight: nf4 blocks of 64 with an fp16 absmax vs int4 groups of
    128 with fp16 scale + min). Measured here: RMS 0.092 vs 0.100 (int4 g=64, at 4.5 bits,
    0.090)."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(1))
    nf4, i4 = quantize_nf4(w), quantize_int4(w, 128)
    assert nf4.nbytes == i4.nbytes
    e_nf4, e_i4 = ((q.dequantize() - w).pow(2).mean().sqrt() for q in (nf4, i4))
    assert e_nf4 < 0.95 * e_i4


def test_nf4_bad_arguments():
    with pytest.raises(ValueError, match="nf4 block size 64 does not divide in_features 96"):
        quantize_nf4(weights(K=96))
    with pytest.raises(ValueError, match="block size 32 is not supported"):
        quantize_nf4(weights(), block_size=32)
    with pytest.raises(ValueError, match="bits=8 is out of range"):
        quantize_nf4(weights(), bits=8)


# ---- bytes -------------------------------------------------------------------------------------
def test_bytes_of_a_4096_square_matrix():
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    MiB, KiB = 2 ** 20, 2 ** 10
    i4 = quantize_int4(w, group_size=128)
    # 16M codes at 4 bits = 8 MiB, plus fp16 scale and fp16 min per 128 = 4096 * 32 * 2 * 2.
    assert i4.qweight.nbytes == 8 * MiB and i4.nbytes == 8 * MiB + 512 * KiB
    assert i4.bits_per_weight == 4.25
    assert quantize_int4(w, group_size=32).bits_per_weight == 5.0
    assert quantize_int8(w).nbytes == 16 * MiB + 16 * KiB           # + fp32 scale per row
    nf = quantize_nf4(w)
    assert nf.nbytes == 8 * MiB + 512 * KiB                          # fp16 absmax per 64
    nfd = quantize_nf4(w, double_quant=True)
    assert nfd.nbytes == 8 * MiB + 256 * KiB + 4 * KiB + 4           # int8 + fp32 per 256 + mean
    assert quantize_gguf(w[:64], "Q4_1").bits_per_weight == 5.0      # 20 bytes per 32
    assert quantize_gguf(w[:64], "Q8_0").bits_per_weight == 8.5      # 34 bytes per 32


# ---- gguf blocks ------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_gguf_blocks_match_ggml_and_the_file_decoder(qtype):
    gguf = pytest.importorskip("gguf")
    from gguf import quants
    from tinyserve.weights.gguf import PackedTensor, dequantize
    w = weights(N=16, K=128, kind="mixed")
    ours = quantize_gguf(w, qtype)
    ref = quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])   # ggml's reference
    assert np.array_equal(ours.data.numpy(), ref)
    pt = PackedTensor("t", qtype, (16, 128), ref)
    gw = GGUFWeight.from_packed(pt)
    assert gw.nbytes == ref.nbytes and gw.shape == (16, 128) and gw.format == "gguf"
    want = dequantize(ref, qtype, (16, 128))
    assert torch.equal(gw.dequantize(), want)
    on_device = gguf_format._dequantize_blocks_torch(gw.data, qtype, gw.shape)   # device path
    assert torch.equal(on_device, want)
    err = (want - w).abs().max()
    assert err < (0.2 if qtype == "Q4_1" else 0.05)


def test_gguf_rejects_what_the_kernels_do_not_run():
    from tinyserve.weights.gguf import PackedTensor
    with pytest.raises(ValueError, match="Q4_0.*not supported"):
        GGUFWeight.from_packed(PackedTensor("t", "Q4_0", (2, 32), np.zeros((2, 18), np.uint8)))
    with pytest.raises(ValueError, match="must be uint8"):
        GGUFWeight(torch.zeros(2, 21, dtype=torch.uint8), "Q4_1", (2, 32))


# ---- moving, and surviving a model-wide dtype cast ---------------------------------------------
def test_to_and_module_casts_keep_formats():
    w = weights(N=16, K=128)
    for qt in (quantize_int8(w), quantize_int4(w, 32), quantize_nf4(w, double_quant=True),
               quantize_gguf(w, "Q4_1")):
        moved = qt.to("cpu")
        assert type(moved) is type(qt) and torch.equal(moved.dequantize(), qt.dequantize())
        lin = make_quant_linear(qt, torch.zeros(16), torch.float32)
        before = lin.qt.dequantize()
        lin.to(torch.bfloat16)                       # e.g. model.to(torch.bfloat16)
        after = lin.qt
        for name, t in qt.tensors().items():         # scales keep their dtype and bits
            assert getattr(after, name).dtype == t.dtype, name
        assert torch.equal(after.dequantize(), before)
        assert lin.weight.dtype == torch.bfloat16 and lin.bias.dtype == torch.bfloat16


# ---- the article's snippet (claim C9) -----------------------------------------------------------
def test_article_snippet_at_4_bits_stays_in_range_but_wastes_its_step():
    """scales = absmax / 7 with zeros = min: w - min spans max - min <= 2 absmax = 14 steps, so
    the codes stay in 0..14 and the int8 cast is harmless (4 bits stored in 8, though). The
    error comes from the step: absmax / 7 instead of (max - min) / 15. It is 15/14 too coarse
    on a group symmetric around 0 and far too coarse on a lopsided one, where [min, max] is
    narrow but absmax is large: the codes then use only a few of the 16 levels."""
    w = weights(N=64, K=512)
    q, s, z = quantize_group_article(w, 128, 4)
    assert q.dtype == torch.int8 and int(q.min()) == 0 and int(q.max()) <= 14
    art = dequantize_group_article(q, s, z, w.shape)
    ours = quantize_int4(w, 128).dequantize()
    e_art, e_ours = ((x - w).pow(2).mean().sqrt() for x in (art, ours))
    assert e_art > 1.15 * e_ours                    # measured here: about 1.3x
    # A lopsided group: values in [0.9, 1.0]. The step absmax/7 = 0.14 exceeds the whole range.
    lop = 0.9 + 0.1 * torch.rand(1, 128, generator=torch.Generator().manual_seed(0))
    q, s, z = quantize_group_article(lop, 128, 4)
    assert int(q.max()) <= 1                        # 2 of 16 levels used
    e_art = (dequantize_group_article(q, s, z, lop.shape) - lop).abs().max()
    e_ours = (quantize_int4(lop, 128).dequantize() - lop).abs().max()
    assert e_art > 10 * e_ours


def test_article_snippet_at_8_bits_wraps_around_int8():
    """At 8 bits the step is absmax / 127 but w - min spans up to 254 steps: codes above 127
    do not fit the int8 cast, which wraps them (254 -> -2): a weight near max comes back near
    min."""
    w = weights(N=16, K=128)
    q, s, z = quantize_group_article(w, 128, 8)
    assert int(q.min()) < 0                         # wrapped codes
    art = dequantize_group_article(q, s, z, w.shape)
    assert (art - w).abs().max() > 100 * (quantize_int8(w).dequantize() - w).abs().max()


def test_article_snippet_wraps_codes_above_127_explicitly():
    """The article casts codes up to 254 with ``.to(torch.int8)``: undefined in C/C++ for
    out-of-range values. quantize_group_article wraps them explicitly, modulo 256, so the
    codes (and notebook 03's checked outputs) are the same on every platform. Oracle: Python
    integers."""
    codes = [0, 1, 127, 128, 129, 200, 253, 254]        # min -1 and max +1: step 1/127 at 8 bits
    w = torch.tensor([[-1 + c / 127 for c in codes]])
    q, s, z = quantize_group_article(w, group_size=8, bits=8)
    assert q.dtype == torch.int8 and float(s) == pytest.approx(1 / 127) and float(z) == -1
    assert q[0].tolist() == [0, 1, 127, -128, -127, -56, -3, -2]
    # a wrapped code decodes 256 steps too low: a weight near max comes back near min
    back = dequantize_group_article(q, s, z, w.shape)
    wrapped = torch.tensor(codes) > 127
    torch.testing.assert_close(back[0, wrapped], w[0, wrapped] - 256 * s[0, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(back[0, ~wrapped], w[0, ~wrapped], rtol=0, atol=1e-5)
    # wrap_int8 itself, over a range wider than a byte, against ((c + 128) mod 256) - 128
    c = torch.arange(-300, 301, dtype=torch.float32)
    assert wrap_int8(c).tolist() == [((int(v) + 128) % 256) - 128 for v in c.tolist()]
    # on random weights: the codes are the wrapped rounded codes, computed independently
    w = weights(N=8, K=256)
    for bits in (4, 8):
        q, s, z = quantize_group_article(w, 128, bits)
        raw = torch.round((w.reshape(-1, 128) - z) / s).to(torch.int64).tolist()
        want = [[((v + 128) % 256) - 128 for v in row] for row in raw]
        assert q.tolist() == want
    # an all-zero group has step 1 (not 0/0 = NaN cast to int8) and codes 0
    q, s, z = quantize_group_article(torch.zeros(1, 128), 128, 4)
    assert float(s) == 1 and int(q.abs().max()) == 0


# ---- the real model's weights (slow) ------------------------------------------------------------
@pytest.mark.slow
def test_int4_g32_reproduces_smollm2_q4_1_weights_exactly(smollm2):
    model, _ = smollm2
    n = 0
    for name, pt in model.packed_weights.items():
        if pt.qtype != "Q4_1":
            continue
        w = pt.dequantize()
        qt = quantize_int4(w, group_size=32)
        assert torch.equal(qt.dequantize(), w), name
        n += 1
    assert n == 210          # every linear layer of the 30 blocks is Q4_1 in this file


@pytest.mark.slow
def test_article_snippet_on_smollm2_weights(smollm2):
    model, _ = smollm2
    ratios = []
    for i in (0, 15, 29):
        for name in ("attn.wq", "mlp.w_down"):
            w = model.get_submodule(f"layers.{i}.{name}").weight
            g = 128 if w.shape[1] % 128 == 0 else 64         # 576 is not a multiple of 128
            q, s, z = quantize_group_article(w, g, 4)
            assert 0 <= int(q.min()) and int(q.max()) <= 14
            art = dequantize_group_article(q, s, z, w.shape)
            ours = quantize_int4(w, g).dequantize()
            ratios.append(((art - w).pow(2).mean() / (ours - w).pow(2).mean()).sqrt().item())
    # measured: 1.2x (w_down, g = 128) to 1.5x (g = 64) the RMS error of min/max int4
    assert min(ratios) > 1.15, ratios
