"""Attention: softmax(q k^T * scale + mask) v, with causal masking, GQA and key padding.

Shapes: q (B, nh, Tq, hs); k, v (B, n_kv, Tk, hs) with nh % n_kv == 0 (GQA: query head h reads kv head
h // (nh // n_kv)); key_padding_mask (B, Tk) bool, True = attend.
Causal masking is aligned bottom-right, as in FlashAttention-2: query i sees key j iff j <= i + (Tk - Tq),
so the same call serves training (Tq == Tk), cached prefill and one-token decoding (Tq = 1 sees all keys).
A query row that sees no key at all (a padding row) outputs zeros.

The Triton path has four layers, as in Liger-Kernel and Triton tutorial 06:
  1. kernels   _attn_fwd_kernel (FlashAttention-2 forward), _attn_bwd_preprocess_kernel, _attn_bwd_dkdv_kernel,
               _attn_bwd_dq_kernel (the atomic-free two-kernel backward) in flash_attention.py;
               _attn_decode_split_kernel and _attn_decode_reduce_kernel (flash-decoding for Tq == 1) in
               flash_decoding.py;
  2. launchers attention_forward, attention_backward (flash_attention.py), attention_decode (flash_decoding.py):
               validate limits, pick block sizes;
  3. AttentionFunction, the torch.autograd.Function;
  4. attention(), the functional alias, which takes attention_torch (PyTorch's SDPA; two matmuls for one query
     row) on the CPU and, on purpose, for what the kernels do not cover (head sizes other than 16/32/64/128,
     other dtypes, empty sequences, offsets past int32). attention_reference is the tests' oracle.
This file holds the math (visible_mask, attention_reference), the torch path and layers 3 and 4; the kernels' math
is in flash_attention.py's docstring, flash-decoding's in flash_decoding.py's. The shape checks every path needs
(_validate) and the kernels' limits (_uncovered) live with the launchers that assert them, in flash_attention.py.
"""

import torch
import torch.nn.functional as F

from minillava.kernels.dispatch import use_triton
from minillava.kernels.flash_attention import _uncovered, _validate, attention_backward, attention_forward
from minillava.kernels.flash_decoding import attention_decode


def visible_mask(B, Tq, Tk, causal: bool, key_padding_mask, device) -> torch.Tensor:
    """(1 or B, 1, Tq, Tk) bool: query i may attend key j (causal aligned bottom-right, key padding)."""
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        visible = visible.tril(diagonal=Tk - Tq)  # j <= i + (Tk - Tq)
    visible = visible.view(1, 1, Tq, Tk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.view(B, 1, 1, Tk)  # (B, 1, Tq, Tk)
    return visible


def attention_reference(q, k, v, causal: bool, key_padding_mask=None, scale=None):
    """Plain-torch attention, the tests' oracle: every score kept in fp32, softmax in fp32."""
    B, nh, Tq, hs = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    scale = hs ** -0.5 if scale is None else scale
    if n_kv != nh:  # GQA: each kv head serves nh // n_kv query heads
        k = k.repeat_interleave(nh // n_kv, dim=1)  # (B, nh, Tk, hs)
        v = v.repeat_interleave(nh // n_kv, dim=1)  # (B, nh, Tk, hs)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, nh, Tq, Tk)
    visible = visible_mask(B, Tq, Tk, causal, key_padding_mask, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    return torch.matmul(probs, v.float()).to(q.dtype)  # (B, nh, Tq, hs)


# ----------------------------------------------------------------------------------------------------------
# 3. autograd Function, 4. functional alias
# ----------------------------------------------------------------------------------------------------------

class AttentionFunction(torch.autograd.Function):
    """Triton attention with gradients for q, k, v. Tq == 1 runs the flash-decoding kernels."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, key_padding_mask=None, scale=None):
        if q.shape[2] == 1:
            o, lse = attention_decode(q, k, v, key_padding_mask, scale)  # one query sees every key
        else:
            o, lse = attention_forward(q, k, v, causal, key_padding_mask, scale)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.causal, key_padding_mask, ctx.scale)
        return dq, dk, dv, None, None, None


def attention_torch(q, k, v, causal: bool, key_padding_mask=None, scale=None):
    """The same attention through PyTorch's fused `scaled_dot_product_attention` (one query row: two matmuls, see
    _decode_torch): the path taken off the GPU and for shapes the kernels do not cover. Unlike the reference it
    never keeps an fp32 score matrix for the backward, which makes CPU training several times faster; the tests
    hold it to the reference. Same conventions: causal aligned bottom-right, rows that see no key -> 0."""
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    gqa = k.shape[1] != nh
    if Tq == 1:  # decoding: one query row per head, which sees every key (causal is aligned bottom-right)
        return _decode_torch(q, k, v, key_padding_mask, hs ** -0.5 if scale is None else scale)
    if key_padding_mask is None and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    visible = visible_mask(B, Tq, Tk, causal, key_padding_mask, q.device)
    empty = ~visible.any(-1, keepdim=True)  # (B, 1, Tq, 1) rows that see no key: SDPA would give NaN there
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | empty, scale=scale, enable_gqa=gqa)
    return y.masked_fill(empty, 0.0)  # (B, nh, Tq, hs)


def _decode_torch(q, k, v, key_padding_mask, scale):
    """One query per head against the cache with two batched matrix-vector products. On CPU this is several times
    faster than SDPA's flash kernel, whose blocking is built for many query rows. GQA needs no copy of k and v:
    the G = nh // n_kv query heads that share a kv head become G rows against it. The scores are K q^T: a bf16
    matmul copies the cache's K slice each step (its batch stride is the cache's length, not Tk), and K's rows as
    stored copy faster than K transposed (measured: a 7B bf16 decode step 4% shorter, 1.1B the same)."""
    B, nh, _, hs = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    qg = q.reshape(B, n_kv, nh // n_kv, hs)  # (B, n_kv, G, hs)
    s = torch.matmul(k, qg.transpose(-1, -2)).transpose(-1, -2).float() * scale  # (B, n_kv, G, Tk), softmax in fp32
    if key_padding_mask is None:  # every key visible (e.g. one sequence at its exact length): nothing to mask
        p = torch.softmax(s, dim=-1)
    else:
        s = s.masked_fill(~key_padding_mask.view(B, 1, 1, Tk), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row that sees no key -> 0
    return torch.matmul(p.to(v.dtype), v).view(B, nh, 1, hs)  # (B, nh, 1, hs)


def attention(q, k, v, causal: bool, key_padding_mask=None, scale=None, key_lengths=None):
    """Attention through the Triton kernels when :func:`kernels.dispatch.use_triton` says so (the shape supported:
    head size 16/32/64/128, fp16/bf16/fp32, non-empty sequences); otherwise, on purpose, :func:`attention_torch`.

    key_lengths (B,) int, for one query token: sequence b sees keys [0, key_lengths[b]) (the decode engine's slots
    of a fixed-size cache). The decode kernel then reads no key past a length; elsewhere (and where gradients are
    wanted) it is the same as the key_padding_mask arange(Tk) < key_lengths[:, None]."""
    _validate(q, k, v, key_padding_mask, key_lengths)
    decode = key_lengths is not None and not torch.is_grad_enabled()  # the flash-decoding kernel: no backward
    fused = use_triton("attention_decode" if decode else "attention", q, _uncovered(q, k, v))
    if fused and decode:
        return attention_decode(q, k, v, None, scale, key_lengths=key_lengths)[0]
    if key_lengths is not None:
        key_padding_mask = torch.arange(k.shape[2], device=k.device)[None] < key_lengths[:, None]  # (B, Tk)
    if fused:
        return AttentionFunction.apply(q, k, v, causal, key_padding_mask, scale)
    return attention_torch(q, k, v, causal, key_padding_mask, scale)
