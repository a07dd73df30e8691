"""Serving workloads: seeded arrivals and lengths, a real-time driver, metrics, slot timelines.

The workload (``make_workload``), reproducible from its seed:
  * arrivals: a Poisson process of ``rate`` requests per second, i.e. independent exponential
    gaps of mean 1 / rate between consecutive requests (``rate=inf``: all at t = 0, the offline
    throughput setting);
  * lengths, prompt and output alike: lognormal, ``log L ~ Normal(log median, sigma^2)``,
    rounded and clipped to [lo, hi]. A heavy right tail: with sigma = 1 the mean is
    e^(1/2) = 1.65x the median and the 99th percentile e^2.33 = 10x the median, the shape of
    real chat traces (most answers short, a few very long). That tail is what hurts static
    batching: a batch lasts as long as its longest member;
  * prompt tokens: uniform over the vocabulary (the speed of a step does not depend on which
    ids they are); every request generates exactly its drawn output length (``ignore_eos``),
    as serving benchmarks do, so all systems do the same work.

``run_workload`` plays it in real time against anything with ``add_request / step /
has_unfinished`` (``LLMEngine``, ``StaticBatcher``): a request is handed over once its arrival
time has passed; an idle server sleeps until the next arrival. ``summarize`` turns the
per-request records into the usual serving metrics:
  throughput      output tokens / s and (prompt + output) tokens / s over the whole run
  TTFT            time to first token: arrival -> first output token
  TPOT            time per output token after the first: (finish - first token) / (n - 1)
  queueing time   arrival -> first scheduled in a step
  end-to-end      arrival -> last token
each with mean, p50 and p99. ``slot_timeline`` turns a run's step records into the grid
slot x step -> request that ``draw_timeline`` draws (the source article's T0...T7 picture).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..sampling import SamplingParams


@dataclass
class Request:
    request_id: int
    arrival_s: float                # seconds after the start of the run
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class Lengths:
    """Lognormal lengths: median, shape sigma, clipped to [lo, hi]."""
    median: float
    sigma: float
    lo: int
    hi: int

    def __post_init__(self):
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.lo <= self.hi):
            raise ValueError(f"lengths need median > 0, sigma >= 0, 1 <= lo <= hi, got {self}")

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = rng.lognormal(math.log(self.median), self.sigma, n)
        return np.clip(np.rint(x), self.lo, self.hi).astype(int)


def make_workload(num_requests: int, rate: float, vocab_size: int, prompt: Lengths,
                  output: Lengths, seed: int = 0) -> list[Request]:
    """``num_requests`` requests, Poisson arrivals at ``rate``/s (inf: all at once)."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (inf: all at t=0), got {rate}")
    rng = np.random.default_rng(seed)
    gaps = (np.zeros(num_requests) if math.isinf(rate)
            else rng.exponential(1.0 / rate, num_requests))
    arrivals = np.cumsum(gaps) - gaps[0]          # the first request opens the run
    p_len, o_len = prompt.draw(rng, num_requests), output.draw(rng, num_requests)
    return [Request(i, float(arrivals[i]), rng.integers(0, vocab_size, p_len[i]).tolist(),
                    int(o_len[i])) for i in range(num_requests)]


def greedy_params(req: Request) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True)


def run_workload(server, requests: list[Request]) -> dict:
    """Play ``requests`` in real time through ``server``; -> records for ``summarize``.

    Times in the records are seconds since the start of the run; each record also keeps the
    request's output ``token_ids``."""
    pending = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    t0 = time.perf_counter()
    done, tokens, i = {}, {}, 0
    while i < len(pending) or server.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(pending) and pending[i].arrival_s <= now:
            r = pending[i]
            server.add_request(r.request_id, r.prompt_ids, greedy_params(r),
                               arrival_time=t0 + r.arrival_s)
            i += 1
        if not server.has_unfinished():           # idle: wait for the next arrival
            time.sleep(max(0.0, pending[i].arrival_s - (time.perf_counter() - t0)))
            continue
        for o in server.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
            if o.finish_reason is not None:
                done[o.request_id] = o.metrics
    duration = time.perf_counter() - t0
    recs = []
    for r in requests:
        m = done[r.request_id]
        recs.append({"request_id": r.request_id, "prompt_tokens": len(r.prompt_ids),
                     "output_tokens": m.output_tokens,
                     **{k: None if getattr(m, k) is None else getattr(m, k) - t0
                        for k in ("arrival_time", "first_scheduled_time", "first_token_time",
                                  "finish_time")},
                     "first_scheduled_step": m.first_scheduled_step,
                     "finish_step": m.finish_step, "token_ids": tokens[r.request_id]})
    return {"duration_s": duration, "steps": getattr(server, "step_count", None),
            "requests": recs}


def replay_by_steps(server, arrivals) -> dict:
    """Deterministic driver: ``arrivals`` = [(step, request_id, prompt, params), ...], each
    request handed over just before that engine step; run until all are done.
    -> {(request_id, index): {"token_ids", "text", "finish_reason", "metrics"}}."""
    todo = sorted(arrivals, key=lambda a: a[0])
    outs, i, step = {}, 0, 0
    while i < len(todo) or server.has_unfinished():
        while i < len(todo) and todo[i][0] <= step:
            server.add_request(*todo[i][1:])
            i += 1
        for o in server.step():
            d = outs.setdefault((o.request_id, o.index), {"token_ids": [], "text": "",
                                                          "finish_reason": None,
                                                          "metrics": None})
            d["token_ids"] += o.token_ids
            d["text"] += o.text_delta
            d["finish_reason"], d["metrics"] = o.finish_reason, o.metrics
        step += 1
    return outs


def _stats(vals) -> dict | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    a = np.asarray(vals, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def summarize(run: dict) -> dict:
    """Throughput and latency distributions of one ``run_workload`` result."""
    recs, dur = run["requests"], run["duration_s"]
    out_tok = sum(r["output_tokens"] for r in recs)
    all_tok = out_tok + sum(r["prompt_tokens"] for r in recs)

    def tpot(r):
        n = r["output_tokens"]
        return (r["finish_time"] - r["first_token_time"]) / (n - 1) if n > 1 else None
    return {
        "requests": len(recs), "duration_s": dur, "steps": run.get("steps"),
        "output_tokens": out_tok, "total_tokens": all_tok,
        "output_tok_s": out_tok / dur, "total_tok_s": all_tok / dur, "requests_s": len(recs) / dur,
        "ttft_s": _stats(r["first_token_time"] - r["arrival_time"] for r in recs),
        "tpot_s": _stats(tpot(r) for r in recs),
        "queue_s": _stats(r["first_scheduled_time"] - r["arrival_time"] for r in recs),
        "e2e_s": _stats(r["finish_time"] - r["arrival_time"] for r in recs),
    }


# ---- slot timelines ---------------------------------------------------------------------------
def slot_timeline(history, num_slots: int) -> list[list[tuple | None]]:
    """Step records -> grid[slot][step] = (request_id, kind) or None (slot free).

    kind: "prefill" (the step fed part of the prompt), "decode" (one token), "held" (the slot
    is occupied but its request computes nothing: a finished row in a static batch)."""
    grid = [[None] * len(history) for _ in range(num_slots)]
    for t, rec in enumerate(history):
        for rid, _index, slot, n, sampled in rec.entries:
            kind = ("held" if n == 0 else "decode" if n == 1 and sampled else "prefill")
            grid[slot][t] = (rid, kind)
    return grid


def draw_timeline(ax, grid, title: str = "", labels=None):
    """Draw a slot timeline: one row per slot, one column per step T0, T1, ...; a cell shows
    the request in the slot (hatched while prefilling, grey while held but idle)."""
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab20")
    steps = len(grid[0]) if grid else 0
    for s, row in enumerate(grid):
        for t, cell in enumerate(row):
            if cell is None:
                ax.add_patch(plt.Rectangle((t, s), 1, 1, fill=False, ec="0.85", lw=0.5))
                continue
            rid, kind = cell
            color = "0.8" if kind == "held" else cmap(rid % 20 if isinstance(rid, int) else 0)
            ax.add_patch(plt.Rectangle((t, s), 1, 1, fc=color, ec="white", lw=0.5,
                                       hatch="//" if kind == "prefill" else None))
            name = labels(rid) if labels else f"R{rid}"
            if steps <= 40:
                ax.text(t + 0.5, s + 0.5, name, ha="center", va="center", fontsize=6,
                        clip_on=True)
    ax.set_xlim(0, steps)
    ax.set_ylim(len(grid), 0)
    ax.set_yticks([s + 0.5 for s in range(len(grid))])
    ax.set_yticklabels([f"slot {s}" for s in range(len(grid))])
    ticks = range(0, steps, max(1, steps // 16))
    ax.set_xticks([t + 0.5 for t in ticks])
    ax.set_xticklabels([f"T{t}" for t in ticks], fontsize=7)
    ax.set_xlabel("engine step")
    ax.set_title(title, fontsize=9)
