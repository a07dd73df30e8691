"""Shared by the oracle tests (tests/ops/test_*_oracle.py).

Those tests check each op against an implementation that shares none of its code (fp64 math
written from the definition, torch.nn.functional, HF transformers), with an elementwise error
bound derived from the arithmetic: how many times a value is rounded, and to what.
"""
import torch

from tinyserve.ops import interpreter_on

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # where the Triton path can run
U32 = 2.0 ** -24                                      # unit roundoff of fp32


def unit(dtype, triton: bool = False) -> float:
    """Relative error of one rounding to ``dtype``: half an ulp (round to nearest even), but a
    whole ulp for bf16 inside Triton's interpreter, whose fp32 -> bf16 cast truncates (triton
    3.9 ``interpreter.py``: ``cast_impl`` calls ``_convert_float`` with no rounding mode). On a
    GPU the kernel's ``.to(tl.bfloat16)`` rounds to nearest."""
    u = torch.finfo(dtype).eps / 2
    if triton and dtype == torch.bfloat16 and interpreter_on():
        return 2 * u
    return u


def roundings(k: int, u: float) -> float:
    """Relative error bound after ``k`` successive roundings, each within ``u``."""
    return (1 + u) ** k - 1


def within(name, got, exact, bound):
    """Assert |got - exact| <= bound elementwise (bound broadcasts); print the worst case."""
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert not got.isnan().any(), f"{name}: NaN in the output"
    err = (got.double() - exact.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64, device=err.device).expand_as(err)
    ratio = torch.where(err == 0, 0.0, err / bound)   # exact where the bound is 0: fine
    if not ratio.numel():
        return
    i = int(ratio.flatten().argmax())
    print(f"{name}: worst |diff| uses {ratio.flatten()[i].item():.2%} of its bound")
    assert (err <= bound).all(), (
        f"{name}: |diff| {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g} "
        f"at flat index {i} (got {got.flatten()[i].item():.6g}, "
        f"exact {exact.flatten()[i].item():.6g})")
