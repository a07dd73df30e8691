"""Phase 1 of ``python -m tinyserve.speculative train-head``: the data, cached.

The target answers the training chat prompts greedily (batched), then one forward pass over
every sequence (chat, docs, code; see ``data.py``) records its final hidden states. Stored once
as safetensors under ``~/.cache/tinyserve/speculative/`` (token ids int32, features fp16,
sequence offsets), keyed by a hash of everything that went in, so a second run starts training
at once. The draft vocabulary is the ``draft_vocab`` most frequent token ids of the training
sequences (the chat answers are the target's own output), plus the stop tokens.

``TrainConfig``, the command's settings, lives here because this phase is the first to read it;
``train.py`` (phases 2 and 3) imports it from here.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..generate import generate_ids
from . import data as D

CACHE_DIR = Path(os.environ.get("TINYSERVE_CACHE", Path.home() / ".cache" / "tinyserve")) \
    / "speculative"


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    window: int = 128              # positions per training window
    lr: float = 2e-3
    seed: int = 0
    draft_vocab: int = 4096
    intermediate_size: int = 1536     # the target's: the layer starts as its first layer
    reg_weight: float = 1.0
    unroll: int = 1                # passes per step: 1 = teacher forcing only
    chat_fraction: float = 0.6     # share of each batch drawn from the chat sequences
    chat_prompts: int = 256
    heldout_prompts: int = 24
    answer_tokens: int = 128
    gen_batch: int = 32
    seq_len: int = 256             # docs / code chunks
    docs_tokens: int = 24000
    code_tokens: int = 12000
    eval_every: int = 100
    eval_k: int = 5


# ---- phase 1: data -------------------------------------------------------------------------
def _chunks(ids: list[int], seq_len: int, budget: int) -> list[list[int]]:
    """Up to ``budget`` tokens as windows of ``seq_len``, spread evenly over ``ids``."""
    n_all = max(1, len(ids) // seq_len)
    n = min(n_all, max(1, budget // seq_len))
    starts = [round(i * (len(ids) - seq_len) / max(1, n - 1)) for i in range(n)] \
        if len(ids) > seq_len else [0]
    return [ids[s:s + seq_len] for s in starts]


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def self_distill(model, tokenizer, prompts: list[str], max_tokens: int, batch: int,
                 bar=None) -> list[tuple[list[int], int]]:
    """The target's greedy answers -> [(prompt + answer ids, answer start)], in batches."""
    out = []
    stops = sorted(tokenizer.stop_token_ids)
    for s in range(0, len(prompts), batch):
        ps = [_chat_ids(tokenizer, p) for p in prompts[s:s + batch]]
        answers = generate_ids(model, ps, max_tokens, stop_token_ids=stops)
        out += [(p + a, len(p)) for p, a in zip(ps, answers)]
        if bar is not None:
            bar.update(len(ps))
    return out


@torch.no_grad()
def extract_features(model, seqs: list[list[int]], batch: int = 8, bar=None) -> torch.Tensor:
    """Final hidden states of every position: [sum of lengths, D] fp16, sequences in order.
    Sequences are run longest first in right-padded batches (no LM head: last_only)."""
    dev = model.device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    feats: list = [None] * len(seqs)
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        T = len(seqs[idx[0]])
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
        num_new = torch.tensor([len(seqs[i]) for i in idx])
        _, hidden = model.run(ids.to(dev), num_new=num_new, last_only=True, return_hidden=True)
        for r, i in enumerate(idx):
            feats[i] = hidden[r, :len(seqs[i])].to("cpu", torch.float16)
        if bar is not None:
            bar.update(int(num_new.sum()))
    return torch.cat(feats)


def _key(model, cfg: TrainConfig, parts: dict) -> str:
    c = model.config
    blob = json.dumps({"v": 2, "model": [c.name, c.vocab_size, c.hidden_size, c.num_layers,
                                         float(model.norm.weight.double().sum())],
                       "dtype": str(model.dtype), "parts": parts,
                       "cfg": [cfg.chat_prompts, cfg.heldout_prompts, cfg.answer_tokens,
                               cfg.seq_len, cfg.docs_tokens, cfg.code_tokens, cfg.seed]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_dataset(model, tokenizer, cfg: TrainConfig, cache_dir=CACHE_DIR, log=print) -> dict:
    """-> {"ids" [N] long, "feats" [N, D] fp16, "offsets" [S+1], "kind" [S] (0 docs, 1 code,
    2 chat), "split" [S] (0 train, 1 held-out), "answer_start" [S], "info" dict}."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    text = {s: D.texts(s) for s in ("train", "heldout")}
    prompts = {"train": D.chat_prompts(cfg.chat_prompts, "train", cfg.seed),
               "heldout": D.chat_prompts(cfg.heldout_prompts, "heldout", cfg.seed)}
    info = {"train": D.describe({**text["train"], "chat_prompts": prompts["train"]}),
            "heldout": D.describe({**text["heldout"], "chat_prompts": prompts["heldout"]})}
    path = Path(cache_dir) / f"features-{_key(model, cfg, info)}.safetensors"
    if path.is_file():
        log(f"[train-head] cached features: {path}")
        with safe_open(str(path), framework="pt") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
            out["info"] = json.loads(f.metadata()["info"])
        return out

    seqs, rows = [], []                     # rows: (kind, split, answer start) per sequence

    def add(ids, kind, split, answer_start=0):
        seqs.append(ids)
        rows.append((kind, split, answer_start))

    # held-out docs and code: a sixth of the training budget (they only feed the loss curve)
    budgets = {"train": (cfg.docs_tokens, cfg.code_tokens),
               "heldout": (cfg.docs_tokens // 6, cfg.code_tokens // 6)}
    for s, sid in (("train", 0), ("heldout", 1)):
        for k, (name, budget) in enumerate(zip(("docs", "code"), budgets[s])):
            ids = tokenizer.encode("\n\n".join(text[s][name]), add_special_tokens=False)
            for c in _chunks(ids, cfg.seq_len, budget):
                add(c, k, sid)
    t0 = time.perf_counter()
    n_prompts = len(prompts["train"]) + len(prompts["heldout"])
    with tqdm(total=n_prompts, desc="target answers", unit="prompt") as bar:
        for s, sid in (("train", 0), ("heldout", 1)):
            for ids, a in self_distill(model, tokenizer, prompts[s], cfg.answer_tokens,
                                       cfg.gen_batch, bar):
                add(ids, 2, sid, a)
    t1 = time.perf_counter()
    with tqdm(total=sum(map(len, seqs)), desc="target features", unit="tok") as bar:
        feats = extract_features(model, seqs, bar=bar)
    t2 = time.perf_counter()
    lens = torch.tensor([len(s) for s in seqs])
    info.update(generate_s=t1 - t0, features_s=t2 - t1, sequences=len(seqs),
                tokens=int(lens.sum()))
    kind, split, answer_start = torch.tensor(rows).T
    out = {"ids": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
           "feats": feats.contiguous(),
           "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
           "kind": kind.clone(), "split": split.clone(), "answer_start": answer_start.clone()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"info": json.dumps(info)})
    log(f"[train-head] features saved: {path}")
    out["info"] = info
    return out


def choose_vocab(ds: dict, size: int, stop_ids=()) -> torch.Tensor:
    """The ``size`` most frequent ids of the training sequences (+ stop ids), sorted."""
    train = [i for i in range(len(ds["kind"])) if int(ds["split"][i]) == 0]
    off = ds["offsets"]
    ids = torch.cat([ds["ids"][off[i]:off[i + 1]] for i in train]).long()
    counts = torch.bincount(ids)
    top = counts.argsort(descending=True)[:size]
    top = top[counts[top] > 0]
    return torch.unique(torch.cat([top, torch.tensor(sorted(stop_ids), dtype=torch.long)]))
