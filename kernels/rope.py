"""Rotary position embedding in the rotate_half form used by Hugging Face-format LLaMA weights:
    x' = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., hs/2:], x[..., :hs/2])
cos, sin (B, T, hs) come from the positions (see minillava.llama.rope_cos_sin)."""
import torch

import kernels


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """q (B, nh, T, hs), k (B, n_kv, T, hs), cos/sin (B, T, hs) -> rotated (q, k)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rope(q, k, cos, sin):
    return apply_rope_reference(q, k, cos, sin)
