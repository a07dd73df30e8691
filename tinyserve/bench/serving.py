"""Suite ``serving``: continuous vs static batching (and HF batched generate), one workload.

    python -m tinyserve.bench serving [--model smollm2] [--num-requests 48] [--rate inf]
        [--rates 1,2,4] [--sweep-requests 24] [--max-batch 16] [--max-batched-tokens 256]
        [--no-hf] [--threads N]

The workload is ``tinyserve.engine.workload.make_workload`` (seeded Poisson arrivals, lognormal
prompt and output lengths; see its docstring), played in real time through each system. All
decode greedily and generate exactly each request's drawn output length, so all do the same
work; only how it is batched differs:

    continuous   tinyserve.engine.LLMEngine: iteration-level scheduling, chunked prefill,
                 --max-batch sequences, --max-batched-tokens per step, a KV slot per sequence
                 (kv="slots": the paged store is the ``paged`` suite's subject)
    static       tinyserve.engine.StaticBatcher: the same engine with a static scheduling
                 policy: takes what has arrived (up to --max-batch), runs the batch to its
                 longest member, then the next batch; finished members hold their slot but
                 cost no compute, tokens are handed out as made (the generous variant)
    hf           HF transformers ``generate`` on the same static batches (left padding,
                 ``min_new_tokens = max_new_tokens`` = the batch's longest output): it returns
                 when the batch is done, so every member finishes then; its first token is
                 timed by a logits processor (called once the prefill's logits exist)

Throughput is measured at ``--rate`` (default inf: every request at t = 0, the offline
setting, where the system and not the arrivals sets the pace): output tokens/s and total
(prompt + output) tokens/s, and the ratios continuous / static and continuous / hf. The
latency sweep ``--rates`` runs continuous and static at each Poisson rate (a workload of
``--sweep-requests`` requests, same seed and lengths) and records TTFT, TPOT, queueing and
end-to-end p50/p99 (HF only at ``--rate``, to keep the run short).
Greedy outputs of the systems are compared token for token (``same_tokens``): a check that
all did the same work, not a speed number.

Models: ``smollm2`` (default on CPU: the real weights; HF reads the same GGUF file), or on CUDA
``llama-3.2-1b`` / ``llama-2-7b`` (default there: the 1B) with random weights built by the
``decode`` suite's ``build_ours`` and ``hf.build_hf`` (HF holds the same tensors), or ``tiny`` (CI).
Figures (``plot``): throughput per system, and latency p50/p99 against arrival rate.
"""
from __future__ import annotations

import math
import time

from ..args import add_engine_args, positive_int
from ..timing import clock
from .common import comma_list, finish, free_memory, log, start, table

NAME = "serving"
HELP = "continuous vs static batching vs HF batched generate: throughput, latency vs rate"
COMMON = ("device", "threads", "seed", "figures")
# the suite's own spelling of the engine's flags (older command lines keep working)
FLAG_SPELLING = {"max_num_seqs": "--max-batch", "max_num_batched_tokens": "--max-batched-tokens"}

SYSTEMS = ("continuous", "static", "hf")


def add_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help="smollm2 (default on CPU), llama-3.2-1b (default on CUDA), llama-2-7b, "
                        "tiny")
    p.add_argument("--num-requests", type=positive_int, default=None,
                   help="requests of the throughput run (default: 48 CPU, 128 CUDA)")
    p.add_argument("--sweep-requests", type=positive_int, default=None,
                   help="requests per point of the latency sweep (default: 24 CPU, 64 CUDA)")
    p.add_argument("--rate", type=float, default=math.inf,
                   help="arrival rate of the throughput run, requests/s (default inf: all at "
                        "once)")
    p.add_argument("--rates", default=None,
                   help="comma list of arrival rates for the latency sweep (default: 1,2,4 on "
                        "CPU, 4,8,16 on CUDA; '' = no sweep)")
    p.add_argument("--prompt-len", default=None,
                   help="median,sigma,lo,hi of the lognormal prompt lengths (default "
                        "32,0.8,4,256 on CPU; 256,0.8,16,1024 on CUDA)")
    p.add_argument("--output-len", default=None,
                   help="median,sigma,lo,hi of the output lengths (default 24,1.0,2,160 on CPU; "
                        "128,1.0,8,512 on CUDA)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    add_engine_args(p, *FLAG_SPELLING, flags=FLAG_SPELLING).description = (
        "sequences per batch of every system, tokens per step of the continuous one "
        "(default: 16 and 256 on CPU, 32 and 2048 on CUDA)")


_CPU = dict(model="smollm2", num_requests=48, sweep_requests=24, rates="1,2,4",
            prompt_len="32,0.8,4,256", output_len="24,1.0,2,160", max_batch=16,
            max_batched_tokens=256)
_CUDA = dict(model="llama-3.2-1b", num_requests=128, sweep_requests=64, rates="4,8,16",
             prompt_len="256,0.8,16,1024", output_len="128,1.0,8,512", max_batch=32,
             max_batched_tokens=2048)


def length_dist(s: str, what: str):
    from ..engine.workload import Lengths
    try:
        med, sigma, lo, hi = s.split(",")
        return Lengths(float(med), float(sigma), int(lo), int(hi))
    except ValueError as e:
        raise ValueError(f"--{what}: expected median,sigma,lo,hi (e.g. 32,0.8,4,256), got "
                         f"{s!r} ({e})") from None


# ---- the models ---------------------------------------------------------------------------------
def load_models(name: str, device, want_hf: bool, seed: int):
    """-> (ours, tokenizer or None, hf model or None, why hf is missing)."""
    import torch

    from .decode import build_ours, named_configs
    from .hf import build_hf, load_hf
    if name == "smollm2":
        from ..loader import load_model, resolve_source
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, tok = load_model(name, device=device, dtype=dtype)
        load = lambda: load_hf(resolve_source(name), dtype, device)   # noqa: E731
    else:
        named = named_configs()
        if name not in named:
            raise ValueError(f"unknown model {name!r}; available: smollm2, {', '.join(named)}")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, tok = build_ours(named[name], device, dtype, seed=seed), None
        load = lambda: build_hf(model)                                 # noqa: E731
    if not want_hf:
        return model, tok, None, "--no-hf"
    try:
        return model, tok, load(), None
    except Exception as e:   # no transformers / no gguf package: record why and go on
        log(f"[serving] HF model unavailable: {type(e).__name__}: {e}")
        return model, tok, None, f"{type(e).__name__}: {e}"[:300]


class HFBatcher:
    """HF ``generate`` behind the engine's add_request / step / has_unfinished: each step
    runs one whole static batch (what has arrived, up to ``max_batch_size``)."""

    def __init__(self, hf, max_batch_size: int, pad_id: int = 0):
        self.hf, self.max_batch_size, self.pad_id = hf, max_batch_size, pad_id
        self.waiting, self.batches = [], 0

    def add_request(self, request_id, prompt, params, arrival_time=None):
        from ..engine.sequence import SequenceMetrics
        self.waiting.append((request_id, list(prompt), params.max_tokens,
                             SequenceMetrics(time.perf_counter() if arrival_time is None
                                             else arrival_time,
                                             prompt_tokens=len(prompt))))

    def has_unfinished(self) -> bool:
        return bool(self.waiting)

    def step(self):
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        from ..engine.llm_engine import StepOutput
        batch, self.waiting = (self.waiting[:self.max_batch_size],
                               self.waiting[self.max_batch_size:])
        dev = self.hf.device
        T = max(len(p) for _, p, _, _ in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (_, p, _, _) in enumerate(batch):      # left padding: every row ends at T
            ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = 1
        first = []

        class Clock(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if not first:       # the prefill's logits: wait for the GPU to have them
                    first.append(clock(scores.device))
                return scores
        N = max(n for _, _, n, _ in batch)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.hf.generate(ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                   max_new_tokens=N, min_new_tokens=N, pad_token_id=self.pad_id,
                                   logits_processor=LogitsProcessorList([Clock()]),
                                   temperature=None, top_p=None, top_k=None)
        end = time.perf_counter()
        outs = []
        for b, (rid, _, n, m) in enumerate(batch):
            m.first_scheduled_time, m.first_scheduled_step = start, self.batches
            m.first_token_time, m.first_token_step = first[0], self.batches
            m.finish_time, m.finish_step, m.output_tokens = end, self.batches, n
            outs.append(StepOutput(rid, 0, out[b, T:T + n].tolist(), "", "length", m))
        self.batches += 1
        return outs


# ---- running ---------------------------------------------------------------------------------
def make_server(system: str, model, hf, config):
    """``config``: the continuous engine's EngineConfig; its max_num_seqs caps every batch."""
    from ..engine import LLMEngine, StaticBatcher
    if system == "continuous":
        return LLMEngine(model, None, config=config)
    if system == "static":
        return StaticBatcher(model, None, config.max_num_seqs,
                             max_model_len=config.max_model_len)
    return HFBatcher(hf, config.max_num_seqs)


def run_system(system, model, hf, workload, config) -> tuple[dict, dict]:
    """-> (summary, {request_id: output token ids})."""
    from ..engine.workload import run_workload, summarize
    run = run_workload(make_server(system, model, hf, config), workload)
    return summarize(run), {r["request_id"]: r["token_ids"] for r in run["requests"]}


def _same(a: dict, b: dict) -> dict:
    same = sum(a[k] == b.get(k) for k in a)
    return {"same_tokens": same, "of": len(a)}


def run(args) -> dict:
    from ..engine.config import EngineConfig
    from ..engine.workload import Lengths, make_workload
    device, env = start(args)
    d = _CUDA if device.type == "cuda" else _CPU
    name = (args.model or d["model"]).lower()
    prompt = length_dist(args.prompt_len or d["prompt_len"], "prompt-len")
    output = length_dist(args.output_len or d["output_len"], "output-len")
    rates = comma_list(d["rates"] if args.rates is None else args.rates, "rates", float,
                       positive=True, empty_ok=True)
    n_req = args.num_requests or d["num_requests"]
    n_sweep = args.sweep_requests or d["sweep_requests"]
    if not args.rate > 0:
        raise ValueError(f"--rate must be > 0 (inf: all at once), got {args.rate}")
    # the continuous engine: a KV slot per sequence (the paged store is the paged suite's)
    cfg = EngineConfig.from_args(args, kv="slots", max_num_seqs=d["max_batch"],
                                 max_num_batched_tokens=d["max_batched_tokens"],
                                 max_model_len=prompt.hi + output.hi)
    log(f"[serving] loading {name} on {device} ...")
    model, tok, hf, hf_skip = load_models(name, device, not args.no_hf, args.seed)
    ctx = model.config.max_position_embeddings
    if prompt.hi + output.hi > ctx:
        raise ValueError(f"prompt hi {prompt.hi} + output hi {output.hi} exceed the context "
                         f"({ctx})")
    a = {"max_batch": cfg.max_num_seqs, "max_batched_tokens": cfg.max_num_batched_tokens,
         "max_model_len": cfg.max_model_len}
    V = model.config.vocab_size

    def wl(rate, n=n_req, seed=args.seed, out=output):
        return make_workload(n, rate, V, prompt, out, seed)
    systems = [s for s in SYSTEMS if s != "hf" or hf is not None]
    for s in systems:   # warm-up (short outputs): first calls allocate, compile and autotune
        log(f"[serving] warm-up {s}")
        run_system(s, model, hf, wl(math.inf, min(4, n_req), args.seed + 1,
                                    Lengths(4, 0.0, 2, 4)), cfg)
    work = wl(args.rate)
    results, tokens = {}, {}
    for s in systems:
        log(f"[serving] {s}: {n_req} requests at rate {args.rate}/s ...")
        results[s], tokens[s] = run_system(s, model, hf, work, cfg)
        log(f"[serving] {s}: {results[s]['output_tok_s']:.1f} output tok/s in "
            f"{results[s]['duration_s']:.1f} s")
    if hf is None:
        results["hf"] = {"skipped": hf_skip}
    ratio = {f"continuous_over_{s}": {k: results["continuous"][k] / results[s][k]
                                      for k in ("output_tok_s", "total_tok_s")}
             for s in ("static", "hf") if "output_tok_s" in results.get(s, {})}
    agree = {s: _same(tokens["continuous"], tokens[s]) for s in systems if s != "continuous"}
    sweep = []
    for r in rates:
        point = {"rate": r}
        for s in ("continuous", "static"):
            log(f"[serving] sweep: {s} at {r}/s ...")
            point[s] = run_system(s, model, None, wl(r, n_sweep), cfg)[0]
        sweep.append(point)
    result = {
        "suite": NAME, "env": env,
        "config": {"model": name, "device": str(device),
                   "dtype": str(model.dtype).replace("torch.", ""),
                   "num_requests": n_req, "rate": args.rate, "rates": rates,
                   "sweep_requests": n_sweep, "seed": args.seed,
                   "prompt_len": vars(prompt), "output_len": vars(output), **a,
                   "prompt_tokens": sum(len(r.prompt_ids) for r in work),
                   "output_tokens": sum(r.max_tokens for r in work),
                   "decoding": "greedy, ignore_eos: every request makes its drawn length"},
        "results": results, "ratio": ratio, "agreement_with_continuous": agree,
        "sweep": sweep,
    }
    finish(result, args, report)
    del model, hf
    free_memory(device)
    return result


def _ms(x):
    return "-" if x is None else f"{1e3 * x:.0f}"


def report(result: dict) -> str:
    c, res, env = result["config"], result["results"], result["env"]
    rows = []
    for s in SYSTEMS:
        r = res.get(s, {})
        if "skipped" in r or not r:
            rows.append([s, "skipped", "", "", "", "", ""])
            continue
        rows.append([s, f"{r['output_tok_s']:.1f}", f"{r['total_tok_s']:.1f}",
                     _ms(r["ttft_s"]["p50"]), _ms(r["ttft_s"]["p99"]),
                     _ms(r["tpot_s"] and r["tpot_s"]["p50"]), f"{r['duration_s']:.1f}"])
    head = (f"serving: {c['model']} on {env['gpu'] or env['cpu']} ({c['device']}, {c['dtype']}), "
            f"{c['num_requests']} requests at {c['rate']}/s, {c['prompt_tokens']} prompt + "
            f"{c['output_tokens']} output tokens, batch {c['max_batch']}")
    lines = [head, table(rows, ["system", "out tok/s", "total tok/s", "TTFT p50 ms",
                                "TTFT p99 ms", "TPOT p50 ms", "time s"])]
    for k, v in result["ratio"].items():
        lines.append(f"{k}: {v['output_tok_s']:.2f}x output tok/s")
    for p in result["sweep"]:
        lines.append(f"rate {p['rate']}/s: " + ", ".join(
            f"{s} TTFT p50/p99 {_ms(p[s]['ttft_s']['p50'])}/{_ms(p[s]['ttft_s']['p99'])} ms, "
            f"e2e p99 {p[s]['e2e_s']['p99']:.1f} s" for s in ("continuous", "static")))
    return "\n".join(lines)


def plot(result: dict, fig_dir) -> list:
    """Throughput bars per system, and TTFT / end-to-end latency (p50, p99) vs arrival rate."""
    from .plots import figure_path, pyplot, save, subtitle
    plt = pyplot()
    res = result["results"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [s for s in SYSTEMS if "output_tok_s" in res.get(s, {})]
    bars = axes[0].bar(names, [res[s]["output_tok_s"] for s in names],
                       color=["C0", "C1", "C2"][:len(names)])
    for b, s in zip(bars, names):
        axes[0].annotate(f"{res[s]['output_tok_s']:.1f}", (b.get_x() + b.get_width() / 2,
                                                           b.get_height()), ha="center",
                         va="bottom", fontsize=8)
    axes[0].set_ylabel("output tokens / s")
    axes[0].set_title(f"throughput, {result['config']['num_requests']} requests at once",
                      fontsize=9)
    rates = [p["rate"] for p in result["sweep"]]
    for ax, key, label in ((axes[1], "ttft_s", "time to first token (s)"),
                           (axes[2], "e2e_s", "end-to-end latency (s)")):
        for s, color in (("continuous", "C0"), ("static", "C1")):
            for q, ls in (("p50", "-"), ("p99", "--")):
                ax.plot(rates, [p[s][key][q] for p in result["sweep"]], ls, color=color,
                        marker="o", label=f"{s} {q}")
        ax.set_xlabel("arrival rate (requests / s)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    c = result["config"]
    fig.suptitle(f"serving {c['model']} {c['dtype']} on {c['device']}, batch up to "
                 f"{c['max_batch']}: every system measured in the same run\n{subtitle(result)}",
                 fontsize=9)
    fig.tight_layout()
    return [save(fig, figure_path(result, fig_dir))]
