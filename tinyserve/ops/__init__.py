"""Ops the model is written against. One op per file: ``<op>_ref`` defines correct.

Each op dispatches on ``backend``: ``"ref"`` (eager PyTorch), ``"triton"`` (the kernel, checked
against the reference in ``tests/ops``) or ``"auto"`` (Triton on CUDA tensors, else ref).
"""
from .rms_norm import rms_norm, rms_norm_ref
from .rope import rope_cos_sin, apply_rope, apply_rope_ref
from .swiglu import swiglu, swiglu_ref
from .linear import linear, linear_ref
from .attention import attention
from .attention_common import attention_ref
from .decode_attention import decode_attention, decode_attention_ref
from .prefill_attention import prefill_attention, prefill_attention_ref
from .paged_attention import (paged_attention, paged_decode_attention_ref,
                              paged_prefill_attention_ref, paged_write, paged_write_ref)
from ._dispatch import BACKENDS, check_backend, interpreter_on, resolve

__all__ = ["rms_norm", "rms_norm_ref", "rope_cos_sin", "apply_rope", "apply_rope_ref",
           "swiglu", "swiglu_ref", "linear", "linear_ref", "attention", "attention_ref",
           "decode_attention", "decode_attention_ref", "prefill_attention", "prefill_attention_ref",
           "paged_attention", "paged_decode_attention_ref", "paged_prefill_attention_ref",
           "paged_write", "paged_write_ref",
           "BACKENDS", "check_backend", "interpreter_on", "resolve"]
