"""ModelConfig: the handful of numbers that define a LLaMA-family decoder.

Read from GGUF metadata (``llama.*`` keys) or from an HF ``config.json`` (LLaMA, Mistral, Qwen2).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, asdict, field
from pathlib import Path

# HF model_type / GGUF general.architecture values that share the LLaMA block structure.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class ConfigError(ValueError):
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
                  "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")

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
        arch = cfg.get("model_type", "llama")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"model_type {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope = cfg.get("rope_parameters") or {}
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                rope_scaling=_rope_scaling(cfg.get("rope_scaling") or rope),
                architecture=arch,
                name=cfg.get("_name_or_path", ""),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required key {e.args[0]!r}") from None

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(cfg)

    @classmethod
    def from_gguf_fields(cls, meta: dict) -> "ModelConfig":
        """``meta`` maps GGUF metadata keys to Python values."""
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def get(key, default=None):
            v = meta.get(f"{arch}.{key}", default)
            if v is None:
                raise ConfigError(f"GGUF metadata lacks {arch}.{key}")
            return v

        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:  # older files: count the tokenizer's tokens
            vocab = len(meta.get("tokenizer.ggml.tokens") or []) or None
        if vocab is None:
            raise ConfigError("GGUF metadata gives no vocab size")
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings=False,  # decided by the loader: is output.weight present?
            attention_bias=arch == "qwen2",
            architecture=arch,
            name=str(meta.get("general.name", "")),
        )


def _rope_scaling(rs: dict | None) -> dict | None:
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    return dict(rs)
