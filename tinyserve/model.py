"""LLaMA-family decoder (LLaMA, Mistral, Qwen2, SmolLM2) written against ``tinyserve.ops``.

    x = embed(ids)
    for each layer:  x += attn(rms_norm(x));  x += mlp(rms_norm(x))
    logits = lm_head(rms_norm(x))

Parameter names (the canonical state dict every loader produces):
    embed.weight [V, D]               norm.weight [D]            lm_head.weight [V, D] (if untied)
    layers.{i}.attn_norm.weight [D]   layers.{i}.mlp_norm.weight [D]
    layers.{i}.attn.{wq,wk,wv,wo}.weight (+ .bias for wq/wk/wv when config.attention_bias)
    layers.{i}.mlp.{w_gate,w_up,w_down}.weight
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .attention import AttentionMetadata, ContiguousBackend
from .config import ModelConfig
from .errors import TinyserveError
from .kv_cache import KVCache


class WeightsError(TinyserveError, ValueError):
    """A state dict that does not fit the model: missing, unexpected or mis-shaped tensors."""


class Linear(nn.Module):
    """Weight [out, in] (+ bias) applied through ops.linear; quantized variants replace it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x, backend="auto"):
        return ops.linear(x, self.weight, self.bias, backend=backend)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x, backend="auto", residual=None):
        """With ``residual``: h = x + residual, returns (rms_norm(h), h) in one pass."""
        return ops.rms_norm(x, self.weight, self.eps, residual=residual, backend=backend)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, device=None):
        super().__init__()
        self.c = c
        self.wq = Linear(c.hidden_size, c.num_heads * c.head_dim, c.attention_bias, device)
        self.wk = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias, device)
        self.wv = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias, device)
        self.wo = Linear(c.num_heads * c.head_dim, c.hidden_size, device=device)
        # The native CPU path (quant/cpu_native.py) fuses wq, wk, wv into one [Nq+2Nkv, D]
        # weight: one kernel call reading x once instead of three (and None in wq/wk/wv).
        self.wqkv = None
        self.qkv_sizes = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                          c.num_kv_heads * c.head_dim)

    def forward(self, x, cos, sin, kv_cache, attn_metadata: AttentionMetadata, backend):
        """x [B, T, hidden] -> [B, T, hidden]. Where k/v are stored and which keys each query
        reads is the attention backend's business (``attn_metadata.backend``), not the model's."""
        B, T, _ = x.shape
        c = self.c
        if self.wqkv is not None:
            q, k, v = self.wqkv(x, backend).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.wq(x, backend), self.wk(x, backend), self.wv(x, backend)
        q = q.view(B, T, c.num_heads, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = ops.apply_rope(q, k, cos, sin, backend=backend)
        o = attn_metadata.backend.forward(q, k, v, kv_cache, attn_metadata)   # [B, Hq, T, D]
        return self.wo(o.transpose(1, 2).reshape(B, T, -1), backend)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, device=None):
        super().__init__()
        self.w_gate = Linear(c.hidden_size, c.intermediate_size, device=device)
        self.w_up = Linear(c.hidden_size, c.intermediate_size, device=device)
        self.w_down = Linear(c.intermediate_size, c.hidden_size, device=device)
        self.w_gate_up = None   # fused [2F, D] on the native CPU path, like Attention.wqkv

    def forward(self, x, backend):
        if self.w_gate_up is not None:
            gate, up = self.w_gate_up(x, backend).chunk(2, dim=-1)
        else:
            gate, up = self.w_gate(x, backend), self.w_up(x, backend)
        return self.w_down(ops.swiglu(gate, up, backend=backend), backend)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, device=None):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, device)
        self.attn = Attention(c, device)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, device)
        self.mlp = MLP(c, device)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, backend: str = "auto", device=None):
        """``device="meta"`` builds the skeleton without allocating any weight (the native
        CPU path then puts its own modules in; quant/cpu_native.py)."""
        super().__init__()
        ops.check_backend(backend)
        self.config, self.backend = config, backend
        c = config
        # On meta, skip nn.Embedding's random init: normal_ on a meta tensor imports torch's
        # decomposition machinery (~2 s), for values that would never exist anyway.
        skip = torch.empty(c.vocab_size, c.hidden_size, device="meta") if device == "meta" else None
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size, device=device, _weight=skip)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(c, device) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, device)
        self.lm_head = (None if c.tie_word_embeddings
                        else Linear(c.hidden_size, c.vocab_size, device=device))
        self.register_buffer("inv_freq", ops.rope.rope_inv_freq(c.head_dim, c.rope_theta,
                                                                c.rope_scaling), persistent=False)
        # Quantized tensors as stored in the source file (e.g. GGUF Q4_1 blocks), keyed by
        # parameter name; the quantization chapter runs kernels on these directly.
        self.packed_weights: dict = {}

    # ---- weights -------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.named_parameters()}

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "state dict"):
        """Copy ``state`` in, casting to the model's dtype; names and shapes must match exactly."""
        expected = self.expected_shapes()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise WeightsError(f"{source}: missing tensors {missing[:8]}"
                               f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
        bad = [f"{n}: expected {expected[n]}, got {tuple(t.shape)}"
               for n, t in state.items() if tuple(t.shape) != expected[n]]
        if bad:
            raise WeightsError(f"{source}: wrong tensor shapes: " + "; ".join(bad[:8]))
        params = dict(self.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def _head(self, x):
        """Logits. A quantized head (``lm_head`` replaced by a QuantLinear) runs its own kernel."""
        if self.lm_head is not None:
            return self.lm_head(x, self.backend)
        return ops.linear(x, self.embed.weight, backend=self.backend)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    # The final norm's weight is a plain tensor in the activation dtype on every path (the
    # embedding and linears may be quantized).
    @property
    def device(self):
        return self.norm.weight.device

    @property
    def dtype(self):
        return self.norm.weight.dtype

    # ---- forward -------------------------------------------------------------------------
    def _layers(self, x, cos, sin, kv_caches, meta):
        """The decoder stack with the residual add fused into each RMSNorm:
        h is the residual stream, ``normed`` the input of the next sub-block."""
        be, h = self.backend, x
        normed = self.layers[0].attn_norm(h, be)
        for i, blk in enumerate(self.layers):
            a = blk.attn(normed, cos, sin, None if kv_caches is None else kv_caches[i], meta, be)
            normed, h = blk.mlp_norm(a, be, residual=h)                      # h += attn
            m = blk.mlp(normed, be)
            nxt = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.norm
            normed, h = nxt(m, be, residual=h)                               # h += mlp
        return normed  # already through the final norm

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches,
                attn_metadata: AttentionMetadata, logits_index: torch.Tensor | None = None,
                return_hidden: bool = False):
        """The one forward: input_ids, positions [B, T] -> logits [B, T, V].

        ``kv_caches``: one (K, V) per layer in ``attn_metadata.backend``'s layout, or None (no
        cache); the metadata says where this step's k/v go and what each query reads. The
        engine packs the new tokens of many sequences into one row (B = 1, T = N), so every
        linear layer runs once on all of them; ``Transformer.run`` feeds [B, T] batches
        against a contiguous ``KVCache``. ``logits_index`` [M] (indices into the B * T
        tokens) -> logits [M, V] of those tokens only, which is all sampling needs and saves
        the rest of the [T, D] x [D, V] LM-head matmul. ``return_hidden`` -> (logits, hidden
        [B, T, D]): every token's final hidden state (after the final norm, what the LM head
        reads); speculative decoding's draft heads are trained on and fed these.
        """
        cos, sin = ops.rope_cos_sin(positions, self.inv_freq)
        hidden = self._layers(self.embed(input_ids), cos, sin, kv_caches, attn_metadata)
        x = hidden if logits_index is None else hidden.flatten(0, 1)[logits_index]
        logits = self._head(x)
        return (logits, hidden) if return_hidden else logits

    # ---- the contiguous-cache front door ---------------------------------------------------
    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, cache: KVCache | None = None,
            num_new: torch.Tensor | None = None, last_only: bool = False,
            return_hidden: bool = False):
        """input_ids: [B, T] -> logits [B, T, V] (or [B, 1, V] with ``last_only``), through
        ``forward`` with a ``ContiguousBackend``.

        Without a cache, the T tokens are the whole sequence (the recompute-everything
        baseline). With one, they continue each row after ``cache.lengths[b]`` tokens and are
        appended to it. ``num_new[b] <= T`` says how many of row b's tokens are real (the rest
        is right padding); ``last_only`` keeps only the logits of each row's last real token.
        ``return_hidden`` -> (logits, hidden [B, T, D]), hidden for every position.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        dev = self.device
        input_ids = input_ids.to(dev)
        num_new = (torch.full((B,), T, dtype=torch.long, device=dev) if num_new is None
                   else num_new.to(dev))
        if (input_ids < 0).any() or (input_ids >= self.config.vocab_size).any():
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        attn = ContiguousBackend(self.backend)
        if cache is None:
            meta = attn.no_cache(num_new, T)
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache batch {cache.batch_size} != input batch {B}")
            cache.check_room(num_new)
            meta = attn.batch(cache.lengths, num_new, T)
        index = (torch.arange(B, device=dev) * T + (num_new - 1).clamp(min=0)
                 if last_only else None)
        out = self.forward(input_ids, meta.positions, None if cache is None else cache.layers,
                           meta, index, return_hidden)
        if cache is not None:
            cache.lengths += num_new
        if last_only:
            out = (out[0][:, None], out[1]) if return_hidden else out[:, None]
        return out

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row for every row: [B, 1] -> logits [B, 1, V]; appends to ``cache``.

        Unlike ``run`` it checks nothing on the host and has fixed shapes (attention spans the
        whole preallocated cache, masked by the lengths on the device), so it can be captured
        once in a CUDA graph and replayed per token. The caller guarantees room.
        """
        meta = ContiguousBackend(self.backend).decode(cache.lengths)
        logits = self.forward(input_ids, meta.positions, cache.layers, meta)
        cache.lengths += 1
        return logits
