"""Sampled speculative decoding reproduces the target's distribution end to end.

test_speculative.py checks the rule on toy distributions; here the whole loop runs on a tiny
random model (tests/_fixtures.py) with temperature 1 and top-k 4, with the prompt-lookup,
early-exit and trained-head-shaped drafts, and the tokens it emits are compared with the
target's own conditional distributions by a chi-square test. A draft that reports q wrongly
(here: a head whose q ignores top-k, i.e. spreads over the wrong support) fails the same test.

The test. A continuation x1..x4 has probability p(x1) p(x2 | x1) p(x3 | x1 x2) p(x4 | x1 x2 x3)
under the target, so the samples form a tree of prefixes. At every prefix the counts of the next
token are multinomial(n_prefix, p(. | prefix)) when the output follows the target; Pearson's
statistic of each prefix is then asymptotically chi-square with (cells - 1) degrees of
freedom, and as the multinomial factorizes over the tree, the statistics of all prefixes add up
to one chi-square with the summed degrees of freedom. Cells whose expected count is below 5 are
pooled (Cochran's rule: the chi-square approximation holds when every expected count is >= 5);
a prefix where fewer than two cells remain is not tested. p(. | prefix) comes from a plain
forward of the target over prompt + prefix, independently of the speculative loop. A token the
target gives probability 0 (outside its top-k) fails at once.

The threshold: a correct implementation fails with probability ALPHA = 1e-3 per draft for a
random seed; the seeds are fixed, so a run is reproducible. The broken draft gave p-values from
1e-9 to 1e-6 at this sample size on the four seed sets tried while writing this test, and the
correct head p-values spread over (0.1, 0.85) on eight; the check below asks for < ALPHA / 10.
"""
import dataclasses
from collections import Counter, defaultdict

import pytest
import torch

from _fixtures import tiny_model
from tinyserve.generate import generate_ids
from tinyserve.sampling import SamplingParams, logits_to_probs
from tinyserve.speculative import (DraftHead, HeadDraft, PromptLookupDraft, early_exit_draft,
                                   generate_speculative, head_config)
from tinyserve.speculative import head as head_module
from tinyserve.speculative.head import init_head

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA = 1e-3
SAMPLES = 300            # continuations per draft
NEW = 4                  # x1 from the prefill; x2..x4 from one round of K = 2 drafts + its bonus
                         # token, or from further rounds after a rejection
K = 2
MIN_EXPECTED = 5.0


def params(seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_k=4, max_tokens=NEW, seed=seed)


@pytest.fixture(scope="module")
def target():
    """A tiny random model whose second layer is scaled down, so that its first layer decides
    most of the next token: the early exit and a head built from that layer then agree with
    it often enough that acceptances, rejections and bonus tokens all occur many times."""
    m = tiny_model(seed=0)
    with torch.no_grad():
        m.layers[1].attn.wo.weight.mul_(0.2)
        m.layers[1].mlp.w_down.weight.mul_(0.2)
    return m


@pytest.fixture(scope="module")
def prompt(target):
    """A prompt followed by the target's own greedy continuation: prompt lookup then finds
    matches for the tokens the target is likely to sample, and proposes what followed."""
    base = [5, 17, 42, 5, 17, 99, 3, 5, 17]
    return base + generate_ids(target, [base], 20, ignore_eos=True)[0]


def make_draft(name: str, target):
    if name == "prompt-lookup":
        return PromptLookupDraft()
    if name == "early-exit":
        return early_exit_draft(target, 1)
    # The head starts as the target's first layer (init_head); its draft vocabulary leaves out
    # a third of the ids, among them tokens the target samples often (267, 126, 21 here), so
    # q is zero on part of p's support, as with the committed head's frequency cut.
    ids = torch.arange(target.config.vocab_size)
    head = init_head(DraftHead(head_config(target.config)), target)
    return HeadDraft(target, head, ids[ids % 3 != 0])


def sample_continuations(target, draft, prompt):
    """SAMPLES continuations of NEW tokens with seeds 0.. -> (samples, what the rounds did)."""
    samples, seen = [], Counter()
    for seed in range(SAMPLES):
        out = generate_speculative(target, draft, prompt, k=K, params=params(seed))
        assert len(out.tokens) == NEW
        samples.append(tuple(out.tokens))
        for r in out.rounds:
            seen["accepted"] += r.accepted
            seen["bonus"] += r.bonus
            if r.accepted < len(r.drafted):
                seen[f"rejected at {r.accepted}"] += 1
    return samples, seen


@torch.no_grad()
def tree_chi_square(target, prompt, samples):
    """-> (p-value, statistic, degrees of freedom, tested prefixes per depth); see the module
    docstring. p-value: P(chi-square(df) >= statistic), torch's regularized upper gamma."""
    nodes = defaultdict(Counter)
    for s in samples:
        for j, x in enumerate(s):
            nodes[s[:j]][x] += 1
    stat, df, depths = 0.0, 0, Counter()
    for prefix, counts in nodes.items():
        n = sum(counts.values())
        logits = target.run(torch.tensor([list(prompt) + list(prefix)]))[0, -1:]
        p = logits_to_probs(logits, params(0))[0].double()
        if any(p[x] == 0 for x in counts):        # emitted a token the target never samples
            return 0.0, float("inf"), df, depths
        expected = n * p
        kept = (expected >= MIN_EXPECTED).nonzero().flatten().tolist()
        obs = torch.tensor([counts.get(x, 0) for x in kept], dtype=torch.float64)
        exp = expected[kept]
        rest_obs, rest_exp = n - obs.sum(), n - exp.sum()
        if rest_exp >= MIN_EXPECTED:
            obs, exp = torch.cat([obs, rest_obs[None]]), torch.cat([exp, rest_exp[None]])
        elif kept and rest_exp > 0:               # too little left over: join the smallest cell
            i = int(exp.argmin())
            obs[i] += rest_obs
            exp[i] += rest_exp
        if len(obs) < 2:
            continue
        stat += float(((obs - exp) ** 2 / exp).sum())
        df += len(obs) - 1
        depths[len(prefix)] += 1
    pv = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                       torch.tensor(stat / 2, dtype=torch.float64)))
    return pv, stat, df, depths


@pytest.mark.parametrize("name", ["prompt-lookup", "early-exit", "head"])
def test_sampled_speculative_output_follows_the_target(target, prompt, name):
    samples, seen = sample_continuations(target, make_draft(name, target), prompt)
    # The loop's every path ran many times: accepted drafts, rejections at both draft
    # positions (residual samples), all-accepted rounds (bonus tokens).
    assert seen["accepted"] >= 30 and seen["bonus"] >= 10, seen
    assert seen["rejected at 0"] >= 30 and seen["rejected at 1"] >= 10, seen
    pv, stat, df, depths = tree_chi_square(target, prompt, samples)
    # x2 and x3 (the drafted positions) are tested at several prefixes each, not only x1
    assert depths[1] >= 3 and depths[2] >= 5, depths
    assert pv > ALPHA, (name, pv, stat, df, dict(depths))


def test_the_same_test_fails_a_head_that_reports_q_over_the_wrong_support(target, prompt,
                                                                        monkeypatch):
    """The head draws each token from the top-4 of its draft vocabulary but reports q over
    the whole draft vocabulary (top-k left out of q): q(x) is then too small for the token it
    proposed, the rule accepts it too often and its residual is wrong."""
    real_draw = head_module.draw

    def draw_reporting_wrong_q(logits, p, generator):
        tok, _ = real_draw(logits, p, generator)
        return tok, logits_to_probs(logits[None], dataclasses.replace(p, top_k=-1))[0]

    monkeypatch.setattr(head_module, "draw", draw_reporting_wrong_q)
    samples, _ = sample_continuations(target, make_draft("head", target), prompt)
    pv, stat, df, depths = tree_chi_square(target, prompt, samples)
    assert pv < ALPHA / 10, (pv, stat, df, dict(depths))
