"""linear: the split-K decode kernel against the F.linear reference."""
import importlib

import pytest
import torch

from tinyserve.ops import linear, linear_ref

# `tinyserve.ops.linear` the attribute is the function; the module is reached by name.
lin = importlib.import_module("tinyserve.ops.linear")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, atol, rtol): outputs are O(1) (weights scaled by 1/sqrt(K)); fp16 allows ~1-2 ulp.
GRID = [(torch.float32, 1e-4, 1e-4), (torch.float16, 1e-2, 1e-2)]


def _inputs(M, N, K, dtype, bias, lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (M,)), K, generator=g).to(DEV, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEV, dtype)
    b = torch.randn(N, generator=g).to(DEV, dtype) if bias else None
    return x, w, b


def _compare(x, w, b, atol, rtol, **kw):
    out = torch.full((*x.shape[:-1], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    got = lin.linear_triton(x, w, b, out=out, **kw)
    assert got is out
    want = linear_ref(x, w, b)
    err = (got.float() - want.float()).abs()
    worst = err.max().item() if err.numel() else 0.0
    print(f"shape x={tuple(x.shape)} w={tuple(w.shape)} bias={b is not None} {x.dtype} {kw}: "
          f"worst |diff| = {worst:.3g}")
    assert not got.isnan().any(), "an output element was never written"
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", GRID)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N,K", [(123, 200), (7, 1823)])
@pytest.mark.parametrize("M", [1, 3, 7, 16])
def test_triton_matches_ref(M, N, K, bias, dtype, atol, rtol):
    x, w, b = _inputs(M, N, K, dtype, bias)
    _compare(x, w, b, atol, rtol)   # default split (4 under the interpreter): reduction kernel


@pytest.mark.parametrize("dtype,atol,rtol", GRID)
@pytest.mark.parametrize("M", [1, 5])
def test_single_split_writes_directly(M, dtype, atol, rtol):
    x, w, b = _inputs(M, 45, 100, dtype, bias=True)
    _compare(x, w, b, atol, rtol, split_k=1)   # whole K per program, fused bias epilogue


@pytest.mark.parametrize("split_k", [2, 3, 64])
def test_odd_and_excess_splits(split_k):
    # 3 splits round to whole K tiles; 64 asks for more splits than K has tiles (dropped).
    x, w, b = _inputs(2, 33, 130, torch.float32, bias=True)
    _compare(x, w, b, 1e-4, 1e-4, split_k=split_k)


def test_leading_dims_and_strided_rows():
    x, w, b = _inputs(6, 40, 96, torch.float32, bias=False, lead=(2, 3))
    _compare(x, w, b, 1e-4, 1e-4)                  # [2, 3, K] -> M = 6
    big = torch.randn(5, 160, device=DEV)
    _compare(big[:, :96], w, b, 1e-4, 1e-4)        # rows of x strided by 160, not K


def test_more_than_16_rows_falls_back_to_f_linear():
    x, w, b = _inputs(17, 20, 24, torch.float32, bias=True)
    _compare(x, w, b, 1e-6, 1e-6)


def test_auto_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(lin, "linear_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(lin, "linear_ref", lambda *a, **k: calls.append("ref"))
    x, w, _ = _inputs(1, 8, 16, torch.float32, bias=False)
    lin.linear(x, w, backend="auto")
    lin.linear(x, w, backend="ref")
    lin.linear(x, w, backend="triton")
    wide = torch.randn(32, 16, device=DEV)
    lin.linear(wide, w, backend="auto")
    expected_auto = "triton" if DEV == "cuda" else "ref"
    assert calls == [expected_auto, "ref", "triton", "ref"]   # M = 32 > 16: cuBLAS even on CUDA


def test_triton_backend_runs_kernel_and_matches():
    x, w, b = _inputs(3, 9, 50, torch.float32, bias=True)
    torch.testing.assert_close(linear(x, w, b, backend="triton"), linear_ref(x, w, b),
                               atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise_value_error():
    x, w, b = _inputs(2, 8, 16, torch.float32, bias=True)
    with pytest.raises(ValueError, match="K ="):
        linear(torch.randn(2, 15, device=DEV), w)
    with pytest.raises(ValueError, match="weight must be"):
        linear(x, w[0])
    with pytest.raises(ValueError, match="bias"):
        linear(x, w, b[:5])
    with pytest.raises(ValueError, match="backend"):
        linear(x, w, backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        lin.linear_triton(x, w.half())
    with pytest.raises(ValueError, match="dtype"):
        lin.linear_triton(x.double(), w.double())
    with pytest.raises(ValueError, match="out"):
        lin.linear_triton(x, w, out=torch.empty(2, 9, device=DEV))


def test_bench_cases_small_run():
    cases = lin.bench_cases(DEV, small=True)
    assert cases and all(c.op == "linear" and c.bytes > 0 for c in cases)
    impls = cases[0].setup()
    assert {"ref", "cublas"} <= set(impls)
    for fn in impls.values():
        fn()
    big = lin.bench_cases("cpu", small=False)   # setup is lazy: nothing is allocated here
    assert {(c.meta["K"], c.meta["N"]) for c in big} == {(4096, 12288), (4096, 4096),
                                                         (4096, 22016), (11008, 4096)}
    assert big[0].bytes == (12288 * 4096 + 4096 + 12288) * 2


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("K,N", [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)])
def test_llama2_7b_shapes_bf16(M, K, N):
    x, w, b = _inputs(M, N, K, torch.bfloat16, bias=False)
    _compare(x, w, b, 2e-2, 2e-2)
    x, w, b = _inputs(M, N, K, torch.bfloat16, bias=True, seed=1)
    _compare(x, w, b, 2e-2, 2e-2, split_k=1)
