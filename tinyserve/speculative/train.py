"""Train the draft head on the CPU: ``python -m tinyserve.speculative train-head``.

Three phases, each with a progress bar:

1. **data** (cached): the target answers the training chat prompts greedily (batched), then
   one forward pass over every sequence (chat, docs, code; see ``data.py``) records its final
   hidden states. Stored once as safetensors under ``~/.cache/tinyserve/speculative/``
   (token ids int32, features fp16, sequence offsets), keyed by a hash of everything that
   went in, so a second run starts training at once.
2. **train**: windows of W positions; at position i the head reads (f(i), e(t(i+1))) and must
   predict f(i+1). Loss = ``reg_weight`` * smooth-L1(f^, f) (EAGLE's feature regression) +
   cross-entropy of the head's draft-vocabulary distribution against the target's own
   distribution softmax(f(i+1) W^T) on that vocabulary (distillation: the target's full
   distribution, not just the text's next token). With ``unroll`` 2 a second pass feeds the
   head its own predictions f^ in place of f, as drafting beyond the first token does
   (EAGLE-3's "training-time test"), and adds its loss.
3. **evaluate**: greedy speculative decoding replayed on the target's greedy answers to
   held-out chat prompts, where the answer *is* what the target would emit, so the alpha per
   draft position is exactly what decoding sees (``heldout_alpha``).

The draft vocabulary is the ``draft_vocab`` most frequent token ids of the training sequences
(the chat answers are the target's own output), plus the stop tokens.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..sampling import SamplingParams
from . import data as D
from .head import DEFAULT_HEAD, DraftHead, HeadDraft, head_config, init_head, save_head

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
    from ..generate import generate_ids
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


# ---- phase 2: train ------------------------------------------------------------------------
class Windows:
    """Random training windows: [B, W] inputs (f(i), t(i+1)), targets f(i+1), validity."""

    def __init__(self, ds: dict, split: int, window: int, chat_fraction: float, seed: int):
        self.ds, self.W, self.chat_fraction = ds, window, chat_fraction
        off = ds["offsets"]
        seqs = [i for i in range(len(ds["kind"])) if int(ds["split"][i]) == split
                and off[i + 1] - off[i] >= 2]
        self.groups = [[i for i in seqs if int(ds["kind"][i]) == 2],
                       [i for i in seqs if int(ds["kind"][i]) != 2]]
        self.g = torch.Generator().manual_seed(seed)

    def _pick(self, group):
        off = self.ds["offsets"]
        lens = torch.tensor([int(off[i + 1] - off[i]) - 1 for i in group], dtype=torch.float)
        i = group[int(torch.multinomial(lens, 1, generator=self.g))]
        n = int(off[i + 1] - off[i]) - 1            # pairs in sequence i
        s = int(torch.randint(0, max(1, n - self.W + 1), (1,), generator=self.g))
        return int(off[i]) + s, min(self.W, n)

    def batch(self, B: int):
        ids, feats = self.ds["ids"], self.ds["feats"]
        D = feats.shape[1]
        f_in = torch.zeros(B, self.W, D)
        f_out = torch.zeros(B, self.W, D)
        tok = torch.zeros(B, self.W, dtype=torch.long)
        valid = torch.zeros(B, self.W, dtype=torch.bool)
        for b in range(B):
            chat = self.groups[0] and (not self.groups[1] or
                                       torch.rand((), generator=self.g) < self.chat_fraction)
            start, n = self._pick(self.groups[0] if chat else self.groups[1])
            f_in[b, :n] = feats[start:start + n].float()
            f_out[b, :n] = feats[start + 1:start + n + 1].float()
            tok[b, :n] = ids[start + 1:start + n + 1].long()
            valid[b, :n] = True
        return f_in, tok, f_out, valid


def head_loss(head, target, w_vocab, f_in, tok, f_out, valid, reg_weight=1.0, unroll=1):
    """-> (loss, {reg, ce, top1}) averaged over valid positions and unrolled passes."""
    emb = target.embed(tok)
    p_t = (f_out[valid] @ w_vocab.T).softmax(-1)              # target distribution [n, Vd]
    best = p_t.argmax(-1)
    n = p_t.shape[0]
    total, parts, feats = 0.0, {"reg": 0.0, "ce": 0.0, "top1": 0.0}, f_in
    for _ in range(unroll):
        pred = head(feats, emb, valid=valid)
        reg = F.smooth_l1_loss(pred[valid], f_out[valid])
        logits = pred[valid] @ w_vocab.T                         # [n, Vd]
        ce = F.cross_entropy(logits, p_t)                        # soft targets: -sum p log q
        top1 = (logits.argmax(-1) == best).float().sum() / n
        total = total + reg_weight * reg + ce
        for k, v in (("reg", reg), ("ce", ce), ("top1", top1)):
            parts[k] += float(v.detach()) / unroll
        # Next pass: position i reads the head's own prediction of f(i) (made at i - 1).
        feats = torch.cat([f_in[:, :1], pred[:, :-1]], dim=1)
    return total / unroll, parts


# ---- phase 3: evaluate ---------------------------------------------------------------------
@torch.no_grad()
def heldout_alpha(target, head, vocab_ids, ds: dict, k: int, max_seqs: int = 24) -> dict:
    """Greedy speculative decoding replayed on held-out greedy answers (see module doc)."""
    draft = HeadDraft(target, head.eval(), vocab_ids)
    greedy = SamplingParams.greedy()
    acc, drf, steps, emitted = [0] * k, [0] * k, 0, 0
    off = ds["offsets"]
    chats = [i for i in range(len(ds["kind"])) if int(ds["split"][i]) == 1
             and int(ds["kind"][i]) == 2][:max_seqs]
    for s in chats:
        ids = ds["ids"][off[s]:off[s + 1]].tolist()
        feats = ds["feats"][off[s]:off[s + 1]].to(target.dtype)
        i = int(ds["answer_start"][s])           # context = ids[:i + 1]: first answer token in
        if i + 1 >= len(ids):
            continue
        draft.start(ids[:i + 1], len(ids) + k + 1, feats[:i])
        while i + 1 < len(ids):
            toks, _ = draft.propose(ids[:i + 1], k, greedy, None)
            truth = ids[i + 1:i + 1 + k]
            n = 0
            for j, (d, t) in enumerate(zip(toks, truth)):
                drf[j] += 1
                if d != t:
                    break
                acc[j] += 1
                n += 1
            step = min(n + 1, len(ids) - 1 - i)
            draft.commit(ids[:i + 1 + step], step, feats[i:i + step])
            i += step
            steps += 1
            emitted += step
    return {"alpha_per_position": [a / d if d else None for a, d in zip(acc, drf)],
            "alpha_cond": sum(acc) / max(1, sum(drf)), "accepted_per_position": acc,
            "drafted_per_position": drf, "tokens_per_step": emitted / max(1, steps),
            "sequences": len(chats), "k": k}


# ---- the command ---------------------------------------------------------------------------
def train_head(model, tokenizer, cfg: TrainConfig, out=DEFAULT_HEAD, cache_dir=CACHE_DIR,
               log=print, progress: bool = True) -> dict:
    """Build (or load) the data, train, evaluate, save ``out``; -> the training record."""
    from tqdm.auto import tqdm
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.window < 2 or cfg.unroll < 1:
        raise ValueError(f"need steps >= 1, batch_size >= 1, window >= 2, unroll >= 1, got "
                         f"{cfg.steps}, {cfg.batch_size}, {cfg.window}, {cfg.unroll}")
    if model.dtype != torch.float32:
        raise ValueError(f"train the head against an fp32 target on the CPU, got {model.dtype}")
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    ds = build_dataset(model, tokenizer, cfg, cache_dir, log)
    t_data = time.perf_counter() - t_start
    vocab_ids = choose_vocab(ds, cfg.draft_vocab, tokenizer.stop_token_ids)
    w_vocab = model.lm_head_weight[vocab_ids].detach().float()
    head = init_head(DraftHead(head_config(model.config, cfg.intermediate_size)), model, cfg.seed)
    params = [p for p in head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    train_w = Windows(ds, 0, cfg.window, cfg.chat_fraction, cfg.seed)
    held_w = Windows(ds, 1, cfg.window, cfg.chat_fraction, cfg.seed + 1)
    held_batch = held_w.batch(16)
    rec = {"step": [], "loss": [], "reg": [], "ce": [], "top1": [], "eval": []}

    def evaluate(step):
        head.eval()
        with torch.no_grad():
            _, parts = head_loss(head, model, w_vocab, *held_batch, cfg.reg_weight, 1)
        # the full held-out set at the end; half of it for the curve (it costs minutes)
        a = heldout_alpha(model, head, vocab_ids, ds, cfg.eval_k,
                          cfg.heldout_prompts if step == cfg.steps else cfg.heldout_prompts // 2)
        head.train()
        rec["eval"].append({"step": step, "heldout_reg": parts["reg"], "heldout_ce":
                            parts["ce"], "heldout_top1": parts["top1"], **a})
        return a

    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="train head", unit="step", disable=not progress)
    head.train()
    for step in bar:
        loss, parts = head_loss(head, model, w_vocab, *train_w.batch(cfg.batch_size),
                                cfg.reg_weight, cfg.unroll)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        rec["step"].append(step + 1)
        rec["loss"].append(float(loss.detach()))
        for k in ("reg", "ce", "top1"):
            rec[k].append(parts[k])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            a = evaluate(step + 1)
            bar.set_postfix(loss=f"{rec['loss'][-1]:.3f}",
                            alpha1=f"{a['alpha_per_position'][0]:.2f}")
    bar.close()
    t_train = time.perf_counter() - t0
    for p in params:
        p.requires_grad_(False)
    held_ids = torch.cat([ds["ids"][ds["offsets"][i] + int(ds["answer_start"][i]):
                                    ds["offsets"][i + 1]]
                          for i in range(len(ds["kind"]))
                          if int(ds["split"][i]) == 1 and int(ds["kind"][i]) == 2]).long()
    covered = torch.isin(held_ids, vocab_ids).float().mean().item() if held_ids.numel() else None
    record = {
        "config": asdict(cfg), "curve": rec, "final": rec["eval"][-1],
        "vocab": {"size": int(vocab_ids.numel()), "heldout_answer_coverage": covered},
        "data": ds["info"],
        "time_s": {"data": t_data, "train": t_train, "total": time.perf_counter() - t_start},
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "head_parameters": sum(p.numel() for p in params),
    }
    path = save_head(out, head, vocab_ids, model.config, record)
    log(f"[train-head] {cfg.steps} steps in {t_train:.0f} s (data {t_data:.0f} s, total "
        f"{record['time_s']['total']:.0f} s); held-out alpha per position "
        f"{[round(a, 3) if a is not None else None for a in record['final']['alpha_per_position']]}"
        f"; saved {path}")
    return record
