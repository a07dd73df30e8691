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

**GPU (``--device cuda``).** Predicted speedups from step times measured there and the CPU
run's alpha: see ``speculative_gpu``.
"""
from __future__ import annotations

from ..args import positive_int
from ..timing import clock
from .common import DEFAULT_OUT, comma_list, finish, fmt, log, start, table
from .speculative_gpu import NAME, check_drafts, parse_ks, run_gpu

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
COMMON = ("device", "threads", "budget")


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
    p.add_argument("--model", default="smollm2", help="the real model (CPU runs)")
    p.add_argument("--gpu-models", default=DEFAULT_GPU_MODELS,
                   help=f"GPU runs: shapes of the decode suite (default: {DEFAULT_GPU_MODELS})")
    p.add_argument("--alpha-from", default=str(DEFAULT_OUT / "cpu-2core-speculative.json"),
                   help="GPU runs: the CPU result file whose alpha they use")
    p.add_argument("--repeats", type=positive_int, default=20,
                   help="GPU runs: timed calls per measurement (median)")


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
    tasks = comma_list(args.tasks, "tasks")
    bad = [t for t in tasks if t not in PROMPTS]
    if bad:
        raise ValueError(f"--tasks: unknown {bad} (chat, copy, code)")
    if args.prompts > min(len(PROMPTS[t]) for t in tasks):
        raise ValueError(f"--prompts: at most {min(len(PROMPTS[t]) for t in tasks)}")
    ks, drafts = parse_ks(args.k or "4"), comma_list(args.drafts, "drafts")
    check_drafts(drafts)
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


# ---- the suite -------------------------------------------------------------------------------
def run(args) -> dict:
    device, env = start(args)
    result = run_gpu(args, device, env) if device.type == "cuda" else run_cpu(args, device, env)
    return finish(result, args, report)


def report(result: dict) -> str:
    if result["mode"] == "gpu":
        rows = [[r["model"], r["task"], r["draft"], r["k"], fmt(r["cpu_alpha_cond"]),
                 fmt(r["cpu_tokens_per_step"]), fmt(r["draft_cost_graph"], ".3f"),
                 fmt(r["verify_cost_vs_step"]), fmt(r["predicted_speedup_graph"], ".2f", "x"),
                 fmt(r["predicted_speedup_eager"], ".2f", "x")] for r in result["predicted"]]
        return "\n".join([f"speculative on {result['env']['gpu']}: alpha from "
                          f"{result['alpha_source']['file']}",
                          table(rows, ["model", "task", "draft", "K", "alpha (CPU)",
                                       "tok/step", "draft cost", "verify cost",
                                       "speedup (graph)", "(eager)"])])
    rows = []
    for r in result["runs"]:
        rows.append([r["task"], r["draft"], r["k"], fmt(r["alpha"]), fmt(r["alpha_cond"]),
                     fmt(r["tokens_per_step"]), fmt(r["formula_tokens_per_step"]),
                     fmt(r["verify_cost"]), fmt(r["draft_cost"], ".3f"),
                     fmt(r["plain_tok_s"], ".1f"), fmt(r["spec_tok_s"], ".1f"),
                     fmt(r["speedup"], ".2f", "x"), fmt(r.get("predicted_speedup"), ".2f", "x"),
                     "yes" if r["identical"] else "NO"])
    c, env = result["config"], result["env"]
    lines = [f"speculative: {c['model']} on {env['cpu']} ({env['torch_threads']} threads), greedy,"
             f" {c['max_tokens']} new tokens per prompt",
             table(rows, ["task", "draft", "K", "alpha", "alpha_c", "tok/step", "formula",
                          "verify", "draft", "plain tok/s", "spec tok/s", "speedup",
                          "predicted", "same"])]
    for key, t in result["targets"].items():
        lines.append(f"target {key}: >= {t['goal']}x -> {fmt(t['speedup'], '.2f', 'x')} "
                     f"(K={t['k']}): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)
