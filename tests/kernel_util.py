"""What the kernel tests share: running an op with its gradients, and judging 16-bit results against fp64.

Why 16-bit results are judged against an fp64 truth rather than against the reference run in the same dtype:
eager PyTorch rounds every intermediate (each product, each activation, each gradient term) to 16 bits, while
a fused kernel keeps them in fp32 registers and rounds once. The two then differ by the SUM of both errors,
and a tolerance on that difference would have to be loose enough to hide real kernel errors. Against the fp64
truth (the reference run in fp64 on the same 16-bit inputs) each one's own error is visible: a kernel must be
no worse than eager PyTorch in its own dtype, which is the bar a user of the model cares about.
"""
import torch

HALF_ULP = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # relative rounding error of one rounding
# A kernel's max error over a tensor may exceed eager's by chance (where the single largest rounding lands);
# 1.5x covers what the draws in tests/test_kernel_mlp.py showed (max 1.30 over 45 draws, mean 0.5-0.8).
ERR_RATIO = 1.5


def run_with_grads(fn, inputs, grad_out, *args, grad_inputs=None):
    """fn(*leaves, *args) on fresh leaf copies of the tensors in `inputs` (None stays None), then backward of
    grad_out (a tensor, or a tuple for several outputs) -> (outputs as a tuple, [(index, grad)] per input that
    requires grad: those indexed by grad_inputs, or by default every floating-point one)."""
    if grad_inputs is None:
        grad_inputs = [i for i, t in enumerate(inputs) if t is not None and t.is_floating_point()]
    leaves = [None if t is None else _copy_keeping_strides(t).requires_grad_(i in grad_inputs)
              for i, t in enumerate(inputs)]
    out = fn(*leaves, *args)
    outs = out if isinstance(out, tuple) else (out,)
    grads = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    torch.autograd.backward(outs, grads)
    return outs, [(i, leaves[i].grad) for i in grad_inputs]


def _copy_keeping_strides(t):
    """A copy with t's exact strides (clone() makes a sliced, non-dense tensor contiguous, and the strided
    tests would then test nothing)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t.detach())


def max_err(x, truth):
    return (x.double() - truth.double()).abs().max().item()


def assert_no_worse_than_eager(actual, eager, truth, what, ratio=ERR_RATIO):
    """max |actual - truth| <= ratio * max |eager - truth| (eager: the reference run in actual's dtype)."""
    assert actual.dtype == eager.dtype and actual.shape == truth.shape, \
        f"{what}: {actual.dtype} {tuple(actual.shape)}, expected {eager.dtype} {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err, eager_err = max_err(actual, truth), max_err(eager, truth)
    assert err <= ratio * eager_err, \
        f"{what}: max error {err:.3g} vs the fp64 truth, eager {actual.dtype} reference's {eager_err:.3g}"


def as_fp64(tensors):
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]
