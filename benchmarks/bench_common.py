"""What the kernel benchmarks (benchmarks/bench_*.py) share: the CUDA check, timing, the device's peak figures,
flags derived from a defaults dataclass, and the table they print.

Timing is triton.testing.do_bench: warm-up, then the median of ~100 runs, with the L2 cache flushed before each,
so a figure is what one call costs cold, as in a model. Peaks are NVIDIA's datasheet figures (dense, no
sparsity), looked up by the device name torch reports; an unknown device prints no fraction of peak.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

DEVICE = "cuda"  # the scripts allocate here (a CPU smoke run of their code may set it to "cpu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# name fragment -> (16-bit tensor-core TFLOP/s dense, fp32 TFLOP/s without tensor cores, HBM GB/s).
# Checked in order: the first fragment found in torch.cuda.get_device_name() wins.
PEAKS = [
    ("H200 NVL", (835.0, 60.0, 4800.0)),
    ("H200", (989.4, 66.9, 4800.0)),  # SXM
    ("H100 NVL", (835.0, 60.0, 3900.0)),
    ("H100 PCIe", (756.0, 51.2, 2000.0)),
    ("H100", (989.4, 66.9, 3350.0)),  # SXM5 80GB HBM3 ("NVIDIA H100 80GB HBM3")
]


def fail(message):
    """A clear message on stderr and exit status 2: nothing was measured."""
    print(message, file=sys.stderr)
    sys.exit(2)


def require_cuda(script):
    """Exit (status 2) with a clear message unless a CUDA GPU and compiled Triton are available."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        fail(f"{script}: TRITON_INTERPRET=1 is set; benchmarks time compiled kernels. Unset it.")
    if not torch.cuda.is_available():
        fail(f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
    os.environ.setdefault("MINILLAVA_KERNELS", "1")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, for us and the baseline alike


def device_peaks():
    """-> (device name, (tflops16, tflops32, gbs) or None)."""
    name = torch.cuda.get_device_name()
    return name, next((p for frag, p in PEAKS if frag in name), None)


def peak_tflops(dtype):
    _, peaks = device_peaks()
    return None if peaks is None else peaks[1 if dtype == torch.float32 else 0]


def peak_gbs():
    _, peaks = device_peaks()
    return None if peaks is None else peaks[2]


def time_ms(fn, grad_to_none=None, cuda_graph=False):
    """Median milliseconds of fn() (triton.testing.do_bench; grad_to_none: tensors whose .grad is reset).
    cuda_graph: replay fn captured in a CUDA graph, which removes the CPU's launch overhead: the GPU's own time
    (for microsecond-scale calls such as decoding, where the launches can cost more than the kernels)."""
    import triton.testing
    if cuda_graph:
        return triton.testing.do_bench_cudagraph(fn, grad_to_none=grad_to_none, return_mode="median")
    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def memory_mb(forward, backward):
    """Run out = forward(), then backward(out). -> (MiB held between them: what autograd saved plus the output,
    peak MiB over both), each above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = forward()
    held = torch.cuda.memory_allocated() - base
    backward(out)
    del out
    torch.cuda.synchronize()
    return held / 2**20, (torch.cuda.max_memory_allocated() - base) / 2**20


def saved_mb(forward, exclude=()):
    """MiB of the tensors autograd saves for backward during forward(), counting each storage once and not
    counting those of `exclude` (the inputs and weights, which exist anyway). Device-independent."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total / 2**20


def parse_args(defaults_cls, doc):
    """Flags derived from the defaults dataclass by minillava.cli.add_config_args: --field-name, the comment
    beside the field as its help (lists take several values, bools --flag/--no-flag)."""
    from minillava.cli import add_config_args
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, defaults_cls)
    return defaults_cls(**vars(p.parse_args()))


def header(script, args):
    """The line that identifies a run: device, torch/triton versions, the command's settings."""
    import triton
    name, peaks = device_peaks()
    peak = "no peak figures for this device" if peaks is None else \
        f"peaks: {peaks[0]:.0f} TFLOP/s 16-bit, {peaks[1]:.0f} TFLOP/s fp32, {peaks[2]:.0f} GB/s HBM"
    print(f"# {script} on {name} ({peak}); torch {torch.__version__}, triton {triton.__version__}")
    print(f"# {args}")


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, title, format spec)."""
    cells = [[title for _, title, _ in columns]]
    cells += [[fmt(r.get(key), spec) if not isinstance(r.get(key), str) else r[key] for key, _, spec in columns]
              for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for c in cells:
        print("  ".join(s.rjust(w) for s, w in zip(c, widths)))


def ratio(baseline_ms, ours_ms):
    """Speed-up over the baseline: > 1 means the kernel is faster."""
    return baseline_ms / ours_ms


def fraction(value, peak):
    return None if peak is None or value is None else value / peak


def best_seconds(fn, repeat):
    """The CPU benchmarks' timing: two warm-up calls, then the best of `repeat` (wall clock)."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_bandwidth(repeat) -> float:
    """The CPU's read speed at torch's current thread count, GB/s: torch.sum over 1 GiB of fp32 (far past the
    caches), best of `repeat`. The bound of every decode step, which reads each weight once."""
    buf = torch.ones(2**28)
    return buf.numel() * 4 / best_seconds(lambda: buf.sum(), repeat) / 1e9
