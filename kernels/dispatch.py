"""Which path runs, Triton kernels or plain PyTorch: decided here and only here, by `use_triton`.

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

Each op's functional alias asks `use_triton(op, x, unsupported)` once per call, where `unsupported` is the op's own
verdict on its inputs (None: the kernel covers them; else why not, e.g. a head size it has no kernel for). The
answer and its reason are counted per op, so a run can say what ran: `startup_line(device)` before it (what the
mode, the device and GPU_VALIDATED decide) and `report()` after it (what each op took, and why, shapes included).

The `triton` package is optional: torch's CUDA wheels bring it, a CPU install need not (1 GB it would only use
in the interpreter tests). Without it the kernel modules still import, because their plain-torch references are
the CPU path: `triton` and `tl` are then stand-ins that let the decorators and annotations evaluate (a decorator
returns its function unchanged), and `use_triton` is False.
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
OPS = ("attention", "attention_decode", "swiglu", "linear_quick_gelu", "rms_norm", "rope", "cross_entropy",
       "quant_linear")
RUNS = {}  # op -> {"Triton" or why torch: [calls, the first such call's input "dtype (shape)"]}, from use_triton


def why_not_triton(on_cuda: bool) -> str | None:
    """None when the mode, the triton package and the device let the Triton path run (for tensors on CUDA or
    not); else why not, in words."""
    mode = os.environ.get("MINILLAVA_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"MINILLAVA_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "force" and not HAVE_TRITON:
        raise RuntimeError("MINILLAVA_KERNELS=force needs the triton package (pip install triton)")
    if mode == "0":
        return "MINILLAVA_KERNELS=0"
    if not HAVE_TRITON:
        return "no triton package"
    if mode == "force":
        return None
    if not on_cuda:
        return "not on a GPU"
    if mode == "auto" and not GPU_VALIDATED:
        return "no GPU check recorded yet: GPU_VALIDATED is False, MINILLAVA_KERNELS=1 runs them"
    return None


def enabled(x: torch.Tensor) -> bool:
    """True when the Triton path may run for tensors like `x`, the inputs' own limits aside: the tests' shorthand
    for why_not_triton (the ops ask use_triton)."""
    return why_not_triton(x.is_cuda) is None


def use_triton(op: str, x: torch.Tensor, unsupported: str | None = None) -> bool:
    """The one decision each op's alias asks for: True runs `op`'s Triton kernel, False its torch path.
    unsupported: the op's reason why its kernel does not cover these inputs (None: it does)."""
    why = why_not_triton(x.is_cuda) or unsupported
    if not torch.compiler.is_compiling():  # a compiled step decides once, when traced: nothing to count there
        runs = RUNS.setdefault(op, {})
        if (why or "Triton") in runs:
            runs[why or "Triton"][0] += 1
        else:
            runs[why or "Triton"] = [1, f"{x.dtype} {tuple(x.shape)}"]
    return why is None


def startup_line(device) -> str:
    """What the mode and the device decide for every op, before anything runs: one line for a script's start."""
    mode = os.environ.get("MINILLAVA_KERNELS", "auto")
    why = why_not_triton(torch.device(device).type == "cuda")
    if why is not None:
        setting = "" if why.startswith("MINILLAVA_KERNELS") else f"; MINILLAVA_KERNELS={mode}"
        return f"kernels: torch for every op ({why}{setting})"
    return (f"kernels: Triton for {', '.join(OPS)} (MINILLAVA_KERNELS={mode}), torch for inputs a kernel does not "
            "cover (the report at the end names them)")


def report() -> str:
    """What each op ran so far and why, e.g. 'rms_norm: torch (not on a GPU) x 90, first torch.float32 (1, 7, 64)';
    '' before any op ran. Calls inside torch.compile'd code (generate.py --compile's decode step) are not counted."""
    lines = [f"  {op}: " + "; ".join(f"{'Triton' if why == 'Triton' else f'torch ({why})'} x {n}, first {first}"
                                     for why, (n, first) in runs.items()) for op, runs in RUNS.items()]
    return "\n".join(["kernels ran (eager calls; compiled code is not counted):", *lines]) if lines else ""
