"""Weight-only int8 / int4 linear layers: y = x W^T (+ b), W stored in 8 or 4 bits and dequantized where it is used.

Decoding reads every weight once per token, so bytes per weight set the speed (kernels/linear.py); storing W in
8 or 4 bits reads 1/4 or 1/8 of fp32's bytes. The activations, the accumulation and the output stay floating
point. The formats (what weights/quantize.py writes, what every path below reads), for W (N out, K in):

    int8  per output channel, symmetric:   W[n, k] ~ q[n, k] * scale[n]
          q int8 in [-127, 127], scale[n] = max_k |W[n, k]| / 127            qweight int8 (N, K), scales (N,)
    int4  groups of G inputs, with offsets: W[n, k] ~ (q[n, k] - 8) * scale[n, g] + offset[n, g],  g = k // G
          q in [0, 15], scale = (max - min) / 15 over the group, offset = min + 8 * scale (the value of code 8)
          qweight uint8 (N, K / 2): byte j holds q[:, 2j] in its low nibble, q[:, 2j + 1] in its high one;
          scales, offsets (N, K / G)

int4 uses offsets (asymmetric) rather than a symmetric [-7, 7]: a group whose weights are not centred on 0 still
gets all 16 codes, and it is the form PyTorch's int4 CPU kernel computes, so the stored numbers are used as they
are. Scales and offsets are bfloat16 (PyTorch's CPU kernels take them so): the stored numbers are exactly the
ones every path multiplies by, and the reference dequantizes them in fp32.

Paths, chosen by `quant_linear`:
  * Triton (CUDA; on CPU in the interpreter): `_wq_linear_kernel` reads a (BLOCK_N, BLOCK_K) tile of codes,
    dequantizes it in registers and multiplies; one kernel for decode (M = 1..32) and prefill shapes.
  * CPU, int8 (every row count): oneDNN's int8 matmul (`torch.ops.onednn.qlinear_pointwise`, the kernel
    PyTorch's own x86 quantization runs: VNNI / AMX int8 dot products, int32 sums). It multiplies int8 by int8,
    so x goes in as two int8 digits per value (`int8_digits`): x ~ step * (hi + lo / 254) with step = the
    row's max |x| / 127, 15 bits of the row's range, error <= step / 508 per value. The digits are two rows
    of one product, which reads the weight once (the same time as one row: measured). `pack_for_cpu` puts the
    codes in oneDNN's layout once at load. Measured 2026-12-07 on a 2-core Xeon (AVX-512 VNNI, AMX), one
    thread: 10-11 GB/s of int8 weight against 7-8 for `_weight_int8pack_mm`, and a 299-row prefill 5x faster
    than fp32's F.linear. Where it does not run or computes wrongly (`onednn_int8_problem`, checked once:
    a CPU without VNNI would saturate 16-bit pair sums), int8 layers keep the path below, with a notice.
  * CPU, at most PACKED_MAX_ROWS rows (decoding): PyTorch's weight-only kernels, `_weight_int4pack_mm_for_cpu`
    (and `_weight_int8pack_mm` where oneDNN's int8 is not usable), which take bf16 activations (x is rounded
    to bf16 for them: on an AVX2 CPU their fp32 variants are 9-14x slower, measured 2026-12-01). int4 needs its
    codes in PyTorch's own tiled layout, which depends on the CPU's vector width, so `QuantLinear.pack_for_cpu`
    converts them once at load and that layout never reaches a file.
  * CPU, int4, DEQUANT_ROWS rows or more (prefill): PyTorch's int4 kernel costs the same per row at every row
    count (made for decoding), so here `dequantize_int4_cpu` reads its tiled layout back (`int4_cpu_tile`
    finds the tile width once; the codes are not kept twice) and blocks of BLOCK_ROWS output channels are
    dequantized to bf16 for one bf16 GEMM each (AMX where the CPU has it). Measured 2026-12-07, 2-core Xeon:
    even with the kernel at 64-128 rows (by shape), 2-3.7x faster at 315 (1 and 2 threads); a CPU whose layout
    is another keeps the kernel, with a notice.
  * Otherwise (prefill on CPU, CUDA without validated kernels): the reference in blocks of BLOCK_ROWS output
    channels (`_blocked_matmul`, as above), so the dequantized weight is never whole in memory.
Inference only: there is no backward (training quantized weights, QLoRA, is not built).
"""
import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillava.kernels.dispatch import COMPILE, tl, triton, use_triton

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)  # int4 groups PyTorch's CPU kernel and the Triton kernel's BLOCK_K both accept
SCALE_DTYPE = torch.bfloat16
PACKED_MAX_ROWS = 4  # CPU: PyTorch's packed kernels up to here; measured faster than dequantize-and-GEMM at <= 4
DEQUANT_ROWS = 96  # CPU int4 packed: from here on, dequantized blocks in bf16 GEMMs (measured: even at 64-128 rows)
BLOCK_ROWS = 1024  # output channels dequantized at once (16 MB of fp32 at K = 4096); whole int4 CPU tiles (32, 64)
CPU_PACK_TILES = 8  # innerKTiles of PyTorch's int4 CPU packing (the value its CPU path accepts)


# ----------------------------------------------------------------------------------------------------------
# Quantize and dequantize: the formats
# ----------------------------------------------------------------------------------------------------------
def quantize(weight, bits: int, group_size: int | None = None) -> dict:
    """weight (N, K) float -> {"qweight", "scales"[, "offsets"]} in the formats above, BLOCK_ROWS rows at a time
    into tensors allocated once at their final size (the fp32 temporaries are one block's, whatever N is; no
    concatenation, which would hold every block twice and leave the heap fragmented)."""
    N, K = weight.shape
    check_shape(N, K, bits, group_size, "weight")
    out = None
    for r in range(0, N, BLOCK_ROWS):
        block = _quantize_rows(weight[r:r + BLOCK_ROWS].float(), bits, group_size)
        if out is None:
            out = {name: t.new_empty((N, *t.shape[1:])) for name, t in block.items()}
        for name, t in block.items():
            out[name][r:r + t.shape[0]] = t
    return out


def _scale_up(s):
    """fp32 scales -> bf16, rounded up (never down), so the largest weight still fits the codes: no clamping, and
    every weight is within half a step of its code."""
    b = s.to(SCALE_DTYPE)
    return torch.where(b.float() < s, torch.nextafter(b, torch.full_like(b, float("inf"))), b)


def _quantize_rows(w, bits, group_size):
    if bits == 8:
        scale = _scale_up(w.abs().amax(dim=1) / 127)  # (n,)
        s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # an all-zero row: q = 0
        return {"qweight": (w / s).round().clamp(-127, 127).to(torch.int8), "scales": scale}
    n, K = w.shape
    wg = w.view(n, K // group_size, group_size)  # (n, K/G, G)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (n, K/G)
    scale = _scale_up((hi - lo) / 15)
    offset = (lo + 8 * scale.float()).to(SCALE_DTYPE)
    s = scale.float().clamp(min=torch.finfo(torch.float32).tiny)[..., None]  # a constant group: every q = 8
    q = ((wg - offset.float()[..., None]) / s + 8).round().clamp(0, 15).to(torch.uint8).view(n, K)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scale, "offsets": offset}


def int4_codes(qweight):
    """Portable int4 bytes (N, K / 2) -> the codes (N, K), uint8 in [0, 15]: each byte's low nibble, then its high."""
    return torch.stack([qweight & 15, qweight >> 4], dim=-1).view(qweight.shape[0], -1)


def dequantize(qweight, scales, offsets=None, group_size: int | None = None):
    """The formats' meaning: -> W (N, K) in fp32."""
    if offsets is None:  # int8
        return qweight.float() * scales.float()[:, None]
    q = int4_codes(qweight)  # (N, K)
    N, K = q.shape
    w = (q.float().view(N, K // group_size, group_size) - 8) * scales.float()[..., None] + offsets.float()[..., None]
    return w.view(N, K)


def check_shape(N: int, K: int, bits: int, group_size, what: str):
    """The shapes the formats and kernels take; a named error otherwise."""
    if bits not in BITS:
        raise ValueError(f"{what}: {bits} bits is not supported; use one of {BITS}")
    if bits == 4:
        if group_size not in GROUP_SIZES:
            raise ValueError(f"{what}: int4 group size {group_size} is not supported; use one of {GROUP_SIZES}")
        if K % group_size:
            raise ValueError(f"{what}: int4 groups of {group_size} do not divide its {K} input features "
                             f"(use a group size that does: {[g for g in GROUP_SIZES if K % g == 0] or 'none'})")


# ----------------------------------------------------------------------------------------------------------
# Reference: dequantize, then a plain matmul
# ----------------------------------------------------------------------------------------------------------
def quant_linear_reference(x, qweight, scales, offsets=None, group_size=None, bias=None):
    """x (..., K) -> (..., N) in x's dtype: F.linear with the dequantized weight, in fp32."""
    y = F.linear(x.float(), dequantize(qweight, scales, offsets, group_size))
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _blocked_reference(x, qweight, scales, offsets, group_size):
    """The reference BLOCK_ROWS output channels at a time, each block dequantized to x's dtype (the GEMM then runs
    in x's dtype: the prefill path, where a whole dequantized matrix would cost 4 bytes per weight)."""
    def rows(r, e):
        return dequantize(qweight[r:e], scales[r:e], None if offsets is None else offsets[r:e], group_size)
    return _blocked_matmul(x, scales.shape[0], rows)


def _blocked_matmul(x, N, dequantize_rows):
    """x (..., K) @ W^T -> (..., N) in x's dtype, W dequantized BLOCK_ROWS output channels at a time by
    dequantize_rows(r, e) -> W[r:e] (e - r, K) fp32, each block cast to x's dtype for one GEMM."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    y = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    for r in range(0, N, BLOCK_ROWS):
        w = dequantize_rows(r, min(N, r + BLOCK_ROWS))
        torch.mm(x2, w.to(x.dtype).t(), out=y[:, r:r + BLOCK_ROWS])  # (M, K) @ (K, rows) -> (M, rows)
    return y.view(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------------------------------
# PyTorch's CPU weight-only kernels
# ----------------------------------------------------------------------------------------------------------
def pack_int4_for_cpu(qweight, scales, offsets):
    """Portable int4 (above) -> (codes in PyTorch's CPU tiling, scales_and_zeros (K/G, N, 2) bf16), the operands
    of `_weight_int4pack_mm_for_cpu`. Converted BLOCK_ROWS rows at a time (the op's tiles are 32 or 64 rows, so
    blocks of 1024 pack the same as the whole): the int32 temporary it needs is one block's."""
    N = qweight.shape[0]
    if N % 16:
        raise ValueError(f"PyTorch's int4 CPU kernel needs out_features divisible by 16, not {N}")
    packed = []
    for r in range(0, N, BLOCK_ROWS):
        codes = int4_codes(qweight[r:r + BLOCK_ROWS]).to(torch.int32)  # (rows, K)
        packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, CPU_PACK_TILES))
    scales_and_zeros = torch.stack([scales, offsets], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
    return torch.cat(packed), scales_and_zeros


def dequantize_int4_cpu(packed, scales_and_zeros, group_size: int, tile: int):
    """Codes in PyTorch's CPU tiling (N, K / 2), scales_and_zeros (K/G, N, 2) -> W (N, K) fp32, the same numbers
    as `dequantize` (as a transposed view of a (K, N) buffer: the layout's own order, ready for x @ W^T). The
    layout, where N is a multiple of `tile` (int4_cpu_tile): tile t of output channels is K rows of t/2 bytes,
    byte j of row k holding channel j in its low nibble and channel j + t/2 in its high one."""
    N, K = packed.shape[0], packed.shape[1] * 2
    v = packed.view(N // tile, K, tile // 2)  # (tiles, K, t/2)
    wt = torch.empty(K, N // tile, 2, tile // 2)  # W^T, channel n = tile * t + half * t/2 + j
    wt[:, :, 0] = ((v & 15).view(torch.int8) - 8).transpose(0, 1)  # codes - 8, exact in int8 and in fp32
    wt[:, :, 1] = ((v >> 4).view(torch.int8) - 8).transpose(0, 1)
    wt = wt.view(K // group_size, group_size, N)
    scales, offsets = scales_and_zeros[:, None, :, 0].float(), scales_and_zeros[:, None, :, 1].float()
    return torch.addcmul(offsets, wt, scales, out=wt).view(K, N).t()  # (q - 8) * scale + offset, as dequantize


@functools.lru_cache(maxsize=None)
def int4_cpu_tile() -> int | None:
    """Output channels per tile of PyTorch's int4 CPU layout here (64 where it runs AVX-512, 32 with AVX2; it
    follows the CPU), found by packing known codes and reading them back with dequantize_int4_cpu; None where
    the layout is none of these (then int4 prefill stays on PyTorch's kernel)."""
    codes = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    portable = codes[:, 0::2] | (codes[:, 1::2] << 4)
    ones = torch.ones(128, 1, dtype=SCALE_DTYPE)
    packed, sz = pack_int4_for_cpu(portable, ones, ones * 8)  # scale 1, offset 8: W = the codes themselves
    for tile in (64, 32):
        if torch.equal(dequantize_int4_cpu(packed, sz, 64, tile), codes.float()):
            return tile
    return None


X_DIGIT = 254  # x's second int8 digit counts steps of 1 / X_DIGIT of the first's: |lo| <= 0.5 * 254 = 127


def int8_digits(x):
    """x (M, K) float -> (digits (2M, K) int8: the M rows of hi, then the M rows of lo; step (M, 1) fp32), where
    x ~ step * (hi + lo / X_DIGIT) with |error| <= step / (2 X_DIGIT): step = max |x_row| / 127,
    hi = round(x / step), lo = round((x / step - hi) * X_DIGIT), both in [-127, 127]."""
    x = x.float()
    step = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127  # (M, 1)
    t = (x / step).clamp_(-127, 127)  # the clamp only bites when step underflowed (a row of near-zeros)
    hi = t.round()
    lo = ((t - hi) * X_DIGIT).round_()
    return torch.cat([hi, lo]).to(torch.int8), step


def pack_int8_for_cpu(qweight, scales):
    """int8 codes (N, K), scales (N,) -> the operands of oneDNN's int8 matmul: the codes in its own blocked
    layout (an opaque tensor; the layout is chosen for this CPU), the scales in fp32, zero points (all 0)."""
    packed = torch.ops.onednn.qlinear_prepack(qweight, [1, qweight.shape[1]])
    return packed, scales.float(), torch.zeros(scales.shape[0], dtype=torch.int64)


def _int8_matmul(digits, packed, scales, zeros):
    """int8 (M, K) x packed int8 codes -> (M, N) fp32: sum_k digit * code, times the output channel's scale.
    In a compiled step (Engine(compile=True)) through `onednn_int8_matmul`: inductor's own lowering of oneDNN's
    op wants the packed weight frozen into the graph as a constant, and fails on a module's buffer."""
    if torch.compiler.is_compiling():
        return onednn_int8_matmul(digits, packed, scales, zeros)
    return _qlinear(digits, packed, scales, zeros)


def _qlinear(digits, packed, scales, zeros):
    return torch.ops.onednn.qlinear_pointwise(digits, 1.0, 0, packed, scales, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


@torch.library.custom_op("minillava::onednn_int8_matmul", mutates_args=())
def onednn_int8_matmul(digits: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor) -> torch.Tensor:
    """_int8_matmul as one opaque op, which compiled code calls as it is."""
    return _qlinear(digits, packed, scales, zeros)


@onednn_int8_matmul.register_fake
def _int8_matmul_shape(digits, packed, scales, zeros):
    """What a trace needs of the op: its output's shape and dtype."""
    return digits.new_empty(digits.shape[0], scales.shape[0], dtype=torch.float32)


def _onednn_int8(x2, packed, scales, zeros):
    """x (M, K) -> (M, N) fp32: both digit rows of x through one int8 matmul, then each row's step applied."""
    digits, step = int8_digits(x2)
    y = _int8_matmul(digits, packed, scales, zeros)  # (2M, N)
    M = x2.shape[0]
    return torch.addcmul(y[:M] * step, y[M:], step / X_DIGIT)


@functools.lru_cache(maxsize=None)
def onednn_int8_problem():
    """None when oneDNN's int8 matmul runs here and sums exactly; else why not. Asked once, on the codes where a
    CPU without VNNI goes wrong (+-127 x +-127 summed in 16-bit pairs saturates) and on random ones."""
    g = torch.Generator().manual_seed(0)
    K = 512
    codes = torch.randint(-127, 128, (4, K), dtype=torch.int8, generator=g)
    codes[0], codes[1] = 127, -127
    x = torch.randint(-127, 128, (3, K), dtype=torch.int8, generator=g)
    x[0], x[1] = 127, -127
    try:
        y = _int8_matmul(x, *pack_int8_for_cpu(codes, torch.ones(4)))
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return f"is not available in this torch build ({str(e).splitlines()[0][:120]})"
    exact = x.double() @ codes.double().t()
    if not torch.allclose(y.double(), exact, rtol=1e-6, atol=0):
        return f"sums wrongly on this CPU (127 x 127 x {K}: {y[0, 0].item():.0f}, exact {exact[0, 0].item():.0f})"
    return None


@functools.lru_cache(maxsize=None)
def _say_once(line: str):
    print(line, file=sys.stderr, flush=True)


def _cpu_packed(x, layer):
    """x (M, K) -> (M, N) through PyTorch's kernels (see the module docstring)."""
    if layer.bits == 8 and layer.cpu_packed:
        return _onednn_int8(x, layer.qweight, layer.scales_fp32, layer.zero_points)
    xb = x.to(torch.bfloat16)
    if layer.bits == 8:
        return torch.ops.aten._weight_int8pack_mm(xb, layer.qweight, layer.scales)
    if x.shape[0] >= DEQUANT_ROWS:
        tile = int4_cpu_tile()
        if tile is None:
            _say_once("int4 prefill: PyTorch's int4 CPU layout here is not one minillava reads; prefill runs its "
                      "decoding kernel (slower)")
        elif layer.out_features % tile == 0:
            def rows(r, e):
                return dequantize_int4_cpu(layer.qweight[r:e], layer.scales_and_zeros[:, r:e], layer.group_size, tile)
            return _blocked_matmul(xb, layer.out_features, rows)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, layer.qweight, layer.group_size, layer.scales_and_zeros)


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _wq_linear_kernel(
    x_ptr,  # (M, K) activations, contiguous
    q_ptr,  # int8 (N, K) codes, or uint8 (N, K / 2) two int4 codes per byte
    s_ptr,  # scales: (N,) for int8, (N, K / G) for int4
    o_ptr,  # int4 offsets (N, K / G); unused for int8
    y_ptr,  # (M, N) output, contiguous, x's dtype
    M, N, K,
    BITS: tl.constexpr,  # 8 or 4
    G: tl.constexpr,  # int4 group size (a multiple of BLOCK_K: one group per K tile); unused for int8
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        w_mask = (rn[:, None] < N) & (k[None, :] < K)
        if BITS == 8:  # codes as they are; the per-channel scale is applied once, after the K loop
            w = tl.load(q_ptr + rn[:, None] * K + k[None, :], mask=w_mask, other=0).to(tl.float32)
        else:  # the tile's bytes (each read for its two k), the nibble k % 2 selects, then this group's scale
            byte = tl.load(q_ptr + rn[:, None] * (K // 2) + k[None, :] // 2, mask=w_mask, other=0).to(tl.int32)
            code = (byte >> ((k[None, :] % 2) * 4)) & 15
            g = k0 // G
            scale = tl.load(s_ptr + rn * (K // G) + g, mask=rn < N, other=0.0).to(tl.float32)
            offset = tl.load(o_ptr + rn * (K // G) + g, mask=rn < N, other=0.0).to(tl.float32)
            w = (code.to(tl.float32) - 8.0) * scale[:, None] + offset[:, None]  # (BLOCK_N, BLOCK_K), fp32
        # int8 codes are exact in fp16/bf16; an int4 weight is rounded once to x's dtype, as a dense weight is.
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_N), fp32 accumulation
    if BITS == 8:
        acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 32  # one config: tl.dot's smallest M tile; BLOCK_K divides every group size


def _triton_linear(x, qweight, scales, offsets, group_size, bits):
    """Launcher: x (..., K) -> (..., N)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    M, K = x2.shape
    N = scales.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _wq_linear_kernel[grid](x2, qweight, scales, scales if offsets is None else offsets, y, M, N, K,
                            BITS=bits, G=group_size or BLOCK_K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                            **COMPILE)
    return y.view(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A frozen nn.Linear whose weight is stored in 8 or 4 bits (the formats above). Its state dict holds
    qweight, scales (and int4 offsets), plus bias when the layer has one: what a quantized checkpoint stores."""

    def __init__(self, in_features, out_features, bits, group_size=None, bias=False, device=None,
                 dtype=torch.float32):
        super().__init__()
        check_shape(out_features, in_features, bits, group_size, "QuantLinear")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size if bits == 4 else None
        N, K = out_features, in_features
        q_shape, s_shape = ((N, K), (N,)) if bits == 8 else ((N, K // 2), (N, K // group_size))
        self.register_buffer("qweight", torch.empty(q_shape, dtype=torch.int8 if bits == 8 else torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.empty(s_shape, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("offsets", None if bits == 8 else torch.empty(s_shape, dtype=SCALE_DTYPE,
                                                                            device=device))
        self.register_buffer("bias", None if not bias else torch.empty(N, dtype=dtype, device=device))
        self.cpu_packed = False  # int4 codes in PyTorch's CPU tiling (pack_for_cpu); scales_and_zeros then
        self.parts = None  # out_features of the layers this one joins (concat), in order

    @classmethod
    def from_float(cls, linear: nn.Linear, bits, group_size=None):
        layer = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        for name, t in quantize(linear.weight.detach(), bits, group_size).items():
            setattr(layer, name, t)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    @classmethod
    def concat(cls, layers):
        """Layers that read the same x as one, their outputs side by side (`parts` says where each one's end):
        one matmul reads all their weights and x is prepared once, where each call of a CPU kernel costs ~0.1 ms
        beyond its reading (benchmarks/RESULTS.md). For inference: the joined layer has no checkpoint name."""
        if not layers:
            raise ValueError("QuantLinear.concat needs at least one layer")
        first = layers[0]
        for i, m in enumerate(layers):
            if m.cpu_packed:
                problem = "is packed for the CPU already"
            elif m.bias is not None:
                problem = "has a bias"
            elif (m.in_features, m.bits, m.group_size) != (first.in_features, first.bits, first.group_size):
                problem = f"differs from layer 0 ({first})"
            else:
                continue
            raise ValueError(f"QuantLinear.concat: layer {i} ({m}) {problem}; it joins unpacked layers without "
                             "bias, of one input width and format")
        with torch.device("meta"):  # its buffers are the parts' joined below: nothing to allocate first
            layer = cls(first.in_features, sum(m.out_features for m in layers), first.bits, first.group_size)
        layer.qweight = torch.cat([m.qweight for m in layers])  # every format keeps an output channel's row
        layer.scales = torch.cat([m.scales for m in layers])
        layer.offsets = None if first.bits == 8 else torch.cat([m.offsets for m in layers])
        layer.parts = [m.out_features for m in layers]
        return layer

    def pack_for_cpu(self):
        """On the CPU, once at load: int4 codes into PyTorch's tiling, int8 codes into oneDNN's layout (where
        oneDNN's int8 matmul works here; else they stay as they are, with a notice). The portable codes are
        dropped (not kept twice), so a packed layer cannot be saved."""
        if self.cpu_packed:
            return self
        if self.bits == 4 and self.out_features % 16 == 0:
            packed, sz = pack_int4_for_cpu(self.qweight, self.scales, self.offsets)
            self.qweight, self.scales, self.offsets = packed, None, None
            self.register_buffer("scales_and_zeros", sz, persistent=False)
            self.cpu_packed = True
        elif self.bits == 8:
            problem = onednn_int8_problem()
            if problem:
                _say_once(f"int8 layers: oneDNN's int8 matmul {problem}; they run torch._weight_int8pack_mm "
                          "with bf16 activations instead (slower)")
                return self
            packed, scales, zeros = pack_int8_for_cpu(self.qweight, self.scales)
            self.qweight, self.scales = packed, None
            self.register_buffer("scales_fp32", scales, persistent=False)
            self.register_buffer("zero_points", zeros, persistent=False)
            self.cpu_packed = True
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        name = prefix.rstrip(".") or "QuantLinear"
        if self.parts:
            raise RuntimeError(f"{name}: {len(self.parts)} layers joined for inference (QuantLinear.concat) cannot "
                               "be saved; python quantize.py writes a quantized checkpoint from the dense one")
        if self.cpu_packed:
            raise RuntimeError(f"{name}: int{self.bits} codes packed for the CPU kernel cannot be saved; quantize "
                               "the source checkpoint again (python quantize.py)")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, x):
        return quant_linear(x, self)

    def extra_repr(self):
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        parts = f", parts={self.parts}" if self.parts else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}{parts}"


def quant_linear(x, layer: QuantLinear):
    """x (..., K) -> (..., N) in x's dtype, by the path the module docstring describes."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"QuantLinear({layer.in_features} -> {layer.out_features}) got input of width "
                         f"{x.shape[-1]}")
    rows = x.numel() // x.shape[-1]
    fused = use_triton("quant_linear", x, "weights prepacked for the CPU" if layer.cpu_packed else None)
    if layer.cpu_packed or (layer.bits == 8 and not x.is_cuda and 0 < rows <= PACKED_MAX_ROWS and not fused):
        y = _cpu_packed(x.reshape(rows, -1), layer).to(x.dtype).view(*x.shape[:-1], layer.out_features)
    elif fused:
        y = _triton_linear(x, layer.qweight, layer.scales, layer.offsets, layer.group_size, layer.bits)
    else:
        y = _blocked_reference(x, layer.qweight, layer.scales, layer.offsets, layer.group_size)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)
