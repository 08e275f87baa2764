"""The scripts' command lines: every flag explained (from the comment beside its config field), the thread
count chosen and printed, and files saved with the modes the umask gives."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillava import demo
from minillava import generate
from minillava import train
from minillava.cli import default_threads, field_help

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, cls", [("train.py", train.TrainConfig), ("generate.py", generate.GenerateConfig),
                                         ("demo.py", demo.DemoConfig)])
def test_every_flag_has_its_explanation(script, cls):
    helps = field_help(cls)
    assert set(helps) == {f.name for f in dataclasses.fields(cls)}, "a config field without a comment"
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "1000"}).stdout
    text = " ".join(out.split())  # argparse wraps lines; compare with whitespace normalised
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert " ".join(helps[f.name].split()) in text[text.index(flag + " "):], flag  # after its flag


def test_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= default_threads() <= len(os.sched_getaffinity(0))


def test_saved_files_respect_the_umask(tmp_path):
    from minillava.config import get_preset
    from minillava.weights import random_llava, save_llava, save_projector
    model = random_llava(get_preset("tiny"))
    old = os.umask(0o022)
    try:
        out = save_llava(model, tmp_path / "m")
        proj = save_projector(model, tmp_path / "p" / "mm_projector.safetensors")
    finally:
        os.umask(old)
    for f in [*out.iterdir(), proj]:
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert out.stat().st_mode & 0o777 == 0o755


def test_generate_help_and_flags_need_no_torch():
    """generate.py parses its flags before importing torch and the model, so `--help` and a wrong flag answer at
    once; the --quantize / --group-size choices it offers are the formats' own."""
    code = ("import sys; from minillava import generate; generate.parse_args(['--model', 'm', '--prompt', 'p']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    from minillava import cli
    from minillava.kernels import quant
    from minillava.weights import quantize
    assert cli.GROUP_SIZES == quant.GROUP_SIZES and cli.DEFAULT_GROUP_SIZE in quant.GROUP_SIZES
    assert quantize.QUANTIZE_CHOICES is cli.QUANTIZE_CHOICES
    assert set(cli.QUANTIZE_CHOICES) == {"none"} | {f"int{b}" for b in quant.BITS}
