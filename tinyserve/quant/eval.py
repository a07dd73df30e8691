"""Quality of a quantized model: perplexity, greedy agreement, per-layer weight and output error.

    python -m tinyserve.quant.eval [--model smollm2] [--methods none,int8,int4-g32,...]
                                   [--heldout-tokens 8192] [--window 512] [--out FILE]

prints the quality table of SmolLM2 unquantized vs each format and saves it, with the
environment, as ``benchmarks/results/<machine>-quant-quality.json``.

Metrics (every one deterministic: greedy decoding, fixed texts, fixed prompts):
  perplexity     exp(mean next-token NLL) over held-out text (``calib.heldout_ids``: stdlib
                 docstrings of modules the calibration never saw), in windows of ``window``
                 tokens moved by ``stride`` (HF's "sliding window" recipe); each token is
                 scored once, with the context its window gives it. The default stride is
                 window - 1 (windows overlap by the one token that gives the next its context).
  agreement      greedy continuations (``tinyserve.generate.generate_ids``) of PROMPTS (20
                 prompts x 32 new tokens) by the quantized model vs the reference:
                   prefix     mean fraction of the tokens before the first difference
                   tokens     fraction of positions with the same token
                   exact      fraction of prompts whose whole continuation is the same
                   top1       teacher-forced: fed the reference's continuation, how often the
                              model's argmax is the reference's next token (no cascade after a
                              first difference, so the steadiest of the four)
  layer errors   for every quantized linear, with W its reference weight and Wq the dequantized
                 one: weight_rel = ||W - Wq||_F / ||W||_F and output_rel = ||X (W - Wq)^T||_F /
                 ||X W^T||_F with X the layer's inputs in the *reference* model on the
                 calibration text (computed exactly from the Gram matrix X^T X, so one pass of
                 the reference serves every method).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from ..args import positive_int
from ..bench.common import DEFAULT_OUT, env_info, jsonable, log, result_path, table
from ..loader import load_model
from ..threads import set_threads
from . import calib
from .gptq import gptq_quantize
from .linear import make_quant_linear
from .memory import linear_footprint, memory_breakdown, model_bytes
from .quality import (greedy_agreement, greedy_tokens, input_grams, layer_errors, perplexity,
                      summarize_layers)
from .quantize import quantizable_linears, quantize_model

# 20 fixed prompts: facts, code, instructions, lists, prose.
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n\n# compute the mean of an array\n",
    "Q: What is the largest planet in the solar system?\nA:",
    "The theory of relativity was developed by",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which",
    "for i in range(10):\n    print(",
    "The quick brown fox",
    "A list of fruits: apple, banana,",
    "In machine learning, overfitting means",
    "The French Revolution began in the year",
    "SELECT name, age FROM users WHERE",
    "Dear hiring manager,\n\nI am writing to",
    "The human heart has four chambers:",
    "Translate to French: Good morning ->",
    "The main difference between a list and a tuple in Python is",
)


# ---- the CLI ----------------------------------------------------------------------------------
DEFAULT_METHODS = "none,int8,int4-g32,int4-g64,nf4,gguf,gptq-g64,rtn3-g64,gptq3-g64"
# name -> (quantize_model method, kwargs); "none" is the unquantized reference. rtnN / gptqN:
# N-bit grids on the int4 layout (rtn = GPTQ with an identity Hessian = round to nearest).
_SPECS = {
    "none": (None, {}),
    "int8": ("int8", {}),
    "int4-g32": ("int4", {"group_size": 32}), "int4-g64": ("int4", {"group_size": 64}),
    "int4-g128": ("int4", {"group_size": 128}),
    "nf4": ("nf4", {}), "nf4-dq": ("nf4", {"double_quant": True}),
    "gguf": ("gguf", {}),
}


def method_spec(name: str):
    """'int4-g64' -> ("int4", {"group_size": 64}); 'gptq3-g64' -> ("gptq", {..., "bits": 3})."""
    if name in _SPECS:
        return _SPECS[name]
    m = re.fullmatch(r"(gptq|rtn)([234])?-g(\d+)", name)
    if m:
        kw = {"group_size": int(m.group(3))}
        if m.group(2):
            kw["bits"] = int(m.group(2))
        return m.group(1), kw
    raise ValueError(f"unknown method {name!r}; use one of {sorted(_SPECS)}, gptq[2-4]-g<G> or "
                     f"rtn[2-4]-g<G>")


def _rtn_model(model, group_size: int, bits: int = 4):
    """Round-to-nearest on the int4 layout at any of 2..4 bits (GPTQ without a Hessian)."""
    for name, lin in quantizable_linears(model).items():
        qt = gptq_quantize(lin.weight, None, group_size, bits)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                make_quant_linear(qt, lin.bias, model.dtype))
    model.quantization = {"method": "rtn", "group_size": group_size, "bits": bits}
    return model


def quantized_copy(model, name: str, calib_ids=None, progress: bool = True):
    method, kw = method_spec(name)
    if method is None:
        return model
    q = copy.deepcopy(model)
    if method == "rtn":
        return _rtn_model(q, kw["group_size"], kw.get("bits", 4))
    if method == "gptq":
        kw = dict(kw, calib_ids=calib_ids, progress=progress)
    return quantize_model(q, method, **kw)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m tinyserve.quant.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="registry name or path (default smollm2)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma list (default {DEFAULT_METHODS}); also int4-g128, nf4-dq, "
                        f"gptq3-g64, rtn3-g64, ...")
    p.add_argument("--heldout-tokens", type=positive_int, default=8192)
    p.add_argument("--window", type=positive_int, default=512)
    p.add_argument("--stride", type=positive_int, default=None, help="default: window - 1")
    p.add_argument("--batch-size", type=positive_int, default=2,
                   help="perplexity windows per forward")
    p.add_argument("--prompts", type=positive_int, default=len(PROMPTS),
                   help=f"<= {len(PROMPTS)}")
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--calib-samples", type=positive_int, default=32)
    p.add_argument("--calib-len", type=positive_int, default=256)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--out", default=None,
                   help="result JSON (default benchmarks/results/<machine>-quant-quality.json)")
    p.add_argument("--no-progress", action="store_true")
    return p


def report(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        lay = r.get("layer_summary", {})
        lay_h = r.get("layer_summary_heldout", {})
        ag = r.get("agreement", {})
        rows.append([r["method"], f"{r['bits_per_weight']:.2f}", f"{r['linear_bytes'] / 2**20:.1f}",
                     f"{r['perplexity']['ppl']:.3f}",
                     f"{100 * ag['prefix']:.1f}%" if ag else "-",
                     f"{100 * ag['top1']:.1f}%" if ag else "-",
                     f"{lay['weight_rel_mean']:.4f}" if lay else "-",
                     f"{lay['output_rel_mean']:.4f}" if lay else "-",
                     f"{lay_h['output_rel_mean']:.4f}" if lay_h else "-"])
    c = result["config"]
    head = (f"{result['model']} on {result['env']['cpu']} ({result['env']['torch_threads']} "
            f"threads): perplexity on {c['heldout']['tokens_used']} held-out tokens (window "
            f"{c['window']}), greedy agreement over {c['prompts']} prompts x {c['new_tokens']} "
            f"tokens; mean relative layer errors (weight, output on the calibration / on "
            f"held-out text)")
    return "\n".join([head, table(rows, ["method", "bits/w", "linears MiB", "perplexity",
                                         "agree prefix", "agree top1", "weight err",
                                         "out err calib", "out err held"])])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        method_spec(m)
    n_prompts = min(args.prompts, len(PROMPTS))
    env = env_info("cpu", argv, prog="python -m tinyserve.quant.eval")
    log(f"[quant-eval] loading {args.model} (fp32, cpu) ...")
    model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
    calib_ids = calib.calibration_ids(tok, args.calib_samples, args.calib_len)
    held = calib.heldout_ids(tok, args.heldout_tokens)
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS[:n_prompts]]
    names = list(quantizable_linears(model))

    log("[quant-eval] reference: Gram matrices of every linear's input on the calibration text")
    t0 = time.perf_counter()
    grams = input_grams(model, calib_ids, names)
    # the same number of sequences of the same length, from the held-out text
    T = min(args.calib_len, held.numel())
    n_held = max(1, min(held.numel() // T, args.calib_samples))
    grams_held = input_grams(model, held[:n_held * T].view(n_held, T), names)
    log(f"[quant-eval]   {time.perf_counter() - t0:.0f}s; reference greedy continuations ...")
    ref_tokens = greedy_tokens(model, prompts, args.new_tokens)
    ref_text = [tok.decode(t) for t in ref_tokens]
    rows = []
    for name in methods:
        log(f"[quant-eval] {name}: quantizing ...")
        t0 = time.perf_counter()
        q = quantized_copy(model, name, calib_ids, progress=not args.no_progress)
        t_quant = time.perf_counter() - t0
        lin_bytes, lin_weights = linear_footprint(q)
        row = {"method": name, "spec": dict(zip(("method", "kwargs"), method_spec(name))),
               "quantize_s": t_quant, "model_bytes": model_bytes(q),
               "memory_breakdown": memory_breakdown(q), "linear_bytes": lin_bytes,
               "linear_weights": lin_weights, "bits_per_weight": 8 * lin_bytes / lin_weights}
        log(f"[quant-eval] {name}: perplexity ...")
        t0 = time.perf_counter()
        row["perplexity"] = perplexity(q, held, args.window, args.stride, args.batch_size)
        row["perplexity"]["seconds"] = time.perf_counter() - t0
        if q is not model:
            log(f"[quant-eval] {name}: agreement and layer errors ...")
            row["agreement"] = greedy_agreement(q, ref_tokens, prompts, args.new_tokens)
            errs = layer_errors(model, q, grams)
            row["layer_summary"] = summarize_layers(errs)
            errs_h = layer_errors(model, q, grams_held)
            row["layer_summary_heldout"] = summarize_layers(errs_h)
            row["output_rel_heldout"] = {n: v["output_rel"] for n, v in errs_h.items()}
            row["layer_errors"] = errs
            row["sample"] = {"prompt": PROMPTS[0], "reference": ref_text[0],
                             "quantized": tok.decode(greedy_tokens(q, prompts[:1],
                                                                  args.new_tokens)[0])}
        log(f"[quant-eval] {name}: ppl {row['perplexity']['ppl']:.3f}")
        rows.append(row)
        del q
    result = {
        "suite": "quant-quality", "env": env,
        "model": getattr(model.config, "name", args.model),
        "source": getattr(model, "source", None),
        "note": ("the reference ('none') is the model as loaded: for the SmolLM2 GGUF file its "
                 "linears are the dequantized Q4_1 weights (4-bit groups of 32), so int4-g32 and "
                 "gguf reproduce it exactly and every other format re-quantizes 4-bit weights"),
        "config": {"methods": methods, "window": args.window,
                   "stride": args.stride or args.window - 1, "batch_size": args.batch_size,
                   "prompts": n_prompts, "new_tokens": args.new_tokens,
                   **calib.text_info(tok, args.calib_samples, args.calib_len,
                                     args.heldout_tokens)},
        "prompts": list(PROMPTS[:n_prompts]), "reference_continuations": ref_text,
        "rows": rows,
    }
    by = {r["method"]: r for r in rows}
    for g_name, r_name in (("gptq-g64", "int4-g64"), ("gptq3-g64", "rtn3-g64"),
                           ("gptq-g128", "int4-g128"), ("gptq-g32", "int4-g32")):
        if g_name in by and r_name in by:
            a, b = by[g_name]["layer_errors"], by[r_name]["layer_errors"]
            wins = sum(a[n]["output_rel"] < b[n]["output_rel"] for n in a)
            ah, bh = by[g_name]["output_rel_heldout"], by[r_name]["output_rel_heldout"]
            wins_h = sum(ah[n] < bh[n] for n in ah)
            result.setdefault("gptq_vs_rtn", []).append({
                "gptq": g_name, "rtn": r_name,
                "ppl": [by[g_name]["perplexity"]["ppl"], by[r_name]["perplexity"]["ppl"]],
                "output_rel_mean": [by[g_name]["layer_summary"]["output_rel_mean"],
                                    by[r_name]["layer_summary"]["output_rel_mean"]],
                "weight_rel_mean": [by[g_name]["layer_summary"]["weight_rel_mean"],
                                    by[r_name]["layer_summary"]["weight_rel_mean"]],
                "layers_with_lower_output_error": f"{wins}/{len(a)}",
                "output_rel_mean_heldout": [
                    by[g_name]["layer_summary_heldout"]["output_rel_mean"],
                    by[r_name]["layer_summary_heldout"]["output_rel_mean"]],
                "layers_with_lower_output_error_heldout": f"{wins_h}/{len(ah)}"})
    print(report(result))
    for c in result.get("gptq_vs_rtn", []):
        print(f"{c['gptq']} vs {c['rtn']}: ppl {c['ppl'][0]:.3f} vs {c['ppl'][1]:.3f}; mean layer "
              f"output error {c['output_rel_mean'][0]:.4f} vs {c['output_rel_mean'][1]:.4f} "
              f"(lower in {c['layers_with_lower_output_error']} layers), on held-out text "
              f"{c['output_rel_mean_heldout'][0]:.4f} vs {c['output_rel_mean_heldout'][1]:.4f} "
              f"(lower in {c['layers_with_lower_output_error_heldout']}); weight error "
              f"{c['weight_rel_mean'][0]:.4f} vs {c['weight_rel_mean'][1]:.4f}")
    path = args.out or result_path(DEFAULT_OUT, env["machine"], "quant-quality")
    write_json(result, path)
    log(f"saved {path}")
    return 0


def write_json(result: dict, path) -> None:
    """Pretty JSON, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=jsonable) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
