"""The native CPU path: a GGUF model run from its quantized blocks, never dequantized to fp32.

Decode reads every weight once per token, so on a CPU as on a GPU its speed is bytes over
memory bandwidth (notebook 01). The reference path (``dtype="float32"``) dequantizes the file
to fp32 at load: 4 bytes per weight, ~540 MB read per SmolLM2 token. Here each tensor keeps
(close to) its file size and runs through PyTorch's own CPU kernels:

  Q4_1 [N, K]   -> ``ops.cpu_int4``: exact mapping (scale d, zero m + 8d), 5 bits/weight read
                   (4-bit codes + a bf16 (scale, zero) pair, 32 bits, per group of 32)
  Q8_0, Q4_0,
  other formats -> ``ops.cpu_int8``: requantized to int8 with one scale per row (NOT exact:
                   the file has one scale per 32; notebook 03, section 9b, measures what it
                   costs), 1 byte/weight; the tied embedding and LM head share one such
                   table (token lookup = q[ids] * scale[ids])
  norms         -> bf16 tensors

Activations are bf16: on CPUs the kernels' fp32-activation mode is a scalar loop, slower than
fp32 F.linear, while bf16 mode is vectorized (AVX-512/AMX where present, AVX2 otherwise). So
this path is not bit-exact with the fp32 reference: tests/test_cpu_native.py bounds the logit
difference, and requires the reference's argmax wherever its top-2 margin exceeds that bound.
The residual stream, attention and KV cache are bf16 too (RMSNorm and RoPE compute in fp32
inside, as on the GPU's bf16 path).

Fused: wq|wk|wv -> one [Nq + 2 Nkv, D] weight and w_gate|w_up -> one [2F, D], so each layer
makes 4 kernel calls instead of 7 (x read once per group) when the parts share a format.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model import Transformer
from ..ops.cpu_int4 import GROUP_SIZES, N_MULTIPLE, pack_int4_groupwise, pack_q4_1
from ..ops.cpu_int8 import pack_q8_0
from ..ops.rope import rope_inv_freq
from ..weights.gguf_blocks import PackedTensor
from .int_formats import Int4Weight
from .linear import QuantLinear

COMPUTE_DTYPE = torch.bfloat16
DENSE_ROWS = 96   # rows of x from which a linear dequantizes and runs dense (NativeLinear)


class DenseWeight:
    """A plain weight [N, K] in bf16 (a tensor the file stores unquantized), same interface."""

    def __init__(self, w: torch.Tensor):
        self.w = w.to(COMPUTE_DTYPE).contiguous()

    nbytes = property(lambda self: self.w.nbytes)
    out_features = property(lambda self: self.w.shape[0])

    def linear(self, x):
        return F.linear(x.to(self.w.dtype), self.w).to(x.dtype)

    def embedding(self, ids):
        return F.embedding(ids, self.w)

    def dequantize(self):
        return self.w.float()


def native_weight(pt: PackedTensor | torch.Tensor):
    """One file tensor -> the fastest native weight that holds it (see the module docstring)."""
    if isinstance(pt, torch.Tensor):
        return DenseWeight(pt)
    if pt.qtype == "Q4_1" and pt.shape[0] % N_MULTIPLE == 0:
        return pack_q4_1(pt, compute_dtype=COMPUTE_DTYPE)
    return pack_q8_0(pt, compute_dtype=COMPUTE_DTYPE)


def same_format(parts: list) -> bool:
    """All plain tensors, or all file blocks of one format."""
    if all(isinstance(t, torch.Tensor) for t in parts):
        return True
    return all(isinstance(t, PackedTensor) for t in parts) and len({t.qtype for t in parts}) == 1


def stack_rows(parts: list):
    """File tensors [N_i, K] of one format stacked along N -> one tensor of that format, or
    None when the formats differ (the parts then stay separate calls). Exact: block formats
    quantize each row on its own, so stacking the rows' bytes is the fused tensor's encoding.
    (Packed kernel weights do not stack: the int4 packing interleaves tiles of 64 rows.)"""
    if not same_format(parts):
        return None
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    data = np.concatenate([np.asarray(t.data).reshape(t.shape[0], -1) for t in parts])
    return PackedTensor("+".join(t.name for t in parts), parts[0].qtype,
                        (data.shape[0], parts[0].shape[1]), data)


class NativeLinear(nn.Module):
    """y = x @ W^T (+ bias) through a native weight; ``out_dtype`` casts the result (the LM
    head returns fp32 logits for sampling).

    ``sources``: the file tensors W was built from (stacked along N when fused). The int4/int8
    kernels are GEMV kernels: their time grows ~linearly with the rows of x, while a dense bf16
    GEMM (AMX / AVX-512 where present) barely notices them. So from ``DENSE_ROWS`` rows on
    (prefill), W is dequantized from the file's blocks for this call (~3 ms for a 1536 x 576
    Q4_1 weight, freed after) and multiplied densely: at 512 rows ~4x faster than the int4
    kernel on the development machine. Decode (a few rows) never takes this path."""

    def __init__(self, w, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 sources: list | None = None):
        super().__init__()
        self.w, self.out_dtype, self.sources = w, out_dtype, sources
        self.bias = None if bias is None else bias.detach()   # in the dtype of y

    def dense(self) -> torch.Tensor:
        """W [N, K] in bf16, decoded from ``sources`` (fp32 decode, one rounding to bf16)."""
        return torch.cat([pt.dequantize(torch.float32) for pt in self.sources]).to(COMPUTE_DTYPE)

    def forward(self, x, backend="auto"):
        if self.sources is not None and x.numel() >= DENSE_ROWS * x.shape[-1]:
            y = F.linear(x.to(COMPUTE_DTYPE), self.dense()).to(x.dtype)
        else:   # the kernels' fast path takes 2-D rows
            y = self.w.linear(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        if self.bias is not None:
            y = y + self.bias
        return y if self.out_dtype is None else y.to(self.out_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized fp32 copy [N, K] (costs 4 bytes a weight; for inspection only)."""
        return self.w.dequantize()

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def extra_repr(self):
        return f"{type(self.w).__name__}, out_features={self.w.out_features}"


class NativeEmbedding(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, ids):
        return self.w.embedding(ids)

    @property
    def weight(self) -> torch.Tensor:
        return self.w.dequantize()


def native_linears(model) -> list[NativeLinear]:
    return [m for m in model.modules() if isinstance(m, NativeLinear)]


def native_nbytes(model) -> int:
    """Bytes the model's weights hold: every native weight once (the tied table is shared)
    plus the plain tensors (norms)."""
    seen = {id(m.w): m.w.nbytes for m in model.modules()
            if isinstance(m, (NativeLinear, NativeEmbedding))}
    return sum(seen.values()) + sum(p.nbytes for p in model.parameters())


def build_native_model(config, state: dict, packed: dict, backend: str = "auto",
                       release=None):
    """-> a ``Transformer`` whose linears and embedding are native weights built from
    ``packed`` (the file's block tensors, by canonical name) or ``state`` (plain tensors).

    The model is built on the meta device, so no fp32 weight is ever allocated: each file
    tensor becomes its native weight directly (peak memory ~ file size + the largest table's
    fp32 slice), then the few plain parameters (norms) are materialized and loaded.
    ``release()``, if given, is called after each layer (the loader drops the file's pages
    already read from resident memory, so they do not add up to a second copy)."""
    tensors = {**state, **packed}
    backend = "native" if backend == "auto" else backend   # SDPA attention on the CPU

    def linear(names, bias=None, **kw):
        """One NativeLinear for the file tensors ``names`` stacked along N (fused)."""
        parts = [tensors[n] for n in names]
        whole = parts[0] if len(parts) == 1 else stack_rows(parts)
        src = parts if all(isinstance(t, PackedTensor) for t in parts) else None
        return NativeLinear(native_weight(whole), bias, sources=src, **kw)

    def bias(names):
        bs = [state.get(n) for n in names]
        return None if bs[0] is None else torch.cat(bs).to(COMPUTE_DTYPE)

    model = Transformer(config, backend=backend, device="meta")
    if release is not None:
        release()   # what reading the file touched so far (header, Q/K rows unpermuted)
    for i, blk in enumerate(model.layers):
        a, m, p = blk.attn, blk.mlp, f"layers.{i}."
        names = [p + f"attn.{n}.weight" for n in ("wq", "wk", "wv")]
        if same_format([tensors[n] for n in names]):   # one format: fuse
            a.wqkv = linear(names, bias([n[:-6] + "bias" for n in names]))
            a.wq = a.wk = a.wv = None
        else:
            for n, name in zip(("wq", "wk", "wv"), names):
                b = state.get(name[:-6] + "bias")
                setattr(a, n, linear([name], None if b is None else b.to(COMPUTE_DTYPE)))
        a.wo = linear([p + "attn.wo.weight"])
        names = [p + "mlp.w_gate.weight", p + "mlp.w_up.weight"]
        if same_format([tensors[n] for n in names]):
            m.w_gate_up, m.w_gate, m.w_up = linear(names), None, None
        else:
            m.w_gate, m.w_up = (linear([n]) for n in names)
        m.w_down = linear([p + "mlp.w_down.weight"])
        if release is not None:
            release()
    emb = tensors["embed.weight"]
    table = DenseWeight(emb) if isinstance(emb, torch.Tensor) else pack_q8_0(emb, COMPUTE_DTYPE)
    model.embed = NativeEmbedding(table)
    if release is not None:
        release()
    if config.tie_word_embeddings:   # one int8 table serves the lookup and the LM head
        src = [emb] if isinstance(emb, PackedTensor) else None
        model.lm_head = NativeLinear(table, out_dtype=torch.float32, sources=src)
    else:
        model.lm_head = linear(["lm_head.weight"], out_dtype=torch.float32)
    # Left on the meta device: the norms (and the RoPE buffer). Give them real tensors.
    # (Not ``to_empty``: on meta tensors it goes through torch's Python decompositions, whose
    # first use imports sympy: ~1 s of start-up.)
    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling,
                                   freq_factors=config.extra.get("rope_freq_factors"))
    for name, _ in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr,
                nn.Parameter(state[name].to(COMPUTE_DTYPE), requires_grad=False))
    return model.eval()


def int4_to_native(model) -> int:
    """Run a CPU model's int4 ``QuantLinear`` layers (``quantize_model(model, "int4")``)
    through the int4 CPU kernel: w = q s + min maps exactly onto its (q - 8) scale + zero with
    scale s, zero min + 8s (``ops.cpu_int4.pack_int4_groupwise``), in bf16 compute mode (x is
    cast to bf16 and the product back to the model's dtype). Layers whose shape the kernel does
    not take stay as they are. -> how many were swapped."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        if not (isinstance(mod, QuantLinear) and mod.weight_class is Int4Weight):
            continue
        qt = mod.qt
        if qt.qweight.device.type != "cpu" or qt.group_size not in GROUP_SIZES \
                or mod.out_features % N_MULTIPLE:
            continue
        w = pack_int4_groupwise(qt, compute_dtype=COMPUTE_DTYPE)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, NativeLinear(w, mod.bias))
        swapped += 1
    return swapped
