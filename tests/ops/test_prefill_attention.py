"""prefill_attention: the causal flash kernel (interpreter on CPU) against the reference."""
import importlib

import pytest
import torch
from _fixtures import close

mod = importlib.import_module("tinyserve.ops.prefill_attention")  # the module, not the function
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]


def _case(T, prefix, valid, Hq, Hkv, D=64, dtype=torch.float32, device="cpu", seed=0):
    """Row b already caches prefix[b] tokens and appends valid[b] of this call's T (the rest
    is right padding): q_pos = prefix + t, kv_len = prefix + valid, as the model computes them.
    K/V are the live slice [:, :, :S] of a preallocated cache, a strided view."""
    g = torch.Generator(device=device).manual_seed(seed)
    B = len(prefix)
    pre = torch.tensor(prefix, device=device)
    kv = pre + torch.tensor(valid, device=device)
    S = max(int(kv.max()), 1)
    cache = torch.randn(2, B, Hkv, S + 11, D, generator=g, device=device).to(dtype)
    # x3: logits ~ N(0, 9), a peaked softmax whose output is O(1), not ~1/sqrt(S)
    q = (3 * torch.randn(B, Hq, T, D, generator=g, device=device)).to(dtype)
    q_pos = pre[:, None] + torch.arange(T, device=device)[None, :]
    return q, cache[0, :, :, :S], cache[1, :, :, :S], q_pos, kv


def _run(q, k, v, q_pos, kv):
    out = torch.full_like(q, float("nan"))       # poisoned: an unwritten element fails
    got = mod.prefill_attention_triton(q, k, v, q_pos, kv, out=out)
    assert got is out
    return out



@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("prefix", [0, 21])
@pytest.mark.parametrize("T", [1, 7, 33, 100])
def test_matches_ref_fp16(T, prefix, G):
    # Two rows at different lengths: the second has 3 fewer cached tokens.
    q, k, v, q_pos, kv = _case(T, [prefix, max(prefix - 3, 0)], [T, T], Hq=2 * G, Hkv=2,
                               dtype=torch.float16, seed=T + G)
    close(f"T={T} prefix={prefix} G={G}", _run(q, k, v, q_pos, kv),
           mod.prefill_attention_ref(q, k, v, q_pos, kv), *TOLS[1][1:])


@pytest.mark.parametrize("T,prefix,G", [(7, 0, 1), (33, 21, 4), (100, 5, 3)])
def test_matches_ref_fp32(T, prefix, G):
    q, k, v, q_pos, kv = _case(T, [prefix], [T], Hq=G, Hkv=1)
    close(f"T={T} prefix={prefix} G={G} fp32", _run(q, k, v, q_pos, kv),
           mod.prefill_attention_ref(q, k, v, q_pos, kv), *TOLS[0][1:])


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
def test_right_padded_rows(dtype, atol, rtol):
    # T = 20: row 0 full, row 1 has 6 real tokens after a 5-token prefix, row 2 is all padding
    # over an empty cache (kv_len 0: no visible key, zeros), row 3 one token after 40 cached.
    # Padding queries (q_pos >= kv_len) see the row's kv_len keys, as in the reference.
    q, k, v, q_pos, kv = _case(20, [0, 5, 0, 40], [20, 6, 0, 1], Hq=6, Hkv=2, dtype=dtype)
    out = _run(q, k, v, q_pos, kv)
    close(f"padded {dtype}", out, mod.prefill_attention_ref(q, k, v, q_pos, kv), atol, rtol)
    assert (out[2] == 0).all()


def test_query_without_visible_key_next_to_ones_with_keys():
    # q_pos = -1 (never produced by the model, but defined by the reference: zeros) shares a
    # query block with queries that do see keys: its softmax must not turn into NaN.
    q, k, v, q_pos, kv = _case(6, [0, 3], [6, 6], Hq=2, Hkv=1)
    q_pos = q_pos.clone()
    q_pos[:, :2] = -1
    out = _run(q, k, v, q_pos, kv)
    close("q_pos -1", out, mod.prefill_attention_ref(q, k, v, q_pos, kv), *TOLS[0][1:])
    assert (out[:, :, :2] == 0).all()


def test_head_dim_128_and_contiguous_qkv():
    q, k, v, q_pos, kv = _case(40, [9, 0], [40, 17], Hq=4, Hkv=1, D=128, dtype=torch.float16)
    for args in ((q, k, v), (q.contiguous(), k.contiguous(), v.contiguous())):
        close("D=128", _run(*args, q_pos, kv), mod.prefill_attention_ref(*args, q_pos, kv),
               *TOLS[1][1:])


def test_bad_arguments_raise_value_error():
    q, k, v, q_pos, kv = _case(5, [0], [5], Hq=4, Hkv=2)
    bad = [
        (q[..., :16], k[..., :16], v[..., :16], q_pos, kv),      # head_dim 16 unsupported
        (q[:, :3], k, v, q_pos, kv),                             # 3 q heads over 2 kv heads
        (q, k.half(), v.half(), q_pos, kv),                      # dtype mismatch
        (q, k, v, q_pos[:, :4], kv),                             # q_pos not [B, T]
        (q, k, v, q_pos, kv[None]),                              # kv_len not [B]
        (q[0], k, v, q_pos, kv),                                 # q not 4-d
        (q.int(), k.int(), v.int(), q_pos, kv),                  # integer q/k/v
    ]
    for args in bad:
        with pytest.raises(ValueError):
            mod.prefill_attention_triton(*args)
    with pytest.raises(ValueError):
        mod.prefill_attention_triton(q, k, v, q_pos, kv, out=torch.empty(1, 4, 4, 64))


def test_dispatch(monkeypatch):
    q, k, v, q_pos, kv = _case(9, [3], [9], Hq=2, Hkv=1)
    want = mod.prefill_attention_ref(q, k, v, q_pos, kv)
    calls = []
    real = mod.prefill_attention_triton
    monkeypatch.setattr(mod, "prefill_attention_triton",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.testing.assert_close(mod.prefill_attention(q, k, v, q_pos, kv, backend="auto"), want)
    assert calls == []                                   # CPU tensors + auto -> the reference
    torch.testing.assert_close(mod.prefill_attention(q, k, v, q_pos, kv, backend="triton"), want)
    assert calls == [1]


def test_bench_cases_small_run():
    cases = mod.bench_cases("cpu", small=True)
    assert {c.op for c in cases} == {"prefill_attention"} and all(c.bytes > 0 for c in cases)
    for c in cases:
        impls = c.setup()
        want = impls["ref"]()
        for name in ("sdpa", "triton"):
            close(f"{c.name} {name}", impls[name]().float(), want.float(), 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv", [(32, 32), (32, 8)])
def test_gpu_bf16_append_to_32k_cache(Hq, Hkv):
    # A 256-token chunk appended to ~32k cached tokens (chunked prefill at long context).
    q, k, v, q_pos, kv = _case(256, [32512, 20000], [256, 100], Hq=Hq, Hkv=Hkv, D=128,
                               dtype=torch.bfloat16, device="cuda")
    close(f"32k bf16 {Hq}/{Hkv}", _run(q, k, v, q_pos, kv),
           mod.prefill_attention_ref(q, k, v, q_pos, kv), 2e-2, 2e-2)


@pytest.mark.gpu
def test_gpu_bf16_fresh_prefill_matches_sdpa():
    import torch.nn.functional as F
    q, k, v, q_pos, kv = _case(2048, [0], [2048], Hq=32, Hkv=32, D=128, dtype=torch.bfloat16,
                               device="cuda")
    close("T=2048 vs sdpa", _run(q, k, v, q_pos, kv),
           F.scaled_dot_product_attention(q, k, v, is_causal=True), 2e-2, 2e-2)
