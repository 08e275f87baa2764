"""Fused Triton kernels for minillava's GPU hot paths.

Every op lives in its own module with four layers (Triton kernel, launcher, autograd Function, functional
alias) plus a plain-torch ``*_reference`` with the same signature: the reference is the CPU path, the test
oracle and the documentation of the math. Attention is the one exception on the CPU path: it runs PyTorch's
fused ``scaled_dot_product_attention`` (``attention_torch``), held to the reference by the tests, because the
reference's explicit fp32 score matrix makes CPU training and decoding several times slower.

Which path runs is decided in one place, :func:`kernels.dispatch.enabled` (its docstring lists the modes of
``MINILLAVA_KERNELS``; by default plain PyTorch until a GPU check is recorded).
"""
from kernels.dispatch import enabled
from kernels.attention import attention, attention_reference, attention_torch
from kernels.mlp import swiglu, swiglu_reference, linear_quick_gelu, linear_quick_gelu_reference
from kernels.linear import Linear, linear
from kernels.rmsnorm import rms_norm, rms_norm_reference
from kernels.rope import apply_rope, apply_rope_reference
from kernels.cross_entropy import cross_entropy, cross_entropy_reference
