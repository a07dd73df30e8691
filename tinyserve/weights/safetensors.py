"""HF-style checkpoint directories: config.json + *.safetensors (optionally sharded).

safetensors is a flat header + raw bytes: nothing in it can execute code, unlike pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig


class CheckpointError(ValueError):
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


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that are not there: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors files (pickle .bin "
                              f"checkpoints are not loaded: convert them to safetensors)")
    return files


def load_hf_dir(directory, dtype: torch.dtype = torch.float32):
    """-> (ModelConfig, canonical state dict in ``dtype``)."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    config = ModelConfig.from_hf_json(directory / "config.json")
    state = {}
    for f in safetensors_files(directory):
        try:
            with safe_open(str(f), framework="pt") as st:
                for hf_name in st.keys():
                    name = canonical_name(hf_name)
                    if name is None:
                        if hf_name.endswith(_HARMLESS_SUFFIXES):
                            continue
                        raise CheckpointError(f"{f.name}: unexpected tensor {hf_name!r}")
                    state[name] = st.get_tensor(hf_name).to(dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    # Some tied checkpoints also store lm_head.weight; it must then equal the embedding.
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return config, state
