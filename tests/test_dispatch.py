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


def test_the_start_up_line_says_what_runs_and_why(monkeypatch):
    monkeypatch.delenv("MINILLAVA_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "HAVE_TRITON", True)
    assert dispatch.startup_line("cpu") == "kernels: torch for every op (not on a GPU; MINILLAVA_KERNELS=auto)"
    assert "torch for every op (no GPU check recorded yet: GPU_VALIDATED is False" in dispatch.startup_line("cuda")
    monkeypatch.setattr(dispatch, "GPU_VALIDATED", True)
    assert dispatch.startup_line("cuda").startswith("kernels: Triton for attention, attention_decode, swiglu, ")
    monkeypatch.setenv("MINILLAVA_KERNELS", "0")
    assert dispatch.startup_line("cuda") == "kernels: torch for every op (MINILLAVA_KERNELS=0)"
    monkeypatch.setattr(dispatch, "HAVE_TRITON", False)
    monkeypatch.setenv("MINILLAVA_KERNELS", "1")
    assert "torch for every op (no triton package;" in dispatch.startup_line("cuda")


def test_the_report_names_each_op_its_path_and_why(monkeypatch):
    """Every op of a model's forward asks use_triton and is counted with its reason; an input a kernel does not
    cover is named, with the first such input's dtype and shape."""
    import torch
    import minillava
    from minillava.kernels.attention import attention
    from minillava.kernels.mlp import swiglu_layers
    from minillava.kernels.rmsnorm import rms_norm
    from minillava.lora import apply_lora
    from minillava.weights import random_llava
    monkeypatch.setattr(dispatch, "RUNS", {})
    monkeypatch.delenv("MINILLAVA_KERNELS", raising=False)
    cfg = minillava.get_preset("tiny")
    model = random_llava(cfg)
    S = cfg.vision.image_size
    ids = torch.tensor([[1, cfg.image_token_id, 5, 6]])
    model.loss(ids, ids, torch.zeros(1, 3, S, S))
    ran = dispatch.report()
    for op in ("attention", "swiglu", "linear_quick_gelu", "rms_norm", "rope", "cross_entropy"):
        assert f"  {op}: torch (not on a GPU) x " in ran, (op, ran)
    assert "Triton" not in ran and "attention_decode" not in ran
    monkeypatch.setattr(dispatch, "RUNS", {})
    monkeypatch.setenv("MINILLAVA_KERNELS", "force")  # Triton wherever covered: these inputs are not
    if not dispatch.HAVE_TRITON:
        return
    rms_norm(torch.ones(2, 3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 1e-6)
    q = torch.ones(1, 2, 3, 8)
    attention(q, q, q, causal=True)
    apply_lora(model.language_model, r=2, alpha=4)
    mlp = model.language_model.model.layers[0].mlp
    swiglu_layers(torch.ones(1, 2, cfg.text.hidden_size), mlp.gate_proj, mlp.up_proj)
    assert dispatch.report() == (
        "kernels ran (eager calls; compiled code is not counted):\n  rms_norm: torch (inputs its kernel does not cover) x 1, first torch.float64 (2, 3)\n"
        "  attention: torch (head size 8, not one of (16, 32, 64, 128)) x 1, first torch.float32 (1, 2, 3, 8)\n"
        f"  swiglu: torch (LoRA, quantized or joined layers) x 1, first torch.float32 (1, 2, {cfg.text.hidden_size})")
