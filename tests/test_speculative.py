"""Speculative decoding: the exact accept/reject rule, its statistics, the bookkeeping, the
cache rollback and bad arguments, on toy distributions and tiny random models (seconds).

The real-model checks (greedy output of every draft, head training) are in
test_speculative_model.py.
"""
import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from _fixtures import tiny_model
from tinyserve.generate import generate_ids
from tinyserve.kv_cache import KVCache
from tinyserve.sampling import SamplingParams
from tinyserve.speculative import (Draft, DraftHead, HeadDraft, ModelDraft, PromptLookupDraft,
                                   SpeculativeDecoder, core, early_exit_draft, early_exit_view,
                                   expected_tokens_per_step, generate_speculative, head_config,
                                   residual_distribution, verify_greedy, verify_sampled)
from tinyserve.speculative.head import init_head


# Many small ops: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the rule, statistically ---------------------------------------------------------------
# A toy target/draft pair over V = 6 tokens, K = 3 drafts. The target's distribution p[j] at
# output position j does not depend on earlier tokens, so every emitted token at position j
# must follow p[j] exactly, whatever q is.
P = torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.07, 0.03],
                  [0.05, 0.05, 0.40, 0.10, 0.10, 0.30],
                  [0.60, 0.10, 0.10, 0.10, 0.05, 0.05],
                  [0.10, 0.10, 0.10, 0.10, 0.10, 0.50]])
Q = torch.tensor([[0.05, 0.10, 0.10, 0.15, 0.30, 0.30],
                  [0.30, 0.30, 0.10, 0.10, 0.10, 0.10],
                  [0.10, 0.10, 0.10, 0.10, 0.30, 0.30]])
TRIALS = 6000


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs``: P(X >= x) for df = V - 1."""
    n = counts.sum()
    expected = n * probs.double()
    x = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((probs.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, x / 2))


def emitted_counts(deterministic: bool, seed: int = 0) -> torch.Tensor:
    """[K + 1, V] histogram of the token emitted at each output position over TRIALS rounds."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(P.shape, dtype=torch.long)
    fixed = [0, 2, 0]                      # a deterministic draft: q is one-hot on these
    for _ in range(TRIALS):
        if deterministic:
            drafts, q = fixed, None
        else:
            drafts, q = [int(torch.multinomial(Q[i], 1, generator=g)) for i in range(3)], Q
        n, tok = verify_sampled(P, q, drafts, g)
        for j, x in enumerate(drafts[:n] + [tok]):
            counts[j, x] += 1
    return counts


@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled-q", "one-hot-q"])
def test_emitted_tokens_follow_the_target_distribution(deterministic):
    counts = emitted_counts(deterministic)
    for j in range(P.shape[0]):
        assert counts[j].sum() > 300, j    # every position is reached often enough to test
        pv = chi_square_pvalue(counts[j], P[j])
        assert pv > 1e-3, (j, pv, counts[j].tolist())


@pytest.mark.parametrize("wrong", ["resample-from-p", "accept-always"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled-q", "one-hot-q"])
def test_the_same_test_rejects_a_wrong_rule(monkeypatch, wrong, deterministic):
    """The statistical test has the power to see a broken rule: swap one piece of the
    rule for a plausible mistake and the emitted tokens no longer follow p."""
    if wrong == "resample-from-p":   # on rejection, draw from p instead of max(0, p - q)
        monkeypatch.setattr(core, "residual_distribution", lambda p, q, token: p)
    else:                            # take every draft token
        monkeypatch.setattr(core, "acceptance_probability", lambda p_x, q_x: torch.tensor(1.0))
    counts = emitted_counts(deterministic)
    worst = min(chi_square_pvalue(counts[j], P[j]) for j in range(P.shape[0])
                if counts[j].sum() > 0)
    assert worst < 1e-6, worst


# ---- the rule, on constructed cases ---------------------------------------------------------
def onehot(i, V=5):
    return torch.nn.functional.one_hot(torch.tensor(i), V).float()


def test_verify_sampled_constructed_cases():
    """Each case has one possible outcome (or, in the last, two known ones)."""
    g = torch.Generator().manual_seed(0)
    # p certain of every draft (q one-hot): all accepted, the bonus comes from p[k]
    p = torch.stack([onehot(1), onehot(2), onehot(4)])
    assert verify_sampled(p, None, [1, 2], g) == (2, 4)
    # p gives the second draft zero probability: rejected there; the residual (p without
    # the draft) is one-hot on 3
    p = torch.stack([onehot(1), onehot(3), onehot(0)])
    assert verify_sampled(p, None, [1, 2], g) == (1, 3)
    # sampled q. Position 0: p(1) = 0.8 >= q(1) = 0.5, accepted with probability 1.
    # Position 1: p(2) = 0 < q(2), rejected with probability 1; the correction comes from
    # normalize(max(0, p - q)) = one-hot on 3, although p itself would give 0 or 1 a fifth
    # of the time (resampling from p is the classic mistake).
    p = torch.tensor([[0.2, 0.8, 0, 0, 0], [0.1, 0.1, 0, 0.8, 0], [0, 0, 0, 0, 1.0]])
    q = torch.tensor([[0.5, 0.5, 0, 0, 0], [0.1, 0.1, 0.8, 0, 0]])
    for _ in range(50):
        assert verify_sampled(p, q, [1, 2], g) == (1, 3)
    # the same first position alone: accepted, then the bonus from p[1] = one-hot on 4
    assert verify_sampled(p[[0, 2]], q[:1], [1], g) == (1, 4)
    # Accepted with probability p(1) / q(1) = 0.5: accepted -> bonus 4 from p[1]; rejected ->
    # the residual max(0, p - q) = (0.5, 0, 0, 0, 0), one-hot on 0. Nothing else may come out.
    p = torch.stack([torch.tensor([0.5, 0.5, 0, 0, 0]), onehot(4)])
    q = onehot(1)[None]
    outcomes = Counter(verify_sampled(p, q, [1], g) for _ in range(400))
    assert set(outcomes) == {(0, 0), (1, 4)}, outcomes
    assert abs(outcomes[(1, 4)] / 400 - 0.5) < 0.1, outcomes     # 4 standard deviations


def test_residual_distribution_is_the_normalized_positive_part():
    """normalize(max(0, p - q)), checked against a float64 numpy computation: non-negative,
    sums to one, zero wherever q >= p; q None means one-hot on the token."""
    g = torch.Generator().manual_seed(0)
    for V in (2, 7, 300):
        for _ in range(10):
            p = torch.softmax(2 * torch.randn(V, generator=g), -1)
            q = torch.softmax(2 * torch.randn(V, generator=g), -1)
            tok = int(torch.multinomial(q, 1, generator=g))
            r = residual_distribution(p, q, tok)
            want = np.maximum(p.double().numpy() - q.double().numpy(), 0)
            want /= want.sum()
            assert (r >= 0).all() and float(r.sum()) == pytest.approx(1.0, abs=1e-6)
            assert (r[q >= p] == 0).all()
            np.testing.assert_allclose(r.double().numpy(), want, rtol=1e-5, atol=1e-7)
            # q = None (a deterministic draft) is q one-hot on the token: p without it
            r1 = residual_distribution(p, None, tok)
            want1 = p.double().numpy().copy()
            want1[tok] = 0
            np.testing.assert_allclose(r1.double().numpy(), want1 / want1.sum(), rtol=1e-5,
                                       atol=1e-7)
            torch.testing.assert_close(r1, residual_distribution(p, onehot(tok, V), tok))


def test_residual_distribution_when_p_equals_q():
    """Nothing is left of max(0, p - q): a rejection had probability 0, and the documented
    fallback returns p itself (never NaN from 0 / 0); with p one-hot on the drafted token and
    q None, the same."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    nudged = p.clone()            # equal up to one float32 ulp in two places
    nudged[1] = torch.nextafter(p[1], torch.tensor(1.0))
    nudged[3] = torch.nextafter(p[3], torch.tensor(0.0))
    for q in (p.clone(), nudged):
        r = residual_distribution(p, q, 2)
        assert torch.isfinite(r).all() and (r >= 0).all()
        assert float(r.sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(residual_distribution(p, p.clone(), 2), p)
    torch.testing.assert_close(residual_distribution(onehot(3, 4), None, 3), onehot(3, 4))


def test_verify_greedy_counts_the_matching_prefix():
    logits = torch.stack([onehot(3), onehot(1), onehot(2), onehot(0)])
    assert verify_greedy(logits, [3, 1, 2]) == (3, 0)      # all accepted + bonus
    assert verify_greedy(logits, [3, 4, 2]) == (1, 1)      # the target's token at the miss
    assert verify_greedy(logits[:1], []) == (0, 3)         # nothing drafted: a plain step


def test_expected_tokens_per_step():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_step(1.5, 4)


# ---- the loop on tiny models -----------------------------------------------------------------
@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def other():
    """A different random model with the same vocabulary: a draft that is often wrong."""
    return tiny_model(seed=1)


PROMPT = [5, 17, 42, 5, 17, 99, 3, 5, 17]


class ScriptedDraft(Draft):
    """Proposes, round r, script[r][0] correct tokens of ``truth`` then script[r][1] wrong
    ones: a draft whose acceptance we know in advance."""
    name = "scripted"

    def __init__(self, truth, script):
        self.truth, self.script, self.round = truth, script, 0

    def propose(self, context, k, params, generator):
        right, wrong = self.script[self.round]
        self.round += 1
        at = len(context) - len(PROMPT)
        good = self.truth[at:at + right]
        bad = [(self.truth[at + right] + 1) % 300] * wrong if wrong else []
        return (good + bad)[:k], None


def test_bookkeeping_is_exact_on_a_scripted_draft(target):
    ref = generate_ids(target, [PROMPT], 12, ignore_eos=True)[0]
    # rounds: 3 right (all accepted: bonus) / 1 right + 2 wrong / 3 wrong / nothing drafted /
    # 2 right (the budget allows only 2 drafts: 12 - 9 - 1; all accepted: bonus)
    draft = ScriptedDraft(ref, [(3, 0), (1, 2), (0, 3), (0, 0), (3, 0)])
    out = generate_speculative(target, draft, PROMPT, k=3, max_new_tokens=12)
    assert out.tokens == ref
    s = out.stats
    assert [(len(r.drafted), r.accepted, r.bonus, len(r.emitted)) for r in out.rounds] == \
        [(3, 3, True, 4), (3, 1, False, 2), (3, 0, False, 1), (0, 0, False, 1), (2, 2, True, 3)]
    assert (s.steps, s.drafted, s.accepted, s.bonus, s.new_tokens) == (5, 11, 6, 2, 12)
    assert s.accepted_per_step == [3, 1, 0, 0, 2]
    assert s.drafted_per_position == [4, 3, 1] and s.accepted_per_position == [3, 2, 1]
    assert s.alpha == pytest.approx(6 / 11) and s.alpha_cond == pytest.approx(6 / 8)
    assert s.tokens_per_step == pytest.approx(11 / 5)


def test_stop_token_inside_accepted_drafts_ends_the_output(target):
    ref = generate_ids(target, [PROMPT], 12, ignore_eos=True)[0]
    stop = ref[5]
    want = generate_ids(target, [PROMPT], 12, stop_token_ids=[stop])[0]
    assert want[-1] == stop and len(want) <= 6
    out = generate_speculative(target, ScriptedDraft(ref, [(4, 0)] * 6), PROMPT, k=4,
                               max_new_tokens=12, eos_ids=[stop])
    assert out.tokens == want
    assert out.stats.new_tokens == len(want)


@pytest.mark.parametrize("make", ["prompt-lookup", "other-model", "early-exit", "head"])
def test_greedy_speculative_equals_plain_greedy_on_a_tiny_model(target, other, make):
    draft = {"prompt-lookup": lambda: PromptLookupDraft(),
             "other-model": lambda: ModelDraft(other),
             "early-exit": lambda: early_exit_draft(target, 1),
             "head": lambda: HeadDraft(target, init_head(DraftHead(head_config(
                 target.config, 32)), target), torch.arange(0, 300, 2))}[make]()
    ref = generate_ids(target, [PROMPT], 24, ignore_eos=True)[0]
    for k in (1, 3):
        out = generate_speculative(target, draft, PROMPT, k=k, max_new_tokens=24)
        assert out.tokens == ref, (make, k)
        assert out.stats.new_tokens == 24 and out.stats.steps >= 24 / (k + 1)


def _plain_cache(model, tokens, cache_len):
    cache = KVCache(model.config, 1, cache_len)
    model.run(torch.tensor([tokens]), cache)
    return cache


def _assert_same_prefix(cache, ref, n):
    assert int(cache.lengths[0]) == n == int(ref.lengths[0])
    for a, b in zip(cache.k + cache.v, ref.k + ref.v):
        torch.testing.assert_close(a[:, :, :n], b[:, :, :n], rtol=1e-5, atol=1e-5)


def test_caches_after_rollback_equal_plain_caches(target):
    """Sampling with the early-exit draft (rejections at every position): after each
    round the target's cache (and the draft's) holds exactly what plain decoding of the
    accepted tokens would have put there."""
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=3, ignore_eos=True)
    dec = SpeculativeDecoder(target, early_exit_draft(target, 1), k=3, params=params)
    dec.start(PROMPT)
    rejected_at = set()
    while not dec.finished:
        r = dec.step()
        if r.accepted < len(r.drafted):
            rejected_at.add(r.accepted)
        n = len(dec.tokens) - 1          # the last token is pending: not in the cache yet
        _assert_same_prefix(dec.cache, _plain_cache(target, dec.tokens[:n], 64), n)
        if not dec.finished:
            d = dec.draft
            _assert_same_prefix(d.cache, _plain_cache(d.model, d.cached, 64), len(d.cached))
    assert rejected_at >= {0, 1, 2}      # rollbacks from every draft position were exercised


def test_head_cache_after_rollback_equals_a_fresh_head(target):
    """The head's cache keeps only pairs built from the target's true hidden states: after
    a few rounds it equals the cache of a head fed the whole accepted sequence at once."""
    head = init_head(DraftHead(head_config(target.config, 32)), target, seed=1)
    vocab = torch.arange(0, 300, 3)
    dec = SpeculativeDecoder(target, HeadDraft(target, head, vocab), k=3,
                             params=SamplingParams(temperature=1.0, max_tokens=30, seed=0,
                                                   ignore_eos=True))
    dec.start(PROMPT)
    for _ in range(5):
        dec.step()
    draft = dec.draft
    draft.propose(dec.tokens, 3, dec.params, None)        # feeds the queued true pairs
    n = draft.n_true
    assert n == len(dec.tokens) - 1
    _, hidden = target.run(torch.tensor([dec.tokens]), return_hidden=True)
    fresh = KVCache(head.config, 1, 64)
    head(hidden[:, :n], target.embed(torch.tensor([dec.tokens[1:n + 1]])), fresh)
    draft.cache.truncate([n])
    _assert_same_prefix(draft.cache, fresh, n)


def test_early_exit_view_shares_the_targets_tensors(target):
    view = early_exit_view(target, 1)
    assert view.config.num_layers == 1 and len(view.layers) == 1
    assert view.layers[0] is target.layers[0] and view.embed is target.embed
    assert view.norm is target.norm and view.lm_head is target.lm_head
    assert all(not p.is_meta for p in view.parameters())
    ids = torch.tensor([PROMPT])
    assert view.run(ids).shape == target.run(ids).shape


def test_prompt_lookup_proposes_the_latest_match():
    d = PromptLookupDraft(max_ngram=2)
    g = SamplingParams.greedy()
    assert d.propose([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3, g, None) == ([4, 7, 1], None)
    assert d.propose([1, 2, 3, 4], 3, g, None) == ([], None)        # no earlier match
    assert d.propose([5, 6, 5], 4, g, None) == ([6, 5], None)        # capped by the context


# ---- bad arguments ---------------------------------------------------------------------------
def test_bad_arguments(target):
    draft = PromptLookupDraft()
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k .*int >= 1"):
            SpeculativeDecoder(target, draft, k=k)
    with pytest.raises(TypeError, match="Draft"):
        SpeculativeDecoder(target, object())
    small = tiny_model(seed=2, vocab_size=200)
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeDecoder(target, ModelDraft(small))
    with pytest.raises(ValueError, match="n=2"):
        SpeculativeDecoder(target, draft, params=SamplingParams(n=2))
    with pytest.raises(ValueError, match="stop strings"):
        SpeculativeDecoder(target, draft, params=SamplingParams(stop="x"))
    with pytest.raises(ValueError, match="empty prompt"):
        generate_speculative(target, draft, [])
    with pytest.raises(ValueError, match="n_layers"):
        early_exit_view(target, target.config.num_layers)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDraft(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match=r"\[k \+ 1, V\]"):
        verify_sampled(torch.ones(2, 5) / 5, None, [1, 2])
    with pytest.raises(ValueError, match="q must be"):
        verify_sampled(torch.ones(3, 5) / 5, torch.ones(2, 4) / 4, [1, 2])
    with pytest.raises(ValueError, match="positive probability"):
        verify_sampled(torch.ones(2, 5) / 5, onehot(0)[None], [1])
    narrow = dataclasses.replace(head_config(target.config, 8), hidden_size=32, head_dim=8)
    with pytest.raises(ValueError, match="hidden size"):
        HeadDraft(target, DraftHead(narrow), torch.arange(10))
    with pytest.raises(ValueError, match="vocab_ids"):
        HeadDraft(target, DraftHead(head_config(target.config, 8)), torch.tensor([0, 300]))

    class Liar(Draft):
        def propose(self, context, k, params, generator):
            return [1] * (k + 1), None
    with pytest.raises(ValueError, match="at most"):
        generate_speculative(target, Liar(), PROMPT, k=2)


# ---- head files ------------------------------------------------------------------------------
def test_head_file_round_trip_and_damage(target, tmp_path):
    from tinyserve.model import WeightsError
    from tinyserve.speculative import load_head, read_head_metadata, save_head
    head = init_head(DraftHead(head_config(target.config, 32)), target, seed=3)
    vocab = torch.tensor([0, 5, 17, 42, 299])
    path = save_head(tmp_path / "h.safetensors", head, vocab, target.config,
                     record={"curve": [1, 2]}, dtype=torch.float32)
    loaded, ids, meta = load_head(path, target)
    assert torch.equal(ids, vocab) and meta["record"] == {"curve": [1, 2]}
    for (n, a), (_, b) in zip(head.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
    assert read_head_metadata(path)["target"]["vocab_size"] == 300

    with pytest.raises(FileNotFoundError, match="train-head"):
        load_head(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_head(junk)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])          # header intact, tensor data truncated
    with pytest.raises(ValueError, match=str(cut)):
        load_head(cut)
    from safetensors.torch import save_file
    other_file = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other_file))
    with pytest.raises(ValueError, match="not a tinyserve draft head"):
        load_head(other_file)
    wide = tiny_model(seed=0, vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size 300"):
        load_head(path, wide)
    # a file whose tensors do not fit its own config
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta_raw, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["head.fc.weight"] = tensors["head.fc.weight"][:, :10].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta_raw)
    with pytest.raises(WeightsError, match="fc.weight"):
        load_head(bad)


# ---- the bench's GPU mode -------------------------------------------------------------------
def _gpu_mode(tmp_path, device):
    """The GPU mode on the ``tiny`` shape: recorded fields consistent with each other (never
    how fast anything is). On the CPU it runs without CUDA graphs."""
    import argparse
    import json

    from tinyserve.bench import speculative as bench
    from tinyserve.bench.speculative_gpu import run_gpu
    cpu_rows = [{"task": "chat", "draft": d, "k": 2, "alpha_cond": 0.5, "tokens_per_step": 1.75,
                 "draft_s": 0.01, "drafted": 10} for d in ("prompt-lookup", "early-exit:1",
                                                          "int4", "head")]
    alpha_file = tmp_path / "cpu.json"
    alpha_file.write_text(json.dumps({"runs": cpu_rows}))
    # K: those of the CPU file; "none" has nothing to time on a GPU and is left out
    args = argparse.Namespace(k=None, drafts="none,prompt-lookup,early-exit:1,int4,head",
                              gpu_models="tiny", alpha_from=str(alpha_file), repeats=2)
    res = run_gpu(args, torch.device(device), {"gpu": None})
    assert res["config"]["ks"] == [2] and "none" not in res["config"]["drafts"]
    shape = res["shapes"][0]
    assert shape["model"] == "tiny" and shape["target_step"]["eager_s"] > 0
    for d in ("early-exit:1", "int4", "head"):
        assert shape["drafts"][d]["eager_s"] > 0, shape["drafts"][d]
    assert len(res["predicted"]) == 4 and res["alpha_source"]["file"] == str(alpha_file)
    modes = ("eager", "graph") if device == "cuda" else ("eager",)
    for r in res["predicted"]:
        for mode in modes:
            step = shape["target_step"][f"{mode}_s"]
            d = shape["drafts"][r["draft"]]
            t_draft = (0.01 / 10 if r["draft"] == "prompt-lookup"
                       else d.get(f"{mode}_s") or d["eager_s"])
            assert r[f"predicted_speedup_{mode}"] == pytest.approx(
                1.75 * step / (shape["verify_s"][2] + 2 * t_draft))
            assert r[f"draft_cost_{mode}"] == pytest.approx(t_draft / step)
    assert "speedup" in bench.report({**res, "env": {"gpu": device}})
    return res


def test_bench_gpu_mode_harness_on_the_cpu(tmp_path):
    res = _gpu_mode(tmp_path, "cpu")
    assert res["shapes"][0]["target_step"]["graph_s"] is None     # no CUDA graphs on the CPU
    assert all(r["predicted_speedup_graph"] is None for r in res["predicted"])


def test_bench_gpu_mode_budget_skips_and_says_so(tmp_path):
    import argparse

    from tinyserve.bench.speculative_gpu import run_gpu
    args = argparse.Namespace(k="2", drafts="early-exit:1", gpu_models="tiny,tiny-mha",
                              alpha_from=str(tmp_path / "none.json"), repeats=1, budget_s=0.0)
    res = run_gpu(args, torch.device("cpu"), {"gpu": None})
    assert [s.get("skipped") for s in res["shapes"]] == ["time budget spent"] * 2
    assert res["predicted"] == [] and res["alpha_source"]["file"] is None


@pytest.mark.gpu
def test_bench_gpu_mode_on_cuda(tmp_path):
    res = _gpu_mode(tmp_path, "cuda")
    shape = res["shapes"][0]
    assert shape["target_step"]["graph_s"] > 0
    assert shape["drafts"]["early-exit:1"]["graph_s"] > 0 and shape["drafts"]["int4"]["graph_s"] > 0
