"""The offline API, shaped like vLLM's so its users feel at home:

    llm = LLM("smollm2")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.8, max_tokens=64))
    outs[0].outputs[0].text
    for delta in llm.stream("Once upon a time"): print(delta, end="")

Both run on the continuous-batching engine (``tinyserve.engine.LLMEngine``): all requests are
queued at once, up to ``max_batch_size`` sequences run together, and a finished one's place is
taken by the next at the following step. The ``LLM`` keeps its engine from call to call, so
the prefix cache outlives a call: a second call with the same system prompt finds it computed
(``RequestOutput.num_cached_tokens``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from .engine import LLMEngine, SequenceMetrics
from .engine.config import UNSET, EngineConfig, given
from .errors import InvalidParameter, ParameterTypeError, RequestFailed
from .generate import check_prompt
from .loader import load_model
from .quant import get_method, quantize_model
from .quant.cpu_native import int4_to_native
from .sampling import SamplingParams, per_row_params
from .threads import check_threads, set_threads


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (stop token or string) | "length" | "abort" | "error"
    error: str | None = None   # what raised, when finish_reason is "error" (nobody else is hurt)


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    metrics: dict = field(default_factory=dict)
    num_cached_tokens: int | None = None   # prompt tokens found in the prefix cache


Messages = Sequence[dict]


class LLM:
    """A model plus its tokenizer, running up to ``max_batch_size`` sequences at once (16) and
    feeding at most ``max_num_batched_tokens`` tokens per step (2048; longer prompts are
    chunked). Options not given take these defaults, or ``EngineConfig``'s.

    KV memory. The cache is paged by default (PagedAttention, ``kv="paged"``): blocks of
    ``block_size`` tokens (16), taken as sequences grow, so memory follows the tokens really
    held. Its budget: ``kv_cache_tokens`` token slots, or ``kv_cache_bytes`` bytes (K and V of
    every layer: 2 * layers * kv_heads * head_dim * dtype bytes per token, 46 KB for SmolLM2
    in fp32), rounded down to whole blocks. Default: what a contiguous cache would reserve for
    the call, min(max_batch_size, sequences) x the longest prompt + max_tokens, so nobody is
    ever preempted. A smaller budget, or a larger ``max_batch_size`` in the same budget, runs
    as many sequences as there are free blocks; when the blocks run out, the latest admitted
    sequence is preempted and recomputed later (its output does not change). Prompts sharing
    a prefix reuse its blocks once computed (``enable_prefix_caching``), within a call and
    across calls, and the n samples of a request share their prompt's blocks.
    ``kv="slots"``: the contiguous baseline, one ``max_model_len`` slot per sequence.

    One engine serves every call. It is built by the first call and grows when a later one
    needs more sequences or longer ones than it holds (a new, larger engine: only then does
    the prefix cache start empty again); memory is never given back until the LLM is."""

    def __init__(self, model: str = "smollm2", device: str = "auto", dtype=None,
                 backend: str = "auto", max_batch_size=UNSET,
                 quantization: str | dict | None = None, max_num_batched_tokens=UNSET,
                 kv=UNSET, kv_cache_tokens=UNSET, kv_cache_bytes=UNSET, block_size=UNSET,
                 enable_prefix_caching=UNSET, config: EngineConfig | None = None,
                 threads: int | None = None, check_finite: bool = False):
        """``quantization``: None, a method name ("int8", "int4", "nf4", "gguf", ...; see
        ``tinyserve.quant.known_methods()``) or a dict ``{"method": ..., "group_size": ...,
        ...}`` of ``tinyserve.quant.quantize_model`` arguments, applied after loading. The
        engine options (``max_batch_size`` is ``EngineConfig.max_num_seqs``, a cap per call;
        ``kv*``, ``block_size``, ``enable_prefix_caching``: see the class) may instead be
        given as one ``config``. ``threads``: torch's CPU thread count, set before loading
        (it is process-wide); None = ``tinyserve.threads.default_threads()``, the cores this
        process may run on (``OMP_NUM_THREADS`` if set), whatever the process set before.
        ``from_model`` leaves torch's setting as it is. Every option is checked before the
        (slow) load.

        On the CPU a GGUF file runs natively by default: its quantized blocks go straight to
        PyTorch's int4/int8 CPU kernels with bf16 activations (``tinyserve.quant.cpu_native``;
        ~95 MB of weights for SmolLM2 instead of 540 MB in fp32). ``dtype="float32"`` (or any
        dtype, or a ``quantization``) loads the dequantized reference instead; on the CPU,
        ``quantization="int4"`` then runs its layers through the same int4 kernel.
        ``check_finite=True``: refuse weights holding NaN or inf at load (``load_model``)."""
        if threads is not None:
            check_threads(threads)
        config = _config(config, max_batch_size, max_num_batched_tokens, kv, kv_cache_tokens,
                         kv_cache_bytes, block_size, enable_prefix_caching)
        if quantization is not None:  # check the name before the (slow) load
            spec = {"method": quantization} if isinstance(quantization, str) else quantization
            if not isinstance(spec, dict) or "method" not in spec:
                raise ValueError(f"quantization must be a method name or a dict with a "
                                 f"'method' key, got {quantization!r}")
            get_method(spec["method"])
        set_threads(threads)
        self.model, self.tokenizer = load_model(model, device=device, dtype=dtype,
                                                backend=backend, native=quantization is None,
                                                check_finite=check_finite)
        if quantization is not None:
            quantize_model(self.model, **spec)
            if spec["method"] == "int4" and self.model.device.type == "cpu":
                int4_to_native(self.model)   # the int4 CPU kernel instead of dequantizing
        self._setup(config)

    @classmethod
    def from_model(cls, model, tokenizer, max_batch_size=UNSET, max_num_batched_tokens=UNSET,
                   kv=UNSET, kv_cache_tokens=UNSET, kv_cache_bytes=UNSET, block_size=UNSET,
                   enable_prefix_caching=UNSET, config: EngineConfig | None = None) -> "LLM":
        """Wrap an already loaded (model, tokenizer) pair, e.g. from ``load_model``."""
        config = _config(config, max_batch_size, max_num_batched_tokens, kv, kv_cache_tokens,
                         kv_cache_bytes, block_size, enable_prefix_caching)
        self = cls.__new__(cls)
        self.model, self.tokenizer = model, tokenizer
        self._setup(config)
        return self

    def _setup(self, config: EngineConfig):
        # max_model_len stays open (each call sizes it); a byte budget becomes token slots now
        self.config = replace(config.resolve(self.model.config, self.model.dtype),
                              max_model_len=config.max_model_len)
        self.engine: LLMEngine | None = None     # built by the first call, kept
        self._request_ids = itertools.count()    # unique across calls

    @property
    def max_batch_size(self) -> int:
        """Most sequences one call runs at once (the config's max_num_seqs)."""
        return self.config.max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self.config.max_num_batched_tokens

    # ---- inputs --------------------------------------------------------------------------
    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        """A prompt (text, token ids, or {"prompt": text} / {"prompt_token_ids": ids}) ->
        (text or None, ids), every id checked against the vocabulary before any work."""
        if isinstance(prompt, dict):
            keys = set(prompt)
            if keys not in ({"prompt"}, {"prompt_token_ids"}):
                raise InvalidParameter(f"a prompt dict has one key, 'prompt' (text) or "
                                       f"'prompt_token_ids' (a list of ints), got {sorted(keys)}")
            prompt = prompt.get("prompt", prompt.get("prompt_token_ids"))
            if "prompt_token_ids" in keys and isinstance(prompt, str):
                raise ParameterTypeError(f"prompt_token_ids must be a list of ints, got the "
                                         f"string {prompt[:40]!r}")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameter("empty prompt")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)):
            raise ParameterTypeError(f"a prompt is a str, a list of token ids or a dict "
                                     f"{{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
        vocab = self.model.config.vocab_size
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int):
                raise ParameterTypeError(f"token ids must be ints, got {t!r} "
                                         f"({type(t).__name__}) in the prompt")
            if not 0 <= t < vocab:
                raise InvalidParameter(f"token id {t} is outside the vocabulary [0, {vocab})")
        return None, list(prompt)

    def _render_chat(self, messages: Messages) -> str:
        if not isinstance(messages, (list, tuple)) or not messages or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InvalidParameter("messages must be a non-empty list of "
                                   "{'role': ..., 'content': ...}")
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. ``params`` may be one or one per prompt.
        A completion whose processing raised (e.g. its logits processor) has
        ``finish_reason="error"`` and the message in ``.error``; the others are unaffected."""
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
        rids = [next(self._request_ids) for _ in encoded]
        for rid, (_, ids), sp in zip(rids, encoded, params):   # n samples: n sequences
            engine.add_request(rid, ids, sp)
        # (prompt index, sample) -> [text, token ids, finish reason, error, metrics]
        comps = {(i, k): ["", [], None, None, None] for i, sp in enumerate(params)
                 for k in range(sp.n)}
        index = {rid: i for i, rid in enumerate(rids)}
        bar = tqdm(total=len(comps), desc="generating", unit="seq",
                   disable=not use_tqdm or len(comps) <= 1)
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id not in index:    # an abort notice of an earlier call's request
                    continue
                c = comps[(index[o.request_id], o.index)]
                c[0] += o.text_delta
                c[1] += o.token_ids
                c[2], c[3], c[4] = o.finish_reason, o.error, o.metrics
                bar.update(o.finish_reason is not None)
        bar.close()
        outs = []
        for i, ((text, ids), sp) in enumerate(zip(encoded, params)):
            m = SequenceMetrics.merge([comps[(i, k)][4] for k in range(sp.n)]).as_dict()
            outs.append(RequestOutput(
                i, text, ids, [CompletionOutput(k, *comps[(i, k)][:4]) for k in range(sp.n)],
                metrics=m, num_cached_tokens=m["cached_tokens"]))
        return outs

    def chat(self, messages, params=None, use_tqdm: bool = True) -> list[RequestOutput]:
        """``messages``: one conversation (list of dicts) or a list of conversations."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidParameter(f"chat needs a conversation (a non-empty list of "
                                   f"{{'role': ..., 'content': ...}}) or a list of them, "
                                   f"got {messages!r:.60}")
        convs = [messages] if isinstance(messages[0], dict) else messages
        return self.generate([self._render_chat(c) for c in convs], params, use_tqdm)

    def stream(self, prompt, params: SamplingParams | None = None,
               stats: dict | None = None) -> Iterator[str]:
        """Yield the text of one completion as it is produced (deltas, in order). Raises
        ``tinyserve.errors.RequestFailed`` if its processing raised (e.g. a logits processor)."""
        _, ids = self._encode(prompt)
        params = self._per_prompt(params, 1)[0]
        if params.n != 1:
            raise ValueError("stream() produces one completion: use n=1")
        check_prompt(ids, self.model.config.max_position_embeddings)
        engine = self._engine([ids], [params])
        rid = next(self._request_ids)
        engine.add_request(rid, ids, params)
        m, reason = None, None
        try:
            while engine.has_unfinished() and reason is None:
                for o in engine.step():
                    if o.request_id != rid:
                        continue
                    m, reason = o.metrics or m, o.finish_reason
                    if reason == "error":
                        raise RequestFailed(o.error)
                    if o.text_delta:
                        yield o.text_delta
        finally:      # a stream closed early (break, Ctrl-C) frees its KV memory at once
            engine.abort(rid)
        if reason in (None, "abort"):   # another call on this LLM began before it was read out
            raise RequestFailed("stream aborted: another generate/stream call on the same LLM "
                                "started before this stream was read to its end")
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
        """The engine for these requests: the one kept from earlier calls if it holds enough
        sequences (min(max_batch_size, this call's)) each as long as this call's longest
        prompt + output, else a new one as large as both (KV memory: see the class). Requests
        an earlier call left behind (interrupted) are aborted: their memory is free now."""
        ctx = self.model.config.max_position_embeddings
        longest = max(len(p) + min(sp.max_tokens, ctx - len(p)) for p, sp in zip(prompts, params))
        most = max(sp.n for sp in params)
        if most > self.max_batch_size:
            raise ValueError(f"n={most} samples of a request run together: max_batch_size "
                             f"({self.max_batch_size}) must be >= n")
        cap = self.config.max_model_len
        if cap is not None and longest > cap:
            raise ValueError(f"a prompt + max_tokens of {longest} tokens exceeds the "
                             f"configured max_model_len ({cap})")
        seqs = min(self.max_batch_size, sum(sp.n for sp in params))
        e = self.engine
        if e is not None:
            for rid in e.unfinished_ids:
                e.abort(rid)
            if e.scheduler.max_num_seqs >= seqs and e.max_model_len >= longest:
                return e
            seqs, longest = max(seqs, e.scheduler.max_num_seqs), max(longest, e.max_model_len)
            self.engine = None               # let the old KV cache go before the new one
        self.engine = LLMEngine(self.model, self.tokenizer, config=replace(
            self.config, max_num_seqs=seqs, max_model_len=longest))
        return self.engine


# LLM's own defaults where they differ from EngineConfig's: a single caller's long prompt is
# prefilled in one step rather than in chunks.
LLM_DEFAULTS = dict(max_num_batched_tokens=2048)


def _config(config, max_batch_size, max_num_batched_tokens, kv, kv_cache_tokens,
            kv_cache_bytes, block_size, enable_prefix_caching) -> EngineConfig:
    """LLM's engine options as one EngineConfig (errors name ``max_batch_size``)."""
    options = given(max_num_seqs=max_batch_size, max_num_batched_tokens=max_num_batched_tokens,
                    kv=kv, kv_cache_tokens=kv_cache_tokens, kv_cache_bytes=kv_cache_bytes,
                    block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    if config is None:
        return EngineConfig(**{**LLM_DEFAULTS, **options}, seqs_name="max_batch_size")
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
    if options:
        raise ValueError("give the engine options one by one or as config=, not both")
    return config
