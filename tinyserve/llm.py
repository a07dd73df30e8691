"""The offline API, shaped like vLLM's so its users feel at home:

    llm = LLM("smollm2")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.8, max_tokens=64))
    outs[0].outputs[0].text
    for delta in llm.stream("Once upon a time"): print(delta, end="")
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from .generate import check_prompt, decode_loop
from .loader import load_model
from .sampling import SamplingParams, per_row_params


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (stop token or string) | "length"


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
    """A model plus its tokenizer, generating in batches of up to ``max_batch_size`` rows."""

    def __init__(self, model: str = "smollm2", device: str = "auto", dtype=None,
                 backend: str = "auto", max_batch_size: int = 16,
                 quantization: str | dict | None = None):
        """``quantization``: None, a method name ("int8", "int4", "nf4", "gguf", ...; see
        ``tinyserve.quant.known_methods()``) or a dict ``{"method": ..., "group_size": ...,
        ...}`` of ``tinyserve.quant.quantize_model`` arguments, applied after loading."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
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
        self.max_batch_size = max_batch_size

    @classmethod
    def from_model(cls, model, tokenizer, max_batch_size: int = 16) -> "LLM":
        """Wrap an already loaded (model, tokenizer) pair, e.g. from ``load_model``."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        return self

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
        # Expand n samples per request into rows, then run rows in batches.
        rows = [(i, k) for i, sp in enumerate(params) for k in range(sp.n)]
        results, metrics = {}, {}
        bar = tqdm(total=len(rows), desc="generating", unit="seq",
                   disable=not use_tqdm or len(rows) <= 1)
        for s in range(0, len(rows), self.max_batch_size):
            chunk = rows[s:s + self.max_batch_size]
            stats: dict = {}
            done = self._run([encoded[i][1] for i, _ in chunk],
                             [_nth(params[i], k) for i, k in chunk], stats)
            for (i, k), comp in zip(chunk, done):
                results[(i, k)] = comp
            for i, _ in chunk:  # a request's metrics: those of the batch it started in
                metrics.setdefault(i, stats)
            bar.update(len(chunk))
        bar.close()
        return [RequestOutput(i, text, ids,
                              [CompletionOutput(k, *results[(i, k)]) for k in range(sp.n)],
                              metrics=metrics[i])
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
        for updates in decode_loop(self.model, [ids], [params], self.tokenizer,
                                   self.tokenizer.stop_token_ids, stats):
            for u in updates:
                if u.text_delta:
                    yield u.text_delta

    def stream_chat(self, messages: Messages, params=None, stats=None) -> Iterator[str]:
        return self.stream(self._render_chat(messages), params, stats)

    # ---- internals -----------------------------------------------------------------------
    @staticmethod
    def _per_prompt(params, n):
        return per_row_params(SamplingParams() if params is None else params, n, "prompts")

    def _run(self, prompts, params, stats):
        outs = [[] for _ in prompts]
        finish = [None] * len(prompts)
        texts = [""] * len(prompts)
        for updates in decode_loop(self.model, prompts, params, self.tokenizer,
                                   self.tokenizer.stop_token_ids, stats):
            for u in updates:
                outs[u.row].append(u.token_id)
                texts[u.row] += u.text_delta
                finish[u.row] = u.finish_reason
        return [(t, o, f) for t, o, f in zip(texts, outs, finish)]


def _nth(sp: SamplingParams, k: int) -> SamplingParams:
    """The k-th of n samples: its own seed (seed + k) so the n samples differ reproducibly."""
    return replace(sp, n=1, seed=None if sp.seed is None else sp.seed + k)
