"""``python -m tinyserve.speculative train-head [options]``: train the draft head on the CPU.

    python -m tinyserve.speculative train-head                      # the committed SmolLM2 head
    python -m tinyserve.speculative train-head --steps 20 --out /tmp/head.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..args import nonnegative_int, positive_int
from ..threads import set_threads


HELP = {
    "steps": "optimizer steps", "batch_size": "windows per step",
    "window": "positions per training window", "lr": "peak learning rate (AdamW, cosine)",
    "draft_vocab": "size of the draft vocabulary (most frequent training tokens)",
    "intermediate_size": "the head's MLP width", "reg_weight": "weight of the hidden-state loss",
    "unroll": "passes per step (2: also train on the head's own predictions)",
    "chat_fraction": "share of each batch from the chat data",
    "chat_prompts": "training chat prompts the target answers",
    "heldout_prompts": "held-out chat prompts (alpha evaluation)",
    "answer_tokens": "max tokens per target answer", "gen_batch": "answers generated at once",
    "seq_len": "docs/code chunk length", "docs_tokens": "docs tokens with features",
    "code_tokens": "code tokens with features", "eval_every": "steps between evaluations",
    "eval_k": "draft positions evaluated",
}


def build_parser() -> argparse.ArgumentParser:
    from .head import DEFAULT_HEAD
    from .features import CACHE_DIR, TrainConfig
    p = argparse.ArgumentParser(prog="python -m tinyserve.speculative")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-head", help="train the EAGLE-style draft head on the CPU",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--model", default="smollm2", help="named model or .gguf file")
    t.add_argument("--out", default=str(DEFAULT_HEAD), help="where to write the head")
    t.add_argument("--cache-dir", default=str(CACHE_DIR), help="where the features are cached")
    t.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: OMP_NUM_THREADS, else the usable cores)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        kind = float if f.type in ("float", float) else (
            nonnegative_int if f.name == "seed" else positive_int)
        t.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                       help=f"{HELP.get(f.name, f.name)} (default: {f.default})")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ..loader import load_model
    from .features import TrainConfig
    from .train import train_head
    set_threads(args.threads)     # None: the cores this process may use (tinyserve.threads)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
    try:
        train_head(model, tok, cfg, args.out, args.cache_dir, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
