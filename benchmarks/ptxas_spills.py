"""Registers and spills of the attention kernels' autotune configs for sm_90a (H100/H200), measured on a CPU.

    python benchmarks/ptxas_spills.py [--hs 64 128] [--kernels fwd dkdv dq] [--dtype bf16]

Triton compiles each config for the sm_90a target without a GPU (PTX, then its bundled ptxas, which reports
registers and spill bytes per thread). A config that spills is slow wherever it runs, so the ones that do are
listed in kernels/flash_attention.py's SPILLS and the autotuner never tries them. Causal, no padding mask: the
masked variant adds a few registers, not a different tile. One compile takes seconds to minutes (ptxas is
single-threaded); the table prints as it goes.
"""
import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)  # a real compile
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ptxas_spills_")  # never a cached kernel: ptxas must run

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import minillava.kernels.flash_attention as A  # noqa: E402

KERNELS = {"fwd": A._attn_fwd_kernel, "dkdv": A._attn_bwd_dkdv_kernel, "dq": A._attn_bwd_dq_kernel}
POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}  # of the dtype measured
POINTERS_FP32 = {"LSE", "Delta"}
FLOATS = {"qk_scale", "scale"}


def signature(fn, dtype: str, constexprs: dict) -> dict:
    """Every argument's type as Triton's compiler takes it: tensors of `dtype`, the mask bool, strides i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "KPM":
            sig[name] = "*i1"
        elif name in POINTERS_FP32:
            sig[name] = "*fp32"
        elif name in POINTERS:
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def ptxas_report(kernel: str, hs: int, config: tuple, dtype: str) -> tuple[int, int]:
    """(registers, spill store bytes) per thread of one config, from ptxas -v."""
    fn = KERNELS[kernel]
    bm, bn, warps, stages = config
    constexprs = dict(CAUSAL=True, HAS_MASK=False, HS=hs, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION="tf32")
    src = ASTSource(fn, signature(fn, dtype, constexprs), constexprs)
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True})
    text = log.getvalue()
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = re.search(r"(\d+) bytes spill stores", text)
    return regs, int(spill.group(1)) if spill else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hs", type=int, nargs="+", default=[64, 128], help="head sizes (default: 64 128)")
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    a = p.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_90a, {a.dtype}, causal, no mask")
    print(f"{'kernel':6s} {'hs':>4s} {'BLOCK_M':>7s} {'BLOCK_N':>7s} {'warps':>5s} {'stages':>6s} {'regs':>5s} "
          f"{'spill B':>7s} {'s':>5s}")
    spills = {}
    for kernel in a.kernels:
        for hs in a.hs:
            for config in A.CONFIGS[kernel]:
                t0 = time.time()
                regs, spill = ptxas_report(kernel, hs, config, a.dtype)
                print(f"{kernel:6s} {hs:4d} {config[0]:7d} {config[1]:7d} {config[2]:5d} {config[3]:6d} {regs:5d} "
                      f"{spill:7d} {time.time() - t0:5.0f}", flush=True)
                if spill:
                    spills.setdefault(kernel, {}).setdefault(hs, []).append(config)
    print(f"SPILLS = {spills}")
    return spills


if __name__ == "__main__":
    main()
