"""Cross-entropy kernel (kernels/cross_entropy.py) against eager PyTorch (F.cross_entropy on fp32 logits, as
cross_entropy_reference does) over LLaVA-1.5's vocabulary of 32064.

    python benchmarks/bench_cross_entropy.py                # bf16 logits, 2k-16k rows
    python benchmarks/bench_cross_entropy.py --rows 4096 --vocab 32000 --dtype fp16

Needs a CUDA GPU (exits with status 2 otherwise). Forward+backward of the summed loss over N rows (a third of
them ignored, as prompt tokens are), timed together: the kernel computes the gradient in its forward pass.
GB/s count the bytes that must move: read the logits and write their gradient (2 N V elements); the kernel
reads the logits twice (two passes), the eager path also writes and reads fp32 copies. Memory: the peak of
forward+backward above the logits, where the kernel's point is that no fp32 (N, V) tensor ever exists.
"""
from dataclasses import dataclass, field

import torch

import bench_common as common
from minillava.kernels.cross_entropy import CrossEntropyFunction, cross_entropy_reference


@dataclass
class Defaults:
    dtype: str = "bf16"
    rows: list = field(default_factory=lambda: [2048, 8192, 16384])  # N = B * T tokens
    vocab: int = 32064  # LLaVA-1.5 (32000 + image + pad, rounded)


def _ours(logits, labels):
    return CrossEntropyFunction.apply(logits, labels, -100, "sum")


def _eager(logits, labels):
    return cross_entropy_reference(logits, labels, -100, "sum")


def main():
    a = common.parse_args(Defaults, __doc__)
    common.require_cuda("bench_cross_entropy.py")
    common.header("bench_cross_entropy.py", a)
    dtype, V, dev = common.DTYPES[a.dtype], a.vocab, common.DEVICE
    elt = torch.tensor([], dtype=dtype).element_size()
    peak = common.peak_gbs()
    torch.manual_seed(0)
    rows = []
    for N in a.rows:
        logits = torch.randn(N, V, device=dev, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, V, (N,), device=dev)
        labels[torch.randperm(N, device=dev)[: N // 3]] = -100
        grads, t, mem = {}, {}, {}
        for name, fn in (("ours", _ours), ("eager", _eager)):
            logits.grad = None
            fn(logits, labels).backward()
            grads[name] = logits.grad
            logits.grad = None
            t[name] = common.time_ms(lambda: fn(logits, labels).backward(), grad_to_none=[logits])
            logits.grad = None
            mem[name] = common.memory_mb(lambda: fn(logits, labels), lambda loss: loss.backward())[1]
            logits.grad = None
        nbytes = 2 * N * V * elt
        gbs = nbytes / (t["ours"] * 1e-3) / 1e9
        rows.append(dict(N=N, ms=t["ours"], gbs=gbs, eager_ms=t["eager"], eager_gbs=nbytes / (t["eager"] * 1e-3) / 1e9,
                         speedup=common.ratio(t["eager"], t["ours"]), peak=common.fraction(gbs, peak),
                         mem=mem["ours"], eager_mem=mem["eager"], saving=1 - mem["ours"] / mem["eager"],
                         diff=(grads["ours"].float() - grads["eager"].float()).abs().max().item()))
        del logits, grads
        torch.cuda.empty_cache()
    print(f"\n## cross-entropy forward+backward, V = {V}, {a.dtype} logits")
    common.print_table(rows, [("N", "N", "d"), ("ms", "ours ms", ".3f"), ("gbs", "GB/s", ".0f"),
                              ("eager_ms", "eager ms", ".3f"), ("eager_gbs", "eager GB/s", ".0f"),
                              ("speedup", "speed-up", ".2f"), ("peak", "of HBM peak", ".0%"),
                              ("mem", "ours peak MiB", ".0f"), ("eager_mem", "eager peak MiB", ".0f"),
                              ("saving", "memory saving", ".0%"), ("diff", "max|dgrad|", ".1e")])


if __name__ == "__main__":
    main()
