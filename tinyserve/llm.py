"""The offline API, shaped like vLLM's so its users feel at home:

    llm = LLM("smollm2")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.8, max_tokens=64))
    outs[0].outputs[0].text
    for delta in llm.stream("Once upon a time"): print(delta, end="")

Both run on the continuous-batching engine (``tinyserve.engine.LLMEngine``): all requests are
queued at once, up to ``max_batch_size`` sequences run together, and a finished one's place is
taken by the next at the following step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from .engine import LLMEngine, SequenceMetrics
from .engine.paged_store import blocks_for_budget
from .engine.scheduler import check_budgets
from .generate import check_prompt
from .loader import load_model
from .sampling import SamplingParams, per_row_params


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (stop token or string) | "length" | "abort"


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: dict = field(default_factory=dict)


Messages = Sequence[dict]


class LLM:
    """A model plus its tokenizer, running up to ``max_batch_size`` sequences at once and
    feeding at most ``max_num_batched_tokens`` tokens per step (longer prompts are chunked).

    KV memory. The cache is paged by default (PagedAttention, ``kv="paged"``): blocks of
    ``block_size`` tokens (16), taken as sequences grow, so memory follows the tokens really
    held. Its budget: ``kv_cache_tokens`` token slots, or ``kv_cache_bytes`` bytes (K and V of
    every layer: 2 * layers * kv_heads * head_dim * dtype bytes per token, 46 KB for SmolLM2
    in fp32), rounded down to whole blocks. Default: what a contiguous cache would reserve for
    the call, min(max_batch_size, sequences) x the longest prompt + max_tokens, so nobody is
    ever preempted. A smaller budget, or a larger ``max_batch_size`` in the same budget, runs
    as many sequences as there are free blocks; when the blocks run out, the latest admitted
    sequence is preempted and recomputed later (its output does not change). Within a call,
    prompts sharing a prefix reuse its blocks once computed (``enable_prefix_caching``), and
    the n samples of a request share their prompt's blocks. ``kv="slots"``: the contiguous
    baseline, one ``max_model_len`` slot per sequence."""

    def __init__(self, model: str = "smollm2", device: str = "auto", dtype=None,
                 backend: str = "auto", max_batch_size: int = 16,
                 quantization: str | dict | None = None, max_num_batched_tokens: int = 2048,
                 kv: str = "paged", kv_cache_tokens: int | None = None,
                 kv_cache_bytes: int | None = None, block_size: int | None = None,
                 enable_prefix_caching: bool = True):
        """``quantization``: None, a method name ("int8", "int4", "nf4", "gguf", ...; see
        ``tinyserve.quant.known_methods()``) or a dict ``{"method": ..., "group_size": ...,
        ...}`` of ``tinyserve.quant.quantize_model`` arguments, applied after loading. The
        ``kv*``, ``block_size`` and ``enable_prefix_caching`` options: see the class."""
        check_budgets(max_batch_size, max_num_batched_tokens, "max_batch_size")
        _check_kv(kv, kv_cache_tokens, kv_cache_bytes)
        if quantization is not None:  # check the name before the (slow) load
            from .quant import get_method
            spec = {"method": quantization} if isinstance(quantization, str) else quantization
            if not isinstance(spec, dict) or "method" not in spec:
                raise ValueError(f"quantization must be a method name or a dict with a "
                                 f"'method' key, got {quantization!r}")
            get_method(spec["method"])
        self.model, self.tokenizer = load_model(model, device=device, dtype=dtype,
                                                backend=backend)
        if quantization is not None:
            from .quant import quantize_model
            quantize_model(self.model, **spec)
        self._setup(max_batch_size, max_num_batched_tokens, kv, kv_cache_tokens, kv_cache_bytes,
                    block_size, enable_prefix_caching)

    @classmethod
    def from_model(cls, model, tokenizer, max_batch_size: int = 16,
                   max_num_batched_tokens: int = 2048, kv: str = "paged",
                   kv_cache_tokens: int | None = None, kv_cache_bytes: int | None = None,
                   block_size: int | None = None, enable_prefix_caching: bool = True) -> "LLM":
        """Wrap an already loaded (model, tokenizer) pair, e.g. from ``load_model``."""
        check_budgets(max_batch_size, max_num_batched_tokens, "max_batch_size")
        _check_kv(kv, kv_cache_tokens, kv_cache_bytes)
        self = cls.__new__(cls)
        self.model, self.tokenizer = model, tokenizer
        self._setup(max_batch_size, max_num_batched_tokens, kv, kv_cache_tokens, kv_cache_bytes,
                    block_size, enable_prefix_caching)
        return self

    def _setup(self, max_batch_size, max_num_batched_tokens, kv, kv_cache_tokens,
               kv_cache_bytes, block_size, enable_prefix_caching):
        self.max_batch_size, self.max_num_batched_tokens = max_batch_size, max_num_batched_tokens
        if kv_cache_bytes is not None:     # bytes -> whole blocks -> token slots
            bs = 16 if block_size is None else block_size
            kv_cache_tokens = bs * blocks_for_budget(self.model.config, bs, self.model.dtype,
                                                     nbytes=kv_cache_bytes)
        self.kv_options = dict(kv=kv, kv_cache_tokens=kv_cache_tokens, block_size=block_size,
                               enable_prefix_caching=enable_prefix_caching)

    # ---- inputs --------------------------------------------------------------------------
    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return None, [int(t) for t in prompt["prompt_token_ids"]]
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt is a str, a list of token ids or {{'prompt_token_ids': ...}}, "
                        f"got {type(prompt).__name__}")

    def _render_chat(self, messages: Messages) -> str:
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m
                                   for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. ``params`` may be one or one per prompt."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [self._encode(p) for p in prompts]
        params = self._per_prompt(params, len(encoded))
        for _, ids in encoded:  # fail before any work is done
            check_prompt(ids, self.model.config.max_position_embeddings)
        if not encoded:
            return []
        engine = self._engine([ids for _, ids in encoded], params)
        for i, (_, ids) in enumerate(encoded):   # n samples of a request: n sequences
            engine.add_request(i, ids, params[i])
        # (request, sample) -> [text, token ids, finish reason, metrics]
        comps = {(i, k): ["", [], None, None] for i, sp in enumerate(params) for k in range(sp.n)}
        bar = tqdm(total=len(comps), desc="generating", unit="seq",
                   disable=not use_tqdm or len(comps) <= 1)
        while engine.has_unfinished():
            for o in engine.step():
                c = comps[(o.request_id, o.index)]
                c[0] += o.text_delta
                c[1] += o.token_ids
                c[2], c[3] = o.finish_reason, o.metrics
                bar.update(o.finish_reason is not None)
        bar.close()
        return [RequestOutput(i, text, ids,
                              [CompletionOutput(k, *comps[(i, k)][:3]) for k in range(sp.n)],
                              metrics=SequenceMetrics.merge(
                                  [comps[(i, k)][3] for k in range(sp.n)]).as_dict())
                for i, ((text, ids), sp) in enumerate(zip(encoded, params))]

    def chat(self, messages, params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """``messages``: one conversation (list of dicts) or a list of conversations."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self._render_chat(c) for c in convs], params, use_tqdm)

    def stream(self, prompt, params: SamplingParams | None = None,
               stats: dict | None = None) -> Iterator[str]:
        """Yield the text of one completion as it is produced (deltas, in order)."""
        _, ids = self._encode(prompt)
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() produces one completion: use n=1")
        check_prompt(ids, self.model.config.max_position_embeddings)
        engine = self._engine([ids], [params])
        engine.add_request(0, ids, params)
        m = None
        while engine.has_unfinished():
            for o in engine.step():
                m = o.metrics or m
                if o.text_delta:
                    yield o.text_delta
        if stats is not None:   # the keys decode_loop's stats have (the CLI prints them)
            stats.update(prefill_s=m.first_token_time - m.arrival_time,
                         total_s=m.finish_time - m.arrival_time, prompt_tokens=len(ids),
                         generated_tokens=m.output_tokens, steps=engine.step_count)

    def stream_chat(self, messages: Messages, params=None, stats=None) -> Iterator[str]:
        return self.stream(self._render_chat(messages), params, stats)

    # ---- internals -----------------------------------------------------------------------
    @staticmethod
    def _per_prompt(params, n):
        return per_row_params(SamplingParams() if params is None else params, n, "prompts")

    def _engine(self, prompts, params) -> LLMEngine:
        """An engine for these requests: at most max_batch_size sequences, each as long as the
        longest prompt + output among them (the cache decode_loop would size), KV memory as
        the class docstring says."""
        ctx = self.model.config.max_position_embeddings
        longest = max(len(p) + min(sp.max_tokens, ctx - len(p)) for p, sp in zip(prompts, params))
        most = max(sp.n for sp in params)
        if most > self.max_batch_size:
            raise ValueError(f"n={most} samples of a request run together: max_batch_size "
                             f"({self.max_batch_size}) must be >= n")
        seqs = min(self.max_batch_size, sum(sp.n for sp in params))
        return LLMEngine(self.model, self.tokenizer, max_num_seqs=seqs,
                         max_num_batched_tokens=self.max_num_batched_tokens,
                         max_model_len=longest, **self.kv_options)


def _check_kv(kv, kv_cache_tokens, kv_cache_bytes):
    if kv not in ("paged", "slots"):
        raise ValueError(f"kv must be 'paged' or 'slots', got {kv!r}")
    if kv_cache_tokens is not None and kv_cache_bytes is not None:
        raise ValueError("give the KV budget as kv_cache_tokens or kv_cache_bytes, not both")


