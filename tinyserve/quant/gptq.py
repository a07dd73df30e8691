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
The grid is owner A's asymmetric int4 (``int_formats.quantize_asym_codes``: lo = min rounded down to
fp16, s = (max - lo) / (2^bits - 1) rounded up to fp16, q = clamp(round((w - lo) / s))), so the
result is an ``Int4Weight`` with the same layout as RTN int4 and runs on the same kernels.
With H = identity nothing is fed back (U is diagonal) and GPTQ returns exactly RTN's codes.

``bits`` (2, 3 or 4): fewer levels on the same layout (codes 0..2^bits - 1 in the 4-bit
nibbles, scale (max - min) / (2^bits - 1)). Storage stays 4 bits per weight; it shows the
quality of a 3-bit grid without a new format.

The whole-model pass (method "gptq" of ``quantize_model``: blocks in order, each from the
outputs of the already quantized ones) is in ``tinyserve.quant.gptq_model``.
"""
from __future__ import annotations

import torch

from .int_formats import INT4_GROUP_SIZES, Int4Weight, quantize_asym_codes
from .quantized_weight import pack_nibbles

GPTQ_BITS = (2, 3, 4)
DEFAULT_GROUP_SIZE = 64
DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMP = 0.01


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


def check_gptq_args(K: int, group_size: int, bits: int):
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
    check_gptq_args(K, group_size, bits)
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

