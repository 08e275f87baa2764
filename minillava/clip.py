"""CLIP ViT vision tower (ViT-L/14 at 224 or 336 px), as LLaVA uses it.

Module and parameter names follow the official checkpoints (`vision_model.embeddings.patch_embedding.weight`...),
so the weights load with no key mapping. Shapes: B images, Np patches, T = Np + 1 tokens (CLS first), C width.
"""
import torch
import torch.nn as nn

from minillava.kernels.attention import attention
from minillava.kernels.mlp import linear_quick_gelu
from minillava.config import VisionConfig


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        # A 14x14 conv with stride 14 cuts the image into patches and projects each; CLIP has no bias here.
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, C, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (B, Np, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, T, C)


class CLIPAttention(nn.Module):
    """Bidirectional multi-head attention; q/k/v/out projections with bias; scale hs^-0.5."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q = self.q_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = attention(q, k, v, causal=False)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        # quick_gelu(y) = y * sigmoid(1.702 y): CLIP was trained with this approximation, not exact GELU.
        return self.fc2(linear_quick_gelu(x, self.fc1.weight, self.fc1.bias))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the official name
        self.encoder = CLIPEncoder(cfg)
        # Loaded with the checkpoint but unused by LLaVA: the features are taken before it.
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values, feature_layer: int = -2):
        """Hidden state number `feature_layer` of [embeddings, layer 1, ..., layer N], as transformers'
        `hidden_states[feature_layer]`: -2 is the output of the second-to-last layer. Layers past it never run."""
        n_layers = len(self.encoder.layers)
        n_run = feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer
        if not 0 <= n_run <= n_layers:
            raise ValueError(f"feature_layer {feature_layer} out of range for {n_layers} layers")
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, T, C)
        for layer in self.encoder.layers[:n_run]:
            x = layer(x)
        return x  # (B, T, C)


class CLIPVisionTower(nn.Module):
    """Wrapper whose only child is named `vision_model`, as in the official checkpoints."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixel_values, feature_layer: int = -2):
        return self.vision_model(pixel_values, feature_layer)
