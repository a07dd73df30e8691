"""Train the draft head on the CPU: ``python -m tinyserve.speculative train-head``.

Three phases, each with a progress bar:

1. **data** (cached, ``features.py``): the target's greedy answers to the training chat
   prompts and its final hidden states over every training sequence; the draft vocabulary.
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
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

from ..sampling import SamplingParams
from .features import CACHE_DIR, TrainConfig, build_dataset, choose_vocab
from .head import DEFAULT_HEAD, DraftHead, HeadDraft, head_config, init_head, save_head


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
