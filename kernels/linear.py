"""Linear layers for decoding on the CPU: y = x W^T (+ b) when x has only a few rows.

Decoding multiplies one row per sequence by every weight matrix, so a decode step is bound by reading the
weights from memory. torch has several ways to compute that product, and which one reads W fastest depends on
the CPU, the dtype and the number of rows, in every direction, so it is measured, not assumed. The candidates:
  * F.linear: on x86, MKL's matrix-vector routine for fp32, oneDNN's for bf16;
  * batched GEMM: W (N, K) viewed as CHUNKS blocks of rows (a free view: no copy), every block times x in one
    torch.bmm, which takes MKL's batched matrix-matrix path;
  * torch.mv (one row only): its own matrix-vector kernel.
Measured:
    2-core AMD EPYC (AVX2), 2026-12-01: the batched GEMM ~27 GB/s for one fp32 row against F.linear's ~16, ~2x
        for 2-4 rows, 6-7 GB/s against 3-4 for the 8-32 rows of an 8-slot engine step;
    2-core Intel Xeon (AVX-512), 2026-12-07: F.linear twice as fast for one fp32 row (28 against 13 GB/s, 768 x
        2048, 1 thread), about even at 4 rows, the batched GEMM 1.2-1.5x faster at 8-32 rows; for one bf16 row
        torch.mv 1.1-1.25x faster than F.linear (12.0 against 10.2 GB/s at 5632 x 2048, 1 thread).
So the first calls of a shape (N, K, dtype, rows, threads) take turns among the candidates, each timed on the
weight it was given, where it stands: in a decode step the other layers' reads have just pushed that weight out of
the caches, and that is the speed that matters (timed again at once, from the cache, the paths measured even
where, from memory, torch.mv reads bf16 1.1-1.25x faster than F.linear). After TRIALS timings of each, the fastest
is kept only when it is at least MARGIN times faster than F.linear (FASTER holds the verdicts; `describe()` says
them). While a shape is measured its calls return F.linear's product (computed after the timed path when that was
another one), so no answer depends on the order of the turns; a shape's first answers and its later ones may
differ in the last bit, as two processes whose verdicts differ do. Same operands, fp32 accumulation; only the
order of the additions differs, so each path is F.linear within rounding (the tests compare them).
Compiled code (Engine(compile=True)) takes the same choice through one opaque op, `measured_linear`: a timing
cannot run inside a trace, and inductor would rewrite torch.mv into a reduction of its own (16% slower, measured).

Anything else goes to `F.linear` without a measurement: CUDA tensors (cuBLAS picks its own GEMV), more than
MAX_ROWS rows (prefill and training are GEMMs, where MKL is already fast), output widths N that do not split
into CHUNKS blocks, operands that are not plain contiguous tensors of one dtype (F.linear then casts or raises
as usual), and products that need a gradient in compiled code (the opaque op has no backward).
There is no Triton kernel and no reference here: the math is `F.linear`'s.
`DecodeLinear` is the nn.Linear that computes with it (the LLaMA decoder's layers: the model files stay plain).
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROWS = 32  # the decode engine's slots; beyond, a product is a GEMM and F.linear is MKL's GEMM
CHUNKS = 2  # blocks of W's rows per batched GEMM; 2 and 4 measured the same, 2 divides every LLaMA width
MARGIN = 1.05  # another path must be this much faster than F.linear to be used (a close call stays with F.linear)
TRIALS = 5  # timed calls of each path before a shape's verdict (the fastest of them counts)
MODE = "auto"  # "auto": measured per shape; a name of PATHS: always that one where it applies (the tests)
FASTER = {}  # (N, K, dtype, rows, threads) -> (the path used, {path: best seconds})
TIMES = {}  # the same keys -> {path: [seconds of each timed call]}, while a shape is being measured


def _batched(x2, weight):
    """x2 (rows, K) @ weight (N, K)^T through one batched GEMM over CHUNKS blocks of weight's rows."""
    N, K = weight.shape
    rows = x2.shape[0]
    xt = x2.t().unsqueeze(0).expand(CHUNKS, K, rows)  # (CHUNKS, K, rows), a view
    y = torch.bmm(weight.view(CHUNKS, N // CHUNKS, K), xt)  # (CHUNKS, N/CHUNKS, rows)
    return y.permute(2, 0, 1).reshape(rows, N)  # (rows, N): block c holds outputs [c N/CHUNKS, (c+1) N/CHUNKS)


def _mv(x2, weight):
    """x2 (1, K) @ weight (N, K)^T through torch.mv."""
    return torch.mv(weight, x2[0]).unsqueeze(0)


PATHS = {"F.linear": lambda x2, weight: F.linear(x2, weight), "batched GEMM": _batched, "torch.mv": _mv}


def _candidates(rows: int) -> list:
    return [p for p in PATHS if p != "torch.mv" or rows == 1]


def _product(x2, weight):
    """x2 (rows, K) @ weight (N, K)^T by the path chosen for this shape, or, while it is being measured, timing the
    path whose turn it is and returning F.linear's product (see the module docstring)."""
    rows = x2.shape[0]
    if MODE != "auto":
        return PATHS[MODE if MODE in _candidates(rows) else "F.linear"](x2, weight)
    key = (*weight.shape, weight.dtype, rows, torch.get_num_threads())
    if key in FASTER:
        return PATHS[FASTER[key][0]](x2, weight)
    times = TIMES.setdefault(key, {p: [] for p in _candidates(rows)})
    path = min(times, key=lambda p: len(times[p]))  # the path timed least so far
    t0 = time.perf_counter()
    y = PATHS[path](x2, weight)
    times[path].append(time.perf_counter() - t0)
    if all(len(t) >= TRIALS for t in times.values()) and TIMES.pop(key, None):  # (>=, None: two threads at once)
        best = {p: min(t) for p, t in times.items()}
        fastest = min(best, key=best.get)
        FASTER[key] = (fastest if best[fastest] * MARGIN < best["F.linear"] else "F.linear", best)
    return y if path == "F.linear" else F.linear(x2, weight)


def linear(x, weight, bias=None):
    """x (..., K) @ weight (N, K)^T + bias (N,) -> (..., N)."""
    K = x.shape[-1]
    N = weight.shape[0]
    rows = x.numel() // K if K else 0
    if (x.is_cuda or not 0 < rows <= MAX_ROWS or N % CHUNKS or weight.dim() != 2 or weight.shape[1] != K
            or not weight.is_contiguous() or x.dtype != weight.dtype):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return F.linear(x, weight, bias)
        y = measured_linear(x.reshape(rows, K), weight)
    else:
        y = _product(x.reshape(rows, K), weight)
    y = y.view(*x.shape[:-1], N)
    return y if bias is None else y + bias


@torch.library.custom_op("minillava::measured_linear", mutates_args=())
def measured_linear(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`_product` as one opaque op, which compiled code calls as it is (contiguous, as the trace was told)."""
    return _product(x2, weight).contiguous()


@measured_linear.register_fake
def _measured_linear_shape(x2, weight):
    """What a trace needs of the op: its output's shape and dtype."""
    return x2.new_empty(x2.shape[0], weight.shape[0])


def describe() -> str:
    """The measured verdicts so far, one per shape: 'N x K dtype, rows, threads: path (F.linear 1.20 ms, batched
    GEMM 0.80 ms, ...)', then the shapes still being measured."""
    def shape(n, k, dt, rows, threads):
        return f"{n} x {k} {str(dt).removeprefix('torch.')}, {rows} row(s), {threads} thread(s)"
    return "; ".join([f"{shape(*key)}: {used} (" + ", ".join(f"{p} {t * 1e3:.2f} ms" for p, t in times.items()) + ")"
                      for key, (used, times) in FASTER.items()]
                     + [f"{shape(*key)}: measuring ({sum(map(len, times.values()))} of {TRIALS * len(times)} "
                        "timings)" for key, times in list(TIMES.items())])


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, same names, same math) computed by `linear` above, so that a CPU decoding step's
    few rows take whichever of its paths reads the weight fastest here: the LLaMA decoder's layers (or, for
    inference, several of them joined into one: `concat`)."""
    parts = None  # out_features of the layers this one joins (concat), in order

    @classmethod
    def concat(cls, layers):
        """Layers without bias that read the same x as one, their outputs side by side (`parts` says where each
        one's end), for inference: a decode step then reads one larger matrix where it read several (q, k, v: three;
        gate, up: two), and pays the cost of each product beyond its reading once (measured, 1.1B bf16 on the CPU:
        steps 5% shorter eager, 7-20% compiled; benchmarks/RESULTS.md). The weight is a view of the parts' memory,
        which must lie back to back in one storage, in order (weights/load.py reads them so for inference); else
        None: joining never copies. The joined layer has no checkpoint name: it cannot be saved."""
        first = layers[0]
        for i, m in enumerate(layers):
            if type(m) is not cls or m.bias is not None or m.in_features != first.in_features or m.parts:
                raise ValueError(f"DecodeLinear.concat: layer {i} ({m}) is not a DecodeLinear without bias, not "
                                 f"joined, of in_features {first.in_features}")
        joined = _adjacent([m.weight.detach() for m in layers])
        if joined is None:
            return None
        with torch.device("meta"):  # its weight is the parts' block below: nothing to allocate first
            layer = cls(first.in_features, sum(m.out_features for m in layers), bias=False)
        layer.weight = nn.Parameter(joined, requires_grad=False)
        layer.parts = [m.out_features for m in layers]
        return layer

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.parts:
            raise RuntimeError(f"{prefix.rstrip('.') or 'DecodeLinear'}: {len(self.parts)} layers joined for "
                               "inference (DecodeLinear.concat) cannot be saved; load the model without "
                               "inference=True to save it")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def _adjacent(weights):
    """The 2-D contiguous weights (N_i, K) as one (sum N_i, K) view when each starts where the one before ends, in
    one storage and of one dtype; else None."""
    first, end, rows = weights[0], weights[0].storage_offset(), 0
    for w in weights:
        if (not w.is_contiguous() or w.dtype != first.dtype or w.shape[1:] != first.shape[1:]
                or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or w.storage_offset() != end):
            return None
        end, rows = end + w.numel(), rows + w.shape[0]
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))
