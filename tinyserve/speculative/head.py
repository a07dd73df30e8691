"""An EAGLE-style draft head: one decoder layer that extrapolates the target's hidden state.

The target's final hidden state f(i) (after its final norm) is everything its LM head needs to
give the distribution of token i+1. Given f(i) and the embedding of the token that was chosen
there, t(i+1), the head predicts f(i+1), and the target's own LM head turns that into a draft
distribution for t(i+2) (Li et al., EAGLE, 2024). Drafting k tokens is k head steps:

    pairs (f(i), e(t(i+1)))  --fc [2D -> D]--> x --decoder layer--> --norm--> f^(i+1)
    q(t(i+2)) = softmax(f^(i+1) @ W[vocab]^T)      (the target's LM head, draft vocabulary only)
    next pair: (f^(i+1), e(t(i+2))), ...

The layer has its own KV cache over the pairs. After a verify step the pairs built from the
head's own predictions are rolled back and the accepted positions re-fed with the target's
true hidden states, so errors never outlive a round.

**Draft vocabulary.** The LM head is [V, D] = 49152 x 576 for SmolLM2: 28M multiply-adds per
token, more than the head's layer. Drafting restricts it to the ``vocab_ids`` rows the target
actually emits most (a frequency cut, chosen by ``train-head``). q is zero outside them, which
is still an exact draft: the rule only needs q(x) > 0 for the tokens it proposes; a target
token outside the draft vocabulary is simply always a rejection (or the correction token).

Files: safetensors, the head's parameters in fp16 plus ``vocab_ids`` (int32); the metadata
holds the format tag, the head's ModelConfig, the target's shape and the training record
(losses, held-out alpha per draft position) that notebook 04 plots.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .. import ops
from ..attention import ContiguousBackend
from ..config import ModelConfig
from ..kv_cache import KVCache
from ..model import Block, Linear, RMSNorm, WeightsError
from .drafts import Draft, draw

HEAD_FORMAT = "tinyserve-eagle-head-v1"
DEFAULT_HEAD = Path(__file__).with_name("smollm2_head.safetensors")
TRAIN_COMMAND = "python -m tinyserve.speculative train-head"


def head_config(target: ModelConfig, intermediate_size: int | None = None) -> ModelConfig:
    """The head's one layer: the target's layer shape (``intermediate_size`` may narrow it)."""
    return dataclasses.replace(target, num_layers=1, name="draft-head",
                               intermediate_size=intermediate_size or target.intermediate_size)


class DraftHead(nn.Module):
    """(features [B, T, D], next-token embeddings [B, T, D]) -> predicted next features."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.num_layers != 1:
            raise ValueError(f"a draft head has exactly one layer, got {config.num_layers}")
        self.config = config
        D = config.hidden_size
        self.fc = Linear(2 * D, D)
        self.block = Block(config)
        self.norm = RMSNorm(D, config.rms_norm_eps)
        self.register_buffer("inv_freq", ops.rope.rope_inv_freq(
            config.head_dim, config.rope_theta, config.rope_scaling), persistent=False)

    def forward(self, feats: torch.Tensor, embeds: torch.Tensor, cache: KVCache | None = None,
                valid: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
        """Without a cache: whole sequences (training; ``valid`` [B, T] marks real pairs).
        With one: the pairs continue the cached ones, and are appended."""
        B, T, _ = feats.shape
        num_new = (torch.full((B,), T, dtype=torch.long, device=feats.device) if valid is None
                   else valid.sum(1))
        attn = ContiguousBackend(backend)
        if cache is None:
            meta = attn.no_cache(num_new, T)
        else:
            cache.check_room(num_new)
            meta = attn.batch(cache.lengths, num_new, T)
        cos, sin = ops.rope_cos_sin(meta.positions, self.inv_freq)
        blk = self.block
        x = self.fc(torch.cat([feats, embeds], dim=-1), backend)               # [B, T, D]
        a = blk.attn(blk.attn_norm(x, backend), cos, sin,
                     None if cache is None else cache.layers[0], meta, backend)
        normed, h = blk.mlp_norm(a, backend, residual=x)                       # h = x + attn
        out, _ = self.norm(blk.mlp(normed, backend), backend, residual=h)      # norm(h + mlp)
        if cache is not None:
            cache.lengths += num_new
        return out


def init_head(head: DraftHead, target, seed: int = 0) -> DraftHead:
    """A starting point that already works as a (poor) draft, so minutes of training go further:

    * fc passes the next token's embedding through and adds a little of the feature:
      x = e(t(i+1)) + 0.1 f(i);
    * the layer is the target's first layer (when the shapes agree; else small random weights),
      which is made to read embeddings;
    * the output norm is the target's final norm, so predictions have the features' scale.

    Then head + LM head starts out as a one-layer language model over the next token.
    """
    D = head.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    first = dict(target.layers[0].named_parameters())
    with torch.no_grad():
        for name, p in head.block.named_parameters():
            if name in first and first[name].shape == p.shape:
                p.copy_(first[name])
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        eye = torch.eye(D)
        head.fc.weight.copy_(torch.cat([0.1 * eye, eye], dim=1))
        head.norm.weight.copy_(target.norm.weight)
    return head


# ---- the draft -----------------------------------------------------------------------------
class HeadDraft(Draft):
    """Drafts with a ``DraftHead`` over the target's hidden states (see the module docstring)."""
    uses_hidden = True

    def __init__(self, target, head: DraftHead, vocab_ids: torch.Tensor, name: str = "head"):
        tc, hc = target.config, head.config
        if hc.hidden_size != tc.hidden_size:
            raise ValueError(f"draft head hidden size {hc.hidden_size} != target's "
                             f"{tc.hidden_size}")
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long)
        if vocab_ids.dim() != 1 or vocab_ids.numel() == 0 or int(vocab_ids.min()) < 0 \
                or int(vocab_ids.max()) >= tc.vocab_size:
            raise ValueError(f"vocab_ids must be a non-empty 1-D list of ids in "
                             f"[0, {tc.vocab_size})")
        self.target, self.head, self.name = target, head.to(target.device, target.dtype), name
        self.vocab_size = tc.vocab_size
        self.vocab_ids = vocab_ids.to(target.device)
        # The LM head's rows of the draft vocabulary: [Vd, D], gathered once.
        self.w_vocab = target.lm_head_weight[self.vocab_ids].contiguous()

    def start(self, context, max_len, hidden):
        if hidden is None:
            raise ValueError("HeadDraft needs the target's hidden states")
        t = self.target
        self.cache = KVCache(self.head.config, 1, max_len, dtype=t.dtype, device=t.device)
        self.n_true = 0                  # cached pairs built from the target's true features
        self.pending = (hidden[:0], [])  # true pairs not fed yet: features [m, D], m tokens
        self.commit(context, hidden.shape[0], hidden)

    def commit(self, context, n_new, hidden):
        if hidden is None or hidden.shape[0] != n_new:
            raise ValueError(f"HeadDraft.commit needs hidden [{n_new}, D]")
        self.cache.truncate([self.n_true])   # drop the pairs fed with predicted features
        feats, toks = self.pending
        self.pending = (torch.cat([feats, hidden]), toks + list(context[len(context) - n_new:]))

    def _logits(self, f: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [V] from a feature [D]: -inf outside the draft vocabulary."""
        out = torch.full((self.vocab_size,), float("-inf"), dtype=f.dtype, device=f.device)
        out[self.vocab_ids] = self.w_vocab @ f
        return out

    @torch.no_grad()
    def propose(self, context, k, params, generator):
        feats, toks = self.pending
        emb = self.target.embed
        dev = feats.device
        f = self.head(feats[None], emb(torch.tensor([toks], device=dev)), self.cache)[0, -1]
        self.n_true, self.pending = int(self.cache.lengths[0]), (feats[:0], [])
        tokens, qs = [], []
        for i in range(k):
            if params.is_greedy:   # argmax over the draft vocabulary: no [V] vector needed
                tok, q = int(self.vocab_ids[(self.w_vocab @ f).argmax()]), None
            else:
                tok, q = draw(self._logits(f), params, generator)
            tokens.append(tok)
            qs.append(q)
            if i + 1 < k:
                f = self.head(f[None, None], emb(torch.tensor([[tok]], device=dev)),
                              self.cache)[0, -1]
        return tokens, None if params.is_greedy else torch.stack(qs)


# ---- files ---------------------------------------------------------------------------------
def save_head(path, head: DraftHead, vocab_ids: torch.Tensor, target_config: ModelConfig,
              record: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write the head (parameters in ``dtype``), its draft vocabulary and metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {f"head.{n}": p.detach().to("cpu", dtype).contiguous()
               for n, p in head.named_parameters()}
    tensors["vocab_ids"] = torch.as_tensor(vocab_ids).to("cpu", torch.int32).contiguous()
    meta = {"format": HEAD_FORMAT,
            "head_config": json.dumps(head.config.to_dict()),
            "target": json.dumps({k: getattr(target_config, k) for k in
                                  ("name", "vocab_size", "hidden_size", "num_layers")}),
            "record": json.dumps(record or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_head_metadata(path) -> dict:
    """The metadata of a head file, JSON fields decoded: format, head_config, target, record."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no draft head at {path}: train one with `{TRAIN_COMMAND}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:   # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path} is not a tinyserve draft head (format "
                         f"{meta.get('format')!r}, expected {HEAD_FORMAT!r})")
    try:
        return {"format": meta["format"], **{k: json.loads(meta[k]) for k in
                                             ("head_config", "target", "record")}}
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged draft-head metadata ({e})") from None


def load_head(path=DEFAULT_HEAD, target=None) -> tuple[DraftHead, torch.Tensor, dict]:
    """-> (head in fp32 on the CPU, vocab_ids, metadata). With ``target``, check that the
    head was made for a model of its shape (hidden size, vocabulary)."""
    from safetensors.torch import load_file
    meta = read_head_metadata(path)
    cfg = ModelConfig(**meta["head_config"])
    if target is not None:
        t, want = target.config, meta["target"]
        for key in ("hidden_size", "vocab_size"):
            if getattr(t, key) != want[key]:
                raise ValueError(f"{path}: head trained for a target with {key} "
                                 f"{want[key]}, this target has {getattr(t, key)}")
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read the tensors: {e}") from None
    if "vocab_ids" not in tensors:
        raise WeightsError(f"{path}: no vocab_ids tensor")
    vocab_ids = tensors.pop("vocab_ids").long()
    head = DraftHead(cfg)
    state = {n.removeprefix("head."): t for n, t in tensors.items()}
    expected = {n: tuple(p.shape) for n, p in head.named_parameters()}
    if set(state) != set(expected):
        raise WeightsError(f"{path}: missing tensors {sorted(set(expected) - set(state))}, "
                           f"unexpected {sorted(set(state) - set(expected))}")
    bad = [f"{n}: expected {expected[n]}, got {tuple(t.shape)}" for n, t in state.items()
           if tuple(t.shape) != expected[n]]
    if bad:
        raise WeightsError(f"{path}: wrong tensor shapes: " + "; ".join(bad))
    with torch.no_grad():
        for n, p in head.named_parameters():
            p.copy_(state[n].float())
    return head.eval(), vocab_ids, meta


def load_head_draft(target, path=DEFAULT_HEAD) -> HeadDraft:
    """The committed SmolLM2 head (or the file at ``path``) as a draft for ``target``."""
    head, vocab_ids, _ = load_head(path, target)
    return HeadDraft(target, head, vocab_ids, name="head")
