"""LoRA (Hu et al. 2021) in plain PyTorch, as LLaVA-1.5's LoRA recipe uses it: every linear layer of the LLM
except `lm_head` gets a trainable low-rank update; everything else in the LLM stays frozen.

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A (r, in), B (out, r)

A starts random (kaiming-uniform, as PEFT) and B at zero, so training starts from the base model exactly.
`merge_lora` folds the update into W (W += alpha/r * B A) and puts plain nn.Linear modules back, so the
merged model has exactly the base model's parameter names and saves like any other.

A LoRALinear is an ordinary module: `LlamaMLP.forward` runs its fused SwiGLU kernel only on plain nn.Linear
weights and calls any other module, so adapted MLPs go through their adapters with nothing swapped.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F



class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update: base(x) + scaling * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # (..., in) -> (..., r) -> (..., out): the update never materialises an (out, in) matrix
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with W + scaling * B A folded in (computed in fp32, stored in W's dtype)."""
        w = self.base.weight
        w.copy_((w.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(w.dtype))
        return self.base

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}"


def apply_lora(llm: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear inside `llm` (pass `model.language_model.model`, which excludes lm_head) in a
    LoRALinear and freeze everything else in it. Returns the names of the wrapped layers."""
    llm.requires_grad_(False)
    wrapped = []
    for name, module in list(llm.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):  # kernels.Linear included
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError("apply_lora: found no nn.Linear to adapt")
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear in `model` into its base linear (in place; the MLPs are then fused again).
    Returns how many layers were merged. The result has the base model's parameter names."""
    n = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
                n += 1
    return n

