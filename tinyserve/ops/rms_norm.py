"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight."""
import torch

from ._dispatch import check_backend


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [..., D] reads D elements per row, writes D; weight: [D] read once.
    # Statistics in fp32 even for bf16 inputs: the sum of squares of 576+ values overflows
    # bf16's 8-bit mantissa long before it overflows its range.
    xf = x.float()
    inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # Cast back before the weight multiply, as HF LLaMA does, so fp16/bf16 results match it.
    return weight * (xf * inv_rms).to(x.dtype)


def rms_norm(x, weight, eps, backend="auto"):
    check_backend(backend)
    return rms_norm_ref(x, weight, eps)
