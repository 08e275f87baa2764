"""Fused Triton kernels for minillava's GPU hot paths.

Every op lives in its own module with four layers (Triton kernel, launcher, autograd Function, functional
alias) plus a plain-torch ``*_reference`` with the same signature: the reference is the CPU path, the test
oracle and the documentation of the math. Attention is the one exception on the CPU path: it runs PyTorch's
fused ``scaled_dot_product_attention`` (``attention_torch``), held to the reference by the tests, because the
reference's explicit fp32 score matrix makes CPU training and decoding several times slower.

Which path runs is decided in one place, :func:`enabled`:
- ``MINILLAVA_KERNELS=0``      plain PyTorch everywhere;
- ``MINILLAVA_KERNELS=1``      (default) Triton for CUDA tensors, plain PyTorch for CPU tensors;
- ``MINILLAVA_KERNELS=force``  Triton for every tensor; on CPU this needs ``TRITON_INTERPRET=1`` (tests).
"""
import os

import torch


def enabled(x: torch.Tensor) -> bool:
    """True when the Triton path should run for tensors like ``x``."""
    mode = os.environ.get("MINILLAVA_KERNELS", "1")
    if mode == "0":
        return False
    if mode == "force":
        return True
    return x.is_cuda


from kernels.attention import attention, attention_reference, attention_torch  # noqa: E402
from kernels.mlp import swiglu, swiglu_reference, linear_quick_gelu, linear_quick_gelu_reference  # noqa: E402
from kernels.linear import linear  # noqa: E402
from kernels.rmsnorm import rms_norm, rms_norm_reference  # noqa: E402
from kernels.rope import apply_rope, apply_rope_reference  # noqa: E402
from kernels.cross_entropy import cross_entropy, cross_entropy_reference  # noqa: E402
