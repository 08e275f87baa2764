"""RMSNorm: y = w * (x / sqrt(mean(x^2) + eps)), computed in fp32 and cast back before the weight
(exactly as LLaMA's reference does, so that bf16 models round the same way).

Triton path, one program per row of C channels (the whole row sits in registers, so C <= MAX_FUSED_C):
    forward   r = 1 / sqrt(mean(x^2) + eps)  (fp32, saved per row),  xhat = x * r,  y = w * cast_x(xhat)
    backward  g = cast_x(dy * w)              (the gradient reaching xhat; the reference rounds it the same way)
              dx = r * (g - xhat * mean(g * xhat))
              dw = sum_rows dy * cast_x(xhat)  (fp32 partial sums per program, reduced by torch)
where cast_x rounds to x's dtype. Autograd saves x, w and r (one fp32 per row), not the normalised x.
"""
import torch

from minillava.kernels.dispatch import COMPILE, sm_count, tl, triton, use_triton


def rms_norm_reference(x, weight, eps: float):
    """x (..., C), weight (C,) -> (..., C) in x's dtype (times weight's)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


MAX_FUSED_C = 65536  # widest row one program holds (Triton tutorial 05 caps a row at 64 KB); wider: reference
_CPU_BWD_PROGRAMS = 4  # backward programs off CUDA (each loops over a slice of rows); on CUDA: one per SM


def _num_warps(block_c):
    """Enough warps that each thread holds at most ~32 elements of the row."""
    return min(max(block_c // 256, 1), 32)  # 4096 channels -> 16 warps


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (M, C) input rows, unit channel stride
    w_ptr,  # (C,) weight
    y_ptr,  # (M, C) output, contiguous, dtype promote(x, w)
    rstd_ptr,  # (M,) fp32 output: 1 / sqrt(mean(x^2) + eps), saved for backward
    stride_x_row,  # elements between consecutive rows of x
    C, eps,
    BLOCK_C: tl.constexpr,  # next power of two >= C
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)  # fp32 mean of squares over the true C
    xhat = (x * rstd).to(x_ptr.dtype.element_ty)  # cast back to x's dtype BEFORE the weight, as the reference
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # The product of two 16-bit floats is exact in fp32, so one rounding at the store equals torch's w * xhat.
    y = w.to(tl.float32) * xhat.to(tl.float32)
    tl.store(y_ptr + row * C + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # (M, C) incoming gradient, unit channel stride
    x_ptr,  # (M, C) saved input, unit channel stride
    w_ptr,  # (C,) weight
    rstd_ptr,  # (M,) fp32 saved 1 / sqrt(mean(x^2) + eps)
    dx_ptr,  # (M, C) output gradient, contiguous, x's dtype
    dw_partial_ptr,  # (n_programs, C) fp32 output: this program's partial sum of dy * cast_x(xhat)
    stride_dy_row, stride_x_row,  # elements between consecutive rows of dy and x
    M, C, rows_per_program,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row * stride may pass 2^31 elements
    row_end = tl.minimum(row_start + rows_per_program, M)
    x_ptr += row_start * stride_x_row  # walk the three row pointers down this program's slice
    dy_ptr += row_start * stride_dy_row
    dx_ptr += row_start * C
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        dw_acc += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        g = (dy * w).to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference's cast rounds this gradient too
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / C))
        tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        x_ptr += stride_x_row
        dy_ptr += stride_dy_row
        dx_ptr += C
    tl.store(dw_partial_ptr + pid * C + cols, dw_acc, mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers: (M, C) rows
# ----------------------------------------------------------------------------------------------------------
def _rows(t, C):
    """(..., C) -> (M, C) with unit channel stride (a view when possible)."""
    t2 = t.reshape(-1, C)  # (M, C)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_forward(x2, weight, eps: float):
    """x2 (M, C), weight (C,) -> y (M, C) in promote(x, w) dtype, rstd (M,) fp32."""
    M, C = x2.shape
    if weight.shape != (C,):
        raise ValueError(f"rms_norm weight {tuple(weight.shape)} does not match C={C}")
    if C > MAX_FUSED_C:
        raise ValueError(f"rms_norm row of C={C} exceeds MAX_FUSED_C={MAX_FUSED_C}")
    y = torch.empty(M, C, device=x2.device, dtype=torch.promote_types(x2.dtype, weight.dtype))  # (M, C)
    rstd = torch.empty(M, device=x2.device, dtype=torch.float32)  # (M,)
    BLOCK_C = triton.next_power_of_2(C)
    _rms_norm_fwd_kernel[(M,)](x2, weight.contiguous(), y, rstd, x2.stride(0), C, eps,
                               BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_C), **COMPILE)
    return y, rstd


def rms_norm_backward(dy2, x2, weight, rstd):
    """dy2, x2 (M, C), weight (C,), rstd (M,) -> dx (M, C) in x's dtype, dw (C,) in weight's dtype."""
    M, C = x2.shape
    n_programs = min(sm_count(x2.device) if x2.is_cuda else _CPU_BWD_PROGRAMS, M)
    rows_per_program = triton.cdiv(M, n_programs)
    dx = torch.empty(M, C, device=x2.device, dtype=x2.dtype)  # (M, C)
    dw_partial = torch.empty(n_programs, C, device=x2.device, dtype=torch.float32)  # (n_programs, C)
    BLOCK_C = triton.next_power_of_2(C)
    _rms_norm_bwd_kernel[(n_programs,)](dy2, x2, weight.contiguous(), rstd, dx, dw_partial,
                                        dy2.stride(0), x2.stride(0), M, C, rows_per_program,
                                        BLOCK_C=BLOCK_C, num_warps=_num_warps(BLOCK_C), **COMPILE)
    return dx, dw_partial.sum(0).to(weight.dtype)  # (C,)


# ----------------------------------------------------------------------------------------------------------
# Autograd Function and functional alias
# ----------------------------------------------------------------------------------------------------------
class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        C = x.shape[-1]
        y, rstd = rms_norm_forward(_rows(x, C), weight, eps)  # (M, C), (M,)
        ctx.save_for_backward(x, weight, rstd)
        return y.view(*x.shape[:-1], C)  # (..., C)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        C = x.shape[-1]
        dx, dw = rms_norm_backward(_rows(dy, C), _rows(x, C), weight, rstd)  # (M, C), (C,)
        return dx.view(x.shape), dw, None


def rms_norm(x, weight, eps: float):
    """RMSNorm through the Triton kernel when :func:`kernels.dispatch.use_triton`, else the reference.
    Falls back on purpose for: weight not of shape (C,), rows wider than MAX_FUSED_C, empty input,
    non-float dtypes, and bf16 off CUDA (the interpreter has no bf16)."""
    floats = (torch.float16, torch.bfloat16, torch.float32)
    ok = (x.dim() >= 1 and x.numel() > 0 and weight.shape == x.shape[-1:] and x.shape[-1] <= MAX_FUSED_C
          and x.dtype in floats and weight.dtype in floats and weight.device == x.device
          and (x.is_cuda or torch.bfloat16 not in (x.dtype, weight.dtype)))
    if use_triton("rms_norm", x, None if ok else "inputs its kernel does not cover"):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
