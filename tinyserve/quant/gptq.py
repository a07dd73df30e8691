"""GPTQ: Hessian-aware rounding to owner A's int4 layout (Frantar et al. 2022, arXiv:2210.17323).

Round-to-nearest (RTN) rounds every weight on its own. GPTQ rounds the columns of a layer one at
a time and, after each, updates the columns not yet rounded so that the layer's *output* on real
inputs changes as little as possible. For one linear layer y = x W^T with calibration inputs
X [n, K] it minimizes ||X W^T - X Wq^T||^2 = sum over rows w of W of (w - wq) H (w - wq)^T / 2,
with H = 2 X^T X [K, K] (the Hessian of that squared error, the same for every row).

The paper's algorithm (section 4, "Step 3"), as implemented here:
  1. H = 2 X^T X / n from the layer's real inputs on the calibration text; dampen it with
     lambda = 1% of its mean diagonal on the diagonal (keeps it well conditioned).
  2. U = the upper Cholesky factor of H^-1 (H^-1 = U^T U): row i of U holds, in one place, what
     the sequential OBS updates of the inverse Hessian would give when columns 0..i-1 are
     already fixed ("Cholesky reformulation", their eq. 5 ff.).
  3. For each column i (in blocks of 128 columns, "lazy batch updates"):
        q_i   = round-to-nearest of the current column w_i on its group's grid
        err_i = (w_i - q_i) / U[i, i]
        w_j  -= err_i * U[i, j]                for the columns j > i of the block
     and after each block the columns past it get the block's errors at once:
        W[:, i2:] -= Err[:, i1:i2] @ U[i1:i2, i2:]       (one matmul)
  4. Groups (their section 5, "grouping"): a group's scale and minimum are chosen when its first
     column is reached, from the *updated* weights of its g columns, and stay fixed for it.
The grid is owner A's asymmetric int4 (``formats.quantize_asym_codes``: lo = min rounded down to
fp16, s = (max - lo) / (2^bits - 1) rounded up to fp16, q = clamp(round((w - lo) / s))), so the
result is an ``Int4Weight`` with the same layout as RTN int4 and runs on the same kernels.
With H = identity nothing is fed back (U is diagonal) and GPTQ returns exactly RTN's codes.

``bits`` (2, 3 or 4): fewer levels on the same layout (codes 0..2^bits - 1 in the 4-bit
nibbles, scale (max - min) / (2^bits - 1)). Storage stays 4 bits per weight; it shows the
quality of a 3-bit grid without a new format.

Whole model (registered as method "gptq" of ``quantize_model``; ``group_size`` 32 / 64 / 128,
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

import torch

from .. import ops
from ..attention import ContiguousBackend
from .formats import INT4_GROUP_SIZES, Int4Weight, pack_nibbles, quantize_asym_codes

GPTQ_BITS = (2, 3, 4)
DEFAULT_GROUP_SIZE = 64
DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMP = 0.01
# Inside one decoder block, the sub-layers in data-flow order; the first of each set sees the
# input all of them share.
SUBLAYERS = (("attn.wq", "attn.wk", "attn.wv"), ("attn.wo",), ("mlp.w_gate", "mlp.w_up"),
             ("mlp.w_down",))


# ---- one layer ------------------------------------------------------------------------------
class Hessian:
    """Accumulates H = 2 X^T X / n over batches of a layer's inputs x [..., K] (fp32)."""

    def __init__(self, K: int, device=None):
        self.sum = torch.zeros(K, K, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration inputs reached this layer")
        return self.sum * (2.0 / self.n)


def inverse_cholesky(H: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, in fp64 for stability; the
    damping grows tenfold (up to 5 times) if H is still not positive definite."""
    H = H.double()
    K = H.shape[0]
    mean_diag = float(H.diagonal().mean())
    if not mean_diag > 0:           # no signal at all (all-zero inputs): plain rounding
        return torch.eye(K, dtype=torch.float64, device=H.device)
    eye = torch.eye(K, dtype=torch.float64, device=H.device)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + (damp * 10 ** attempt) * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise ValueError("GPTQ: the Hessian is not positive definite even with 10^5 x damping")


def _check_args(K: int, group_size: int, bits: int):
    if bits not in GPTQ_BITS:
        raise ValueError(f"gptq: bits={bits!r} is out of range; the int4 layout holds "
                         f"{list(GPTQ_BITS)}-bit codes")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"gptq: group_size {group_size!r} is not one of {INT4_GROUP_SIZES}")
    if K % group_size:
        raise ValueError(f"gptq: group size {group_size} does not divide in_features {K} "
                         f"(K % {group_size} = {K % group_size})")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor | None, group_size: int = DEFAULT_GROUP_SIZE,
                  bits: int = 4, block_size: int = DEFAULT_BLOCK_SIZE,
                  damp: float = DEFAULT_DAMP, hinv_chol: torch.Tensor | None = None
                  ) -> Int4Weight:
    """GPTQ of one weight w [N, K] given its inputs' Hessian H [K, K] -> ``Int4Weight``.

    ``H = None`` means the identity: no error feedback, i.e. round-to-nearest on the same grid
    (also how to get RTN at ``bits`` < 4). ``hinv_chol``: U of ``inverse_cholesky(H, damp)``
    when already computed (layers sharing one input share it). Runs on w's device; w is not
    modified."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"gptq: weight must be a 2-D float tensor, got {tuple(w.shape)} {w.dtype}")
    N, K = w.shape
    _check_args(K, group_size, bits)
    if not torch.isfinite(w).all():
        raise ValueError("gptq: the weight holds inf or nan")
    dev = w.device
    W = w.detach().float().clone()
    if hinv_chol is not None:
        U = hinv_chol.to(dev, torch.float32)
    elif H is None:
        U = torch.eye(K, dtype=torch.float32, device=dev)
    else:
        if tuple(H.shape) != (K, K):
            raise ValueError(f"gptq: H must be [{K}, {K}] for a weight [{N}, {K}], got "
                             f"{tuple(H.shape)}")
        U = inverse_cholesky(H.to(dev), damp).float()
    qmax = 2 ** bits - 1
    g = group_size
    B = max(g, block_size // g * g)      # whole groups per block: a group never straddles two
    codes = torch.empty(N, K, dtype=torch.uint8, device=dev)
    scales = torch.empty(N, K // g, dtype=torch.float16, device=dev)
    mins = torch.empty(N, K // g, dtype=torch.float16, device=dev)
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                # The group's grid from its current (error-updated) weights, fixed from now on.
                _, s16, m16 = quantize_asym_codes(W1[:, i:i + g], bits, g)
                scales[:, col // g] = s16[:, 0]
                mins[:, col // g] = m16[:, 0]
                s, m = s16[:, 0].float(), m16[:, 0].float()
            x = W1[:, i]
            q = torch.round((x - m) / s).clamp_(0, qmax)       # as quantize_asym_codes rounds
            codes[:, col] = q.to(torch.uint8)
            err = (x - (q * s + m)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        if i2 < K:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Int4Weight(pack_nibbles(codes), scales, mins, g)


def output_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> float:
    """||X W^T - X Wq^T||_F / ||X W^T||_F from H ∝ X^T X (no activations needed)."""
    D = (w.float() - wq.float())
    Hf = H.float()
    num = ((D @ Hf) * D).sum()
    den = ((w.float() @ Hf) * w.float()).sum()
    return float((num.clamp(min=0) / den).sqrt()) if den > 0 else float("nan")


# ---- the whole model ------------------------------------------------------------------------
def _tokenizer_of(model):
    src = getattr(model, "source", None)
    if src is None:
        return None
    from pathlib import Path

    from ..tokenizer import Tokenizer
    p = Path(src)
    if p.is_dir():
        return Tokenizer.from_dir(p)
    if p.is_file() and p.suffix == ".gguf":
        return Tokenizer.from_gguf(p)
    return None


def default_calibration(model, n_samples: int | None = None, seq_len: int | None = None):
    """The calib.py text, tokenized with the model's own tokenizer (from ``model.source``)."""
    from . import calib
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
    from tqdm.auto import tqdm
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
            _check_args(lin.weight.shape[1], group_size, bits)
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


def _gptq_method(model, targets, *, group_size=DEFAULT_GROUP_SIZE, **kw):
    return gptq_model(model, {n: m for n, m in targets.items() if m is not None},
                      group_size=group_size, **kw)


def _register():
    from . import register_method
    register_method("gptq", _gptq_method, group_sizes=INT4_GROUP_SIZES,
                    default_group_size=DEFAULT_GROUP_SIZE, model_level=True, replace=True,
                    description="GPTQ (Frantar et al. 2022): Hessian-aware rounding on "
                                "calibration text to asymmetric int4 groups (bits=2..4)")


_register()
