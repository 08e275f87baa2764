"""The two MLP hot paths, each a GEMM with a fused elementwise epilogue.

- LLaMA SwiGLU:   h = silu(x W_gate^T) * (x W_up^T)          x (..., C), W_gate/W_up (F, C) -> h (..., F)
- CLIP fc1:       h = quick_gelu(x W^T + b), quick_gelu(y) = y * sigmoid(1.702 y)   W (F, C), b (F,)
The down projection (LLaMA) and fc2 (CLIP) stay plain matmuls.

Below the references, each op has the four layers of kernels/: Triton kernels, a launcher (flattens to
(M, C) = (B*T, C), validates, picks block sizes), a torch.autograd.Function, and the functional alias.

SwiGLU computes both projections in ONE GEMM: each program owns an (BLOCK_M, BLOCK_N) tile of h and keeps two
fp32 accumulators, gate = x W_gate^T and up = x W_up^T, over the same loads of x. The epilogue writes only h,
so neither (M, F) intermediate reaches memory, and autograd saves only x and the weights (eager PyTorch saves
gate, up and silu(gate): three (M, F) tensors per layer). The backward pass recomputes the two tiles.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillava.kernels.dispatch import COMPILE, tl, triton, use_triton
from minillava.kernels.linear import linear

QUICK_GELU_ALPHA = tl.constexpr(1.702)  # CLIP's quick_gelu: y * sigmoid(1.702 y), a cheap approximation of GELU


# ----------------------------------------------------------------------------------------------------------
# Plain-torch references: the CPU path, the test oracle and the documentation of the math
# ----------------------------------------------------------------------------------------------------------
def swiglu_reference(x, w_gate, w_up):
    """silu(x W_gate^T) * (x W_up^T): (..., C) -> (..., F); the CPU path too. kernels.linear.linear is F.linear,
    except for the few rows of a CPU decoding step (the same products, summed in another order, faster)."""
    return F.silu(linear(x, w_gate)) * linear(x, w_up)


def linear_quick_gelu_reference(x, weight, bias):
    """quick_gelu(x W^T + b): (..., C) -> (..., F)."""
    y = F.linear(x, weight, bias)
    return y * torch.sigmoid(1.702 * y)


# One fixed tile config off CUDA (the interpreter cannot autotune): 32 is the smallest tile that keeps the
# tests' odd shapes (C=48, F=80) exercising both full and masked tiles.
_CPU_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)
# Autotune candidates on CUDA. Two fp32 accumulators (SwiGLU) double the register tile, hence <= 128x128.
_CUDA_CONFIGS = [
    triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (32, 64, 64, 4, 4),
    ]
]
# Tuning is keyed on (N, K) and a bucket of M, so varying sequence lengths do not retune: every M up to 64
# (decoding steps, small batches) shares one bucket, above that M rounded up to a power of two, capped at 8192.
_TUNE_KEY = ["M_BUCKET", "N", "K"]


def _m_bucket(M: int) -> int:
    return min(max(triton.next_power_of_2(M), 64), 8192)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n) in grouped order: GROUP_M consecutive programs walk down a column of
    output tiles, so the weight tiles they share are still in L2 (Triton tutorial 03)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _matmul_wt_tiles(
    x_ptr, wa_ptr, wb_ptr,  # x (M, K); wa, wb (N, K) with identical strides; wb unused unless DUAL
    offs_m, offs_n,  # (BLOCK_M,), (BLOCK_N,) row / column indices of the tile, already wrapped into range
    K,
    stride_xm, stride_xk,  # x strides: between rows (tokens), between channels
    stride_wn, stride_wk,  # weight strides: between output features, between input channels
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DUAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """acc_a = x W_a^T and (if DUAL) acc_b = x W_b^T on one (BLOCK_M, BLOCK_N) tile, accumulated in fp32.

    Rows and columns were wrapped modulo M and N by the caller, so only the K tail needs a mask (out-of-range
    rows/columns compute garbage that the masked store drops). Each x tile is loaded once for both dots."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_offs = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K, BLOCK_N): a tile of W^T
    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        wa = tl.load(wa_ptr + w_offs, mask=offs_k[:, None] < k_left, other=0.0)
        acc_a = tl.dot(x, wa, acc_a, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N) += x @ Wa^T
        if DUAL:
            wb = tl.load(wb_ptr + w_offs, mask=offs_k[:, None] < k_left, other=0.0)
            acc_b = tl.dot(x, wb, acc_b, input_precision=INPUT_PRECISION)  # += x @ Wb^T, same x tile
        x_ptrs += BLOCK_K * stride_xk
        w_offs += BLOCK_K * stride_wk
    return acc_a, acc_b


@triton.jit
def _swiglu_fwd_kernel(
    x_ptr,  # (M, K) input rows, K = C
    wg_ptr, wu_ptr,  # (N, K) gate and up weights, N = F, sharing strides
    h_ptr,  # (M, N) output silu(gate) * up, in x's dtype
    M, N, K, M_BUCKET,  # problem size; M_BUCKET (next power of two of M) only keys the autotuner
    stride_xm, stride_xk,  # x strides (row, channel)
    stride_wn, stride_wk,  # weight strides (feature, channel)
    stride_hm, stride_hn,  # h strides (row, feature)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """h = silu(g) * u with g = x W_gate^T, u = x W_up^T; silu(g) = g * sigmoid(g). Epilogue in fp32."""
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gate, up = _matmul_wt_tiles(x_ptr, wg_ptr, wu_ptr, offs_m % M, offs_n % N, K, stride_xm, stride_xk,
                                stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, True, INPUT_PRECISION)
    h = gate * tl.sigmoid(gate) * up  # fused dual epilogue: gate and up never leave registers
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hn,
             h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    x_ptr,  # (M, K) the saved input
    wg_ptr, wu_ptr,  # (N, K) gate and up weights, sharing strides
    dh_ptr,  # (M, N) incoming gradient dL/dh
    dg_ptr, du_ptr,  # (M, N) outputs dL/dgate, dL/dup (contiguous, same strides), in x's dtype
    M, N, K, M_BUCKET,  # problem size; M_BUCKET only keys the autotuner
    stride_xm, stride_xk,  # x strides (row, channel)
    stride_wn, stride_wk,  # weight strides (feature, channel)
    stride_dhm, stride_dhn,  # dh strides (row, feature)
    stride_dm, stride_dn,  # dg / du strides (row, feature)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Recompute gate and up for this tile, then with s = sigmoid(gate):
        d_up   = dh * silu(gate) = dh * gate * s
        d_gate = dh * up * silu'(gate),  silu'(g) = s * (1 + g * (1 - s))"""
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gate, up = _matmul_wt_tiles(x_ptr, wg_ptr, wu_ptr, offs_m % M, offs_n % N, K, stride_xm, stride_xk,
                                stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, True, INPUT_PRECISION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    dh = tl.load(dh_ptr + offs_m[:, None] * stride_dhm + offs_n[None, :] * stride_dhn, mask=mask, other=0.0)
    dh = dh.to(tl.float32)
    s = tl.sigmoid(gate)
    d_up = dh * gate * s
    d_gate = dh * up * s * (1.0 + gate * (1.0 - s))
    d_offs = offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
    tl.store(dg_ptr + d_offs, d_gate.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + d_offs, d_up.to(du_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _linear_quick_gelu_fwd_kernel(
    x_ptr,  # (M, K) input rows
    w_ptr,  # (N, K) weight
    b_ptr,  # (N,) bias (unused unless HAS_BIAS)
    h_ptr,  # (M, N) output quick_gelu(y), in x's dtype
    y_ptr,  # (M, N) pre-activation y = x W^T + b, written only if STORE_Y (kept for backward)
    M, N, K, M_BUCKET,  # problem size; M_BUCKET only keys the autotuner
    stride_xm, stride_xk,  # x strides (row, channel)
    stride_wn, stride_wk,  # weight strides (feature, channel)
    stride_hm, stride_hn,  # h and y strides (row, feature); both are fresh contiguous buffers
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, STORE_Y: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """y = x W^T + b (fp32 accumulator, fp32 bias add), h = y * sigmoid(1.702 y)."""
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y, _ = _matmul_wt_tiles(x_ptr, w_ptr, w_ptr, offs_m % M, offs_n % N, K, stride_xm, stride_xk,
                            stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, False, INPUT_PRECISION)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n % N).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_offs = offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hn
    if STORE_Y:
        tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    h = y * tl.sigmoid(y * QUICK_GELU_ALPHA)
    tl.store(h_ptr + out_offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quick_gelu_bwd_kernel(
    y_ptr,  # (numel,) saved pre-activation, contiguous
    dh_ptr,  # (numel,) incoming gradient dL/dh, contiguous
    dy_ptr,  # (numel,) output dL/dy, contiguous, in y's dtype
    numel,
    BLOCK: tl.constexpr,
):
    """dy = dh * quick_gelu'(y),  quick_gelu'(y) = s + 1.702 * y * s * (1 - s),  s = sigmoid(1.702 y). fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(y * QUICK_GELU_ALPHA)
    dy = dh * (s + y * QUICK_GELU_ALPHA * s * (1.0 - s))
    tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=mask)


_swiglu_fwd_tuned = triton.autotune(_CUDA_CONFIGS, key=_TUNE_KEY)(_swiglu_fwd_kernel)
_swiglu_bwd_tuned = triton.autotune(_CUDA_CONFIGS, key=_TUNE_KEY)(_swiglu_bwd_kernel)
_linear_quick_gelu_fwd_tuned = triton.autotune(_CUDA_CONFIGS, key=_TUNE_KEY)(_linear_quick_gelu_fwd_kernel)


# ----------------------------------------------------------------------------------------------------------
# Launchers: (M, C) rows in, (M, F) out
# ----------------------------------------------------------------------------------------------------------
def _launch_gemm(kernel, tuned, x2, N, args, **constexprs):
    """Launch a tile-GEMM kernel over the (M, N) output on a 1-D grid of tiles: autotuned on CUDA, one fixed
    config elsewhere. `args` are the kernel's arguments between the pointers and the constexprs."""
    M, K = x2.shape
    if M * max(N, K) >= 2**31:
        raise ValueError(f"GEMM (M={M}, N={N}, K={K}) overflows the kernels' int32 offsets")
    if x2.is_cuda and x2.dtype != torch.float32:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        tuned[grid](*args, **constexprs, **COMPILE)
    else:  # fp32 on CUDA too: exact fp32 dots compile slowly, and autotuning compiles every candidate
        config = dict(_CPU_CONFIG, num_warps=4, num_stages=2) if x2.is_cuda else _CPU_CONFIG
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        kernel[grid](*args, **config, **constexprs, **COMPILE)


def _input_precision(x):
    """fp32 GEMMs follow PyTorch's own switch: TF32 tensor cores only where torch allows them for matmul."""
    if x.is_cuda and x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _check_gemm_operands(x2, *weights):
    K = x2.shape[1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != K or w.dtype != x2.dtype or w.device != x2.device:
            raise ValueError(f"weight {tuple(w.shape)} {w.dtype} on {w.device} does not fit input rows "
                             f"(M, C) = {tuple(x2.shape)} {x2.dtype} on {x2.device}")


def swiglu_forward(x2, w_gate, w_up):
    """x2 (M, C), w_gate/w_up (F, C) -> h (M, F) = silu(x2 W_gate^T) * (x2 W_up^T), one fused GEMM."""
    _check_gemm_operands(x2, w_gate, w_up)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} differ")
    w_gate, w_up = w_gate.contiguous(), w_up.contiguous()  # one set of weight strides serves both
    (M, K), N = x2.shape, w_gate.shape[0]
    h = torch.empty(M, N, device=x2.device, dtype=x2.dtype)  # (M, F)
    args = (x2, w_gate, w_up, h, M, N, K, _m_bucket(M),
            *x2.stride(), *w_gate.stride(), *h.stride())
    _launch_gemm(_swiglu_fwd_kernel, _swiglu_fwd_tuned, x2, N, args, INPUT_PRECISION=_input_precision(x2))
    return h


def swiglu_backward(x2, w_gate, w_up, dh2):
    """x2 (M, C) saved input, dh2 (M, F) -> (d_gate, d_up), each (M, F) in x's dtype; gate/up recomputed."""
    w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    (M, K), N = x2.shape, w_gate.shape[0]
    d_gate = torch.empty(M, N, device=x2.device, dtype=x2.dtype)  # (M, F)
    d_up = torch.empty_like(d_gate)  # (M, F), same strides as d_gate
    args = (x2, w_gate, w_up, dh2, d_gate, d_up, M, N, K, _m_bucket(M),
            *x2.stride(), *w_gate.stride(), *dh2.stride(), *d_gate.stride())
    _launch_gemm(_swiglu_bwd_kernel, _swiglu_bwd_tuned, x2, N, args, INPUT_PRECISION=_input_precision(x2))
    return d_gate, d_up


def linear_quick_gelu_forward(x2, weight, bias, store_y: bool):
    """x2 (M, C), weight (F, C), bias (F,) or None -> (h, y), h = quick_gelu(y), y = x2 W^T + b, both (M, F).
    y is written only when store_y (backward needs it); otherwise y is None."""
    _check_gemm_operands(x2, weight)
    (M, K), N = x2.shape, weight.shape[0]
    if bias is not None and (bias.shape != (N,) or bias.dtype != x2.dtype or bias.device != x2.device):
        raise ValueError(f"bias {tuple(bias.shape)} {bias.dtype} does not fit weight {tuple(weight.shape)}")
    weight = weight.contiguous()
    h = torch.empty(M, N, device=x2.device, dtype=x2.dtype)  # (M, F)
    y = torch.empty_like(h) if store_y else None  # (M, F), same strides as h
    args = (x2, weight, bias if bias is not None else weight, h, y if store_y else h,  # dummies: never read
            M, N, K, _m_bucket(M), *x2.stride(), *weight.stride(), *h.stride())
    _launch_gemm(_linear_quick_gelu_fwd_kernel, _linear_quick_gelu_fwd_tuned, x2, N, args,
                 HAS_BIAS=bias is not None, STORE_Y=store_y, INPUT_PRECISION=_input_precision(x2))
    return h, y


QUICK_GELU_BWD_BLOCK = 1024  # elements per program of the elementwise backward


def quick_gelu_backward(y, dh):
    """dL/dy (M, F) in y's dtype, from the saved pre-activation y (M, F) and dL/dh (M, F)."""
    y, dh = y.contiguous(), dh.contiguous()
    dy = torch.empty_like(y)
    numel = y.numel()
    _quick_gelu_bwd_kernel[(triton.cdiv(numel, QUICK_GELU_BWD_BLOCK),)](y, dh, dy, numel,
                                                                      BLOCK=QUICK_GELU_BWD_BLOCK, **COMPILE)
    return dy


# ----------------------------------------------------------------------------------------------------------
# Autograd Functions
# ----------------------------------------------------------------------------------------------------------
class SwiGLUFunction(torch.autograd.Function):
    """Saves x and the weights only; backward recomputes gate/up in the fused kernel, then plain matmuls:
        dx = d_gate W_gate + d_up W_up,   dW_gate = d_gate^T x,   dW_up = d_up^T x"""

    @staticmethod
    def forward(ctx, x, w_gate, w_up):
        C, F_ = x.shape[-1], w_gate.shape[0]
        h = swiglu_forward(x.reshape(-1, C), w_gate, w_up)  # (M, C) -> (M, F)
        ctx.save_for_backward(x, w_gate, w_up)  # x as given (a view costs no memory); no (M, F) tensor
        return h.view(*x.shape[:-1], F_)  # (..., F)

    @staticmethod
    def backward(ctx, dh):
        x, w_gate, w_up = ctx.saved_tensors
        C, F_ = x.shape[-1], w_gate.shape[0]
        x2 = x.reshape(-1, C)  # (M, C)
        d_gate, d_up = swiglu_backward(x2, w_gate, w_up, dh.reshape(-1, F_))  # (M, F) each
        dx = dw_gate = dw_up = None
        if ctx.needs_input_grad[0]:
            dx = d_gate @ w_gate  # (M, F) @ (F, C) -> (M, C)
            dx = dx.addmm_(d_up, w_up).view(x.shape)  # += (M, F) @ (F, C)
        if ctx.needs_input_grad[1]:
            dw_gate = d_gate.t() @ x2  # (F, M) @ (M, C) -> (F, C)
        if ctx.needs_input_grad[2]:
            dw_up = d_up.t() @ x2  # (F, M) @ (M, C) -> (F, C)
        return dx, dw_gate, dw_up


class LinearQuickGELUFunction(torch.autograd.Function):
    """Saves the pre-activation y (M, F) rather than recomputing it: recomputing would cost a whole extra
    GEMM (2*M*F*C flops, +50% on the layer's 4*M*F*C of backward), while y is half of what eager PyTorch keeps
    (y and sigmoid(1.702 y)). In LLaVA the CLIP tower is frozen and runs under no_grad, where the alias skips
    this Function and y is never written. Backward: dy = dh * quick_gelu'(y) (Triton), then matmuls."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        C, F_ = x.shape[-1], weight.shape[0]
        h, y = linear_quick_gelu_forward(x.reshape(-1, C), weight, bias, store_y=True)  # (M, F) each
        ctx.save_for_backward(x, weight, y)
        ctx.has_bias = bias is not None
        return h.view(*x.shape[:-1], F_)  # (..., F)

    @staticmethod
    def backward(ctx, dh):
        x, weight, y = ctx.saved_tensors
        C, F_ = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, C)  # (M, C)
        dy = quick_gelu_backward(y, dh.reshape(-1, F_))  # (M, F)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight).view(x.shape)  # (M, F) @ (F, C) -> (M, C)
        if ctx.needs_input_grad[1]:
            dw = dy.t() @ x2  # (F, M) @ (M, C) -> (F, C)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)  # (F,)
        return dx, dw, db


# ----------------------------------------------------------------------------------------------------------
# Functional aliases
# ----------------------------------------------------------------------------------------------------------
def _gemm_supported(x, *params):
    """Shapes/dtypes the Triton GEMMs take. Anything else falls back to the reference on purpose:
    mixed dtypes or autocast (F.linear's casting rules), bf16 off CUDA (the interpreter has no bf16),
    empty inputs (a 0-program grid), and mismatched shapes (so that torch raises its usual error)."""
    C = x.shape[-1] if x.dim() > 0 else -1
    return (x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and (x.is_cuda or x.dtype != torch.bfloat16)
            and not torch.is_autocast_enabled(x.device.type)
            and x.numel() > 0
            and all(p.dtype == x.dtype and p.device == x.device for p in params)
            and all(p.dim() == 2 and p.shape == params[0].shape and p.shape[1] == C for p in params[:2]))


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def swiglu(x, w_gate, w_up):
    """silu(x W_gate^T) * (x W_up^T): (..., C) -> (..., F), the fused Triton GEMM when
    :func:`kernels.dispatch.use_triton` says so."""
    if use_triton("swiglu", x, None if _gemm_supported(x, w_gate, w_up) else "inputs its kernel does not cover"):
        return SwiGLUFunction.apply(x, w_gate, w_up)
    return swiglu_reference(x, w_gate, w_up)


def swiglu_layers(x, gate, up=None):
    """silu(gate(x)) * up(x) for the LLM's two linear layers, or for one layer giving both side by side (up None:
    gate and up joined for inference on the CPU): the fused swiglu() on their weights when both are plain
    weights (it never writes gate(x) and up(x) to memory); any other module there (LoRA, a quantized linear) is
    called as a module, and the decision counted as swiglu's."""
    if isinstance(gate, nn.Linear) and isinstance(up, nn.Linear):
        return swiglu(x, gate.weight, up.weight)
    use_triton("swiglu", x, "LoRA, quantized or joined layers")  # False: counted, so that the run can say so
    g, u = (gate(x), up(x)) if up is not None else gate(x).chunk(2, dim=-1)  # (..., F) each
    return F.silu(g) * u


def linear_quick_gelu(x, weight, bias):
    """quick_gelu(x W^T + b): (..., C) -> (..., F), Triton GEMM + epilogue when :func:`kernels.dispatch.use_triton`."""
    ok = _gemm_supported(x, weight) and (bias is None or (bias.dtype == x.dtype and bias.device == x.device
                                                          and bias.shape == weight.shape[:1]))
    if not use_triton("linear_quick_gelu", x, None if ok else "inputs its kernel does not cover"):
        return linear_quick_gelu_reference(x, weight, bias)
    if _needs_grad(x, weight, bias):
        return LinearQuickGELUFunction.apply(x, weight, bias)
    h, _ = linear_quick_gelu_forward(x.reshape(-1, x.shape[-1]), weight, bias, store_y=False)  # (M, F)
    return h.view(*x.shape[:-1], weight.shape[0])  # (..., F)
