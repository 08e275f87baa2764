"""Triton MLP kernels (kernels/mlp.py) against their plain-torch references: forward and every gradient.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1): tiny odd shapes,
fp32 and fp16. The GPU tests (bf16, bigger shapes) need CUDA and compiled kernels: TRITON_INTERPRET=0 pytest ...
"""
import os

import pytest
import torch

from minillava.kernels.mlp import (LinearQuickGELUFunction, SwiGLUFunction, linear_quick_gelu,
                                   linear_quick_gelu_reference, swiglu, swiglu_reference)
from tests.kernel_util import HALF_ULP, as_fp64, assert_no_worse_than_eager, run_with_grads

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                              reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")

C, F = 48, 80  # channels, hidden features: neither a multiple of the 32-wide tiles
LEADING = [(5,), (123,), (2, 7)]  # rows: fewer than one tile, several tiles with a ragged tail, a 3-D (B, T) input
# fp32: kernel and reference both accumulate in fp32 and differ only in summation order; tightest that pass.
FP32_TOL = {"cpu": dict(atol=2e-5, rtol=1e-5), "cuda": dict(atol=1e-4, rtol=1e-4)}
# fp16/bf16 are judged against the fp64 truth, not against eager PyTorch in the same dtype (tests/kernel_util.py):
# eager rounds gate, up, silu(gate) and every gradient product to 16 bits separately, the kernel rounds once in
# its fp32 epilogue, so the two differed by the sum of both errors (0.016 on dW summed over 123 rows: the old
# failure, which was eager's rounding, not the kernel's; against fp64 the kernel's error is 0.5-0.8x eager's).
# - outputs: the fused epilogue rounds an fp32 value once, so they must be the correctly rounded truth,
#   |h - truth| <= half an ulp = HALF_ULP |truth|, + atol for the fp32 accumulation before that rounding;
# - gradients: dx, dW are 16-bit GEMMs of d_gate / d_up rounded to 16 bits, as eager PyTorch's backward
#   computes them, so the kernel's max error must be no worse than eager's (assert_no_worse_than_eager).
# atol of the output check: the fp32 accumulation error (K = 48 on CPU; the GPU value, for K = 1024 on tensor
# cores, is an estimate, K * 2^-24 * ~|x w|, not yet measured: no GPU in the session that wrote it).
OUT_ATOL = {"cpu": 1e-5, "cuda": 1e-4}


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


def _compare(fn, ref, inputs, dh):
    """fn's output and every gradient against ref's (fp32) or against the fp64 truth (fp16/bf16, see above)."""
    dtype, device = dh.dtype, dh.device.type
    (out,), grads = run_with_grads(fn, inputs, dh)
    (eager_out,), eager_grads = run_with_grads(ref, inputs, dh)
    if dtype == torch.float32:
        torch.testing.assert_close(out, eager_out, **FP32_TOL[device], msg=lambda m: f"output: {m}")
        for (i, g), (_, r) in zip(grads, eager_grads):
            torch.testing.assert_close(g, r, **FP32_TOL[device], msg=lambda m: f"grad of input {i}: {m}")
        return out
    (truth_out,), truth_grads = run_with_grads(ref, as_fp64(inputs), dh.double())
    torch.testing.assert_close(out.double(), truth_out, atol=OUT_ATOL[device], rtol=HALF_ULP[dtype],
                               msg=lambda m: f"output is not the correctly rounded truth: {m}")
    for (i, g), (_, e), (_, t) in zip(grads, eager_grads, truth_grads):
        assert_no_worse_than_eager(g, e, t, f"grad of input {i}")
    return out


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead", LEADING)
def test_swiglu_matches_reference(force_triton, lead, dtype):
    x, wg, wu, _, dh = _make(lead, C, F, dtype, "cpu")
    out = _compare(swiglu, swiglu_reference, (x, wg, wu), dh)
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
    out = _compare(linear_quick_gelu, linear_quick_gelu_reference, (x, w, b), dh)
    assert out.grad_fn.name() == "LinearQuickGELUFunctionBackward"


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_inputs(force_triton, dtype):
    """x as a slice of a wider buffer (row stride 64 > C: the kernels read it in place through its strides) and
    as a transposed view (channel stride != 1); weights as transposed views of (C, F) buffers."""
    x, wg, wu, b, dh = _make((2, 7), C, F, dtype, "cpu")
    wide = torch.zeros(2, 7, 64, dtype=dtype)
    wide[..., 5:5 + C] = x
    x_cols = x.transpose(0, 2).contiguous().transpose(0, 2)  # (2, 7, C) with channel stride 14
    wg_t, wu_t = (w.t().contiguous().t() for w in (wg, wu))  # (F, C) with strides (1, F)
    for xx in (wide[..., 5:5 + C], x_cols):
        _compare(swiglu, swiglu_reference, (xx, wg_t, wu_t), dh)
        _compare(linear_quick_gelu, linear_quick_gelu_reference, (xx, wg_t, b), dh)


@interpreter_only
def test_linear_quick_gelu_without_bias_and_without_grad(force_triton):
    x, w, _, _, dh = _make((2, 7), C, F, torch.float32, "cpu", bias=False)
    _compare(linear_quick_gelu, linear_quick_gelu_reference, (x, w, None), dh)
    with torch.no_grad():  # inference path: the kernel does not write the pre-activation
        x, w, _, b, _ = _make((5,), C, F, torch.float32, "cpu")
        torch.testing.assert_close(linear_quick_gelu(x, w, b), linear_quick_gelu_reference(x, w, b),
                                   **FP32_TOL["cpu"])


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
    _compare(swiglu, swiglu_reference, (x, w1, w2), dh)
    _compare(linear_quick_gelu, linear_quick_gelu_reference, (x, w1, b), dh)
