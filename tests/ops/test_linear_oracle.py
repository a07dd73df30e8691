"""linear (reference and Triton split-K kernel) against y = x W^T + b summed in fp64.

``linear_ref`` is ``F.linear`` itself, so the oracle is the definition. Bound: every
implementation multiplies exactly (fp16/bf16 products fit in fp32) and sums K + 1 terms in
fp32, so |error| <= (K + 1) u32 (|x| |W|^T + |b|) (Higham's gamma_n), plus one rounding of y
to the dtype. bf16 runs only the one-row path under the interpreter (no tl.dot there).
"""
import importlib

import pytest
import torch

from _oracle import DEV, U32, unit, within

mod = importlib.import_module("tinyserve.ops.linear")
N, K = 37, 123   # a ragged last tile in both N and K


def case(M, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(DEV, dtype)
    return cast(x), cast(w), cast(b)


def oracle_and_bound(x, w, b, triton):
    exact = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    if b is not None:
        exact, mag = exact + b.double(), mag + b.double().abs()
    return exact, (K + 1) * U32 * mag + unit(x.dtype, triton) * exact.abs()


CASES = [(1, torch.float32), (3, torch.float32), (1, torch.float16), (3, torch.float16),
         (1, torch.bfloat16)]


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,dtype", CASES)
def test_matches_fp64_matmul(M, dtype, bias, impl):
    x, w, b = case(M, dtype, bias)
    fn = mod.linear_ref if impl == "ref" else mod.linear_triton
    got = fn(x, w, b)
    exact, bnd = oracle_and_bound(x, w, b, impl == "triton")
    within(f"{impl} M={M} {dtype} bias={bias}", got, exact, bnd)


def test_forced_splits_and_leading_dims():
    x, w, b = case(6, torch.float32, True, seed=1)
    x3 = x.view(2, 3, K)
    exact, bnd = oracle_and_bound(x, w, b, True)
    within("split_k=1", mod.linear_triton(x[:1], w, b, split_k=1), exact[:1], bnd[:1])
    within("split_k=3", mod.linear_triton(x[:1], w, b, split_k=3), exact[:1], bnd[:1])
    within("[2, 3, K]", mod.linear_triton(x3, w, b).view(6, N), exact, bnd)
