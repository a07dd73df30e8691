"""Suite ``quant``: memory and decode tokens/s per weight format on a real shape, random weights.

    python -m tinyserve.bench quant [--model llama-2-7b] [--formats bf16,int4-g128,int8,nf4]
                                    [--batch-sizes 1,16] [--prompt-len 128] [--new-tokens 128]

For each format the model is built at the real shape directly on the device (random normal(0,
0.02) weights in bf16, norms 1, as the ``decode`` suite does; never on the CPU), then quantized
layer by layer *on the device*: each linear's bf16 weight is replaced by its quantized module
(and freed) before the next is quantized, so the peak is the bf16 model plus one layer. The
formats are tinyserve.quant's (``quantize_model`` semantics: every decoder linear, and the LM
head when untied; the embedding and norms stay bf16):

    bf16        the unquantized model (our baseline)
    int8        symmetric per output channel
    int4-g<G>   asymmetric groups of G (32 / 64 / 128) along K; Llama-2-7B's in-features 4096
                and 11008 are multiples of 128
    nf4         NormalFloat-4, absmax per block of 64

Decode is timed with ``tinyserve.generate.benchmark_decode`` (CUDA graphs on CUDA; eager on the
CPU, where only the tiny shapes run and nothing is measured: CI checks the suite works):
decode tok/s = batch * (N - 1) / decode_s, the median of ``--repeats`` runs after a warm-up run.

    memory         ``tinyserve.quant.model_bytes``: every weight as stored (packed codes +
                   scales), embedding included
    bytes/step     what one decode step must read: the weights as stored, minus the embedding
                   table when the head is untied (a lookup reads B rows of it), plus every
                   row's KV cache at the mean context P + N/2
    ceiling        batch * copy bandwidth / bytes/step (the ``roofline`` suite's copy bandwidth)
    speedup        decode tok/s over bf16's at the same batch

Targets (issue 4, H100/H200): int4 batch-1 decode >= 3.0x our bf16, int8 >= 1.8x. The int4
GEMV's fraction of copy bandwidth is the ``ops`` suite's (``--ops quant_linear``).
"""
from __future__ import annotations

import time

from ..args import positive_int
from .common import Budget, comma_list, finish, free_memory, log, start, table

NAME = "quant"
HELP = "memory and decode tok/s per weight format (bf16/int8/int4/nf4), Llama-2-7B shape"

DEFAULT_GPU_MODEL = "llama-2-7b"
DEFAULT_CPU_MODEL = "tiny-mha"
DEFAULT_FORMATS = "bf16,int4-g128,int8,nf4"
TARGETS = {"int4": 3.0, "int8": 1.8}          # batch-1 decode speedup over our bf16 (CUDA)
COMMON = ("device", "threads", "seed", "budget")


def add_arguments(p) -> None:
    p.add_argument("--model", default=None,
                   help=f"a shape of tinyserve.analysis.SHAPES or tiny, tiny-mha (default: "
                        f"{DEFAULT_GPU_MODEL} on CUDA, {DEFAULT_CPU_MODEL} on CPU)")
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help=f"comma list of bf16, int8, int4-g32/64/128, nf4 (default "
                        f"{DEFAULT_FORMATS})")
    p.add_argument("--batch-sizes", default=None,
                   help="comma list (default: 1,16 on CUDA; 1,2 on CPU)")
    p.add_argument("--prompt-len", type=positive_int, default=None,
                   help="default: 128 (CUDA), 16 (CPU)")
    p.add_argument("--new-tokens", type=positive_int, default=None,
                   help="default: 128 (CUDA), 8 (CPU)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs (median)")
    p.add_argument("--backend", default="auto", help="tinyserve ops backend: auto, ref, triton")
    p.add_argument("--no-graph", action="store_true", help="time eager decode on CUDA too "
                                                           "(instead of CUDA graphs)")


def parse_format(name: str):
    """'bf16' -> (None, None); 'int8' -> ("int8", None); 'int4-g128' -> ("int4", 128);
    'nf4' -> ("nf4", 64)."""
    name = name.strip().lower()
    if name in ("bf16", "none", "dense"):
        return None, None
    if name == "int8":
        return "int8", None
    if name == "nf4":
        return "nf4", 64
    if name.startswith("int4-g"):
        try:
            g = int(name[len("int4-g"):])
        except ValueError:
            g = None
        if g in (32, 64, 128):
            return "int4", g
    raise ValueError(f"unknown format {name!r}: use bf16, int8, int4-g32, int4-g64, int4-g128 "
                     f"or nf4")


def quantize_on_device(model, method: str, group_size=None):
    """``quantize_model`` semantics, one layer at a time: each linear is quantized where it
    lives and its dense weight dropped before the next one is touched. -> model."""
    import torch

    from ..quant import get_method, make_quant_linear, quantizable_linears, quantize_model
    m = get_method(method)
    if m.model_level:                  # calibrated / file-based methods: the general path
        return quantize_model(model, method, group_size=group_size)
    gs = m.default_group_size if (group_size is None and m.group_sizes) else group_size
    names = list(quantizable_linears(model))
    dtype = model.dtype
    with torch.no_grad():
        for name in names:
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            lin = getattr(owner, attr)
            qt = m.fn(lin.weight, group_size=gs, name=name)
            setattr(owner, attr, make_quant_linear(qt, lin.bias, dtype))
            del lin, qt                      # the bf16 weight is freed here
    model.quantization = {"method": method, "group_size": gs, "layers": len(names),
                          "lm_head": "lm_head" in names}
    return model


def step_weight_bytes(model) -> int:
    """Weight bytes one decode step reads: as stored, minus an untied embedding table."""
    from ..quant import memory_breakdown
    bd = memory_breakdown(model)
    total = sum(bd.values())
    if getattr(model, "lm_head", None) is not None:
        total -= bd.get("embedding", 0)
    return total


def run(args) -> dict:
    import torch

    from ..analysis import kv_cache_bytes
    from ..quant import memory_breakdown, model_bytes
    from . import roofline
    from .decode import int_list, build_ours, named_configs, time_ours
    device, env = start(args)
    cuda = device.type == "cuda"
    named = named_configs()
    model_name = (args.model or (DEFAULT_GPU_MODEL if cuda else DEFAULT_CPU_MODEL)).lower()
    if model_name not in named:
        raise ValueError(f"unknown model {model_name!r}; available: {', '.join(named)}")
    config = named[model_name]
    formats = [f.lower() for f in comma_list(args.formats, "formats")]
    specs = {f: parse_format(f) for f in formats}
    for f, (method, g) in specs.items():
        for K in {config.hidden_size, config.intermediate_size}:
            if g is not None and K % g:
                raise ValueError(f"{f}: group size {g} does not divide in-features {K} of "
                                 f"{model_name}")
    batches = int_list(args.batch_sizes or ("1,16" if cuda else "1,2"), "batch-sizes")
    P = args.prompt_len or (128 if cuda else 16)
    N = args.new_tokens or (128 if cuda else 8)
    if P <= 0 or N < 2 or args.repeats < 1:
        raise ValueError("need --prompt-len >= 1, --new-tokens >= 2, --repeats >= 1")
    graph = cuda and not args.no_graph
    dtype = torch.bfloat16 if cuda else torch.float32
    esz = torch.empty((), dtype=dtype).element_size()
    roof = roofline.measure(device)
    bw = roof["copy_bandwidth_Bps"]
    log(f"[quant] roofline: {roofline.describe(roof)}")
    budget = Budget(args.budget_s)
    g = torch.Generator().manual_seed(args.seed)
    prompts = {B: torch.randint(0, config.vocab_size, (B, P), generator=g) for B in batches}
    runs, base = [], {}
    for fmt in formats:
        method, gs = specs[fmt]
        if budget.spent():
            runs += [{"format": fmt, "batch": B, "skipped": Budget.SKIPPED} for B in batches]
            continue
        log(f"[quant] {model_name} {fmt}: building on {device} ...")
        t0 = time.perf_counter()
        model = build_ours(config, device, dtype, args.backend, args.seed)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        if method is not None:
            quantize_on_device(model, method, gs)
        if cuda:
            torch.cuda.synchronize(device)
        t_quant = time.perf_counter() - t0
        mem = {"model_bytes": model_bytes(model), "memory_breakdown": memory_breakdown(model),
               "step_weight_bytes": step_weight_bytes(model)}
        if cuda:
            mem["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(device))
        log(f"[quant] {fmt}: {mem['model_bytes'] / 2**30:.2f} GiB (built {t_build:.1f}s, "
            f"quantized {t_quant:.1f}s)")
        for B in batches:
            rec = {"format": fmt, "method": method or "bf16", "group_size": gs, "batch": B,
                   "prompt_len": P, "new_tokens": N, "build_s": t_build, "quantize_s": t_quant,
                   **mem}
            if budget.spent():
                runs.append({**rec, "skipped": Budget.SKIPPED})
                continue
            ctx = P + N / 2
            kv = kv_cache_bytes(config, B, ctx, esz)
            rec.update(mean_context=ctx, kv_bytes_per_step=kv,
                       bytes_per_step=mem["step_weight_bytes"] + kv)
            rec["ceiling_tok_s"] = B * bw / rec["bytes_per_step"]
            log(f"[quant] {fmt} B={B}: decode ({'CUDA graph' if graph else 'eager'}) ...")
            try:
                side = time_ours(model, prompts[B].to(device), N, graph, args.repeats)
            except Exception as e:   # record and go on: one format must not lose the others
                log(f"[quant] {fmt} B={B} failed: {type(e).__name__}: {e}")
                runs.append({**rec, "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            side.pop("tokens")
            rate = B * (N - 1) / side["decode_s"]
            rec.update(side, cuda_graph=graph, decode_tok_s=rate,
                       frac_ceiling=rate / rec["ceiling_tok_s"],
                       achieved_Bps=rate / B * rec["bytes_per_step"])
            if method is None:
                base[B] = rate
            if B in base:
                rec["speedup_vs_bf16"] = rate / base[B]
            target = TARGETS.get(method or "")
            if target is not None and B == 1 and cuda and "speedup_vs_bf16" in rec:
                rec["target_speedup"] = target
                rec["meets_target"] = rec["speedup_vs_bf16"] >= target
            runs.append(rec)
        del model
        free_memory(device)
    result = {"suite": NAME, "env": env,
              "config": {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
                         "model": model_name, "shape": config.to_dict(), "formats": formats,
                         "batch_sizes": batches, "prompt_len": P, "new_tokens": N,
                         "repeats": args.repeats, "cuda_graph": graph, "backend": args.backend,
                         "weights": "random normal(0, 0.02), norms 1", "seed": args.seed,
                         "budget_s": args.budget_s, "targets_batch1_speedup": TARGETS},
              "roofline": roof, "runs": runs}
    return finish(result, args, report)


def report(result: dict) -> str:
    rows = []
    for r in result["runs"]:
        if "skipped" in r or "error" in r:
            rows.append([r["format"], r["batch"], "-", "-", (r.get("skipped") or
                                                              "error: " + r["error"])[:50],
                         "", "", ""])
            continue
        sp = r.get("speedup_vs_bf16")
        tgt = ("" if "meets_target" not in r else
               f"{'ok' if r['meets_target'] else 'MISSED'} (>= {r['target_speedup']}x)")
        rows.append([r["format"], r["batch"], f"{r['model_bytes'] / 2**20:.1f}",
                     f"{r['bytes_per_step'] / 2**20:.1f}", f"{r['decode_tok_s']:.1f}",
                     f"{sp:.2f}x" if sp else "-", f"{100 * r['frac_ceiling']:.1f}%", tgt])
    c, env = result["config"], result["env"]
    head = (f"quantized decode on {env['gpu'] or env['cpu']} ({c['device']}, {c['dtype']}), "
            f"{c['model']} random weights, prompt {c['prompt_len']} + {c['new_tokens']} new "
            f"tokens, {'CUDA graph' if c['cuda_graph'] else 'eager'}")
    return "\n".join([head, table(rows, ["format", "batch", "MiB", "MiB/step", "decode tok/s",
                                         "vs bf16", "% ceiling", "target"])])
