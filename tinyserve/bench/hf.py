"""HF transformers, the peer the suites measure against, holding the same weights as ours.

    load_hf(path, dtype, device)   its own reading of a .gguf file or an HF directory (generate,
                                   serving on SmolLM2)
    build_hf(model)                a LlamaForCausalLM whose parameters ARE our random-weight
                                   model's tensors (decode, serving on the real shapes)
"""
from __future__ import annotations


def load_hf(path, dtype, device):
    """HF transformers' own reading of the same weights (a .gguf file or an HF directory)."""
    from pathlib import Path

    import transformers
    from packaging.version import Version
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    p = Path(path)
    kw = {"gguf_file": p.name} if p.is_file() else {}
    where = str(p.parent if p.is_file() else p)
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kw[dtype_kw] = dtype
    model = transformers.AutoModelForCausalLM.from_pretrained(where, **kw)
    return model.to(device).eval()


_HF_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "lm_head.weight": "lm_head.weight"}
_HF_LAYER = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
             "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
             "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj", "mlp.w_down": "mlp.down_proj"}


def hf_name(name: str) -> str:
    """Our parameter name -> HF LlamaForCausalLM's ("layers.3.attn.wk.weight" ->
    "model.layers.3.self_attn.k_proj.weight")."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    _, i, rest = name.split(".", 2)           # "layers", "3", "attn.wk.weight"
    module, _, param = rest.rpartition(".")
    return f"model.layers.{i}.{_HF_LAYER[module]}.{param}"


def hf_config(c):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_hf(model):
    """LlamaForCausalLM on the meta device whose parameters ARE ``model``'s tensors."""
    import torch
    from transformers import LlamaForCausalLM
    cfg = hf_config(model.config)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    ours = dict(model.named_parameters())
    if model.config.tie_word_embeddings:
        ours["lm_head.weight"] = ours["embed.weight"]
    mapped = {hf_name(n): p for n, p in ours.items()}
    names = [n for n, _ in hf.named_parameters(remove_duplicate=False)]
    if set(names) != set(mapped):
        raise RuntimeError(f"weight names differ: HF-only {sorted(set(names) - set(mapped))[:4]}, "
                           f"ours-only {sorted(set(mapped) - set(names))[:4]}")
    for n in names:
        mod_name, _, attr = n.rpartition(".")
        hf.get_submodule(mod_name)._parameters[attr] = mapped[n]
    # Buffers computed at init (the RoPE frequencies) are meta too: rebuild those modules.
    for mod_name, mod in list(hf.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            parent, _, attr = mod_name.rpartition(".")
            setattr(hf.get_submodule(parent), attr, type(mod)(config=cfg).to(model.device))
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"HF model still has meta tensors: {left[:4]}")
    return hf.eval()
