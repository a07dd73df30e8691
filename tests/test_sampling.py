"""Tests for tinyserve.sampling: parameter validation, logit masks, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from tinyserve.sampling import (
    SamplingParams,
    apply_temperature,
    logits_to_probs,
    make_generator,
    min_p_mask,
    sample,
    top_k_mask,
    top_p_mask,
)

# Hand-built distribution: cumulative sums are 0.5, 0.7, 0.85, 0.95, 1.0.
P = [0.5, 0.2, 0.15, 0.1, 0.05]


def logits_of(probs, dtype=torch.float32) -> torch.Tensor:
    """A [1, V] row of logits whose softmax is ``probs``."""
    return torch.tensor(probs, dtype=torch.float64).log().to(dtype).unsqueeze(0)


def kept(masked: torch.Tensor) -> list[set[int]]:
    """Indices left finite in each row."""
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in masked]


def expected_probs(weights) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return (w / w.sum()).unsqueeze(0)


def assert_probs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- #
# SamplingParams
# --------------------------------------------------------------------------- #


def test_defaults_match_vllm():
    sp = SamplingParams()
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.max_tokens) == (1, 1.0, 1.0, -1, 0.0, 16)
    assert sp.stop == [] and sp.stop_token_ids == []
    assert sp.seed is None and sp.ignore_eos is False
    assert not sp.is_greedy


def test_normalisation():
    assert SamplingParams(top_k=0).top_k == -1
    assert SamplingParams(top_k=-1).top_k == -1
    assert SamplingParams(top_k=1).top_k == 1
    assert SamplingParams(stop="\n").stop == ["\n"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop_token_ids=(0, 7)).stop_token_ids == [0, 7]
    # Boundary values that are allowed.
    SamplingParams(top_p=1.0, min_p=0.0, temperature=0.0, max_tokens=1, n=1)
    SamplingParams(top_p=1e-9, min_p=1.0)


def test_greedy():
    sp = SamplingParams.greedy(max_tokens=5)
    assert sp.is_greedy and sp.temperature == 0.0 and sp.max_tokens == 5
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy
    assert SamplingParams.greedy(max_tokens=3, stop="x").stop == ["x"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_p", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", float("nan")),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", 2.0),
        ("temperature", -1),
        ("temperature", -1e-9),
        ("temperature", float("inf")),
        ("temperature", float("nan")),
        ("n", 0),
        ("n", -3),
        ("min_p", 2),
        ("min_p", -0.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("stop", 5),
        ("stop", b"bytes"),
        ("stop", ["ok", 3]),
        ("stop", [None]),
        ("stop", ""),
        ("stop", ["a", ""]),
        ("stop", {"a"}),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["2"]),
        ("stop_token_ids", 2),
        ("seed", "42"),
    ],
)
def test_validation_error_names_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert field in msg
    # The offending value is shown (for list-valued fields, the bad element).
    bad = value[-1] if isinstance(value, list) else value
    assert repr(bad) in msg


@pytest.mark.parametrize("value", [0, -1])
def test_max_tokens_message(value):
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=value)


# --------------------------------------------------------------------------- #
# Masks on the hand-built distribution
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "k, expected",
    [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (5, set(range(5))), (99, set(range(5))), (-1, set(range(5))), (0, set(range(5)))],
)
def test_top_k(k, expected):
    assert kept(top_k_mask(logits_of(P), k)) == [expected]


def test_top_k_keeps_ties_with_kth():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert kept(top_k_mask(logits, 1)) == [{1, 2}]
    assert kept(top_k_mask(logits, 2)) == [{1, 2}]
    assert kept(top_k_mask(logits, 3)) == [{0, 1, 2}]


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.5, {0}),  # top token alone reaches exactly 0.5
        (0.49, {0}),
        (0.01, {0}),  # the top token is always kept
        (0.51, {0, 1}),
        (0.7, {0, 1}),  # 0.5 + 0.2 reaches 0.7 exactly: token 2 is not needed
        (0.71, {0, 1, 2}),
        (0.85, {0, 1, 2}),
        (0.95, {0, 1, 2, 3}),
        (0.96, set(range(5))),
        (1.0, set(range(5))),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_p(p, expected, dtype):
    assert kept(top_p_mask(logits_of(P, dtype), p)) == [expected]


@pytest.mark.parametrize(
    "min_p, expected",
    [
        (0.0, set(range(5))),
        (0.1, set(range(5))),  # threshold 0.05: the smallest token sits exactly on it
        (0.11, {0, 1, 2, 3}),
        (0.3, {0, 1, 2}),  # threshold 0.15: token 2 sits exactly on it
        (0.31, {0, 1}),
        (0.4, {0, 1}),
        (0.41, {0}),
        (1.0, {0}),
    ],
)
def test_min_p(min_p, expected):
    assert kept(min_p_mask(logits_of(P), min_p)) == [expected]


def test_min_p_one_keeps_ties_for_max():
    assert kept(min_p_mask(torch.tensor([[2.0, 0.0, 2.0]]), 1.0)) == [{0, 2}]


def test_masks_do_not_depend_on_token_position():
    perm = torch.tensor([3, 0, 4, 2, 1])  # new position j holds old token perm[j]
    logits = logits_of(P)[:, perm]

    def original(ids):
        return {int(perm[j]) for j in ids}

    assert original(kept(top_k_mask(logits, 2))[0]) == {0, 1}
    assert original(kept(top_p_mask(logits, 0.71))[0]) == {0, 1, 2}
    assert original(kept(min_p_mask(logits, 0.3))[0]) == {0, 1, 2}


def test_masks_ignore_already_masked_tokens():
    # After top-k removes tokens, top-p measures mass among the survivors only.
    logits = top_k_mask(logits_of(P), 2)  # survivors renormalise to 5/7, 2/7
    assert kept(top_p_mask(logits, 0.7)) == [{0}]
    assert kept(top_p_mask(logits, 0.72)) == [{0, 1}]


def test_masks_set_minus_inf_and_leave_kept_logits_and_input_untouched():
    logits = logits_of(P)
    before = logits.clone()
    for out in (top_k_mask(logits, 2), top_p_mask(logits, 0.7), min_p_mask(logits, 0.35)):
        assert torch.equal(out[0, :2], logits[0, :2])
        assert torch.all(out[0, 2:] == float("-inf"))
    assert torch.equal(logits, before)


def test_batch_rows_with_different_params():
    logits = logits_of(P).repeat(4, 1)
    assert kept(top_k_mask(logits, torch.tensor([1, 2, -1, 0]))) == [{0}, {0, 1}, set(range(5)), set(range(5))]
    assert kept(top_k_mask(logits, [4, 3, 2, 1])) == [{0, 1, 2, 3}, {0, 1, 2}, {0, 1}, {0}]
    assert kept(top_p_mask(logits, torch.tensor([0.5, 0.7, 0.71, 1.0]))) == [
        {0},
        {0, 1},
        {0, 1, 2},
        set(range(5)),
    ]
    assert kept(min_p_mask(logits, torch.tensor([0.0, 0.3, 0.31, 1.0]))) == [set(range(5)), {0, 1, 2}, {0, 1}, {0}]


def test_per_row_param_shape_is_checked():
    with pytest.raises(ValueError, match="per-row"):
        top_k_mask(logits_of(P).repeat(2, 1), torch.tensor([1, 2, 3]))


# --------------------------------------------------------------------------- #
# Temperature and probabilities
# --------------------------------------------------------------------------- #


def test_apply_temperature():
    logits = torch.tensor([[1.0, -2.0, 4.0], [1.0, -2.0, 4.0], [1.0, -2.0, 4.0]])
    out = apply_temperature(logits, torch.tensor([2.0, 0.5, 1.0]))
    assert torch.equal(out, torch.tensor([[0.5, -1.0, 2.0], [2.0, -4.0, 8.0], [1.0, -2.0, 4.0]]))
    assert torch.equal(apply_temperature(logits, 4.0), logits / 4)
    # Greedy rows are left alone instead of being divided by zero.
    assert torch.equal(apply_temperature(logits, 0.0), logits)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 3.7])
def test_temperature_scales_probabilities(t):
    # softmax(log p / t) is proportional to p ** (1 / t).
    probs = logits_to_probs(logits_of(P), SamplingParams(temperature=t))
    assert_probs(probs, expected_probs([x ** (1 / t) for x in P]))


def test_temperature_limits():
    low = logits_to_probs(logits_of(P), SamplingParams(temperature=0.01))
    high = logits_to_probs(logits_of(P), SamplingParams(temperature=100.0))
    assert low[0, 0] > 1 - 1e-6
    assert torch.allclose(high, torch.full_like(high, 0.2), atol=0.01)


@pytest.mark.parametrize(
    "params, weights",
    [
        (SamplingParams(), P),
        (SamplingParams(top_k=2), [0.5, 0.2, 0, 0, 0]),
        (SamplingParams(top_p=0.7), [0.5, 0.2, 0, 0, 0]),
        (SamplingParams(top_p=0.71), [0.5, 0.2, 0.15, 0, 0]),
        (SamplingParams(top_p=0.5), [1, 0, 0, 0, 0]),
        (SamplingParams(min_p=0.3), [0.5, 0.2, 0.15, 0, 0]),
        # top-k first renormalises to P[:4] / 0.95 (cumsum .526, .737, .895),
        # then top-p 0.8 needs three tokens.
        (SamplingParams(top_k=4, top_p=0.8), [0.5, 0.2, 0.15, 0, 0]),
        # vLLM order: top-p runs on the top-k survivors (5/7, 2/7), so 0.7 is
        # reached by the first token alone; on the raw distribution it would keep two.
        (SamplingParams(top_k=2, top_p=0.7), [1, 0, 0, 0, 0]),
        # Temperature runs first: t=0.5 gives P**2 / 0.325 = [.769, .123, ...],
        # so top-p 0.7 keeps one token instead of two.
        (SamplingParams(temperature=0.5, top_p=0.7), [1, 0, 0, 0, 0]),
        # t=2 gives sqrt(P) / 2.031 = [.348, .220, .191, .156, .110]; top-k 4 then
        # min-p 0.5 drops only token 3 (0.156 / 0.348 = .447 < .5).
        (SamplingParams(temperature=2.0, top_k=4, min_p=0.5), [0.5**0.5, 0.2**0.5, 0.15**0.5, 0, 0]),
    ],
)
def test_logits_to_probs_renormalises_exactly(params, weights):
    assert_probs(logits_to_probs(logits_of(P), params), expected_probs(weights))


def test_logits_to_probs_batch_with_mixed_params():
    logits = logits_of(P).repeat(4, 1)
    params = [
        SamplingParams(top_k=2),
        SamplingParams(top_p=0.71),
        SamplingParams.greedy(),
        SamplingParams(temperature=2.0),
    ]
    expected = torch.cat(
        [
            expected_probs([0.5, 0.2, 0, 0, 0]),
            expected_probs([0.5, 0.2, 0.15, 0, 0]),
            expected_probs([1, 0, 0, 0, 0]),  # greedy rows are a one-hot on argmax
            expected_probs([x**0.5 for x in P]),
        ]
    )
    assert_probs(logits_to_probs(logits, params), expected)


def test_logits_to_probs_half_precision_input_gives_float32():
    for dtype in (torch.bfloat16, torch.float16):
        probs = logits_to_probs(logits_of(P, dtype), SamplingParams(top_k=3))
        assert probs.dtype == torch.float32
        assert torch.allclose(probs.sum(-1), torch.ones(1))
        assert kept(probs.log()) == [{0, 1, 2}]


def test_logits_to_probs_does_not_modify_input():
    logits = logits_of(P).repeat(2, 1)
    before = logits.clone()
    logits_to_probs(logits, [SamplingParams(temperature=0.3, top_k=2, top_p=0.9, min_p=0.1), SamplingParams.greedy()])
    assert torch.equal(logits, before)


# --------------------------------------------------------------------------- #
# sample()
# --------------------------------------------------------------------------- #


def test_greedy_equals_argmax():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    tokens = sample(logits, SamplingParams.greedy())
    assert tokens.dtype == torch.long and tokens.shape == (8,)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_greedy_ignores_filters_and_breaks_ties_on_first_index():
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [7.0, 7.0, 7.0, 7.0]])
    params = SamplingParams(temperature=0.0, top_k=1, top_p=0.1, min_p=0.9)
    assert sample(logits, params).tolist() == [1, 0]
    assert sample(logits, params).tolist() == torch.argmax(logits, dim=-1).tolist()


def test_sample_never_picks_masked_tokens():
    logits = logits_of(P).repeat(2000, 1)
    g = make_generator(0)
    tokens = sample(logits, SamplingParams(top_k=2), [g] * 2000)
    assert set(tokens.tolist()) == {0, 1}


def test_make_generator():
    assert make_generator(None) is None
    a, b = make_generator(7), make_generator(7)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def _seeded_run(seed: int, logits: torch.Tensor, params: SamplingParams, steps: int = 50) -> list[int]:
    """Simulate one request decoding ``steps`` tokens with its own generator."""
    g = make_generator(seed)
    return [int(sample(logits, params, [g])[0]) for _ in range(steps)]


def test_fixed_seed_reproduces_exactly():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_p=0.95)
    first = _seeded_run(123, logits, params)
    torch.manual_seed(999)  # the global RNG must not matter
    assert _seeded_run(123, logits, params) == first
    assert len(set(first)) > 1  # really random, not a constant


def test_different_seeds_differ_on_flat_distribution():
    flat = torch.zeros(1, 1000)
    params = SamplingParams()
    runs = [_seeded_run(seed, flat, params, steps=20) for seed in (1, 2, 3)]
    assert runs[0] != runs[1] and runs[1] != runs[2] and runs[0] != runs[2]


def test_seeded_row_does_not_depend_on_batch_neighbours():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(seed=5), SamplingParams.greedy(), SamplingParams(), SamplingParams(temperature=1.5)]
    alone = sample(logits[:1], params[0], [make_generator(5)])
    batched = sample(logits, params, [make_generator(5), None, None, make_generator(9)])
    assert batched[0] == alone[0]
    assert batched[1] == logits[1].argmax()


def test_sample_argument_checks():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="SamplingParams"):
        sample(logits, [SamplingParams()])
    with pytest.raises(ValueError, match="generators"):
        sample(logits, SamplingParams(), [None])
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(torch.zeros(5), SamplingParams())


# --------------------------------------------------------------------------- #
# Sampling frequencies (chi-square goodness of fit)
# --------------------------------------------------------------------------- #


def chi2_critical(df: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of chi-square with an even ``df``.

    For even df the survival function has the closed form
    exp(-x/2) * sum_{i < df/2} (x/2)^i / i!, so we bisect it without scipy.
    """
    assert df % 2 == 0

    def sf(x: float) -> float:
        return math.exp(-x / 2) * sum((x / 2) ** i / math.factorial(i) for i in range(df // 2))

    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sf(mid) > alpha else (lo, mid)
    return hi


def test_chi2_critical_values():
    # Textbook table values.
    assert chi2_critical(2, 0.001) == pytest.approx(13.816, abs=1e-3)
    assert chi2_critical(4, 0.001) == pytest.approx(18.467, abs=1e-3)


def chi2_statistic(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of observed ``counts`` against ``probs``.

    A token observed although ``probs`` gives it zero mass makes the fit
    impossible, so the statistic is infinite.
    """
    n = counts.sum()
    expected = n * probs.double()
    if bool((counts[expected == 0] > 0).any()):
        return math.inf
    support = expected > 0
    return float((((counts[support] - expected[support]) ** 2) / expected[support]).sum())


N_DRAWS = 4000
ALPHA = 0.001


def draw_counts(params: SamplingParams, seed: int) -> torch.Tensor:
    logits = logits_of(P).repeat(N_DRAWS, 1)
    g = make_generator(seed)
    tokens = sample(logits, params, [g] * N_DRAWS)
    return torch.bincount(tokens, minlength=len(P)).double()


def test_frequencies_match_masked_distribution():
    params = SamplingParams(top_p=0.71)
    masked = expected_probs([0.5, 0.2, 0.15, 0, 0])[0]
    unmasked = expected_probs(P)[0]
    counts = draw_counts(params, seed=0)
    threshold = chi2_critical(df=2, alpha=ALPHA)  # 3 categories in the support

    assert chi2_statistic(counts, masked) < threshold
    # The same threshold rejects the unmasked distribution, which would have
    # put about 15% of the draws on tokens 3 and 4.
    assert chi2_statistic(counts, unmasked) > threshold


def test_frequencies_detect_wrong_weights_on_the_same_support():
    # A sharper test than a support mismatch: temperature 2 + top-k 3 must give
    # sqrt(P[:3]) renormalised, and the check must reject the t=1 weights on the
    # very same three tokens.
    params = SamplingParams(temperature=2.0, top_k=3)
    right = expected_probs([0.5**0.5, 0.2**0.5, 0.15**0.5, 0, 0])[0]
    wrong = expected_probs([0.5, 0.2, 0.15, 0, 0])[0]
    counts = draw_counts(params, seed=1)
    threshold = chi2_critical(df=2, alpha=ALPHA)

    assert counts[3:].sum() == 0
    assert chi2_statistic(counts, right) < threshold
    assert chi2_statistic(counts, wrong) > threshold


def test_unmasked_draws_fail_the_masked_check():
    # Conversely, draws from the unfiltered distribution do not pass as
    # top-p-filtered ones, and do pass against the full distribution (df = 4).
    counts = draw_counts(SamplingParams(), seed=2)
    assert chi2_statistic(counts, expected_probs([0.5, 0.2, 0.15, 0, 0])[0]) > chi2_critical(2, ALPHA)
    assert chi2_statistic(counts, expected_probs(P)[0]) < chi2_critical(4, ALPHA)


# --------------------------------------------------------------------------- #
# GPU
# --------------------------------------------------------------------------- #


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_seed_reproduces():
    logits = logits_of(P).repeat(3, 1)
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.71), SamplingParams(temperature=2.0, min_p=0.5)]
    torch.testing.assert_close(logits_to_probs(logits.cuda(), params).cpu(), logits_to_probs(logits, params))
    gpu_logits = torch.randn(2, 1000, device="cuda")
    runs = [
        sample(gpu_logits, SamplingParams(), [make_generator(3, "cuda"), make_generator(4, "cuda")]).tolist()
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert torch.equal(sample(gpu_logits, SamplingParams.greedy()), gpu_logits.argmax(-1))
