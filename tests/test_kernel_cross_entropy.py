"""Triton cross-entropy (kernels/cross_entropy.py) against cross_entropy_reference: the loss and dL/dlogits.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with 32-wide vocab
blocks: vocabularies below one block, of exactly one, and of several with a masked tail; ignored rows
(ignore_index -100 and a custom one that is also a valid class id), every row ignored, the three reductions,
grad_output other than 1 (training divides the summed loss by the token count), strided logits, logits large
enough to overflow a naive exp, and -inf logits (a masked vocabulary, a whole first block of them).
GPU tests (bf16, the LLaVA vocabulary) at the end need CUDA and compiled kernels: TRITON_INTERPRET=0 pytest ...
"""
import os

import pytest
import torch

from minillava.kernels.cross_entropy import CrossEntropyFunction, cross_entropy, cross_entropy_reference
from tests.kernel_util import HALF_ULP, run_with_grads

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                              reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")

SHAPES = [(1, 5), (7, 32), (37, 100), (13, 321)]  # (N, V): V below, at and above the 32-wide CPU block
# The loss is fp32 in both paths (the reference upcasts the logits): only the summation order differs, over up
# to 37 rows of ~log(V) each.
LOSS_TOL = dict(atol=1e-6, rtol=1e-6)
GRAD32_TOL = dict(atol=1e-7, rtol=1e-6)  # softmax - onehot in fp32, values in [-1, 1]
# 16-bit gradients are the fp32 value rounded once to the logits' dtype, like eager's (which casts its fp32
# gradient back): the correctly rounded fp64 truth, |err| <= half an ulp. A grad_output other than 1 is applied
# afterwards, in place in 16 bits (no second (N, V) buffer), which rounds a second time: <= one ulp.
# atol: one fp16 subnormal step (2^-24), where tiny softmax values lose their relative precision.
GRAD16_ATOL = 2.0 ** -24


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")


def _make(N, V, dtype, ignore_index=-100, n_ignored=None, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + N + V)
    logits = (2 * torch.randn(N, V, generator=g)).to(device, dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    n_ignored = N // 3 if n_ignored is None else n_ignored
    labels[torch.randperm(N, generator=g)[:n_ignored]] = ignore_index
    return logits, labels.to(device)


def _check(logits, labels, reduction="mean", ignore_index=-100, grad_output=1.0):
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    if reduction == "none":  # per-row weights, as a caller weighting tokens would pass
        g = torch.Generator().manual_seed(1)
        dloss = grad_output * torch.rand(loss_shape, generator=g).to(logits.device)
    else:
        dloss = torch.tensor(grad_output, device=logits.device)
    args = (labels, ignore_index, reduction)
    (loss,), ((_, grad),) = run_with_grads(lambda x: cross_entropy(x, *args), (logits,), dloss)
    assert loss.grad_fn.name() == "CrossEntropyFunctionBackward"
    (ref,), ((_, ref_grad),) = run_with_grads(lambda x: cross_entropy_reference(x, *args), (logits,), dloss)
    assert loss.dtype == torch.float32 and loss.shape == loss_shape and grad.dtype == logits.dtype
    torch.testing.assert_close(loss, ref, **LOSS_TOL, equal_nan=True, msg=lambda m: f"loss: {m}")
    if logits.dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, **GRAD32_TOL, msg=lambda m: f"grad: {m}")
    else:
        _, ((_, truth),) = run_with_grads(lambda x: cross_entropy_reference(x, *args), (logits.double(),),
                                          dloss.double())
        ulps = 1 if reduction != "none" and grad_output == 1.0 else 2  # see GRAD16_ATOL
        torch.testing.assert_close(grad.double(), truth, atol=GRAD16_ATOL, rtol=ulps * HALF_ULP[logits.dtype],
                                   msg=lambda m: f"grad is not the (once) correctly rounded truth: {m}")
    return loss, grad


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N, V", SHAPES)
def test_cross_entropy_matches_reference(force_triton, N, V, reduction, dtype):
    logits, labels = _make(N, V, dtype)
    _, grad = _check(logits, labels, reduction)
    assert (grad[labels == -100] == 0).all()  # ignored rows: exactly zero gradient


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_output_scaling(force_triton, reduction, dtype):
    """Training sums the loss and divides by the global token count: grad_output = 1/n, applied in backward."""
    _check(*_make(37, 100, dtype), reduction, grad_output=1 / 37)


@interpreter_only
def test_custom_ignore_index_and_all_ignored(force_triton):
    logits, labels = _make(13, 100, torch.float32, ignore_index=0)  # 0 is also a valid class id
    labels[0] = 0
    _, grad = _check(logits, labels, "mean", ignore_index=0)
    assert (grad[labels == 0] == 0).all()
    with pytest.raises(ValueError, match=r"labels out of range \[0, 100\) at rows \[2"):
        labels[2] = -100  # not ignored when ignore_index=0, and not a class
        cross_entropy(logits, labels, ignore_index=0)
    logits, labels = _make(5, 37, torch.float32, n_ignored=5)
    loss, grad = _check(logits, labels, "mean")  # 0 / 0: NaN, as F.cross_entropy
    assert loss.isnan() and (grad == 0).all()
    loss, grad = _check(logits, labels, "sum")
    assert loss == 0 and (grad == 0).all()


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_extreme_logits(force_triton, dtype):
    """Logits of a few thousand (exp overflows fp32 without the running max) and -inf entries, including a
    whole first vocab block, which the online logsumexp must pass through without a NaN."""
    logits, labels = _make(13, 100, dtype)
    _check(logits.float().mul(1000).to(dtype), labels, "sum")
    logits[:, :40] = float("-inf")
    logits[::2, 70:] = float("-inf")
    labels = torch.where(labels < 40, 50, labels)  # labels never on a -inf logit (the loss would be inf)
    labels[::2] = torch.where(labels[::2] >= 70, 60, labels[::2])
    _check(logits, labels, "mean")


@interpreter_only
def test_strided_logits(force_triton):
    logits, labels = _make(13, 100, torch.float32)
    wide = torch.randn(13, 130)
    wide[:, 7:107] = logits
    _check(wide[:, 7:107], labels, "mean")  # row stride 130: read in place
    _check(logits.t().contiguous().t(), labels, "sum")  # vocab stride 13: the launcher copies


@interpreter_only
def test_second_backward_raises_and_no_grad_path(force_triton):
    """The gradient buffer is scaled in place by backward: a second backward must fail loudly, not scale twice."""
    logits, labels = _make(7, 100, torch.float32)
    leaf = logits.clone().requires_grad_()
    loss = cross_entropy(leaf, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy(logits, labels), cross_entropy_reference(logits, labels), **LOSS_TOL)


@interpreter_only
def test_dispatch(monkeypatch):
    """MINILLAVA_KERNELS is read at every call; what the kernel does not cover goes to the reference."""
    logits, labels = _make(7, 100, torch.float32)
    logits.requires_grad_()
    monkeypatch.setenv("MINILLAVA_KERNELS", "0")
    assert cross_entropy(logits, labels).grad_fn.name() != "CrossEntropyFunctionBackward"
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")
    assert cross_entropy(logits, labels).grad_fn.name() == "CrossEntropyFunctionBackward"
    for x, y in [(logits.bfloat16(), labels),  # no bf16 in the interpreter
                 (logits.view(7, 10, 10), labels[:, None].expand(7, 10) % 10),  # (N, C, d): F.cross_entropy's
                 (logits[:0], labels[:0])]:  # empty
        assert cross_entropy(x, y).grad_fn.name() != "CrossEntropyFunctionBackward"
    with pytest.raises(ValueError, match=r"logits \(N, V\) and labels \(N,\)"):
        CrossEntropyFunction.apply(logits, labels[:-1], -100, "mean")
    with pytest.raises(ValueError, match="reduction 'avg'"):
        CrossEntropyFunction.apply(logits, labels, -100, "avg")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N, V", [(1000, 32064), (77, 32000), (5, 4097)])
def test_gpu_cross_entropy(force_triton, N, V, dtype):
    _check(*_make(N, V, dtype, device="cuda"), "mean")
    _check(*_make(N, V, dtype, device="cuda"), "sum", grad_output=1 / N)
