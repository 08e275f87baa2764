"""Triton MLP kernels (kernels/mlp.py) against their plain-torch references: forward and every gradient.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1): tiny odd shapes,
fp32 and fp16. The GPU tests (bf16, bigger shapes) need CUDA and compiled kernels: TRITON_INTERPRET=0 pytest ...
"""
import os

import pytest
import torch

from kernels.mlp import (LinearQuickGELUFunction, SwiGLUFunction, linear_quick_gelu, linear_quick_gelu_reference,
                         swiglu, swiglu_reference)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                              reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")

C, F = 48, 80  # channels, hidden features: neither a multiple of the 32-wide tiles
LEADING = [(5,), (123,), (2, 7)]  # rows: fewer than one tile, several tiles with a ragged tail, a 3-D (B, T) input
# Tightest tolerances that pass. fp32: accumulation order only. fp16: the kernel rounds once at the end while the
# reference rounds gate, up, silu(gate) and each gradient product to fp16 separately, so they differ by a few ulp
# of outputs of magnitude ~4 (ulp 2^-8) and of weight gradients summed over up to 123 rows.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=4e-3)}
# bf16 keeps 3 fewer mantissa bits than fp16 (eps 2^-8 vs 2^-11): its tolerance is fp16's times 8.
GPU_TOL = {**TOL, torch.float32: dict(atol=1e-4, rtol=1e-4),
           torch.bfloat16: dict(atol=8e-2, rtol=3.2e-2)}


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")


def _make(lead, c, f, dtype, device, bias=True):
    g = torch.Generator().manual_seed(sum(lead) + c + f)
    x = torch.randn(*lead, c, generator=g)
    w1 = torch.randn(f, c, generator=g) / c ** 0.5  # unit-variance pre-activations
    w2 = torch.randn(f, c, generator=g) / c ** 0.5
    b = torch.randn(f, generator=g) if bias else None
    dh = torch.randn(*lead, f, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w1), cast(w2), cast(b), cast(dh)


def _compare(fn, ref, inputs, dh, tol):
    """Run fn and ref on separate leaf copies of inputs, backpropagate the same dh, compare out and all grads."""
    leaves = [[None if t is None else t.clone().requires_grad_() for t in inputs] for _ in range(2)]
    outs = []
    for f, args in ((fn, leaves[0]), (ref, leaves[1])):
        out = f(*args)
        out.backward(dh)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], **tol, msg=lambda m: f"output: {m}")
    for i, (a, b) in enumerate(zip(*leaves)):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, **tol, msg=lambda m: f"grad of input {i}: {m}")
    return outs[0]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead", LEADING)
def test_swiglu_matches_reference(force_triton, lead, dtype):
    x, wg, wu, _, dh = _make(lead, C, F, dtype, "cpu")
    out = _compare(swiglu, swiglu_reference, (x, wg, wu), dh, TOL[dtype])
    assert out.grad_fn.name() == "SwiGLUFunctionBackward" and out.shape == (*lead, F)


@interpreter_only
def test_swiglu_saves_only_input_and_weights(force_triton):
    """The point of the fused kernel: autograd keeps x and the weights, no (M, F) activation."""
    x, wg, wu, _, _ = _make((2, 7), C, F, torch.float32, "cpu")
    x.requires_grad_()
    h = swiglu(x, wg, wu)
    saved = h.grad_fn.saved_tensors
    assert [t.shape for t in saved] == [x.shape, wg.shape, wu.shape]
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), wg.data_ptr(), wu.data_ptr()]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead", LEADING)
def test_linear_quick_gelu_matches_reference(force_triton, lead, dtype):
    x, w, _, b, dh = _make(lead, C, F, dtype, "cpu")
    out = _compare(linear_quick_gelu, linear_quick_gelu_reference, (x, w, b), dh, TOL[dtype])
    assert out.grad_fn.name() == "LinearQuickGELUFunctionBackward"


@interpreter_only
def test_linear_quick_gelu_without_bias_and_without_grad(force_triton):
    x, w, _, _, dh = _make((2, 7), C, F, torch.float32, "cpu", bias=False)
    _compare(linear_quick_gelu, linear_quick_gelu_reference, (x, w, None), dh, TOL[torch.float32])
    with torch.no_grad():  # inference path: the kernel does not write the pre-activation
        x, w, _, b, _ = _make((5,), C, F, torch.float32, "cpu")
        torch.testing.assert_close(linear_quick_gelu(x, w, b), linear_quick_gelu_reference(x, w, b),
                                   **TOL[torch.float32])


@interpreter_only
def test_dispatch(monkeypatch):
    """MINILLAVA_KERNELS picks the path; unsupported inputs fall back to the reference on purpose."""
    x, wg, wu, _, _ = _make((5,), C, F, torch.float32, "cpu")
    x.requires_grad_()
    monkeypatch.setenv("MINILLAVA_KERNELS", "1")  # CPU tensors: reference
    assert swiglu(x, wg, wu).grad_fn.name() == "MulBackward0"
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")
    assert swiglu(x, wg, wu).grad_fn.name() == "SwiGLUFunctionBackward"
    with pytest.raises(RuntimeError):  # mixed dtypes go to F.linear, which raises its own error
        swiglu(x, wg.double(), wu.double())
    assert swiglu(x.double(), wg.double(), wu.double()).grad_fn.name() == "MulBackward0"  # fp64: reference
    with pytest.raises(ValueError, match="w_gate"):  # the launcher names the bad operand
        SwiGLUFunction.apply(x, wg, wu[:-1])
    with pytest.raises(ValueError, match="weight"):
        LinearQuickGELUFunction.apply(x, wg[:, :-1], None)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead,c,f", [((3, 333), 256, 688), ((577,), 1024, 4096)])
def test_gpu_mlp_matches_reference(force_triton, lead, c, f, dtype):
    x, w1, w2, b, dh = _make(lead, c, f, dtype, "cuda")
    tol = GPU_TOL[dtype]
    # Weight gradients sum over M rows: scale atol with sqrt(M) (independent rounding errors add in quadrature).
    m = torch.Size(lead).numel()
    tol = dict(atol=tol["atol"] * (m / 123) ** 0.5, rtol=tol["rtol"])
    _compare(swiglu, swiglu_reference, (x, w1, w2), dh, tol)
    _compare(linear_quick_gelu, linear_quick_gelu_reference, (x, w1, b), dh, tol)
