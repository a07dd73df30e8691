"""Backend selection shared by every op.

    "ref"     eager PyTorch: the definition of correct, runs anywhere
    "triton"  the Triton kernel: needs CUDA tensors, or TRITON_INTERPRET=1 (CPU interpreter,
              slow, used by the tests)
    "native"  PyTorch's own fused CPU kernels where an op has one (attention: SDPA), the
              reference elsewhere; CPU tensors only. What the native CPU model runs
              (quant/cpu_native.py): fewer, larger ops per step than the reference.
    "auto"    Triton on CUDA tensors, the reference elsewhere
"""
import os

import torch

BACKENDS = ("ref", "triton", "native", "auto")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def import_triton():
    """``import triton`` where its kernels can run (a CUDA device, or the interpreter), else
    ImportError. Each op module imports triton through this inside ``try: ... except
    ImportError``, so on a CPU-only machine without the interpreter nothing imports it: the
    kernels could never run there, and importing triton costs ~80 MB of resident memory."""
    if not (interpreter_on() or torch.cuda.is_available()):
        raise ImportError("no CUDA device and TRITON_INTERPRET is not 1: Triton kernels cannot run")
    import triton
    return triton


def resolve(backend: str, x: torch.Tensor) -> str:
    """The implementation that will run for an input living where ``x`` lives."""
    check_backend(backend)
    if backend == "ref":
        return "ref"
    if backend == "triton":
        if not (x.is_cuda or interpreter_on()):
            raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
                               "before triton is imported (the CPU interpreter)")
        return "triton"
    if backend == "native":
        if x.is_cuda:
            raise RuntimeError("backend='native' runs PyTorch's CPU kernels: it needs CPU tensors")
        return "native"
    return "triton" if x.is_cuda else "ref"
