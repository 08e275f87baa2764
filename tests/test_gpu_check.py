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
