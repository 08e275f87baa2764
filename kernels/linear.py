"""Linear layers for decoding on the CPU: y = x W^T (+ b) when x has only a few rows.

Decoding multiplies one row per sequence by every weight matrix, so a decode step is bound by reading the
weights from memory. On x86 CPUs `F.linear` sends a 1-4 row product to MKL's matrix-vector routine, which
reads an fp32 weight at ~16 GB/s on one thread of the project's 2-core CI-like machine (and ~9 GB/s for 2-4
rows), while a plain read of the same bytes (`W.sum()`) runs at ~35 GB/s. Viewing W (N, K) as CHUNKS blocks
of rows (a free view: no copy) and multiplying every block by x in one batched GEMM takes MKL's batched
matrix-matrix path instead: ~27 GB/s for one row, ~2x `F.linear` for two to four (measured end to end by
benchmarks/bench_generate_cpu.py), and 6-7 GB/s against F.linear's 3-4 GB/s for the 8-32 rows of a decode step
over the engine's slots (2026-12-01, torch 2.13.0, 2 threads; an 8-slot step of bench_engine.py's model: 99 ms
instead of 135 ms). Same operands, same fp32 accumulation; only the order of the additions
inside MKL differs.

Anything else goes to `F.linear`: CUDA tensors (cuBLAS picks its own GEMV), more than MAX_ROWS rows (prefill
and training are GEMMs, where MKL is already fast), output widths N that do not split into CHUNKS blocks, and operands
that are not plain contiguous tensors of one dtype (F.linear then casts or raises as usual).
There is no Triton kernel and no reference here: the math is `F.linear`'s, and the tests compare the two.
`DecodeLinear` is the nn.Linear that computes with it (the LLaMA decoder's layers: the model files stay plain).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROWS = 32  # the decode engine's slots; measured ~1.6-2x F.linear's GB/s at 8-32 rows too (torch 2.13, 2 threads)
CHUNKS = 2  # blocks of W's rows per batched GEMM; 2 and 4 measured the same, 2 divides every LLaMA width


def linear(x, weight, bias=None):
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N)."""
    K = x.shape[-1]
    N = weight.shape[0]
    rows = x.numel() // K if K else 0
    if (x.is_cuda or not 0 < rows <= MAX_ROWS or N % CHUNKS or weight.dim() != 2 or weight.shape[1] != K
            or not weight.is_contiguous() or x.dtype != weight.dtype):
        return F.linear(x, weight, bias)
    xt = x.reshape(rows, K).t().unsqueeze(0).expand(CHUNKS, K, rows)  # (CHUNKS, K, rows), a view
    y = torch.bmm(weight.view(CHUNKS, N // CHUNKS, K), xt)  # (CHUNKS, N/CHUNKS, rows)
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], N)  # (..., N): block c holds outputs [c N/CHUNKS, (c+1) N/CHUNKS)
    return y if bias is None else y + bias


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, same names, same math) computed by `linear` above, so that a CPU decoding step's
    few rows take the batched-GEMM route: the LLaMA decoder's layers."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
