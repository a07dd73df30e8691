"""Attention (the contiguous reference, the decode and prefill kernels, and the paged
reference and kernels) against torch's ``scaled_dot_product_attention`` in fp64, with GQA
expanded by ``repeat_interleave``, one row at a time, and the causal mask built by ``tril``
(or SDPA's own ``is_causal`` for a fresh prompt). Rows have odd, different lengths; cache slots
past a row's length hold large values, so a mask that lets one through fails loudly.

Error bound (fp32 arithmetic in every implementation): a score q.k/sqrt(D) is off by at most
(D + 2) fp32 roundings of A = max |q|.|k|/sqrt(D); exp adds ~|s| + 8 roundings; a relative
error e in the weights moves the output by at most 2 e max|v|; the P.V sum adds n roundings of
max|v|; the kernels round P to the input dtype before P.V (u max|v|); the result is rounded to
the dtype once (u |out|).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from _oracle import DEV, U32, unit, within

common = importlib.import_module("tinyserve.ops.attention_common")
dec = importlib.import_module("tinyserve.ops.decode_attention")
pre = importlib.import_module("tinyserve.ops.prefill_attention")
paged = importlib.import_module("tinyserve.ops.paged_attention")
GARBAGE = 1e3   # stale cache contents past each row's length


def oracle(q, k, v, kv_lens, first=None):
    """q [B, Hq, T, D]: row b's queries sit at positions first[b] + i (by default the last T
    of its kv_lens[b] tokens) and see keys 0 .. min(first[b] + i, kv_lens[b] - 1)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    out = []
    for b, n in enumerate(kv_lens):
        start = n - T if first is None else first[b]
        kb = k[b:b + 1, :, :n].double().repeat_interleave(G, dim=1)   # query head h -> h // G
        vb = v[b:b + 1, :, :n].double().repeat_interleave(G, dim=1)
        if n == T and start == 0:   # a fresh prompt: SDPA's own causal mask
            o = F.scaled_dot_product_attention(q[b:b + 1].double(), kb, vb, is_causal=True)
        else:
            mask = torch.ones(T, n, dtype=torch.bool, device=q.device).tril(diagonal=start)
            o = F.scaled_dot_product_attention(q[b:b + 1].double(), kb, vb, attn_mask=mask)
        out.append(o)
    return torch.cat(out)


def bound(q, k, v, kv_lens, exact, kernel):
    """The module docstring's bound, from the visible keys and values only."""
    D = q.shape[-1]
    G = q.shape[1] // k.shape[1]
    A = vmax = 0.0
    for b, n in enumerate(kv_lens):
        kb = k[b, :, :n].double().abs().repeat_interleave(G, dim=0)
        A = max(A, float((q[b].double().abs() @ kb.transpose(-1, -2)).max()) / D ** 0.5)
        vmax = max(vmax, float(v[b, :, :n].double().abs().max()))
    u = unit(q.dtype, kernel)
    weights = (2 * (D + 2) * A + 2 * (A + 8) + max(kv_lens) + 8) * U32 + (u if kernel else 0)
    return u * exact.abs() + vmax * weights


def contiguous_case(B_lens, T, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = max(B_lens) + 3
    k = torch.randn(len(B_lens), Hkv, S, D, generator=g)
    v = torch.randn(len(B_lens), Hkv, S, D, generator=g)
    for b, n in enumerate(B_lens):
        k[b, :, n:], v[b, :, n:] = GARBAGE, GARBAGE
    q = torch.randn(len(B_lens), Hq, T, D, generator=g)
    kv = torch.tensor(B_lens)
    q_pos = kv[:, None] - T + torch.arange(T)
    cast = lambda t: t.to(DEV, dtype)
    return cast(q), cast(k), cast(v), q_pos.to(DEV), kv.to(DEV)


PREFILL = [   # (kv_lens, T, Hq, Hkv): a fresh prompt beside a chunk after a cached prefix
    ([19, 45], 19, 4, 2),
    ([7, 40], 7, 3, 3),
]


@pytest.mark.parametrize("lens,T,Hq,Hkv,D", [(*PREFILL[0], 64), (*PREFILL[1], 8)])
def test_reference_prefill(lens, T, Hq, Hkv, D):   # D = 8: the toy models' head_dim
    q, k, v, q_pos, kv = contiguous_case(lens, T, Hq, Hkv, D, torch.float32)
    exact = oracle(q, k, v, lens)
    got = common.attention_ref(q, k, v, q_pos, kv)
    within(f"attention_ref T={T} D={D}", got, exact, bound(q, k, v, lens, exact, False))
    torch.testing.assert_close(pre.prefill_attention_ref(q, k, v, q_pos, kv), got)


@pytest.mark.parametrize("lens,T,Hq,Hkv,dtype", [(*PREFILL[0], torch.float32),
                                                  (*PREFILL[1], torch.float32),
                                                  (*PREFILL[0], torch.float16)])
def test_prefill_kernel(lens, T, Hq, Hkv, dtype):
    q, k, v, q_pos, kv = contiguous_case(lens, T, Hq, Hkv, 64, dtype, seed=1)
    exact = oracle(q, k, v, lens)
    got = pre.prefill_attention_triton(q, k, v, q_pos, kv)
    within(f"prefill kernel T={T} {dtype}", got, exact, bound(q, k, v, lens, exact, True))


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_right_padded_batch(impl):
    """A batch of prompts of 11 and 4 tokens padded to T = 11 (q_pos = 0 .. 10 in both rows):
    the short row's keys stop at kv_len = 4, and its padding queries see all 4."""
    lens, T = [11, 4], 11
    q, k, v, _, kv = contiguous_case(lens, T, 4, 2, 64, torch.float32, seed=6)
    q_pos = torch.arange(T, device=DEV).expand(2, T)
    fn = common.attention_ref if impl == "ref" else pre.prefill_attention_triton
    got = fn(q, k, v, q_pos, kv)
    exact = oracle(q, k, v, lens, first=[0, 0])
    within(f"right-padded {impl}", got, exact, bound(q, k, v, lens, exact, impl == "triton"))


DECODE = [([1, 37, 130], 6, 2), ([70, 5], 2, 2)]   # G = 3 (tl.dot path) and G = 1


@pytest.mark.parametrize("lens,Hq,Hkv", DECODE)
def test_reference_decode(lens, Hq, Hkv):
    q, k, v, q_pos, kv = contiguous_case(lens, 1, Hq, Hkv, 64, torch.float32, seed=2)
    exact = oracle(q, k, v, lens)
    got = dec.decode_attention_ref(q, k, v, q_pos, kv)
    within("decode_attention_ref", got, exact, bound(q, k, v, lens, exact, False))


@pytest.mark.parametrize("splits,dtype", [(3, torch.float32), (None, torch.float16)])
@pytest.mark.parametrize("lens,Hq,Hkv", DECODE)
def test_decode_kernel(lens, Hq, Hkv, splits, dtype):   # splits=3: the combine kernel too
    q, k, v, q_pos, kv = contiguous_case(lens, 1, Hq, Hkv, 64, dtype, seed=3)
    exact = oracle(q, k, v, lens)
    got = dec.decode_attention_triton(q, k, v, q_pos, kv, num_splits=splits)
    within(f"decode kernel splits={splits} {dtype}", got, exact,
           bound(q, k, v, lens, exact, True))


def paged_case(kv_lens, Hq, Hkv, D, dtype, n_queries, bs=16, seed=4):
    """A shuffled paged cache, every slot no row owns set to GARBAGE, and the contiguous
    [B, Hkv, S, D] K/V read token by token through the table (for the oracle)."""
    g = torch.Generator().manual_seed(seed)
    kc, vc, bt = paged.random_paged_cache(kv_lens, Hkv, D, bs, extra_blocks=2, generator=g)
    owned = torch.zeros(kc.shape[:2], dtype=torch.bool)
    S = max(kv_lens)
    k = torch.full((len(kv_lens), Hkv, S, D), GARBAGE)
    v = k.clone()
    for b, n in enumerate(kv_lens):
        for t in range(n):
            blk, off = int(bt[b, t // bs]), t % bs
            owned[blk, off] = True
            k[b, :, t], v[b, :, t] = kc[blk, off], vc[blk, off]
    kc[~owned], vc[~owned] = GARBAGE, GARBAGE
    q = torch.randn(n_queries, Hq, D, generator=g)
    cast = lambda t: t.to(DEV, dtype)
    return cast(q), cast(kc), cast(vc), bt.to(DEV), torch.tensor(kv_lens, device=DEV), \
        cast(k), cast(v)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_paged_decode(impl):
    lens = [1, 37, 70]
    q, kc, vc, bt, kv, k, v = paged_case(lens, 6, 2, 64, torch.float32, len(lens))
    fn = paged.paged_decode_attention_ref if impl == "ref" else \
        paged.paged_decode_attention_triton
    got = fn(q, kc, vc, bt, kv)
    exact = oracle(q[:, :, None], k, v, lens)[:, :, 0]
    within(f"paged decode {impl}", got, exact,
           bound(q[:, :, None], k, v, lens, exact, impl == "triton"))


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_paged_prefill(impl):
    lens, q_lens = [5, 30, 40], [5, 1, 12]   # a fresh prompt, a decode, a chunk after a prefix
    cu = torch.tensor([0] + q_lens).cumsum(0).to(DEV)
    q, kc, vc, bt, kv, k, v = paged_case(lens, 4, 2, 64, torch.float32, sum(q_lens), seed=5)
    fn = paged.paged_prefill_attention_ref if impl == "ref" else \
        paged.paged_prefill_attention_triton
    got = fn(q, kc, vc, bt, cu, kv)
    for b, (n, t) in enumerate(zip(lens, q_lens)):
        qb = q[int(cu[b]):int(cu[b + 1])].transpose(0, 1)[None]        # [1, Hq, t, D]
        exact = oracle(qb, k[b:b + 1], v[b:b + 1], [n])[0].transpose(0, 1)
        within(f"paged prefill {impl} row {b}", got[int(cu[b]):int(cu[b + 1])], exact,
               bound(qb, k[b:b + 1], v[b:b + 1], [n], exact, impl == "triton"))
