from setuptools import setup

setup(
    name="minillava",
    version="0.1.0",
    description="LLaVA (v1 and 1.5) from scratch in plain PyTorch, with fused Triton kernels",
    python_requires=">=3.10",
    packages=["minillava", "kernels", "weights"],
    py_modules=["train", "generate", "demo"],
    install_requires=["torch>=2.5", "safetensors", "sentencepiece", "numpy", "pillow",
                      "triton; platform_system == 'Linux'"],
    extras_require={"test": ["pytest"], "parity": ["pytest", "transformers>=4.45"]},
)
