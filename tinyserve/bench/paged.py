"""Suite ``paged``: PagedAttention's paged KV store vs the contiguous slot pool, one workload.

    python -m tinyserve.bench paged [--model smollm2] [--num-requests 48] [--budget-seqs 4]
        [--max-seqs 64] [--block-size 16] [--prefix-requests 16] [--system-len 192]
        [--threads N]

The workload is ``tinyserve.engine.workload.make_workload`` (seeded lognormal prompt and
output lengths, all requests at t = 0), decoded greedily with ``ignore_eos``, so both stores
do the same work (their greedy tokens are compared: ``same_tokens``). Measured:

1. The same KV memory, ``--budget-seqs`` x max_model_len token slots (max_model_len = the
   longest prompt + output the workload can draw), given to
     slots   ``LLMEngine(kv="slots")``: --budget-seqs slots of max_model_len tokens each, the
             contiguous max-length reservation;
     paged   ``LLMEngine(kv="paged", kv_cache_tokens=budget)``: blocks of --block-size
             tokens, up to --max-seqs sequences, as many as the free blocks allow.
   Sampled at every forward: the sequences holding KV, and the token slots reserved vs used.
   Reported: the most (and mean) concurrent sequences, paged / slots (the issue's target:
   >= 3x); KV waste (reserved - used) / reserved, time-averaged (each forward weighted by its
   duration); preemptions; end-to-end throughput with the batch each one could hold.
2. Prefix caching: --prefix-requests requests that share a --system-len-token system prompt
   (then a user part of their own), all at once, through the paged store with caching on and
   off: TTFT, throughput, prompt tokens served from the cache, tokens fed to the model.
3. Across calls: ``LLM`` keeps its engine, so its prefix cache outlives a call. Two
   ``LLM.generate`` calls, each one request of a --repeat-system-len-token system prompt plus
   a user part of its own: time to first token and ``num_cached_tokens`` of the first call
   (nothing cached) and of the second (the system prompt's blocks found).
4. Kernels: the paged decode / prefill kernels against the contiguous ones at the same shapes
   are the ``paged_attention`` cases of ``python -m tinyserve.bench ops`` (run on a GPU; on a
   CPU the kernels would run in the Triton interpreter, whose speed means nothing).
"""
from __future__ import annotations

import math
from dataclasses import replace

from ..args import add_engine_args, positive_int
from ..timing import clock
from .common import finish, log, start, table

NAME = "paged"
HELP = "paged KV store vs contiguous slots: waste, sequences per KV budget, prefix caching"
COMMON = ("device", "threads", "seed")
# the suite's own spelling of the engine's flags (older command lines keep working)
FLAG_SPELLING = {"max_num_seqs": "--max-seqs", "max_num_batched_tokens": "--max-batched-tokens",
                 "block_size": None}

_CPU = dict(model="smollm2", num_requests=48, prompt_len="32,0.8,4,256",
            output_len="24,1.0,2,160", prefix_requests=16, system_len=192,
            user_len="16,0.5,4,64", max_batched_tokens=256, prefix_max_seqs=16)
_CUDA = dict(model="llama-3.2-1b", num_requests=256, prompt_len="256,0.8,16,1024",
             output_len="128,1.0,8,512", prefix_requests=64, system_len=1024,
             user_len="64,0.5,8,256", max_batched_tokens=2048, prefix_max_seqs=64)
KERNELS = ("paged vs contiguous decode/prefill kernels at equal shapes: `python -m "
           "tinyserve.bench ops --ops paged_attention` on a GPU (its 'contiguous' peer)")


def add_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help="smollm2 (default on CPU), llama-3.2-1b (default on CUDA), llama-2-7b, "
                        "tiny")
    p.add_argument("--num-requests", type=positive_int, default=None,
                   help="requests of the memory / throughput runs (default 48 CPU, 256 CUDA)")
    p.add_argument("--prompt-len", default=None,
                   help="median,sigma,lo,hi of the prompt lengths (default 32,0.8,4,256 CPU)")
    p.add_argument("--output-len", default=None,
                   help="median,sigma,lo,hi of the output lengths (default 24,1.0,2,160 CPU)")
    p.add_argument("--budget-seqs", type=positive_int, default=4,
                   help="the KV budget, in max_model_len sequences (= the slot pool's slots)")
    p.add_argument("--prefix-requests", type=positive_int, default=None,
                   help="requests of the prefix-caching runs (default 16 CPU, 64 CUDA)")
    p.add_argument("--system-len", type=positive_int, default=None,
                   help="tokens of the shared system prompt (default 192 CPU, 1024 CUDA)")
    p.add_argument("--user-len", default=None,
                   help="median,sigma,lo,hi of the user part after it (default 16,0.5,4,64 CPU)")
    p.add_argument("--repeat-system-len", type=positive_int, default=400,
                   help="tokens of the system prompt repeated across two LLM calls (400)")
    add_engine_args(p, *FLAG_SPELLING, flags=FLAG_SPELLING, max_num_seqs=64,
                    block_size=16).description = (
        "the paged engine's (the slots one runs --budget-seqs sequences); tokens per step: "
        "default 256 on CPU, 2048 on CUDA")


# ---- one run, instrumented -------------------------------------------------------------------
def _instrument(engine, device) -> dict:
    """Watch an engine: at every forward [seconds, sequences holding KV, reserved token slots,
    used token slots, tokens fed] (sampled before it, timed to its end); the prompt tokens
    each admission found cached; the preemptions."""
    seen = {"samples": [], "cached": [], "preemptions": 0}
    kv = engine.kv_cache_manager
    execute, allocate, preempt = (engine.runner.execute, kv.allocate,
                                  engine.scheduler.preempt)

    def execute_and_sample(sched):
        row = [clock(device), len(engine.scheduler.running), kv.reserved_tokens(),
               kv.used_tokens(), sum(c.num_tokens for c in sched.chunks)]
        out = execute(sched)
        row[0] = clock(device) - row[0]
        seen["samples"].append(row)
        return out

    def allocate_and_count(seq, num_tokens):
        seen["cached"].append(allocate(seq, num_tokens))
        return seen["cached"][-1]

    def preempt_and_count(seq):
        seen["preemptions"] += 1
        preempt(seq)
    engine.runner.execute, kv.allocate = execute_and_sample, allocate_and_count
    engine.scheduler.preempt = preempt_and_count
    return seen


def memory_stats(samples) -> dict:
    """Concurrency and KV waste over a run's samples (see ``_instrument``)."""
    dt = [s[0] for s in samples]
    res = sum(t * s[2] for t, s in zip(dt, samples))
    return {"max_seqs": max(s[1] for s in samples),
            "mean_seqs": sum(t * s[1] for t, s in zip(dt, samples)) / sum(dt),
            "waste_time_avg": sum(t * (s[2] - s[3]) for t, s in zip(dt, samples)) / res,
            "mean_reserved_tokens": res / sum(dt), "forwards": len(samples),
            "fed_tokens": sum(s[4] for s in samples)}


def run_engine(model, work, device, config=None, **engine_kw):
    """Play ``work`` in real time through an instrumented ``LLMEngine(model, config=config)``
    (``engine_kw``: the options of an EngineConfig, when none is given).
    -> (serving summary + memory stats, {request_id: token ids}, samples)."""
    from ..engine import KVCacheManager, LLMEngine
    from ..engine.config import EngineConfig
    from ..engine.workload import run_workload, summarize
    engine = LLMEngine(model, None, config=config or EngineConfig(**engine_kw))
    seen = _instrument(engine, device)
    run = run_workload(engine, work)
    kv = engine.kv_cache_manager
    out = {**summarize(run), **memory_stats(seen["samples"]),
           "cached_prompt_tokens": sum(seen["cached"]), "preemptions": seen["preemptions"],
           "kv_capacity_tokens": (kv.num_blocks * kv.block_size if isinstance(kv, KVCacheManager)
                                  else kv.num_slots * kv.max_model_len)}
    return out, {r["request_id"]: r["token_ids"] for r in run["requests"]}, seen["samples"]


# ---- the suite -----------------------------------------------------------------------------------
def run(args) -> dict:
    import numpy as np

    from ..engine.config import EngineConfig
    from ..engine.workload import make_workload
    from .serving import length_dist, load_models
    device, env = start(args)
    d = _CUDA if device.type == "cuda" else _CPU
    name = (args.model or d["model"]).lower()
    prompt = length_dist(args.prompt_len or d["prompt_len"], "prompt-len")
    output = length_dist(args.output_len or d["output_len"], "output-len")
    user = length_dist(args.user_len or d["user_len"], "user-len")
    n_req = args.num_requests or d["num_requests"]
    n_pre = args.prefix_requests or d["prefix_requests"]
    sys_len = args.system_len or d["system_len"]
    # the paged engine's options; each run below sets its length and KV budget
    base = EngineConfig.from_args(args, max_num_batched_tokens=d["max_batched_tokens"])
    mbt = base.max_num_batched_tokens
    log(f"[paged] loading {name} on {device} ...")
    model = load_models(name, device, False, args.seed)[0]
    V, ctx = model.config.vocab_size, model.config.max_position_embeddings
    L = prompt.hi + output.hi
    L_pre = sys_len + user.hi + output.hi
    if max(L, L_pre) > ctx:
        raise ValueError(f"max_model_len {max(L, L_pre)} (prompt + output hi, or system + user "
                         f"+ output hi) exceeds the context ({ctx})")
    budget = args.budget_seqs * L
    work = make_workload(n_req, math.inf, V, prompt, output, args.seed)
    systems = {
        "slots": EngineConfig(kv="slots", max_num_seqs=args.budget_seqs,
                              max_num_batched_tokens=mbt, max_model_len=L),
        "paged": replace(base, max_model_len=L, kv_cache_tokens=budget)}
    warm = make_workload(2, math.inf, V, prompt, replace(output, median=2, lo=2, hi=2),
                         args.seed + 1)
    results, tokens, series = {}, {}, {}
    for s, cfg in systems.items():
        run_engine(model, warm, device, cfg)        # first calls allocate / compile
        log(f"[paged] {s}: {n_req} requests, KV budget {budget} tokens ...")
        results[s], tokens[s], samples = run_engine(model, work, device, cfg)
        series[s] = [[round(row[0], 5), *row[1:4]] for row in samples]
        log(f"[paged] {s}: {results[s]['max_seqs']} sequences at most, "
            f"{results[s]['output_tok_s']:.1f} output tok/s")
    ratio = {k: results["paged"][k] / results["slots"][k]
             for k in ("max_seqs", "mean_seqs", "output_tok_s", "total_tok_s")}
    same = sum(tokens["paged"][k] == tokens["slots"].get(k) for k in tokens["paged"])

    # prefix caching: one system prompt, then each request's own part
    rng = np.random.default_rng(args.seed + 2)
    system = rng.integers(0, V, sys_len).tolist()
    shared = [replace(r, prompt_ids=system + r.prompt_ids)
              for r in make_workload(n_pre, math.inf, V, user, output, args.seed + 3)]
    pre = replace(base, max_num_seqs=min(base.max_num_seqs, d["prefix_max_seqs"]),
                  max_model_len=L_pre)
    prefix, prefix_tokens = {}, {}
    for on in (True, False):
        key, cfg = "cache_on" if on else "cache_off", replace(pre, enable_prefix_caching=on)
        run_engine(model, warm, device, cfg)
        log(f"[paged] prefix caching {'on' if on else 'off'}: {n_pre} requests sharing "
            f"{sys_len} tokens ...")
        prefix[key], prefix_tokens[key], _ = run_engine(model, shared, device, cfg)
    pre_ratio = {"output_tok_s": prefix["cache_on"]["output_tok_s"]
                 / prefix["cache_off"]["output_tok_s"],
                 "ttft_p50": prefix["cache_off"]["ttft_s"]["p50"]
                 / prefix["cache_on"]["ttft_s"]["p50"]}
    across = across_calls(model, args.repeat_system_len, user.lo, base.block_size, args.seed)
    result = {
        "suite": NAME, "env": env,
        "config": {"model": name, "device": str(device),
                   "dtype": str(model.dtype).replace("torch.", ""), "num_requests": n_req,
                   "seed": args.seed, "prompt_len": vars(prompt), "output_len": vars(output),
                   "max_model_len": L, "budget_seqs": args.budget_seqs,
                   "kv_budget_tokens": budget, "max_seqs": base.max_num_seqs,
                   "block_size": base.block_size, "max_batched_tokens": mbt,
                   "kv_bytes_per_token": model.config.kv_bytes_per_token(
                       model.dtype.itemsize),
                   "prompt_tokens": sum(len(r.prompt_ids) for r in work),
                   "output_tokens": sum(r.max_tokens for r in work),
                   "prefix": {"requests": n_pre, "system_len": sys_len, "user_len": vars(user),
                              **{k: getattr(pre, k) for k in (
                                  "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                                  "block_size")}},
                   "decoding": "greedy, ignore_eos: every request makes its drawn length"},
        "results": results, "paged_over_slots": ratio,
        "same_tokens": {"same": same, "of": len(tokens["paged"])},
        "series": series,
        "prefix_caching": {**prefix, "on_over_off": pre_ratio,
                           "same_tokens": sum(prefix_tokens["cache_on"][k]
                                              == prefix_tokens["cache_off"][k]
                                              for k in prefix_tokens["cache_on"])},
        "across_calls": across,
        "kernels": KERNELS,
    }
    return finish(result, args, report)


def across_calls(model, system_len: int, user_len: int, block_size: int, seed: int) -> dict:
    """Two ``LLM.generate`` calls on one LLM, each one request: the same system prompt, then
    a user part of its own (greedy, 4 new tokens). -> TTFT and cached tokens of each call."""
    import numpy as np

    from ..llm import LLM
    from ..sampling import SamplingParams
    V, ctx = model.config.vocab_size, model.config.max_position_embeddings
    if system_len + user_len + 4 > ctx:
        raise ValueError(f"--repeat-system-len {system_len} + user part {user_len} + 4 new "
                         f"tokens exceed the context ({ctx})")
    rng = np.random.default_rng(seed + 4)
    system = rng.integers(0, V, system_len).tolist()
    llm = LLM.from_model(model, None, max_batch_size=1, block_size=block_size)
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    calls = []
    for k in range(2):
        log(f"[paged] across calls: call {k + 1}, {system_len}-token system prompt ...")
        prompt = system + rng.integers(0, V, user_len).tolist()
        o = llm.generate([prompt], sp, use_tqdm=False)[0]
        calls.append({"prompt_tokens": len(prompt), "num_cached_tokens": o.num_cached_tokens,
                      "ttft_s": o.metrics["ttft_s"]})
    return {"system_len": system_len, "user_len": user_len, "first": calls[0],
            "second": calls[1], "ttft_first_over_second": calls[0]["ttft_s"]
            / calls[1]["ttft_s"]}


def report(result: dict) -> str:
    c, res = result["config"], result["results"]
    rows = [[s, r["max_seqs"], f"{r['mean_seqs']:.1f}", f"{100 * r['waste_time_avg']:.1f}%",
             r["preemptions"], f"{r['output_tok_s']:.1f}", f"{r['total_tok_s']:.1f}",
             f"{r['duration_s']:.1f}"] for s, r in res.items()]
    env = result["env"]
    lines = [f"paged: {c['model']} on {env['gpu'] or env['cpu']} ({c['device']}, {c['dtype']}), "
             f"{c['num_requests']} requests at once, KV budget {c['kv_budget_tokens']} tokens "
             f"({c['budget_seqs']} x max_model_len {c['max_model_len']}), blocks of "
             f"{c['block_size']}",
             table(rows, ["store", "max seqs", "mean seqs", "KV waste", "preempted",
                          "out tok/s", "total tok/s", "time s"])]
    r = result["paged_over_slots"]
    lines.append(f"paged / slots: {r['max_seqs']:.1f}x the sequences at once (mean "
                 f"{r['mean_seqs']:.1f}x), {r['output_tok_s']:.2f}x output tok/s; same greedy "
                 f"tokens {result['same_tokens']['same']}/{result['same_tokens']['of']}")
    p = result["prefix_caching"]
    rows = [[k, p[k]["cached_prompt_tokens"], p[k]["fed_tokens"],
             f"{1e3 * p[k]['ttft_s']['p50']:.0f}", f"{1e3 * p[k]['ttft_s']['p99']:.0f}",
             f"{p[k]['output_tok_s']:.1f}", f"{p[k]['duration_s']:.1f}"]
            for k in ("cache_on", "cache_off")]
    lines += [f"prefix caching: {c['prefix']['requests']} requests sharing a "
              f"{c['prefix']['system_len']}-token system prompt",
              table(rows, ["prefix cache", "cached tokens", "fed tokens", "TTFT p50 ms",
                           "TTFT p99 ms", "out tok/s", "time s"]),
              f"cache on / off: {p['on_over_off']['output_tok_s']:.2f}x output tok/s, TTFT p50 "
              f"{p['on_over_off']['ttft_p50']:.2f}x shorter",
              f"kernels: {result['kernels']}"]
    a = result.get("across_calls")
    if a:    # absent from results saved before it existed
        lines.insert(-1, f"across calls (one LLM, {a['system_len']}-token system prompt): "
                     f"TTFT {1e3 * a['first']['ttft_s']:.0f} ms first call "
                     f"({a['first']['num_cached_tokens']} cached), "
                     f"{1e3 * a['second']['ttft_s']:.0f} ms second "
                     f"({a['second']['num_cached_tokens']} cached): "
                     f"{a['ttft_first_over_second']:.1f}x")
    return "\n".join(lines)
