"""Offline text for calibration and evaluation: docstrings of Python standard-library modules.

GPTQ needs a few thousand tokens of "typical" input to estimate each layer's input statistics,
and perplexity needs held-out text the model was not calibrated on. Both must be available
without a download. Every Python installation ships its standard library with docstrings, so:

    calibration text   the docstrings of CALIB_MODULES
    held-out text      the docstrings of HELDOUT_MODULES (different modules; any docstring that
                       also occurs in the calibration text is dropped, so the two are disjoint)

One module's text is its module docstring, then for every public class and function *defined in
that module* (sorted by name; ``__module__`` must match, so re-exports are skipped) a pydoc-like
header ``name(signature)`` and its own docstring (``__doc__``, never an inherited one), then the
same for each public method of a class, sorted. Memory addresses that a default value's repr may
contain (``<object object at 0x7f...>``) are removed. The text is therefore a function of the
Python version (and, for a few C-implemented modules, the platform) only: ``text_info()``
records the version, the modules, the character and token counts and a sha256 of the text.

    from tinyserve.quant.calib import calibration_ids, heldout_ids
    calib = calibration_ids(tokenizer, n_samples=32, seq_len=256)   # LongTensor [32, 256]
    held = heldout_ids(tokenizer, max_tokens=8192)                   # LongTensor [<= 8192]
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import platform
import re

import torch

# Fixed, sorted lists of pure-Python (or always-built) modules present on every CPython >= 3.10
# on Linux and macOS. Calibration: general-purpose "core" modules; held-out: other modules.
CALIB_MODULES = (
    "argparse", "collections", "contextlib", "dataclasses", "functools", "heapq", "itertools",
    "json", "logging", "pathlib", "pickle", "random", "re", "string", "textwrap", "threading",
    "typing",
)
HELDOUT_MODULES = (
    "calendar", "csv", "difflib", "fractions", "ftplib", "gettext", "shutil", "statistics",
    "tarfile", "zipfile",
)

DEFAULT_CALIB_SAMPLES = 32
DEFAULT_CALIB_SEQ_LEN = 256
DEFAULT_HELDOUT_TOKENS = 8192

_ADDR = re.compile(r" at 0x[0-9a-fA-F]+")


def _doc(obj) -> str | None:
    d = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(d, str) or not d.strip():
        return None
    return inspect.cleandoc(d)


def _signature(obj) -> str:
    try:
        return _ADDR.sub("", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return ""


def _public_members(ns: dict):
    return [(k, ns[k]) for k in sorted(ns) if not k.startswith("_")]


def module_docs(name: str) -> list[str]:
    """The docstring entries of module ``name``, in a fixed order (see the module docstring)."""
    mod = importlib.import_module(name)
    out = []
    d = _doc(mod)
    if d:
        out.append(f"Module {name}\n\n{d}")
    for attr, obj in _public_members(vars(mod)):
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != name:
            continue
        d = _doc(obj)
        if d:
            kind = "class " if inspect.isclass(obj) else "def "
            out.append(f"{kind}{attr}{_signature(obj)}\n{d}")
        if inspect.isclass(obj):
            for mname, m in _public_members(vars(obj)):
                f = m.__func__ if isinstance(m, (staticmethod, classmethod)) else m
                if not (inspect.isfunction(f) or inspect.ismethoddescriptor(f)):
                    continue
                d = _doc(f)
                if d:
                    out.append(f"def {attr}.{mname}{_signature(f)}\n{d}")
    return out


@functools.lru_cache(maxsize=None)
def _texts() -> tuple[str, str]:
    calib = [e for m in CALIB_MODULES for e in module_docs(m)]
    seen = set(calib)
    # Drop held-out entries whose docstring (the part after the header line) also occurs in the
    # calibration text: shared boilerplate ("Return repr(self).") must not leak across.
    calib_bodies = {e.split("\n", 1)[-1] for e in calib}
    held = [e for m in HELDOUT_MODULES for e in module_docs(m)
            if e not in seen and e.split("\n", 1)[-1] not in calib_bodies]
    return "\n\n".join(calib), "\n\n".join(held)


def calibration_text() -> str:
    return _texts()[0]


def heldout_text() -> str:
    return _texts()[1]


@functools.lru_cache(maxsize=8)
def _encode(tokenizer, which: str) -> tuple[int, ...]:
    text = calibration_text() if which == "calib" else heldout_text()
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def calibration_ids(tokenizer, n_samples: int = DEFAULT_CALIB_SAMPLES,
                    seq_len: int = DEFAULT_CALIB_SEQ_LEN) -> torch.Tensor:
    """[n_samples, seq_len] token ids: windows spread evenly over the calibration text
    (non-overlapping when it holds at least n_samples * seq_len tokens; deterministic)."""
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    ids = torch.tensor(_encode(tokenizer, "calib"), dtype=torch.long)
    L = ids.numel()
    if L < seq_len:
        raise ValueError(f"the calibration text has {L} tokens, fewer than seq_len={seq_len}")
    last = L - seq_len
    starts = [round(i * last / (n_samples - 1)) if n_samples > 1 else 0 for i in range(n_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def heldout_ids(tokenizer, max_tokens: int | None = DEFAULT_HELDOUT_TOKENS) -> torch.Tensor:
    """The held-out text's token ids (1-D), the first ``max_tokens`` of them."""
    ids = torch.tensor(_encode(tokenizer, "heldout"), dtype=torch.long)
    return ids if max_tokens is None else ids[:max_tokens]


def text_info(tokenizer=None, n_samples: int = DEFAULT_CALIB_SAMPLES,
              seq_len: int = DEFAULT_CALIB_SEQ_LEN,
              heldout_tokens: int | None = DEFAULT_HELDOUT_TOKENS) -> dict:
    """What the texts were made of, for a result file."""
    calib, held = _texts()
    info = {
        "source": "docstrings of Python standard-library modules (tinyserve.quant.calib)",
        "python": platform.python_version(),
        "calibration": {"modules": list(CALIB_MODULES), "chars": len(calib),
                        "sha256": hashlib.sha256(calib.encode()).hexdigest()},
        "heldout": {"modules": list(HELDOUT_MODULES), "chars": len(held),
                    "sha256": hashlib.sha256(held.encode()).hexdigest()},
    }
    if tokenizer is not None:
        info["calibration"].update(tokens_total=len(_encode(tokenizer, "calib")),
                                   samples=n_samples, seq_len=seq_len,
                                   tokens_used=n_samples * seq_len)
        n = len(_encode(tokenizer, "heldout"))
        info["heldout"].update(tokens_total=n,
                               tokens_used=n if heldout_tokens is None else min(n, heldout_tokens))
    return info
