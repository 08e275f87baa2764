"""RMSNorm: y = w * (x / sqrt(mean(x^2) + eps)), computed in fp32 and cast back before the weight
(exactly as LLaMA's reference does, so that bf16 models round the same way)."""
import torch

import kernels


def rms_norm_reference(x, weight, eps: float):
    """x (..., C), weight (C,) -> (..., C) in x's dtype (times weight's)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x, weight, eps: float):
    return rms_norm_reference(x, weight, eps)
