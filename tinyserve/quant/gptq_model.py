"""GPTQ over a whole model, block by block; one layer's algorithm is in ``tinyserve.quant.gptq``.

Registered as method "gptq" of ``quantize_model`` (``group_size`` 32 / 64 / 128,
default 64 -- SmolLM2's in-features 576 and 1536 are multiples of 64 but 576 is not of 128):
blocks are quantized in order, each from the outputs of the already quantized blocks before it
(the paper quantizes "sequentially, block by block"), and inside a block in the order the data
flows ("true sequential"): q/k/v (one shared input, one H), then o, then gate/up, then down, each
seeing the quantized sub-layers before it. An untied LM head is quantized last, from the final
norm's output. The model's weights are restored afterwards (``quantize_model`` swaps layers in
only when every layer succeeded).

    from tinyserve.quant import quantize_model
    quantize_model(model, "gptq", group_size=64)                    # calibration: calib.py text
    quantize_model(model, "gptq", group_size=64, bits=3, calib_ids=ids)   # your own [n, T] ids
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import ops
from ..attention import ContiguousBackend
from ..tokenizer import Tokenizer
from . import calib
from .gptq import (DEFAULT_BLOCK_SIZE, DEFAULT_DAMP, DEFAULT_GROUP_SIZE, Hessian,
                   check_gptq_args, gptq_quantize, inverse_cholesky, output_error)
from .int_formats import Int4Weight

# Inside one decoder block, the sub-layers in data-flow order; the first of each set sees the
# input all of them share.
SUBLAYERS = (("attn.wq", "attn.wk", "attn.wv"), ("attn.wo",), ("mlp.w_gate", "mlp.w_up"),
             ("mlp.w_down",))


# ---- the whole model ------------------------------------------------------------------------
def _tokenizer_of(model):
    src = getattr(model, "source", None)
    if src is None:
        return None
    p = Path(src)
    if p.is_dir():
        return Tokenizer.from_dir(p)
    if p.is_file() and p.suffix == ".gguf":
        return Tokenizer.from_gguf(p)
    return None


def default_calibration(model, n_samples: int | None = None, seq_len: int | None = None):
    """The calib.py text, tokenized with the model's own tokenizer (from ``model.source``)."""
    tok = _tokenizer_of(model)
    if tok is None:
        raise ValueError("gptq needs calibration token ids: pass calib_ids=LongTensor[n, T], or "
                         "load the model with tinyserve.load_model (its source file gives the "
                         "tokenizer for the built-in calibration text)")
    return calib.calibration_ids(tok, n_samples or calib.DEFAULT_CALIB_SAMPLES,
                                 seq_len or calib.DEFAULT_CALIB_SEQ_LEN)


def _block_forward(model, blk, layer: int, h, rope):
    """One decoder block on hidden states h [B, T, D] without a cache (as Transformer._layers)."""
    cos, sin, meta = rope
    be = model.backend
    x = blk.attn_norm(h, be)
    a = blk.attn(x, cos, sin, None, meta, be)
    x, h = blk.mlp_norm(a, be, residual=h)
    return h + blk.mlp(x, be)


def _rope_inputs(model, B: int, T: int):
    """RoPE angles and no-cache attention metadata for [B, T] whole sequences."""
    meta = ContiguousBackend(model.backend).no_cache(
        torch.full((B,), T, dtype=torch.long, device=model.device), T)
    cos, sin = ops.rope_cos_sin(meta.positions, model.inv_freq)
    return cos, sin, meta


class _Stop(Exception):
    """Raised by a hook once the inputs it needs are captured: the rest of the block is skipped."""


def _capture_hessian(module, run, stop: bool) -> Hessian:
    """H of ``module``'s input over the batches ``run()`` pushes through it."""
    acc = Hessian(module.weight.shape[1], module.weight.device)

    def hook(mod, args):
        acc.add(args[0])
        if stop:
            raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return acc


@torch.no_grad()
def gptq_model(model, targets: dict, *, group_size: int = DEFAULT_GROUP_SIZE, bits: int = 4,
               calib_ids: torch.Tensor | None = None, n_samples: int | None = None,
               seq_len: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
               damp: float = DEFAULT_DAMP, batch_size: int = 8, progress: bool = True,
               stats: dict | None = None) -> dict:
    """GPTQ every target of ``model`` ({name: Linear} from ``quantize_model``) -> {name:
    Int4Weight}. ``calib_ids`` [n, T] (default: ``default_calibration(model)``). ``stats``
    (a dict) receives per-layer GPTQ objectives: the relative output error on the
    (quantized-prefix) calibration inputs of GPTQ and of round-to-nearest on the same grid."""
    if calib_ids is None:
        calib_ids = default_calibration(model, n_samples, seq_len)
    calib_ids = torch.as_tensor(calib_ids, dtype=torch.long)
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise ValueError(f"calib_ids must be a non-empty [n, T] tensor, got "
                         f"{tuple(calib_ids.shape)}")
    V = model.config.vocab_size
    if int(calib_ids.min()) < 0 or int(calib_ids.max()) >= V:
        raise ValueError(f"calib_ids must lie in [0, {V})")
    for name, lin in targets.items():
        if lin is not None:
            check_gptq_args(lin.weight.shape[1], group_size, bits)
    dev = model.device
    ids = calib_ids.to(dev)
    chunks = list(ids.split(max(1, batch_size)))
    ropes = {}

    def rope(h):
        key = tuple(h.shape[:2])
        if key not in ropes:
            ropes[key] = _rope_inputs(model, *key)
        return ropes[key]

    hs = [model.embed(c) for c in chunks]
    originals: dict[str, torch.Tensor] = {}
    out: dict[str, Int4Weight] = {}
    layer_stats = {} if stats is None else stats.setdefault("layers", {})

    def quantize(name, H, U):
        lin = targets[name]
        w = lin.weight
        qt = gptq_quantize(w, H, group_size, bits, block_size, damp, hinv_chol=U)
        wq = qt.dequantize(torch.float32)
        if stats is not None:
            rtn = gptq_quantize(w, None, group_size, bits).dequantize(torch.float32)
            layer_stats[name] = {"gptq_output_rel": output_error(w, wq, H),
                                 "rtn_output_rel": output_error(w, rtn, H)}
        originals[name] = w.detach().clone()
        w.copy_(wq.to(w.dtype))   # later layers see this layer quantized
        out[name] = qt

    head = targets.get("lm_head")
    # Blocks after the last one holding a target need no pass (unless the head is a target).
    last_block = len(model.layers) - 1 if head is not None else max(
        (int(n.split(".")[1]) for n in targets if n.startswith("layers.")), default=-1)
    n_steps = last_block + 1 + (1 if head is not None else 0)
    bar = tqdm(total=n_steps, desc=f"gptq {bits}-bit g{group_size}", disable=not progress,
               unit="block")
    try:
        for i, blk in enumerate(model.layers):
            if i > last_block:
                break
            for k, group in enumerate(SUBLAYERS):
                names = [f"layers.{i}.{s}" for s in group if f"layers.{i}.{s}" in targets]
                if not names:
                    continue
                last = k == len(SUBLAYERS) - 1

                def run(blk=blk, i=i):
                    for h in hs:
                        try:
                            _block_forward(model, blk, i, h, rope(h))
                        except _Stop:
                            pass
                H = _capture_hessian(targets[names[0]], run, stop=not last).value()
                U = inverse_cholesky(H, damp)            # one factorization per shared input
                for name in names:
                    quantize(name, H, U)
                del H, U
            if i < last_block or head is not None:
                hs = [_block_forward(model, blk, i, h, rope(h)) for h in hs]
            bar.update(1)
        if head is not None:
            acc = Hessian(head.weight.shape[1], dev)
            for h in hs:
                acc.add(model.norm(h, model.backend))
            H = acc.value()
            quantize("lm_head", H, inverse_cholesky(H, damp))
            bar.update(1)
    finally:
        bar.close()
        for name, w in originals.items():   # the model itself is left as it was
            targets[name].weight.copy_(w)
    return out

