"""Suite ``generate``: batch-1 greedy decoding speed of SmolLM2, tinyserve vs HF transformers.

    python -m tinyserve.bench generate [--max-tokens 64] [--repeats 3] [--no-hf]

Both sides get the same prompt token ids, the same weights (HF transformers reads the same GGUF
file, dequantized to the same dtype: fp32 on CPU, bf16 on CUDA), greedy decoding, and exactly
``--max-tokens`` new tokens (ours: ``ignore_eos``; HF: ``min_new_tokens = max_new_tokens``).

Each side is timed the same way, by the clock of the caller:
    ttft        call -> first new token available on the host (prefill + one sample)
    decode      (new tokens - 1) / (last token - first token): the steady per-token rate
    end-to-end  new tokens / (call -> return)
One warm-up run each, then the repeats alternate between the two sides; medians are reported.
Our ``decode_loop`` ``stats`` give a second decode number, (generated - 1) / (total_s -
prefill_s), kept in the JSON as ``decode_tok_s_stats`` as a cross-check.
"""
from __future__ import annotations

import time

from ..args import nonnegative_int, positive_int
from ..timing import clock
from .common import load_avg, log, start, summarize, table
from .hf import load_hf

NAME = "generate"
HELP = "batch-1 greedy decode tokens/s on SmolLM2: tinyserve vs HF transformers generate"
COMMON = ("device", "threads")
DEFAULT_PROMPT = ("Once upon a time, in a small village at the edge of a great forest, there "
                  "lived an old clockmaker who")


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2",
                   help="named model or .gguf file (default: smollm2)")
    p.add_argument("--max-tokens", type=positive_int, default=64,
                   help="new tokens per run, forced on both sides (default: 64)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (raw, no chat template)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs per side; the median is reported (default: 3)")
    p.add_argument("--warmup", type=nonnegative_int, default=1,
                   help="untimed runs per side first (default: 1)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, "
                                                   "bf16, fp16")


# ---- one timed run per side --------------------------------------------------------------
def _rates(n: int, t0: float, t_first: float, t_end: float) -> dict:
    decode_s = t_end - t_first
    return {"new_tokens": n, "ttft_s": t_first - t0, "total_s": t_end - t0,
            "decode_tok_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
            "e2e_tok_s": n / (t_end - t0)}


def run_ours(model, ids: list[int], max_tokens: int) -> dict:
    """One greedy generation through ``decode_loop``; -> timings and the new token ids."""
    from ..generate import decode_loop
    from ..sampling import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    stats: dict = {}
    tokens: list[int] = []
    t_first = None
    t0 = clock(model.device)
    for updates in decode_loop(model, [ids], [params], None, (), stats):
        if t_first is None:  # the token was copied to the host by sample(): it is done
            t_first = time.perf_counter()
        tokens.extend(u.token_id for u in updates)
    t_end = clock(model.device)
    out = _rates(len(tokens), t0, t_first, t_end)
    n, d = stats["generated_tokens"], stats["total_s"] - stats["prefill_s"]
    out["decode_tok_s_stats"] = (n - 1) / d if n > 1 and d > 0 else None
    out["stats"] = dict(stats)
    out["tokens"] = tokens
    return out


def _hf_streamer_clock():
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        """generate() calls put() with the prompt, then once per new token (on the host)."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass
    return StepClock()


def run_hf(model, ids: list[int], max_tokens: int, pad_id: int) -> dict:
    import torch
    dev = model.device
    inp = torch.tensor([ids], device=dev)
    streamer = _hf_streamer_clock()
    t0 = clock(dev)
    with torch.no_grad():
        out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             pad_token_id=pad_id, streamer=streamer,
                             temperature=None, top_p=None, top_k=None)
    t_end = clock(dev)
    tokens = out[0, len(ids):].tolist()
    t_first = streamer.times[1] if len(streamer.times) > 1 else t_end
    res = _rates(len(tokens), t0, t_first, t_end)
    res["tokens"] = tokens
    return res


# ---- the suite ---------------------------------------------------------------------------
def _summary(runs: list[dict], keys=("ttft_s", "decode_tok_s", "e2e_tok_s", "total_s",
                                     "decode_tok_s_stats")) -> dict:
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            out[k] = summarize(vals)
    return out


def _median(side: dict, key: str):
    return side.get(key, {}).get("median") if isinstance(side, dict) else None


def _agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(args) -> dict:
    from ..loader import load_model, resolve_dtype, resolve_source
    device, env = start(args)                  # the load average before we add ours
    dtype = resolve_dtype(None if args.dtype == "auto" else args.dtype, device)
    path = resolve_source(args.model)
    N = args.max_tokens

    log(f"[generate] loading {path} on {device} in {dtype} ...")
    t = time.perf_counter()
    model, tok = load_model(path, device=device, dtype=dtype)
    ours_load_s = time.perf_counter() - t
    ids = tok.encode(args.prompt)
    if len(ids) + N > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({len(ids)} tokens) + {N} new tokens exceed the context "
                         f"({model.config.max_position_embeddings})")

    hf_model, hf_skip, hf_load_s = None, None, None
    if args.no_hf:
        hf_skip = "--no-hf"
    else:
        try:
            t = time.perf_counter()
            hf_model = load_hf(path, dtype, device)
            hf_load_s = time.perf_counter() - t
        except Exception as e:  # no transformers / no gguf package / unsupported file
            hf_skip = f"could not load HF transformers model: {type(e).__name__}: {e}"
            log(f"[generate] {hf_skip}")
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0

    def ours():
        return run_ours(model, ids, N)

    def hf():
        return run_hf(hf_model, ids, N, pad)

    sides = [("tinyserve", ours)] + ([("transformers", hf)] if hf_model is not None else [])
    for name, fn in sides:
        for _ in range(args.warmup):
            log(f"[generate] warm-up {name}")
            fn()
    runs: dict[str, list[dict]] = {name: [] for name, _ in sides}
    for r in range(args.repeats):
        for name, fn in sides:
            res = fn()
            runs[name].append(res)
            log(f"[generate] run {r + 1}/{args.repeats} {name}: "
                f"decode {res['decode_tok_s'] or float('nan'):.1f} tok/s, "
                f"ttft {res['ttft_s'] * 1e3:.0f} ms")

    results = {"tinyserve": {"load_s": ours_load_s, **_summary(runs["tinyserve"]),
                             "stats": runs["tinyserve"][-1]["stats"]}}
    ours_tokens = runs["tinyserve"][-1]["tokens"]
    ratio, agreement = None, None
    if hf_model is not None:
        results["transformers"] = {"load_s": hf_load_s, **_summary(runs["transformers"])}
        hf_tokens = runs["transformers"][-1]["tokens"]
        agreement = {"same_tokens": ours_tokens == hf_tokens,
                     "common_prefix": _agreement(ours_tokens, hf_tokens), "of": N}
        ratio = {}
        for key, name in (("decode_tok_s", "decode"), ("e2e_tok_s", "end_to_end")):
            a, b = _median(results["tinyserve"], key), _median(results["transformers"], key)
            ratio[name] = a / b if a and b else None
        a, b = _median(results["tinyserve"], "ttft_s"), _median(results["transformers"], "ttft_s")
        ratio["ttft"] = a / b if a and b else None
    else:
        results["transformers"] = {"skipped": hf_skip}

    result = {
        "suite": NAME,
        "env": {**env, "load_avg_1m_end": load_avg()},
        "config": {"model": args.model, "source": str(path), "device": str(device),
                   "dtype": str(dtype).replace("torch.", ""), "batch_size": 1,
                   "decoding": "greedy", "prompt": args.prompt, "prompt_tokens": len(ids),
                   "max_tokens": N, "repeats": args.repeats, "warmup": args.warmup},
        "results": results,
        "ratio_ours_over_hf": ratio,
        "greedy_agreement": agreement,
        "tokens": {"tinyserve": ours_tokens,
                   "transformers": runs["transformers"][-1]["tokens"] if hf_model is not None
                   else None},
    }
    print(report(result))
    return result


def report(result: dict) -> str:
    """The small table printed after a run (also usable on a loaded result file)."""
    c, res = result["config"], result["results"]

    def fmt(x, scale=1.0, spec=".1f"):
        return "-" if x is None else format(x * scale, spec)

    rows = []
    for name in ("tinyserve", "transformers"):
        side = res.get(name, {})
        if "skipped" in side:
            rows.append([name, "skipped", "", ""])
            continue
        rows.append([name, fmt(_median(side, "ttft_s"), 1e3, ".0f"),
                     fmt(_median(side, "decode_tok_s")), fmt(_median(side, "e2e_tok_s"))])
    ratio = result.get("ratio_ours_over_hf")
    if ratio:
        rows.append(["ratio ours/HF", fmt(ratio.get("ttft"), 1, ".2f"),
                     fmt(ratio.get("decode"), 1, ".2f"), fmt(ratio.get("end_to_end"), 1, ".2f")])
    env = result["env"]
    head = (f"generate: {c['model']} on {env['gpu'] or env['cpu']} ({c['device']}, {c['dtype']}, "
            f"{env['torch_threads']} threads), batch 1, greedy, {c['prompt_tokens']} prompt "
            f"tokens + {c['max_tokens']} new, median of {c['repeats']}")
    lines = [head, table(rows, ["", "TTFT ms", "decode tok/s", "end-to-end tok/s"])]
    agree = result.get("greedy_agreement")
    if agree:
        lines.append(f"greedy tokens identical: {agree['same_tokens']} "
                     f"(common prefix {agree['common_prefix']}/{agree['of']})")
    skipped = res.get("transformers", {}).get("skipped")
    if skipped:
        lines.append(f"transformers skipped: {skipped}")
    return "\n".join(lines)
