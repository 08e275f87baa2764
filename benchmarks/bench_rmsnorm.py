"""RMSNorm kernel (kernels/rmsnorm.py) against the eager LLaMA RMSNorm (rms_norm_reference) on LLaVA-1.5-7B rows.

    python benchmarks/bench_rmsnorm.py                      # bf16, C = 4096, 2k-16k rows
    python benchmarks/bench_rmsnorm.py --rows 577 --hidden 1024 --dtype fp16

Needs a CUDA GPU (exits with status 2 otherwise). RMSNorm is memory-bound, so the figures are GB/s of the bytes
that must move: forward reads x and w and writes y (2 M C + C elements); backward reads dy, x, w and the
fp32 rstd and writes dx and dw (3 M C + 2 C elements + 4 M bytes). The eager reference reads and writes its
fp32 intermediates too, which is what the fusion saves; both are divided by the same minimal byte count.
"""
from dataclasses import dataclass, field

import torch

import bench_common as common
from minillava.kernels.rmsnorm import RMSNormFunction, rms_norm_reference


@dataclass
class Defaults:
    dtype: str = "bf16"
    rows: list = field(default_factory=lambda: [2048, 8192, 16384])  # M = B * T tokens
    hidden: int = 4096  # Vicuna-7B C
    eps: float = 1e-5


def main():
    a = common.parse_args(Defaults, __doc__)
    common.require_cuda("bench_rmsnorm.py")
    common.header("bench_rmsnorm.py", a)
    dtype, C, dev = common.DTYPES[a.dtype], a.hidden, common.DEVICE
    elt = torch.tensor([], dtype=dtype).element_size()
    peak = common.peak_gbs()
    ours = lambda x, w: RMSNormFunction.apply(x, w, a.eps)  # noqa: E731
    eager = lambda x, w: rms_norm_reference(x, w, a.eps)  # noqa: E731
    torch.manual_seed(0)
    rows = []
    for M in a.rows:
        x = torch.randn(M, C, device=dev, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(C, device=dev)).to(dtype).requires_grad_()
        dy = torch.randn(M, C, device=dev, dtype=dtype)
        with torch.no_grad():
            diff = (ours(x, w).float() - eager(x, w).float()).abs().max().item()
        for mode, nbytes in (("fwd", (2 * M * C + C) * elt), ("bwd", (3 * M * C + 2 * C) * elt + 4 * M)):
            t = {}
            for name, fn in (("ours", ours), ("eager", eager)):
                if mode == "fwd":
                    with torch.no_grad():
                        t[name] = common.time_ms(lambda: fn(x, w))
                else:
                    y = fn(x, w)
                    t[name] = common.time_ms(lambda: y.backward(dy, retain_graph=True), grad_to_none=[x, w])
            gbs = nbytes / (t["ours"] * 1e-3) / 1e9
            rows.append(dict(mode=mode, M=M, us=t["ours"] * 1e3, gbs=gbs, eager_us=t["eager"] * 1e3,
                             eager_gbs=nbytes / (t["eager"] * 1e-3) / 1e9, speedup=common.ratio(t["eager"], t["ours"]),
                             peak=common.fraction(gbs, peak), diff=diff if mode == "fwd" else None))
    print(f"\n## RMSNorm, C = {C}")
    common.print_table(rows, [("mode", "mode", ""), ("M", "M", "d"), ("us", "ours us", ".1f"), ("gbs", "GB/s", ".0f"),
                              ("eager_us", "eager us", ".1f"), ("eager_gbs", "eager GB/s", ".0f"),
                              ("speedup", "speed-up", ".2f"), ("peak", "of HBM peak", ".0%"),
                              ("diff", "max|diff| fwd", ".1e")])


if __name__ == "__main__":
    main()
