"""Linear layers for decoding on the CPU: y = x W^T (+ b) when x has only a few rows.

Decoding multiplies one row per sequence by every weight matrix, so a decode step is bound by reading the
weights from memory. On x86 CPUs `F.linear` sends a few-row product to MKL's matrix-vector routine; viewing W
(N, K) as CHUNKS blocks of rows (a free view: no copy) and multiplying every block by x in one batched GEMM
takes MKL's batched matrix-matrix path instead. Which one reads W faster depends on the CPU and the number of
rows, in both directions, so it is measured, not assumed:
    2-core AMD EPYC (AVX2), 2026-12-01: the batched GEMM ~27 GB/s for one row against F.linear's ~16, ~2x for
        2-4 rows, 6-7 GB/s against 3-4 for the 8-32 rows of an 8-slot engine step;
    2-core Intel Xeon (AVX-512), 2026-12-07: F.linear twice as fast for one row (28 against 13 GB/s, 768 x
        2048, 1 thread), about even at 4 rows, the batched GEMM 1.2-1.5x faster at 8-32 rows.
So on its first call for a shape (N, K, dtype, rows, threads) `linear` times both on the layer's own operands
(best of 3, interleaved) and keeps the batched GEMM only when it is at least MARGIN times faster (FASTER holds
the verdicts; `describe()` says them). Same operands, same fp32 accumulation; only the order of the additions
inside MKL differs, so either is F.linear within rounding (the tests compare them).

Anything else goes to `F.linear` without a measurement: CUDA tensors (cuBLAS picks its own GEMV), more than
MAX_ROWS rows (prefill and training are GEMMs, where MKL is already fast), output widths N that do not split
into CHUNKS blocks, operands that are not plain contiguous tensors of one dtype (F.linear then casts or raises
as usual), and code being compiled (torch.compile traces F.linear: a timing cannot run inside a trace).
There is no Triton kernel and no reference here: the math is `F.linear`'s.
`DecodeLinear` is the nn.Linear that computes with it (the LLaMA decoder's layers: the model files stay plain).
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROWS = 32  # the decode engine's slots; beyond, a product is a GEMM and F.linear is MKL's GEMM
CHUNKS = 2  # blocks of W's rows per batched GEMM; 2 and 4 measured the same, 2 divides every LLaMA width
MARGIN = 1.1  # the batched GEMM must be this much faster to be used (a close call stays with F.linear)
MODE = "auto"  # "auto": measured per shape; "batched" / "f.linear": always that one (the tests)
FASTER = {}  # (N, K, dtype, rows, threads) -> (batched GEMM used?, F.linear s, batched s)


def _batched(x2, weight):
    """x2 (rows, K) @ weight (N, K)^T through one batched GEMM over CHUNKS blocks of weight's rows."""
    N, K = weight.shape
    rows = x2.shape[0]
    xt = x2.t().unsqueeze(0).expand(CHUNKS, K, rows)  # (CHUNKS, K, rows), a view
    y = torch.bmm(weight.view(CHUNKS, N // CHUNKS, K), xt)  # (CHUNKS, N/CHUNKS, rows)
    return y.permute(2, 0, 1).reshape(rows, N)  # (rows, N): block c holds outputs [c N/CHUNKS, (c+1) N/CHUNKS)


def _use_batched(x2, weight) -> bool:
    if MODE != "auto":
        return MODE == "batched"
    if torch.compiler.is_compiling():  # no timing inside a trace: the compiled code keeps F.linear
        return False
    key = (*weight.shape, weight.dtype, x2.shape[0], torch.get_num_threads())
    if key not in FASTER:
        with torch.no_grad():
            times = {F.linear: [], _batched: []}
            for f in (F.linear, _batched):  # warm up
                f(x2, weight)
            for _ in range(3):
                for f in times:
                    t0 = time.perf_counter()
                    f(x2, weight)
                    times[f].append(time.perf_counter() - t0)
        ref, batched = min(times[F.linear]), min(times[_batched])
        FASTER[key] = (batched * MARGIN < ref, ref, batched)
    return FASTER[key][0]


def linear(x, weight, bias=None):
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N)."""
    K = x.shape[-1]
    N = weight.shape[0]
    rows = x.numel() // K if K else 0
    if (x.is_cuda or not 0 < rows <= MAX_ROWS or N % CHUNKS or weight.dim() != 2 or weight.shape[1] != K
            or not weight.is_contiguous() or x.dtype != weight.dtype or not _use_batched(x.reshape(rows, K), weight)):
        return F.linear(x, weight, bias)
    y = _batched(x.reshape(rows, K), weight).view(*x.shape[:-1], N)  # (..., N)
    return y if bias is None else y + bias


def describe() -> str:
    """The measured verdicts so far, one per shape: 'N x K dtype, rows: batched GEMM (F.linear 1.2 ms, batched
    0.8 ms)'."""
    return "; ".join(f"{n} x {k} {str(dt).removeprefix('torch.')}, {rows} row(s), {threads} thread(s): "
                     f"{'batched GEMM' if used else 'F.linear'} (F.linear {ref * 1e3:.2f} ms, batched "
                     f"{b * 1e3:.2f} ms)" for (n, k, dt, rows, threads), (used, ref, b) in FASTER.items())


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, same names, same math) computed by `linear` above, so that a CPU decoding step's
    few rows take whichever of F.linear and the batched GEMM reads the weight faster here: the LLaMA decoder's
    layers."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
