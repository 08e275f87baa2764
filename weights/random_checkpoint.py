"""Small random checkpoints in every official layout, with the keys and config.json fields exactly as the
official files have them, for the tests and the CPU demo (nothing is ever downloaded).

    paths = write_random_checkpoint("ckpt", get_preset("tiny"), "C")
    model = load_llava(paths["model"], vision_path=paths["vision"], projector_path=paths["projector"])

  layout      writes                                          returns
  A, A', ...  out_dir: llava-hf config.json + weights      {"model": out_dir}  (every keymaps.LLAVA_HF layout)
  B           out_dir/llava (original LLaVA-1.5), out_dir/clip   {"model": .../llava, "vision": .../clip}
  C           out_dir/llama (HF LLaMA), out_dir/clip,         {"model": .../llama, "vision": .../clip,
              out_dir/mm_projector.safetensors                 "projector": .../mm_projector.safetensors}

The CLIP dir is a whole CLIPModel (text tower, contrastive heads, logit_scale, position_ids buffers), the LLaMA
weights carry the old `rotary_emb.inv_freq` buffers, as the real openai/clip-vit-large-patch14-336,
lmsys/vicuna-7b and liuhaotian/llava-v1.5-7b files do: the loader must ignore exactly those.
"""
import dataclasses
import math
from pathlib import Path

import torch

from minillava.config import VisionConfig, TextConfig, LlavaConfig
from minillava.llava import Llava
from minillava.weights import keymaps
from minillava.weights.save import (atomic_dir, copy_tokenizer, llava_hf_state, save_projector, write_json,
                                    write_safetensors)

LAYOUTS = (*keymaps.LLAVA_HF, "B", "C")
CLIP_NAME = "openai/clip-vit-large-patch14-336"  # what original LLaVA-1.5 configs name as mm_vision_tower


def random_llava(config: LlavaConfig, seed: int = 0, dtype=torch.float32, device="cpu") -> Llava:
    """A Llava with reproducible random weights scaled so activations stay of order 1 (logits ~1, not ~1e-3,
    so that a parity test at 1e-4 means something): linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    norm weights ~ 1 + N(0, 0.1^2), biases and other vectors ~ N(0, 0.1^2). `device`: where the weights are drawn
    and kept (a GPU draws 7B of them in seconds; its numbers differ from the CPU's)."""
    with torch.device("meta"):
        model = Llava(config)
    g = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if name == keymaps.LM_HEAD_KEY and config.text.tie_word_embeddings:
            continue
        t = torch.randn(p.shape, generator=g, device=device)
        if p.dim() == 1:
            is_norm_weight = name.endswith(".weight")  # the only 1-D weights are LayerNorm / RMSNorm ones
            t = 1 + 0.1 * t if is_norm_weight else 0.1 * t
        elif "embed" not in name.rsplit(".", 2)[-2] or "patch_embedding" in name:
            t = t * p[0].numel() ** -0.5  # linear and patch-conv weights: 1/sqrt(fan_in)
        state[name] = t.to(dtype)
    if config.text.tie_word_embeddings:
        state[keymaps.LM_HEAD_KEY] = state[keymaps.EMBED_KEY]
    model.load_state_dict(state, assign=True)
    model.language_model.tie_weights()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# Official config.json files

def llama_config(t: TextConfig, dtype) -> dict:
    """A HF LLaMA/Vicuna config.json (lmsys/vicuna-7b-v1.5 has these fields); a Mistral one for a Mistral."""
    fields = dataclasses.asdict(t)
    if t.model_type != "mistral":
        del fields["sliding_window"]
    return {"architectures": ["MistralForCausalLM" if t.model_type == "mistral" else "LlamaForCausalLM"],
            "hidden_act": "silu", "initializer_range": 0.02, "pretraining_tp": 1, "rope_scaling": None,
            "use_cache": True, "pad_token_id": 0, "torch_dtype": _dtype_name(dtype), **fields}


def original_llava_config(cfg: LlavaConfig, dtype) -> dict:
    """liuhaotian/llava-v1.5-7b's config.json: the LLaMA fields plus the mm_* fields of the original code;
    LLaVA-1.6's (liuhaotian/llava-v1.6-*) add AnyRes's, pinpoints as (width, height), and its tuned tower."""
    mistral = cfg.text.model_type == "mistral"
    anyres = {"image_grid_pinpoints": [[w, h] for h, w in cfg.image_grid_pinpoints],
              "mm_patch_merge_type": "spatial_unpad", "unfreeze_mm_vision_tower": True} if cfg.anyres else {}
    return {**llama_config(cfg.text, dtype), **anyres,
            "architectures": ["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
            "model_type": "llava_mistral" if mistral else "llava_llama", "mm_vision_tower": CLIP_NAME,
            "mm_hidden_size": cfg.vision.hidden_size,
            "mm_projector_type": cfg.projector_type, "mm_vision_select_layer": cfg.vision_feature_layer,
            "mm_vision_select_feature": "patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch",
            "image_aspect_ratio": cfg.image_aspect_ratio, "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
            "use_mm_proj": True}


def _clip_text_config(v: VisionConfig) -> dict:
    """A small CLIP text tower: LLaVA never uses it, but CLIPModel files carry one."""
    width = 16
    return {"model_type": "clip_text_model", "hidden_size": width, "intermediate_size": 2 * width,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16, "vocab_size": 64,
            "projection_dim": v.projection_dim, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def clip_config(v: VisionConfig) -> dict:
    """openai/clip-vit-large-patch14-336's config.json shape: a CLIPModel with text and vision configs."""
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": v.projection_dim,
            "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "text_config": _clip_text_config(v),
            "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu",
                              **dataclasses.asdict(v)}}


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------------
# Official tensor names

def clip_model_tensors(model: Llava, seed: int = 0) -> dict:
    """The whole CLIPModel file: our tower under `vision_model.*`, plus a random text tower, the contrastive
    heads, logit_scale and both position_ids buffers (int64), as in openai/clip-vit-large-patch14-336."""
    v = model.config.vision
    dtype = model.vision_tower.vision_model.pre_layrnorm.weight.dtype
    state = {keymaps.to_official(k, keymaps.CLIP_RULES): t for k, t in model.vision_tower.state_dict(
        prefix="vision_tower.").items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(v.num_patches + 1)[None]  # (1, Np + 1)
    tc = _clip_text_config(v)
    Ct, F, P = tc["hidden_size"], tc["intermediate_size"], v.projection_dim
    shapes = {"embeddings.token_embedding.weight": (tc["vocab_size"], Ct),
              "embeddings.position_embedding.weight": (tc["max_position_embeddings"], Ct),
              "final_layer_norm.weight": (Ct,), "final_layer_norm.bias": (Ct,)}
    for i in range(tc["num_hidden_layers"]):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"encoder.layers.{i}.self_attn.{proj}.weight"] = (Ct, Ct)
            shapes[f"encoder.layers.{i}.self_attn.{proj}.bias"] = (Ct,)
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[f"encoder.layers.{i}.{ln}.weight"] = shapes[f"encoder.layers.{i}.{ln}.bias"] = (Ct,)
        shapes.update({f"encoder.layers.{i}.mlp.fc1.weight": (F, Ct), f"encoder.layers.{i}.mlp.fc1.bias": (F,),
                       f"encoder.layers.{i}.mlp.fc2.weight": (Ct, F), f"encoder.layers.{i}.mlp.fc2.bias": (Ct,)})
    g = torch.Generator().manual_seed(seed + 1)
    for name, shape in shapes.items():
        state["text_model." + name] = (0.1 * torch.randn(shape, generator=g)).to(dtype)
    state["text_model.embeddings.position_ids"] = torch.arange(tc["max_position_embeddings"])[None]
    state["visual_projection.weight"] = (0.1 * torch.randn(P, v.hidden_size, generator=g)).to(dtype)
    state["text_projection.weight"] = (0.1 * torch.randn(P, Ct, generator=g)).to(dtype)
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=dtype)  # 2.6592, CLIP's temperature
    return state


def _llm_tensors(model: Llava, rules) -> dict:
    """The LLM (and projector, with layout B's rules; with 1.6's also the tower and newline) under official
    names, plus the per-layer
    `self_attn.rotary_emb.inv_freq` buffers older transformers saved."""
    t = model.config.text
    state = {}
    for k, v in model.state_dict().items():
        official = keymaps.to_official(k, rules)  # None for the projector under LLAMA_RULES (layout C)
        tower = k.startswith(keymaps.VISION) and not model.config.anyres  # 1.6 files hold their own tuned tower
        if official and not tower and not (k == keymaps.LM_HEAD_KEY and t.tie_word_embeddings):
            state[official] = v
    inv_freq = 1.0 / t.rope_theta ** (torch.arange(0, t.head_dim, 2).float() / t.head_dim)  # (hs/2,)
    for i in range(t.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return state


def _write_dir(out_dir: Path, tensors: dict, config: dict, max_shard_bytes=None, tokenizer=None):
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tensors, tmp, max_shard_bytes)
        write_json(tmp / "config.json", config)
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)


def write_layout(model: Llava, out_dir, layout: str, max_shard_bytes=None, tokenizer=None) -> dict:
    """Write `model` in one official layout (see the module docstring for what goes where)."""
    out_dir = Path(out_dir)
    dtype = model.language_model.lm_head.weight.dtype
    if layout in keymaps.LLAVA_HF:
        state, hf = llava_hf_state(model)
        state = {keymaps.to_official(k, keymaps.LLAVA_HF[layout]): v for k, v in state.items()}
        _write_dir(out_dir, state, hf, max_shard_bytes, tokenizer)
        return {"model": out_dir}
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    paths = {"vision": out_dir / "clip"}
    _write_dir(paths["vision"], clip_model_tensors(model), clip_config(model.config.vision))
    if layout == "B":
        paths["model"] = out_dir / "llava"
        state = _llm_tensors(model, keymaps.layout_b_rules(model.config.projector_type))
        _write_dir(paths["model"], state, original_llava_config(model.config, dtype), max_shard_bytes,
                   tokenizer)
    else:
        paths["model"] = out_dir / "llama"
        _write_dir(paths["model"], _llm_tensors(model, keymaps.LLAMA_RULES), llama_config(model.config.text, dtype),
                   max_shard_bytes, tokenizer)
        paths["projector"] = save_projector(model, out_dir / "mm_projector.safetensors")
    return paths


def write_random_checkpoint(out_dir, config: LlavaConfig, layout: str, seed: int = 0, dtype=torch.float32,
                            max_shard_bytes=None, tokenizer=None) -> dict:
    """Tiny random checkpoint in `layout` (one of LAYOUTS: "A", "A'", ..., "B", "C"); returns its paths (see above).
    The weights are random_llava(config, seed, dtype): the same seed gives the same model in every layout."""
    return write_layout(random_llava(config, seed, dtype), out_dir, layout, max_shard_bytes, tokenizer)
