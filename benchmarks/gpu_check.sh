#!/usr/bin/env bash
# The one prepared GPU check: run it on a bare H100/H200 machine holding this repository, from its root.
#
#     bash benchmarks/gpu_check.sh [LOG_DIR]        # LOG_DIR default: $OUT (the device tool's), else gpu_check_out
#
# Correctness first, then speed; every step has its own time limit and writes its log into LOG_DIR as it goes,
# so a step that hangs or a lease that ends keeps what ran before it. Budget: about 11 minutes in all.
#   1. env          nvidia-smi, python, torch, triton versions
#   2. tests        the GPU kernel tests (bf16, fp16, fp32) in parallel processes (compiles are single-threaded)
#   3. model        benchmarks/gpu_model_check.py: LLaVA-7B widths, 2 layers, bf16, kernels on vs off
#   4. decode       benchmarks/bench_decode_gpu.py: the engine at 7B in bf16, one slot in a CUDA graph vs the HBM
#                   roofline, 8 and 32 slots
#   5-10. benchmarks attention (fwd, bwd, decode as CUDA graphs), SwiGLU MLP, RMSNorm, RoPE, cross-entropy, int8/int4
# The last lines printed are the summary: each step's status, exit code and seconds. Without a GPU it says so,
# runs the CPU dry run of step 3 (the script itself), and exits 0 having measured nothing.
set -u
cd "$(dirname "$0")/.."
LOG=${1:-${OUT:-gpu_check_out}}
mkdir -p "$LOG"
PY=${PYTHON:-python3}
SUMMARY="$LOG/summary.txt"
: > "$SUMMARY"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to LOG/NAME.log, one summary line
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG/progress.txt"
    timeout --kill-after=10 "$limit" "$@" > "$LOG/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict=TIMEOUT
    [ $rc -ne 0 ] && [ $verdict = ok ] && verdict=FAILED
    printf '%-10s %-8s rc=%-4s %4ss  %s\n' "$name" "$verdict" "$rc" "$((SECONDS - t0))" "$LOG/$name.log" \
        | tee -a "$SUMMARY"
    tail -n 3 "$LOG/$name.log" | sed 's/^/    /'
}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1
    git log -1 --format="commit %H %s" 2>/dev/null
} > "$LOG/env.txt" 2>&1
cat "$LOG/env.txt"

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU here: the GPU steps are skipped (nothing is measured); dry run of the model check on CPU"
    step model-cpu 120 $PY benchmarks/gpu_model_check.py --device cpu --preset tiny --layers 2 --steps 2
    echo "== summary (no GPU: dry run only)"
    cat "$SUMMARY"
    exit 0
fi

export TRITON_INTERPRET=0 MINILLAVA_KERNELS=1
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
TIMEOUT=""
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT="--timeout 200"
step tests 240 $PY -m pytest -q $XDIST $TIMEOUT -p no:cacheprovider tests/test_kernel_attention.py \
    tests/test_kernel_mlp.py tests/test_kernel_rmsnorm.py tests/test_kernel_rope.py tests/test_kernel_cross_entropy.py \
    tests/test_kernel_model.py tests/test_quant.py -k "gpu"
step model 120 $PY benchmarks/gpu_model_check.py
step decode 150 $PY benchmarks/bench_decode_gpu.py
step attention 120 $PY benchmarks/bench_attention.py --cuda-graph
step mlp 60 $PY benchmarks/bench_mlp.py
step rmsnorm 30 $PY benchmarks/bench_rmsnorm.py
step rope 30 $PY benchmarks/bench_rope.py
step xent 30 $PY benchmarks/bench_cross_entropy.py
step quant 90 $PY benchmarks/bench_quant_gpu.py
echo "== summary ($LOG)"
cat "$SUMMARY"
