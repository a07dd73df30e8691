"""``tinyserve info``: a model's config, parameter count, weight bytes per dtype, on-disk size
(bits per weight of each quantized type) and KV-cache bytes per token."""
from __future__ import annotations

from pathlib import Path

from .exits import EXIT_OK
from .loading import llm_from_args


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def _source_size(source: str) -> int | None:
    p = Path(source)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return None


def _vocab_size(tok) -> int | None:
    v = getattr(tok, "vocab_size", None)
    if isinstance(v, int):
        return v
    try:
        return len(tok)
    except TypeError:
        return None


def model_info(llm) -> dict:
    """The numbers ``info`` prints, as a dict (also handy in notebooks)."""
    model, cfg = llm.model, llm.model.config
    loaded = sum(p.numel() for p in model.parameters())
    packed = getattr(model, "packed_weights", {}) or {}
    by_qtype: dict[str, dict] = {}
    for pt in packed.values():
        q = by_qtype.setdefault(pt.qtype, {"tensors": 0, "params": 0, "bytes": 0})
        q["tensors"] += 1
        numel = 1
        for s in pt.shape:
            numel *= int(s)
        q["params"] += numel
        q["bytes"] += pt.nbytes
    return {
        "config": cfg.to_dict(),
        "num_parameters_config": cfg.num_parameters(),
        "num_parameters_loaded": loaded,
        "weight_bytes": {"fp32": loaded * 4, "bf16": loaded * 2, "fp16": loaded * 2},
        "loaded_dtype": str(model.dtype).replace("torch.", ""),
        "source": getattr(model, "source", None),
        "source_bytes": _source_size(getattr(model, "source", "") or ""),
        "quantized": by_qtype,
        "kv_bytes_per_token": {"fp32": cfg.kv_bytes_per_token(4),
                               "bf16": cfg.kv_bytes_per_token(2)},
        "tokenizer_vocab_size": _vocab_size(llm.tokenizer),
    }


def cmd_info(args) -> int:
    llm = llm_from_args(args)
    info = model_info(llm)
    cfg = info["config"]
    w = max(len(k) for k in cfg)
    print(f"model: {args.model}")
    print(f"source: {info['source']}")
    print("config:")
    for k, v in cfg.items():
        print(f"  {k:<{w}}  {v}")
    n_cfg, n = info["num_parameters_config"], info["num_parameters_loaded"]
    print("parameters:")
    print(f"  from config      {n_cfg:,}")
    print(f"  loaded tensors   {n:,}" + ("" if n == n_cfg else "  (differs from the config!)"))
    print("weight bytes:")
    for dt, b in info["weight_bytes"].items():
        print(f"  {dt:<5} {b:>15,}  ({_fmt_bytes(b)})")
    size = info["source_bytes"]
    if size is not None:
        print(f"on disk: {size:,} bytes ({_fmt_bytes(size)}, "
              f"{8 * size / max(n, 1):.2f} bits/parameter)")
    q_total = 0
    for qt, q in sorted(info["quantized"].items()):
        q_total += q["bytes"]
        print(f"  {qt:<5} {q['tensors']:>4} tensors {q['params']:>13,} params "
              f"{q['bytes']:>13,} bytes ({8 * q['bytes'] / q['params']:.2f} bits/weight)")
    if info["quantized"] and size is not None:
        print(f"  other (unquantized tensors, metadata, tokenizer) {size - q_total:,} bytes")
    ctx = cfg["max_position_embeddings"]
    print("KV cache per token:")
    for dt, b in info["kv_bytes_per_token"].items():
        print(f"  {dt:<5} {b:>10,} bytes  (full context of {ctx:,} tokens: "
              f"{_fmt_bytes(b * ctx)})")
    print(f"tokenizer vocab size: {info['tokenizer_vocab_size']:,}"
          if info["tokenizer_vocab_size"] is not None else "tokenizer vocab size: unknown")
    return EXIT_OK
