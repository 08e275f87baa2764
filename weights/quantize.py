"""Weight-only quantized checkpoints: the LLM's linear layers in int8 or int4 (formats: kernels/quant.py).
Written once by quantize.py (the command line: `python quantize.py SRC OUT --bits 4`, `minillava-quantize`),
or quantized while loading, from the original files (generate.py, eval.py, serve.py: --quantize int8 | int4):

    model = load_llava("llava-1.5-7b-hf", quantize=Quantization(bits=4, group_size=64))

Which layers: every linear layer of the language model (q, k, v, o, gate, up, down and lm_head; lm_head stays
dense when it is tied to the embeddings, which are a lookup, not a matmul). They are 96% of LLaVA-1.5-7B's bytes
and are read once per decoded token. The vision tower (0.3 B) and the projector stay in --dtype: they run once
per image, at prefill shapes, where on the CPU a weight-only kernel is slower than the dense GEMM
(kernels/quant.py) and quantizing would save 4% of the bytes.

A quantized checkpoint is layout A (weights/save.py) whose quantized layers hold `qweight`, `scales` (and int4
`offsets`) instead of `weight`, with its settings in config.json under QUANT_KEY; load_llava reads it with no
re-quantization and checks every tensor's shape and dtype, and that scales are finite and not negative.
"""
import dataclasses

import torch.nn as nn

from minillava.cli import DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES  # defined with the scripts' flags (no torch there)
from minillava.kernels.quant import BITS, GROUP_SIZES, QuantLinear, check_shape, quantize

QUANT_KEY = "minillava_quantization"  # config.json's entry (transformers would misread "quantization_config")


@dataclasses.dataclass(frozen=True)
class Quantization:
    bits: int  # 8 or 4
    group_size: int | None = None  # int4: inputs per scale (32, 64, 128); int8 has one scale per output channel

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"quantization to {self.bits} bits is not supported; use one of {BITS}")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("int8 is per output channel: it takes no group size")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size {self.group_size} is not supported; use one of {GROUP_SIZES}")

    @classmethod
    def parse(cls, name: str, group_size: int = DEFAULT_GROUP_SIZE):
        """A command line's --quantize none | int8 | int4 [--group-size G] -> Quantization or None."""
        kinds = {"none": None, "": None, None: None, "int8": 8, "int4": 4}
        if name not in kinds:
            raise ValueError(f"--quantize {name!r}: expected none, int8 or int4")
        return None if kinds[name] is None else cls(kinds[name], group_size if kinds[name] == 4 else None)

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "format": "minillava weight-only, "
                "see kernels/quant.py", "layers": "language model linear layers (lm_head unless tied)"}

    @classmethod
    def from_config(cls, d: dict, config_file):
        """config.json's QUANT_KEY entry -> Quantization (None when absent); a bad entry is a named error."""
        q = d.get(QUANT_KEY)
        if q is None:
            return None
        try:
            return cls(int(q["bits"]), q.get("group_size"))
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{config_file}: {QUANT_KEY} {q!r} is not a valid quantization ({e})") from None

    def tensors(self, weight) -> dict:
        """A dense weight (a tensor, or anything sliceable by rows: a file's rows read on demand) -> its quantized
        tensors, {"qweight", "scales"[, "offsets"]}."""
        return quantize(weight, self.bits, self.group_size)

    def __str__(self):
        return f"int{self.bits}" + (f" (groups of {self.group_size})" if self.group_size else " (per channel)")


def targets(model) -> list:
    """Names of the linear layers a Quantization replaces (see the module docstring)."""
    tied = model.config.text.tie_word_embeddings
    return [f"language_model.{name}" for name, m in model.language_model.named_modules()
            if isinstance(m, nn.Linear) and not (tied and name == "lm_head")]


def check_targets(model, q: Quantization, where: str):
    for name in targets(model):
        m = model.get_submodule(name)
        check_shape(m.out_features, m.in_features, q.bits, q.group_size, f"{where}: {name}")


def replace_linears(model, q: Quantization):
    """Swap every target nn.Linear for an (empty) QuantLinear of its shape, on the linear's device (meta while
    loading); the model remembers its Quantization (saving writes it to config.json)."""
    for name in targets(model):
        parent, _, child = name.rpartition(".")
        m = model.get_submodule(name)
        setattr(model.get_submodule(parent), child,
                QuantLinear(m.in_features, m.out_features, q.bits, q.group_size, bias=m.bias is not None,
                            device=m.weight.device, dtype=m.weight.dtype))
    model.quantization = q
    return model
