"""Suite ``cpu``: SmolLM2 on the CPU from one GGUF file, tinyserve vs HF transformers vs llama.cpp.

    python -m tinyserve.bench cpu [--threads-list 1,2] [--max-tokens 64] [--prefill-tokens 512]

Engines, all reading the same .gguf file:
    tinyserve        ``LLM(model)``: the native CPU path (int4/int8 kernels, bf16 activations)
    tinyserve-fp32   ``LLM(model, dtype="float32")``: the dequantized fp32 reference
    transformers     HF transformers' own reading of the file (fp32), ``generate``
    llama.cpp        llama-cpp-python (optional: ``pip install llama-cpp-python``; skipped with
                     a line saying so when it is not installed)

Every engine is timed the same way, from the caller, per thread count (1 and all usable cores by
default; never more threads than cores, see ``tinyserve.threads``): a whole greedy generation
of exactly n new tokens (EOS ignored, nothing cached between calls: tinyserve's prefix cache is
off, llama.cpp is reset, HF keeps nothing), median of ``--repeats`` after a warm-up, engines
alternating so drift hits all alike.
    decode   (N - 1) / (t(N) - t(1)) on the chat prompt: the per-token rate once prefill is paid
    prefill  P / t(1) on a P-token prompt (real text): prompt tokens per second
    e2e      N / t(N)
A fresh process per engine measures start-up (import, load, first token) and peak resident
memory (``ru_maxrss``) at one thread. The bytes each engine's weights hold give the roofline:
decode reads every weight once per token, so tokens/s <= memory bandwidth / weight bytes.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from ..args import positive_int
from ..threads import usable_cores
from .common import comma_list, finish, load_avg, log, package_version, start, table

NAME = "cpu"
HELP = "SmolLM2 on the CPU: tinyserve native vs its fp32 reference vs HF vs llama.cpp"
COMMON = ("figures",)
ENGINES = ("tinyserve", "tinyserve-fp32", "transformers", "llama.cpp")
CHAT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2", help="named model or .gguf file")
    p.add_argument("--threads-list", default=None,
                   help="comma-separated thread counts (default: 1 and the usable cores)")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="new tokens (64)")
    p.add_argument("--prefill-tokens", type=positive_int, default=512,
                   help="prompt tokens of the prefill measurement (512)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs (3)")
    p.add_argument("--engines", default=",".join(ENGINES), help="subset of " + ",".join(ENGINES))
    p.add_argument("--no-startup", action="store_true",
                   help="skip the fresh-process start-up and memory measurement")


# ---- engines: generate(ids, n) runs one greedy generation of exactly n new tokens ----------
class Tinyserve:
    def __init__(self, path, threads, dtype=None):
        from .. import LLM, SamplingParams
        self.llm = LLM(str(path), dtype=dtype, threads=threads, enable_prefix_caching=False)
        self.params = SamplingParams

    def generate(self, ids, n):
        p = self.params(temperature=0.0, max_tokens=n, ignore_eos=True)
        return self.llm.generate([list(ids)], p, use_tqdm=False)[0].outputs[0].token_ids

    def weight_bytes(self):
        from ..quant.cpu_native import native_nbytes
        return native_nbytes(self.llm.model)


class Transformers:
    def __init__(self, path, threads):
        import torch

        from .hf import load_hf
        torch.set_num_threads(threads)
        self.model = load_hf(path, torch.float32, "cpu")

    def generate(self, ids, n):
        import torch
        x = torch.tensor([list(ids)])
        with torch.no_grad():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                                      temperature=None, top_p=None, top_k=None)
        return out[0, x.shape[1]:].tolist()

    def weight_bytes(self):
        return sum(p.nbytes for p in self.model.parameters())


class LlamaCpp:
    def __init__(self, path, threads):
        from llama_cpp import Llama
        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                         n_ctx=2048, n_batch=512, verbose=False)
        self.path = path

    def generate(self, ids, n):
        self.llm.reset()   # no KV reuse between calls
        out = []
        for tok in self.llm.generate(list(ids), temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out

    def weight_bytes(self):
        return os.path.getsize(self.path)   # it runs the file's blocks as they are


def _make(name, path, threads):
    if name == "tinyserve":
        return Tinyserve(path, threads)
    if name == "tinyserve-fp32":
        return Tinyserve(path, threads, "float32")
    if name == "transformers":
        return Transformers(path, threads)
    return LlamaCpp(path, threads)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure_threads(engines: dict, chat_ids, long_ids, N, repeats) -> dict:
    """Median t(1), t(N) on the chat prompt and t(1) on the long prompt, per engine."""
    for e in engines.values():   # warm-up: first calls build caches, engines, kernels
        e.generate(long_ids, 1)
        e.generate(chat_ids, 2)
    times = {k: {"t1": [], "tN": [], "prefill": []} for k in engines}
    for r in range(repeats):
        for k, e in engines.items():
            times[k]["t1"].append(_timed(lambda: e.generate(chat_ids, 1)))
            times[k]["tN"].append(_timed(lambda: e.generate(chat_ids, N)))
            times[k]["prefill"].append(_timed(lambda: e.generate(long_ids, 1)))
            log(f"[cpu]   run {r + 1}/{repeats} {k}: {N / times[k]['tN'][-1]:.1f} tok/s e2e")
    out = {}
    for k, t in times.items():
        t1, tN, tp = (statistics.median(t[x]) for x in ("t1", "tN", "prefill"))
        out[k] = {"t1_s": t1, "tN_s": tN, "prefill_s": tp, "runs": t,
                  "decode_tok_s": (N - 1) / (tN - t1) if tN > t1 else None,
                  "prefill_tok_s": len(long_ids) / tp, "e2e_tok_s": N / tN,
                  "weight_bytes": engines[k].weight_bytes()}
    return out


# ---- start-up and memory, each engine in a fresh process -----------------------------------
_STARTUP = r"""
import json, sys, time
t0 = time.perf_counter()
engine, path = sys.argv[1], sys.argv[2]
if engine == "llama.cpp":
    from llama_cpp import Llama
    t1 = time.perf_counter()
    m = Llama(model_path=path, n_threads=1, n_threads_batch=1, n_ctx=2048, verbose=False)
    t2 = time.perf_counter()
    next(iter(m.generate(m.tokenize(b"Hello"), temp=0.0, top_k=1)))
else:
    import torch
    t1 = time.perf_counter()
    from tinyserve import LLM, SamplingParams
    m = LLM(path, threads=1, dtype=None if engine == "tinyserve" else "float32")
    t2 = time.perf_counter()
    m.generate("Hello", SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2,
                  "load_to_first_token_s": t3 - t1,
                  # VmHWM: peak resident set of this process image (ru_maxrss would carry
                  # the parent's peak over fork + exec)
                  "peak_rss_MB": int(open("/proc/self/status").read().split("VmHWM:")[1]
                                     .split()[0]) / 1024}))
"""


def measure_startup(engine: str, path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _STARTUP, engine, str(path)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the suite -------------------------------------------------------------------------------
def _available(name) -> str | None:
    """None if the engine can run here, else why not."""
    mod = {"llama.cpp": "llama_cpp", "transformers": "transformers"}.get(name)
    if mod is None:
        return None
    try:
        __import__(mod)
    except ImportError:
        return (f"{mod} is not installed (pip install "
                f"{'llama-cpp-python' if mod == 'llama_cpp' else mod})")
    return None


def run(args) -> dict:
    import torch

    from ..loader import resolve_source
    from ..quant.calib import heldout_ids
    from .roofline import measure as roofline
    args.device = "cpu"
    device, env = start(args)
    cores = usable_cores()
    threads = comma_list(args.threads_list or ",".join(sorted({"1", str(cores)})),
                         "--threads-list", int, positive=True)
    if max(threads) > cores:
        raise ValueError(f"--threads-list {threads}: this process may use {cores} cores; "
                         "more threads than cores makes every engine collapse")
    names = comma_list(args.engines, "--engines")
    bad = [n for n in names if n not in ENGINES]
    if bad:
        raise ValueError(f"--engines: unknown {bad}; choose from {ENGINES}")
    skipped = {n: why for n in names if (why := _available(n))}
    for n, why in skipped.items():
        log(f"[cpu] {n} skipped: {why}")
    names = [n for n in names if n not in skipped]
    path = resolve_source(args.model)

    from ..tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(path)
    chat_ids = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True))
    long_ids = heldout_ids(tok, args.prefill_tokens).tolist()
    per_threads = {}
    for t in threads:
        torch.set_num_threads(t)
        log(f"[cpu] {t} thread(s), load average {load_avg()}")
        engines = {n: _make(n, path, t) for n in names}
        per_threads[str(t)] = {"roofline": roofline("cpu"), **measure_threads(
            engines, chat_ids, long_ids, args.max_tokens, args.repeats)}
        del engines
    startup = {} if args.no_startup else {n: measure_startup(n, path) for n in names
                                          if n != "transformers"}
    result = {"suite": NAME, "env": {**env, "load_avg_1m_end": load_avg()},
              "config": {"model": args.model, "source": str(path), "threads": threads,
                         "max_tokens": args.max_tokens, "chat_prompt_tokens": len(chat_ids),
                         "prefill_tokens": len(long_ids), "repeats": args.repeats,
                         "engines": names, "skipped": skipped,
                         "llama_cpp_python": package_version("llama-cpp-python")},
              "results": per_threads, "startup": startup,
              "ratios": ratios(per_threads)}
    return finish(result, args, report)


def ratios(per_threads: dict) -> dict:
    """tinyserve / peer, per thread count and rate."""
    out = {}
    for t, res in per_threads.items():
        ours = res.get("tinyserve")
        for peer in ("llama.cpp", "transformers", "tinyserve-fp32"):
            if ours and peer in res:
                out.setdefault(t, {})[peer] = {
                    k: ours[k] / res[peer][k] if ours[k] and res[peer][k] else None
                    for k in ("decode_tok_s", "prefill_tok_s", "e2e_tok_s")}
    return out


def report(result: dict) -> str:
    c = result["config"]
    rows = []
    for t, res in result["results"].items():
        bw = res["roofline"]["copy_bandwidth_Bps"]
        for n in c["engines"]:
            r = res[n]
            rows.append([t, n, f"{r['decode_tok_s']:.1f}", f"{r['prefill_tok_s']:.0f}",
                         f"{r['e2e_tok_s']:.1f}", f"{r['weight_bytes'] / 1e6:.0f}",
                         f"{bw / r['weight_bytes']:.0f}"])
    lines = [f"cpu: {c['model']}, {c['chat_prompt_tokens']}-token chat prompt + "
             f"{c['max_tokens']} new (greedy), prefill of {c['prefill_tokens']} tokens, median "
             f"of {c['repeats']}; {result['env'].get('cpu')}",
             table(rows, ["threads", "engine", "decode tok/s", "prefill tok/s", "e2e tok/s",
                          "weights MB", "BW/weights tok/s"])]
    for t, peers in result["ratios"].items():
        for peer, r in peers.items():
            lines.append(f"{t} thread(s): tinyserve / {peer}: decode "
                         f"{r['decode_tok_s'] or 0:.2f}x, prefill {r['prefill_tok_s'] or 0:.2f}x")
    for n, s in result["startup"].items():
        lines.append(f"start-up {n}: " + (s["error"] if "error" in s else
                     f"import {s['import_s']:.2f} s, load {s['load_s']:.2f} s, first token "
                     f"{s['first_token_s']:.2f} s, peak RSS {s['peak_rss_MB']:.0f} MB"))
    for n, why in c["skipped"].items():
        lines.append(f"{n} skipped: {why}")
    return "\n".join(lines)


def plot(result: dict, fig_dir) -> list:
    """Decode and prefill tokens/s per engine, grouped by thread count."""
    from .plots import figure_path, pyplot, save, subtitle
    plt = pyplot()
    c, res = result["config"], result["results"]
    groups = [f"{t} thread{'s' if t != '1' else ''}" for t in res]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, ylabel in ((axes[0], "decode_tok_s", "decode tokens / s"),
                            (axes[1], "prefill_tok_s", f"prefill tokens / s "
                                                       f"({c['prefill_tokens']}-token prompt)")):
        width = 0.8 / len(c["engines"])
        for j, n in enumerate(c["engines"]):
            vals = [res[t][n][key] or 0 for t in res]
            bars = ax.bar([i - 0.4 + width * (j + 0.5) for i in range(len(groups))], vals,
                          width, label=n)
            for b, v in zip(bars, vals):
                ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2 on the CPU, one GGUF file, greedy, median of {c['repeats']} "
                 f"(same run)\n{subtitle(result)}", fontsize=9)
    fig.tight_layout()
    return [save(fig, figure_path(result, fig_dir))]
