"""quant_linear: the fused dequantize-and-multiply kernels against dequantize-then-F.linear.

Every format x both paths (skinny split-K GEMV for M <= 16, wide tiled GEMM beyond) x odd shapes
x fp32/fp16 under the interpreter (bf16 tl.dot is broken there), bf16 at Llama-2-7B shapes on GPU.
"""
import importlib
import math

import pytest
import torch

from tinyserve.quant import formats

qlin = importlib.import_module("tinyserve.ops.quant_linear")
qcommon = importlib.import_module("tinyserve.ops.quant_linear_common")
qkernel = importlib.import_module("tinyserve.ops.quant_linear_kernel")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_weight(fmt, N, K, seed=0, device=DEV):
    """A random O(1/sqrt(K)) [N, K] weight quantized by tinyserve.quant.formats in ``fmt``:
    "int8", "int4-g<g>", "nf4", "nf4-dq" (double-quantized absmax), "gguf-Q4_1", "gguf-Q8_0"."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    if fmt == "int8":
        qt = formats.quantize_int8(w)
    elif fmt.startswith("int4"):
        qt = formats.quantize_int4(w, group_size=int(fmt.split("-g")[1]))
    elif fmt.startswith("nf4"):
        qt = formats.quantize_nf4(w, double_quant=fmt.endswith("-dq"))
    else:
        qt = formats.quantize_gguf(w, fmt.split("-")[1])
    return qt.to(device)


def tolerance(dtype, K):
    """(atol, rtol) for O(1) outputs, from the arithmetic rather than from observed errors.

    Both sides accumulate in fp32 but in different orders (~sqrt(K) fp32 ulps apart) and then
    round to ``dtype`` once, so the results may differ by 1 ulp where the fp32 values straddle
    a rounding boundary; the M=1 path multiplies by the fp32 weight where the reference first
    rounds it to ``dtype`` (1/2 ulp per weight, random signs: ~1/2 ulp of |y|). Hence 2 ulps of
    ``dtype`` plus the fp32 ordering term."""
    tol = 2 * torch.finfo(dtype).eps + 4 * math.sqrt(K) * torch.finfo(torch.float32).eps
    return tol, tol


def check(x, qt, bias=None, **kw):
    N, K = qt.shape
    out = torch.full((*x.shape[:-1], N), float("nan"), dtype=x.dtype, device=x.device)
    got = qkernel.quant_linear_triton(x, qt, bias, out=out, **kw)
    assert got is out
    want = qcommon.quant_linear_ref(x, qt, bias)
    atol, rtol = tolerance(x.dtype, K)
    err = (got.float() - want.float()).abs()
    worst = err.max().item() if err.numel() else 0.0
    used = (err / (atol + rtol * want.float().abs())).max().item() if err.numel() else 0.0
    print(f"{qt.format}{getattr(qt, 'qtype', '')} x={tuple(x.shape)} N={N} bias={bias is not None}"
          f" {x.dtype} {kw}: worst |diff| = {worst:.3g}, {used:.0%} of the allowed "
          f"(atol=rtol={atol:.3g})")
    assert not got.isnan().any(), "an output element was never written"
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


# K is a multiple of each format's group (it must be) but, where the group allows, not of the
# larger GPU tiles (160 = 5 x 32, 192 = 3 x 64); int8's K = 123 leaves a masked tail. Under the
# interpreter tiles are 32 wide: several per int4-g64/g128 and nf4 group, and the 3-4 K splits
# end mid-group. N = 37 leaves a ragged row tile.
FORMATS = [("int8", 123), ("int4-g32", 160), ("int4-g64", 192), ("int4-g128", 256),
           ("nf4", 192), ("nf4-dq", 128), ("gguf-Q4_1", 160), ("gguf-Q8_0", 160)]
GRID_DTYPES = [torch.float32, torch.float16]


def _x(M, K, dtype, seed=1, lead=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(lead or (M,)), K, generator=g).to(DEV, dtype)


@pytest.mark.parametrize("dtype", GRID_DTYPES)
@pytest.mark.parametrize("M", [1, 3, 16, 33])          # GEMV, skinny dot, full tile, wide GEMM
@pytest.mark.parametrize("fmt,K", FORMATS)
def test_triton_matches_ref(fmt, K, M, dtype):
    N = 37
    qt = make_weight(fmt, N, K)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(DEV, dtype) \
        if M in (3, 33) else None
    check(_x(M, K, dtype), qt, bias)


@pytest.mark.parametrize("fmt,K", FORMATS)
def test_forced_paths_and_splits(fmt, K):
    qt = make_weight(fmt, 21, K, seed=3)
    x = _x(5, K, torch.float32, seed=4)
    bias = torch.randn(21, device=DEV)
    check(x, qt, bias, path="wide")                 # 5 rows in a 16-row GEMM tile (masked)
    check(x, qt, bias, split_k=1)                   # whole K in one program: fused epilogue
    check(_x(1, K, torch.float32), qt, bias, split_k=64)   # more splits than K tiles: dropped
    check(_x(20, K, torch.float32), qt, None, path="skinny")   # 2 M tiles of 16 rows


def test_leading_dims_and_strided_rows():
    qt = make_weight("int4-g32", 19, 96)
    check(_x(6, 96, torch.float32, lead=(2, 3)), qt)                    # [2, 3, K] -> M = 6
    big = _x(40, 160, torch.float16)
    check(big[:, :96], qt)                                              # rows strided by 160
    check(big[:3, :96], qt)


def test_real_gguf_blocks(smollm2_file):
    """Bytes straight from the shipped SmolLM2 file (Q4_1 and the Q8_0 embedding)."""
    import numpy as np
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(smollm2_file)
    picked = {}
    for t in reader.tensors:
        q = t.tensor_type.name
        if q in ("Q4_1", "Q8_0") and q not in picked:
            picked[q] = t
    assert set(picked) == {"Q4_1", "Q8_0"}
    for qtype, t in picked.items():
        K = int(t.shape[0])                                 # ggml order: inner dimension first
        data = torch.from_numpy(np.array(t.data[:24]))      # the first 24 rows
        qt = formats.GGUFWeight(data.to(DEV), qtype, (24, K))
        w = qt.dequantize()
        assert torch.isfinite(w).all() and w.abs().max() > 0
        check(_x(1, K, torch.float32), qt)
        check(_x(3, K, torch.float16) * 0.1, qt)


def test_auto_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(qlin, "quant_linear_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(qlin, "quant_linear_ref", lambda *a, **k: calls.append("ref"))
    qt = make_weight("int8", 8, 32)
    for M, backend in ((1, "auto"), (1, "ref"), (1, "triton"), (64, "auto")):
        qlin.quant_linear(_x(M, 32, torch.float32), qt, backend=backend)
    auto = "triton" if DEV == "cuda" else "ref"
    assert calls == [auto, "ref", "triton", auto]      # wide M goes to the fused GEMM on CUDA


def test_quant_linear_backends_agree():
    qt = make_weight("nf4", 9, 64)
    x, b = _x(2, 64, torch.float32), torch.randn(9, device=DEV)
    atol, rtol = tolerance(torch.float32, 64)
    torch.testing.assert_close(qlin.quant_linear(x, qt, b, backend="triton"),
                               qlin.quant_linear(x, qt, b, backend="ref"), atol=atol, rtol=rtol)


def test_bad_arguments_raise_value_error():
    qt = make_weight("int4-g32", 8, 64)
    x = _x(2, 64, torch.float32)
    with pytest.raises(ValueError, match="K = 64"):
        qlin.quant_linear(_x(2, 63, torch.float32), qt)
    with pytest.raises(ValueError, match="dtype"):
        qlin.quant_linear(x.double(), qt)
    with pytest.raises(ValueError, match="dtype"):
        qkernel.quant_linear_triton(x.to(torch.int32), qt)
    with pytest.raises(ValueError, match="bias"):
        qlin.quant_linear(x, qt, torch.zeros(7, device=DEV))
    with pytest.raises(ValueError, match="backend"):
        qlin.quant_linear(x, qt, backend="cuda")
    with pytest.raises(ValueError, match="out"):
        qkernel.quant_linear_triton(x, qt, out=torch.empty(2, 9, device=DEV))
    with pytest.raises(ValueError, match="path"):
        qkernel.quant_linear_triton(x, qt, path="medium")
    bad = make_weight("int8", 8, 64)
    bad.format = "int3"
    with pytest.raises(ValueError, match="unknown weight format"):
        qlin.quant_linear(x, bad)
    q40 = make_weight("gguf-Q4_1", 8, 64)
    q40.qtype = "Q4_0"                 # formats refuses to build one; the op must refuse too
    with pytest.raises(ValueError, match="Q4_0"):
        qkernel.quant_linear_triton(x, q40)


def test_weight_bytes_match_the_formats():
    N, K = 8, 256
    assert qlin.weight_bytes(make_weight("int8", N, K)) == N * K + 4 * N
    assert qlin.weight_bytes(make_weight("int4-g128", N, K)) == N * K // 2 + 4 * N * 2
    assert qlin.weight_bytes(make_weight("nf4", N, K)) == N * K // 2 + 2 * N * 4
    assert qlin.weight_bytes(make_weight("gguf-Q4_1", N, K)) == N * 8 * 20
    assert qlin.weight_bytes(make_weight("gguf-Q8_0", N, K)) == N * 8 * 34
    for fmt, kw in qlin.BENCH_FORMATS:
        qt = make_weight(fmt, N, K)
        assert qlin._packed_bytes(fmt, kw, N, K) == qlin.weight_bytes(qt) == qt.nbytes_compute


def test_bench_cases_small_run():
    cases = qlin.bench_cases(DEV, small=True, quantize=formats.quantize_as)
    assert cases and all(c.op == "quant_linear" and c.bytes > 0 for c in cases)
    assert {c.meta["format"] for c in cases} == {f for f, _ in qlin.BENCH_FORMATS}
    for case in cases[:: len(cases) // 4]:
        impls = case.setup()
        assert {"ref", "cublas_bf16"} <= set(impls)
        for name, fn in impls.items():
            if name != "triton" or DEV == "cuda":
                fn()
    big = qlin.bench_cases("cpu", small=False,   # setup is lazy: nothing allocated here
                           quantize=formats.quantize_as)
    assert {(c.meta["K"], c.meta["N"]) for c in big} == {(4096, 4096), (4096, 11008),
                                                         (11008, 4096)}
    assert {c.meta["M"] for c in big} == {1, 16, 512}
    int4 = next(c for c in big if c.meta["format"] == "int4-g128" and c.meta["M"] == 1)
    K, N = int4.meta["K"], int4.meta["N"]
    assert int4.bytes == N * K // 2 + 4 * N * K // 128 + 2 * (K + N)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 512])
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("fmt", ["int8", "int4-g128", "int4-g32", "nf4", "gguf-Q4_1",
                                 "gguf-Q8_0"])
def test_llama2_7b_shapes_bf16(fmt, K, N, M):
    qt = make_weight(fmt, N, K)
    check(_x(M, K, torch.bfloat16), qt)
    bias = torch.randn(N, device=DEV, dtype=torch.bfloat16)
    check(_x(M, K, torch.bfloat16, seed=5), qt, bias, split_k=1 if M <= 16 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 16, 512])
@pytest.mark.parametrize("fmt", ["int8", "int4-g128", "nf4", "gguf-Q4_1", "gguf-Q8_0"])
def test_other_dtypes_on_gpu(fmt, M, dtype):
    qt = make_weight(fmt, 4096, 4096, seed=6)
    check(_x(M, 4096, dtype, seed=7), qt, torch.randn(4096, device=DEV, dtype=dtype))
