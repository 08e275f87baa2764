"""The CPU's matrix-vector candidates for decoding, measured on one weight: GB/s of weight read and % of the
machine's read bandwidth, in one run (issue 29: "measure these properly and use what wins").

    python benchmarks/bench_cpu_ops.py                        # 11008 x 4096 (LLaVA-1.5-7B's gate/up), 1 and 2 threads
    python benchmarks/bench_cpu_ops.py --shape 4096 4096 --rows 1 8

Decoding one token multiplies one row per sequence by every weight matrix, so the weight's bytes over the time
is the number that matters; the bound is the machine's read bandwidth, measured here the same way (a sum over a
buffer much larger than the caches, at the same thread count), and every op cycles through copies of its weight
that add up to --min-mib (a CPU with a large L3 would otherwise serve a whole weight from cache, as it never can
for a 7B model's 13 GB). Each op is timed best-of --repeat after a warm-up;
an op this torch build or CPU does not have prints why instead of a figure. What each op computes:

    F.linear fp32 / bf16       x W^T in the weight's dtype (MKL's GEMV for fp32, oneDNN's for bf16)
    batched GEMM fp32          kernels/linear.py's other path: W viewed as 2 blocks of rows, one torch.bmm
    int8 weight, bf16 x        torch._weight_int8pack_mm (minillava's --quantize int8 where oneDNN's is not usable)
    int8 weight, 2x int8 x     oneDNN's int8 matmul, x as two int8 digits (minillava's --quantize int8 on the CPU
                               where oneDNN's int8 works: kernels/quant.py); the numbers of x to 15 bits of its range
    int8 weight, int8 x        fbgemm's dynamic quantized linear (x quantized per call, int8 x int8 -> int32),
                               as llama.cpp's Q8_0 multiplies; other numerics than ours (x is rounded to 8 bits)
    int8 x int8, _int_mm       torch._int_mm, the plain int8 x int8 -> int32 product (x already in int8; the
                               weight as the transpose of its (N, K) rows, the faster of its two layouts)
    fp8 weight, fp8 x          oneDNN's quantized matmul with float8_e4m3fn weights (qlinear_prepack's other dtype)
    int4 weight, bf16 x        torch._weight_int4pack_mm_for_cpu, groups of 64 (minillava's --quantize int4)
    int4 weight, int8 x        torch._dyn_quant_matmul_4bit, groups of 32 (x quantized per call; KleidiAI's
                               kernels on Arm, a generic fallback elsewhere)
    fp16 weight, fp32 x        fbgemm's fp16-weight linear (weights stored in half, converted in registers)
"""
import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.bench_common import best_seconds, read_bandwidth  # noqa: E402
from minillava.kernels import linear as L  # noqa: E402
from minillava.kernels import quant as Q  # noqa: E402
from minillava.kernels.quant import CPU_PACK_TILES, pack_int4_for_cpu, quantize  # noqa: E402


def candidates(W, x):
    """name -> (weights, a function of them and x that runs the op once); a missing op -> its error text.
    weights: the tensors a call reads (cloned into several copies by `measure`), or, for an opaque packed weight
    (fbgemm's and oneDNN's objects cannot be cloned), a function that packs another copy."""
    N, K = W.shape
    xb = x.bfloat16()
    ops = {"F.linear fp32": ((W,), lambda w: F.linear(x, w)),
           "F.linear bf16": ((W.bfloat16(),), lambda w: F.linear(xb, w)),
           "batched GEMM fp32": ((W,), lambda w: L._batched(x, w))}
    q8 = quantize(W, 8)
    ops["int8 weight, bf16 x"] = ((q8["qweight"], q8["scales"].bfloat16()),
                                  lambda q, s: torch.ops.aten._weight_int8pack_mm(xb, q, s))
    zeros = torch.zeros(N, dtype=torch.long)
    problem = Q.onednn_int8_problem()
    ops["int8 weight, 2x int8 x"] = f"not available: {problem}" if problem else (
        lambda: Q.pack_int8_for_cpu(q8["qweight"], q8["scales"]), lambda *w: Q._onednn_int8(x, *w))
    scales = (W.abs().amax(1) / 127).clamp(min=1e-12).double()
    ops["int8 weight, int8 x"] = (lambda: (torch.ops.quantized.linear_prepack(torch.quantize_per_channel(
        W, scales, zeros, 0, torch.qint8), None),),
        lambda pk: torch.ops.quantized.linear_dynamic(x, pk))
    x8 = torch.randint(-127, 128, x.shape, dtype=torch.int8)
    ops["int8 x int8, _int_mm"] = ((q8["qweight"],), lambda q: torch._int_mm(x8, q.t()))
    s8 = (W.abs().amax(1) / 448).clamp(min=1e-12)  # e4m3's largest value is 448
    ops["fp8 weight, fp8 x"] = (lambda: (torch.ops.onednn.qlinear_prepack((W / s8[:, None]).to(torch.float8_e4m3fn),
                                                                          [1, K]),), lambda pk: (
        torch.ops.onednn.qlinear_pointwise(x.to(torch.float8_e4m3fn), 1.0, 0, pk, s8, zeros,
                                           None, 1.0, 0, torch.float32, "none", [], "")))
    try:
        q4 = quantize(W, 4, 64)
        packed4, sz = pack_int4_for_cpu(q4["qweight"], q4["scales"], q4["offsets"])
        ops["int4 weight, bf16 x"] = ((packed4, sz), lambda q, s: (
            torch.ops.aten._weight_int4pack_mm_for_cpu(xb, q, 64, s)))
    except (RuntimeError, ValueError) as e:
        ops["int4 weight, bf16 x"] = f"not available: {e}".splitlines()[0]
    g32 = quantize(W, 4, 32)  # qweight (N, K / 2) uint8, two codes a byte
    ops["int4 weight, int8 x"] = (lambda: (torch.ops.aten._dyn_quant_pack_4bit_weight(
        g32["qweight"], g32["scales"].float(), None, 32, K, N),), lambda pk: (
        torch.ops.aten._dyn_quant_matmul_4bit(x, pk, 32, K, N)))
    bias = torch.zeros(N)
    ops["fp16 weight, fp32 x"] = (lambda: (torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(W),), lambda w: (
        torch.ops.aten.fbgemm_linear_fp16_weight_fp32_activation(x, w, bias)))
    return ops


PACKED = {"int8 weight, 2x int8 x": 1, "int8 weight, int8 x": 1, "fp8 weight, fp8 x": 1, "int4 weight, int8 x": 0.5,
          "fp16 weight, fp32 x": 2}  # opaque: bytes/weight


def measure(name, weights, fn, W, a) -> tuple[float, int]:
    """-> (best seconds per call, weight bytes per call), cycling through copies of the weights that add up to
    a.min_mib: past the caches (this machine's L3 may hold a whole weight), so that a call reads from memory.
    An opaque op this torch build lacks raises at its first packing (main prints why)."""
    size = int(W.numel() * PACKED[name]) if name in PACKED else sum(t.numel() * t.element_size() for t in weights)
    n = -(-a.min_mib * 2**20 // size)
    copies = ([weights() for _ in range(n)] if callable(weights)
              else [weights] + [tuple(t.clone() for t in weights) for _ in range(n - 1)])
    turn = iter(range(10**9))
    return best_seconds(lambda: fn(*copies[next(turn) % n]), a.repeat), size


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=2, default=[11008, 4096], metavar=("N", "K"))
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x (sequences decoded together)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--min-mib", type=int, default=1024, help="weight copies cycled through, at least this many MiB "
                   "(past the caches)")
    a = p.parse_args()
    warnings.filterwarnings("ignore")  # fbgemm's ops warn that they are deprecated, on every call
    torch.manual_seed(0)
    N, K = a.shape
    W = torch.randn(N, K) * 0.02
    print(f"weight {N} x {K}, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"int4 CPU tiles {CPU_PACK_TILES}")
    for threads in a.threads:
        torch.set_num_threads(threads)
        bw = read_bandwidth(a.repeat)
        print(f"\n{threads} thread(s): plain read (torch.sum over 1 GiB) {bw:.1f} GB/s")
        for rows in a.rows:
            x = torch.randn(rows, K)
            print(f"  {rows} row(s)                      ms     GB/s   % of read")
            for name, op in candidates(W, x).items():
                if isinstance(op, str):
                    print(f"  {name:24s} {op}")
                    continue
                weights, fn = op
                try:
                    t, size = measure(name, weights, fn, W, a)
                except (RuntimeError, AttributeError) as e:
                    if not callable(weights):
                        raise
                    print(f"  {name:24s} not available: {str(e).splitlines()[0]}")  # fails at its first packing
                    continue
                print(f"  {name:24s} {t * 1e3:7.2f} {size / t / 1e9:8.1f} {100 * size / t / 1e9 / bw:8.0f}%")


if __name__ == "__main__":
    main()
