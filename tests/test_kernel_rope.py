"""Triton RoPE (kernels/rope.py) against apply_rope_reference: rotated q and k, and dq, dk.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1). Cases cover GQA
(fewer k heads than q heads), head counts and half widths that are not powers of two (masked blocks), a single
decoding token, the model's (B, T, nh, hs) -> (B, nh, T, hs) strided views, per-sequence positions (left
padding), a cos/sin shared by the batch, and general cos/sin whose halves differ (so that the backward's
transpose map is tested in general, not only as a rotation by the opposite angle). GPU tests (bf16, LLaMA-7B
shapes) at the end need CUDA and compiled kernels: TRITON_INTERPRET=0 pytest ...
"""
import os

import pytest
import torch

from minillava.kernels.rope import RoPEFunction, apply_rope, apply_rope_reference
from minillava.llama import rope_cos_sin
from tests.kernel_util import HALF_ULP, as_fp64, run_with_grads

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                              reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")

# (B, nh, n_kv, T, hs)
SHAPES = [
    (1, 2, 2, 1, 16),     # one decoding token
    (2, 4, 2, 7, 16),     # GQA, the tiny model's head size
    (1, 3, 1, 13, 24),    # 3 q heads, 1 k head, half width 12 in a 16-wide block: every block masked
    (2, 2, 2, 5, 128),    # LLaMA-7B head size
]
# fp32 results (fp32 inputs, or fp16 q/k with fp32 cos/sin): the kernel's x1 c1 + x2 a1 vs eager's
# q * cos + rotate_half(q) * sin, the same two fp32 products summed: at most an ulp or two apart.
FP32_TOL = dict(atol=1e-6, rtol=1e-6)
# 16-bit results are the fp32 value rounded once, so they must be the correctly rounded fp64 truth (half an
# ulp); eager rounds q * cos, rotate_half(q) * sin and their sum separately, up to ~1.5 ulp off. atol: the fp32
# error before that rounding, on values below ~10.
OUT16_ATOL = 1e-6
DTYPES = {"fp32": (torch.float32, torch.float32), "fp16": (torch.float16, torch.float16),
          "fp16-qk-fp32-cos": (torch.float16, torch.float32)}


@pytest.fixture
def force_triton(monkeypatch):
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")


def _make(B, nh, n_kv, T, hs, qk_dtype, cs_dtype, cs="model", device="cpu", seed=0):
    """q, k in the model's layout (strided views of (B, T, heads, hs)), cos/sin, and output gradients."""
    g = torch.Generator().manual_seed(seed + T + hs)
    q = torch.randn(B, T, nh, hs, generator=g).to(device, qk_dtype).transpose(1, 2)  # (B, nh, T, hs)
    k = torch.randn(B, T, n_kv, hs, generator=g).to(device, qk_dtype).transpose(1, 2)  # (B, n_kv, T, hs)
    if cs == "model":  # each sequence at its own offset, as after left padding
        pos = torch.arange(T) + torch.arange(B)[:, None] * 3  # (B, T)
        cos, sin = rope_cos_sin(pos.to(device), hs, 10000.0, cs_dtype)  # (B, T, hs)
    elif cs == "broadcast":  # one table for the whole batch
        cos, sin = rope_cos_sin(torch.arange(T, device=device)[None], hs, 10000.0, cs_dtype)  # (1, T, hs)
    else:  # "general": any coefficients, halves unrelated
        cos, sin = (torch.randn(B, T, hs, generator=g).to(device, cs_dtype) for _ in range(2))
    out_dtype = torch.promote_types(qk_dtype, cs_dtype)
    dq = torch.randn(B, nh, T, hs, generator=g).to(device, out_dtype)
    dk = torch.randn(B, n_kv, T, hs, generator=g).to(device, out_dtype)
    return q, k, cos, sin, (dq, dk)


def _check(q, k, cos, sin, douts, out16_atol=OUT16_ATOL):
    qk = dict(grad_inputs=(0, 1))  # cos/sin are constants of the positions
    outs, grads = run_with_grads(apply_rope, (q, k, cos, sin), douts, **qk)
    assert outs[0].grad_fn.name() == "RoPEFunctionBackward"
    ref_outs, ref_grads = run_with_grads(apply_rope_reference, (q, k, cos, sin), douts, **qk)
    truth_outs, truth_grads = run_with_grads(apply_rope_reference, as_fp64((q, k, cos, sin)),
                                             tuple(d.double() for d in douts), **qk)
    grads, ref_grads, truth_grads = ([g for _, g in gs] for gs in (grads, ref_grads, truth_grads))
    for name, a, r, t in zip(("q_out", "k_out", "dq", "dk"), (*outs, *grads), (*ref_outs, *ref_grads),
                             (*truth_outs, *truth_grads)):
        assert a.dtype == r.dtype and a.shape == r.shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, r, **FP32_TOL, msg=lambda m: f"{name}: {m}")
        else:
            torch.testing.assert_close(a.double(), t, atol=out16_atol, rtol=HALF_ULP[a.dtype],
                                       msg=lambda m: f"{name} is not the correctly rounded truth: {m}")
    return outs


@interpreter_only
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_reference(force_triton, shape, dtypes):
    _check(*_make(*shape, *dtypes))


@interpreter_only
@pytest.mark.parametrize("cs", ["broadcast", "general"])
@pytest.mark.parametrize("dtypes", list(DTYPES.values())[:2], ids=list(DTYPES)[:2])
def test_cos_sin_forms(force_triton, cs, dtypes):
    _check(*_make(2, 4, 2, 7, 16, *dtypes, cs=cs))


@interpreter_only
def test_layouts_and_unused_output(force_triton):
    """Contiguous inputs and views of a fused qkv buffer both work, the output keeps a dense input's layout,
    and a k_out that the loss does not use still gives dq (its gradient arrives as zeros)."""
    q, k, cos, sin, douts = _make(2, 4, 2, 7, 16, torch.float32, torch.float32)
    q_out, _ = _check(q, k, cos, sin, douts)
    assert q_out.stride() == q.stride()  # (B, T, nh, hs) memory order kept: the o_proj reshape stays cheap
    _check(q.contiguous(), k.contiguous(), cos, sin, douts)
    qkv = torch.randn(2, 7, 8, 16)  # (B, T, nh + 2 n_kv, hs)
    _check(qkv[:, :, :4].transpose(1, 2), qkv[:, :, 4:6].transpose(1, 2), cos, sin, douts)
    (q_leaf, k_leaf) = (t.detach().clone().requires_grad_() for t in (q, k))
    q_out, _ = apply_rope(q_leaf, k_leaf, cos, sin)
    (q_out * douts[0]).sum().backward()
    (q_ref, k_ref) = (t.detach().clone().requires_grad_() for t in (q, k))
    (apply_rope_reference(q_ref, k_ref, cos, sin)[0] * douts[0]).sum().backward()
    torch.testing.assert_close(q_leaf.grad, q_ref.grad, **FP32_TOL)
    assert k_leaf.grad is not None and (k_leaf.grad == 0).all()


@interpreter_only
def test_dispatch(monkeypatch):
    """MINILLAVA_KERNELS is read at every call; what the kernel does not cover goes to the reference."""
    q, k, cos, sin, _ = _make(2, 4, 2, 7, 16, torch.float32, torch.float32)
    q.requires_grad_()
    name = lambda q, k, cos, sin: apply_rope(q, k, cos, sin)[0].grad_fn.name()  # noqa: E731
    monkeypatch.setenv("MINILLAVA_KERNELS", "0")
    assert name(q, k, cos, sin) != "RoPEFunctionBackward"
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")
    assert name(q, k, cos, sin) == "RoPEFunctionBackward"
    for args in [(q, k, cos.requires_grad_(), sin),  # the kernel does not differentiate cos/sin
                 (q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16())]:  # no bf16 in the interpreter
        assert name(*args) != "RoPEFunctionBackward"
        torch.testing.assert_close(apply_rope(*args), apply_rope_reference(*args), atol=0, rtol=0)
    cos.requires_grad_(False)
    with pytest.raises(ValueError, match=r"cos \(2, 6, 16\)"):  # the launcher names the bad operand
        RoPEFunction.apply(q, k, cos[:, :6], sin[:, :6])


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 32, 32, 333, 128), (1, 32, 8, 1, 128), (4, 16, 16, 577, 64)])
def test_gpu_rope(force_triton, shape, dtype):
    _check(*_make(*shape, dtype, dtype, device="cuda"), out16_atol=1e-5)
