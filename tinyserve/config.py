"""ModelConfig: the handful of numbers that define a LLaMA-family decoder.

Read from GGUF metadata (``llama.*`` keys) or from an HF ``config.json`` (LLaMA, Mistral, Qwen2).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, asdict, field
from pathlib import Path

from .errors import TinyserveError

# HF model_type / GGUF general.architecture values that share the LLaMA block structure.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class ConfigError(TinyserveError, ValueError):
    """A config.json or GGUF header that does not describe a model we can run."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v projections
    # Llama-3.x "llama3" RoPE frequency scaling (factor, low/high_freq_factor, original_max_pos)
    rope_scaling: dict | None = None
    architecture: str = "llama"
    name: str = ""
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps >= 0:
            raise ConfigError(f"rms_norm_eps must be >= 0, got {self.rms_norm_eps!r}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")
            if kind == "llama3":
                for k in ("factor", "low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings"):
                    # every one divides something (wavelengths, the factor): > 0, finite
                    if k in self.rope_scaling or k == "factor":
                        v = _as_float(self.rope_scaling.get(k), f"rope_scaling.{k}")
                        if not 0 < v < math.inf:
                            raise ConfigError(f"rope_scaling.{k} must be a positive number, "
                                              f"got {v!r}")
                lo = self.rope_scaling.get("low_freq_factor", 1.0)
                hi = self.rope_scaling.get("high_freq_factor", 4.0)
                if not hi > lo:
                    raise ConfigError(f"rope_scaling: high_freq_factor ({hi}) must exceed "
                                      f"low_freq_factor ({lo})")

    @property
    def gqa_group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        qkv = d * self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            qkv += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = qkv + self.num_heads * self.head_dim * d + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + emb + d

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical parameter name -> shape: exactly what ``Transformer`` expects, computed
        without building it (loaders check a file against this before allocating anything)."""
        d, f, V, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        shapes = {"embed.weight": (V, d), "norm.weight": (d,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, d)
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes.update({
                p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,),
                p + "attn.wq.weight": (q, d), p + "attn.wk.weight": (kv, d),
                p + "attn.wv.weight": (kv, d), p + "attn.wo.weight": (d, q),
                p + "mlp.w_gate.weight": (f, d), p + "mlp.w_up.weight": (f, d),
                p + "mlp.w_down.weight": (d, f),
            })
            if self.attention_bias:
                shapes.update({p + "attn.wq.bias": (q,), p + "attn.wk.bias": (kv,),
                               p + "attn.wv.bias": (kv,)})
        return shapes

    def kv_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """K and V for one token across all layers: the number notebook 02 is about."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_elem

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
        arch = cfg.get("model_type", "llama")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"model_type {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        # Settings that change the arithmetic of the block: refuse rather than compute wrongly.
        qc = cfg.get("quantization_config")
        if qc:
            method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
            raise ConfigError(f"quantized HF checkpoints are not supported "
                              f"(quantization_config.quant_method={method!r}): use a float one")
        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act {act!r} is not supported (the MLP is SwiGLU: silu)")
        if arch != "qwen2" and cfg.get("attention_bias"):
            raise ConfigError(f"attention_bias=true on a {arch} model puts biases on q/k/v "
                              f"and o_proj; tinyserve supports q/k/v biases only (Qwen2)")
        if cfg.get("mlp_bias"):
            raise ConfigError("mlp_bias=true is not supported (the MLP has no biases)")
        rope = cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope!r}")
        rotary = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if rotary not in (None, 1, 1.0):
            raise ConfigError(f"partial_rotary_factor={rotary!r} is not supported (full RoPE only)")
        rope_scaling = cfg.get("rope_scaling") or rope
        if not isinstance(rope_scaling, dict):
            raise ConfigError(f"rope_scaling must be an object or null, got {rope_scaling!r}")

        def req(key):
            if key not in cfg:
                raise ConfigError(f"config.json lacks required key {key!r}")
            return _as_int(cfg[key], key)

        heads, hidden = req("num_attention_heads"), req("hidden_size")
        if heads <= 0:
            raise ConfigError(f"num_attention_heads must be positive, got {heads}")
        if hidden % heads and not cfg.get("head_dim"):
            raise ConfigError(f"hidden_size ({hidden}) is not a multiple of "
                              f"num_attention_heads ({heads}) and no head_dim is given")
        theta = cfg.get("rope_theta")
        if theta is None:
            theta = rope.get("rope_theta", 10000.0)
        return cls(
            vocab_size=req("vocab_size"),
            hidden_size=hidden,
            intermediate_size=req("intermediate_size"),
            num_layers=req("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_as_int(cfg.get("num_key_value_heads") or heads, "num_key_value_heads"),
            head_dim=_as_int(cfg.get("head_dim") or hidden // heads, "head_dim"),
            rope_theta=_as_float(theta, "rope_theta"),
            rms_norm_eps=_as_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
            max_position_embeddings=_as_int(_or_default(cfg.get("max_position_embeddings"),
                                                         2048), "max_position_embeddings"),
            tie_word_embeddings=_as_bool(cfg.get("tie_word_embeddings", False),
                                         "tie_word_embeddings"),
            # Qwen2 always has q/k/v biases (its config has no switch for them).
            attention_bias=arch == "qwen2",
            rope_scaling=_rope_scaling(rope_scaling),
            architecture=arch,
            name=str(cfg.get("_name_or_path") or ""),
        )

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        try:
            return cls.from_hf_dict(cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_gguf_fields(cls, meta: dict) -> "ModelConfig":
        """``meta`` maps GGUF metadata keys to Python values."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def get(key, default=None, conv=None):
            v = meta.get(f"{arch}.{key}", default)
            if v is None:
                raise ConfigError(f"GGUF metadata lacks {arch}.{key}")
            return (conv or _as_int)(v, f"{arch}.{key}")

        hidden, heads = get("embedding_length"), get("attention.head_count")
        if heads <= 0:
            raise ConfigError(f"{arch}.attention.head_count must be positive, got {heads}")
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:  # older files: count the tokenizer's tokens
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if isinstance(tokens, list) and tokens else None
        if vocab is None:
            raise ConfigError(f"GGUF metadata gives no vocab size ({arch}.vocab_size or "
                              f"tokenizer.ggml.tokens)")
        if hidden % heads and f"{arch}.attention.key_length" not in meta:
            raise ConfigError(f"{arch}.embedding_length ({hidden}) is not a multiple of "
                              f"{arch}.attention.head_count ({heads})")
        head_dim = get("attention.key_length", hidden // heads)
        v_dim = get("attention.value_length", head_dim)
        if v_dim != head_dim:
            raise ConfigError(f"{arch}.attention.value_length ({v_dim}) differs from "
                              f"key_length ({head_dim}): not supported")
        rope_dims = get("rope.dimension_count", head_dim)
        if rope_dims != head_dim:
            raise ConfigError(f"{arch}.rope.dimension_count ({rope_dims}) differs from the head "
                              f"dimension ({head_dim}): partial RoPE is not supported")
        scaling = meta.get(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise ConfigError(f"{arch}.rope.scaling.type {scaling!r} is not supported "
                              f"(Llama-3 scaling comes as a rope_freqs.weight tensor)")
        return cls(
            vocab_size=_as_int(vocab, f"{arch}.vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv", heads),
            head_dim=head_dim,
            rope_theta=get("rope.freq_base", 10000.0, _as_float),
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, _as_float),
            max_position_embeddings=get("context_length", 2048),
            tie_word_embeddings=False,  # decided by the loader: is output.weight present?
            attention_bias=arch == "qwen2",
            architecture=arch,
            name=str(meta.get("general.name", "")),
        )


def _as_int(v, key: str) -> int:
    """A config value that must be a whole number (ints, or floats like 32.0 from JSON)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v != int(v):
        raise ConfigError(f"{key} must be an integer, got {v!r}")
    return int(v)


def _or_default(v, default):
    """JSON null means "not given"; 0 is a value (and gets checked), not a missing key."""
    return default if v is None else v


def _as_bool(v, key: str) -> bool:
    """A JSON boolean only: bool("false") is True, so a string must not slip through."""
    if not isinstance(v, bool):
        raise ConfigError(f"{key} must be true or false, got {v!r}")
    return v


def _as_float(v, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{key} must be a number, got {v!r}")
    return float(v)


def _rope_scaling(rs: dict | None) -> dict | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    return dict(rs)
