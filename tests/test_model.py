"""Model core: config round trip, the image splice, padding and positions (cached decoding: test_engine.py)."""
import dataclasses

import pytest
import torch

from minillava.config import PRESETS, from_hf_config, get_preset, to_hf_config
from minillava.llava import IGNORE_INDEX, Llava


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    cfg = get_preset("tiny").replace(**changes)
    model = Llava(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_round_trips_through_config_json(name):
    cfg = PRESETS[name]
    assert from_hf_config(to_hf_config(cfg)) == cfg


def test_llava_hf_config_with_fields_left_out_takes_official_defaults():
    # llava-1.5-7b-hf's config.json: most of text_config and some of vision_config are left at defaults.
    d = {"model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001,
         "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                         "vocab_size": 32064},
         "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                           "model_type": "clip_vision_model", "num_attention_heads": 16,
                           "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}}
    assert from_hf_config(d) == PRESETS["llava-1.5-7b"]
    assert PRESETS["llava-1.5-7b"].num_image_tokens == 576
    assert PRESETS["llava-v1-7b"].num_image_tokens == 256


def test_original_llava_config_needs_clip_and_reads_mm_fields():
    d = {"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
         "mm_vision_select_feature": "patch", "hidden_size": 4096, "max_position_embeddings": 4096,
         "rms_norm_eps": 1e-5, "image_aspect_ratio": "pad"}
    with pytest.raises(ValueError, match="no vision tower"):
        from_hf_config(d)
    clip = {"model_type": "clip", "vision_config": {"hidden_size": 1024, "image_size": 336,
                                                    "intermediate_size": 4096, "num_attention_heads": 16,
                                                    "num_hidden_layers": 24, "patch_size": 14,
                                                    "projection_dim": 768}}
    cfg = from_hf_config(d, vision=clip)
    assert cfg.vision == PRESETS["llava-1.5-7b"].vision and cfg.image_token_id == -200
    with pytest.raises(ValueError, match="unknown model_type 'mistral'"):
        from_hf_config({"model_type": "mistral"})


def test_splice_places_image_features_and_counts_positions():
    model = tiny_model()
    cfg, Np = model.config, model.config.num_image_tokens
    img = cfg.image_token_id
    ids = torch.tensor([[1, 5, img, 6, img, 7]])
    labels = torch.tensor([[-100, 5, -100, 6, -100, 7]])
    pix = torch.randn(2, 3, 32, 32)
    embeds, mask, pos, new_labels = model.embed_inputs(ids, pix, labels=labels)
    assert embeds.shape == (1, 6 - 2 + 2 * Np, cfg.text.hidden_size)
    feats = model.encode_images(pix)  # [(Np, C)] x 2
    E = model.language_model.model.embed_tokens.weight
    torch.testing.assert_close(embeds[0, 0], E[1])
    torch.testing.assert_close(embeds[0, 1], E[5])
    torch.testing.assert_close(embeds[0, 2:2 + Np], feats[0])
    torch.testing.assert_close(embeds[0, 2 + Np], E[6])
    torch.testing.assert_close(embeds[0, 3 + Np:3 + 2 * Np], feats[1])
    torch.testing.assert_close(embeds[0, -1], E[7])
    assert pos[0].tolist() == list(range(6 - 2 + 2 * Np)) and bool(mask.all())
    expected = [-100, 5] + [IGNORE_INDEX] * Np + [6] + [IGNORE_INDEX] * Np + [7]
    assert new_labels[0].tolist() == expected


def test_image_count_mismatch_is_an_error():
    model = tiny_model()
    ids = torch.tensor([[1, model.config.image_token_id, 5]])
    with pytest.raises(ValueError, match="1 image tokens .* but 2 images"):
        model(ids, torch.randn(2, 3, 32, 32))


def test_wrong_image_size_names_the_expected_size():
    model = tiny_model()
    S = model.config.vision.image_size
    ids = torch.tensor([[1, model.config.image_token_id, 5]])
    with pytest.raises(ValueError, match=rf"shape \(1, 3, {S + 4}, {S + 4}\).*\(N, 3, {S}, {S}\).*size={S}"):
        model(ids, torch.randn(1, 3, S + 4, S + 4))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(padding_side):
    model = tiny_model()
    img = model.config.image_token_id
    a = [1, 9, img, 10, 11, 12, 13]
    b = [1, img, 14]  # shorter: padded
    pix = torch.randn(2, 3, 32, 32)
    pad = [0] * (len(a) - len(b))
    ids = torch.tensor([a, pad + b if padding_side == "left" else b + pad])
    mask = torch.tensor([[1] * len(a), ([0] * len(pad) + [1] * len(b)) if padding_side == "left"
                         else [1] * len(b) + [0] * len(pad)])
    logits = model(ids, pix, mask)
    alone_a = model(torch.tensor([a]), pix[:1])
    alone_b = model(torch.tensor([b]), pix[1:])
    torch.testing.assert_close(logits[0], alone_a[0], atol=1e-5, rtol=1e-5)
    n_b = alone_b.shape[1]
    part = logits[1, -n_b:] if padding_side == "left" else logits[1, :n_b]
    torch.testing.assert_close(part, alone_b[0], atol=1e-5, rtol=1e-5)


def test_feature_layer_and_full_strategy():
    model = tiny_model()
    pix = torch.randn(1, 3, 32, 32)
    n_layers = model.config.vision.num_hidden_layers
    vm = model.vision_tower.vision_model
    x = vm.pre_layrnorm(vm.embeddings(pix))
    for layer in vm.encoder.layers[:n_layers - 1]:
        x = layer(x)
    torch.testing.assert_close(model.vision_tower(pix, -2), x)
    full = tiny_model(vision_feature_select_strategy="full")
    assert full.config.num_image_tokens == model.config.num_image_tokens + 1
    assert full.encode_images(pix)[0].shape[0] == full.config.num_image_tokens


def test_gqa_and_tied_embeddings_train_step():
    model = tiny_model(text=dataclasses.replace(get_preset("tiny").text, tie_word_embeddings=True)).train()
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    model.language_model.model.gradient_checkpointing = True
    img = model.config.image_token_id
    ids = torch.tensor([[1, img, 5, 6, 7]])
    loss, n = model.loss(ids, torch.tensor([[-100, -100, 5, 6, 7]]), torch.randn(1, 3, 32, 32))
    assert n == 3  # 5, 6 and 7 are supervised; 5 is predicted from the last image slot
    loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_a_new_model_holds_the_published_init_not_uninitialised_memory():
    cfg = get_preset("tiny")
    a, b = Llava(cfg), Llava(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # seed 0
    C = cfg.vision.hidden_size
    cls = a.vision_tower.vision_model.embeddings.class_embedding
    assert abs(cls.std().item() - C ** -0.5) < 0.5 * C ** -0.5  # N(0, C^-1/2), not empty memory
    q = a.language_model.model.layers[0].self_attn.q_proj.weight
    assert abs(q.std().item() - 0.02) < 0.004 and torch.equal(a.language_model.model.norm.weight,
                                                                 torch.ones_like(a.language_model.model.norm.weight))
    b.init_weights(seed=1)
    assert not torch.equal(q, b.language_model.model.layers[0].self_attn.q_proj.weight)
    with torch.device("meta"):  # shapes only, for loading: nothing drawn
        assert all(p.is_meta for p in Llava(cfg).parameters())
