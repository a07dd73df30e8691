"""Attention for the "native" CPU backend: PyTorch's fused SDPA on the keys each row really has.

The references (``attention_common.attention_ref``, ``paged_attention``'s) upcast q, k, v to
fp32, build a [B, Hq, T, S] score tensor over the whole cache, mask, softmax, matmul: ~10 ops
and 3 fp32 copies per layer, and the paged one re-gathers every block of every row per layer
with host-side checks. Here, per row:

  contiguous  K/V [1, Hkv, S, D] sliced to the row's kv_len keys (a view, nothing copied);
  paged       one ``index_select`` of the row's token slots [kv_len] from the pool viewed as
              [num_blocks * block_size, Hkv, D] (reads exactly the kv_len * Hkv * D elements
              attention must read anyway). The slot index depends only on the block tables
              and lengths, which are the same tensors for every layer of a step, so it is built
              once per step (``step_cache.PerStep``) instead of once per layer;

then one ``F.scaled_dot_product_attention`` call with GQA (``enable_gqa``: no repeated K/V),
causal by an explicit mask when a row has several queries (its queries are the LAST q_len of
kv_len keys, which SDPA's own ``is_causal`` does not express: it aligns queries top-left).
Rows run one after another: on a CPU the batch is small and rows differ in length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .paged_layout import paged_write_ref
from .step_cache import PerStep


def _sdpa(q, k, v, q_first: int):
    """q [1, Hq, T, D] at positions q_first .. q_first + T - 1; k, v [1, Hkv, S, D] the row's
    keys 0 .. S - 1 -> [1, Hq, T, D]."""
    T, S = q.shape[2], k.shape[2]
    mask = None
    if T > 1:
        j = torch.arange(S)
        mask = j[None, :] <= (q_first + torch.arange(T))[:, None]      # [T, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention_native(q, k, v, q_pos, kv_len):
    """As ``attention_ref`` (q [B, Hq, T, D], k/v [B, Hkv, S, D], q_pos [B, T], kv_len [B]),
    for rows whose T queries are consecutive positions ending at kv_len - 1 or earlier
    (prefill, chunked prefill and decode all are). Padded query rows (past a row's real
    tokens) attend like the last real one: their outputs are never read."""
    out = None if q.shape[0] == 1 else torch.empty_like(q)
    for b, n in enumerate(kv_len.tolist()):
        o = (torch.zeros_like(q[b:b + 1]) if n == 0 else     # no key: zeros, as the reference
             _sdpa(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], int(q_pos[b, 0])))
        if out is None:
            return o
        out[b:b + 1] = o
    return out


def _slot_rows(block_tables, kv_lens, block_size: int) -> list[torch.Tensor]:
    """Each row's token slots [kv_len] in the pool viewed as [slots, Hkv, D]."""
    offs = torch.arange(block_size)
    rows = []
    for bt, n in zip(block_tables.long(), kv_lens.tolist()):
        nb = -(-n // block_size)
        rows.append((bt[:nb, None] * block_size + offs).flatten()[:n])
    return rows


_slots = PerStep(_slot_rows)                                         # once per step, not layer
_all_written = PerStep(lambda slot_mapping: bool((slot_mapping >= 0).all()))


def paged_write_native(k_cache, v_cache, k_new, v_new, slot_mapping):
    """As ``paged_write_ref`` for contiguous pools and non-negative slots (what the engine
    passes): two ``index_copy_`` into the pools viewed as [slots, Hkv, D], no host checks."""
    if not (_all_written(slot_mapping) and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return paged_write_ref(k_cache, v_cache, k_new, v_new, slot_mapping)
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, Hkv, D).index_copy_(0, slot_mapping, k_new)
    v_cache.view(-1, Hkv, D).index_copy_(0, slot_mapping, v_new)


def paged_attention_native(q, k_cache, v_cache, block_tables, kv_lens, cu_q=None):
    """As ``paged_attention``'s references: cu_q None -> decode, q [B, Hq, D] (each row's
    last token); else packed q [N, Hq, D], row b's queries cu_q[b]:cu_q[b + 1], the last ones
    of its kv_lens[b] keys. Pools [num_blocks, block_size, Hkv, D]."""
    bs, Hkv, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    kp, vp = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
    rows = _slots(block_tables, kv_lens, bs)
    if cu_q is None and len(rows) == 1 and rows[0].numel():   # one decode row: no copies
        k = kp.index_select(0, rows[0]).transpose(0, 1)[None]
        v = vp.index_select(0, rows[0]).transpose(0, 1)[None]
        return _sdpa(q.transpose(0, 1)[None], k, v, rows[0].numel() - 1)[0].transpose(0, 1)
    out = torch.empty_like(q)
    starts = range(len(rows)) if cu_q is None else cu_q.tolist()
    for b, slots in enumerate(rows):
        n = slots.numel()
        s, e = (b, b + 1) if cu_q is None else (starts[b], starts[b + 1])
        if e == s:
            continue
        if n == 0:
            out[s:e] = 0
            continue
        k = kp.index_select(0, slots).transpose(0, 1)[None]          # [1, Hkv, n, D]
        v = vp.index_select(0, slots).transpose(0, 1)[None]
        o = _sdpa(q[s:e].transpose(0, 1)[None], k, v, n - (e - s))   # [1, Hq, T, D]
        out[s:e] = o[0].transpose(0, 1)
    return out
