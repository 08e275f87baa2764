"""Packaging: `pip install -e .` installs minillava, kernels, weights and the top-level scripts; the extras bring
triton (`kernels`), pytest and the openai client (`test`) and the oracles the parity tests compare with (`parity`)."""
from setuptools import setup

setup(
    name="minillava",
    version="0.1.0",
    description="LLaVA (v1, 1.5 and 1.6) from scratch in plain PyTorch, with fused Triton kernels",
    python_requires=">=3.10",
    packages=["minillava", "kernels", "weights"],
    py_modules=["train", "generate", "eval", "serve", "demo"],
    # triton is not required: torch's CUDA wheels bring it; on a CPU it only serves the kernel tests (interpreter)
    install_requires=["torch>=2.5", "safetensors", "sentencepiece", "numpy", "pillow"],
    extras_require={"kernels": ["triton; platform_system == 'Linux'"],
                    "test": ["pytest", "triton; platform_system == 'Linux'", "openai"],  # openai: serve.py's client
                    "parity": ["pytest", "transformers>=4.45", "openpyxl"]},
)
