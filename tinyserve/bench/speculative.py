"""Suite ``speculative``: acceptance, tokens per step and speedup of speculative decoding.

    python -m tinyserve.bench speculative [--k 4] [--max-tokens 64] [--prompts 3]
        [--tasks chat,copy,code] [--drafts prompt-lookup,early-exit:8,int4,head]
        [--device auto] [--model smollm2] [--threads N]

**CPU (the real model).** Per task type (chat questions; copy-heavy: edit or reformat a given
text; code) and per draft, every prompt is decoded greedily by plain decoding
(``tinyserve.generate.decode_loop``) and by ``generate_speculative``; the outputs must be
identical token for token (``identical`` in the JSON). The draft "none" proposes nothing: the
speculative loop then decodes one token per step, which measures its own overhead. Reported:

    alpha          accepted / drafted
    alpha_cond     P(accept | all earlier drafts accepted), the alpha of the formula
    tok/step       tokens per target verify step, against (1 - a^(K+1)) / (1 - a), a = alpha_cond
    verify cost    time of one verify step (K + 1 positions) / one plain decode step
    draft cost     draft time per proposed token / one plain decode step
    speedup        plain decode time / speculative time, same prompts, same tokens
    predicted      tok/step / (verify cost + K x draft cost), from the measured parts

**GPU (``--device cuda``).** SmolLM2's file does not travel to the GPU machine, so the target
is a random-weight model of a real shape (``--gpu-models``, built as the ``decode`` suite
does). Timed there: one plain decode step (CUDA graph and eager), one verify of K + 1 tokens
(eager: ``Transformer.forward`` synchronises with the host, so it cannot be captured), and one
step of each draft of that shape (early exit and int4 copy: CUDA graph; head: eager). The alpha
and tokens per step come from the CPU result file (``--alpha-from``), and the JSON says so:
the predicted speedup is tok/step x t(step) / (t(verify) + K x t(draft)).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .common import DEFAULT_OUT, log, positive_int, set_threads, table

NAME = "speculative"
HELP = "speculative decoding: alpha, tokens per step, draft cost and speedup per draft and task"

# Held out from the head's training prompts (tinyserve.speculative.data): other questions,
# other texts.
_TEXT = ("The old lighthouse stood at the edge of the cliff for more than a hundred years. "
         "Every night its keeper climbed the narrow stairs, cleaned the great lens and lit the "
         "lamp, so that the fishing boats could find their way home through the fog. When the "
         "keeper grew old, the town decided to replace the lamp with an automatic light, but "
         "the people still called the building by his name.")
_TYPOS = _TEXT.replace("hundred", "hundered").replace("narrow", "narow").replace(
    "fishing", "fishng").replace("automatic", "automatc").replace("people", "poeple")
PROMPTS = {
    "chat": ["What are some good habits for staying productive while working from home?",
             "Explain how a refrigerator keeps food cold.",
             "Give me a simple recipe for pancakes.",
             "Why do leaves change color in autumn?",
             "How can I improve my public speaking skills?"],
    "copy": [f"Rewrite the following text, correcting the spelling mistakes:\n\n{_TYPOS}",
             f"Repeat the following text, replacing the word 'keeper' with 'guardian':\n\n{_TEXT}",
             f"Copy the following text and put each sentence on its own line:\n\n{_TEXT}",
             f"Summarize the following text, keeping its wording where you can:\n\n{_TEXT}",
             "Add a docstring to this function and return it unchanged otherwise:\n\n"
             "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
             "    return total / len(values)\n"],
    "code": ["Write a Python function that checks whether a string is a palindrome.",
             "Write a Python class for a stack with push, pop and peek methods.",
             "Write a Python function that returns the n-th Fibonacci number.",
             "Write a Python function that counts the words in a text file.",
             "Write a Python function that merges two sorted lists into one sorted list."],
}
DEFAULT_DRAFTS = "none,prompt-lookup,early-exit:8,int4,head"
DEFAULT_GPU_MODELS = "llama-3.2-1b,llama-2-7b"


def add_arguments(p) -> None:
    p.add_argument("--k", default=None, help="draft tokens per step, a comma list (default: 4 on "
                                             "the CPU; on a GPU, the Ks of the --alpha-from file)")
    p.add_argument("--max-tokens", type=positive_int, default=64,
                   help="new tokens per prompt (default: 64)")
    p.add_argument("--prompts", type=positive_int, default=3,
                   help=f"prompts per task type (at most {min(map(len, PROMPTS.values()))})")
    p.add_argument("--tasks", default="chat,copy,code", help="task types: chat, copy, code")
    p.add_argument("--drafts", default=DEFAULT_DRAFTS,
                   help="none (the loop with no draft), prompt-lookup, early-exit:N (first N "
                        "layers), int4, head "
                        f"(default: {DEFAULT_DRAFTS})")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--model", default="smollm2", help="the real model (CPU runs)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--gpu-models", default=DEFAULT_GPU_MODELS,
                   help=f"GPU runs: shapes of the decode suite (default: {DEFAULT_GPU_MODELS})")
    p.add_argument("--alpha-from", default=str(DEFAULT_OUT / "cpu-2core-speculative.json"),
                   help="GPU runs: the CPU result file whose alpha they use")
    p.add_argument("--repeats", type=positive_int, default=20,
                   help="GPU runs: timed calls per measurement (median)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="GPU runs: start no new shape or draft after this many seconds (the "
                        "result file says what was skipped)")


def _list(s: str, what: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    if not out:
        raise ValueError(f"--{what}: empty list")
    return out


def _ks(s: str) -> list[int]:
    try:
        ks = [int(x) for x in _list(s, "k")]
    except ValueError:
        raise ValueError(f"--k: expected comma-separated integers, got {s!r}") from None
    if min(ks) < 1:
        raise ValueError(f"--k: every K must be >= 1, got {s!r}")
    return ks


def _check_drafts(names: list[str]) -> None:
    for d in names:
        base, _, n = d.partition(":")
        if base not in ("none", "prompt-lookup", "early-exit", "int4", "head") or \
                (base == "early-exit") != bool(n) or (n and not n.isdigit()):
            raise ValueError(f"--drafts: unknown draft {d!r} (none, prompt-lookup, "
                             f"early-exit:N, int4, head)")


def make_draft(name: str, model):
    from ..speculative import (NoDraft, PromptLookupDraft, early_exit_draft, load_head_draft,
                               quantized_draft)
    base, _, n = name.partition(":")
    if base == "none":
        return NoDraft()
    if base == "prompt-lookup":
        return PromptLookupDraft()
    if base == "early-exit":
        return early_exit_draft(model, int(n))
    if base == "int4":
        return quantized_draft(model, "int4")
    return load_head_draft(model)


# ---- CPU: the real model -------------------------------------------------------------------
def _plain(model, ids, max_tokens, eos) -> dict:
    from ..generate import decode_loop
    from ..sampling import SamplingParams
    from .common import clock
    params = SamplingParams.greedy(max_tokens=max_tokens)
    stats: dict = {}
    t0 = clock(model.device)
    toks = [u.token_id for ups in decode_loop(model, [ids], [params], None, eos, stats)
            for u in ups]
    return {"tokens": toks, "total_s": clock(model.device) - t0, "steps": stats["steps"],
            "prefill_s": stats["prefill_s"]}


def _spec(model, draft, ids, k, max_tokens, eos) -> dict:
    from ..speculative import generate_speculative
    out = generate_speculative(model, draft, ids, k=k, max_new_tokens=max_tokens, eos_ids=eos)
    return {"tokens": out.tokens, **out.stats.to_dict()}


def _task_row(task, draft, k, plain, spec) -> dict:
    from ..speculative import expected_tokens_per_step
    n_tok = sum(len(p["tokens"]) for p in plain)
    t_plain = sum(p["total_s"] for p in plain)
    t_spec = sum(s["total_s"] for s in spec)
    # One plain decode step: the time after the prefill, per token produced by a step.
    step_s = sum(p["total_s"] - p["prefill_s"] for p in plain) / max(1, sum(
        len(p["tokens"]) - 1 for p in plain))
    steps = sum(s["steps"] for s in spec)
    drafted = sum(s["drafted"] for s in spec)
    acc = sum(s["accepted"] for s in spec)
    acc_pos = [sum(s["accepted_per_position"][i] for s in spec) for i in range(k)]
    drf_pos = [sum(s["drafted_per_position"][i] for s in spec) for i in range(k)]
    a_cond = sum(acc_pos) / sum(drf_pos) if sum(drf_pos) else None
    tps = sum(s["new_tokens"] - 1 for s in spec) / steps if steps else None
    verify = sum(s["target_s"] for s in spec) / steps / step_s if steps else None
    draft_cost = sum(s["draft_s"] for s in spec) / drafted / step_s if drafted else None
    row = {"task": task, "draft": draft, "k": k, "prompts": len(plain), "new_tokens": n_tok,
           "identical": all(p["tokens"] == s["tokens"] for p, s in zip(plain, spec)),
           "steps": steps, "drafted": drafted, "accepted": acc,
           "bonus": sum(s["bonus"] for s in spec),
           "alpha": acc / drafted if drafted else None, "alpha_cond": a_cond,
           "alpha_per_position": [a / d if d else None for a, d in zip(acc_pos, drf_pos)],
           "tokens_per_step": tps,
           "formula_tokens_per_step": None if a_cond is None else
           expected_tokens_per_step(a_cond, k),
           "plain_step_s": step_s, "verify_cost": verify, "draft_cost": draft_cost,
           "plain_tok_s": n_tok / t_plain, "spec_tok_s": n_tok / t_spec,
           "speedup": t_plain / t_spec,
           "draft_s": sum(s["draft_s"] for s in spec),
           "target_s": sum(s["target_s"] for s in spec)}
    if tps and verify:
        row["predicted_speedup"] = tps / (verify + k * (draft_cost or 0.0))
    return row


def run_cpu(args, device, env) -> dict:
    import torch

    from ..loader import load_model
    tasks = _list(args.tasks, "tasks")
    bad = [t for t in tasks if t not in PROMPTS]
    if bad:
        raise ValueError(f"--tasks: unknown {bad} (chat, copy, code)")
    if args.prompts > min(len(PROMPTS[t]) for t in tasks):
        raise ValueError(f"--prompts: at most {min(len(PROMPTS[t]) for t in tasks)}")
    ks, drafts = _ks(args.k or "4"), _list(args.drafts, "drafts")
    _check_drafts(drafts)
    log(f"[speculative] loading {args.model} (fp32, CPU) ...")
    model, tok = load_model(args.model, device=device, dtype=torch.float32)
    eos = sorted(tok.stop_token_ids)
    enc = {t: [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]),
                          add_special_tokens=False) for p in PROMPTS[t][:args.prompts]]
           for t in tasks}
    _plain(model, enc[tasks[0]][0], 4, eos)                      # warm-up
    rows = []
    for name in drafts:
        log(f"[speculative] draft {name} ...")
        draft = make_draft(name, model)
        _spec(model, draft, enc[tasks[0]][0], ks[0], 4, eos)     # warm-up
        for k in ks:
            for task in tasks:
                plain, spec = [], []
                for ids in enc[task]:   # interleaved: both sides see the same machine load
                    plain.append(_plain(model, ids, args.max_tokens, eos))
                    spec.append(_spec(model, draft, ids, k, args.max_tokens, eos))
                rows.append(_task_row(task, name, k, plain, spec))
                r = rows[-1]
                log(f"[speculative] {name} K={k} {task}: alpha {r['alpha_cond'] or 0:.2f}, "
                    f"{r['tokens_per_step'] or 0:.2f} tok/step, speedup {r['speedup']:.2f}x, "
                    f"identical {r['identical']}")
        del draft
    return {"suite": NAME, "env": env, "mode": "cpu",
            "config": {"model": args.model, "device": str(device), "dtype": "float32",
                       "decoding": "greedy", "ks": ks, "max_tokens": args.max_tokens,
                       "tasks": {t: PROMPTS[t][:args.prompts] for t in tasks},
                       "drafts": drafts, "baseline": "tinyserve.generate.decode_loop"},
            "runs": rows, "targets": _targets(rows)}


def _targets(rows) -> dict:
    """The issue's targets: >= 2x on copy-heavy with prompt lookup, >= 1.5x on chat with the
    head (identical greedy output required), at the best K measured."""
    out = {}
    for key, task, draft, goal in (("copy_prompt_lookup", "copy", "prompt-lookup", 2.0),
                                   ("chat_head", "chat", "head", 1.5)):
        cand = [r for r in rows if r["task"] == task and r["draft"] == draft and r["identical"]]
        best = max(cand, key=lambda r: r["speedup"], default=None)
        out[key] = {"goal": goal, "speedup": best and best["speedup"], "k": best and best["k"],
                    "met": bool(best and best["speedup"] >= goal)}
    return out


# ---- GPU: real shapes, random weights --------------------------------------------------------
def _median_s(fn, repeats, device) -> float:
    import statistics

    from .common import clock
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock(device)
        fn()
        times.append(clock(device) - t0)
    return statistics.median(times)


def _cpu_alpha(path) -> tuple[list[dict], dict]:
    """The CPU runs with an alpha, and where they came from (the JSON's ``alpha_source``)."""
    p = Path(path)
    note = ("alpha and tokens per step measured on the real SmolLM2 on the CPU (the model file "
            "cannot travel here); only the costs are measured on this device")
    if not p.is_file():
        log(f"[speculative] no CPU result file at {p}: nothing to combine the costs with")
        return [], {"file": None, "note": f"no CPU result file at {p}: run the CPU suite first"}
    data = json.loads(p.read_text())
    return ([r for r in data.get("runs", []) if r.get("alpha_cond") is not None],
            {"file": str(p), "date": data.get("env", {}).get("date"), "note": note})


def run_gpu_model(name, config, device, ks, drafts, repeats, over_budget=lambda: False) -> dict:
    import torch

    from ..cuda_graph import GraphedDecodeStep
    from ..kv_cache import KVCache
    from ..speculative import DraftHead, early_exit_view, head_config
    from ..speculative.head import init_head
    from .decode import build_ours
    model = build_ours(config, device, torch.bfloat16)
    c = model.config
    P = min(256, c.max_position_embeddings // 2)  # a 256-token context, as a short chat
    ids = torch.randint(0, c.vocab_size, (1, P), device=device)

    def step_times(m) -> dict:
        """One decode step of ``m`` at context P: eager, and CUDA-graph replay (CUDA only)."""
        cache = KVCache(m.config, 1, P + 8, dtype=m.dtype, device=device)
        m(ids, cache)
        one = ids[:, :1]

        def eager():
            m.decode_step(one, cache)
            cache.lengths.fill_(P)
        out = {"eager_s": _median_s(eager, repeats, device), "graph_s": None}
        if device.type == "cuda":
            graph = GraphedDecodeStep(m, cache)

            def replay():
                graph(one)
                cache.lengths.fill_(P)
            out["graph_s"] = _median_s(replay, repeats, device)
        return out

    rec = {"model": name, "params": sum(p.numel() for p in model.parameters()),
           "context": P, "target_step": step_times(model), "verify_s": {}, "drafts": {}}
    cache = KVCache(c, 1, P + max(ks) + 8, dtype=model.dtype, device=device)
    model(ids, cache)
    for k in ks:
        chunk = ids[:, :k + 1]

        def verify():
            model(chunk, cache)
            cache.lengths.fill_(P)
        rec["verify_s"][k] = _median_s(verify, repeats, device)
    for d in sorted(drafts, key=lambda d: d == "int4"):   # the int4 copy (a 2nd model) last
        base, _, n = d.partition(":")
        if over_budget():
            rec["drafts"][d] = {"skipped": "time budget spent"}
            continue
        try:
            if base == "early-exit":
                rec["drafts"][d] = step_times(early_exit_view(model, int(n)))
            elif base == "int4":
                from ..quant import quantize_model
                q = quantize_model(build_ours(config, device, torch.bfloat16), "int4")
                rec["drafts"][d] = step_times(q)
                del q
            elif base == "head":
                # EAGLE's head at these sizes: a full decoder layer of the target's shape
                head = init_head(DraftHead(head_config(c, c.intermediate_size)), model)
                head = head.to(device, model.dtype)
                w = model.lm_head_weight[:4096].contiguous()     # a 4096-token draft vocab
                hc = KVCache(head.config, 1, P + 8, dtype=model.dtype, device=device)
                f = torch.randn(1, P, c.hidden_size, device=device, dtype=model.dtype)
                head(f, model.embed(ids), hc)
                one_f, one_e = f[:, :1], model.embed(ids[:, :1])

                def head_step():
                    with torch.no_grad():
                        (w @ head(one_f, one_e, hc)[0, -1]).argmax()
                    hc.lengths.fill_(P)
                rec["drafts"][d] = {"eager_s": _median_s(head_step, repeats, device),
                                    "note": "eager (cache writes sync with the host)"}
            else:   # prompt lookup: host-side, its time is the CPU run's draft_s
                rec["drafts"][d] = {"note": "no GPU work: runs on the host"}
        except Exception as e:  # record and go on: one failing draft must not lose the rest
            rec["drafts"][d] = {"error": f"{type(e).__name__}: {e}"[:300]}
    del model, cache
    torch.cuda.empty_cache()
    return rec


def _combine(rec, cpu_rows, ks) -> list[dict]:
    """Predicted speedup on this GPU shape from the CPU alpha (tokens per step)."""
    out = []
    ts = rec["target_step"]
    for r in cpu_rows:
        d, k = r["draft"], r["k"]
        if k not in ks or d not in rec["drafts"] or r.get("tokens_per_step") is None:
            continue
        dt = rec["drafts"][d]
        if "error" in dt or "skipped" in dt:
            continue
        if d in ("none", "prompt-lookup"):  # host time per proposed token, from the CPU run
            host = r["draft_s"] / max(1, r["drafted"])
            t_draft = {"graph": host, "eager": host}
        else:   # a draft without a graph (the head) costs its eager time in both modes
            t_draft = {"graph": dt.get("graph_s") or dt["eager_s"], "eager": dt["eager_s"]}
        tv = rec["verify_s"][k]
        row = {"model": rec["model"], "task": r["task"], "draft": d, "k": k,
               "cpu_alpha_cond": r["alpha_cond"], "cpu_tokens_per_step": r["tokens_per_step"]}
        for mode in ("graph", "eager"):
            step = ts[f"{mode}_s"]
            if step is None:               # no CUDA graphs off CUDA
                row[f"predicted_speedup_{mode}"] = row[f"draft_cost_{mode}"] = None
                continue
            cost = tv + k * t_draft[mode]
            row[f"predicted_speedup_{mode}"] = r["tokens_per_step"] * step / cost
            row[f"draft_cost_{mode}"] = t_draft[mode] / step
        row["verify_cost_vs_step"] = tv / (ts["graph_s"] or ts["eager_s"])
        out.append(row)
    return out


def run_gpu(args, device, env) -> dict:
    """The GPU mode (it also runs on the CPU with the ``tiny`` shapes, without graphs: the
    tests check the harness that way)."""
    from .decode import named_configs
    drafts = _list(args.drafts, "drafts")
    _check_drafts(drafts)
    drafts = [d for d in drafts if d != "none"]      # nothing to time: no draft, no verify
    named = named_configs()
    models = [m.strip().lower() for m in _list(args.gpu_models, "gpu-models")]
    bad = [m for m in models if m not in named]
    if bad:
        raise ValueError(f"--gpu-models: unknown {bad}; available: {', '.join(named)}")
    cpu_rows, source = _cpu_alpha(args.alpha_from)
    ks = _ks(args.k) if args.k else sorted({r["k"] for r in cpu_rows}) or [4]
    t0 = time.perf_counter()
    budget = getattr(args, "budget_s", None)

    def over_budget():
        return budget is not None and time.perf_counter() - t0 > budget
    shapes, combined = [], []
    for name in models:
        if over_budget():
            shapes.append({"model": name, "skipped": "time budget spent"})
            continue
        log(f"[speculative] {name}: timing target step, verify and drafts on {device} ...")
        rec = run_gpu_model(name, named[name], device, ks, drafts, args.repeats, over_budget)
        shapes.append(rec)
        combined += _combine(rec, cpu_rows, ks)
    return {"suite": NAME, "env": env, "mode": "gpu",
            "config": {"device": str(device), "dtype": "bfloat16", "ks": ks, "drafts": drafts,
                       "models": models, "weights": "random normal(0, 0.02), norms 1",
                       "repeats": args.repeats, "budget_s": budget, "context": "256 tokens",
                       "timing": "target step: CUDA graph and eager; verify of K + 1 tokens: "
                                 "eager (Transformer.forward syncs with the host, so it is not "
                                 "capturable); early exit, int4: CUDA graph and eager; head: "
                                 "eager (a full decoder layer of the target's shape + a "
                                 "4096-row LM head); prompt lookup: host time from the CPU run"},
            "alpha_source": source,
            "shapes": shapes, "predicted": combined}


# ---- the suite -------------------------------------------------------------------------------
def run(args) -> dict:
    from . import roofline
    from .common import env_info
    device = roofline.resolve_device(args.device)
    set_threads(args.threads)
    env = env_info(device, getattr(args, "argv", None))
    result = run_gpu(args, device, env) if device.type == "cuda" else run_cpu(args, device, env)
    print(report(result))
    return result


def _f(x, spec=".2f", suffix=""):
    return "-" if x is None else format(x, spec) + suffix


def report(result: dict) -> str:
    if result["mode"] == "gpu":
        rows = [[r["model"], r["task"], r["draft"], r["k"], _f(r["cpu_alpha_cond"]),
                 _f(r["cpu_tokens_per_step"]), _f(r["draft_cost_graph"], ".3f"),
                 _f(r["verify_cost_vs_step"]), _f(r["predicted_speedup_graph"], ".2f", "x"),
                 _f(r["predicted_speedup_eager"], ".2f", "x")] for r in result["predicted"]]
        return "\n".join([f"speculative on {result['env']['gpu']}: alpha from "
                          f"{result['alpha_source']['file']}",
                          table(rows, ["model", "task", "draft", "K", "alpha (CPU)",
                                       "tok/step", "draft cost", "verify cost",
                                       "speedup (graph)", "(eager)"])])
    rows = []
    for r in result["runs"]:
        rows.append([r["task"], r["draft"], r["k"], _f(r["alpha"]), _f(r["alpha_cond"]),
                     _f(r["tokens_per_step"]), _f(r["formula_tokens_per_step"]),
                     _f(r["verify_cost"]), _f(r["draft_cost"], ".3f"),
                     _f(r["plain_tok_s"], ".1f"), _f(r["spec_tok_s"], ".1f"),
                     _f(r["speedup"], ".2f", "x"), _f(r.get("predicted_speedup"), ".2f", "x"),
                     "yes" if r["identical"] else "NO"])
    c, env = result["config"], result["env"]
    lines = [f"speculative: {c['model']} on {env['cpu']} ({env['torch_threads']} threads), greedy,"
             f" {c['max_tokens']} new tokens per prompt",
             table(rows, ["task", "draft", "K", "alpha", "alpha_c", "tok/step", "formula",
                          "verify", "draft", "plain tok/s", "spec tok/s", "speedup",
                          "predicted", "same"])]
    for key, t in result["targets"].items():
        lines.append(f"target {key}: >= {t['goal']}x -> {_f(t['speedup'], '.2f', 'x')} "
                     f"(K={t['k']}): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)
