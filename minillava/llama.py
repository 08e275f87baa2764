"""LLaMA / Vicuna decoder: RMSNorm, rotary positions, causal GQA attention with a slotted KV cache, SwiGLU MLP.

Parameter names follow Hugging Face-format LLaMA checkpoints (`model.layers.N.self_attn.q_proj.weight`...);
a model loaded for inference on the CPU (quantized, or with load_llava's inference=True) has q, k, v as one
`qkv_proj` and gate, up as one `gate_up_proj` (`join`; dense ones where the loader could give them one block).
Shapes: B batch, T tokens, C width, nh query heads, n_kv key/value heads, hs head size, V vocabulary.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from minillava.kernels.attention import attention
from minillava.kernels.linear import DecodeLinear  # nn.Linear; a CPU decoding step's rows read it faster
from minillava.kernels.mlp import swiglu_layers
from minillava.kernels.quant import QuantLinear
from minillava.kernels.rmsnorm import rms_norm
from minillava.kernels.rope import apply_rope
from minillava.config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)  # fp32 inside, see kernels/rmsnorm.py


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos, sin (B, T, hs) for the rotate_half RoPE form: frequencies theta^(-2i/hs), repeated twice."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, hs/2), in fp32 whatever the model dtype
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass
class PrefillWrite:
    """The new tokens of B sequences: sequence b's lengths[b] tokens go to positions [starts[b], starts[b] +
    lengths[b]) of cache row slots[b], and its token i attends to that row's positions [0, starts[b] + i]: a prompt,
    or the part of one that the slot does not hold yet (a later chat turn, a shared prefix). The batch is
    right-padded to T = max(lengths); a padding token writes nothing and its output is not used."""
    slots: list
    starts: list
    lengths: list

    def write(self, cache: "KVCache", k, v):
        return cache.write_prefill(self.slots, self.starts, self.lengths, k, v)


@dataclass
class DecodeWrite:
    """One token for every slot at once (B == slots, T == 1): slot b's goes to its own position start[b] (its length
    so far). Every slot reads keys [0, kv_len) under the mask key j <= start[b]; kv_len is the same for every step
    of a compiled engine (S_max), so the step has one shape. all_visible: the caller knows that every slot's start
    is kv_len - 1 (e.g. one sequence at its exact length), so there is no mask to build or apply."""
    start: torch.Tensor
    kv_len: int
    all_visible: bool = False

    def write(self, cache: "KVCache", k, v):
        return cache.write_decode(self.start, self.kv_len, self.all_visible, k, v)


class KVCache(nn.Module):
    """A preallocated (slots, n_kv, S_max, hs) key/value buffer: one row per sequence the engine serves. Its two
    writes return the keys, values to attend to and how attention is to see them (attention()'s key_padding_mask
    or key_lengths); copy_prefix shares a computed prefix between rows."""

    def __init__(self, slots, n_kv, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (slots, n_kv, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write_prefill(self, slots, starts, lengths, k, v):
        """k, v (B, n_kv, T, hs): row b's first lengths[b] tokens -> cache row slots[b] at starts[b]; -> keys, values
        (B, n_kv, Tk, hs) and how attention sees them. One sequence: its row's [0, start + T), causal as it is.
        Several: row b's keys [0, starts[b] + T) placed at the right end of Tk = max(starts) + T, so that attention's
        causal mask (aligned bottom-right) lets token i see position starts[b] + i; the left padding, and keys past
        starts[b] + lengths[b] (seen only by padding tokens), are masked out."""
        T = k.shape[2]
        for b, (slot, start, n) in enumerate(zip(slots, starts, lengths)):
            self.k_cache[slot, :, start:start + n] = k[b, :, :n]
            self.v_cache[slot, :, start:start + n] = v[b, :, :n]
        if len(slots) == 1:  # (1, n_kv, end, hs): a view of the row, no mask
            slot, end = slots[0], starts[0] + T
            return self.k_cache[slot:slot + 1, :, :end], self.v_cache[slot:slot + 1, :, :end], {}
        Tk = max(starts) + T
        keys = k.new_zeros(len(slots), k.shape[1], Tk, k.shape[3])  # (B, n_kv, Tk, hs)
        values = torch.zeros_like(keys)
        visible = torch.zeros(len(slots), Tk, dtype=torch.bool, device=k.device)  # (B, Tk)
        for b, (slot, start, n) in enumerate(zip(slots, starts, lengths)):
            pad = Tk - start - T  # row b's position p sits at pad + p
            keys[b, :, pad:pad + start + n] = self.k_cache[slot, :, :start + n]
            values[b, :, pad:pad + start + n] = self.v_cache[slot, :, :start + n]
            visible[b, pad:pad + start + n] = True
        return keys, values, {"key_padding_mask": visible}

    def copy_prefix(self, src: int, dst: int, n: int):
        """Row dst's positions [0, n) := row src's: a prefix computed once, shared by another sequence."""
        self.k_cache[dst, :, :n] = self.k_cache[src, :, :n]
        self.v_cache[dst, :, :n] = self.v_cache[src, :, :n]

    def write_decode(self, start, kv_len: int, all_visible: bool, k, v):
        """k, v (slots, n_kv, 1, hs) -> each slot's own position start (slots,); -> keys, values (slots, n_kv, kv_len,
        hs) and each slot's number of keys start + 1 (None when all_visible)."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k_cache[rows, :, start] = k[:, :, 0]  # (slots, n_kv, hs) at each slot's own length
        self.v_cache[rows, :, start] = v[:, :, 0]
        lengths = None if all_visible else start + 1  # (slots,): a slot's token sees positions [0, start]
        return self.k_cache[:, :, :kv_len], self.v_cache[:, :, :kv_len], {"key_lengths": lengths}


def _join(module, name: str, dense: bool):
    """module.JOINED's layers, which read the same x, as one layer module.<name> (theirs deleted): quantized ones
    joined, plain ones too when dense and their weights already lie as one block (weights/load.py reads them so:
    joining never copies); else module.<name> stays None (LoRA-wrapped or mixed layers, weights apart)."""
    layers = [getattr(module, n) for n in module.JOINED]
    joined = None
    if all(isinstance(m, QuantLinear) for m in layers):
        joined = QuantLinear.concat(layers)
    elif dense and all(type(m) is DecodeLinear for m in layers):
        joined = DecodeLinear.concat(layers)
    setattr(module, name, joined)
    if joined is not None:
        for n in module.JOINED:
            delattr(module, n)


class LlamaAttention(nn.Module):
    JOINED = ("q_proj", "k_proj", "v_proj")  # the layers `join` makes one, in this order (weights/load.py reads so)

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if self.n_head % self.n_kv:
            raise ValueError(f"num_attention_heads {self.n_head} is not a multiple of num_key_value_heads {self.n_kv}")
        C = cfg.hidden_size
        self.q_proj = DecodeLinear(C, self.n_head * self.hs, bias=False)
        self.k_proj = DecodeLinear(C, self.n_kv * self.hs, bias=False)
        self.v_proj = DecodeLinear(C, self.n_kv * self.hs, bias=False)
        self.o_proj = DecodeLinear(self.n_head * self.hs, C, bias=False)
        self.qkv_proj = None  # q, k and v as one layer, for inference on the CPU (join)
        self.kv_cache = None

    def join(self, dense: bool):
        """q, k and v as one layer, quantized (QuantLinear.concat) or, with dense, plain (DecodeLinear.concat):
        weights/load.py does it on the CPU, for inference."""
        _join(self, "qkv_proj", dense)

    def forward(self, x, cos, sin, key_padding_mask=None, cache: PrefillWrite | DecodeWrite = None):
        """x (B, T, C). key_padding_mask (B, T) bool, True = real token (no cache: training, a full forward).
        With a cache (set up by setup_cache), the new keys/values are written where `cache` says and attention
        reads the cached ones."""
        B, T, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split(self.qkv_proj.parts, dim=-1)  # (B, T, nh*hs), (B, T, n_kv*hs) x 2
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        q, k = apply_rope(q, k, cos, sin)
        seen = {"key_padding_mask": key_padding_mask}
        if cache is not None:
            k, v, seen = cache.write(self.kv_cache, k, v)  # (B, n_kv, Tk, hs), and which keys each row sees
        # Causal with the cache offset: new token i (position start + i) sees positions j <= start + i, i.e. the
        # mask is aligned to the bottom-right corner of the (T, Tk) score matrix (one slot: Tk = start + T; several:
        # each row's keys end where its prefill's end; a decode step's single query sees every key of its slot).
        y = attention(q, k, v, causal=True, **seen)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hs))


class LlamaMLP(nn.Module):
    JOINED = ("gate_proj", "up_proj")

    def __init__(self, cfg: TextConfig):
        super().__init__()
        C, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = DecodeLinear(C, F, bias=False)
        self.up_proj = DecodeLinear(C, F, bias=False)
        self.down_proj = DecodeLinear(F, C, bias=False)
        self.gate_up_proj = None  # gate and up as one layer, for inference on the CPU (join)

    def join(self, dense: bool):
        """gate and up as one layer, as LlamaAttention.join does q, k and v."""
        _join(self, "gate_up_proj", dense)

    def forward(self, x):
        if self.gate_up_proj is not None:
            return self.down_proj(swiglu_layers(x, self.gate_up_proj))
        return self.down_proj(swiglu_layers(x, self.gate_proj, self.up_proj))  # down(silu(gate(x)) * up(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, key_padding_mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_padding_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds, position_ids, key_padding_mask=None, cache=None):
        """inputs_embeds (B, T, C), position_ids (B, T) -> final hidden states (B, T, C)."""
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # Keep only each block's input; recompute its activations during backward.
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, key_padding_mask, cache,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, key_padding_mask, cache)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = DecodeLinear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        """With tie_word_embeddings the head reuses the embedding matrix (call again after loading)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def setup_cache(self, slots: int, max_seq_len: int, dtype=None, device=None) -> list:
        """A fresh (slots, n_kv, max_seq_len, hs) KV cache in every layer; -> the layers' caches (use_cache puts
        them back after another cache was set up)."""
        w = self.model.embed_tokens.weight  # (the head may be quantized: no .weight)
        caches = [KVCache(slots, m.self_attn.n_kv, max_seq_len, m.self_attn.hs, dtype or w.dtype, device or w.device)
                  for m in self.model.layers]
        self.use_cache(caches)
        return caches

    def use_cache(self, caches: list):
        for layer, cache in zip(self.model.layers, caches):
            layer.self_attn.kv_cache = cache

    def forward(self, input_ids, position_ids=None, key_padding_mask=None):
        """Text-only forward: input_ids (B, T) -> logits (B, T, V)."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.lm_head(self.model(self.model.embed_tokens(input_ids), position_ids, key_padding_mask))
