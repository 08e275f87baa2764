"""Attention kernels (kernels/flash_attention.py, flash_decoding.py) against PyTorch SDPA (its default backend) on
LLaVA-1.5-7B shapes.

    python benchmarks/bench_attention.py                       # bf16: forward, backward and decode sweeps
    python benchmarks/bench_attention.py --modes fwd --seq-lens 2048 4096 8192 --dtype fp16
    python benchmarks/bench_attention.py --modes decode --cache-lens 4096 16384 --decode-batches 1 8
    python benchmarks/bench_attention.py --modes decode --cuda-graph   # without the CPU's launch overhead

Needs a CUDA GPU (exits with status 2 otherwise). Shapes: the LLM (Vicuna-7B: 32 heads of 128, no GQA), causal,
`--tokens` tokens per batch at each sequence length (B = tokens / T), with one right-padded variant (key padding
on the last 10% of every other sequence, as training batches are collated); the CLIP ViT-L/14-336 tower
(16 heads of 64, 577 tokens, bidirectional); decoding one token against a KV cache of `--cache-lens` keys.

Printed per row: median time, TFLOP/s (forward 4 B nh Tq Tk hs, halved when causal; backward 2.5x the forward,
the FlashAttention convention) or, for decode, GB/s of the K/V cache (and q, o) read from HBM; the same for
SDPA, the speed-up (SDPA time / ours, > 1 = faster), the fraction of the device's peak, and max |ours - SDPA|
as a sanity check. The issue-6 targets are checked at the end.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import bench_common as common
from minillava.kernels.attention import AttentionFunction


@dataclass
class Defaults:
    dtype: str = "bf16"
    modes: list = field(default_factory=lambda: ["fwd", "bwd", "decode"])
    tokens: int = 16384  # tokens per batch in the LLM sweep: B = tokens // T
    seq_lens: list = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    n_heads: int = 32  # Vicuna-7B
    n_kv_heads: int = 32  # no GQA in LLaMA-2-7B / Vicuna-7B; set < n_heads to time GQA
    head_dim: int = 128
    vit_batch: int = 32  # images per ViT-L/14-336 batch (577 tokens, 16 heads of 64); 0: skip
    cache_lens: list = field(default_factory=lambda: [1024, 4096, 8192, 16384])
    decode_batches: list = field(default_factory=lambda: [1, 8, 32])
    cuda_graph: bool = False  # time decode rows as CUDA graph replays: the kernels' time without launch overhead


def _cases(a):
    """(name, B, nh, n_kv, T, hs, causal, padded) of the forward/backward sweep."""
    cases = [("LLM causal", max(1, a.tokens // T), a.n_heads, a.n_kv_heads, T, a.head_dim, True, False)
             for T in a.seq_lens]
    T = 2048 if 2048 in a.seq_lens else a.seq_lens[0]
    cases.append(("LLM causal, right-padded", max(1, a.tokens // T), a.n_heads, a.n_kv_heads, T, a.head_dim,
                  True, True))
    if a.vit_batch:
        cases.append(("ViT-L/14-336", a.vit_batch, 16, 16, 577, 64, False, False))
    return cases


def _inputs(B, nh, n_kv, Tq, Tk, hs, dtype, padded, requires_grad):
    q = torch.randn(B, nh, Tq, hs, device=common.DEVICE, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(B, n_kv, Tk, hs, device=common.DEVICE, dtype=dtype, requires_grad=requires_grad)
            for _ in range(2))
    kpm = None
    if padded:  # every other sequence ends with 10% padding
        kpm = torch.ones(B, Tk, dtype=torch.bool, device=common.DEVICE)
        kpm[::2, Tk - Tk // 10:] = False
    return q, k, v, kpm


def _sdpa(q, k, v, causal, kpm):
    """PyTorch's SDPA with its default backend choice. A padding mask must be a full (B, 1, Tq, Tk) mask
    (SDPA takes is_causal or attn_mask, not both), which rules out the flash backend: that is SDPA's real cost."""
    Tq, Tk = q.shape[2], k.shape[2]
    if kpm is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Tq > 1,
                                              enable_gqa=k.shape[1] != q.shape[1])
    mask = kpm[:, None, None, :]  # (B, 1, 1, Tk)
    if causal:
        mask = mask & torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def _ours(q, k, v, causal, kpm):
    return AttentionFunction.apply(q, k, v, causal, kpm, None)


def bench_fwd_bwd(a, dtype, mode):
    rows = []
    peak = common.peak_tflops(dtype)
    for name, B, nh, n_kv, T, hs, causal, padded in _cases(a):
        q, k, v, kpm = _inputs(B, nh, n_kv, T, T, hs, dtype, padded, requires_grad=mode == "bwd")
        flops = 4 * B * nh * T * T * hs * (0.5 if causal else 1.0) * (2.5 if mode == "bwd" else 1.0)
        do = torch.randn_like(q)  # the same output gradient for both
        times, outs = {}, {}
        for label, fn in (("ours", _ours), ("sdpa", _sdpa)):
            if mode == "fwd":
                with torch.no_grad():
                    outs[label] = fn(q, k, v, causal, kpm)
                    times[label] = common.time_ms(lambda: fn(q, k, v, causal, kpm))
            else:
                out = fn(q, k, v, causal, kpm)
                times[label] = common.time_ms(lambda: out.backward(do, retain_graph=True), grad_to_none=[q, k, v])
                q.grad = k.grad = v.grad = None
                out.backward(do)
                outs[label] = q.grad.clone()  # dq: the check below compares gradients
                q.grad = k.grad = v.grad = None
        tf = {key: flops / (t * 1e-3) / 1e12 for key, t in times.items()}
        rows.append(dict(case=name, B=B, T=T, hs=hs, ms=times["ours"], tflops=tf["ours"], sdpa_ms=times["sdpa"],
                         sdpa_tflops=tf["sdpa"], speedup=common.ratio(times["sdpa"], times["ours"]),
                         peak=common.fraction(tf["ours"], peak),
                         diff=(outs["ours"].float() - outs["sdpa"].float()).abs().max().item()))
        del q, k, v, kpm, do, outs
        torch.cuda.empty_cache()
    print(f"\n## attention {mode} ({'dq' if mode == 'bwd' else 'out'} checked against SDPA)")
    common.print_table(rows, [("case", "case", ""), ("B", "B", "d"), ("T", "T", "d"), ("hs", "hs", "d"),
                         ("ms", "ours ms", ".3f"), ("tflops", "TFLOP/s", ".0f"), ("sdpa_ms", "SDPA ms", ".3f"),
                         ("sdpa_tflops", "SDPA TFLOP/s", ".0f"), ("speedup", "speed-up", ".2f"),
                         ("peak", "of peak", ".0%"), ("diff", "max|diff|", ".1e")])
    return rows


def bench_decode(a, dtype):
    rows = []
    peak = common.peak_gbs()
    elt = torch.tensor([], dtype=dtype).element_size()
    nh, n_kv, hs = a.n_heads, a.n_kv_heads, a.head_dim
    for B in a.decode_batches:
        for Tk in a.cache_lens:
            q, k, v, _ = _inputs(B, nh, n_kv, 1, Tk, hs, dtype, False, requires_grad=False)
            nbytes = (2 * B * n_kv * Tk * hs + 2 * B * nh * hs) * elt  # read K, V cache and q; write o
            with torch.no_grad():
                # the model's path: AttentionFunction sends Tq == 1 to the flash-decoding kernels
                t_ours = common.time_ms(lambda: _ours(q, k, v, True, None), cuda_graph=a.cuda_graph)
                t_sdpa = common.time_ms(lambda: _sdpa(q, k, v, False, None), cuda_graph=a.cuda_graph)
                diff = (_ours(q, k, v, True, None).float() - _sdpa(q, k, v, False, None).float()).abs().max()
            gbs, sdpa_gbs = nbytes / (t_ours * 1e-3) / 1e9, nbytes / (t_sdpa * 1e-3) / 1e9
            rows.append(dict(B=B, Tk=Tk, us=t_ours * 1e3, gbs=gbs, sdpa_us=t_sdpa * 1e3, sdpa_gbs=sdpa_gbs,
                             speedup=common.ratio(t_sdpa, t_ours), peak=common.fraction(gbs, peak), diff=diff.item()))
            del q, k, v
    print(f"\n## attention decode (one query token per sequence, {nh} heads / {n_kv} kv heads of {hs}"
          f"{', CUDA graph replays' if a.cuda_graph else ''})")
    common.print_table(rows, [("B", "B", "d"), ("Tk", "cache", "d"), ("us", "ours us", ".1f"), ("gbs", "GB/s", ".0f"),
                         ("sdpa_us", "SDPA us", ".1f"), ("sdpa_gbs", "SDPA GB/s", ".0f"),
                         ("speedup", "speed-up", ".2f"), ("peak", "of HBM peak", ".0%"), ("diff", "max|diff|", ".1e")])
    return rows


def check_targets(results):
    """The targets, from the rows just measured: the forward's TFLOP/s as a fraction of the dense 16-bit peak of
    whatever device this is (bench_common.PEAKS: every Hopper part, H100 and H200, SXM, PCIe, NVL)."""
    lines = []
    fwd = [r for r in results.get("fwd", []) if r["case"] == "LLM causal" and r["hs"] == 128 and r["T"] >= 2048]
    if fwd:
        known = all(r["peak"] is not None for r in fwd)
        ok = all(r["speedup"] >= 1.0 for r in fwd) and (not known or all(r["peak"] >= 0.45 for r in fwd))
        of_peak = (f", {min(r['peak'] for r in fwd):.0%}-{max(r['peak'] for r in fwd):.0%} of the dense peak"
                   if known else " (device not in bench_common.PEAKS: no fraction of peak)")
        lines.append(f"forward hs 128 causal T 2k-8k: >= 1.0x SDPA{' and >= 45% of peak' if known else ''}: "
                     f"{'MET' if ok else 'NOT MET'} (speed-up {min(r['speedup'] for r in fwd):.2f}x-"
                     f"{max(r['speedup'] for r in fwd):.2f}x, {min(r['tflops'] for r in fwd):.0f}-"
                     f"{max(r['tflops'] for r in fwd):.0f} TFLOP/s{of_peak})")
    bwd = [r for r in results.get("bwd", []) if r["case"] == "LLM causal" and r["hs"] == 128 and r["T"] >= 2048]
    if bwd:
        ok = all(r["speedup"] >= 1.0 for r in bwd)
        lines.append(f"backward hs 128 causal T 2k-8k: >= 1.0x SDPA: {'MET' if ok else 'NOT MET'} "
                     f"(speed-up {min(r['speedup'] for r in bwd):.2f}x-{max(r['speedup'] for r in bwd):.2f}x)")
    dec = [r for r in results.get("decode", []) if r["Tk"] >= 4096 and r["peak"] is not None]
    if dec:
        ok = all(r["peak"] >= 0.7 for r in dec)
        lines.append(f"decode, cache >= 4k: >= 70% of HBM bandwidth: {'MET' if ok else 'NOT MET'} "
                     f"({min(r['peak'] for r in dec):.0%}-{max(r['peak'] for r in dec):.0%})")
    if lines:
        print("\n## targets")
        for line in lines:
            print(line)


def main():
    a = common.parse_args(Defaults, __doc__)
    common.require_cuda("bench_attention.py")
    common.header("bench_attention.py", a)
    dtype = common.DTYPES[a.dtype]
    torch.manual_seed(0)
    results = {}
    for mode in a.modes:
        results[mode] = bench_decode(a, dtype) if mode == "decode" else bench_fwd_bwd(a, dtype, mode)
    check_targets(results)


if __name__ == "__main__":
    main()
