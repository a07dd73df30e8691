"""RoPE against oracles that share none of its code: the angles (``rope_inv_freq``,
``rope_cos_sin``, which feed both the kernel and its reference) against theta^(-2i/d) and
pos * inv_freq in fp64 and Meta's Llama 3.1 frequency scaling; the rotation (reference and
Triton kernel) against complex multiplication in fp64; both against HF transformers."""
import importlib
import math

import pytest
import torch

from _oracle import DEV, U32, unit, within

mod = importlib.import_module("tinyserve.ops.rope")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Llama 3.1 (8B) and Llama 3.2 (1B) config.json rope_scaling
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA32 = dict(LLAMA31, factor=32.0)


def inv_freq_def(D, theta):
    """theta^(-2i/D) for pair i = 0 .. D/2 - 1, in fp64."""
    return torch.tensor([theta ** (-2 * i / D) for i in range(D // 2)], dtype=torch.float64)


def llama3_meta(D, theta, s):
    """Meta's ``apply_scaling`` (llama-models, Llama 3.1 reference code), one frequency at a
    time in Python floats: keep short wavelengths, divide long ones by ``factor``, blend."""
    old, lo, hi, factor = (s["original_max_position_embeddings"], s["low_freq_factor"],
                           s["high_freq_factor"], s["factor"])
    out = []
    for freq in inv_freq_def(D, theta).tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(freq)
        elif wavelen > old / lo:
            out.append(freq / factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


def positions():
    """[2, 6]: a fresh prompt and a row deep into a long context (angles up to ~3e4 rad)."""
    return torch.tensor([[0, 1, 2, 3, 4, 5], [8190, 8191, 8192, 20000, 31999, 32000]])


def cos_sin_def(pos, inv):
    """fp64 cos, sin [B, T, D]: element j of a head uses pair j mod D/2 (rotate-half layout)."""
    angle = pos.double()[..., None] * inv.repeat(2)
    return angle.cos(), angle.sin(), angle


@pytest.mark.parametrize("D,theta", [(64, 1e4), (64, 1e5), (128, 5e5), (24, 1e6)])
def test_inv_freq_is_theta_to_the_minus_2i_over_d(D, theta):
    got = mod.rope_inv_freq(D, theta)
    exact = inv_freq_def(D, theta)
    assert got.dtype == torch.float32
    within(f"inv_freq D={D} theta={theta}", got, exact, 1.01 * U32 * exact)   # one rounding


@pytest.mark.parametrize("scaling", [LLAMA31, LLAMA32], ids=["llama3.1", "llama3.2"])
def test_llama3_scaling_matches_meta(scaling):
    D, theta = 128, 500000.0
    exact = llama3_meta(D, theta, scaling)
    wavelen = 2 * math.pi / inv_freq_def(D, theta)
    old = scaling["original_max_position_embeddings"]
    assert (wavelen < old / 4).any() and (wavelen > old).any() and \
        ((wavelen >= old / 4) & (wavelen <= old)).any()     # all three bands are exercised
    within("llama3", mod.rope_inv_freq(D, theta, scaling), exact, 1.01 * U32 * exact)
    # GGUF files store the same scaling as per-pair divisors (rope_freqs.weight, fp32)
    factors = (inv_freq_def(D, theta) / exact).float()
    within("llama3 via freq_factors", mod.rope_inv_freq(D, theta, freq_factors=factors), exact,
           3 * U32 * exact)


@pytest.mark.parametrize("D,theta", [(64, 1e5), (128, 5e5)])
def test_cos_sin_are_cos_and_sin_of_pos_times_inv_freq(D, theta):
    pos = positions()
    cos, sin = mod.rope_cos_sin(pos, mod.rope_inv_freq(D, theta))
    c, s, angle = cos_sin_def(pos, inv_freq_def(D, theta))
    # fp32 angle = fl(pos * fl(inv_freq)): two roundings of |angle|, then an fp32 cos/sin
    # accurate to a couple of ulps; the angle error passes through with slope <= 1.
    bound = (2.01 * angle.abs() + 4) * U32
    within("cos", cos, c, bound)
    within("sin", sin, s, bound)


def rotate_def(x, angle):
    """Rotate-half RoPE as complex multiplication: the pair (x_i, x_{i+D/2}) is the complex
    number x_i + i x_{i+D/2}, multiplied by e^{i angle_i}. fp64."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(torch.ones_like(angle[..., :half]), angle[..., :half])[:, None]
    return torch.cat((z.real, z.imag), dim=-1)


def rot_bound(x, exact, dtype, triton):
    """fp32 cos/sin (one rounding each) and two products and a sum in fp32: under 6 fp32 ulps
    of the pair's norm r; then one rounding of the result to dtype (and subnormals)."""
    half = x.shape[-1] // 2
    r = torch.linalg.vector_norm(x.double().unflatten(-1, (2, half)), dim=-2).repeat(
        *([1] * (x.dim() - 1)), 2)
    fi = torch.finfo(dtype)
    return unit(dtype, triton) * exact.abs() + 8 * U32 * r + fi.tiny * fi.eps


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,D", [(2, 4, 2, 24), (2, 9, 3, 64)])
def test_rotation_matches_complex_multiplication(B, Hq, Hkv, D, dtype, impl):
    T = 6
    g = torch.Generator().manual_seed(D)
    # as the model passes them: [B, T, H, D] projections viewed as [B, H, T, D]
    q = (torch.randn(B, T, Hq, D, generator=g) * 2).to(DEV, dtype).transpose(1, 2)
    k = (torch.randn(B, T, Hkv, D, generator=g) * 2).to(DEV, dtype).transpose(1, 2)
    c, s, angle = cos_sin_def(positions()[:B], inv_freq_def(D, 1e4))
    cos, sin = c.float().to(DEV), s.float().to(DEV)   # the op's contract: fp32 cos/sin
    fn = mod.apply_rope_ref if impl == "ref" else mod.apply_rope_triton
    qo, ko = fn(q, k, cos, sin)
    for name, x, got in (("q", q, qo), ("k", k, ko)):
        exact = rotate_def(x, angle.to(DEV))
        assert got.dtype == dtype
        within(f"{impl} {name} {dtype} D={D}", got, exact, rot_bound(x, exact, dtype,
                                                                      impl == "triton"))


@pytest.mark.slow   # imports HF transformers (seconds)
def test_matches_hf_llama():
    """HF's LlamaRotaryEmbedding, rope init functions and apply_rotary_pos_emb."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as hf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    Hq, Hkv, D, theta = 4, 2, 64, 1e5
    kw = dict(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D,
              rope_theta=theta, max_position_embeddings=131072)
    pos = positions()
    x = torch.randn(2, Hq, 6, D)
    cos_hf, sin_hf = hf.LlamaRotaryEmbedding(config=transformers.LlamaConfig(**kw))(x, pos)
    cos, sin = mod.rope_cos_sin(pos, mod.rope_inv_freq(D, theta))
    angle = cos_sin_def(pos, inv_freq_def(D, theta))[2]
    bound = (8 * angle.abs() + 8) * U32    # both fp32; HF also takes theta^x in fp32
    within("cos vs HF", cos, cos_hf.double(), bound)
    within("sin vs HF", sin, sin_hf.double(), bound)
    k = torch.randn(2, Hkv, 6, D)
    for got, want in zip(mod.apply_rope_ref(x, k, cos, sin),
                         hf.apply_rotary_pos_emb(x, k, cos, sin)):
        torch.testing.assert_close(got, want)
    cfg = transformers.LlamaConfig(**dict(kw, head_dim=128, rope_theta=5e5,
                                          rope_scaling=LLAMA31))
    inv_hf = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0]
    # HF works in fp32 throughout (pow, divisions, blend): a few ulps of its own
    within("llama3 vs HF", mod.rope_inv_freq(128, 5e5, LLAMA31), inv_hf.double(),
           16 * U32 * inv_hf.double())
