"""The ``speculative`` suite's GPU mode (``python -m tinyserve.bench speculative --device cuda``).

SmolLM2's file does not travel to the GPU machine, so the target
is a random-weight model of a real shape (``--gpu-models``, built as the ``decode`` suite
does). Timed there: one plain decode step (CUDA graph and eager), one verify of K + 1 tokens
(eager: ``Transformer.forward`` synchronises with the host, so it cannot be captured), and one
step of each draft of that shape (early exit and int4 copy: CUDA graph; head: eager). The alpha
and tokens per step come from the CPU result file (``--alpha-from``), and the JSON says so:
the predicted speedup is tok/step x t(step) / (t(verify) + K x t(draft)).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .common import Budget, comma_list, free_memory, log, time_calls
from .decode import build_ours, named_configs

NAME = "speculative"   # the suite (this module holds its GPU mode)


def parse_ks(s: str) -> list[int]:
    return comma_list(s, "k", int, positive=True)


def check_drafts(names: list[str]) -> None:
    for d in names:
        base, _, n = d.partition(":")
        if base not in ("none", "prompt-lookup", "early-exit", "int4", "head") or \
                (base == "early-exit") != bool(n) or (n and not n.isdigit()):
            raise ValueError(f"--drafts: unknown draft {d!r} (none, prompt-lookup, "
                             f"early-exit:N, int4, head)")


def _median_s(fn, repeats, device) -> float:
    return statistics.median(time_calls(fn, repeats, warmup=2, device=device))


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
    model = build_ours(config, device, torch.bfloat16)
    c = model.config
    P = min(256, c.max_position_embeddings // 2)  # a 256-token context, as a short chat
    ids = torch.randint(0, c.vocab_size, (1, P), device=device)

    def step_times(m) -> dict:
        """One decode step of ``m`` at context P: eager, and CUDA-graph replay (CUDA only)."""
        cache = KVCache(m.config, 1, P + 8, dtype=m.dtype, device=device)
        m.run(ids, cache)
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
    model.run(ids, cache)
    for k in ks:
        chunk = ids[:, :k + 1]

        def verify():
            model.run(chunk, cache)
            cache.lengths.fill_(P)
        rec["verify_s"][k] = _median_s(verify, repeats, device)
    for d in sorted(drafts, key=lambda d: d == "int4"):   # the int4 copy (a 2nd model) last
        base, _, n = d.partition(":")
        if over_budget():
            rec["drafts"][d] = {"skipped": Budget.SKIPPED}
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
    free_memory(device)
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
    drafts = comma_list(args.drafts, "drafts")
    check_drafts(drafts)
    drafts = [d for d in drafts if d != "none"]      # nothing to time: no draft, no verify
    named = named_configs()
    models = [m.strip().lower() for m in comma_list(args.gpu_models, "gpu-models")]
    bad = [m for m in models if m not in named]
    if bad:
        raise ValueError(f"--gpu-models: unknown {bad}; available: {', '.join(named)}")
    cpu_rows, source = _cpu_alpha(args.alpha_from)
    ks = parse_ks(args.k) if args.k else sorted({r["k"] for r in cpu_rows}) or [4]
    budget = Budget(getattr(args, "budget_s", None))   # (tests call run_gpu without it)
    shapes, combined = [], []
    for name in models:
        if budget.spent():
            shapes.append({"model": name, "skipped": Budget.SKIPPED})
            continue
        log(f"[speculative] {name}: timing target step, verify and drafts on {device} ...")
        rec = run_gpu_model(name, named[name], device, ks, drafts, args.repeats, budget.spent)
        shapes.append(rec)
        combined += _combine(rec, cpu_rows, ks)
    return {"suite": NAME, "env": env, "mode": "gpu",
            "config": {"device": str(device), "dtype": "bfloat16", "ks": ks, "drafts": drafts,
                       "models": models, "weights": "random normal(0, 0.02), norms 1",
                       "repeats": args.repeats, "budget_s": budget.seconds,
                       "context": "256 tokens",
                       "timing": "target step: CUDA graph and eager; verify of K + 1 tokens: "
                                 "eager (Transformer.forward syncs with the host, so it is not "
                                 "capturable); early exit, int4: CUDA graph and eager; head: "
                                 "eager (a full decoder layer of the target's shape + a "
                                 "4096-row LM head); prompt lookup: host time from the CPU run"},
            "alpha_source": source,
            "shapes": shapes, "predicted": combined}
