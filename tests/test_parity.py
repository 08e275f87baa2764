"""Parity with transformers (the oracle): same random weights on disk, fp32, max abs error <= 1e-4 for CLIP
features, LLM logits and full LLaVA logits, for every layout (A and its variants, B, C) x MHA/GQA x
linear/mlp2x_gelu, with two images in one prompt and a padded batch of two (left and right padding); then bf16,
save_llava's output in LlavaForConditionalGeneration, and what the installed transformers itself saves.

Conventions differ in one place: minillava takes ONE image id per image in input_ids and expands it to Np
embeddings itself; llava-hf expects the image id already repeated Np times. For layouts B and C (no image
token in the vocabulary: minillava uses the -200 sentinel) the HF model is assembled here from the CLIP dir,
the LLaMA dir and the projector file, with an unused vocabulary id as its image token.
"""
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import (CLIPVisionModel, LlamaForCausalLM, LlavaConfig as HFLlavaConfig,  # noqa: E402
                          LlavaForConditionalGeneration)
from minillava.weights import keymaps  # noqa: E402
from minillava.weights.random_checkpoint import LAYOUTS  # noqa: E402

from minillava.config import get_preset  # noqa: E402
from minillava.weights import load_llava, random_llava, save_llava, write_layout  # noqa: E402

transformers.logging.set_verbosity_error()
TINY = get_preset("tiny")
ATOL = 1e-4
HF_IMAGE_ID = TINY.text.vocab_size - 1  # the HF side's image id for layouts B/C; never used as text below
TEXT = [[1, 5, None, 6, 7, None, 8], [1, 9, None, 10]]  # None = an image; 3 images, 2 sequences


def tiny(attn, projector_type):
    n_kv = TINY.text.num_attention_heads if attn == "mha" else 2
    return TINY.replace(text=dataclasses.replace(TINY.text, num_key_value_heads=n_kv), projector_type=projector_type)


def pixels(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def pad(rows, side, value=0):
    T = max(map(len, rows))
    ids = torch.tensor([[value] * (T - len(r)) + r if side == "left" else r + [value] * (T - len(r)) for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * (T - len(r))
                         for r in rows])
    return ids, mask


def minillava_batch(image_id, side):
    return pad([[image_id if t is None else t for t in row] for row in TEXT], side)


def hf_batch(image_id, n_patches, side):
    """llava-hf's convention: each image id repeated Np times; positions passed explicitly so that left padding
    does not shift them (minillava counts positions from the first real token)."""
    ids, mask = pad([[x for t in row for x in ([image_id] * n_patches if t is None else [t])] for row in TEXT], side)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------------------
# The oracle, built with transformers' own loaders from the files of each layout

def _hf_projector(hf, projector_type, linear_1, linear_2=None):
    """llava-hf's projector is always mlp2x_gelu; a `linear` (LLaVA v1) one is a bare nn.Linear, as in the
    original code."""
    proj = hf.model.multi_modal_projector
    if projector_type == "linear":
        hf.model.multi_modal_projector = proj.linear_1
    if linear_1 is not None:
        proj.linear_1.load_state_dict(linear_1)
    if linear_2 is not None:
        proj.linear_2.load_state_dict(linear_2)


def hf_oracle(layout, paths, cfg, dtype=torch.float32):
    """-> (LlavaForConditionalGeneration, CLIPVisionModel or None, LlamaForCausalLM or None, hf image id)."""
    if layout.startswith("A"):
        hf = LlavaForConditionalGeneration.from_pretrained(paths["model"], dtype=dtype)
        if cfg.projector_type == "linear":
            _hf_projector(hf, "linear", None)  # linear_1 came from the file; linear_2 does not exist
        return hf.eval(), None, None, cfg.image_token_id
    vision = CLIPVisionModel.from_pretrained(paths["vision"], dtype=dtype).eval()
    llm = LlamaForCausalLM.from_pretrained(paths["model"], dtype=dtype).eval()
    if layout == "B":  # the projector sits in the LLaVA file, as model.mm_projector.{0,2} (or .weight/.bias)
        file = next(paths["model"].glob("*.safetensors"))
    else:
        file = paths["projector"]
    st = {k.removeprefix("model.mm_projector."): v.to(dtype) for k, v in load_file(file).items()
          if k.startswith("model.mm_projector.")}
    config = HFLlavaConfig(vision_config=vision.config.to_dict(), text_config=llm.config.to_dict(),
                           image_token_index=HF_IMAGE_ID, vision_feature_layer=cfg.vision_feature_layer,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu")
    hf = LlavaForConditionalGeneration(config).to(dtype).eval()
    hf.model.vision_tower.load_state_dict(vision.state_dict())
    hf.model.language_model.load_state_dict(llm.model.state_dict())
    hf.lm_head.load_state_dict(llm.lm_head.state_dict())
    if cfg.projector_type == "linear":
        _hf_projector(hf, "linear", {"weight": st["weight"], "bias": st["bias"]})
    else:
        _hf_projector(hf, "mlp2x_gelu", {p: st[f"0.{p}"] for p in ("weight", "bias")},
                      {p: st[f"2.{p}"] for p in ("weight", "bias")})
    return hf, vision, llm, HF_IMAGE_ID


@torch.no_grad()
def llava_logits(model, hf, hf_image_id, side, dtype=torch.float32):
    """Full LLaVA logits of both models at every real token: (N_real, V) each."""
    pix = pixels().to(dtype)
    ids, mask = minillava_batch(model.config.image_token_id, side)
    out = model(ids, pix, mask)  # (2, L, V)
    hf_ids, hf_mask, pos = hf_batch(hf_image_id, model.config.num_image_tokens, side)
    hf_out = hf(input_ids=hf_ids, pixel_values=pix, attention_mask=hf_mask, position_ids=pos).logits
    assert out.shape == hf_out.shape
    real = hf_mask.bool()
    return out[real].float(), hf_out[real].float()


@torch.no_grad()
def max_errors(model, hf, vision, llm, hf_image_id) -> dict:
    """Max abs errors: CLIP features, LLM logits, and LLaVA logits with right and left padding."""
    pix = pixels()
    vision = vision or hf.model.vision_tower
    layer = model.config.vision_feature_layer
    feats = model.vision_tower(pix[:2], layer)
    hf_feats = vision(pix[:2], output_hidden_states=True).hidden_states[layer]
    text = torch.tensor([[1, 5, 6, 7, 8, 11, 12]])
    errs = {"vision": (feats - hf_feats).abs().max().item(),
            "llm": (model.language_model(text) - (llm or hf)(input_ids=text).logits).abs().max().item()}
    for side in ("right", "left"):
        out, hf_out = llava_logits(model, hf, hf_image_id, side)
        errs[f"llava-{side}-padded"] = (out - hf_out).abs().max().item()
    return errs


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(attn, projector_type) -> (config, {layout: paths}): the same random weights in each layout."""
    root = tmp_path_factory.mktemp("parity")
    cache = {}

    def get(attn, projector_type):
        if (attn, projector_type) not in cache:
            cfg = tiny(attn, projector_type)
            model = random_llava(cfg, seed=1)
            cache[attn, projector_type] = cfg, {
                layout: write_layout(model, root / f"{attn}-{projector_type}-{layout.replace(chr(39), 'p')}", layout)
                for layout in LAYOUTS}
        return cache[attn, projector_type]
    return get


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu"])
@pytest.mark.parametrize("attn", ["mha", "gqa"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_parity(written, layout, attn, projector_type):
    cfg, paths = written(attn, projector_type)
    p = paths[layout]
    model = load_llava(p["model"], vision_path=p.get("vision"), projector_path=p.get("projector"))
    errs = max_errors(model, *hf_oracle(layout, p, cfg))
    assert max(errs.values()) <= ATOL, errs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_parity(written, layout):
    """Loaded in bf16, minillava is as close to the fp32 oracle as transformers in bf16 is.
    bf16 keeps 8 bits of mantissa, so both land ~0.01 RMS (~0.05 max) off fp32 logits of order 4 here; the two
    round in different places (which ops run in fp32, in which order), so the errors are not identical. The
    RMS over ~1000 logits is a stable measure: within 10% of transformers'. The max over them is noisy (one
    unlucky rounding): within 2x of transformers'. A real bug (a wrong cast, RoPE in bf16) costs far more."""
    cfg, paths = written("gqa", "mlp2x_gelu")
    p = paths[layout]
    model = load_llava(p["model"], vision_path=p.get("vision"), projector_path=p.get("projector"),
                       dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in model.state_dict().values())
    hf32, _, _, hf_image_id = hf_oracle(layout, p, cfg)
    hf16, _, _, _ = hf_oracle(layout, p, cfg, dtype=torch.bfloat16)
    mini, hf_bf16 = llava_logits(model, hf16, hf_image_id, "right", torch.bfloat16)
    _, ref = llava_logits(model, hf32, hf_image_id, "right")

    def rms(x):
        return x.pow(2).mean().sqrt().item()
    err_mini, err_hf = (mini - ref).abs().max().item(), (hf_bf16 - ref).abs().max().item()
    assert rms(mini - ref) <= 1.1 * rms(hf_bf16 - ref), (rms(mini - ref), rms(hf_bf16 - ref))
    assert err_mini <= 2 * err_hf, f"minillava bf16 max error {err_mini:.3f} vs transformers' {err_hf:.3f}"


@pytest.mark.parametrize("source", ["A", "B"])
def test_save_llava_output_loads_in_transformers(written, tmp_path, source):
    """save_llava writes layout A that LlavaForConditionalGeneration reads as is. From layout B (the -200
    sentinel) it adds <image>/<pad> to the vocabulary; the original model's logits are the first V columns."""
    cfg, paths = written("mha", "mlp2x_gelu")
    p = paths[source]
    original = load_llava(p["model"], vision_path=p.get("vision"))
    out = save_llava(original, tmp_path / "saved")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    model = load_llava(out)
    errs = max_errors(model, hf, None, None, model.config.image_token_id)
    assert max(errs.values()) <= ATOL, errs
    V = cfg.text.vocab_size
    with torch.no_grad():
        ids, mask = minillava_batch(model.config.image_token_id, "right")
        hf_ids, hf_mask, pos = hf_batch(model.config.image_token_id, model.config.num_image_tokens, "right")
        hf_out = hf(input_ids=hf_ids, pixel_values=pixels(), attention_mask=hf_mask, position_ids=pos).logits
        orig_ids, _ = minillava_batch(original.config.image_token_id, "right")
        orig = original(orig_ids, pixels(), mask)
    real = hf_mask.bool()
    assert (hf_out[..., :V][real] - orig[real]).abs().max().item() <= ATOL
    # ... and what transformers saves back (its own key layout) loads in minillava to the same weights.
    hf.save_pretrained(tmp_path / "resaved")
    again = load_llava(tmp_path / "resaved")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def transformers_save_layout(version: str) -> str:
    """The layout LlavaForConditionalGeneration.save_pretrained writes for a model built from its config, by
    transformers version (weights/keymaps.py; measured on 4.37.2, 4.45.2, 4.57.6 and 5.0.0-5.24.0)."""
    major, minor = (int(x) for x in version.split(".")[:2])
    if (major, minor) >= (5, 6):
        return "A-flat"
    return "A-mixed" if (major, minor) >= (5, 4) else "A"


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_transformers_own_save_loads(written, tmp_path, shard):
    """A model built from a config and saved by the installed transformers (what conversion scripts and
    trainers that start from_config write: layout A-flat since 5.6) loads strictly, sharded or not, with the
    same logits; its keys are exactly the layout keymaps.py names for this version."""
    from minillava.weights.load import TensorFiles
    cfg, paths = written("gqa", "mlp2x_gelu")
    src = LlavaForConditionalGeneration.from_pretrained(paths["A"]["model"]).eval()
    fresh = LlavaForConditionalGeneration(src.config).eval()
    fresh.load_state_dict(src.state_dict())
    fresh.save_pretrained(tmp_path / "saved", **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "saved" / "model.safetensors.index.json").exists() == (shard is not None)
    rules = keymaps.LLAVA_HF[transformers_save_layout(transformers.__version__)]
    model = load_llava(tmp_path / "saved")
    expected = set(model.state_dict())
    keys = TensorFiles(tmp_path / "saved").keys()
    assert {keymaps.to_internal(k, rules) for k in keys} == expected
    errs = max_errors(model, src, None, None, cfg.image_token_id)
    assert max(errs.values()) <= ATOL, errs
