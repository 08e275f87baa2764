"""Packaging: `pip install -e .` installs one package, `minillava`, and six commands; the extras bring triton
(`kernels`), pytest and the openai client (`test`) and the oracles the parity tests compare with (`parity`).

The repository's folders keep their places and everything imports under the one name (nothing generic at the top
of site-packages: Hugging Face's PyPI package `kernels`, which transformers imports, is one such name):

    minillava/                        -> minillava             model, tokenizer, templates, images, data, engine
    kernels/   (no __init__.py: see kernels/dispatch.py) -> minillava.kernels
    weights/                          -> minillava.weights
    train.py, generate.py, eval.py, serve.py, demo.py, quantize.py -> minillava.train, minillava.generate, ...
    synthetic.py (demo.py's dataset, a module, no command)       -> minillava.synthetic

In a checkout (`pip install -e .`) they stay where they are and minillava/__init__.py adds the root to the package's
search path; `pip install .` copies them into the package.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

SCRIPTS = {"train": "cli", "generate": "main", "eval": "main", "serve": "main", "demo": "cli",  # module: entry
           "quantize": "cli"}
MODULES = ("synthetic",)  # the other modules at the root: copied into the package like the scripts, no command


class BuildPy(build_py):
    """The scripts and modules at the root go into the package: <root>/train.py -> minillava/train.py, ..."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):  # an editable install reads them where they are
            for name in (*SCRIPTS, *MODULES):
                self.copy_file(f"{name}.py", os.path.join(self.build_lib, "minillava", f"{name}.py"))


setup(
    name="minillava",
    version="0.1.0",
    description="LLaVA (v1, 1.5 and 1.6) from scratch in plain PyTorch, with fused Triton kernels",
    python_requires=">=3.10",
    packages=["minillava", "minillava.kernels", "minillava.weights"],
    package_dir={"minillava.kernels": "kernels", "minillava.weights": "weights"},
    cmdclass={"build_py": BuildPy},
    entry_points={"console_scripts": [f"minillava-{name}=minillava.{name}:{fn}" for name, fn in SCRIPTS.items()]},
    # triton is not required: torch's CUDA wheels bring it; on a CPU it only serves the kernel tests (interpreter)
    install_requires=["torch>=2.5", "safetensors", "sentencepiece", "numpy", "pillow"],
    extras_require={"kernels": ["triton; platform_system == 'Linux'"],
                    "test": ["pytest", "triton; platform_system == 'Linux'", "openai"],  # openai: serve.py's client
                    "parity": ["pytest", "transformers>=4.45", "openpyxl"]},
)
