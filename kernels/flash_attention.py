"""FlashAttention-2 in Triton: the forward kernel (training and prefill) and the atomic-free two-kernel backward,
their launchers (attention_forward, attention_backward) and autotune configs, and what every attention kernel shares:
the limits they cover (_uncovered, asserted by _check) and the jit helpers that flash_decoding.py reuses. Shapes
and conventions (causal aligned bottom-right, GQA, key padding, a row that sees no key -> 0) are those of
kernels/attention.py, which holds the reference, the torch path, AttentionFunction and the dispatcher.

The math of the kernels, for one (batch, head) and scores in the log2 domain (exp2 is the native instruction):
    s_ij  = (q_i . k_j) * scale * LOG2E,   masked entries -inf
    m_i   = max_j s_ij,  l_i = sum_j 2^(s_ij - m_i)            (online: rescale by 2^(m_old - m_new) per key block)
    o_i   = sum_j 2^(s_ij - m_i) v_j / l_i
    lse_i = m_i + log2(l_i)                                    (saved; +inf for a row that sees no key -> p = 0)
Backward, with p_ij = 2^(s_ij - lse_i) recomputed from the saved lse:
    delta_i = sum_d do_id o_id = sum_j p_ij dp_ij,  dp_ij = do_i . v_j
    ds_ij   = p_ij (dp_ij - delta_i)
    dv_j = sum_i p_ij do_i,   dk_j = scale sum_i ds_ij q_i,   dq_i = scale sum_j ds_ij k_j
For GQA, dk/dv of a kv head also sum over its nh // n_kv query heads (inside one program: no atomics).
"""

import torch

from minillava.kernels.dispatch import COMPILE, tl, triton

LOG2E = 1.4426950408889634  # 1 / ln(2): e^x = 2^(x * LOG2E)
HEAD_SIZES = (16, 32, 64, 128)  # hs must be a power of two >= 16 (tl.dot and tl.arange need it)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_ELEMENTS = 2**31 - 1  # the kernels' pointer offsets are int32 products of program ids and strides


def _validate(q, k, v, key_padding_mask, key_lengths=None):
    """Shape errors that neither path can run; raised before dispatch so both paths fail the same way."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-d (B, heads, T, hs); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, nh, Tq, hs = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != hs or k.shape[1] == 0 or nh % k.shape[1]:
        raise ValueError(f"attention: q {tuple(q.shape)} needs k, v (B, n_kv, Tk, hs) with nh % n_kv == 0; "
                         f"got k {tuple(k.shape)} v {tuple(v.shape)}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (B, k.shape[2])):
        raise ValueError(f"attention: key_padding_mask must be bool (B, Tk) = ({B}, {k.shape[2]}); got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if key_lengths is not None and (key_lengths.dtype not in (torch.int32, torch.int64)
                                    or tuple(key_lengths.shape) != (B,) or Tq != 1 or key_padding_mask is not None):
        raise ValueError(f"attention: key_lengths is an int (B,) = ({B},) tensor for one query token (Tq == 1) and "
                         f"no key_padding_mask; got {key_lengths.dtype} {tuple(key_lengths.shape)}, Tq = {Tq}")


def _uncovered(q, k, v) -> str | None:
    """Why the kernels do not cover these inputs (None: they do); attention() sends those to attention_torch on
    purpose (never wrong numbers): the kernels take head sizes in HEAD_SIZES, one 16-bit or fp32 dtype, non-empty
    sequences and tensors small enough for int32 offsets."""
    if q.shape[-1] not in HEAD_SIZES:
        return f"head size {q.shape[-1]}, not one of {HEAD_SIZES}"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: not one of fp16, bf16, fp32 for all three"
    if q.shape[2] < 1 or k.shape[2] < 1:
        return "an empty sequence"
    if any(sum((n - 1) * st for n, st in zip(x.shape, x.stride())) > MAX_ELEMENTS for x in (q, k, v)):
        return "offsets past int32"
    return None


def _kernel_supports(q, k, v) -> bool:
    return _uncovered(q, k, v) is None


# ----------------------------------------------------------------------------------------------------------
# 1. Triton kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _visible(offs_m, offs_n, Tq, Tk, KPM, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
             TRANSPOSED: tl.constexpr):
    """Bool tile, (BLOCK_M, BLOCK_N) or TRANSPOSED (BLOCK_N, BLOCK_M): query row offs_m may attend key offs_n
    (bounds, causal, padding)."""
    m = offs_m[None, :] if TRANSPOSED else offs_m[:, None]
    n = offs_n[:, None] if TRANSPOSED else offs_n[None, :]
    vis = (m < Tq) & (n < Tk)
    if CAUSAL:
        vis = vis & (n <= m + (Tk - Tq))  # bottom-right aligned diagonal
    if HAS_MASK:
        keep = tl.load(KPM + n, mask=n < Tk, other=0)  # key_padding_mask row of this batch, as a row or column
        vis = vis & (keep != 0)
    return vis


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one key block into the running (max m_i, sum l_i, acc), all fp32, s in the log2 domain.

    s (M, N) scores with -inf where masked; v (N, hs). A row that has seen no visible key yet has
    m = -inf; its exponent base is taken as 0 so that no -inf - (-inf) = nan appears (p and alpha are 0).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))  # (M,)
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_base[:, None])  # (M, N) fp32, in [0, 1]
    alpha = tl.exp2(m_i - m_base)  # (M,) rescales what was accumulated under the old max
    l_i = l_i * alpha + tl.sum(p, 1)
    # p is rounded to v's dtype (fp16/bf16) for the tensor-core matmul, as FlashAttention does; sums stay fp32
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # (M, hs)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_inner(
    m_i, l_i, acc, q,
    K,  # pointer to k[b, kv_head, 0, 0]
    V,  # pointer to v[b, kv_head, 0, 0]
    KPM,  # pointer to key_padding_mask[b, 0] (unused unless HAS_MASK)
    stride_kt, stride_vt,  # token strides of k and v (head dim is contiguous)
    offs_m, lo, hi, Tq, Tk, qk_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
    HS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Key blocks [lo, hi). MASKED=False: blocks fully inside Tk and fully visible to every row of the query
    block (no bounds or causal checks, only the padding mask); MASKED=True: the diagonal / ragged-end blocks."""
    offs_d = tl.arange(0, HS)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, HS)
        v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, HS)
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, log2
        if MASKED:
            s = tl.where(_visible(offs_m, offs_n, Tq, Tk, KPM, CAUSAL, HAS_MASK, False), s, float("-inf"))
        elif HAS_MASK:
            keep = tl.load(KPM + offs_n)  # (BLOCK_N,)
            s = tl.where(keep[None, :] != 0, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    Q,    # q (B, nh, Tq, hs), any dtype of DTYPES
    K,    # k (B, n_kv, Tk, hs)
    V,    # v (B, n_kv, Tk, hs)
    KPM,  # key_padding_mask (B, Tk) bool, True = attend (a dummy pointer when HAS_MASK is False)
    O,    # out (B, nh, Tq, hs), q's dtype
    LSE,  # out (B, nh, Tq) fp32 contiguous: logsumexp of the log2-domain scores, saved for backward
    stride_qb, stride_qh, stride_qt,  # q strides of batch, head, token (head dim stride is 1)
    stride_kb, stride_kh, stride_kt,  # k strides of batch, kv head, token
    stride_vb, stride_vh, stride_vt,  # v strides of batch, kv head, token
    stride_ob, stride_oh, stride_ot,  # out strides of batch, head, token
    stride_mb,  # key_padding_mask batch stride (token stride 1)
    nh, Tq, Tk,
    G,  # query heads per kv head, nh // n_kv
    qk_scale,  # scale * LOG2E
    T_BUCKET,  # _t_bucket(Tq, Tk): only keys the autotuner
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head) against all the keys they can see."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)  # b * nh + h
    b = pid_bh // nh
    h = pid_bh % nh
    kv_h = h // G  # GQA
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HS)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=offs_m[:, None] < Tq, other=0.0)  # (BLOCK_M, HS), stays in registers
    K += b * stride_kb + kv_h * stride_kh
    V += b * stride_vb + kv_h * stride_vh
    KPM += b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HS], dtype=tl.float32)  # fp32 accumulator of p @ v

    # keys [0, full_hi) are visible to every row of this block; [full_hi, hi) need the per-element mask
    if CAUSAL:
        full_hi = tl.minimum(Tk, tl.maximum(start_m + (Tk - Tq) + 1, 0))  # row start_m sees j < this
        hi = tl.minimum(Tk, tl.maximum(start_m + BLOCK_M + (Tk - Tq), 0))  # last row sees j < this
    else:
        full_hi = Tk
        hi = Tk
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    m_i, l_i, acc = _attn_fwd_inner(m_i, l_i, acc, q, K, V, KPM, stride_kt, stride_vt, offs_m, 0, full_hi,
                                    Tq, Tk, qk_scale, CAUSAL, HAS_MASK, False, HS, BLOCK_N, DOT_PRECISION)
    m_i, l_i, acc = _attn_fwd_inner(m_i, l_i, acc, q, K, V, KPM, stride_kt, stride_vt, offs_m, full_hi, hi,
                                    Tq, Tk, qk_scale, CAUSAL, HAS_MASK, True, HS, BLOCK_N, DOT_PRECISION)

    # a row that saw no key has l = 0: output 0 and lse = +inf so that backward's p = 2^(s - lse) is 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]  # (BLOCK_M, HS)
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))  # (BLOCK_M,)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=offs_m[:, None] < Tq)
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O,      # out (B, nh, Tq, hs) of the forward
    DO,     # grad of out (B, nh, Tq, hs)
    Delta,  # out (B, nh, Tq) fp32 contiguous: delta_i = sum_d do_id * o_id
    stride_ob, stride_oh, stride_ot,     # out strides of batch, head, token
    stride_dob, stride_doh, stride_dot,  # grad-out strides of batch, head, token
    nh, Tq,
    HS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = pid_bh // nh
    h = pid_bh % nh
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HS)
    row_ok = offs_m[:, None] < Tq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,) fp32
    tl.store(Delta + pid_bh * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # q (B, nh, Tq, hs); k, v (B, n_kv, Tk, hs)
    KPM,      # key_padding_mask (B, Tk) bool (dummy unless HAS_MASK)
    DO,       # grad of out (B, nh, Tq, hs)
    LSE,      # (B, nh, Tq) fp32 contiguous, from the forward
    Delta,    # (B, nh, Tq) fp32 contiguous, from the preprocess kernel
    DK, DV,   # out: grads of k, v (B, n_kv, Tk, hs)
    stride_qb, stride_qh, stride_qt,     # q strides of batch, head, token (head dim stride is 1, as below)
    stride_kb, stride_kh, stride_kt,     # k strides of batch, kv head, token
    stride_vb, stride_vh, stride_vt,     # v strides of batch, kv head, token
    stride_dob, stride_doh, stride_dot,  # grad-out strides of batch, head, token
    stride_dkb, stride_dkh, stride_dkt,  # dk strides of batch, kv head, token
    stride_dvb, stride_dvh, stride_dvt,  # dv strides of batch, kv head, token
    stride_mb,  # key_padding_mask batch stride
    nh, n_kv, Tq, Tk, G, qk_scale, scale, T_BUCKET,  # T_BUCKET only keys the autotuner
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dk, dv of BLOCK_N keys of one (batch, kv head), looping over the G query heads that read
    this kv head and over the query blocks that can see these keys. Every block is masked (bounds, causal,
    padding): simpler than the forward's split, and the five matmuls per block dominate the cost."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bkv = tl.program_id(1)  # b * n_kv + kv_h
    b = pid_bkv // n_kv
    kv_h = pid_bkv % n_kv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HS)
    col_ok = offs_n[:, None] < Tk
    k = tl.load(K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok, other=0.0)  # (BLOCK_N, HS)
    v = tl.load(V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok, other=0.0)  # (BLOCK_N, HS)
    KPM += b * stride_mb
    dk = tl.zeros([BLOCK_N, HS], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HS], dtype=tl.float32)

    lo = 0
    if CAUSAL:  # query i sees key j iff i >= j - (Tk - Tq): earlier query blocks see none of these keys
        lo = (tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M) * BLOCK_M
    for g in range(G):
        h = kv_h * G + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        row0 = (b * nh + h) * Tq  # offset of this head's rows in LSE and Delta
        for start_m in range(lo, Tq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < Tq
            # q comes in transposed, (HS, BLOCK_M): the scores are computed as k @ q^T, so p^T and ds^T leave
            # their matmuls in the layout that dv += p^T @ do and dk += ds^T @ q take (FlashAttention-2's loop)
            qT = tl.load(Qh + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
            do = tl.load(DOh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + row0 + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
            delta = tl.load(Delta + row0 + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
            sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 domain
            pT = tl.exp2(sT - lse[None, :])  # softmax probabilities recomputed from the saved lse
            pT = tl.where(_visible(offs_m, offs_n, Tq, Tk, KPM, CAUSAL, HAS_MASK, True), pT, 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # (BLOCK_N, HS)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            dsT = pT * (dpT - delta[None, :])  # fp32, grad of the unscaled scores
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)  # (BLOCK_N, HS)
    dk = dk * scale  # s = scale * q.k, so dk = scale * ds^T q
    tl.store(DK + b * stride_dkb + kv_h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + b * stride_dvb + kv_h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,
    K, V,  # pointers to k[b, kv_head, 0, 0], v[b, kv_head, 0, 0]
    KPM,   # pointer to key_padding_mask[b, 0] (unused unless HAS_MASK)
    stride_kt, stride_vt,  # token strides of k and v
    offs_m, lo, hi, Tq, Tk, qk_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
    HS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Key blocks [lo, hi) of one query block; the MASKED split is the same as in _attn_fwd_inner."""
    offs_d = tl.arange(0, HS)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]  # (BLOCK_N, HS)
        v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, HS)
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < Tk, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, offs_n, Tq, Tk, KPM, CAUSAL, HAS_MASK, False), p, 0.0)
        elif HAS_MASK:
            keep = tl.load(KPM + offs_n)  # (BLOCK_N,)
            p = tl.where(keep[None, :] != 0, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # (BLOCK_M, HS)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V,  # q (B, nh, Tq, hs); k, v (B, n_kv, Tk, hs)
    KPM,      # key_padding_mask (B, Tk) bool (dummy unless HAS_MASK)
    DO,       # grad of out (B, nh, Tq, hs)
    LSE,      # (B, nh, Tq) fp32 contiguous, from the forward
    Delta,    # (B, nh, Tq) fp32 contiguous, from the preprocess kernel
    DQ,       # out: grad of q (B, nh, Tq, hs)
    stride_qb, stride_qh, stride_qt,     # q strides of batch, head, token (head dim stride is 1, as below)
    stride_kb, stride_kh, stride_kt,     # k strides of batch, kv head, token
    stride_vb, stride_vh, stride_vt,     # v strides of batch, kv head, token
    stride_dob, stride_doh, stride_dot,  # grad-out strides of batch, head, token
    stride_dqb, stride_dqh, stride_dqt,  # dq strides of batch, head, token
    stride_mb,  # key_padding_mask batch stride
    nh, Tq, Tk, G, qk_scale, scale, T_BUCKET,  # T_BUCKET only keys the autotuner
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dq of BLOCK_M query rows of one (batch, head); same key-block walk as the forward."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)  # b * nh + h
    b = pid_bh // nh
    h = pid_bh % nh
    kv_h = h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HS)
    row_ok = offs_m < Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HS)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HS)
    lse = tl.load(LSE + pid_bh * Tq + offs_m, mask=row_ok, other=float("inf"))  # (BLOCK_M,)
    delta = tl.load(Delta + pid_bh * Tq + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
    K += b * stride_kb + kv_h * stride_kh
    V += b * stride_vb + kv_h * stride_vh
    KPM += b * stride_mb
    dq = tl.zeros([BLOCK_M, HS], dtype=tl.float32)

    if CAUSAL:
        full_hi = tl.minimum(Tk, tl.maximum(start_m + (Tk - Tq) + 1, 0))
        hi = tl.minimum(Tk, tl.maximum(start_m + BLOCK_M + (Tk - Tq), 0))
    else:
        full_hi = Tk
        hi = Tk
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, KPM, stride_kt, stride_vt, offs_m, 0, full_hi,
                            Tq, Tk, qk_scale, CAUSAL, HAS_MASK, False, HS, BLOCK_N, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K, V, KPM, stride_kt, stride_vt, offs_m, full_hi, hi,
                            Tq, Tk, qk_scale, CAUSAL, HAS_MASK, True, HS, BLOCK_N, DOT_PRECISION)
    dq = dq * scale  # s = scale * q.k, so dq = scale * ds k
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------
# 2. Launchers: validate, pick block sizes, launch
# ----------------------------------------------------------------------------------------------------------
# On CUDA the three big kernels are autotuned over a few configs, keyed on what changes the best one: head size,
# causal, mask, and the sequence length in coarse buckets (short prompts favour small query blocks and more
# programs, long ones big tiles), so a new prompt length re-tunes only when it crosses a power of two (>= 256).
# Configs that spill registers at a head size (ptxas for sm_90a, measured on CPU: benchmarks/ptxas_spills.py)
# are pruned before tuning. Without CUDA (TRITON_INTERPRET=1) one fixed small config runs, small enough that
# tiny test shapes still span several blocks (ragged last blocks, multi-block online softmax).
_CPU_BLOCK = 16
_TUNE_KEY = ["HS", "CAUSAL", "HAS_MASK", "T_BUCKET"]


def _t_bucket(Tq: int, Tk: int) -> int:
    return min(max(triton.next_power_of_2(max(Tq, Tk)), 256), 16384)


def _configs(pairs):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs]


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; SPILLS[kernel][head size]: the ones ptxas spills there
# (bf16, sm_90a, triton 3.9, measured 2026-12-01 for LLaVA's head sizes: CLIP 64, Vicuna 128; RESULTS.md)
CONFIGS = {"fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                   (128, 32, 8, 3), (64, 64, 8, 3)],
           "dkdv": [(32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (16, 64, 4, 4),
                    (32, 64, 8, 3), (32, 32, 4, 3), (64, 32, 4, 3)],
           "dq": [(64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 8, 3), (32, 64, 4, 3),
                  (32, 32, 4, 3)]}
SPILLS = {"fwd": {64: [(128, 64, 4, 3)], 128: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]},
          "dkdv": {64: [(32, 128, 4, 3)],
                   128: [(32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (16, 64, 4, 4)]},
          "dq": {64: [(128, 32, 4, 3)], 128: [(64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)]}}


def _no_spills(kernel: str):
    """An autotuner early_config_prune: drop the configs that spill at this head size (all of them never)."""
    def prune(configs, named_args, **kwargs):
        bad = SPILLS[kernel].get(kwargs.get("HS", named_args.get("HS")), [])
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                not in bad]
        return kept or configs
    return prune


def _tuned(name, kernel):
    return triton.autotune(_configs(CONFIGS[name]), key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": _no_spills(name)})(kernel)


_attn_fwd_tuned = _tuned("fwd", _attn_fwd_kernel)
_attn_bwd_dkdv_tuned = _tuned("dkdv", _attn_bwd_dkdv_kernel)
_attn_bwd_dq_tuned = _tuned("dq", _attn_bwd_dq_kernel)


# fp32 on CUDA: one small config, not the autotuner. Exact fp32 dots ("ieee") cannot use tensor cores; their
# big tiles took ptxas minutes each (one: 14 min, 139 KB of register spills per thread), and autotuning
# compiles every candidate. fp32 is for checking, not for speed.
_FP32_CUDA = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)


def _launch(kernel, tuned, grid_fn, x, args, **constexprs):
    """Autotuned kernel on CUDA for 16-bit inputs, one fixed config for fp32 on CUDA and in the interpreter.
    grid_fn(BLOCK_M, BLOCK_N) -> grid."""
    if x.is_cuda and x.dtype != torch.float32:
        tuned[lambda meta: grid_fn(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs, **COMPILE)
    elif x.is_cuda:
        kernel[grid_fn(_FP32_CUDA["BLOCK_M"], _FP32_CUDA["BLOCK_N"])](*args, **constexprs, **_FP32_CUDA, **COMPILE)
    else:
        kernel[grid_fn(_CPU_BLOCK, _CPU_BLOCK)](*args, **constexprs, BLOCK_M=_CPU_BLOCK, BLOCK_N=_CPU_BLOCK,
                                                **COMPILE)


def _dot_precision(dtype):
    # fp32 inputs: exact fp32 products ("ieee"), not TF32 (10-bit mantissa), so fp32 matches the reference
    # to ~1e-6. fp16/bf16 inputs run on tensor cores whatever this says.
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q, k, v, key_padding_mask):
    """The launchers' guard, for direct callers (attention() routes what the kernels do not cover elsewhere):
    the shapes every path needs (_validate), then the kernels' own limits (_kernel_supports)."""
    _validate(q, k, v, key_padding_mask)
    assert _kernel_supports(q, k, v), (
        f"attention kernel: head size {q.shape[-1]}, dtypes {q.dtype} {k.dtype} {v.dtype}, q {tuple(q.shape)} k "
        f"{tuple(k.shape)}: needs a head size in {HEAD_SIZES}, one dtype of {DTYPES}, non-empty sequences and "
        "int32 offsets (attention() takes the torch path for the rest)")


def attention_forward(q, k, v, causal: bool, key_padding_mask=None, scale=None):
    """FlashAttention-2 forward. Returns out (B, nh, Tq, hs) and lse (B, nh, Tq) fp32 (log2 domain)."""
    _check(q, k, v, key_padding_mask)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    B, nh, Tq, hs = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    scale = hs ** -0.5 if scale is None else scale
    kpm = q if key_padding_mask is None else _last_dim_contiguous(key_padding_mask)  # q: a dummy, never read
    o = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, nh, Tq, hs)
    lse = torch.empty(B, nh, Tq, device=q.device, dtype=torch.float32)
    args = (q, k, v, kpm, o, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            kpm.stride(0), nh, Tq, Tk, nh // n_kv, scale * LOG2E, _t_bucket(Tq, Tk))
    _launch(_attn_fwd_kernel, _attn_fwd_tuned, lambda bm, bn: (triton.cdiv(Tq, bm), B * nh), q, args,
            CAUSAL=causal, HAS_MASK=key_padding_mask is not None, HS=hs, DOT_PRECISION=_dot_precision(q.dtype))
    return o, lse


def attention_backward(do, q, k, v, o, lse, causal: bool, key_padding_mask=None, scale=None):
    """Backward from the saved (o, lse): preprocess delta, then dk/dv and dq kernels (no atomics).
    Returns dq (B, nh, Tq, hs), dk, dv (B, n_kv, Tk, hs) in the inputs' dtype."""
    q, k, v, o, do = (_last_dim_contiguous(x) for x in (q, k, v, o, do))
    B, nh, Tq, hs = q.shape
    n_kv, Tk = k.shape[1], k.shape[2]
    G = nh // n_kv
    scale = hs ** -0.5 if scale is None else scale
    kpm = q if key_padding_mask is None else _last_dim_contiguous(key_padding_mask)  # q: a dummy, never read
    block_m = 64 if q.is_cuda else _CPU_BLOCK
    delta = torch.empty_like(lse)  # (B, nh, Tq) fp32
    _attn_bwd_preprocess_kernel[(triton.cdiv(Tq, block_m), B * nh)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        nh, Tq, HS=hs, BLOCK_M=block_m, **COMPILE)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    constexprs = dict(CAUSAL=causal, HAS_MASK=key_padding_mask is not None, HS=hs,
                      DOT_PRECISION=_dot_precision(q.dtype))
    strides_in = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    _launch(_attn_bwd_dkdv_kernel, _attn_bwd_dkdv_tuned, lambda bm, bn: (triton.cdiv(Tk, bn), B * n_kv), q,
            (q, k, v, kpm, do, lse, delta, dk, dv, *strides_in,
             dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
             kpm.stride(0), nh, n_kv, Tq, Tk, G, scale * LOG2E, scale, _t_bucket(Tq, Tk)), **constexprs)
    _launch(_attn_bwd_dq_kernel, _attn_bwd_dq_tuned, lambda bm, bn: (triton.cdiv(Tq, bm), B * nh), q,
            (q, k, v, kpm, do, lse, delta, dq, *strides_in, dq.stride(0), dq.stride(1), dq.stride(2),
             kpm.stride(0), nh, Tq, Tk, G, scale * LOG2E, scale, _t_bucket(Tq, Tk)), **constexprs)
    return dq, dk, dv
