"""Cross-entropy of logits against labels, skipping ignore_index, computed in fp32.
logits (N, V) in any float dtype, labels (N,) int64 -> scalar (sum or mean over the kept rows).

Triton path (Liger-Kernel style), one program per row, everything in fp32 registers:
    pass 1  online logsumexp over V in blocks:  m <- max(m, max_j x_j),  d <- d e^(m_old - m) + sum_j e^(x_j - m)
            loss = m + log(d) - x_label
    pass 2  grad_j = (softmax_j - [j == label]) * scale,  softmax_j = e^(x_j - lse),  scale = 1/n_kept for mean
written straight into a buffer of the logits' dtype. Rows with label == ignore_index get loss 0 and grad 0.
Backward only scales that buffer by grad_output (in place). The eager reference upcasts the whole (N, V)
logits to fp32 and keeps an fp32 log-softmax for backward; here no fp32 (N, V) tensor ever exists: the
only (N, V) allocation is the gradient, in the logits' dtype (N*V*2 bytes for bf16 vs ~3x N*V*4 eager).
"""
import torch
import torch.nn.functional as F

from minillava.kernels.dispatch import COMPILE, tl, triton, use_triton


def cross_entropy_reference(logits, labels, ignore_index: int = -100, reduction: str = "mean"):
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)


_CPU_BLOCK_V = 32  # off CUDA: a small block, so the tests' odd V walk several blocks and a masked tail
MAX_BLOCK_V = 32768  # on CUDA: the whole LLaVA row (V = 32064) in one block, 32 warps -> 32 values a thread
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _cross_entropy_kernel(
    logits_ptr,  # (N, V) logits, any float dtype, unit vocab stride
    grad_ptr,  # (N, V) output gradient dL/dlogits in the logits' dtype, contiguous (unused unless COMPUTE_GRAD)
    labels_ptr,  # (N,) int64 target ids
    loss_ptr,  # (N,) fp32 output: per-row loss, 0 for ignored rows (not yet divided by n_kept)
    n_kept_ptr,  # () int64: number of rows whose label != ignore_index (read only for MEAN)
    stride_logits_row,  # elements between consecutive rows of logits
    V, ignore_index,
    BLOCK_V: tl.constexpr, MEAN: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * stride_logits_row
    grad_ptr += row * V
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    if label == ignore_index:  # contributes nothing: zero loss, zero gradient row
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                tl.store(grad_ptr + start + cols, tl.zeros((BLOCK_V,), tl.float32).to(grad_ptr.dtype.element_ty),
                         mask=start + cols < V)
        tl.store(loss_ptr + row, 0.0)
        return

    # pass 1: running max m and running sum d of e^(x - m), all fp32
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(logits_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: e^(-inf - 0) = 0, not NaN
        d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    lse = m + tl.log(d)
    x_label = tl.load(logits_ptr + label).to(tl.float32)
    tl.store(loss_ptr + row, lse - x_label)

    # pass 2: gradient of this row's (scaled) loss, written in the logits' dtype
    if COMPUTE_GRAD:
        if MEAN:
            scale = 1.0 / tl.load(n_kept_ptr).to(tl.float32)
        else:
            scale = 1.0
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(logits_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(start + cols == label, 1.0, 0.0)  # softmax - onehot
            tl.store(grad_ptr + start + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------
def cross_entropy_forward(logits, labels, ignore_index: int, reduction: str, compute_grad: bool):
    """logits (N, V), labels (N,) -> (loss, grad): loss reduced as asked (fp32), grad (N, V) in the logits'
    dtype already scaled for the reduction (or None when not compute_grad)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy needs logits (N, V) and labels (N,): got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy reduction {reduction!r} not in {REDUCTIONS}")
    N, V = logits.shape
    kept = labels != ignore_index  # (N,)
    bad = kept & ((labels < 0) | (labels >= V))
    if bad.any():  # one host sync per call, worth it: an out-of-range label would read out of bounds
        raise ValueError(f"cross_entropy labels out of range [0, {V}) at rows {bad.nonzero().flatten()[:8].tolist()}")
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    labels = labels.contiguous()
    n_kept = kept.sum()  # () int64, stays on the device
    loss_rows = torch.empty(N, device=logits.device, dtype=torch.float32)  # (N,)
    grad = torch.empty(N, V, device=logits.device, dtype=logits.dtype) if compute_grad else None  # (N, V)
    if logits.is_cuda:
        BLOCK_V = min(MAX_BLOCK_V, triton.next_power_of_2(V))
        num_warps = 32 if BLOCK_V >= 16384 else 16 if BLOCK_V >= 4096 else 8 if BLOCK_V >= 1024 else 4
    else:
        BLOCK_V, num_warps = _CPU_BLOCK_V, 4
    _cross_entropy_kernel[(N,)](
        logits, grad if compute_grad else logits, labels, loss_rows, n_kept,  # dummy grad pointer: never written
        logits.stride(0), V, ignore_index,
        BLOCK_V=BLOCK_V, MEAN=reduction == "mean", COMPUTE_GRAD=compute_grad, num_warps=num_warps, **COMPILE,
    )
    if reduction == "mean":
        loss = loss_rows.sum() / n_kept  # NaN when every row is ignored, as F.cross_entropy
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows
    return loss, grad


# ----------------------------------------------------------------------------------------------------------
# Autograd Function and functional alias
# ----------------------------------------------------------------------------------------------------------
class CrossEntropyFunction(torch.autograd.Function):
    """The gradient is computed in the forward kernel and saved; backward scales it IN PLACE by grad_output
    (no second (N, V) buffer). Saving it with save_for_backward makes a second backward through the same graph
    (retain_graph=True) raise autograd's 'modified by an inplace operation' error instead of scaling twice."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction):
        loss, grad = cross_entropy_forward(logits, labels, ignore_index, reduction, compute_grad=True)
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # grad_output is a scalar for mean/sum, (N,) per-row weights for 'none'
        grad.mul_(grad_output.unsqueeze(1) if ctx.per_row else grad_output)  # (N, V) *= () or (N, 1)
        return grad, None, None, None


def cross_entropy(logits, labels, ignore_index: int = -100, reduction: str = "mean"):
    """Cross-entropy through the Triton kernel when :func:`kernels.dispatch.use_triton`, else the reference.
    Falls back on purpose for: logits that are not (N, V) with labels (N,) (F.cross_entropy's other layouts),
    an empty batch, labels that are not int64 (torch raises its error), and bf16 off CUDA (the interpreter has no
    bf16)."""
    ok = (logits.dim() == 2 and labels.dim() == 1 and labels.shape[0] == logits.shape[0] and logits.numel() > 0
          and logits.dtype in (torch.float16, torch.bfloat16, torch.float32) and reduction in REDUCTIONS
          and labels.dtype == torch.int64 and labels.device == logits.device
          and (logits.is_cuda or logits.dtype != torch.bfloat16))
    if not use_triton("cross_entropy", logits, None if ok else "inputs its kernel does not cover"):
        return cross_entropy_reference(logits, labels, ignore_index, reduction)
    if torch.is_grad_enabled() and logits.requires_grad:
        return CrossEntropyFunction.apply(logits, labels, ignore_index, reduction)
    return cross_entropy_forward(logits, labels, ignore_index, reduction, compute_grad=False)[0]
