"""minillava.kernels.dispatch: which path runs, and minillava without the triton package."""
import subprocess
import sys
import types
from pathlib import Path

import pytest

from minillava.kernels import dispatch

ROOT = Path(__file__).resolve().parent.parent
CPU, CUDA = types.SimpleNamespace(is_cuda=False), types.SimpleNamespace(is_cuda=True)


def test_modes(monkeypatch):
    monkeypatch.delenv("MINILLAVA_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "HAVE_TRITON", True)
    # the default: plain PyTorch on CUDA too until a GPU check is recorded (GPU_VALIDATED)
    assert dispatch.GPU_VALIDATED is False and not dispatch.enabled(CUDA) and not dispatch.enabled(CPU)
    monkeypatch.setattr(dispatch, "GPU_VALIDATED", True)
    assert dispatch.enabled(CUDA) and not dispatch.enabled(CPU)
    monkeypatch.setattr(dispatch, "GPU_VALIDATED", False)
    for mode, cpu, cuda in [("0", False, False), ("1", False, True), ("force", True, True)]:
        monkeypatch.setenv("MINILLAVA_KERNELS", mode)
        assert (dispatch.enabled(CPU), dispatch.enabled(CUDA)) == (cpu, cuda), mode
    monkeypatch.setenv("MINILLAVA_KERNELS", "yes")
    with pytest.raises(ValueError, match="MINILLAVA_KERNELS='yes': expected one of 0, auto, 1, force"):
        dispatch.enabled(CPU)
    monkeypatch.setattr(dispatch, "HAVE_TRITON", False)
    monkeypatch.setenv("MINILLAVA_KERNELS", "1")
    assert not dispatch.enabled(CUDA)
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")
    with pytest.raises(RuntimeError, match="needs the triton package"):
        dispatch.enabled(CPU)


def test_minillava_runs_without_triton():
    """A CPU install without triton: everything imports and the model runs on the references."""
    code = """
import sys; sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch, minillava
import minillava.kernels.attention, minillava.kernels.cross_entropy, minillava.kernels.linear, minillava.kernels.mlp
import minillava.kernels.quant, minillava.kernels.rmsnorm, minillava.kernels.rope
from minillava.kernels.dispatch import HAVE_TRITON
from minillava.weights import random_llava
cfg = minillava.get_preset("tiny")
model = random_llava(cfg)
S = cfg.vision.image_size
out = model(torch.tensor([[1, cfg.image_token_id, 5]]), torch.zeros(1, 3, S, S))
print(HAVE_TRITON, tuple(out.shape))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "False"
