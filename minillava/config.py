"""Model configuration: frozen dataclasses, named presets, and the round trip through official config.json files.

`from_hf_config` is a pure function from the dicts found in official checkpoints (llava-hf `model_type "llava"`,
original LLaVA `"llava_llama"`, plain `"llama"` + a CLIP `"clip"` / `"clip_vision_model"` config) to a
`LlavaConfig`; fields an official file leaves out take the defaults transformers would give them.
`to_hf_config` writes the llava-hf form back (layout A).
"""
import dataclasses
from dataclasses import dataclass, field

IMAGE_TOKEN_INDEX = -200  # the original LLaVA code's sentinel id for `<image>` (not in the vocabulary)


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower. Defaults: ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336)."""
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # unused by LLaVA; kept so config.json round-trips

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """LLaMA / Vicuna decoder. Defaults: Vicuna-7B v1.5 (LLaMA-2 7B)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "llama"  # "llama" (Vicuna, Yi) or "mistral": the same decoder, told apart in config.json
    sliding_window: int | None = None  # Mistral's attention window; None: every earlier position

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        """Positions a sequence may take. Within a sliding window attention is plain causal attention, so a model
        with a window shorter than its positions runs exactly up to the window (longer prompts are errors)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)


def llm_length(ids, image_token_id: int, image_positions) -> int:
    """LLM positions of an id list: ONE image id per image, image k spliced into image_positions[k] embeddings."""
    n_img = list(ids).count(image_token_id)
    if len(image_positions) < n_img:
        raise ValueError(f"the ids hold {n_img} image ids but the positions of {len(image_positions)} images were "
                         "given")
    return len(ids) - n_img + sum(image_positions[:n_img])


FITS_MESSAGE = ("the prompt is {L} tokens ({text} text + {images} image(s): {image_positions}), {over} more than the "
                "context of {room}")


@dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"  # "linear" (LLaVA v1), "mlp2x_gelu" (1.5), "mlpNx_gelu"
    vision_feature_layer: int = -2  # hidden state of the second-to-last CLIP layer
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    image_token_id: int = 32000  # ONE such id per image in input_ids; llava-hf: 32000, original: -200
    pad_token_id: int = 32001
    image_aspect_ratio: str = "pad"  # "pad": pad to square with the mean colour; "square"; "anyres" (1.6)
    # AnyRes (LLaVA-1.6, minillava/anyres.py): the resolutions an image may be tiled into, (height, width) each,
    # in the checkpoint's order, and how unpadding rounds: "round" (llava-hf) or "truncate" (the original code).
    image_grid_pinpoints: tuple = ()
    unpad_rounding: str = "round"

    @property
    def num_image_tokens(self) -> int:
        """Np: the embeddings of one tower input (576 at 336 px); a 1.6 image takes more (image_positions)."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    @property
    def anyres(self) -> bool:
        return self.image_aspect_ratio == "anyres"

    def image_positions(self, size) -> int:
        """LLM positions of one image of size (h, w): Np, or with AnyRes Np + a newline-ended row per grid row."""
        if not self.anyres:
            return self.num_image_tokens
        from minillava.anyres import num_positions
        v = self.vision
        return num_positions(size, self.image_grid_pinpoints, v.image_size, v.patch_size, self.unpad_rounding)

    def image_tiles(self, size) -> int:
        """Tower inputs of one image of size (h, w): 1, or with AnyRes the base image and its tiles."""
        if not self.anyres:
            return 1
        from minillava.anyres import num_tiles
        return num_tiles(size, self.image_grid_pinpoints, self.vision.image_size)

    def llm_length(self, ids, image_sizes=()) -> int:
        """How many LLM positions the id list `ids` takes; image_sizes: (h, w) of its images, in order (an
        AnyRes model needs them; the others take Np per image whatever the size)."""
        n_img = list(ids).count(self.image_token_id)
        if not self.anyres:
            return llm_length(ids, self.image_token_id, [self.num_image_tokens] * n_img)
        return llm_length(ids, self.image_token_id, [self.image_positions(s) for s in list(image_sizes or ())[:n_img]])

    def check_fits(self, ids, image_sizes=(), room: int = None, answer: int = 0, message: str = None) -> int:
        """-> the LLM positions L of the prompt `ids`: the one "does it fit" check of generation, the decode engine
        and the server. When L plus `answer` positions kept for the reply exceed `room` (default: the context
        length), a ValueError with `message` formatted from L, text (text ids), images, image_positions, need
        (L + answer), over (need - room) and room: each caller keeps its own words (default: generation's). (With
        no room kept, an answer is cut where the room ends, as in the original code.)"""
        room = self.text.context_length if room is None else room
        L, n_img = self.llm_length(ids, image_sizes), list(ids).count(self.image_token_id)
        if L + answer > room:
            raise ValueError((message or FITS_MESSAGE).format(
                L=L, text=len(ids) - n_img, images=n_img, image_positions=L - len(ids) + n_img, need=L + answer,
                over=L + answer - room, room=room))
        return L

    def replace(self, **changes) -> "LlavaConfig":
        return dataclasses.replace(self, **changes)


PRESETS = {
    "llava-1.5-7b": LlavaConfig(text=TextConfig(vocab_size=32064)),
    "llava-1.5-13b": LlavaConfig(text=TextConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824,
                                                 num_hidden_layers=40, num_attention_heads=40,
                                                 num_key_value_heads=40)),
    "llava-v1-7b": LlavaConfig(vision=VisionConfig(image_size=224), projector_type="linear",
                               image_aspect_ratio="square",
                               text=TextConfig(vocab_size=32064, max_position_embeddings=2048, rms_norm_eps=1e-6)),
    # A few-M-parameter model for tests: GQA, odd-ish sizes, 16 patches per image.
    "tiny": LlavaConfig(vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=2, projection_dim=16),
                        text=TextConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
                        image_token_id=318, pad_token_id=319),
}
# LLaVA-1.6 (llava-hf's llava-v1.6-*-hf configs): AnyRes on the 1.5 tower and projector, three decoders.
PINPOINTS_1_6 = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # (height, width)
_NEXT = dict(image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS_1_6)
PRESETS.update({
    "llava-v1.6-vicuna-7b": LlavaConfig(text=TextConfig(vocab_size=32064), **_NEXT),
    "llava-v1.6-mistral-7b": LlavaConfig(text=TextConfig(vocab_size=32064, intermediate_size=14336,
                                                         num_key_value_heads=8, max_position_embeddings=32768,
                                                         rope_theta=1e6, model_type="mistral"), **_NEXT),
    "llava-v1.6-34b": LlavaConfig(text=TextConfig(vocab_size=64064, hidden_size=7168, intermediate_size=20480,
                                                  num_hidden_layers=60, num_attention_heads=56, num_key_value_heads=8,
                                                  rope_theta=5e6, eos_token_id=7),  # <|im_end|>
                                 image_token_id=64000, pad_token_id=64001, **_NEXT),
    # tiny with AnyRes: 32 px tiles, pinpoints of 1x2, 2x1 and 2x2 tiles
    "tiny-anyres": dataclasses.replace(PRESETS["tiny"], image_aspect_ratio="anyres",
                                       image_grid_pinpoints=((32, 64), (64, 32), (64, 64))),
})


def get_preset(name: str) -> LlavaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------------------------------------
# Official config.json <-> LlavaConfig

# transformers' defaults for fields an official file may leave out (CLIPVisionConfig, LlamaConfig).
_HF_CLIP_DEFAULTS = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, num_channels=3, layer_norm_eps=1e-5,
                         projection_dim=512)
_HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                          rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# MistralConfig's defaults (hub configs override rope_theta to 1e6 and sliding_window to null).
_HF_MISTRAL_DEFAULTS = {**_HF_LLAMA_DEFAULTS, "intermediate_size": 14336, "max_position_embeddings": 4096 * 32,
                        "rms_norm_eps": 1e-6}
# llava-hf's LlavaConfig fills a missing vision_config with ViT-L/14-336.
_HF_LLAVA_VISION_DEFAULT = dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                num_hidden_layers=24, num_attention_heads=16, projection_dim=768)


def _pick(cls, d: dict, defaults: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: d.get(k, v) for k, v in defaults.items() if k in names}
    return cls(**values)


def vision_config_from_hf(d: dict) -> VisionConfig:
    """From a CLIP config.json (`"clip"` with a nested vision_config, or `"clip_vision_model"`)."""
    if d.get("model_type") == "clip" or "vision_config" in d:
        d = d.get("vision_config") or {}
    elif d.get("model_type") not in (None, "clip_vision_model"):
        raise ValueError(f"expected a CLIP vision config, got model_type {d.get('model_type')!r}")
    return _pick(VisionConfig, d, _HF_CLIP_DEFAULTS)


def text_config_from_hf(d: dict) -> TextConfig:
    model_type = d.get("model_type")
    if model_type not in (None, "llama", "llava_llama", "mistral", "llava_mistral"):
        raise ValueError(f"unsupported language model_type {model_type!r} (minillava runs LLaMA/Vicuna/Yi and "
                         "Mistral)")
    mistral = model_type in ("mistral", "llava_mistral")
    if not mistral and d.get("sliding_window") is not None:
        raise ValueError(f"sliding_window {d['sliding_window']} on a {model_type!r} model")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; LLaMA uses silu")
    rope_scaling = d.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling {rope_scaling!r}")
    theta = d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    text = _pick(TextConfig, {**d, "rope_theta": theta}, _HF_MISTRAL_DEFAULTS if mistral else _HF_LLAMA_DEFAULTS)
    text = dataclasses.replace(text, model_type="mistral" if mistral else "llama",
                               sliding_window=d.get("sliding_window", 4096) if mistral else None)
    n_kv = d.get("num_key_value_heads", 8 if mistral else None) or text.num_attention_heads
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim != text.head_dim:
        raise ValueError(f"head_dim {head_dim} != hidden_size / num_attention_heads = {text.head_dim}")
    return dataclasses.replace(text, num_key_value_heads=n_kv)


def from_hf_config(d: dict, vision: dict | None = None, projector_type: str | None = None) -> LlavaConfig:
    """An official config.json (as a dict) -> LlavaConfig.

    d:      the model's config.json: `"llava"` (llava-hf, layout A/A'), `"llava_llama"` (original LLaVA,
            layout B) or `"llama"` (a plain Vicuna/LLaMA, layout C).
    vision: the separate CLIP config.json, needed for layouts B and C (the tower is not in those files).
    """
    model_type = d.get("model_type")
    if model_type in ("llava", "llava_next"):
        if d.get("projector_hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported projector_hidden_act {d['projector_hidden_act']!r}")
        text = text_config_from_hf(d.get("text_config") or {})
        vision_d = d.get("vision_config")
        vcfg = _pick(VisionConfig, vision_d, _HF_CLIP_DEFAULTS) if vision_d else \
            VisionConfig(**_HF_LLAVA_VISION_DEFAULT)
        layer = d.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer {layer!r}: only a single layer is supported")
        return LlavaConfig(vision=vcfg, text=text, projector_type=projector_type or d.get("projector_type", "mlp2x_gelu"),
                           vision_feature_layer=layer,
                           vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
                           image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
                           pad_token_id=d.get("pad_token_id", text.vocab_size - 1) or 0,
                           **_image_fields(d, llava_hf=True))
    if model_type in ("llava_llama", "llava_mistral", "llama"):
        if vision is None:
            raise ValueError(f"a {model_type!r} checkpoint has no vision tower: give the CLIP directory "
                             "(vision_path / --vision)")
        select = d.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise ValueError(f"unsupported mm_vision_select_feature {select!r}")
        ptype = projector_type or d.get("mm_projector_type", "linear" if model_type != "llama" else
                                        "mlp2x_gelu")
        return LlavaConfig(vision=vision_config_from_hf(vision), text=text_config_from_hf(d), projector_type=ptype,
                           vision_feature_layer=d.get("mm_vision_select_layer", -2),
                           vision_feature_select_strategy="default" if select == "patch" else "full",
                           image_token_id=IMAGE_TOKEN_INDEX, pad_token_id=0, **_image_fields(d, llava_hf=False))
    raise ValueError(f"unknown model_type {model_type!r}: expected 'llava' / 'llava_next' (llava-hf), "
                     "'llava_llama' / 'llava_mistral' (original LLaVA) or 'llama' (with a separate CLIP directory)")


def _image_fields(d: dict, llava_hf: bool) -> dict:
    """How images are prepared and merged. llava-hf's `llava_next` is AnyRes by its model_type, lists pinpoints
    as (height, width) and rounds when unpadding; the original code says `image_aspect_ratio: anyres` with
    `mm_patch_merge_type: spatial_unpad`, lists (width, height) and truncates (minillava/anyres.py)."""
    next_hf = d.get("model_type") == "llava_next"
    if next_hf and d.get("use_image_newline_parameter") is False:
        raise ValueError("use_image_newline_parameter false: minillava's LLaVA-1.6 always has an image_newline")
    aspect = "anyres" if next_hf else d.get("image_aspect_ratio", "pad")
    merge = "spatial_unpad" if next_hf else d.get("mm_patch_merge_type", "flat")
    if aspect not in ("pad", "square", "anyres"):
        raise ValueError(f"unsupported image_aspect_ratio {aspect!r} (pad, square, anyres)")
    if (aspect == "anyres") != (merge == "spatial_unpad") or merge not in ("flat", "spatial_unpad"):
        raise ValueError(f"image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r}: minillava runs "
                         "pad/square with flat, anyres with spatial_unpad")
    if aspect != "anyres":
        return {"image_aspect_ratio": aspect}
    pinpoints = d.get("image_grid_pinpoints", [list(p) for p in PINPOINTS_1_6] if next_hf else None)
    if isinstance(pinpoints, str):  # some original configs hold it as a string: "[(336, 672), ...]"
        import ast
        pinpoints = ast.literal_eval(pinpoints)
    if not pinpoints or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x > 0
                                                                                     for x in p) for p in pinpoints):
        raise ValueError(f"image_grid_pinpoints must be a list of [a, b] positive ints, got {pinpoints!r}")
    pinpoints = tuple((a, b) if llava_hf else (b, a) for a, b in pinpoints)  # -> (height, width)
    if d.get("vision_feature_select_strategy", d.get("mm_vision_select_feature", "default")) not in ("default",
                                                                                                      "patch"):
        raise ValueError("AnyRes needs the patch features without CLS (vision_feature_select_strategy default)")
    rounding = d.get("unpad_rounding", "round" if llava_hf else "truncate")  # minillava's own field (to_hf_config)
    return {"image_aspect_ratio": "anyres", "image_grid_pinpoints": pinpoints, "unpad_rounding": rounding}


def to_hf_config(cfg: LlavaConfig) -> dict:
    """LlavaConfig -> llava-hf config.json dict (layout A), loadable by transformers' LlavaConfig (LLaVA-1.6:
    LlavaNextConfig)."""
    v, t = cfg.vision, cfg.text
    text = dataclasses.asdict(t)  # model_type "llama" or "mistral"; only Mistral has a sliding_window field
    if t.model_type != "mistral":
        del text["sliding_window"]
    anyres = {"image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],  # (height, width) each
              "unpad_rounding": cfg.unpad_rounding} if cfg.anyres else {}  # unpad_rounding: minillava's field
    return {
        "architectures": ["LlavaNextForConditionalGeneration" if cfg.anyres else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if cfg.anyres else "llava",
        **anyres,
        "image_token_index": cfg.image_token_id,
        "pad_token_id": cfg.pad_token_id,
        "projector_hidden_act": "gelu",
        "projector_type": cfg.projector_type,  # not a llava-hf field: minillava reads it back
        "image_aspect_ratio": cfg.image_aspect_ratio,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_seq_length": cfg.num_image_tokens,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {"model_type": "clip_vision_model", "hidden_act": "quick_gelu",
                          **dataclasses.asdict(v)},
        "text_config": {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "head_dim": t.head_dim,
                        **text},
    }
