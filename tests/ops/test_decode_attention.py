"""decode_attention: the split-KV Triton kernel (interpreter on CPU) against the reference."""
import importlib

import pytest
import torch
from _fixtures import close

from tinyserve.ops.launch import DECODE_BLOCK_N, num_kv_splits, split_plan

mod = importlib.import_module("tinyserve.ops.decode_attention")   # the module, not the function
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]


def _case(kv_len, Hq, Hkv, D=64, dtype=torch.float32, q_pos=None, device="cpu", seed=0):
    """q [B, Hq, 1, D] and K/V as the model passes them: the live slice [:, :, :S] of a
    preallocated cache [B, Hkv, max_seq, D] (a strided view, with stale data past S)."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, S = len(kv_len), max(max(kv_len), 1)
    cache = torch.randn(2, B, Hkv, S + 13, D, generator=g, device=device).to(dtype)
    # x3: logits ~ N(0, 9), a peaked softmax whose output is O(1), not ~1/sqrt(S)
    q = (3 * torch.randn(B, Hq, 1, D, generator=g, device=device)).to(dtype)
    kv = torch.tensor(kv_len, device=device)
    if q_pos is None:
        q_pos = (kv - 1).clamp(min=0)          # the new token is the last cached one
    q_pos = torch.as_tensor(q_pos, device=device).reshape(B, 1)
    return q, cache[0, :, :, :S], cache[1, :, :, :S], q_pos, kv


def _run(q, k, v, q_pos, kv, **kw):
    out = torch.full_like(q, float("nan"))       # poisoned: an unwritten element fails
    got = mod.decode_attention_triton(q, k, v, q_pos, kv, out=out, **kw)
    assert got is out
    return out



@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("S", [1, 7, 123, 1000])
def test_lengths_not_multiple_of_block(S, G, dtype, atol, rtol):
    q, k, v, q_pos, kv = _case([S], Hq=2 * G, Hkv=2, dtype=dtype)
    close(f"S={S} G={G} {dtype}", _run(q, k, v, q_pos, kv),
           mod.decode_attention_ref(q, k, v, q_pos, kv), atol, rtol)


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_gqa_ratios_rows_of_different_lengths(G, num_splits):
    dtype, atol, rtol = TOLS[1]
    q, k, v, q_pos, kv = _case([5, 130, 64], Hq=2 * G, Hkv=2, dtype=dtype, seed=G)
    close(f"G={G} splits={num_splits}", _run(q, k, v, q_pos, kv, num_splits=num_splits),
           mod.decode_attention_ref(q, k, v, q_pos, kv), atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
def test_empty_rows_short_q_pos_and_more_splits_than_blocks(dtype, atol, rtol):
    # Row 0 sees nothing (kv_len 0): zeros. Row 2's query sits at 99 though 200 keys are
    # cached: it sees 100. 64 splits requested for 4 blocks: chunks past a row's end are empty.
    q, k, v, q_pos, kv = _case([0, 1, 200, 150], Hq=4, Hkv=1, dtype=dtype, q_pos=[0, 0, 99, 149])
    for ns in (64, 2):
        out = _run(q, k, v, q_pos, kv, num_splits=ns)
        close(f"splits={ns}", out, mod.decode_attention_ref(q, k, v, q_pos, kv), atol, rtol)
        assert (out[0] == 0).all()


def test_head_dim_128_and_contiguous_qkv():
    dtype, atol, rtol = TOLS[1]
    q, k, v, q_pos, kv = _case([300, 77], Hq=8, Hkv=2, D=128, dtype=dtype)
    for args in ((q, k, v), (q.contiguous(), k.contiguous(), v.contiguous())):
        close("D=128", _run(*args, q_pos, kv), mod.decode_attention_ref(*args, q_pos, kv),
               atol, rtol)


def test_num_kv_splits_heuristic():
    # H100 (132 SMs): batch 1 at 32k with 32 KV heads must fill the GPU with splits ...
    ns = num_kv_splits(32, 32768, 132)
    assert 32 * ns >= 2 * 132 and ns <= 64
    assert num_kv_splits(8, 32768, 132) * 8 >= 2 * 132       # GQA: 8 KV heads
    # ... while B*Hkv programs that already fill it get one split (no combine pass).
    assert num_kv_splits(16 * 32, 2048, 132) == 1
    assert num_kv_splits(1, 10, 132) == 1                     # one block: nothing to split


@pytest.mark.parametrize("S, asked", [(1, 4), (64, 1), (100, 3), (4096, 64), (32768, 57),
                                      (1823, 7), (2048, 200)])
def test_split_plan_covers_every_key_once_in_whole_tiles(S, asked):
    ns, per = split_plan(S, asked)
    assert per % DECODE_BLOCK_N == 0 and 1 <= ns <= asked
    starts = [s * per for s in range(ns)]
    assert starts[-1] < S <= ns * per          # the last chunk holds a key; together they hold all


def test_bad_arguments_raise_value_error():
    q, k, v, q_pos, kv = _case([10], Hq=4, Hkv=2)
    bad = [
        (q.expand(1, 4, 2, 64), k, v, q_pos.expand(1, 2), kv),   # T = 2 is not decode
        (q[..., :32], k[..., :32], v[..., :32], q_pos, kv),      # head_dim 32 unsupported
        (q[:, :3], k, v, q_pos, kv),                             # 3 q heads over 2 kv heads
        (q.half(), k, v, q_pos, kv),                             # dtype mismatch
        (q, k, v, q_pos[0], kv),                                 # q_pos not [B, 1]
        (q, k, v, q_pos.float(), kv),                            # float positions
        (q, k[:, :, :5], v, q_pos, kv),                          # k and v shapes differ
    ]
    for args in bad:
        with pytest.raises(ValueError):
            mod.decode_attention_triton(*args)
    with pytest.raises(ValueError):
        mod.decode_attention_triton(q, k, v, q_pos, kv, out=torch.empty_like(q, dtype=torch.half))
    with pytest.raises(ValueError):
        mod.decode_attention_ref(q.expand(1, 4, 2, 64), k, v, q_pos.expand(1, 2), kv)


def test_dispatch(monkeypatch):
    q, k, v, q_pos, kv = _case([9], Hq=2, Hkv=1)
    want = mod.decode_attention_ref(q, k, v, q_pos, kv)
    calls = []
    real = mod.decode_attention_triton
    monkeypatch.setattr(mod, "decode_attention_triton",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.testing.assert_close(mod.decode_attention(q, k, v, q_pos, kv, backend="auto"), want)
    assert calls == []                                   # CPU tensors + auto -> the reference
    torch.testing.assert_close(mod.decode_attention(q, k, v, q_pos, kv, backend="triton"), want)
    assert calls == [1]
    with pytest.raises(ValueError):
        mod.decode_attention(q, k, v, q_pos, kv, backend="cuda")


def test_bench_cases_small_run():
    cases = mod.bench_cases("cpu", small=True)
    assert {c.op for c in cases} == {"decode_attention"} and all(c.bytes > 0 for c in cases)
    for c in cases:
        impls = c.setup()
        want = impls["ref"]()
        for name in ("sdpa", "triton"):
            close(f"{c.name} {name}", impls[name]().float(), want.float(), 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv", [(32, 32), (32, 8)])
def test_gpu_bf16_32k_context(Hq, Hkv):
    q, k, v, q_pos, kv = _case([32768, 20001], Hq=Hq, Hkv=Hkv, D=128, dtype=torch.bfloat16,
                               device="cuda")
    torch.cuda.synchronize()
    close(f"32k bf16 {Hq}/{Hkv}", _run(q, k, v, q_pos, kv),
           mod.decode_attention_ref(q, k, v, q_pos, kv), 2e-2, 2e-2)
    for ns in (1, 7):
        close(f"splits={ns}", _run(q, k, v, q_pos, kv, num_splits=ns),
               mod.decode_attention_ref(q, k, v, q_pos, kv), 2e-2, 2e-2)
