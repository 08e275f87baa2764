"""MLP kernels (kernels/mlp.py) against eager PyTorch (cuBLAS GEMMs + elementwise ops) on LLaVA-1.5-7B shapes.

    python benchmarks/bench_mlp.py                          # bf16: SwiGLU, the LLaMA MLP block, CLIP fc1
    python benchmarks/bench_mlp.py --tokens 4096 --clip-images 16 --dtype fp16

Needs a CUDA GPU (exits with status 2 otherwise). Ops, each forward (no_grad) and forward+backward:
- swiglu:     silu(x W_gate^T) * (x W_up^T), Vicuna-7B's C=4096 -> F=11008, over `--tokens` rows;
- mlp block:  down(swiglu(x)), the whole LLaMA MLP: what the activation-memory target is about;
- fc1 gelu:   quick_gelu(x W^T + b), CLIP ViT-L/14-336's 1024 -> 4096, over 577 tokens x `--clip-images`.
TFLOP/s count the model's FLOPs (2 M K N per GEMM; backward twice the forward), not the fused SwiGLU's
recomputation of gate/up in backward (+4 M C F), so the figure compares like with like.
Memory (forward+backward of one call, fresh gradients), eager vs ours: "saved", the tensors autograd keeps for
backward (inputs and weights not counted); "held", the memory allocated between forward and backward (saved
tensors plus the output); "peak", the most allocated during forward+backward; all above the inputs and weights.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import bench_common as common
from minillava.kernels.mlp import (LinearQuickGELUFunction, SwiGLUFunction, linear_quick_gelu,
                                   linear_quick_gelu_reference, swiglu_reference)


@dataclass
class Defaults:
    dtype: str = "bf16"
    tokens: list = field(default_factory=lambda: [2048, 8192, 16384])  # LLM rows M = B * T
    hidden: int = 4096  # Vicuna-7B C
    intermediate: int = 11008  # Vicuna-7B F
    clip_images: list = field(default_factory=lambda: [16, 64])  # CLIP rows M = images * 577
    clip_hidden: int = 1024
    clip_intermediate: int = 4096


def _ours_swiglu(x, wg, wu):
    return SwiGLUFunction.apply(x, wg, wu)


def _ours_block(x, wg, wu, wd):
    return F.linear(SwiGLUFunction.apply(x, wg, wu), wd)  # (M, F) @ (F, C)^T


def _eager_block(x, wg, wu, wd):
    return F.linear(swiglu_reference(x, wg, wu), wd)


def _ours_fc1(x, w, b):
    # the alias: with grad, the autograd Function; under no_grad, the kernel that does not store y
    return linear_quick_gelu(x, w, b) if not torch.is_grad_enabled() else LinearQuickGELUFunction.apply(x, w, b)


def _ops(a, dtype):
    """(op name, M, fused fn, eager fn, inputs, forward FLOPs) for the sweep."""
    dev = common.DEVICE
    C, Fh = a.hidden, a.intermediate
    w = lambda *s: (torch.randn(*s, device=dev) * s[-1] ** -0.5).to(dtype).requires_grad_()  # noqa: E731
    ops = []
    wg, wu, wd = w(Fh, C), w(Fh, C), w(C, Fh)
    for M in a.tokens:
        x = torch.randn(M, C, device=dev, dtype=dtype, requires_grad=True)
        ops.append(("swiglu", M, _ours_swiglu, swiglu_reference, (x, wg, wu), 4 * M * C * Fh))
        ops.append(("mlp block", M, _ours_block, _eager_block, (x, wg, wu, wd), 6 * M * C * Fh))
    Cv, Fv = a.clip_hidden, a.clip_intermediate
    wv, bv = w(Fv, Cv), torch.randn(Fv, device=dev, dtype=dtype, requires_grad=True)
    for n in a.clip_images:
        x = torch.randn(n * 577, Cv, device=dev, dtype=dtype, requires_grad=True)
        ops.append(("fc1 gelu", n * 577, _ours_fc1, linear_quick_gelu_reference, (x, wv, bv), 2 * n * 577 * Cv * Fv))
    return ops


def _fwd_bwd(fn, inputs, dout):
    fn(*inputs).backward(dout)


def _memory(fn, inputs, dout):
    """(MiB held between forward and backward, peak MiB of forward+backward), with fresh gradients."""
    for t in inputs:
        t.grad = None
    mem = common.memory_mb(lambda: fn(*inputs), lambda out: out.backward(dout))
    for t in inputs:
        t.grad = None
    return mem


def main():
    a = common.parse_args(Defaults, __doc__)
    common.require_cuda("bench_mlp.py")
    common.header("bench_mlp.py", a)
    dtype = common.DTYPES[a.dtype]
    peak = common.peak_tflops(dtype)
    torch.manual_seed(0)
    rows, mem_rows = [], []
    for name, M, ours, eager, inputs, flops in _ops(a, dtype):
        dout = torch.randn_like(eager(*inputs)).detach()
        with torch.no_grad():
            diff = (ours(*inputs).float() - eager(*inputs).float()).abs().max().item()
            t_fwd = {k: common.time_ms(lambda: f(*inputs)) for k, f in (("ours", ours), ("eager", eager))}
        t_all = {k: common.time_ms(lambda: _fwd_bwd(f, inputs, dout), grad_to_none=list(inputs))
                 for k, f in (("ours", ours), ("eager", eager))}
        for mode, t, fl in (("fwd", t_fwd, flops), ("fwd+bwd", t_all, 3 * flops)):
            tf = fl / (t["ours"] * 1e-3) / 1e12
            rows.append(dict(op=name, mode=mode, M=M, ms=t["ours"], tflops=tf, eager_ms=t["eager"],
                             eager_tflops=fl / (t["eager"] * 1e-3) / 1e12,
                             speedup=common.ratio(t["eager"], t["ours"]), peak=common.fraction(tf, peak),
                             diff=diff if mode == "fwd" else None))
        (held, mpeak), (eheld, epeak) = _memory(ours, inputs, dout), _memory(eager, inputs, dout)
        saved, esaved = (common.saved_mb(lambda: f(*inputs), inputs) for f in (ours, eager))
        mem_rows.append(dict(op=name, M=M, saved=saved, eager_saved=esaved, held=held, eager_held=eheld,
                             held_saving=1 - held / eheld,
                             peak=mpeak, eager_peak=epeak, peak_saving=1 - mpeak / epeak))
    print("\n## time (ours vs eager PyTorch)")
    common.print_table(rows, [("op", "op", ""), ("mode", "mode", ""), ("M", "M", "d"), ("ms", "ours ms", ".3f"),
                              ("tflops", "TFLOP/s", ".0f"), ("eager_ms", "eager ms", ".3f"),
                              ("eager_tflops", "eager TFLOP/s", ".0f"), ("speedup", "speed-up", ".2f"),
                              ("peak", "of peak", ".0%"), ("diff", "max|diff| fwd", ".1e")])
    print("\n## memory of one forward+backward, MiB above inputs and weights")
    common.print_table(mem_rows, [("op", "op", ""), ("M", "M", "d"), ("saved", "ours saved", ".1f"),
                                  ("eager_saved", "eager saved", ".1f"), ("held", "ours held", ".0f"),
                                  ("eager_held", "eager held", ".0f"), ("held_saving", "held saving", ".0%"),
                                  ("peak", "ours peak", ".0f"), ("eager_peak", "eager peak", ".0f"),
                                  ("peak_saving", "peak saving", ".0%")])
    block = [r for r in rows if r["op"] == "mlp block" and r["mode"] == "fwd+bwd"]
    block_mem = [r for r in mem_rows if r["op"] == "mlp block"]
    if block:
        ok = all(r["speedup"] >= 1.0 for r in block) and all(r["held_saving"] >= 0.3 for r in block_mem)
        print(f"\n## issue-6 target\nSwiGLU MLP forward+backward >= 1.0x eager with >= 30% less activation memory: "
              f"{'MET' if ok else 'NOT MET'} (speed-up {min(r['speedup'] for r in block):.2f}x-"
              f"{max(r['speedup'] for r in block):.2f}x, held activations "
              f"{min(r['held_saving'] for r in block_mem):.0%}-{max(r['held_saving'] for r in block_mem):.0%} less)")


if __name__ == "__main__":
    main()
