"""Flash-decoding in Triton: one query token (Tq == 1) against a KV cache of Tk keys.

The cache is cut into num_splits chunks along Tk; one program per (batch, kv head, chunk) folds its keys into a
partial (max, sum, acc) with the forward's online softmax (flash_attention.py, log2 domain), for all G query heads
of the kv head at once, so the cache is read once per kv head; a second kernel combines the chunks:
    M = max_s m_s,  L = sum_s 2^(m_s - M) l_s,  o = sum_s 2^(m_s - M) acc_s / L   (0 when nothing was visible)
The partial results live in buffers kept per shape (_DECODE_SCRATCH), so a decode step allocates only its outputs
and replays in a CUDA graph. attention_decode returns the same (out, lse) as attention_forward, so
AttentionFunction's backward works after it.
"""

import torch

from minillava.kernels.dispatch import COMPILE, sm_count, tl, triton
from minillava.kernels.flash_attention import (LOG2E, _CPU_BLOCK, _check, _dot_precision, _last_dim_contiguous,
                                               _online_softmax_step)


# ----------------------------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _attn_decode_split_kernel(
    Q,    # q (B, nh, 1, hs): one new query token per head
    K,    # k cache (B, n_kv, Tk, hs)
    V,    # v cache (B, n_kv, Tk, hs)
    KPM,  # key_padding_mask (B, Tk) bool (dummy unless HAS_MASK)
    LENS,  # key_lengths (B,) int: sequence b sees keys [0, LENS[b]) (dummy unless HAS_LENS)
    M_part, L_part,  # out (B, nh, num_splits) fp32 contiguous: running max (log2 domain) and sum of each split
    Acc_part,        # out (B, nh, num_splits, hs) fp32 contiguous: unnormalised sum_j p_j v_j of each split
    stride_qb, stride_qh,             # q strides of batch, head (the token dim has size 1; head dim stride 1)
    stride_kb, stride_kh, stride_kt,  # k strides of batch, kv head, token
    stride_vb, stride_vh, stride_vt,  # v strides of batch, kv head, token
    stride_mb,  # key_padding_mask batch stride
    n_kv, Tk, G, split_len, num_splits, qk_scale,
    HAS_MASK: tl.constexpr, HAS_LENS: tl.constexpr, HS: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Flash-decoding, step 1. One program: keys [split * split_len, +split_len) of one (batch, kv head),
    for all G query heads of the group at once (rows of a (BLOCK_G, hs) tile, padded to >= 16 for tl.dot),
    so the cache is read once per kv head. The single query is the last token: it sees every key (causal or
    not), so only the padding mask applies. With key lengths (the decode engine's slots), keys past a sequence's
    length are not even read: a split beyond it is empty."""
    pid_bkv = tl.program_id(0)  # b * n_kv + kv_h
    split = tl.program_id(1)
    b = pid_bkv // n_kv
    kv_h = pid_bkv % n_kv
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    h = kv_h * G + offs_g  # (BLOCK_G,) query heads of this kv head
    offs_d = tl.arange(0, HS)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    K += b * stride_kb + kv_h * stride_kh
    V += b * stride_vb + kv_h * stride_vh
    KPM += b * stride_mb

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HS], dtype=tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, Tk)
    if HAS_LENS:
        hi = tl.minimum(hi, tl.load(LENS + b).to(tl.int32))
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < hi
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        if HAS_MASK:
            key_ok = key_ok & (tl.load(KPM + offs_n, mask=key_ok, other=0) != 0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N), log2
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    part = (b * n_kv * G + h) * num_splits + split  # (BLOCK_G,) row of (B, nh, num_splits)
    tl.store(M_part + part, m_i, mask=g_ok)
    tl.store(L_part + part, l_i, mask=g_ok)
    tl.store(Acc_part + part[:, None] * HS + offs_d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _attn_decode_reduce_kernel(
    M_part, L_part, Acc_part,  # (B, nh, num_splits), (B, nh, num_splits), (B, nh, num_splits, hs) fp32
    O,    # out (B, nh, 1, hs), q's dtype
    LSE,  # out (B, nh, 1) fp32 contiguous, as the forward kernel's (for backward)
    stride_ob, stride_oh,  # out strides of batch, head
    nh, num_splits,
    HS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Flash-decoding, step 2. One program per (batch, head): combine the splits' partial softmaxes,
    M = max_s m_s, L = sum_s 2^(m_s - M) l_s, o = sum_s 2^(m_s - M) acc_s / L (0 when nothing was visible)."""
    row = tl.program_id(0)  # b * nh + h
    b = row // nh
    h = row % nh
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HS)
    s_ok = offs_s < num_splits
    m = tl.load(M_part + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
    l = tl.load(L_part + row * num_splits + offs_s, mask=s_ok, other=0.0)  # (BLOCK_S,)
    acc = tl.load(Acc_part + (row * num_splits + offs_s[:, None]) * HS + offs_d[None, :],
                  mask=s_ok[:, None], other=0.0)  # (BLOCK_S, HS)
    m_max = tl.max(m, 0)
    m_base = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: avoid -inf - (-inf)
    w = tl.exp2(m - m_base)  # (BLOCK_S,) 0 for empty splits
    l_tot = tl.sum(w * l, 0)
    l_safe = tl.where(l_tot == 0.0, 1.0, l_tot)
    o = tl.sum(w[:, None] * acc, 0) / l_safe  # (HS,)
    tl.store(O + b * stride_ob + h * stride_oh + offs_d, o.to(O.dtype.element_ty))
    tl.store(LSE + row, tl.where(l_tot == 0.0, float("inf"), m_base + tl.log2(l_safe)))


# ----------------------------------------------------------------------------------------------------------
# 2. Launchers: validate, pick block sizes, launch
# ----------------------------------------------------------------------------------------------------------
_DECODE_SCRATCH = {}  # (device, B, nh, num_splits, hs) -> the split kernel's partial (max, sum, acc) buffers


def _decode_scratch(device, B, nh, num_splits, hs):
    """The partial results' buffers, allocated once per shape and reused by every later call: a decode step
    allocates only its outputs and copies nothing, so it replays in a CUDA graph. Calls are ordered on one
    stream (the generation loop), so reusing the buffers is safe; the reduce kernel reads them before any
    later split kernel can write them."""
    key = (device, B, nh, num_splits, hs)
    if key not in _DECODE_SCRATCH:
        m_part = torch.empty(B, nh, num_splits, device=device, dtype=torch.float32)
        _DECODE_SCRATCH[key] = (m_part, torch.empty_like(m_part),
                                torch.empty(B, nh, num_splits, hs, device=device, dtype=torch.float32))
    return _DECODE_SCRATCH[key]


def _decode_split_len(B, n_kv, Tk, block_n, device):
    """Keys per split (a multiple of block_n). CUDA: enough (batch, kv head, split) programs to fill the GPU
    about twice over; CPU: two blocks per split, so small test caches still exercise the reduce."""
    n_blocks = triton.cdiv(Tk, block_n)
    if device.type != "cuda":
        return 2 * block_n
    n_sm = sm_count(device)
    num_splits = max(1, min(n_blocks, 128, triton.cdiv(2 * n_sm, B * n_kv)))
    return triton.cdiv(n_blocks, num_splits) * block_n


def attention_decode(q, k, v, key_padding_mask=None, scale=None, num_splits=None, key_lengths=None):
    """Flash-decoding for one query token (Tq == 1) against a KV cache of Tk keys (key_lengths (B,): only the
    first key_lengths[b] of them, the rest never read).

    The cache is cut into num_splits chunks along Tk; one program per (batch, kv head, chunk) writes a partial
    (max, sum, acc), a second kernel combines them. Returns out (B, nh, 1, hs) and lse (B, nh, 1) fp32, the
    same as attention_forward (so AttentionFunction's backward works after it). num_splits=None: heuristic.
    """
    _check(q, k, v, key_padding_mask)
    B, nh, Tq, hs = q.shape
    assert Tq == 1, f"attention_decode: one query token per sequence, got Tq={Tq}"
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    n_kv, Tk = k.shape[1], k.shape[2]
    G = nh // n_kv
    scale = hs ** -0.5 if scale is None else scale
    block_n = 64 if q.is_cuda else _CPU_BLOCK
    if num_splits is None:
        split_len = _decode_split_len(B, n_kv, Tk, block_n, q.device)
    else:
        split_len = triton.cdiv(triton.cdiv(Tk, block_n), num_splits) * block_n
    num_splits = triton.cdiv(Tk, split_len)  # every split holds >= 1 key
    kpm = q if key_padding_mask is None else _last_dim_contiguous(key_padding_mask)  # q: a dummy, never read
    lens = q if key_lengths is None else key_lengths.contiguous()
    m_part, l_part, acc_part = _decode_scratch(q.device, B, nh, num_splits, hs)
    _attn_decode_split_kernel[(B * n_kv, num_splits)](
        q, k, v, kpm, lens, m_part, l_part, acc_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        kpm.stride(0), n_kv, Tk, G, split_len, num_splits, scale * LOG2E,
        HAS_MASK=key_padding_mask is not None, HAS_LENS=key_lengths is not None, HS=hs,
        BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q.dtype), num_warps=4, **COMPILE)
    o = torch.empty(B, nh, 1, hs, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, nh, 1, device=q.device, dtype=torch.float32)
    _attn_decode_reduce_kernel[(B * nh,)](
        m_part, l_part, acc_part, o, lse, o.stride(0), o.stride(1), nh, num_splits,
        HS=hs, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4, **COMPILE)
    return o, lse
