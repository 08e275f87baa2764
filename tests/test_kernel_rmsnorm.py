"""Triton RMSNorm (kernels/rmsnorm.py) against rms_norm_reference: the output, dx and dw.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1): odd widths (one
masked block per row), row counts below, at and above the backward's 4 programs, fp32 and fp16, and the mixed
fp16 input / fp32 weight of a model kept in fp32 with 16-bit activations. GPU tests (bf16, LLaMA-7B widths) at
the end need CUDA and compiled kernels: TRITON_INTERPRET=0 pytest ...
"""
import os

import pytest
import torch

from minillava.kernels.rmsnorm import RMSNormFunction, rms_norm, rms_norm_reference
from tests.kernel_util import as_fp64, assert_no_worse_than_eager, run_with_grads

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                              reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")

EPS = 1e-6
# (leading dims, C): 1 row (fewer rows than backward programs), 5 rows over 4 programs (uneven slices, one
# program with no row), a 3-D input, 123 rows; C odd or not a power of two, so every row has a masked tail.
CASES = [((1,), 16), ((5,), 37), ((3, 7), 100), ((123,), 257), ((2, 3), 1000)]
FP16_ULP = 2.0 ** -10  # one ulp relative to the value
# (x dtype, weight dtype) -> tolerances of out, dx, dw; "eager" = judged against the fp64 truth, no worse than
# eager PyTorch (tests/kernel_util.py). All tightest that pass, and why:
TOL = {
    # fp32: same math, the kernel's 1/sqrt vs torch.rsqrt and the summation order: a few fp32 ulp; dw sums
    # up to 123 rows in a different order, hence its atol (4e-6 measured on a value of ~0.3).
    (torch.float32, torch.float32): dict(out=dict(atol=1e-6, rtol=1e-6), dx=dict(atol=1e-6, rtol=1e-6),
                                         dw=dict(atol=1e-5, rtol=1e-6)),
    # fp16: out and dx round the same fp32 values as eager (the cast of xhat before the weight, the cast of
    # dy * w): at most one ulp apart, where the last fp32 bit of rstd moves a rounding. dw: the kernel sums exact
    # fp32 products, eager sums fp16-rounded products (a few ulp of a sum over 123 rows): judged against fp64.
    (torch.float16, torch.float16): dict(out=dict(atol=1e-7, rtol=FP16_ULP), dx=dict(atol=1e-7, rtol=FP16_ULP),
                                         dw="eager"),
    # fp16 input, fp32 weight: out and dw are fp32 computations on the same rounded xhat; dx is fp16.
    (torch.float16, torch.float32): dict(out=dict(atol=1e-6, rtol=1e-6), dx=dict(atol=1e-7, rtol=FP16_ULP),
                                         dw=dict(atol=1e-5, rtol=1e-6)),
}
DTYPE_IDS = ["fp32", "fp16", "fp16-x-fp32-w"]


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")


def _make(lead, C, x_dtype, w_dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + C)
    x = 3 * torch.randn(*lead, C, generator=g)  # rms ~3: rstd is not ~1, so a dropped rstd shows
    w = 1 + 0.5 * torch.randn(C, generator=g)
    dy = torch.randn(*lead, C, generator=g)
    out_dtype = torch.promote_types(x_dtype, w_dtype)
    return x.to(device, x_dtype), w.to(device, w_dtype), dy.to(device, out_dtype)


def _check(x, w, dy, eps=EPS):
    """Kernel vs reference: output, dx, dw, with the tolerances of TOL for these dtypes."""
    tol = TOL[(x.dtype, w.dtype)]
    (out,), grads = run_with_grads(rms_norm, (x, w), dy, eps)
    assert out.grad_fn.name() == "RMSNormFunctionBackward"
    (ref,), ref_grads = run_with_grads(rms_norm_reference, (x, w), dy, eps)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **tol["out"], msg=lambda m: f"out: {m}")
    (_, dx), (_, dw) = grads
    (_, rdx), (_, rdw) = ref_grads
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    torch.testing.assert_close(dx, rdx, **tol["dx"], msg=lambda m: f"dx: {m}")
    if tol["dw"] == "eager":
        _, ((_, _), (_, tdw)) = run_with_grads(rms_norm_reference, as_fp64((x, w)), dy.double(), eps)
        assert_no_worse_than_eager(dw, rdw, tdw, "dw")
    else:
        torch.testing.assert_close(dw, rdw, **tol["dw"], msg=lambda m: f"dw: {m}")


@interpreter_only
@pytest.mark.parametrize("x_dtype, w_dtype", list(TOL), ids=DTYPE_IDS)
@pytest.mark.parametrize("lead, C", CASES)
def test_rms_norm_matches_reference(force_triton, lead, C, x_dtype, w_dtype):
    _check(*_make(lead, C, x_dtype, w_dtype))


@interpreter_only
@pytest.mark.parametrize("x_dtype, w_dtype", list(TOL)[:2], ids=DTYPE_IDS[:2])
def test_strided_inputs(force_triton, x_dtype, w_dtype):
    """Rows with a stride wider than C (a slice of a fused buffer) go in without a copy; a channel stride != 1
    (a transposed view) is copied by the launcher; a strided dy works the same."""
    x, w, dy = _make((3, 7), 100, x_dtype, w_dtype)
    wide = torch.randn(3, 7, 130).to(x_dtype)
    wide[..., 10:110] = x
    _check(wide[..., 10:110], w, dy.transpose(0, 1).contiguous().transpose(0, 1))  # row stride 130; dy strided
    _check(x.transpose(-1, -2).contiguous().transpose(-1, -2), w, dy)  # channel stride 7


@interpreter_only
def test_eps_and_zero_rows(force_triton):
    """eps enters the sqrt: with eps = 1 and x ~ 1e-2 it dominates; an all-zero row gives y = 0 and
    dx = dy * w / sqrt(eps)."""
    x, w, dy = _make((5,), 37, torch.float32, torch.float32)
    _check(x * 1e-2, w, dy, eps=1.0)
    x[2] = 0
    (out,), ((_, dx), _) = run_with_grads(rms_norm, (x, w), dy, EPS)
    assert (out[2] == 0).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(dx[2], dy[2] * w / EPS ** 0.5, rtol=1e-6, atol=0)
    _check(x, w, dy)


@interpreter_only
def test_saves_input_and_one_fp32_per_row(force_triton):
    """Autograd keeps x, the weight and rstd (M,), not the normalised (M, C) activations."""
    x, w, _ = _make((3, 7), 100, torch.float16, torch.float16)
    out = rms_norm(x.requires_grad_(), w, EPS)
    saved = out.grad_fn.saved_tensors
    assert [t.shape for t in saved] == [x.shape, w.shape, (21,)] and saved[2].dtype == torch.float32
    assert saved[0].data_ptr() == x.data_ptr()


@interpreter_only
def test_dispatch(monkeypatch):
    """MINILLAVA_KERNELS is read at every call; unsupported inputs fall back to the reference on purpose."""
    x, w, _ = _make((5,), 37, torch.float32, torch.float32)
    x.requires_grad_()
    monkeypatch.setenv("MINILLAVA_KERNELS", "0")
    assert rms_norm(x, w, EPS).grad_fn.name() != "RMSNormFunctionBackward"
    monkeypatch.setenv("MINILLAVA_KERNELS", "1")  # the default: Triton for CUDA tensors only
    assert rms_norm(x, w, EPS).grad_fn.name() != "RMSNormFunctionBackward"
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")
    assert rms_norm(x, w, EPS).grad_fn.name() == "RMSNormFunctionBackward"
    for xx, ww in [(x.bfloat16(), w.bfloat16()),  # the interpreter has no bf16
                   (x.double(), w.double()),  # not a kernel dtype
                   (x[:0], w)]:  # empty
        assert torch.equal(rms_norm(xx, ww, EPS), rms_norm_reference(xx, ww, EPS))
        assert rms_norm(xx, ww, EPS).grad_fn.name() != "RMSNormFunctionBackward"
    with pytest.raises(ValueError, match=r"weight \(36,\) does not match C=37"):  # the launcher names it
        RMSNormFunction.apply(x, w[:-1], EPS)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead, C", [((2, 333), 4096), ((577,), 1024), ((3,), 5120)])
def test_gpu_rms_norm(force_triton, lead, C, dtype):
    x, w, dy = _make(lead, C, dtype, dtype, device="cuda")
    (out,), ((_, dx), (_, dw)) = run_with_grads(rms_norm, (x, w), dy, EPS)
    (ref,), ((_, rdx), (_, rdw)) = run_with_grads(rms_norm_reference, (x, w), dy, EPS)
    if dtype == torch.float32:
        for a, b in [(out, ref), (dx, rdx), (dw, rdw)]:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        return
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else FP16_ULP  # the widest spacing relative to the value
    # out = round(w * round(x * r)) is rounded twice. The kernel's r and eager's differ in the last fp32 bits
    # (summation order, 1/sqrt vs rsqrt), so x * r may fall on either side of a rounding boundary: xhat may
    # differ by one ulp, and w * xhat with it, then the second rounding can add one more: at most two ulps.
    torch.testing.assert_close(out, ref, atol=1e-7, rtol=2 * ulp)
    torch.testing.assert_close(dx, rdx, atol=1e-7, rtol=ulp)
    _, (_, (_, tdw)) = run_with_grads(rms_norm_reference, as_fp64((x, w)), dy.double(), EPS)
    assert_no_worse_than_eager(dw, rdw, tdw, "dw")
