"""``load_model``: a name, a .gguf path or an HF directory -> (Transformer, Tokenizer)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import InvalidParameter
from .model import Transformer, WeightsError
from .ops.cpu_int4 import int4pack_available
from .ops.cpu_int8 import int8pack_available
from .quant.cpu_native import build_native_model
from .ops.rope import rope_inv_freq
from .tokenizer import Tokenizer
from .weights import registry
from .weights.gguf import load_gguf
from .weights.safetensors import CheckpointError, load_hf_dir

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):   # torch's message lists every device type it knows
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InvalidParameter(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                               f"got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameter("device 'cuda' requested but torch sees no CUDA device")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> bf16 on CUDA (tensor cores, half the bytes), fp32 on CPU (bf16 matmul is slow
    on most CPUs, and fp32 is what the reference comparisons use)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def resolve_source(name_or_path: str | os.PathLike) -> Path:
    """A registry name (fetched on first use), a .gguf file, or an HF directory."""
    p = Path(name_or_path)
    if p.exists():
        return p
    if isinstance(name_or_path, str) and _is_registered(name_or_path):
        return registry.model_path(name_or_path)
    looks_like_path = isinstance(name_or_path, os.PathLike) or os.sep in str(name_or_path) \
        or str(name_or_path).endswith(".gguf")
    if looks_like_path:
        raise FileNotFoundError(f"model file or directory not found: {name_or_path}")
    raise ValueError(f"unknown model {name_or_path!r}: not a file or directory, and not one of "
                     f"the named models {registry.known_names()}")


def _is_registered(name: str) -> bool:
    try:
        registry.resolve(name)
        return True
    except ValueError:
        return False


def native_reason(src: Path, dev: torch.device, dtype) -> str | None:
    """None if the native CPU path (quant/cpu_native.py) can run this model, else why not."""
    if dev.type != "cpu":
        return f"it runs on the CPU only, not {dev.type}"
    if dtype is not None:
        return f"dtype={dtype!r} asks for dequantized weights"
    if not (src.is_file() and src.suffix == ".gguf"):
        return "it reads GGUF files only"
    if not (int4pack_available() and int8pack_available()):
        return f"torch {torch.__version__} lacks working int4/int8 CPU kernels"
    return None


def load_model(name_or_path="smollm2", device="auto", dtype=None, backend="auto",
               native: bool = False, check_finite: bool = False):
    """-> (model, tokenizer). The model is in eval mode on ``device`` in ``dtype``.

    ``native=True`` (what ``LLM`` asks for by default): a GGUF file on the CPU with no
    ``dtype`` runs from its quantized blocks through PyTorch's int4/int8 CPU kernels with
    bf16 activations (``tinyserve.quant.cpu_native``), several times faster and smaller than
    the fp32 reference; where that path cannot run (``native_reason``), the reference loads.
    The default here stays the fp32 reference, which the notebooks and tests inspect.

    ``check_finite=True`` reads every weight once more and raises ``WeightsError`` naming the
    tensors that hold NaN or inf (a damaged file otherwise loads and fails only at sampling).
    It costs one pass over the weights: for SmolLM2 on the development CPU (one thread) about
    0.2 s on the fp32 reference and 0.7 s on the native path, which decodes the file's blocks."""
    dev = resolve_device(device)
    src = resolve_source(name_or_path)
    if native and native_reason(src, dev, dtype) is None:
        return _load_native(src, backend, check_finite)
    dt = resolve_dtype(dtype, dev)
    packed = {}
    if src.is_dir():
        config, state = load_hf_dir(src, dt)
        tokenizer = Tokenizer.from_dir(src)
    elif src.is_file():
        if src.suffix in (".safetensors", ".bin", ".pt", ".pth") or src.name == "config.json":
            raise CheckpointError(f"{src} is one file of an HF checkpoint: pass the directory "
                                  f"that holds config.json and the *.safetensors files")
        config, state, packed, gfile = load_gguf(src, dt)
        tokenizer = Tokenizer.from_gguf(gfile.metadata)
    else:
        raise ValueError(f"{src} is neither a file nor a directory")
    source = str(src)
    model = Transformer(config, backend=backend)
    factors = config.extra.get("rope_freq_factors")
    if factors is not None:  # GGUF Llama-3: rope scaling stored as per-frequency divisors
        model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, freq_factors=factors)
    inv_freq = model.inv_freq
    model.to(dtype=dt)
    model.inv_freq = inv_freq.float()  # RoPE frequencies stay fp32 (bf16 would blur them)
    if check_finite:
        check_finite_weights(state, source)
    model.load_weights(state, source)
    model.packed_weights = packed
    model.source = source
    return model.to(dev).eval(), tokenizer


def check_finite_weights(tensors: dict, source: str) -> None:
    """WeightsError naming every tensor with NaN or inf; file blocks are decoded one tensor at
    a time (their fp32 copy is freed before the next)."""
    bad = [name for name, t in tensors.items()
           if not torch.isfinite(t if isinstance(t, torch.Tensor) else t.dequantize()).all()]
    if bad:
        raise WeightsError(f"{source}: NaN or inf in {len(bad)} tensor(s) {bad[:8]}"
                           f"{' ...' if len(bad) > 8 else ''}: the file is damaged")


def _load_native(src: Path, backend: str, check_finite: bool = False):
    config, state, packed, gfile = load_gguf(src, torch.float32, dequantize=False)
    if check_finite:
        check_finite_weights({**state, **packed}, str(src))
    model = build_native_model(config, state, packed, backend, release=gfile.release_pages)
    model.packed_weights = packed
    model.source = str(src)
    tokenizer = Tokenizer.from_gguf(gfile.metadata)
    gfile.release_pages()   # packed now; only long prefills read the file's blocks again
    return model, tokenizer
