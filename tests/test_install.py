"""The install: one import name of our own beside any other library. transformers >= 5.25 imports Hugging Face's
PyPI package `kernels`, the name of our kernels/ folder; whichever of the two is imported first must not matter.
Fresh interpreters, started from outside the repository (where only the installed `minillava` is found) and from
its root (where the folders themselves sit on sys.path)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

# Imports minillava the way its scripts do and reports where each of our modules, and any top-level `kernels`,
# came from.
REPORT = """
import json, sys
{first}
import minillava, minillava.weights, minillava.generate, minillava.train
{second}
mods = {{m: getattr(sys.modules[m], "__file__", None) for m in sys.modules
        if m.startswith(("minillava.kernels.", "minillava.weights.")) or m.split(".")[0] == "kernels"}}
print(json.dumps({{"package": minillava.__file__, "modules": mods}}))
"""
TRANSFORMERS = "import transformers; from transformers import LlamaForCausalLM, LlavaForConditionalGeneration"


def run_report(cwd, first="", second=""):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", REPORT.format(first=first, second=second)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def assert_ours(report):
    """Every minillava.kernels / minillava.weights module is a file of this repository (an editable install) or
    of the installed package, and a top-level `kernels`, if any, is not ours."""
    package = Path(report["package"]).parent
    homes = {"kernels": [ROOT / "kernels", package / "kernels"], "weights": [ROOT / "weights", package / "weights"]}
    mods = report["modules"]
    assert {"minillava.kernels.attention", "minillava.kernels.linear", "minillava.weights.load"} <= set(mods)
    for name, file in mods.items():
        parts = name.split(".")
        if parts[0] == "kernels":  # Hugging Face's, imported by transformers (the README's .venv is inside ROOT)
            assert file is None or not Path(file).is_relative_to(ROOT / "kernels"), (name, file)
        else:
            assert any(Path(file).parent == home for home in homes[parts[1]]), (name, file)


@pytest.mark.parametrize("where", ["outside", "root"])
def test_minillava_alone(where, tmp_path):
    report = run_report(tmp_path if where == "outside" else ROOT)
    assert_ours(report)
    assert not any(m.split(".")[0] == "kernels" for m in report["modules"])  # minillava imports no `kernels`


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed (the parity extra)")
@pytest.mark.parametrize("where", ["outside", "root"])
@pytest.mark.parametrize("order", ["transformers first", "minillava first"])
def test_beside_transformers(where, order, tmp_path):
    first, second = (TRANSFORMERS, "") if order == "transformers first" else ("", TRANSFORMERS)
    assert_ours(run_report(tmp_path if where == "outside" else ROOT, first, second))


def test_console_commands_run_from_anywhere(tmp_path):
    bin_dir = Path(sys.executable).parent
    for name in ("train", "generate", "eval", "serve", "demo", "quantize"):
        command = bin_dir / f"minillava-{name}"
        assert command.is_file(), f"{command} is missing: install with pip install -e ."
        out = subprocess.run([str(command), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage:" in out.stdout, (name, out.stderr[-2000:])


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools")
def test_a_plain_install_puts_one_name_in_site_packages(tmp_path):
    """`pip install .` (not editable): the folders, the scripts and synthetic.py are copied into the one package."""
    source, target = tmp_path / "source", tmp_path / "site"  # built from a copy: nothing is written into the repo
    for name in ("setup.py", *(f"{s}.py" for s in ("train", "generate", "eval", "serve", "demo", "quantize",
                                                   "synthetic"))):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for folder in ("minillava", "kernels", "weights"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), str(source)], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    top = {p.name for p in target.iterdir()} - {"bin"}
    assert {p for p in top if not p.endswith(".dist-info")} == {"minillava"}, top
    assert {"train.py", "generate.py", "eval.py", "serve.py", "demo.py", "quantize.py", "synthetic.py", "kernels",
            "weights"} <= {p.name for p in (target / "minillava").iterdir()}
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", REPORT.format(first="", second="")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert Path(report["package"]).parent == target / "minillava"
    assert_ours(report)
    assert all(Path(f).is_relative_to(target) for f in report["modules"].values())
    # synthetic.py (demo.py's dataset, a module beside the scripts, no command) is inside the package too
    code = "import json, minillava.synthetic as s; print(json.dumps(s.__file__))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(json.loads(out.stdout.splitlines()[-1])) == target / "minillava" / "synthetic.py"
