"""swiglu (reference and Triton kernel) against silu(gate) * up written from the definition in
fp64, and the whole LLaMA MLP against HF transformers' LlamaMLP. bf16 runs the elementwise
kernel under the interpreter."""
import importlib

import pytest
import torch

from _oracle import DEV, U32, roundings, unit, within

mod = importlib.import_module("tinyserve.ops.swiglu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def oracle(gate, up):
    """silu(g) * u = g * sigmoid(g) * u = g / (1 + e^-g) * u, in fp64."""
    g = gate.double()
    return g / (1 + torch.exp(-g)) * up.double()


def inputs(rows, F, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(rows, F, generator=gen) * 6
    # the tails: e^-g overflows fp32 past g = -88.7 (silu -> -0), g = 0, and large positive g
    gate[0, :6] = torch.tensor([-100.0, -88.0, -20.0, 0.0, 20.0, 100.0])
    if dtype == torch.float16:
        gate[0, :6] = torch.tensor([-60.0, -15.0, -5.0, 0.0, 5.0, 60.0])   # |g * u| < 65504
    up = torch.randn(rows, F, generator=gen) * 2
    return gate.to(DEV, dtype), up.to(DEV, dtype)


def underflow(dtype, up):
    """Absolute error where silu underflows: below dtype's smallest subnormal (tiny * eps)
    silu rounds to 0 (fp16: |silu| < 6e-8 when g < -17.7), and in fp32 e^-g overflows past
    g = -88.7, giving -0 where |silu| < 88.7 e^-88.7 < 25 fp32 tiny; either is then
    multiplied by up."""
    fi = torch.finfo(dtype)
    return (fi.tiny * fi.eps + 25 * torch.finfo(torch.float32).tiny) * (1 + up.double().abs())


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # the interpreter's e^100
@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_definition(dtype, impl):
    gate, up = inputs(3, 1100, dtype)    # F = 1100: a full 1024 block and a masked tail
    fn = mod.swiglu_ref if impl == "ref" else mod.swiglu_triton
    got = fn(gate, up)
    exact = oracle(gate, up)
    # Two roundings to dtype (silu, then the product), after an fp32 sigmoid of a few ulps.
    rel = roundings(2, unit(dtype, impl == "triton")) + 8 * U32
    within(f"{impl} {dtype}", got, exact, rel * exact.abs() + underflow(dtype, up))


def test_rows_of_a_fused_projection():
    """gate and up as the two halves of one [rows, 2F] projection (row stride 2F)."""
    gu = torch.randn(5, 2 * 300, generator=torch.Generator().manual_seed(1)).to(DEV)
    gate, up = gu[:, :300], gu[:, 300:]
    exact = oracle(gate, up)
    got = mod.swiglu_triton(gate, up)
    within("fused halves", got, exact, (roundings(2, U32) + 8 * U32) * exact.abs()
           + underflow(torch.float32, up))


@pytest.mark.slow   # imports HF transformers (seconds)
def test_llama_mlp_matches_hf():
    """down(swiglu(gate(x), up(x))) as the model composes it, against HF's LlamaMLP: catches a
    swapped gate/up as well as a wrong activation."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP
    from tinyserve.ops import linear_ref
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=136,
                                  num_attention_heads=4, hidden_act="silu")
    torch.manual_seed(2)
    mlp = LlamaMLP(cfg).to(DEV)
    x = torch.randn(2, 5, 48, device=DEV)
    with torch.no_grad():
        want = mlp(x)
        for impl in (mod.swiglu_ref, mod.swiglu_triton):
            h = impl(linear_ref(x, mlp.gate_proj.weight), linear_ref(x, mlp.up_proj.weight))
            torch.testing.assert_close(linear_ref(h, mlp.down_proj.weight), want)
