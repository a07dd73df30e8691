"""The reference model and KV cache on a tiny random LLaMA (fast; no files needed)."""
import pytest
import torch

from tinyserve.config import ModelConfig
from tinyserve.kv_cache import KVCache
from tinyserve.model import Transformer, WeightsError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    m = Transformer(cfg).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    return m


def test_cache_steps_equal_full_recompute(tiny):
    ids = torch.randint(0, 97, (3, 11))
    full = tiny.run(ids)
    cache = KVCache(tiny.config, 3, 16)
    parts = [tiny.run(ids[:, :5], cache), tiny.run(ids[:, 5:6], cache), tiny.run(ids[:, 6:], cache)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [11, 11, 11]


def test_right_padded_rows_equal_rows_alone(tiny):
    lens = [9, 3, 6]
    ids = torch.randint(0, 97, (3, 9))
    cache = KVCache(tiny.config, 3, 12)
    last = tiny.run(ids, cache, num_new=torch.tensor(lens), last_only=True)[:, 0]
    nxt = torch.randint(0, 97, (3, 1))
    step = tiny.run(nxt, cache, last_only=True)[:, 0]
    for b, n in enumerate(lens):
        alone = tiny.run(torch.cat([ids[b:b + 1, :n], nxt[b:b + 1]], 1))
        assert torch.allclose(last[b], alone[0, n - 1], atol=1e-5)
        assert torch.allclose(step[b], alone[0, n], atol=1e-5)
    assert cache.lengths.tolist() == [10, 4, 7]


def test_rows_with_zero_new_tokens_are_untouched(tiny):
    ids = torch.randint(0, 97, (2, 4))
    cache = KVCache(tiny.config, 2, 8)
    tiny.run(ids, cache)
    k_before = [k[1].clone() for k in cache.k]
    tiny.run(torch.randint(0, 97, (2, 1)), cache, num_new=torch.tensor([1, 0]))
    assert cache.lengths.tolist() == [5, 4]
    assert all(torch.equal(k[1], kb) for k, kb in zip(cache.k, k_before))


def test_truncate_then_rewrite_equals_fresh_decode(tiny):
    ids = torch.randint(0, 97, (1, 8))
    cache = KVCache(tiny.config, 1, 8)
    tiny.run(ids[:, :6], cache)
    tiny.run(torch.randint(0, 97, (1, 2)), cache)          # tokens that get "rejected"
    cache.truncate([6])
    out = tiny.run(ids[:, 6:], cache)
    assert torch.allclose(out, tiny.run(ids)[:, 6:], atol=1e-5)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate([9])


def test_bad_inputs(tiny):
    cache = KVCache(tiny.config, 1, 4)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        tiny.run(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="token ids"):
        tiny.run(torch.tensor([[97]]))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        tiny.run(torch.tensor([1, 2]))
    with pytest.raises(WeightsError, match="missing tensors"):
        tiny.load_weights({})
    sd = {n: p.clone() for n, p in tiny.named_parameters()}
    sd["layers.0.attn.wq.weight"] = torch.zeros(5, 5)
    with pytest.raises(WeightsError, match=r"layers.0.attn.wq.weight: expected \(48, 48\)"):
        tiny.load_weights(sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(tiny, dtype):
    ids = torch.randint(0, 97, (1, 7))
    ref = tiny.run(ids)
    half = Transformer(tiny.config).eval()
    half.load_weights(dict(tiny.named_parameters()))
    half.to(dtype)
    out = half.run(ids).float()
    err = (out - ref).abs().max() / ref.abs().max()
    print(f"{dtype}: max relative logit error {err:.3e}")
    assert err < 0.05


def test_static_decode_step_equals_forward(tiny):
    ids = torch.randint(0, 97, (2, 6))
    a, b = KVCache(tiny.config, 2, 10), KVCache(tiny.config, 2, 10)
    tiny.run(ids[:, :4], a)
    tiny.run(ids[:, :4], b)
    for t in (4, 5):
        want = tiny.run(ids[:, t:t + 1], a)
        got = tiny.decode_step(ids[:, t:t + 1], b)
        assert torch.allclose(got, want, atol=1e-5)
    assert b.lengths.tolist() == [6, 6]


def test_benchmark_decode_matches_greedy_generation(tiny):
    from tinyserve.generate import benchmark_decode, generate_ids
    ids = torch.randint(0, 97, (2, 5))
    out = benchmark_decode(tiny, ids, 6, cuda_graph=False)
    want = generate_ids(tiny, ids.tolist(), max_new_tokens=6, ignore_eos=True)
    assert out["tokens"].tolist() == want
    assert out["decode_s"] > 0 and out["cuda_graph"] is False


def test_triton_backend_model_matches_reference():
    """The whole model with every op on its Triton kernel (interpreter on CPU) vs the reference,
    through a padded prefill and cached decode steps."""
    from tinyserve.ops import interpreter_on
    if not (torch.cuda.is_available() or interpreter_on()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=64)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref = Transformer(cfg, backend="ref").to(dev).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.1)
    tri = Transformer(cfg, backend="triton").to(dev).eval()
    tri.load_weights(dict(ref.named_parameters()))
    ids = torch.randint(0, 64, (2, 9), device=dev)
    num_new = torch.tensor([9, 5], device=dev)
    outs = []
    for m in (ref, tri):
        cache = KVCache(cfg, 2, 16, device=dev)
        steps = [m.run(ids, cache, num_new=num_new, last_only=True)]
        for t in range(3):
            steps.append(m.run(ids[:, t:t + 1], cache))
        steps.append(m.decode_step(ids[:, :1], cache))
        outs.append(torch.cat(steps, 1))
    err = (outs[0] - outs[1]).abs().max().item()
    print(f"triton vs ref model logits: max |diff| {err:.2e}")
    assert err < 1e-4
