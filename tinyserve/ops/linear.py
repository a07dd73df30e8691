"""y = x @ W^T (+ b), W stored [out_features, in_features] as in PyTorch and HF checkpoints."""
import torch
import torch.nn.functional as F

from ._dispatch import check_backend


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    # x: [..., K], weight: [N, K]. Reads N*K weight elements once per call: for decode
    # (1-16 rows of x) that weight traffic is the whole cost, which is why decode is memory-bound.
    return F.linear(x, weight, bias)


def linear(x, weight, bias=None, backend="auto"):
    check_backend(backend)
    return linear_ref(x, weight, bias)
