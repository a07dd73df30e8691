"""Back-of-the-envelope performance model: bytes, FLOPs and the ceilings they imply.

Decode is memory-bound: each step reads every weight matrix once (of an untied input embedding,
only the looked-up rows) and the KV cache of every row, to produce one token per row. So an
upper bound on decode speed is

    tokens/s  <=  batch * bandwidth / (weight bytes + KV bytes read per step)

These functions compute such numbers for named model shapes; the notebooks plot them and the
benchmarks compare measured speed against them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


def _llama(name, vocab, hidden, inter, layers, heads, kv_heads, ctx, tied=False, theta=10000.0,
           rope_scaling=None):
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=hidden // heads, rope_theta=theta, max_position_embeddings=ctx,
                       tie_word_embeddings=tied, rope_scaling=rope_scaling, name=name)


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Published shapes (from each model's config.json); weights are not needed to reason about speed.
SHAPES = {
    "SmolLM2-135M": _llama("SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, 8192, tied=True,
                           theta=100000.0),
    "Llama-3.2-1B": _llama("Llama-3.2-1B", 128256, 2048, 8192, 16, 32, 8, 131072, tied=True,
                           theta=500000.0, rope_scaling=_LLAMA3_SCALING),
    "Llama-2-7B": _llama("Llama-2-7B", 32000, 4096, 11008, 32, 32, 32, 4096),
    "Llama-3-8B": _llama("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, 8192, theta=500000.0),
    "Llama-2-13B": _llama("Llama-2-13B", 32000, 5120, 13824, 40, 40, 40, 4096),
    "Llama-2-70B": _llama("Llama-2-70B", 32000, 8192, 28672, 80, 64, 8, 4096),
}


# Bytes per stored element of the formats the notebooks compare (int4 packs two per byte; the
# per-group scales that real int4/int8 formats add are counted by quant.formats, not here).
BYTES_PER_ELEMENT = {"fp32": 4, "bf16 / fp16": 2, "fp8 / int8": 1, "int4": 0.5}


def shape(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {sorted(SHAPES)}")
    return SHAPES[name]


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float      # bytes/s
    flops: float          # dense fp16/bf16 FLOP/s
    source: str

    @property
    def ridge(self) -> float:
        """FLOPs per byte at which compute and memory time are equal (the roofline's knee)."""
        return self.flops / self.bandwidth


HARDWARE = {
    # Public datasheet peaks (dense, i.e. without 2:4 sparsity): predictions. Measured ceilings
    # come from benchmarks/gpu_check.sh on a lent GPU (copy bandwidth and a bf16 matmul, in each
    # result's "roofline"; the H200 runs: 4.29-4.30 TB/s copy, 0.72-0.75 PFLOP/s bf16), and the
    # notebooks report speed against those measured figures, not these.
    # A100 and H100 are the article's table (claim C3), which matches the datasheets.
    "A100-80GB (datasheet)": Hardware("A100-80GB (datasheet)", 2.0e12, 312e12,
                                      "NVIDIA A100 datasheet (article C3)"),
    "H100-80GB (datasheet)": Hardware("H100-80GB (datasheet)", 3.35e12, 990e12,
                                      "NVIDIA H100 SXM datasheet (article C3)"),
    # 4.8 TB/s HBM3e; 1,979 bf16 TFLOP/s "with sparsity", i.e. 989 dense.
    "H200-141GB (datasheet)": Hardware("H200-141GB (datasheet)", 4.8e12, 989e12,
                                       "NVIDIA H200 SXM datasheet"),
}


def _lookup_params(c: ModelConfig) -> int:
    """Parameters of an untied input embedding: a table a step indexes, not a matrix it multiplies.
    A tied embedding is also the LM head, which every step multiplies in full, so it counts as 0."""
    return 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size


def weight_bytes(c: ModelConfig, bytes_per_param: float = 2) -> float:
    """Bytes the weights occupy in memory (every parameter). Not what a step reads: see
    ``step_weight_bytes``."""
    return c.num_parameters() * bytes_per_param


def step_weight_bytes(c: ModelConfig, bytes_per_param: float = 2, rows: int = 1) -> float:
    """Weight bytes one forward pass over ``rows`` tokens must read: every matrix it multiplies
    once (the LM head included), but of an untied input embedding only the ``rows`` looked-up rows.

    ``rows`` is the batch for a decode step (one new token per sequence) or the prompt length for
    a prefill. Repeated token ids are counted as distinct rows, so this is a bound from above.
    For Llama-2-7B the embedding's 32,000 x 4,096 table is 1.9% of the parameters; for
    Llama-3-8B (128,256 rows) 6.5%. Tied models (SmolLM2, Llama-3.2-1B) read all of it anyway.
    """
    lookup = _lookup_params(c)
    rows_read = min(rows, c.vocab_size) if lookup else 0
    return (c.num_parameters() - lookup + rows_read * c.hidden_size) * bytes_per_param


def kv_cache_bytes(c: ModelConfig, batch: int, context: int, bytes_per_elem: float = 2) -> float:
    """K and V for ``batch`` sequences of ``context`` tokens: 2 * L * Hkv * D * bytes each."""
    return batch * context * c.kv_bytes_per_token(1) * bytes_per_elem


def decode_step_bytes(c: ModelConfig, batch: int, context: int, bytes_per_param: float = 2,
                      kv_bytes_per_elem: float = 2) -> float:
    """Minimum DRAM traffic of one decode step: the weights it multiplies once, one embedding row
    per sequence (untied models), and every row's KV cache."""
    return (step_weight_bytes(c, bytes_per_param, batch)
            + kv_cache_bytes(c, batch, context, kv_bytes_per_elem))


def decode_step_flops(c: ModelConfig, batch: int, context: int) -> float:
    """2 FLOPs per multiplied weight per token (an embedding lookup does no arithmetic), plus
    attention's QK^T and PV over the context."""
    attn = 2 * 2 * c.num_layers * c.num_heads * c.head_dim * context
    return batch * (2 * (c.num_parameters() - _lookup_params(c)) + attn)


def decode_ceiling_tok_s(c: ModelConfig, bandwidth: float, batch: int = 1, context: int = 512,
                         bytes_per_param: float = 2, kv_bytes_per_elem: float = 2) -> float:
    """Tokens/s (all rows together) if a step took exactly its bytes over ``bandwidth``."""
    step = decode_step_bytes(c, batch, context, bytes_per_param, kv_bytes_per_elem)
    return batch * bandwidth / step


def cost_per_million_tokens(tok_s: float, price_per_hour: float) -> tuple[float, float]:
    """(machine-hours, money) to generate one million tokens at ``tok_s`` tokens/s on a machine
    rented at ``price_per_hour`` (the article's cost metric, claim C1: hours per 1M tokens)."""
    if tok_s <= 0:
        raise ValueError(f"throughput must be positive, got {tok_s}")
    hours = 1e6 / tok_s / 3600
    return hours, hours * price_per_hour


def linear_intensity(m: int, n: int, k: int, bytes_per_elem: float = 2) -> float:
    """FLOPs per byte of y[m, n] = x[m, k] @ W[n, k]^T: 2mnk over (nk + mk + mn) elements.

    For m = 1 (one decode row) this is about 1 FLOP/byte in bf16, far below any GPU's ridge
    point: the multiply waits on memory. It grows ~linearly with m until m nears the ridge.
    """
    return 2 * m * n * k / ((n * k + m * k + m * n) * bytes_per_elem)
