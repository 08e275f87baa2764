"""Weight-only int8 / int4 decode kernels (kernels/quant.py, Triton) against bf16 cuBLAS, LLaMA-7B shapes.

    python benchmarks/bench_quant_gpu.py                  # batch 1 and 8, int4 groups of 64 (a GPU is required)

For each of LLaVA-1.5-7B's linear shapes (q/k/v/o 4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008, lm_head
32064 x 4096) and batch (rows of x): the median time of F.linear on a bf16 weight (cuBLAS, the baseline) and of
the Triton kernel on int8 and int4 codes, each as GB/s of the weight bytes it must read (codes + scales
[+ offsets]) and as a fraction of the device's HBM bandwidth; the speed-up is baseline time / kernel time. Each
kernel's output is first checked against the dequantized reference (max error relative to the output's size).
"""
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_common import (fraction, header, parse_args, peak_gbs, print_table, ratio,  # noqa: E402
                                     require_cuda, time_ms)

SHAPES = {"qkvo": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008), "lm_head": (32064, 4096)}


@dataclasses.dataclass
class Config:
    batches: list = dataclasses.field(default_factory=lambda: [1, 8])  # rows of x (decoding sequences)
    group_size: int = 64  # int4 group size


def main():
    cfg = parse_args(Config, __doc__.split("\n")[0])
    require_cuda("bench_quant_gpu.py")
    from minillava.kernels.quant import QuantLinear, quant_linear_reference
    header("bench_quant_gpu.py", cfg)
    rows = []
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        lin.weight.data = w
        layers = {"int8": QuantLinear.from_float(lin, 8), "int4": QuantLinear.from_float(lin, 4, cfg.group_size)}
        for M in cfg.batches:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            base_ms = time_ms(lambda: F.linear(x, w))
            rows.append({"shape": f"{name} {N}x{K}", "M": M, "kind": "bf16 cuBLAS", "ms": base_ms,
                         "gbs": N * K * 2 / base_ms / 1e6, "err": None})
            for kind, q in layers.items():
                ref = quant_linear_reference(x, q.qweight, q.scales, q.offsets, q.group_size)
                err = ((q(x).float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                ms = time_ms(lambda: q(x))
                nbytes = sum(t.numel() * t.element_size() for t in (q.qweight, q.scales, q.offsets) if t is not None)
                rows.append({"shape": f"{name} {N}x{K}", "M": M, "kind": kind, "ms": ms, "gbs": nbytes / ms / 1e6,
                             "speedup": ratio(base_ms, ms), "err": err})
    for r in rows:
        r["hbm"] = fraction(r["gbs"], peak_gbs())
    print_table(rows, [("shape", "shape", ""), ("M", "batch", "d"), ("kind", "kernel", ""), ("ms", "ms", ".4f"),
                       ("gbs", "GB/s of weights", ".0f"), ("hbm", "of HBM", ".0%"), ("speedup", "x bf16", ".2f"),
                       ("err", "max err / max |y|", ".1e")])


if __name__ == "__main__":
    main()
