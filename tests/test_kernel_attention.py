"""Triton attention (kernels/flash_attention.py, flash_decoding.py) against attention_reference: output and dq/dk/dv.

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1): shapes are tiny but
odd, so that every case spans ragged blocks of the interpreter's 16x16 tiles. GPU-only tests at the end run
bf16 and larger shapes; they need CUDA and TRITON_INTERPRET=0.
"""
import os

import pytest
import torch

from minillava.kernels.attention import (AttentionFunction, attention, attention_decode, attention_reference,
                                         attention_torch)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# CPU tensors reach Triton only through the interpreter; with TRITON_INTERPRET=0 (the GPU run) these tests skip
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1")

# the modules themselves, for their kernels and launchers
import minillava.kernels.attention as A
import minillava.kernels.flash_attention as FA
import minillava.kernels.flash_decoding as FD

# Tightest per-dtype tolerances that pass (atol, rtol). fp32: the kernels accumulate in fp32 like the reference,
# only the summation order differs. fp16: the output/gradients are rounded to fp16 (ulp 1e-3 near 1) and the
# kernel rounds p and ds to fp16 before the tensor-core matmuls, as FlashAttention does.
TOL = {
    torch.float32: dict(out=(1e-5, 1e-5), grad=(1e-5, 1e-5)),
    torch.float16: dict(out=(2e-3, 2e-3), grad=(4e-3, 4e-3)),
}

# (B, nh, n_kv, Tq, Tk, hs, causal, mask)
CASES = [
    (1, 2, 2, 37, 37, 16, True, None),      # odd length, 3 ragged blocks, causal
    (1, 2, 2, 37, 37, 32, False, None),     # bidirectional
    (2, 2, 2, 5, 23, 16, True, None),       # cached prefill, Tq < Tk: bottom-right diagonal
    (1, 2, 2, 23, 5, 16, True, None),       # Tq > Tk: the first 18 rows see no key -> zeros
    (1, 2, 2, 9, 1, 16, False, None),       # Tk = 1
    (1, 4, 2, 19, 19, 16, True, None),      # GQA, 2 query heads per kv head
    (1, 4, 1, 19, 19, 32, False, None),     # GQA, one kv head (MQA)
    (2, 2, 1, 21, 21, 16, True, "left"),    # left padding + causal: padded query rows see nothing
    (2, 2, 2, 18, 18, 16, False, "left"),   # left padding, bidirectional
    (1, 2, 2, 33, 33, 16, False, "random"),  # holes anywhere
    (1, 2, 2, 32, 32, 64, True, None),      # block-aligned: the unmasked fast path of fwd and dq
    (2, 2, 2, 7, 40, 64, True, "left"),     # prefill against a left-padded cache, hs 64
    (1, 4, 2, 21, 21, 64, False, "random"),  # hs 64 bidirectional, GQA with holes
    (2, 2, 1, 19, 19, 128, True, "left"),   # hs 128 (LLaMA-7B), MQA, padded batch
    (1, 2, 2, 17, 17, 128, False, None),    # hs 128 bidirectional, one row past a block
]


def _inputs(B, nh, n_kv, Tq, Tk, hs, dtype, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g).to(dtype).requires_grad_()
               for s in [(B, nh, Tq, hs), (B, n_kv, Tk, hs), (B, n_kv, Tk, hs)])
    do = torch.randn(B, nh, Tq, hs, generator=g).to(dtype)
    kpm = None
    if mask == "left":  # batch 0 keeps only its last 3 keys (whole padded 16-key blocks), batch 1 no padding
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        kpm[0, : max(Tk - 3, 0)] = False
    elif mask == "random":
        kpm = torch.rand(B, Tk, generator=g) > 0.3
    return q, k, v, do, kpm


def _assert_close(actual, expected, atol_rtol, what):
    atol, rtol = atol_rtol
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check_against_reference(q, k, v, do, causal, kpm, dtype, fn):
    out = fn(q, k, v, causal, kpm)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = attention_reference(q, k, v, causal, kpm)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    assert out.dtype == dtype and out.shape == ref.shape
    _assert_close(out, ref, TOL[dtype]["out"], "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape, name
        _assert_close(g, r, TOL[dtype]["grad"], name)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, nh, n_kv, Tq, Tk, hs, causal, mask", CASES)
def test_forward_backward_matches_reference(B, nh, n_kv, Tq, Tk, hs, causal, mask, dtype):
    q, k, v, do, kpm = _inputs(B, nh, n_kv, Tq, Tk, hs, dtype, mask)
    _check_against_reference(q, k, v, do, causal, kpm, dtype,
                             lambda q, k, v, c, m: AttentionFunction.apply(q, k, v, c, m, None))


@pytest.mark.parametrize("B, nh, n_kv, Tq, Tk, hs, causal, mask", CASES + [(2, 4, 2, 1, 30, 24, True, "left"),
                                                                 (1, 4, 1, 1, 17, 16, True, None),
                                                                 (2, 2, 2, 1, 9, 16, False, "random")])
def test_torch_path_matches_reference(B, nh, n_kv, Tq, Tk, hs, causal, mask):
    """attention_torch (PyTorch's SDPA, the CPU path) keeps the reference's conventions: bottom-right causal,
    GQA, key padding, rows that see no key -> 0; the extra cases are one decode row (its own matmul path): at an
    unsupported head size with left padding, with MQA, and with holes in the cache."""
    q, k, v, do, kpm = _inputs(B, nh, n_kv, Tq, Tk, hs, torch.float32, mask)
    _check_against_reference(q, k, v, do, causal, kpm, torch.float32, attention_torch)


@interpreter_only
def test_scale_argument():
    q, k, v, do, _ = _inputs(1, 2, 2, 20, 20, 16, torch.float32, None)
    out = AttentionFunction.apply(q, k, v, True, None, 0.3)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    ref = attention_reference(q, k, v, True, None, 0.3)
    rdq, rdk, rdv = torch.autograd.grad(ref, (q, k, v), do)
    for a, b in [(out, ref), (dq, rdq), (dk, rdk), (dv, rdv)]:
        _assert_close(a, b, TOL[torch.float32]["grad"], "scale=0.3")


@interpreter_only
def test_fully_masked_rows_are_zero_with_finite_gradients():
    # batch 0: every key padded; batch 1: keys 0..9 padded, so causal rows 0..9 see nothing
    q, k, v, do, _ = _inputs(2, 2, 2, 20, 20, 16, torch.float32, None)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0] = False
    kpm[1, :10] = False
    out = AttentionFunction.apply(q, k, v, True, kpm, None)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert (out[0] == 0).all() and (out[1, :, :10] == 0).all()
    assert (out[1, :, 10:].abs().sum(-1) > 0).all()
    assert (dq[0] == 0).all() and (dq[1, :, :10] == 0).all()
    assert (dk[0] == 0).all() and (dv[0] == 0).all() and (dk[1, :, :10] == 0).all()
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()


# ---- decode (Tq == 1): flash-decoding split + reduce ----

DECODE_CASES = [
    # (B, nh, n_kv, Tk, hs, mask, num_splits)
    (2, 2, 2, 1, 16, None, None),      # a one-key cache
    (1, 2, 2, 16, 32, None, None),     # exactly one block
    (2, 4, 2, 37, 16, "left", None),   # ragged last block, GQA, batch 0 keeps 3 keys: empty splits
    (1, 4, 1, 100, 64, None, 3),       # MQA, 3 splits of 48 keys (last one ragged)
    (2, 2, 2, 100, 16, "random", 1),   # a single split: the reduce is a no-op
    (1, 2, 2, 70, 16, "left", 70),     # more splits asked than blocks: capped at one block per split
    (2, 8, 2, 45, 128, "left", None),  # hs 128, 4 query heads per kv head
    (1, 4, 4, 33, 64, "random", None),  # hs 64, no GQA
]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, nh, n_kv, Tk, hs, mask, num_splits", DECODE_CASES)
def test_decode_matches_reference(B, nh, n_kv, Tk, hs, mask, num_splits, dtype):
    q, k, v, _, kpm = _inputs(B, nh, n_kv, 1, Tk, hs, dtype, mask)
    with torch.no_grad():
        out, lse = attention_decode(q, k, v, kpm, num_splits=num_splits)
        ref = attention_reference(q, k, v, True, kpm)
        _assert_close(out, ref, TOL[dtype]["out"], "decode out")
        # the lse (log2 domain) is what backward consumes: check it too, against the forward kernel's
        _, lse_fwd = A.attention_forward(q, k, v, False, kpm)
    torch.testing.assert_close(lse, lse_fwd, atol=1e-5, rtol=1e-5)


@interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_with_key_lengths_never_reads_past_them(monkeypatch, num_splits):
    """The decode engine's slots: each sequence sees its first key_lengths[b] keys of a fixed-size cache. Keys past
    a length are NaN here, so reading one would show; the result equals the reference under the same mask."""
    q, k, v, _, _ = _inputs(3, 4, 2, 1, 70, 16, torch.float32, None)
    lengths = torch.tensor([1, 37, 70])
    visible = torch.arange(70)[None] < lengths[:, None]  # (B, Tk)
    ref = attention_reference(q, k, v, True, visible)
    hidden = ~visible[:, None, :, None]  # (B, 1, Tk, 1)
    k, v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
    with torch.no_grad():
        out, _ = attention_decode(q, k, v, num_splits=num_splits, key_lengths=lengths)
        _assert_close(out, ref, TOL[torch.float32]["out"], "decode with lengths")
        monkeypatch.setenv("MINILLAVA_KERNELS", "force")  # attention() hands the lengths to the kernel
        _assert_close(attention(q, k, v, True, key_lengths=lengths), ref, TOL[torch.float32]["out"], "dispatch")
    monkeypatch.setenv("MINILLAVA_KERNELS", "0")  # the torch path: the same as the mask (NaN keys excluded)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    _assert_close(attention(q, k, v, True, key_lengths=lengths), ref, TOL[torch.float32]["out"], "torch path")
    with pytest.raises(ValueError, match="key_lengths"):
        attention(q, k, v, True, visible, key_lengths=lengths)  # one or the other


@interpreter_only
def test_decode_fully_masked_cache_outputs_zero():
    q, k, v, _, _ = _inputs(2, 2, 2, 1, 40, 16, torch.float32, None)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[1] = False
    with torch.no_grad():
        out, lse = attention_decode(q, k, v, kpm, num_splits=2)
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all() and (out[0].abs().sum(-1) > 0).all()


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("hs", [16, 128])
def test_decode_backward_matches_reference(dtype, hs):
    # AttentionFunction routes Tq == 1 through the decode kernels; backward uses their lse
    q, k, v, do, kpm = _inputs(2, 4, 2, 1, 37, hs, dtype, "left")
    _check_against_reference(q, k, v, do, True, kpm, dtype,
                             lambda q, k, v, c, m: AttentionFunction.apply(q, k, v, c, m, None))


# ---- dispatch, layouts, errors ----

@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the two forward launchers, which only the Triton path reaches."""
    calls = []
    for name in ("attention_forward", "attention_decode"):
        fn = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _fn=fn, _name=name, **kw: (calls.append(_name), _fn(*a, **kw))[1])
    return calls


@interpreter_only
def test_attention_dispatch(monkeypatch, spy):
    q, k, v, _, kpm = _inputs(1, 2, 2, 9, 9, 16, torch.float32, "left")
    ref = attention_reference(q, k, v, True, kpm)
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")
    _assert_close(attention(q, k, v, True, kpm), ref, TOL[torch.float32]["out"], "force")
    attention(q[:, :, -1:], k, v, True, kpm)
    assert spy == ["attention_forward", "attention_decode"]  # Tq == 1 -> flash-decoding
    spy.clear()
    monkeypatch.setenv("MINILLAVA_KERNELS", "1")  # default: Triton only for CUDA tensors
    assert torch.equal(attention(q, k, v, True, kpm), attention_torch(q, k, v, True, kpm))
    monkeypatch.setenv("MINILLAVA_KERNELS", "0")
    assert torch.equal(attention(q, k, v, True, kpm), attention_torch(q, k, v, True, kpm))
    assert spy == []


def test_unsupported_head_size_falls_back_to_torch(monkeypatch, spy):
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")
    q, k, v, _, _ = _inputs(1, 2, 2, 5, 5, 24, torch.float32, None)
    assert torch.equal(attention(q, k, v, True), attention_torch(q, k, v, True))
    assert spy == []
    with pytest.raises(AssertionError, match="head size 24"):
        A.attention_forward(q, k, v, True)


@interpreter_only
def test_non_contiguous_inputs(monkeypatch):
    # the model's layout: (B, T, nh, hs) projections viewed as (B, nh, T, hs) without a copy
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")
    g = torch.Generator().manual_seed(1)
    B, T, nh, n_kv, hs = 1, 19, 4, 2, 16
    qkv = torch.randn(B, T, nh + 2 * n_kv, hs, generator=g, requires_grad=True)
    q, k, v = qkv.split([nh, n_kv, n_kv], dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hs), strided
    do = torch.randn(B, nh, T, hs, generator=g).transpose(2, 3).contiguous().transpose(2, 3)  # head dim strided
    out = attention(q, k, v, True)
    (grad,) = torch.autograd.grad(out, qkv, do)
    ref = attention_reference(q, k, v, True)
    (ref_grad,) = torch.autograd.grad(ref, qkv, do)
    _assert_close(out, ref, TOL[torch.float32]["out"], "out")
    _assert_close(grad, ref_grad, TOL[torch.float32]["grad"], "dqkv")


def test_bad_shapes_raise():
    q = torch.randn(1, 3, 4, 16)
    k = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="nh % n_kv"):
        attention(q, k, k, True)
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, k, True, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, k, True, torch.ones(1, 4, dtype=torch.int64))


# ---- GPU only: compiled kernels, bf16, autotuned configs, realistic lengths ----

cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                          reason="needs CUDA and compiled Triton (run with TRITON_INTERPRET=0)")
# relative to the largest reference value: bf16 has an 8-bit mantissa (2^-8 = 4e-3), fp16 11 bits
GPU_REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("B, nh, n_kv, Tq, Tk, hs, causal, mask", [
    (2, 16, 16, 577, 577, 64, False, None),   # ViT-L/14-336
    (2, 8, 8, 1000, 1000, 128, True, "left"),  # padded LM batch
    (1, 8, 2, 300, 1100, 128, True, None),     # cached prefill, GQA
    (1, 4, 4, 513, 513, 32, True, "random"),
])
def test_gpu_matches_reference(B, nh, n_kv, Tq, Tk, hs, causal, mask, dtype):
    q, k, v, do, kpm = (x.cuda() if x is not None else None
                        for x in _inputs(B, nh, n_kv, Tq, Tk, hs, torch.float32, mask))
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = AttentionFunction.apply(q, k, v, causal, kpm, None)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))  # fp32 oracle, same inputs
    ref = attention_reference(q32, k32, v32, causal, kpm)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(a).all(), name
        assert _rel_err(a, b) < GPU_REL_TOL[dtype], f"{name}: rel err {_rel_err(a, b):.2e}"


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("Tk", [1000, 4133, 16384])
def test_gpu_decode_matches_reference(Tk, dtype):
    q, k, v, _, kpm = (x.cuda() for x in _inputs(2, 32, 8, 1, Tk, 128, torch.float32, "left"))
    with torch.no_grad():
        out, _ = attention_decode(q.to(dtype), k.to(dtype), v.to(dtype), kpm)
        ref = attention_reference(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), True, kpm)
    assert _rel_err(out, ref) < GPU_REL_TOL[dtype]


def test_offsets_past_int32_go_to_the_torch_path():
    """The kernels index with int32 offsets: a tensor whose last element lies past 2**31 - 1 is not theirs."""
    from minillava.kernels.flash_attention import MAX_ELEMENTS, _kernel_supports
    small = torch.zeros(1, 2, 4, 16)
    assert _kernel_supports(small, small, small)
    far = torch.empty_strided((1, 2, 2, 16), (0, 0, MAX_ELEMENTS, 1), device="meta")  # shape only, no memory
    assert not _kernel_supports(far, small, small) and not _kernel_supports(small, small, far)


@interpreter_only
def test_decode_reuses_its_scratch_and_not_its_outputs():
    """A decode step allocates only its outputs (the partial results' buffers are kept per shape, so the step
    replays in a CUDA graph); a second call must not change the first call's output."""
    q, k, v, _, kpm = _inputs(2, 4, 2, 1, 40, 16, torch.float32, "left")
    FD._DECODE_SCRATCH.clear()
    with torch.no_grad():
        out1, _ = attention_decode(q, k, v, kpm, num_splits=3)
        kept = out1.clone()
        scratch = [t.data_ptr() for t in next(iter(FD._DECODE_SCRATCH.values()))]
        out2, _ = attention_decode(q, k.flip(2), v.flip(2), kpm.flip(1), num_splits=3)
    assert len(FD._DECODE_SCRATCH) == 1 and scratch == [t.data_ptr() for t in FD._DECODE_SCRATCH[
        next(iter(FD._DECODE_SCRATCH))]]
    assert torch.equal(out1, kept) and out1.data_ptr() != out2.data_ptr()
    _assert_close(out2, attention_reference(q, k.flip(2), v.flip(2), True, kpm.flip(1)), TOL[torch.float32]["out"],
                  "second decode")


def test_autotune_key_and_spilling_configs():
    """The tuner keys on the sequence length's bucket too (a prompt length re-tunes only across a power of two
    >= 256), and never tries a config SPILLS lists for the head size."""
    import triton
    assert [FA._t_bucket(t, t) for t in (1, 200, 256, 257, 5000, 10**6)] == [256, 256, 256, 512, 8192, 16384]
    assert FA._t_bucket(1, 3000) == 4096  # decode-like and prefill-like calls alike: the longer side counts
    assert "T_BUCKET" in FA._TUNE_KEY and all("T_BUCKET" in fn.arg_names for fn in
                                              (FA._attn_fwd_kernel, FA._attn_bwd_dkdv_kernel, FA._attn_bwd_dq_kernel))
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in
               FA.CONFIGS["fwd"]]
    for hs, bad in FA.SPILLS["fwd"].items():
        kept = FA._no_spills("fwd")(configs, {}, HS=hs)
        assert len(kept) == len(configs) - len(bad) and not any(
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in bad for c in kept)
    assert FA._no_spills("fwd")(configs, {}, HS=16) == configs


def test_every_kernel_launch_states_its_compile_options():
    """Triton 3.9 warns that the FP-fusion default flips in 3.10: every launch (kernel[grid](...)) passes
    minillava.kernels.dispatch.COMPILE, so the kernels compute the same under both."""
    import ast
    import pathlib
    launches = 0
    for path in pathlib.Path(A.__file__).parent.glob("*.py"):
        if "@triton.jit" not in path.read_text():  # no kernels, no launches (linear.py's PATHS[p](...) is a call)
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                launches += 1
                assert any(kw.arg is None and getattr(kw.value, "id", "") == "COMPILE" for kw in node.keywords), \
                    f"{path.name}:{node.lineno}: a kernel launch without **COMPILE"
    assert launches >= 12
