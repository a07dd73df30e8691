"""The speculative decoding loop and its exact accept/reject rule (batch 1).

One round, with the sequence S so far (its last token is not yet in the target's KV cache):

    draft     proposes d1..dk (k <= K) and, unless deterministic, the distributions q1..qk
              it drew them from
    verify    ONE target forward over [S[-1], d1..dk]: k + 1 positions -> p1..p(k+1), where
              p(i) is the target's distribution for the token after d(i-1) (d0 = S[-1])
    accept    d1, d2, ... in order, each with probability min(1, p(di) / q(di)); at the first
              rejection sample the token from normalize(max(0, p(i) - q(i))) and stop; if all
              k are accepted sample a bonus token from p(k+1)
    rollback  the target cache keeps S + accepted drafts; the draft rolls back its own state

Every round emits accepted + 1 tokens, and each emitted token is distributed exactly as the
target would have sampled it (Leviathan et al. 2023, Chen et al. 2023): for one position,
P(emit x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) * residual(x) = min(p(x), q(x))
+ max(0, p(x) - q(x)) = p(x). p and q both come from ``tinyserve.sampling.logits_to_probs``
with the request's SamplingParams, so "the target's distribution" includes its temperature,
top-k, top-p and min-p, exactly what ``sample`` draws from.

A deterministic draft (prompt lookup, or any draft under greedy params) gives q = None: its
proposal is a function of the context, i.e. q is one-hot on the proposed token. Then the
acceptance probability is p(d), and the residual max(0, p - onehot(d)) is p with d removed.

Greedy (temperature 0) uses the same skeleton with argmax in place of the draws: accept while
the draft token equals the target's argmax, then emit the target's argmax. The emitted tokens
are those of plain greedy decoding (``tinyserve.generate.generate_ids``) as long as the
verify logits equal the one-token-at-a-time ones; they come from a wider matmul, so they can
differ in the last bits, which only matters at an exact argmax tie.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..generate import check_prompt
from ..kv_cache import KVCache
from ..sampling import SamplingParams, logits_to_probs, make_generator, sample
from .drafts import Draft


# ---- the rule ------------------------------------------------------------------------------
def acceptance_probability(p_x: torch.Tensor, q_x: torch.Tensor | float) -> torch.Tensor:
    """min(1, p(x) / q(x)) for a token the draft proposed (so q(x) > 0)."""
    return torch.clamp(p_x / q_x, max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """normalize(max(0, p - q)) over the vocabulary [V]; q None means one-hot on ``token``.

    Rejection only happens when p(token) < q(token); as p and q both sum to 1, the residual
    then has positive mass. Should rounding leave none (p == q up to float error, where a
    rejection had probability ~0), fall back to p, which is then the same distribution.
    """
    if q is None:
        r = p.clone()
        r[token] = 0.0                   # p - onehot(token), clamped at 0
    else:
        r = (p - q).clamp_min(0.0)
    total = r.sum()
    return r / total if total > 0 else p


def _draw(probs: torch.Tensor, generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_sampled(p: torch.Tensor, q: torch.Tensor | None, drafts: Sequence[int],
                   generator: torch.Generator | None = None) -> tuple[int, int]:
    """The exact rule. p: [k+1, V] target probabilities, q: [k, V] draft probabilities (or
    None: one-hot on the drafts), drafts: k token ids -> (accepted count n, next token).

    The next token is the residual sample at the first rejection, or the bonus from p[k].
    """
    k = len(drafts)
    if p.dim() != 2 or p.shape[0] != k + 1:
        raise ValueError(f"p must be [k + 1, V] = [{k + 1}, V], got {tuple(p.shape)}")
    if q is not None and tuple(q.shape) != (k, p.shape[1]):
        raise ValueError(f"q must be [k, V] = [{k}, {p.shape[1]}], got {tuple(q.shape)}")
    for i, d in enumerate(drafts):
        q_d = 1.0 if q is None else q[i, d]
        if q is not None and not q_d > 0:
            raise ValueError(f"draft token {d} at position {i} has q = {float(q_d)}: a draft "
                             f"must only propose tokens its q gives positive probability")
        u = torch.rand((), generator=generator, device=p.device)
        if u >= acceptance_probability(p[i, d], q_d):               # rejected
            return i, _draw(residual_distribution(p[i], None if q is None else q[i], d),
                            generator)
    return k, _draw(p[k], generator)                                 # all accepted: bonus


def verify_greedy(logits: torch.Tensor, drafts: Sequence[int]) -> tuple[int, int]:
    """Greedy rule. logits: [k+1, V] -> (accepted count n, the target's argmax after them)."""
    best = logits.argmax(-1).tolist()     # first index on ties, like sample()
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return n, best[n]


# ---- bookkeeping ---------------------------------------------------------------------------
@dataclass
class SpecStats:
    """What one generation did. A "step" is one target verify forward (the prefill that
    produces the first token is not a step: plain decoding pays it too)."""
    k: int
    steps: int = 0
    drafted: int = 0                     # draft tokens proposed (and verified)
    accepted: int = 0
    bonus: int = 0                       # steps where all k drafts were accepted
    new_tokens: int = 0                  # emitted, the first (prefill) token included
    accepted_per_step: list = field(default_factory=list)
    drafted_per_position: list = field(default_factory=list)    # [K]: proposals reaching i+1
    accepted_per_position: list = field(default_factory=list)   # [K]: ... and accepted there
    prefill_s: float = 0.0
    draft_s: float = 0.0                 # time in draft.propose / draft.commit
    target_s: float = 0.0                # time in verify forwards
    total_s: float = 0.0

    def __post_init__(self):
        self.drafted_per_position = self.drafted_per_position or [0] * self.k
        self.accepted_per_position = self.accepted_per_position or [0] * self.k

    @property
    def alpha(self) -> float | None:
        """Acceptance rate: accepted / drafted (drafts after a rejection count as drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def alpha_cond(self) -> float | None:
        """P(a draft token is accepted | every draft before it was): the alpha of the
        (1 - alpha^(k+1)) / (1 - alpha) formula, which assumes it is the same at every
        position. Higher than ``alpha``, which also counts the drafts a rejection wasted."""
        n = sum(self.drafted_per_position)
        return sum(self.accepted_per_position) / n if n else None

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens emitted per target verify step (the prefill's token excluded)."""
        return (self.new_tokens - 1) / self.steps if self.steps else None

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d.update(alpha=self.alpha, alpha_cond=self.alpha_cond,
                 tokens_per_step=self.tokens_per_step,
                 alpha_per_position=[a / n if n else None for a, n in
                                     zip(self.accepted_per_position, self.drafted_per_position)])
        return d


@dataclass
class Round:
    """One verify step, for display: the drafts, how many were accepted, the token the target
    added (residual sample, or bonus when ``bonus``), and what was emitted (stop-trimmed)."""
    drafted: list[int]
    accepted: int
    token: int
    bonus: bool
    emitted: list[int]


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha): tokens per verify step when each draft is accepted
    independently with probability alpha (Leviathan et al., eq. 1); k + 1 at alpha = 1."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return float(k + 1) if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


# ---- the loop ------------------------------------------------------------------------------
def _clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class SpeculativeDecoder:
    """Speculative generation of one sequence: ``start(prompt)``, then ``step()`` per round.

        dec = SpeculativeDecoder(model, PromptLookupDraft(), k=4)
        first = dec.start(prompt_ids)         # the prefill's token
        while not dec.finished: r = dec.step()  # a Round
        dec.tokens, dec.stats

    ``params`` (default greedy) are the request's SamplingParams: ``max_tokens``, their
    ``stop_token_ids`` and ``seed`` apply; ``eos_ids`` stop generation unless ``ignore_eos``.
    Stop strings need text, which this token-level loop does not have: rejected.
    """

    def __init__(self, model, draft: Draft, k: int = 4, params: SamplingParams | None = None,
                 eos_ids: Sequence[int] = ()):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k (draft tokens per step) must be an int >= 1, got {k!r}")
        if not isinstance(draft, Draft):
            raise TypeError(f"draft must be a tinyserve.speculative.Draft, got "
                            f"{type(draft).__name__}")
        params = SamplingParams.greedy() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            raise ValueError(f"speculative decoding runs one sample per request, got n={params.n}")
        if params.stop:
            raise ValueError("stop strings are not supported by the token-level speculative "
                             "loop; use stop_token_ids")
        if params.logits_processors:
            raise ValueError("logits_processors are not supported by speculative decoding: "
                             "verification compares the draft with the model's own distribution")
        V = model.config.vocab_size
        if draft.vocab_size is not None and draft.vocab_size != V:
            raise ValueError(f"draft vocabulary ({draft.vocab_size}) differs from the target's "
                             f"({V}): a draft must share the target's tokenizer")
        self.model, self.draft, self.k, self.params = model, draft, k, params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else
                                                      set(eos_ids))
        self.tokens: list[int] = []       # prompt + generated
        self.prompt_len, self.finished = 0, True

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @torch.no_grad()
    def start(self, prompt: Sequence[int]) -> int:
        """Prefill the target (and the draft); -> the first generated token."""
        m, dev = self.model, self.model.device
        check_prompt(prompt, m.config.max_position_embeddings)
        self.prompt_len = len(prompt)
        self.limit = min(self.params.max_tokens, m.config.max_position_embeddings - len(prompt))
        # Room for the whole sequence plus one verify's overshoot (k drafts past the end).
        max_len = len(prompt) + self.limit + self.k + 1
        self.cache = KVCache(m.config, 1, max_len, dtype=m.dtype, device=dev)
        self.generator = make_generator(self.params.seed, dev)
        self.stats = SpecStats(self.k)
        self._t0 = _clock(dev)
        uses_hidden = self.draft.uses_hidden
        out = m.run(torch.tensor([list(prompt)], device=dev), self.cache, last_only=True,
                return_hidden=uses_hidden)
        logits, hidden = out if uses_hidden else (out, None)
        first = int(sample(logits[:, 0], self.params, [self.generator])[0])  # as plain decoding
        self.tokens = [*prompt, first]
        self.stats.new_tokens = 1
        self.stats.prefill_s = _clock(dev) - self._t0
        self.finished = first in self.stop_ids or self.limit <= 1
        if not self.finished:
            t = time.perf_counter()
            self.draft.start(self.tokens, max_len, None if hidden is None else hidden[0])
            self.stats.draft_s += time.perf_counter() - t
        self._finish_time()
        return first

    def _finish_time(self):
        self.stats.total_s = _clock(self.model.device) - self._t0

    @torch.no_grad()
    def step(self) -> Round:
        """One draft + verify round; appends accepted + 1 tokens (fewer at a stop/limit)."""
        if self.finished:
            raise RuntimeError("the sequence is finished (or not started): call start()")
        m, st, dev = self.model, self.stats, self.model.device
        V = m.config.vocab_size
        # Each round emits up to k + 1 tokens: draft no more than the budget can take.
        k = min(self.k, self.limit - len(self.generated) - 1)
        drafts, q = [], None
        t = time.perf_counter()
        if k >= 1:
            drafts, q = self.draft.propose(self.tokens, k, self.params, self.generator)
            drafts = [int(d) for d in drafts]
            if len(drafts) > k or any(not 0 <= d < V for d in drafts):
                raise ValueError(f"draft proposed {drafts}: expected at most {k} ids in [0, {V})")
            if q is not None and tuple(q.shape) != (len(drafts), V):
                raise ValueError(f"draft q has shape {tuple(q.shape)}, expected "
                                 f"[{len(drafts)}, {V}]")
        t1 = _clock(dev)
        st.draft_s += t1 - t
        # Verify: [pending token, d1..dk] -> k + 1 next-token distributions in one forward.
        ids = torch.tensor([[self.tokens[-1], *drafts]], device=dev)
        out = m.run(ids, self.cache, return_hidden=self.draft.uses_hidden)
        logits, hidden = out if self.draft.uses_hidden else (out, None)
        if self.params.is_greedy:
            n, tok = verify_greedy(logits[0], drafts)
        else:
            p = logits_to_probs(logits[0], self.params)
            n, tok = verify_sampled(p, q if q is None else q.to(p.device, torch.float32),
                                    drafts, self.generator)
        # The cache now holds S + all k drafts; keep S + the n accepted ones.
        self.cache.truncate([len(self.tokens) + n])
        t2 = _clock(dev)
        st.target_s += t2 - t1
        st.steps += 1
        st.drafted += len(drafts)
        st.accepted += n
        st.accepted_per_step.append(n)
        for i in range(min(n + 1, len(drafts))):       # positions this round's verdict reached
            st.drafted_per_position[i] += 1
            st.accepted_per_position[i] += i < n
        bonus = n == len(drafts) and len(drafts) > 0
        st.bonus += bonus
        emitted = drafts[:n] + [tok]
        for j, x in enumerate(emitted):                 # a stop token ends the sequence
            if x in self.stop_ids:
                emitted, self.finished = emitted[:j + 1], True
                break
        room = self.limit - len(self.generated)
        if len(emitted) >= room:
            emitted, self.finished = emitted[:room], True
        self.tokens += emitted
        st.new_tokens += len(emitted)
        if not self.finished:
            t = time.perf_counter()
            self.draft.commit(self.tokens, len(emitted),
                              None if hidden is None else hidden[0, :len(emitted)])
            st.draft_s += time.perf_counter() - t
        self._finish_time()
        return Round(drafts, n, tok, bonus, emitted)


@dataclass
class SpecOutput:
    tokens: list[int]          # the generated ids (the prompt excluded)
    stats: SpecStats
    rounds: list[Round]


def generate_speculative(model, draft: Draft, prompt: Sequence[int], k: int = 4,
                         params: SamplingParams | None = None, max_new_tokens: int | None = None,
                         eos_ids: Sequence[int] = ()) -> SpecOutput:
    """Generate for one prompt with ``draft`` proposing ``k`` tokens per target step.

    Greedy by default (``params`` None), then with ``max_new_tokens`` (default 32) new tokens
    at most; with ``params``, their ``max_tokens`` applies. The output distribution is the
    target's (see the module docstring); the greedy tokens are plain greedy decoding's.
    """
    if params is None:
        params = SamplingParams.greedy(max_tokens=max_new_tokens or 32)
    elif max_new_tokens is not None:
        raise ValueError("give max_new_tokens or params (with max_tokens), not both")
    dec = SpeculativeDecoder(model, draft, k, params, eos_ids)
    dec.start(prompt)
    rounds = []
    while not dec.finished:
        rounds.append(dec.step())
    return SpecOutput(dec.generated, dec.stats, rounds)
