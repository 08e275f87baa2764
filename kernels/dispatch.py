"""Which path runs, Triton kernels or plain PyTorch: decided here and only here, by `enabled`.

kernels/ (imported as `minillava.kernels`) holds the fused Triton kernels of minillava's GPU hot paths. Every op
lives in its own module with four layers (Triton kernel, launcher, autograd Function, functional alias) plus a
plain-torch ``*_reference`` with the same signature: the reference is the CPU path, the test oracle and the
documentation of the math. Attention is the one exception on the CPU path: it runs PyTorch's fused
``scaled_dot_product_attention`` (``attention_torch``), held to the reference by the tests, because the reference's
explicit fp32 score matrix makes CPU training and decoding several times slower. The folder has no __init__.py on
purpose: from the repository's root a folder `kernels` with one would be the `kernels` that every `import kernels`
finds first, and transformers imports Hugging Face's package of that name (setup.py says how the folders map).

    MINILLAVA_KERNELS=0      plain PyTorch everywhere
    MINILLAVA_KERNELS=auto   (the default) plain PyTorch everywhere until a GPU check has passed and is recorded
                             in benchmarks/RESULTS.md (GPU_VALIDATED below); from then on, Triton for CUDA tensors
    MINILLAVA_KERNELS=1      Triton for CUDA tensors, plain PyTorch for CPU tensors
    MINILLAVA_KERNELS=force  Triton for every tensor; on CPU this needs TRITON_INTERPRET=1 (the kernel tests)

The `triton` package is optional: torch's CUDA wheels bring it, a CPU install need not (1 GB it would only use
in the interpreter tests). Without it the kernel modules still import, because their plain-torch references are
the CPU path: `triton` and `tl` are then stand-ins that let the decorators and annotations evaluate (a decorator
returns its function unchanged), and `enabled` is False.
"""
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

    class _Missing:
        """Stands in for `triton` and `triton.language`: every attribute is itself, and calling it on a lone
        function (`@triton.jit`, `autotune(...)(fn)`) returns the function."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return args[0] if len(args) == 1 and not kwargs and callable(args[0]) else self

    triton = tl = _Missing()

# Every kernel launch passes these compile options. FP fusion (a * b + c as one FMA, one rounding) is Triton's
# default up to 3.9, which warns that the default flips in 3.10; said here, the kernels compute the same in both.
COMPILE = {"enable_fp_fusion": True}

@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (how many programs fill it), asked of the driver once per device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


# Flipped to True in the change that records a passing benchmarks/gpu_check.sh run in benchmarks/RESULTS.md.
GPU_VALIDATED = False
MODES = ("0", "auto", "1", "force")


def enabled(x: torch.Tensor) -> bool:
    """True when the Triton path should run for tensors like `x`."""
    mode = os.environ.get("MINILLAVA_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"MINILLAVA_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "force" and not HAVE_TRITON:
        raise RuntimeError("MINILLAVA_KERNELS=force needs the triton package (pip install triton)")
    if mode == "0" or not HAVE_TRITON:
        return False
    if mode == "force":
        return True
    return x.is_cuda and (mode == "1" or GPU_VALIDATED)
