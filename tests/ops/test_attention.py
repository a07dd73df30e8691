"""ops.attention: the reference stays the default off-GPU; the Triton path dispatches by T."""
import importlib

import pytest
import torch

from tinyserve import ops
from tinyserve.ops import attention, attention_ref

dec = importlib.import_module("tinyserve.ops.decode_attention")
pre = importlib.import_module("tinyserve.ops.prefill_attention")


def _qkv(B, Hq, Hkv, T, S, D=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, B, Hkv, S + 5, D, generator=g).to(dtype)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    q_pos = (S - T) + torch.arange(T)[None].expand(B, T)
    kv_len = torch.full((B,), S)
    return q, cache[0, :, :, :S], cache[1, :, :, :S], q_pos, kv_len


@pytest.fixture
def spy(monkeypatch):
    """Record which Triton launcher attention() calls (still running it)."""
    calls = []
    for m, name in ((dec, "decode_attention_triton"), (pre, "prefill_attention_triton")):
        real = getattr(m, name)
        monkeypatch.setattr(m, name, lambda *a, _n=name, _f=real, **kw: calls.append(_n)
                            or _f(*a, **kw))
    return calls


@pytest.mark.parametrize("T,expect", [(1, "decode_attention_triton"),
                                      (5, "prefill_attention_triton")])
def test_triton_backend_dispatches_by_query_length(spy, T, expect):
    args = _qkv(2, 4, 2, T, 37)
    torch.testing.assert_close(attention(*args, backend="triton"), attention_ref(*args),
                               atol=1e-5, rtol=1e-5)
    assert spy == [expect]


@pytest.mark.parametrize("T", [1, 5])
def test_auto_and_ref_on_cpu_use_the_reference(spy, T):
    args = _qkv(1, 2, 1, T, 9)
    want = attention_ref(*args)
    for backend in ("auto", "ref"):
        torch.testing.assert_close(attention(*args, backend=backend), want)
    assert spy == []


def test_errors():
    args = _qkv(1, 2, 1, 1, 9)
    with pytest.raises(ValueError):
        attention(*args, backend="fast")
    q, k, v, q_pos, kv_len = _qkv(1, 2, 1, 3, 9, D=8)   # the toy models' head_dim
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, k, v, q_pos, kv_len, backend="triton")
    attention(q, k, v, q_pos, kv_len, backend="ref")     # the reference takes any head_dim


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5),
                                             (torch.float16, 2e-3, 2e-3)])
def test_generate_like_sequence_over_a_cache(dtype, atol, rtol):
    """Prefill two prompts of different lengths (right-padded), then decode 3 tokens, writing
    each step's K/V into a preallocated cache as the model does; triton equals ref at every
    step, including the padding queries of the shorter prompt."""
    torch.manual_seed(0)
    B, Hq, Hkv, D, max_seq = 2, 6, 2, 64, 40
    kc = torch.zeros(B, Hkv, max_seq, D, dtype=dtype)
    vc = torch.zeros_like(kc)
    lengths = torch.zeros(B, dtype=torch.long)
    for num_new in ([11, 4], [1, 1], [1, 1], [1, 1]):
        n = torch.tensor(num_new)
        T = int(n.max())
        positions = lengths[:, None] + torch.arange(T)[None]
        valid = torch.arange(T)[None] < n[:, None]
        k_new = torch.randn(B, Hkv, T, D, dtype=dtype)
        v_new = torch.randn(B, Hkv, T, D, dtype=dtype)
        b, t = valid.nonzero(as_tuple=True)
        kc.transpose(1, 2)[b, positions[b, t]] = k_new.transpose(1, 2)[b, t]
        vc.transpose(1, 2)[b, positions[b, t]] = v_new.transpose(1, 2)[b, t]
        kv_len = lengths + n
        S = int(kv_len.max())
        args = (torch.randn(B, Hq, T, D, dtype=dtype), kc[:, :, :S], vc[:, :, :S], positions,
                kv_len)
        got, want = attention(*args, backend="triton"), attention(*args, backend="ref")
        print(f"T={T}: worst |diff| {(got.float() - want.float()).abs().max().item():.3g}")
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        lengths = kv_len


def test_ops_exports_unchanged():
    assert ops.attention is attention and ops.attention_ref is attention_ref


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_auto_runs_triton_bf16(spy, T):
    q, k, v, q_pos, kv_len = [t.cuda() for t in _qkv(2, 32, 8, T, 32768, D=128,
                                                       dtype=torch.bfloat16)]
    got = attention(q, k, v, q_pos, kv_len)                       # auto on CUDA -> triton
    assert spy == ["decode_attention_triton" if T == 1 else "prefill_attention_triton"]
    torch.testing.assert_close(got, attention_ref(q, k, v, q_pos, kv_len), atol=2e-2, rtol=2e-2)
    q8, k8, v8, p8, l8 = [t.cuda() for t in _qkv(1, 4, 2, T, 20, D=8, dtype=torch.bfloat16)]
    attention(q8, k8, v8, p8, l8)          # head_dim 8 (toy models) falls back to the reference
