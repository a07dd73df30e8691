"""The quality measurements behind ``python -m tinyserve.quant.eval``: perplexity over sliding
windows, greedy agreement with a reference model, and per-layer weight and output errors. Each
metric is defined in that module's docstring (the CLI's ``--help``); here they are plain
functions that a notebook or a test can call on any model.
"""
from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F

from ..generate import generate_ids
from .quantize import quantizable_linears


# ---- perplexity -----------------------------------------------------------------------------
def _windows(L: int, window: int, stride: int):
    """(begin, end, n_scored) per window; every token t in [1, L) is scored exactly once, by
    the first window that holds it with at least one token of context (so consecutive windows
    overlap by at least one token: the stride is at most window - 1)."""
    out, begin, prev_end = [], 0, 1          # token 0 has no context: it is never a target
    while True:
        end = min(begin + window, L)
        out.append((begin, end, end - prev_end))
        if end >= L:
            return out
        prev_end = end
        begin = min(begin + stride, end - 1)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 512, stride: int | None = None,
               batch_size: int = 2) -> dict:
    """Perplexity of ``model`` on the 1-D token ids ``ids`` (see ``tinyserve.quant.eval``).

    -> {"ppl", "nll" (mean, nats), "tokens" (scored), "window", "stride"}."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    stride = window - 1 if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got {window}, {stride}")
    stride = min(stride, window - 1)
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens")
    wins = _windows(ids.numel(), window, stride)
    dev = model.device
    total, count = 0.0, 0
    # Windows of the same length go in one batch (all but possibly the last are full).
    by_len: dict[int, list] = {}
    for w in wins:
        by_len.setdefault(w[1] - w[0], []).append(w)
    for T, ws in by_len.items():
        for j in range(0, len(ws), batch_size):
            part = ws[j:j + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in part]).to(dev)
            logits = model.run(x)                                    # [B, T, V]
            for r, (b, e, n) in enumerate(part):
                lg = logits[r, T - 1 - n:T - 1].float()          # predicts tokens e-n .. e-1
                tgt = x[r, T - n:]
                total += float(F.cross_entropy(lg, tgt, reduction="sum"))
                count += n
            del logits
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "window": window,
            "stride": stride}


# ---- greedy agreement -----------------------------------------------------------------------
def greedy_tokens(model, prompts, max_new_tokens: int = 32) -> list[list[int]]:
    """Greedy continuations (exactly ``max_new_tokens`` each, EOS ignored) of token prompts."""
    return generate_ids(model, [list(p) for p in prompts], max_new_tokens, ignore_eos=True)


def agreement(tokens, ref_tokens) -> dict:
    """Agreement of continuations with the reference's (same prompts, same lengths)."""
    if len(tokens) != len(ref_tokens) or not tokens:
        raise ValueError("need the same (non-zero) number of continuations")
    prefix, same, total, exact = [], 0, 0, 0
    for a, b in zip(tokens, ref_tokens):
        n = min(len(a), len(b))
        k = next((i for i in range(n) if a[i] != b[i]), n)
        prefix.append(k / max(len(b), 1))
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
        exact += list(a) == list(b)
    return {"prefix": sum(prefix) / len(prefix), "tokens": same / total,
            "exact": exact / len(tokens)}


@torch.no_grad()
def teacher_forced_top1(model, prompts, ref_tokens) -> float:
    """Fraction of reference continuation tokens that are ``model``'s argmax given the prompt
    and the reference's previous tokens."""
    hit = total = 0
    for p, cont in zip(prompts, ref_tokens):
        if not cont:
            continue
        seq = torch.tensor([list(p) + list(cont)], dtype=torch.long, device=model.device)
        logits = model.run(seq[:, :-1])[0]                            # predicts seq[1:]
        pred = logits[len(p) - 1:].argmax(-1).cpu()
        hit += int((pred == torch.tensor(cont)).sum())
        total += len(cont)
    return hit / total


def greedy_agreement(model, reference, prompts, max_new_tokens: int = 32) -> dict:
    """Agreement (prefix / tokens / exact / top1) of ``model`` with ``reference``: a model, or
    its continuations (a list of token lists) when already computed."""
    ref = reference if isinstance(reference, (list, tuple)) else greedy_tokens(
        reference, prompts, max_new_tokens)
    out = agreement(greedy_tokens(model, prompts, max_new_tokens), ref)
    out["top1"] = teacher_forced_top1(model, prompts, ref)
    out.update(prompts=len(prompts), new_tokens=max_new_tokens)
    return out


# ---- per-layer errors -----------------------------------------------------------------------
@torch.no_grad()
def input_grams(model, ids: torch.Tensor, names, batch_size: int = 8) -> dict:
    """{name: X^T X (fp32, [K, K])} of each named linear's inputs over token ids [n, T].
    Layers sharing one input (q/k/v, gate/up) share one matrix."""
    mods = quantizable_linears(model)
    grams, handles, seen = {}, [], {}

    def make(key):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            grams[key].addmm_(x.T, x)
        return hook

    for name in names:
        mod = mods.get(name)
        if mod is None:
            raise ValueError(f"{name!r} is not a dense linear layer of this model")
        # q/k/v and gate/up read the same tensor: hook the first, point the others at it
        block, _, sub = name.rpartition(".")
        shared = {"wk": "wq", "wv": "wq", "w_up": "w_gate"}.get(sub)
        key = f"{block}.{shared}" if shared and f"{block}.{shared}" in names else name
        seen[name] = key
        if key == name:
            K = mod.weight.shape[1]
            grams[name] = torch.zeros(K, K, device=model.device)
            handles.append(mod.register_forward_pre_hook(make(name)))
    try:
        ids = torch.as_tensor(ids, dtype=torch.long)
        for chunk in ids.split(batch_size):
            model.run(chunk.to(model.device), last_only=True)
    finally:
        for h in handles:
            h.remove()
    return {n: grams[k] for n, k in seen.items()}


def _dequantized(layer) -> torch.Tensor:
    if isinstance(layer, torch.Tensor):
        return layer.float()
    if hasattr(layer, "qt"):
        return layer.qt.dequantize(torch.float32)
    if hasattr(layer, "dequantize"):
        return layer.dequantize(torch.float32)
    return layer.weight.float()


@torch.no_grad()
def layer_errors(reference, quantized, grams: dict) -> dict:
    """{name: {"weight_rel", "output_rel"}} for every name in ``grams``; ``quantized`` is a
    quantized model (its QuantLinear layers) or {name: weight / QuantizedWeight}."""
    out = {}
    for name, G in grams.items():
        w = reference.get_submodule(name).weight.float()
        q = quantized[name] if isinstance(quantized, dict) else quantized.get_submodule(name)
        D = w - _dequantized(q).to(w.device)
        wn = float(w.pow(2).sum())
        num = float(((D @ G) * D).sum())
        den = float(((w @ G) * w).sum())
        out[name] = {"weight_rel": math.sqrt(float(D.pow(2).sum()) / wn) if wn else float("nan"),
                     "output_rel": math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")}
    return out


def summarize_layers(errs: dict) -> dict:
    if not errs:
        return {}
    w = [v["weight_rel"] for v in errs.values()]
    o = [v["output_rel"] for v in errs.values()]
    return {"layers": len(errs), "weight_rel_mean": statistics.fmean(w),
            "output_rel_mean": statistics.fmean(o), "output_rel_median": statistics.median(o),
            "output_rel_max": max(o)}

