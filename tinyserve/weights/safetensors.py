"""HF-style checkpoint directories: config.json + *.safetensors (optionally sharded).

safetensors is a flat header + raw bytes: nothing in it can execute code, unlike pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import TinyserveError


class CheckpointError(TinyserveError, ValueError):
    """An HF checkpoint directory with missing, unreadable or inconsistent files."""


# HF name -> canonical name.
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight", "self_attn.q_proj.bias": "attn.wq.bias",
    "self_attn.k_proj.weight": "attn.wk.weight", "self_attn.k_proj.bias": "attn.wk.bias",
    "self_attn.v_proj.weight": "attn.wv.weight", "self_attn.v_proj.bias": "attn.wv.bias",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "mlp.w_gate.weight",
    "mlp.up_proj.weight": "mlp.w_up.weight",
    "mlp.down_proj.weight": "mlp.w_down.weight",
}
_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "lm_head.weight"}
# Buffers some exporters save that carry no weights.
_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)


def canonical_name(hf_name: str) -> str | None:
    if hf_name in _TOP:
        return _TOP[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        rest = _LAYER.get(parts[3])
        return f"layers.{parts[2]}.{rest}" if rest else None
    return None


def hf_name(canonical: str) -> str:
    """canonical name -> HF name (for error messages)."""
    for h, c in _TOP.items():
        if c == canonical:
            return h
    parts = canonical.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers":
        for h, c in _LAYER.items():
            if c == parts[2]:
                return f"model.layers.{parts[1]}.{h}"
    return canonical


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's files: the shards an index lists, else model.safetensors, else all."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{index}: not a valid safetensors index "
                                  f"({type(e).__name__}: {e})") from None
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
        if bad:
            raise CheckpointError(f"{index} lists shard names that are not plain .safetensors "
                                  f"file names in the directory: {bad[:4]}")
        files = [directory / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are not there: {missing}")
        if not files:
            raise CheckpointError(f"{index} lists no shards")
        return files
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    files = sorted(f for f in directory.glob("*.safetensors") if f.is_file())   # no folders
    if not files:
        pickles = sorted(p.name for p in directory.iterdir()
                         if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found only {', '.join(pickles[:4])})" if pickles else ""
        raise CheckpointError(f"{directory} has no *.safetensors files{found}: pickle "
                              f"checkpoints (pytorch_model.bin) are never loaded, since "
                              f"unpickling can run code; convert them to safetensors")
    return files


def load_hf_dir(directory, dtype: torch.dtype = torch.float32):
    """-> (ModelConfig, canonical state dict in ``dtype``).

    Every tensor's name and shape is checked against config.json before it is read, and the
    set of tensors must be complete: the errors name the file, the tensor and both shapes."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    if not directory.is_dir():
        if not directory.exists():
            raise FileNotFoundError(f"checkpoint directory not found: {directory}")
        raise CheckpointError(f"{directory} is not a directory (an HF checkpoint is a directory "
                              f"with config.json and *.safetensors)")
    config = ModelConfig.from_hf_json(directory / "config.json")
    files = safetensors_files(directory)

    def read(f, fn):
        try:
            with safe_open(str(f), framework="pt") as st:
                return fn(st)
        except CheckpointError:
            raise
        except (SafetensorError, RuntimeError, TypeError, ValueError, OSError) as e:
            raise CheckpointError(f"{f}: unreadable safetensors file "
                                  f"({type(e).__name__}: {e})") from None

    # Pass 1, headers only: which tensor is where, and what shape.
    found, origin = {}, {}  # canonical name -> (name in file, shape); -> file
    for f in files:
        for name_in_file, shape in read(f, lambda st: [
                (k, tuple(st.get_slice(k).get_shape())) for k in st.keys()]):
            name = canonical_name(name_in_file)
            if name is None:
                if name_in_file.endswith(_HARMLESS_SUFFIXES):
                    continue
                raise CheckpointError(f"{f}: unexpected tensor {name_in_file!r} (not part of "
                                      f"a {config.architecture} model)")
            if name in origin:
                raise CheckpointError(f"tensor {name_in_file!r} is stored twice: in "
                                      f"{origin[name].name} and {f.name}")
            found[name], origin[name] = (name_in_file, shape), f
    if len(found) < 9 * config.num_layers:  # each block has at least 9 tensors
        raise CheckpointError(f"{directory}: config.json says {config.num_layers} layers but "
                              f"the checkpoint holds only {len(found)} tensors")
    expected = config.weight_shapes()
    # Tied checkpoints may also store lm_head.weight; like transformers, use the embedding.
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)
    for name, (name_in_file, shape) in found.items():
        f = origin[name]
        if name not in expected:
            raise CheckpointError(
                f"{f}: unexpected tensor {name_in_file!r}: config.json describes "
                f"{config.num_layers} layers"
                f"{'' if config.attention_bias else ', no attention biases'}")
        if shape != expected[name]:
            raise CheckpointError(f"{f}: tensor {name_in_file!r} has shape {shape}, but "
                                  f"config.json implies {expected[name]}")
    missing = [hf_name(n) for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")

    # Pass 2: the data.
    state = {}
    for f in files:
        wanted = {found[n][0]: n for n in found if origin[n] == f}

        def load(st):
            for name_in_file, name in wanted.items():
                t = st.get_tensor(name_in_file)
                if not t.is_floating_point():
                    raise CheckpointError(f"{f}: tensor {name_in_file!r} has dtype {t.dtype}; "
                                          f"a float checkpoint is needed")
                state[name] = t.to(dtype)
        read(f, load)
    return config, state
