"""RoPE kernel (kernels/rope.py) against the eager rotate_half form (apply_rope_reference) on LLaVA-1.5-7B shapes.

    python benchmarks/bench_rope.py                         # bf16, 32 heads of 128, 2k-16k tokens
    python benchmarks/bench_rope.py --tokens 4096 --n-kv-heads 8 --dtype fp16

Needs a CUDA GPU (exits with status 2 otherwise). q and k come in the model's layout, (B, T, heads, hs) viewed
as (B, heads, T, hs). RoPE is memory-bound: GB/s of the bytes that must move, reading q, k, cos and sin and
writing q', k' (forward), or reading dq', dk', cos, sin and writing dq, dk (backward): 2 (nh + n_kv) T hs + 2 T hs
elements for B * T = tokens. The eager form also writes and reads rotate_half's copies and the products.
"""
from dataclasses import dataclass, field

import torch

import bench_common as common
from minillava.kernels.rope import RoPEFunction, apply_rope_reference
from minillava.llama import rope_cos_sin


@dataclass
class Defaults:
    dtype: str = "bf16"
    tokens: list = field(default_factory=lambda: [2048, 8192, 16384])  # B * T
    seq_len: int = 2048  # T; B = tokens // T (at least 1)
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128


def main():
    a = common.parse_args(Defaults, __doc__)
    common.require_cuda("bench_rope.py")
    common.header("bench_rope.py", a)
    dtype, dev = common.DTYPES[a.dtype], common.DEVICE
    nh, n_kv, hs = a.n_heads, a.n_kv_heads, a.head_dim
    elt = torch.tensor([], dtype=dtype).element_size()
    peak = common.peak_gbs()
    torch.manual_seed(0)
    rows = []
    for tokens in a.tokens:
        T = min(a.seq_len, tokens)
        B = max(1, tokens // T)
        q = torch.randn(B, T, nh, hs, device=dev, dtype=dtype).transpose(1, 2).requires_grad_()  # (B, nh, T, hs)
        k = torch.randn(B, T, n_kv, hs, device=dev, dtype=dtype).transpose(1, 2).requires_grad_()  # (B, n_kv, T, hs)
        pos = torch.arange(T, device=dev).expand(B, T)  # (B, T)
        cos, sin = rope_cos_sin(pos, hs, 10000.0, dtype)  # (B, T, hs)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        with torch.no_grad():
            diff = max((o.float() - r.float()).abs().max().item()
                       for o, r in zip(RoPEFunction.apply(q, k, cos, sin), apply_rope_reference(q, k, cos, sin)))
        nbytes = (2 * (nh + n_kv) * B * T * hs + 2 * B * T * hs) * elt
        for mode in ("fwd", "bwd"):
            t = {}
            for name, fn in (("ours", RoPEFunction.apply), ("eager", apply_rope_reference)):
                if mode == "fwd":
                    with torch.no_grad():
                        t[name] = common.time_ms(lambda: fn(q, k, cos, sin))
                else:
                    outs = fn(q, k, cos, sin)
                    t[name] = common.time_ms(lambda: torch.autograd.backward(outs, (dq, dk), retain_graph=True),
                                             grad_to_none=[q, k])
            gbs = nbytes / (t["ours"] * 1e-3) / 1e9
            rows.append(dict(mode=mode, tokens=B * T, us=t["ours"] * 1e3, gbs=gbs, eager_us=t["eager"] * 1e3,
                             eager_gbs=nbytes / (t["eager"] * 1e-3) / 1e9, speedup=common.ratio(t["eager"], t["ours"]),
                             peak=common.fraction(gbs, peak), diff=diff if mode == "fwd" else None))
    print(f"\n## RoPE, {nh} q heads / {n_kv} k heads of {hs}")
    common.print_table(rows, [("mode", "mode", ""), ("tokens", "tokens", "d"), ("us", "ours us", ".1f"),
                              ("gbs", "GB/s", ".0f"), ("eager_us", "eager us", ".1f"),
                              ("eager_gbs", "eager GB/s", ".0f"),
                              ("speedup", "speed-up", ".2f"), ("peak", "of HBM peak", ".0%"),
                              ("diff", "max|diff| fwd", ".1e")])


if __name__ == "__main__":
    main()
