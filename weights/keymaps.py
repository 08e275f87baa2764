"""Official checkpoint key names <-> minillava's parameter names, for every layout LLaVA weights come in.

minillava's parameter names ARE llava-hf's (layout A), so layout A needs no mapping. Every other layout is a
list of prefix rules `(official prefix, internal prefix)`: a key is renamed by the first rule whose official
prefix it starts with, and written back by the first rule whose internal prefix it starts with. A key that no
rule matches and that is not in IGNORED is an unexpected tensor (an error, never skipped).

  layout   files                                      keys
  A        llava-hf model dir: the hub's llava-hf     vision_tower.vision_model.*, multi_modal_projector.linear_N.*,
           files; every save by transformers           language_model.model.*, language_model.lm_head.weight
           4.37-5.3; a re-save of an A model by 5.6+
  A-flat   transformers >= 5.6 saving a model built   vision_tower.embeddings... (no inner vision_model.), the
           from a config (from_config, conversions)   other prefixes as A
  A-mixed  transformers 5.4 and 5.5, every save       model.vision_tower.vision_model.*, model.multi_modal_projector.*,
                                                      model.language_model.model.*, language_model.lm_head.weight
  A'       transformers >= 5.6 re-saving a model it   model.vision_tower.vision_model.*, model.multi_modal_projector.*,
           loaded in A' (its in-memory names, 4.52+)  model.language_model.* (no inner `model.`), lm_head.weight
  A'-flat  the same without the inner vision_model.   model.vision_tower.embeddings... (5.x in memory; >= 5.6 re-save)
  B        original LLaVA dir (`llava_llama`)         model.embed_tokens/layers.N/norm, lm_head, model.mm_projector.*
           + a separate CLIP dir                      vision_model.* (+ CLIP's text tower and heads, ignored)
  C        CLIP dir + HF LLaMA dir + projector file   vision_model.*; model.*, lm_head.weight; (model.)mm_projector.*
Checked by running save_pretrained in transformers 4.37.2, 4.45.2, 4.57.6, 5.0.0 ... 5.24.0 (tests/test_parity.py
checks the installed version's save). minillava itself writes layout A, which all of them read.
"""
import re

from minillava.projector import projector_depth

# Internal prefixes: module paths inside minillava.llava.Llava.
VISION = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."
LM = "language_model.model."
LM_HEAD = "language_model.lm_head."
EMBED_KEY, LM_HEAD_KEY = LM + "embed_tokens.weight", LM_HEAD + "weight"

NEWLINE = "image_newline"  # LLaVA-1.6's learned row end (a parameter of Llava itself)
LLAVA_HF = {  # layouts of one llava-hf directory (config.json model_type "llava" or "llava_next")
    "A": [("vision_tower.vision_model.", VISION), ("multi_modal_projector.", PROJECTOR),
          ("language_model.model.", LM), ("language_model.lm_head.", LM_HEAD), (NEWLINE, NEWLINE)],
    "A'": [("model.vision_tower.vision_model.", VISION), ("model.multi_modal_projector.", PROJECTOR),
           ("model.language_model.", LM), ("lm_head.", LM_HEAD), ("model." + NEWLINE, NEWLINE)],
    "A'-flat": [("model.vision_tower.", VISION), ("model.multi_modal_projector.", PROJECTOR),
                ("model.language_model.", LM), ("lm_head.", LM_HEAD), ("model." + NEWLINE, NEWLINE)],
    "A-flat": [("vision_tower.", VISION), ("multi_modal_projector.", PROJECTOR),
               ("language_model.model.", LM), ("language_model.lm_head.", LM_HEAD), (NEWLINE, NEWLINE)],
    "A-mixed": [("model.vision_tower.vision_model.", VISION), ("model.multi_modal_projector.", PROJECTOR),
                ("model.language_model.model.", LM), ("language_model.lm_head.", LM_HEAD),
                ("model." + NEWLINE, NEWLINE)],
}
CLIP_RULES = [("vision_model.", VISION)]  # a CLIP dir (CLIPModel or CLIPVisionModel); layouts B, C
LLAMA_RULES = [("model.", LM), ("lm_head.", LM_HEAD)]  # a HF LLaMA dir (C), and the LLM inside a layout-B file
# Self-trained original checkpoints also carry the (frozen) tower: DeepSpeed saves it, and the original code
# ignores it and reloads the tower from mm_vision_tower. When present we load these (they are the model's own).
B_TOWER_RULES = [("model.vision_tower.vision_tower.vision_model.", VISION)]

# Tensors official files carry that LLaVA does not use. Nothing else is ever skipped.
IGNORED = [re.compile(p) for p in (
    r"(^|\.)rotary_emb\.inv_freq$",  # RoPE frequencies saved as a buffer by old transformers LLaMA; recomputed
    r"(^|\.)position_ids$",  # CLIP's arange(num_positions) buffer
    r"^text_model\.",  # the CLIP text tower
    r"^logit_scale$", r"^visual_projection\.", r"^text_projection\.",  # CLIP's contrastive heads
)]


def is_ignored(key: str) -> bool:
    return any(p.search(key) for p in IGNORED)


def projector_rules(projector_type: str, prefix: str = "model.mm_projector.") -> list:
    """The original code's projector: `linear` is a bare nn.Linear (`mm_projector.weight`); `mlpNx_gelu` is
    nn.Sequential(Linear, GELU, Linear, ...), so its linears sit at indices 0, 2, 4, ... (GELU has no weights)."""
    if projector_type == "linear":
        return [(prefix, PROJECTOR + "linear_1.")]
    return [(f"{prefix}{2 * i}.", f"{PROJECTOR}linear_{i + 1}.") for i in range(projector_depth(projector_type))]


def layout_b_rules(projector_type: str) -> list:
    """One original-LLaVA file: the projector, the tower and 1.6's newline first, since `model.` alone means the
    LLM."""
    return projector_rules(projector_type) + B_TOWER_RULES + [("model." + NEWLINE, NEWLINE)] + LLAMA_RULES


def stage1_projector_rules(projector_type: str) -> list:
    """A stage-1 projector file (layout C): `model.mm_projector.*` (written by the original trainer) or
    `mm_projector.*`. Writing uses the first form."""
    return projector_rules(projector_type, "model.mm_projector.") + projector_rules(projector_type, "mm_projector.")


def to_internal(key: str, rules) -> str | None:
    for official, internal in rules:
        if key.startswith(official):
            return internal + key[len(official):]
    return None


def to_official(key: str, rules) -> str | None:
    for official, internal in rules:
        if key.startswith(internal):
            return official + key[len(internal):]
    return None
