"""The projector: maps CLIP features (width Cv) into the LLM's embedding space (width C).

- `linear` (LLaVA v1):       Linear(Cv, C)
- `mlp2x_gelu` (LLaVA-1.5):  Linear(Cv, C) -> GELU -> Linear(C, C)
- `mlpNx_gelu`:              N linears with an exact (erf) GELU between each pair.
Layers are named `linear_1`, `linear_2`, ... as in llava-hf's `multi_modal_projector`.
"""
import re

import torch.nn as nn
import torch.nn.functional as F


def projector_depth(projector_type: str) -> int:
    if projector_type == "linear":
        return 1
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown projector type {projector_type!r}: expected 'linear' or 'mlpNx_gelu'")
    return int(m.group(1))


class Projector(nn.Module):
    def __init__(self, projector_type: str, vision_width: int, text_width: int):
        super().__init__()
        self.depth = projector_depth(projector_type)
        for i in range(1, self.depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(vision_width if i == 1 else text_width, text_width))

    def forward(self, x):
        """x (N, Np, Cv) -> (N, Np, C)."""
        for i in range(1, self.depth + 1):
            x = getattr(self, f"linear_{i}")(x)
            if i < self.depth:
                x = F.gelu(x)  # exact erf GELU, not the tanh approximation
        return x
