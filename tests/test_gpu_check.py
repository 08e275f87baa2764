"""benchmarks/gpu_check.sh, the one prepared GPU check: without a GPU it must start, say that it skips the GPU
steps, dry-run the model check on CPU, and exit 0 with every log in the folder it was given."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the check runs for real (minutes)")
def test_dry_run_without_a_gpu(tmp_path):
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "logs")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no CUDA GPU here: the GPU steps are skipped" in out.stdout
    summary = (tmp_path / "logs" / "summary.txt").read_text()
    assert summary.startswith("model-cpu") and " ok " in summary
    assert "PASSED" in (tmp_path / "logs" / "model-cpu.log").read_text()
    assert "torch" in (tmp_path / "logs" / "env.txt").read_text()


def test_the_decode_benchmark_runs_and_says_when_a_compiled_step_fails(monkeypatch, capsys):
    """benchmarks/bench_decode_gpu.py (step `decode` of the GPU check) on CPU at toy size: a compiled step that fails
    is reported, tried again in plain PyTorch, then measured eager, so one bad compile still leaves figures."""
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.bench_decode_gpu as bench
    real, calls = bench.measure, []

    def measure(model, a, slots, compiled):
        calls.append((slots, compiled, os.environ["MINILLAVA_KERNELS"]))
        if compiled:
            raise RuntimeError("no graph here")
        return real(model, a, slots, compiled)
    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setenv("MINILLAVA_KERNELS", "auto")
    monkeypatch.setattr(sys, "argv", ["bench_decode_gpu.py", "--device", "cpu", "--preset", "tiny",
                                      "--dtype", "fp32", "--slots", "1", "2", "--compile-slots", "1",
                                      "--prompt", "16", "--new-tokens", "4"])
    bench.main()
    out = capsys.readouterr().out
    assert calls == [(1, True, "auto"), (1, True, "0"), (1, False, "auto"), (2, False, "auto")]
    assert "1 slot(s), compiled, MINILLAVA_KERNELS=auto: failed (RuntimeError: no graph here)" in out
    assert "1 slot(s), compiled, MINILLAVA_KERNELS=0: failed" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] in (["1", "eager"], ["2", "eager"])]
    assert len(rows) == 2 and all(float(r[5]) > 0 for r in rows)  # tokens/s of both slot counts
    assert os.environ["MINILLAVA_KERNELS"] == "auto"
