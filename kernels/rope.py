"""Rotary position embedding in the rotate_half form used by Hugging Face-format LLaMA weights:
    x' = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., hs/2:], x[..., :hs/2])
cos, sin (B, T, hs) come from the positions (see minillava.llama.rope_cos_sin).

Written per half (x = [x1, x2], cos = [c1, c2], sin = [s1, s2], each hs/2 wide) the map is linear in x:
    forward   y1 = x1 c1 - x2 s1,    y2 = x2 c2 + x1 s2
and its backward is the transpose of that map (for LLaMA's cos = [c, c], sin = [s, s] it is the rotation by
the opposite angle, i.e. the same formula with sin -> -sin):
    backward  dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1
One Triton program per (b, t) token loads cos/sin once and rotates every q and k head of that token, in fp32.
"""
import torch

from minillava.kernels.dispatch import COMPILE, tl, triton, use_triton


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """q (B, nh, T, hs), k (B, n_kv, T, hs), cos/sin (B, T, hs) -> rotated (q, k)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rotate_heads(
    in_ptr,  # this token's (n_heads, hs) slice of the input: head 0, channel 0
    out_ptr,  # this token's (n_heads, hs) slice of the output
    stride_in_h, stride_out_h,  # elements between consecutive heads (channels have unit stride)
    n_heads, HALF,  # number of heads, hs / 2
    c1, c2, a1, a2,  # (1, BLOCK_D) fp32 coefficients: out1 = x1 c1 + x2 a1,  out2 = x2 c2 + x1 a2
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    mask = (h < n_heads) & (d < HALF)
    x1 = tl.load(in_ptr + h * stride_in_h + d, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_D)
    x2 = tl.load(in_ptr + h * stride_in_h + HALF + d, mask=mask, other=0.0).to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + h * stride_out_h + d, (x1 * c1 + x2 * a1).to(out_ty), mask=mask)
    tl.store(out_ptr + h * stride_out_h + HALF + d, (x2 * c2 + x1 * a2).to(out_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr,  # inputs: q (B, nh, T, hs), k (B, n_kv, T, hs), unit channel stride
    cos_ptr, sin_ptr,  # (B, T, hs) with unit channel stride (batch stride 0 when broadcast), same strides
    q_out_ptr, k_out_ptr,  # outputs shaped like q and k, unit channel stride
    stride_qb, stride_qh, stride_qt,  # q strides: batch, head, token
    stride_kb, stride_kh, stride_kt,  # k strides: batch, head, token
    stride_qob, stride_qoh, stride_qot,  # q_out strides: batch, head, token
    stride_kob, stride_koh, stride_kot,  # k_out strides: batch, head, token
    stride_cb, stride_ct,  # cos/sin strides: batch, token
    T, n_q_heads, n_kv_heads, HALF,  # tokens, heads of q and of k, hs / 2
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,  # apply the transpose map (inputs are dq', dk'; outputs dq, dk)
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    d = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    cs_offs = b * stride_cb + t * stride_ct + d
    c_mask = d < HALF
    c1 = tl.load(cos_ptr + cs_offs, mask=c_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs_offs + HALF, mask=c_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs_offs, mask=c_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs_offs + HALF, mask=c_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        a1, a2 = s2, -s1  # dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1
    else:
        a1, a2 = -s1, s2  # y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2
    _rotate_heads(q_ptr + b * stride_qb + t * stride_qt, q_out_ptr + b * stride_qob + t * stride_qot,
                  stride_qh, stride_qoh, n_q_heads, HALF, c1, c2, a1, a2, BLOCK_HQ, BLOCK_D)
    _rotate_heads(k_ptr + b * stride_kb + t * stride_kt, k_out_ptr + b * stride_kob + t * stride_kot,
                  stride_kh, stride_koh, n_kv_heads, HALF, c1, c2, a1, a2, BLOCK_HK, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------
def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_launch(q, k, cos, sin, q_dtype, k_dtype, backward: bool):
    """Rotate q (B, nh, T, hs) and k (B, n_kv, T, hs) by cos/sin (B or 1, T, hs); outputs keep q's and k's
    memory layout (empty_like), in q_dtype / k_dtype. backward=True applies the transpose (gradient) map."""
    B, nh, T, hs = q.shape
    n_kv = k.shape[1]
    if k.shape != (B, n_kv, T, hs) or hs % 2:
        raise ValueError(f"rope needs q (B, nh, T, hs), k (B, n_kv, T, hs) with even hs: "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}")
    if cos.shape != sin.shape or cos.shape not in ((B, T, hs), (1, T, hs)):
        raise ValueError(f"rope cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be (B or 1, T, hs) "
                         f"= ({B}, {T}, {hs})")
    q, k = _unit_last(q), _unit_last(k)
    cos = _unit_last(cos).expand(B, T, hs)  # (B, T, hs); a broadcast batch gets stride 0
    sin = _unit_last(sin).expand(B, T, hs)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty_like(q, dtype=q_dtype)  # (B, nh, T, hs), same layout as q
    k_out = torch.empty_like(k, dtype=k_dtype)  # (B, n_kv, T, hs)
    BLOCK_D = triton.next_power_of_2(hs // 2)
    _rope_kernel[(B * T,)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), T, nh, n_kv, hs // 2,
        BLOCK_HQ=triton.next_power_of_2(nh), BLOCK_HK=triton.next_power_of_2(n_kv), BLOCK_D=BLOCK_D,
        BACKWARD=backward, num_warps=4 if nh * BLOCK_D <= 4096 else 8, **COMPILE,
    )
    return q_out, k_out


# ----------------------------------------------------------------------------------------------------------
# Autograd Function and functional alias
# ----------------------------------------------------------------------------------------------------------
class RoPEFunction(torch.autograd.Function):
    """Gradients flow to q and k only: cos/sin are functions of the positions (the alias sends cos/sin that
    require grad to the reference)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cs_dtype = torch.promote_types(cos.dtype, sin.dtype)  # outputs promote like q * cos + rot(q) * sin
        q_out, k_out = rope_launch(q, k, cos, sin, torch.promote_types(q.dtype, cs_dtype),
                                   torch.promote_types(k.dtype, cs_dtype), backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = q.dtype, k.dtype
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):  # an unused output's gradient arrives as zeros (materialize_grads)
        cos, sin = ctx.saved_tensors
        dq, dk = rope_launch(dq_out, dk_out, cos, sin, *ctx.dtypes, backward=True)
        return dq, dk, None, None


def apply_rope(q, k, cos, sin):
    """RoPE on q and k through the Triton kernel when :func:`kernels.dispatch.use_triton`, else the reference.
    Falls back on purpose for: shapes other than q (B, nh, T, hs), k (B, n_kv, T, hs), cos/sin (B or 1, T, hs)
    with even hs; cos/sin that require grad (the kernel does not differentiate them); empty inputs; mixed
    devices; bf16 off CUDA (the interpreter has no bf16)."""
    floats = (torch.float16, torch.bfloat16, torch.float32)
    ok = (q.dim() == 4 and k.dim() == 4 and q.numel() > 0 and k.numel() > 0
          and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:] and q.shape[-1] % 2 == 0
          and cos.shape == sin.shape and cos.dim() == 3 and cos.shape[0] in (1, q.shape[0])
          and cos.shape[1:] == (q.shape[2], q.shape[3])
          and not (cos.requires_grad or sin.requires_grad)
          and all(t.dtype in floats and t.device == q.device for t in (k, cos, sin)) and q.dtype in floats
          and (q.is_cuda or torch.bfloat16 not in (q.dtype, k.dtype, cos.dtype, sin.dtype)))
    if use_triton("rope", q, None if ok else "inputs its kernel does not cover"):
        return RoPEFunction.apply(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)
