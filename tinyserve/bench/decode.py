"""Suite ``decode``: end-to-end decode tokens/s of real LLaMA shapes with random weights.

    python -m tinyserve.bench decode [--models llama-3.2-1b,llama-2-7b] [--batch-sizes 1,16]
                                     [--prompt-len 128] [--new-tokens 128] [--no-hf]

Kernels do not care what weights mean, so the models are built at real shapes with random
weights (normal, std 0.02; norms 1), directly on the device in bf16 (CUDA) or fp32 (CPU, where
only the ``tiny`` shapes run: CI checks the harness, nothing is measured). HF transformers'
``LlamaForCausalLM`` is built on the meta device and handed the SAME tensors (no second copy).

    ours      tinyserve.generate.benchmark_decode(model, ids, N, cuda_graph=False|True) ->
              prefill_s and decode_s (the N-1 steps after the prefill's token) of one greedy run
    hf        model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False) timed end
              to end, minus one separately timed prefill forward (cache on, last logits only)
    decode tok/s = batch * (N - 1) / decode_s, the median over repeats (one warm-up run first)
    e2e tok/s    = batch * N / (prefill + decode); ours excludes graph capture (``capture_s``)

Roofline: one decode step must read every weight once (LM head included; a tied embedding
counts once) plus the KV cache of every row at the mean context P + N/2. At the measured copy
bandwidth that gives the ceiling: batch * bandwidth / bytes_per_step tokens/s. We report each
side's fraction of that ceiling and ours / HF. A prefill-logit check (max |ours - HF| on the
last prompt position) confirms both models hold the same weights.
"""
from __future__ import annotations

import statistics

from ..args import positive_int
from ..timing import clock
from .common import (Budget, comma_list, finish, free_memory, log, repeat, resolve_device, start,
                     table, time_calls)
from .hf import build_hf

NAME = "decode"
HELP = "decode tokens/s of Llama-3.2-1B / Llama-2-7B shapes (random weights): ours vs HF"

DEFAULT_GPU_MODELS = "llama-3.2-1b,llama-2-7b"


def named_configs() -> dict:
    """Lower-cased name -> ModelConfig: every published shape in ``tinyserve.analysis`` plus
    two CPU/CI shapes with the 1B's features (GQA, tied head, llama3 RoPE) and the 7B's (MHA,
    untied head)."""
    import dataclasses

    from ..analysis import SHAPES
    from ..config import ModelConfig
    named = {k.lower(): v for k, v in SHAPES.items()}
    l1b = named["llama-3.2-1b"]
    named["tiny"] = dataclasses.replace(l1b, vocab_size=512, hidden_size=256,
                                        intermediate_size=512, num_layers=2, num_heads=4,
                                        num_kv_heads=2, head_dim=64, name="tiny")
    named["tiny-mha"] = ModelConfig(vocab_size=384, hidden_size=128, intermediate_size=256,
                                    num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
                                    max_position_embeddings=1024, name="tiny-mha")
    return named


COMMON = ("device", "threads", "seed", "budget", "figures")


def add_arguments(p) -> None:
    p.add_argument("--models", default=None,
                   help=f"comma list of shapes in tinyserve.analysis.SHAPES or tiny, tiny-mha "
                        f"(default: {DEFAULT_GPU_MODELS} on CUDA, tiny on CPU)")
    p.add_argument("--batch-sizes", default=None, help="comma list (default: 1,16 on CUDA; 1,2 "
                                                       "on CPU)")
    p.add_argument("--prompt-len", type=positive_int, default=None, help="default: 128 (CUDA), 16 (CPU)")
    p.add_argument("--new-tokens", type=positive_int, default=None, help="default: 128 (CUDA), 8 (CPU)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs of ours (median)")
    p.add_argument("--hf-repeats", type=positive_int, default=1, help="timed HF generate runs (median)")
    p.add_argument("--backend", default="auto", help="tinyserve ops backend: auto, ref, triton")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph run of ours")


def int_list(s: str, what: str) -> list[int]:
    return comma_list(s, what, int, positive=True)


# ---- the two models, one set of weights ----------------------------------------------------
def build_ours(config, device, dtype, backend="auto", seed=0):
    """Transformer of ``config`` with random weights, allocated on ``device`` in ``dtype``."""
    import torch
    from ..model import Transformer
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # parameters are born in dtype on the device: no fp32 copy
    try:
        with torch.device(device):
            model = Transformer(config, backend=backend)
    finally:
        torch.set_default_dtype(prev)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:   # in place, one tensor at a time: no temporary the size of the model
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


# ---- timing ----------------------------------------------------------------------------------
def time_ours(model, ids, N, cuda_graph, repeats) -> dict:
    from .. import generate as gen_mod
    bench = getattr(gen_mod, "benchmark_decode", None)
    if bench is None:
        raise RuntimeError("tinyserve.generate.benchmark_decode is not there yet")
    # one warm-up call first: compile, autotune, capture
    runs = repeat(lambda: bench(model, ids, N, cuda_graph=cuda_graph), repeats)
    return {"prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "decode_s": statistics.median(r["decode_s"] for r in runs),
            "capture_s": statistics.median(r.get("capture_s", 0.0) for r in runs),
            "decode_s_values": [r["decode_s"] for r in runs], "tokens": runs[-1]["tokens"]}


def time_hf(hf, ids, N, repeats) -> dict:
    import inspect

    import torch
    dev = ids.device
    mask = torch.ones_like(ids)
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep")
                 if k in inspect.signature(hf.forward).parameters), None)
    kw = {keep: 1} if keep else {}

    def gen(n):
        return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, temperature=None, top_p=None,
                           top_k=None)

    def prefill():   # what generate's first forward does: the prompt, cache on, last logits
        return hf(ids, attention_mask=mask, use_cache=True, **kw)

    with torch.no_grad():
        gen(min(N, 4))
        prefill()
        pre, tot, out = [], [], None
        for _ in range(repeats):
            # the fastest of 3: a fixed cost, so noise only adds to it
            pre += time_calls(prefill, 3, warmup=0, device=dev)
            t0 = clock(dev)
            out = gen(N)
            tot.append(clock(dev) - t0)
    p, t = min(pre), statistics.median(tot)
    return {"prefill_s": p, "total_s": t, "decode_s": t - p, "total_s_values": tot,
            "tokens": out[:, ids.shape[1]:]}


def _rates(side: dict, B: int, N: int, ceiling: float) -> dict:
    tok = side.pop("tokens")
    side["e2e_tok_s"] = B * N / side.get("total_s", side["prefill_s"] + side["decode_s"])
    if side["decode_s"] <= 0:   # HF on a noisy CPU: the prefill alone outlasted generate()
        side["decode_tok_s"] = None
        side["note"] = "timing noise: prefill_s >= total_s, no decode rate"
        return tok
    side["decode_tok_s"] = B * (N - 1) / side["decode_s"]
    side["frac_ceiling"] = side["decode_tok_s"] / ceiling
    return tok


def _try(fn, what: str):
    try:
        return fn(), None
    except Exception as e:   # record and go on: one failing side must not lose the others
        log(f"[decode] {what} failed: {type(e).__name__}: {e}")
        return None, f"{type(e).__name__}: {e}"[:500]


def run_model(name, config, device, dtype, batches, P, N, roof, args, budget) -> list[dict]:
    import torch

    from ..analysis import decode_ceiling_tok_s, kv_cache_bytes, step_weight_bytes
    log(f"[decode] building {name} on {device} ({dtype}) ...")
    model = build_ours(config, device, dtype, args.backend, args.seed)
    c = model.config
    hf, hf_err = (None, "--no-hf") if args.no_hf else _try(lambda: build_hf(model), "HF build")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    esz = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(args.seed)
    out, logit_check = [], None
    for B in batches:
        rec = {"model": name, "batch": B, "prompt_len": P, "new_tokens": N,
               "params": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes}
        if budget.spent():
            out.append({**rec, "skipped": Budget.SKIPPED})
            continue
        ids = torch.randint(0, c.vocab_size, (B, P), generator=g).to(device)
        ctx = P + N / 2                   # mean context over the decode steps
        kv = kv_cache_bytes(c, B, ctx, esz)
        # a step reads every multiplied matrix but only B rows of an untied input embedding
        sw = step_weight_bytes(c, esz, B)
        rec.update(mean_context=ctx, kv_bytes_per_step=kv, step_weight_bytes=sw,
                   bytes_per_step=sw + kv,
                   ceiling_tok_s=decode_ceiling_tok_s(c, roof["copy_bandwidth_Bps"], B, ctx,
                                                      esz, esz))
        if hf is not None and logit_check is None:
            def check():
                with torch.no_grad():
                    a = model.run(ids[:1], last_only=True)[0, -1].float()
                    b = hf(ids[:1]).logits[0, -1].float()
                return {"max_abs_diff": (a - b).abs().max().item(),
                        "max_abs_logit": b.abs().max().item(),
                        "same_argmax": bool(a.argmax() == b.argmax())}
            logit_check, err = _try(check, "logit check")
            logit_check = logit_check or {"error": err}
        log(f"[decode] {name} B={B}: ours ...")
        toks = {}
        for key, graph in (("ours", False), ("ours_graph", True)):
            if graph and device.type != "cuda":
                rec[key] = {"skipped": "CUDA graphs need CUDA"}
                continue
            if graph and args.no_graph:
                rec[key] = {"skipped": "--no-graph"}
                continue
            side, err = _try(lambda: time_ours(model, ids, N, graph, args.repeats), key)
            rec[key] = {"error": err} if side is None else side
            if side is not None:
                toks[key] = _rates(side, B, N, rec["ceiling_tok_s"])
        if hf is None:
            rec["hf"] = {"skipped": hf_err}
        else:
            log(f"[decode] {name} B={B}: HF generate ...")
            side, err = _try(lambda: time_hf(hf, ids, N, args.hf_repeats), "HF")
            rec["hf"] = {"error": err} if side is None else side
            if side is not None:
                toks["hf"] = _rates(side, B, N, rec["ceiling_tok_s"])
        hf_rate = rec["hf"].get("decode_tok_s")
        rec["ratio_vs_hf"] = {k: rec[k]["decode_tok_s"] / hf_rate for k in ("ours", "ours_graph")
                              if hf_rate and rec[k].get("decode_tok_s")}
        if "ours_graph" in toks and "ours" in toks:   # replaying a graph changes no arithmetic
            rec["graph_same_tokens_as_eager"] = bool(torch.equal(toks["ours"], toks["ours_graph"]))
        if "hf" in toks and "ours" in toks:
            a, b = toks["ours"].cpu(), toks["hf"].cpu()
            same = (a == b).all(dim=0).tolist() + [False]
            rec["greedy_agreement"] = {"same_tokens": bool(torch.equal(a, b)),
                                       "common_prefix_all_rows": same.index(False), "of": N}
        out.append(rec)
        del ids
    for r in out:
        r["logit_check_vs_hf"] = logit_check
        r["hf_attn_implementation"] = getattr(getattr(hf, "config", None),
                                              "_attn_implementation", None)
    del model, hf
    free_memory(device)
    return out


def run(args) -> dict:
    import torch
    from . import roofline
    cuda = resolve_device(args.device).type == "cuda"   # arguments checked before start() logs
    named = named_configs()
    models = [m.strip().lower() for m in (args.models or (DEFAULT_GPU_MODELS if cuda else "tiny"))
              .split(",") if m.strip()]
    bad = [m for m in models if m not in named]
    if bad:
        raise ValueError(f"unknown model(s) {bad}; available: {', '.join(named)}")
    batches = int_list(args.batch_sizes or ("1,16" if cuda else "1,2"), "batch-sizes")
    P = args.prompt_len or (128 if cuda else 16)
    N = args.new_tokens or (128 if cuda else 8)
    if P <= 0 or N < 2 or args.repeats < 1 or args.hf_repeats < 1:
        raise ValueError("need --prompt-len >= 1, --new-tokens >= 2, repeats >= 1")
    device, env = start(args)
    dtype = torch.bfloat16 if cuda else torch.float32
    roof = roofline.measure(device)
    log(f"[decode] roofline: {roofline.describe(roof)}")
    budget = Budget(args.budget_s)
    runs = []
    for name in models:
        if budget.spent():
            runs += [{"model": name, "batch": B, "prompt_len": P, "new_tokens": N,
                      "skipped": Budget.SKIPPED} for B in batches]
            continue
        runs += run_model(name, named[name], device, dtype, batches, P, N, roof, args, budget)
    result = {"suite": NAME, "env": env,
              "config": {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
                         "models": {m: named[m].to_dict() for m in models}, "batch_sizes": batches,
                         "prompt_len": P, "new_tokens": N, "repeats": args.repeats,
                         "hf_repeats": args.hf_repeats, "backend": args.backend,
                         "weights": "random normal(0, 0.02), norms 1", "seed": args.seed,
                         "budget_s": args.budget_s},
              "roofline": roof, "runs": runs}
    return finish(result, args, report)


def report(result: dict) -> str:
    rows = []
    for r in result["runs"]:
        if "skipped" in r:
            rows.append([r["model"], r["batch"], "-", r["skipped"], "", "", ""])
            continue
        for key, label in (("ours", "tinyserve"), ("ours_graph", "tinyserve+graph"),
                           ("hf", "HF generate")):
            s = r.get(key, {})
            if not s.get("decode_tok_s"):
                rows.append([r["model"], r["batch"], label,
                             (s.get("skipped") or s.get("note")
                              or "error: " + str(s.get("error")))[:60], "", "",
                             ""])
                continue
            ratio = r["ratio_vs_hf"].get(key)
            rows.append([r["model"], r["batch"], label, f"{s['decode_tok_s']:.1f}",
                         f"{r['ceiling_tok_s']:.0f}", f"{100 * s['frac_ceiling']:.1f}%",
                         f"{ratio:.2f}x" if ratio else "-"])
    c, env = result["config"], result["env"]
    head = (f"decode on {env['gpu'] or env['cpu']} ({c['device']}, {c['dtype']}), prompt "
            f"{c['prompt_len']} + {c['new_tokens']} new tokens, greedy, random weights")
    return "\n".join([head, table(rows, ["model", "batch", "impl", "decode tok/s",
                                         "ceiling tok/s", "% ceiling", "vs HF"])])
