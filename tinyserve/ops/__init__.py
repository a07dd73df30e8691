"""Ops the model is written against. One op per file: ``<op>_ref`` defines correct.

Each op dispatches on ``backend``: ``"ref"`` (eager PyTorch) or ``"auto"``. The Triton kernels
that replace the references are added op by op and checked against them in ``tests/ops``.
"""
from .rms_norm import rms_norm, rms_norm_ref
from .rope import rope_cos_sin, apply_rope, apply_rope_ref
from .swiglu import swiglu, swiglu_ref
from .linear import linear, linear_ref
from .attention import attention, attention_ref
from ._dispatch import BACKENDS, check_backend, resolve

__all__ = ["rms_norm", "rms_norm_ref", "rope_cos_sin", "apply_rope", "apply_rope_ref",
           "swiglu", "swiglu_ref", "linear", "linear_ref", "attention", "attention_ref",
           "BACKENDS", "check_backend", "resolve"]
