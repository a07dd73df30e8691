"""paged_attention: paged kernels (interpreter on CPU) == gather + contiguous reference ==
the contiguous Triton kernels, over fragmented, shuffled and shared block tables."""
import importlib

import pytest
import torch

from tinyserve.engine.block_manager import BlockManager
from _fixtures import close

mod = importlib.import_module("tinyserve.ops.paged_attention")
layout = importlib.import_module("tinyserve.ops.paged_layout")
dec = importlib.import_module("tinyserve.ops.decode_attention")
pre = importlib.import_module("tinyserve.ops.prefill_attention")
TOLS = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]


def _paged(kv_lens, Hkv, D=64, bs=4, dtype=torch.float32, device="cpu", seed=0, share=None):
    """Random K/V in shuffled physical blocks, 5 spare blocks of other data, -1 past each row's
    blocks. share=(a, b, n): row b's first n blocks are row a's (a shared prefix)."""
    g = torch.Generator().manual_seed(seed)
    kc, vc, bt = mod.random_paged_cache(kv_lens, Hkv, D, bs, extra_blocks=5, dtype=dtype,
                                        device=device, generator=g)
    if share:
        a, b, n = share
        bt[b, :n] = bt[a, :n]
    return kc, vc, bt, torch.tensor(kv_lens, device=device), g


def _contiguous(cache, bt, kv_lens):
    """[B, Hkv, S, D] by reading token by token through the table (independent of the op's
    own gather): the cache a contiguous KVCache would hold."""
    bs = cache.shape[1]
    S = max(max(kv_lens.tolist()), 1)
    out = torch.zeros(len(kv_lens), cache.shape[2], S, cache.shape[3], dtype=cache.dtype,
                      device=cache.device)
    for b, n in enumerate(kv_lens.tolist()):
        for t in range(n):
            out[b, :, t] = cache[int(bt[b, t // bs]), t % bs]
    return out



def _decode(q, kc, vc, bt, kv, **kw):
    out = torch.full_like(q, float("nan"))       # poisoned: an unwritten element fails
    assert mod.paged_decode_attention_triton(q, kc, vc, bt, kv, out=out, **kw) is out
    return out


def _check_decode(name, q, kc, vc, bt, kv, atol, rtol, **kw):
    got = _decode(q, kc, vc, bt, kv, **kw)
    want = mod.paged_decode_attention_ref(q, kc, vc, bt, kv)
    close(f"{name} vs ref", got, want, atol, rtol)
    k, v = _contiguous(kc, bt, kv), _contiguous(vc, bt, kv)
    q_pos = (kv - 1).clamp(min=0)[:, None]
    # the reference equals the contiguous reference (up to the fp32 summation order: the
    # gather pads S to whole blocks), the kernel the contiguous kernel
    close(f"{name} ref vs contiguous ref", want,
           dec.decode_attention_ref(q[:, :, None], k, v, q_pos, kv)[:, :, 0], atol, rtol)
    contiguous = dec.decode_attention_triton(q[:, :, None], k, v, q_pos, kv)[:, :, 0]
    close(f"{name} vs contiguous kernel", got, contiguous, atol, rtol)
    return got


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("bs", [5, 16])
def test_decode_matches_reference_and_contiguous_kernel(bs, G, dtype, atol, rtol):
    # kv_len 1, odd lengths, partly filled last blocks, lengths past one 64-key tile; an odd
    # block size (5: blocks straddle the kernel's 64-key tiles) and vLLM's default 16.
    kc, vc, bt, kv, g = _paged([1, 7, 37, 130], Hkv=2, bs=bs, dtype=dtype, seed=bs + G)
    q = (3 * torch.randn(4, 2 * G, 64, generator=g)).to(dtype)
    _check_decode(f"bs={bs} G={G} {dtype}", q, kc, vc, bt, kv, atol, rtol)


@pytest.mark.parametrize("num_splits", [1, 3, 64])
def test_decode_shared_blocks_empty_row_and_forced_splits(num_splits):
    # Rows 1 and 2 share their first 2 blocks (a common prompt); row 0 has nothing cached
    # (zeros); 64 splits for 2 tiles: most chunks are empty.
    dtype, atol, rtol = TOLS[1]
    kc, vc, bt, kv, g = _paged([0, 50, 45, 3], Hkv=1, bs=16, dtype=dtype, share=(1, 2, 2))
    q = (3 * torch.randn(4, 3, 64, generator=g)).to(dtype)
    out = _check_decode(f"splits={num_splits}", q, kc, vc, bt, kv, atol, rtol,
                        num_splits=num_splits)
    assert (out[0] == 0).all()


def test_decode_head_dim_128_and_a_strided_query():
    dtype, atol, rtol = TOLS[1]
    kc, vc, bt, kv, g = _paged([200, 17], Hkv=2, D=128, bs=16, dtype=dtype, seed=3)
    q = (3 * torch.randn(2, 16, 128, generator=g)).to(dtype)[:, ::2]   # every other head
    _check_decode("D=128", q, kc, vc, bt, kv, atol, rtol)


def _check_prefill(name, q, kc, vc, bt, cu_q, kv, atol, rtol):
    out = torch.full_like(q, float("nan"))
    got = mod.paged_prefill_attention_triton(q, kc, vc, bt, cu_q, kv, out=out)
    assert got is out
    want = mod.paged_prefill_attention_ref(q, kc, vc, bt, cu_q, kv)
    close(f"{name} vs ref", got, want, atol, rtol)
    # The contiguous kernel on a right-padded batch: row b's T queries at kv - q_len + t.
    q_lens = (cu_q[1:] - cu_q[:-1]).tolist()
    T = max(q_lens)
    B, Hq, D = len(q_lens), q.shape[1], q.shape[2]
    q4 = torch.zeros(B, Hq, T, D, dtype=q.dtype)
    for b, (s, n) in enumerate(zip(cu_q.tolist(), q_lens)):
        q4[b, :, :n] = q[s:s + n].transpose(0, 1)
    q_pos = (kv - torch.tensor(q_lens))[:, None] + torch.arange(T)[None]
    k, v = _contiguous(kc, bt, kv), _contiguous(vc, bt, kv)
    contiguous = pre.prefill_attention_triton(q4, k, v, q_pos, kv)
    ref4 = pre.prefill_attention_ref(q4, k, v, q_pos, kv)
    for b, (s, n) in enumerate(zip(cu_q.tolist(), q_lens)):
        close(f"{name} row {b} vs contiguous kernel", got[s:s + n],
               contiguous[b, :, :n].transpose(0, 1), atol, rtol)
        close(f"{name} row {b} ref vs contiguous ref", want[s:s + n],
               ref4[b, :, :n].transpose(0, 1), atol, rtol)
    return got


@pytest.mark.parametrize("dtype,atol,rtol", TOLS)
@pytest.mark.parametrize("G", [1, 3])
def test_prefill_fresh_cached_prefix_decode_rows_and_empty_rows(G, dtype, atol, rtol):
    # Rows: a fresh 5-token prompt; 1 query after 29 cached (a decode row); a row with no
    # query this step; 17 queries after a 23-token cached prefix that shares its first two
    # blocks with row 1 (a prefix-cache hit).
    q_lens, kv_lens = [5, 1, 0, 17], [5, 30, 9, 40]
    kc, vc, bt, kv, g = _paged(kv_lens, Hkv=2, bs=4, dtype=dtype, seed=G, share=(1, 3, 2))
    cu_q = torch.tensor([0, 5, 6, 6, 23])
    q = (3 * torch.randn(23, 2 * G, 64, generator=g)).to(dtype)
    _check_prefill(f"G={G} {dtype}", q, kc, vc, bt, cu_q, kv, atol, rtol)


def test_prefill_head_dim_128_several_query_and_key_tiles():
    dtype, atol, rtol = TOLS[1]
    kc, vc, bt, kv, g = _paged([61, 40], Hkv=1, D=128, bs=16, dtype=dtype, seed=7)
    cu_q = torch.tensor([0, 40, 73])   # 40 queries after 21 cached; 33 after 7 cached
    q = (3 * torch.randn(73, 2, 128, generator=g)).to(dtype)
    _check_prefill("D=128", q, kc, vc, bt, cu_q, kv, atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,D,strided", [(2, 64, False), (3, 8, True)])
def test_write_matches_reference_and_skips_minus_one(H, D, strided, dtype):
    g = torch.Generator().manual_seed(H)
    num_blocks, bs, N = 6, 4, 10
    if strided:   # a cache stored [num_blocks, Hkv, bs, D] and viewed token-major
        base = torch.randn(num_blocks, H, bs, D, generator=g).to(dtype)
        k_cache, v_cache = base.transpose(1, 2), base.clone().transpose(1, 2)
    else:
        k_cache = torch.randn(num_blocks, bs, H, D, generator=g).to(dtype)
        v_cache = torch.randn(num_blocks, bs, H, D, generator=g).to(dtype)
    k_new = torch.randn(N, H, D, generator=g).to(dtype)
    v_new = torch.randn(N, H, D, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=g)[:N]
    slots[[2, 7]] = -1
    want_k, want_v = k_cache.clone(), v_cache.clone()
    mod.paged_write_ref(want_k, want_v, k_new, v_new, slots)
    got_k, got_v = k_cache.clone(), v_cache.clone()
    mod.paged_write_triton(got_k, got_v, k_new, v_new, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    # and the reference does what it says: written rows land, every other slot is untouched
    flat_k, flat_old = want_k.reshape(-1, H, D), k_cache.reshape(-1, H, D)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k_new[i])
            assert torch.equal(want_v.reshape(-1, H, D)[s], v_new[i])
    untouched = torch.ones(num_blocks * bs, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(flat_k[untouched], flat_old[untouched])


def test_block_manager_tables_drive_the_kernels():
    # Two requests with a common 8-token prompt prefix and a parallel sample (fork): the
    # block manager's slots and tables, paged_write and paged attention together give the
    # attention of each sequence computed on its own contiguous K/V.
    Hkv, Hq, D, bs = 1, 2, 64, 4
    g = torch.Generator().manual_seed(0)
    bm = BlockManager(16, block_size=bs)
    kc, vc = torch.zeros(16, bs, Hkv, D), torch.zeros(16, bs, Hkv, D)
    prompts = {"a": list(range(10)), "b": list(range(8)) + [50, 51, 52]}
    kv_of = {}   # token position -> K/V, the same for equal prefixes (as a model computes)
    seqs = {}
    for sid, prompt in prompts.items():
        cached = bm.allocate(sid, prompt)
        seqs[sid] = prompt
        for t in range(cached, len(prompt)):
            key = tuple(prompt[:t + 1])
            kv_of.setdefault(key, (torch.randn(Hkv, D, generator=g), torch.randn(Hkv, D,
                                                                                 generator=g)))
        new = [kv_of[tuple(prompt[:t + 1])] for t in range(cached, len(prompt))]
        mod.paged_write_triton(kc, vc, torch.stack([k for k, _ in new]),
                               torch.stack([v for _, v in new]),
                               torch.tensor(bm.slot_mapping(sid, cached, len(prompt))))
        bm.mark_computed(sid, len(prompt))
        assert cached == (8 if sid == "b" else 0)
    bm.fork("a", "a2")                            # a parallel sample of request a
    seqs["a2"] = list(seqs["a"])
    for sid, tok in (("a", 7), ("a2", 9)):        # both write into the shared partial block
        pairs = bm.append_slots(sid, 1, [tok])
        for src, dst in pairs:                    # copy-on-write, as the runner does
            kc[dst], vc[dst] = kc[src], vc[src]
        seqs[sid] = seqs[sid] + [tok]
        key = tuple(seqs[sid])
        kv_of[key] = (torch.randn(Hkv, D, generator=g), torch.randn(Hkv, D, generator=g))
        n = len(seqs[sid])
        mod.paged_write_ref(kc, vc, kv_of[key][0][None], kv_of[key][1][None],
                            torch.tensor(bm.slot_mapping(sid, n - 1, n)))
    order = ["a", "b", "a2"]
    width = max(len(bm.block_table(s)) for s in order)
    bt = torch.tensor([bm.block_table(s) + [-1] * (width - len(bm.block_table(s)))
                       for s in order], dtype=torch.int32)
    kv = torch.tensor([len(seqs[s]) for s in order])
    q = torch.randn(3, Hq, D, generator=g)
    got = mod.paged_decode_attention_triton(q, kc, vc, bt, kv)
    for i, s in enumerate(order):
        toks = seqs[s]
        k = torch.stack([kv_of[tuple(toks[:t + 1])][0] for t in range(len(toks))], 1)[None]
        v = torch.stack([kv_of[tuple(toks[:t + 1])][1] for t in range(len(toks))], 1)[None]
        want = dec.decode_attention_ref(q[i:i + 1, :, None], k, v,
                                        torch.tensor([[len(toks) - 1]]), kv[i:i + 1])
        close(f"seq {s}", got[i], want[0, :, 0], 1e-5, 1e-5)


def test_bad_arguments_raise_value_error():
    kc, vc, bt, kv, g = _paged([10, 3], Hkv=2)
    q = torch.randn(2, 4, 64, generator=g)
    cu_q = torch.tensor([0, 2, 3])
    qp = torch.randn(3, 4, 64, generator=g)
    decode_bad = [
        (q[:, :, None], kc, vc, bt, kv),                      # q 4-D
        (q[:, :3], kc, vc, bt, kv),                           # 3 q heads over 2 kv heads
        (q.half(), kc, vc, bt, kv),                           # dtype mismatch
        (q, kc, vc[:3], bt, kv),                              # k/v caches differ
        (q, kc, vc, bt.float(), kv),                          # float block table
        (q, kc, vc, bt[0], kv),                               # 1-D block table
        (q, kc, vc, bt, kv[:1]),                              # kv_lens not [B]
        (q[:1], kc, vc, bt, kv),                              # q rows != table rows
    ]
    for args in decode_bad:
        for fn in (mod.paged_decode_attention_triton, mod.paged_decode_attention_ref):
            with pytest.raises(ValueError):
                fn(*args)
    with pytest.raises(ValueError, match="head_dim"):        # only the kernels limit it
        mod.paged_decode_attention_triton(q[..., :32], kc[..., :32], vc[..., :32], bt, kv)
    mod.paged_decode_attention_ref(q[..., :32], kc[..., :32], vc[..., :32], bt, kv)
    with pytest.raises(ValueError, match="out"):
        mod.paged_decode_attention_triton(q, kc, vc, bt, kv, out=torch.empty(2, 4, 32))
    for fn in (mod.paged_decode_attention_ref,):   # the reference also checks the values
        with pytest.raises(ValueError, match="blocks per row"):
            fn(q, kc, vc, bt[:, :1], kv)                      # table too narrow for 10 keys
        bad = bt.clone()
        bad[0, 1] = kc.shape[0]
        with pytest.raises(ValueError, match="outside"):
            fn(q, kc, vc, bad, kv)
    for cu in (cu_q[:2], cu_q.float()):                      # not [B + 1]; float
        for fn in (mod.paged_prefill_attention_ref, mod.paged_prefill_attention_triton):
            with pytest.raises(ValueError, match="cu_q"):
                fn(qp, kc, vc, bt, cu, kv)
    # values the kernels never check on the host (a sync per layer); the reference does
    for cu, lens in (([1, 2, 3], kv), ([0, 2, 4], kv), ([0, 3, 2], kv),  # from 1; past N;
                     ([0, 2, 3], torch.tensor([1, 3]))):         # decreasing; q_len > kv_len
        with pytest.raises(ValueError, match="cu_q"):
            mod.paged_prefill_attention_ref(qp, kc, vc, bt, torch.tensor(cu), lens)
    mod.paged_prefill_attention_ref(qp, kc, vc, bt, torch.tensor([0, 0, 3]), kv)   # valid
    k_new = torch.randn(3, 2, 64)
    write_bad = [
        (kc, vc, k_new.half(), k_new.half(), torch.tensor([0, 1, 2])),   # dtype
        (kc, vc, k_new[:, :1], k_new[:, :1], torch.tensor([0, 1, 2])),   # heads
        (kc, vc, k_new, k_new, torch.tensor([0, 1])),                    # slots not [N]
        (kc, vc, k_new, k_new, torch.tensor([0.0, 1, 2])),               # float slots
        (kc, vc[:, :2], k_new, k_new, torch.tensor([0, 1, 2])),          # caches differ
    ]
    for args in write_bad:
        for fn in (mod.paged_write_ref, mod.paged_write_triton):
            with pytest.raises(ValueError):
                fn(*args)
    with pytest.raises(ValueError, match="past the cache"):
        mod.paged_write_ref(kc, vc, k_new, k_new, torch.tensor([0, 1, kc.shape[0] * 4]))


def test_dispatch(monkeypatch):
    kc, vc, bt, kv, g = _paged([9, 4], Hkv=1)
    q = torch.randn(2, 2, 64, generator=g)
    cu_q = torch.tensor([0, 3, 5])
    qp = torch.randn(5, 2, 64, generator=g)
    calls = []
    for name in ("paged_decode_attention_triton", "paged_prefill_attention_triton",
                 "paged_write_triton"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _n=name, _f=real, **kw: calls.append(_n)
                            or _f(*a, **kw))
    want_d = mod.paged_decode_attention_ref(q, kc, vc, bt, kv)
    want_p = mod.paged_prefill_attention_ref(qp, kc, vc, bt, cu_q, kv)
    for backend in ("auto", "ref"):             # CPU tensors: the references
        torch.testing.assert_close(mod.paged_attention(q, kc, vc, bt, kv, backend=backend),
                                   want_d)
        torch.testing.assert_close(mod.paged_attention(qp, kc, vc, bt, kv, cu_q,
                                                       backend=backend), want_p)
    assert calls == []
    torch.testing.assert_close(mod.paged_attention(q, kc, vc, bt, kv, backend="triton"), want_d)
    torch.testing.assert_close(mod.paged_attention(qp, kc, vc, bt, kv, cu_q, backend="triton"),
                               want_p)
    k2, v2 = kc.clone(), vc.clone()
    mod.paged_write(k2, v2, qp[:, :1], qp[:, :1], torch.arange(5), backend="triton")
    assert calls == ["paged_decode_attention_triton", "paged_prefill_attention_triton",
                     "paged_write_triton"]
    with pytest.raises(ValueError, match="backend"):
        mod.paged_attention(q, kc, vc, bt, kv, backend="cuda")
    with pytest.raises(ValueError, match="head_dim"):     # toy head_dim: kernels refuse it
        mod.paged_attention(q[..., :8], kc[..., :8], vc[..., :8], bt, kv, backend="triton")


def test_exported_from_ops():
    from tinyserve import ops
    assert ops.paged_attention is mod.paged_attention and ops.paged_write is mod.paged_write


def test_bench_cases_small_run():
    cases = mod.bench_cases("cpu", small=True)
    assert {c.op for c in cases} == {"paged_attention"} and all(c.bytes > 0 for c in cases)
    assert {c.meta["kind"] for c in cases} == {"decode", "prefill"}
    for c in cases:
        impls = c.setup()
        assert "contiguous" not in impls          # the contiguous kernels are timed on CUDA
        close(c.name, impls["triton"]().float(), impls["ref"]().float(), 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hkv", [(32, 32), (32, 8)])
def test_gpu_bf16_decode_real_shapes(Hq, Hkv):
    kc, vc, bt, kv, g = _paged([32768, 20001, 1, 4097], Hkv=Hkv, D=128, bs=16,
                               dtype=torch.bfloat16, device="cuda", share=(0, 1, 100))
    q = (3 * torch.randn(4, Hq, 128, generator=g)).to("cuda", torch.bfloat16)
    want = mod.paged_decode_attention_ref(q, kc, vc, bt, kv)
    for ns in (None, 1, 7):
        close(f"bf16 {Hq}/{Hkv} splits={ns}", _decode(q, kc, vc, bt, kv, num_splits=ns),
               want, 2e-2, 2e-2)
    k = layout.gather_blocks(kc, bt, kv)
    v = layout.gather_blocks(vc, bt, kv)
    contiguous = dec.decode_attention_triton(q[:, :, None], k, v, (kv - 1)[:, None], kv)
    close("vs contiguous kernel", _decode(q, kc, vc, bt, kv), contiguous[:, :, 0], 2e-2, 2e-2)


@pytest.mark.gpu
def test_gpu_bf16_prefill_and_write_real_shapes():
    q_lens, kv_lens = [512, 1, 300, 2048], [512, 4000, 2300, 2048]
    kc, vc, bt, kv, g = _paged(kv_lens, Hkv=8, D=128, bs=16, dtype=torch.bfloat16,
                               device="cuda", share=(1, 2, 64))
    cu_q = torch.tensor([0, 512, 513, 813, 2861], device="cuda")
    q = (3 * torch.randn(2861, 32, 128, generator=g)).to("cuda", torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    mod.paged_prefill_attention_triton(q, kc, vc, bt, cu_q, kv, out=out, max_q_len=2048)
    close("prefill bf16", out, mod.paged_prefill_attention_ref(q, kc, vc, bt, cu_q, kv),
           2e-2, 2e-2)
    k_new = torch.randn(4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(kc.shape[0] * 16, device="cuda")[:4096]
    slots[::7] = -1
    want_k, want_v, got_k, got_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    mod.paged_write_ref(want_k, want_v, k_new, -k_new, slots)
    mod.paged_write_triton(got_k, got_v, k_new, -k_new, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
