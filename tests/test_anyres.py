"""LLaVA-1.6 (AnyRes, minillava/anyres.py): preprocessing, token counts of both checkpoint families, the merge, the
Mistral decoder, loading llava-hf `llava_next` and original 1.6 dirs, and parity with transformers'
LlavaNextForConditionalGeneration (logits and greedy ids) on the same random weights.

The original code's preprocessing and counts are checked against the `llava` package in
tests/test_original_llava.py (it needs its own virtualenv)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from minillava import anyres
from minillava.config import PRESETS, from_hf_config, get_preset, to_hf_config
from minillava.engine import Engine, Request
from minillava.image import model_pixels
from minillava.weights import load_llava, random_llava, write_layout
from minillava.weights.random_checkpoint import clip_config, original_llava_config

TINY = get_preset("tiny-anyres")  # 32 px tiles of 4x4 patches; pinpoints 1x2, 2x1, 2x2 tiles
MISTRAL = TINY.replace(text=dataclasses.replace(TINY.text, model_type="mistral", rope_theta=1e6))
SIZES = [(40, 90), (70, 33), (50, 50), (5, 200), (333, 101), (49, 392), (10, 10)]  # (h, w)


def image(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------------------
# Geometry and counts

def test_best_resolution_and_the_two_families_on_a_full_tie():
    pins = ((32, 64), (64, 32), (64, 64))  # (h, w)
    assert anyres.best_resolution((40, 90), pins) == (32, 64)  # wide: one row of two tiles
    assert anyres.best_resolution((90, 40), pins) == (64, 32)
    assert anyres.best_resolution((200, 200), pins) == (64, 64)
    # an image smaller than every pinpoint keeps all its pixels in each: the least waste, then list order
    assert anyres.best_resolution((10, 10), pins) == (32, 64)
    listed = [[32, 64], [64, 32], [64, 64]]  # the same list in both families' files
    hf = from_hf_config({**to_hf_config(TINY), "image_grid_pinpoints": listed})
    orig = from_hf_config({**original_llava_config(TINY, torch.float32), "image_grid_pinpoints": listed},
                          vision=clip_config(TINY.vision))
    assert hf.image_grid_pinpoints == ((32, 64), (64, 32), (64, 64))  # llava-hf: (height, width)
    assert orig.image_grid_pinpoints == ((64, 32), (32, 64), (64, 64))  # the original: (width, height)
    assert (hf.unpad_rounding, orig.unpad_rounding) == ("round", "truncate")
    assert anyres.grid_shape((10, 10), hf.image_grid_pinpoints, 32) == (1, 2)
    assert anyres.grid_shape((10, 10), orig.image_grid_pinpoints, 32) == (2, 1)


def test_unpadding_rounds_in_one_family_and_truncates_in_the_other():
    # 49x392 into 1x2 tiles: a (4, 8) map, of which the image's height fills 49 * (8 / 392): 0.9999999999999999
    # in floats, rounded to 1 (2 rows kept of 4) or truncated to 0: the original keeps no grid at all
    assert anyres.unpadded_size((49, 392), (4, 8), "round") == (2, 8)
    assert anyres.unpadded_size((49, 392), (4, 8), "truncate") == (0, 8)
    Np = TINY.num_image_tokens
    assert TINY.image_positions((49, 392)) == Np + 2 * 9
    assert TINY.replace(unpad_rounding="truncate").image_positions((49, 392)) == Np  # no rows, so no newline
    # an odd difference keeps one extra row: 8 rows, 5 of image -> (8 - 5) // 2 = 1 off each end, 6 kept
    assert anyres.unpadded_size((5, 8), (8, 8), "round") == (6, 8)
    # the 7B preset's count, as llava-hf's processor writes it: p^2 + rows x (cols + 1)
    seven = PRESETS["llava-v1.6-vicuna-7b"]
    # 480x640 goes into 672x672 (2x2 tiles, a 48x48 map); its height fills 480 * 48 / 640 = 36 rows of it
    assert seven.image_tiles((480, 640)) == 5
    assert seven.image_positions((480, 640)) == 576 + 36 * (48 + 1)


def test_counts_equal_the_merged_features_for_every_size_and_family():
    C = 8
    for cfg in (TINY, TINY.replace(unpad_rounding="truncate")):
        for h in range(1, 140, 7):
            for w in range(1, 140, 11):
                tiles = cfg.image_tiles((h, w))
                feats = torch.randn(tiles, cfg.num_image_tokens, C)
                out = anyres.merge_features(feats, (h, w), cfg.image_grid_pinpoints, 32, cfg.unpad_rounding,
                                            torch.zeros(C))
                assert out.shape == (cfg.image_positions((h, w)), C)
                torch.testing.assert_close(out[:cfg.num_image_tokens], feats[0])  # the base image first


def test_merge_lays_tiles_back_in_row_major_order_with_a_newline_per_row():
    p, C = 4, 1
    # 2x2 tiles, each holding its own index: the merged map reads tile 0 | tile 1 on top, tile 2 | tile 3 below
    feats = torch.cat([torch.full((1, p * p, C), -1.0)] + [torch.full((1, p * p, C), float(t)) for t in range(4)])
    out = anyres.merge_features(feats, (64, 64), TINY.image_grid_pinpoints, 32, "round", torch.tensor([9.0]))
    grid = out[p * p:, 0].view(2 * p, 2 * p + 1)  # (rows, cols + newline)
    assert (grid[:, -1] == 9).all()
    assert (grid[:p, :p] == 0).all() and (grid[:p, p:2 * p] == 1).all()
    assert (grid[p:, :p] == 2).all() and (grid[p:, p:2 * p] == 3).all()


# ----------------------------------------------------------------------------------------------------------
# Preprocessing vs transformers' LlavaNextImageProcessorPil (the PIL backend: the default, torchvision, one is not
# installed here; the original code is PIL too)

@pytest.mark.parametrize("name", ["tiny-anyres", "llava-v1.6-vicuna-7b"])
def test_pixels_equal_transformers_llava_next_processor(name):
    tr = pytest.importorskip("transformers.models.llava_next.image_processing_pil_llava_next")
    cfg = PRESETS[name]
    S = cfg.vision.image_size
    proc = tr.LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                         image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints])
    sizes = SIZES + ([(1000, 700), (47, 188)] if S > 32 else [])
    for k, (h, w) in enumerate(sizes):
        for mode in ("RGB", "L", "CMYK"):  # (RGBA differs on purpose: transformers 5 composites it on white)
            img = image(h, w, k, mode)
            ours, size = model_pixels(img, cfg)
            ref = proc(img, return_tensors="pt")
            assert size == tuple(ref["image_sizes"][0].tolist()) == (h, w)
            assert ours.shape == ref["pixel_values"][0].shape == (cfg.image_tiles(size), 3, S, S)
            assert (ours - ref["pixel_values"][0]).abs().max() <= 1e-5, (name, h, w, mode)


def test_padding_is_black_and_the_base_image_is_squashed():
    img = Image.new("RGB", (64, 16), (255, 255, 255))  # w 64, h 16: 1x2 tiles, 8 rows of padding above and below
    pix, size = model_pixels(img, TINY)
    assert size == (16, 64) and pix.shape == (3, 3, 32, 32)
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258,
                                                                                    0.27577711])
    black = -torch.tensor([0.48145466, 0.4578275, 0.40821073]) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(pix[0], white[:, None, None].expand(3, 32, 32))  # the whole image, squashed
    torch.testing.assert_close(pix[1, :, :8], black[:, None, None].expand(3, 8, 32))  # padding above
    torch.testing.assert_close(pix[1, :, 8:24], white[:, None, None].expand(3, 16, 32))
    torch.testing.assert_close(pix[2, :, 24:], black[:, None, None].expand(3, 8, 32))  # padding below


# ----------------------------------------------------------------------------------------------------------
# The model vs transformers' LlavaNextForConditionalGeneration

def batch(cfg, rows, sizes, side):
    """minillava's ids (ONE image id per image) and llava-hf's (each image id repeated its positions), padded."""
    counts = iter([cfg.image_positions(s) for s in sizes])
    hf_rows = [[x for t in r for x in ([t] * next(counts) if t == cfg.image_token_id else [t])] for r in rows]

    def pad(rs):
        T = max(map(len, rs))
        ids = torch.tensor([[0] * (T - len(r)) + r if side == "left" else r + [0] * (T - len(r)) for r in rs])
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * (T - len(r))
                             for r in rs])
        return ids, mask
    return pad(rows), pad(hf_rows)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def written(request, tmp_path_factory):
    """The same random 1.6 weights in every llava-hf layout and the original's (B): {layout: paths}."""
    cfg = TINY if request.param == "llama" else MISTRAL
    model = random_llava(cfg, seed=3)
    root = tmp_path_factory.mktemp(f"anyres-{request.param}")
    return cfg, model, {layout: write_layout(model, root / layout.replace("'", "p"), layout)
                        for layout in ("A", "A'", "A-flat", "A'-flat", "A-mixed", "B")}


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_equal_transformers_llava_next(written, side):
    transformers = pytest.importorskip("transformers")
    cfg, _, paths = written
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(paths["A"]["model"], dtype=torch.float32)
    hf.eval()
    assert hf.config.text_config.model_type == cfg.text.model_type
    model = load_llava(paths["A"]["model"])
    I = cfg.image_token_id
    sizes = [(40, 90), (70, 33), (50, 50)]  # three aspect ratios: 1x2, 2x1 and 2x2 tiles
    pix = torch.cat([model_pixels(image(h, w, k), cfg)[0] for k, (h, w) in enumerate(sizes)])
    (ids, mask), (hf_ids, hf_mask) = batch(cfg, [[1, 5, I, 6, 7, I, 8], [1, 9, I, 10]], sizes, side)
    with torch.no_grad():
        ours = model(ids, pix, mask, image_sizes=sizes)
        pos = (hf_mask.cumsum(1) - 1).clamp(min=0)
        theirs = hf(input_ids=hf_ids, pixel_values=pix, image_sizes=torch.tensor(sizes), attention_mask=hf_mask,
                    position_ids=pos).logits
    real = hf_mask.bool()
    assert ours.shape == theirs.shape
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4
    assert ours[real].abs().mean() > 0.1  # logits of order 1: the bound above means something
    # the newline matters: without it the logits differ
    with torch.no_grad():
        model.image_newline.zero_()
        assert (model(ids, pix, mask, image_sizes=sizes)[real] - theirs[real]).abs().max() > 1e-2


def test_greedy_ids_equal_transformers_generate(written):
    transformers = pytest.importorskip("transformers")
    cfg, _, paths = written
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(paths["A"]["model"], dtype=torch.float32)
    model = load_llava(paths["A"]["model"])
    size = (70, 33)
    pix = model_pixels(image(*size), cfg)[0]
    ids = [1, 5, cfg.image_token_id, 6, 7]
    ours = Engine(model, slots=2).run([Request(ids, pix, max_new_tokens=12, image_sizes=[size])])[0].out
    (_, _), (hf_ids, _) = batch(cfg, [ids], [size], "right")
    gc = transformers.GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = hf.eval().generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pix,
                                 image_sizes=torch.tensor([size]), generation_config=gc)
    assert len(set(ours)) > 3
    assert ours == out[0, hf_ids.shape[1]:].tolist()


def test_every_layout_loads_the_same_model(written):
    cfg, model, paths = written
    sizes = [(40, 90), (49, 392)]
    pix = torch.cat([model_pixels(image(h, w, k), cfg)[0] for k, (h, w) in enumerate(sizes)])
    ids = torch.tensor([[1, 5, cfg.image_token_id, 6, cfg.image_token_id, 7]])
    with torch.no_grad():
        ref = model(ids, pix, image_sizes=sizes)
        for layout, p in paths.items():
            loaded = load_llava(p["model"], vision_path=p.get("vision"))
            if layout == "B":  # the original family: the same weights, its own unpadding (one grid fewer here)
                assert loaded.config == model.config.replace(image_token_id=-200, pad_token_id=0,
                                                             unpad_rounding="truncate")
                B = torch.tensor([[1, 5, -200, 6, -200, 7]])
                out = loaded(B, pix, image_sizes=sizes)
                assert out.shape[1] == ref.shape[1] - 2 * 9  # 49x392 keeps no grid rows in the original
                torch.testing.assert_close(out[:, :3 + cfg.image_positions(sizes[0])],
                                           ref[:, :3 + cfg.image_positions(sizes[0])], rtol=0, atol=1e-5)
                continue
            assert loaded.config == model.config, layout
            torch.testing.assert_close(loaded(ids, pix, image_sizes=sizes), ref, rtol=0, atol=1e-5)


def test_what_the_installed_transformers_saves_loads(written, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, model, paths = written
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(paths["A"]["model"], dtype=torch.float32)
    hf.save_pretrained(tmp_path / "saved")
    loaded = load_llava(tmp_path / "saved")
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ----------------------------------------------------------------------------------------------------------
# Configs, errors, the engine

def test_mistral_configs_as_the_hub_writes_them():
    d = to_hf_config(PRESETS["llava-v1.6-mistral-7b"])
    assert d["text_config"]["model_type"] == "mistral" and d["text_config"]["sliding_window"] is None
    assert from_hf_config(d) == PRESETS["llava-v1.6-mistral-7b"]
    bare = {"model_type": "llava_next", "text_config": {"model_type": "mistral"}}  # MistralConfig's defaults
    t = from_hf_config(bare).text
    assert (t.num_key_value_heads, t.rope_theta, t.sliding_window, t.context_length) == (8, 1e4, 4096, 4096)
    assert from_hf_config(bare).image_grid_pinpoints == PRESETS["llava-v1.6-vicuna-7b"].image_grid_pinpoints
    with pytest.raises(ValueError, match="sliding_window 4096 on a 'llama' model"):
        from_hf_config({"model_type": "llava_next", "text_config": {"model_type": "llama", "sliding_window": 4096}})


def test_a_window_shorter_than_the_context_limits_the_engine(tmp_path):
    cfg = MISTRAL.replace(text=dataclasses.replace(MISTRAL.text, sliding_window=40))
    engine = Engine(random_llava(cfg), slots=1)
    assert engine.S == 40
    with pytest.raises(ValueError, match="more than the KV cache's 40"):
        engine.check(Request(list(range(1, 42))))


def test_bad_anyres_configs_and_inputs_are_named():
    base = to_hf_config(TINY)
    for change, message in (({"image_grid_pinpoints": [[32]]}, "image_grid_pinpoints must be a list"),
                            ({"vision_feature_select_strategy": "full"}, "AnyRes needs the patch features")):
        with pytest.raises(ValueError, match=message):
            from_hf_config({**base, **change})
    orig = original_llava_config(TINY, torch.float32)
    with pytest.raises(ValueError, match="image_aspect_ratio 'anyres' with mm_patch_merge_type 'flat'"):
        from_hf_config({**orig, "mm_patch_merge_type": "flat"}, vision=clip_config(TINY.vision))
    assert from_hf_config({**orig, "image_grid_pinpoints": json.dumps(orig["image_grid_pinpoints"])},
                          vision=clip_config(TINY.vision)).image_grid_pinpoints == TINY.image_grid_pinpoints
    model = random_llava(TINY)
    pix = model_pixels(image(40, 90), TINY)[0]  # 3 tiles
    ids = torch.tensor([[1, TINY.image_token_id, 5]])
    with pytest.raises(ValueError, match="needs image_sizes"):
        model(ids, pix)
    with pytest.raises(ValueError, match=r"image_sizes \[\(64, 64\)\] need 5 tiles .* holds 3"):
        model(ids, pix, image_sizes=[(64, 64)])
    with pytest.raises(ValueError, match="need 5 tiles but pixel_values holds 3"):
        Engine(model, slots=1).check(Request([1, TINY.image_token_id, 5], pix, image_sizes=[(64, 64)]))


def test_cached_decoding_equals_a_full_forward_and_chats_reuse_the_image():
    model = random_llava(TINY, seed=5)
    I = TINY.image_token_id
    prompts = [([1, 5, I, 6], [(40, 90)]), ([1, I, 7, 8, 9, 10, I], [(70, 33), (49, 392)]), ([1, 4, 4], [])]
    reqs = []
    for k, (ids, sizes) in enumerate(prompts):
        pix = torch.cat([model_pixels(image(h, w, k), TINY)[0] for h, w in sizes]) if sizes else None
        reqs.append(Request(ids, pix, max_new_tokens=6 + k, image_sizes=sizes or None))
    done = Engine(model, slots=2).run(reqs)
    for r in done:  # each greedy id is the argmax of a full forward over everything before it
        ids = list(r.ids)
        for t in r.out:
            with torch.no_grad():
                logits = model(torch.tensor([ids]), r.pixel_values, image_sizes=r.image_sizes)[0, -1]
            logits[[TINY.image_token_id, TINY.pad_token_id]] = float("-inf")
            assert int(logits.argmax()) == t
            ids.append(t)
    engine, calls = Engine(model, slots=1), []
    real = model.encode_images
    model.encode_images = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
    try:
        first = engine.run([Request(reqs[0].ids, reqs[0].pixel_values, max_new_tokens=3,
                                    image_sizes=reqs[0].image_sizes)])[0]
        turn2 = first.ids + first.out + [11, 12]
        engine.run([Request(turn2, reqs[0].pixel_values, max_new_tokens=3, image_sizes=reqs[0].image_sizes)])
    finally:
        del model.encode_images
    # the image was encoded once; the second turn ran only what the slot did not hold (2 answer ids were fed
    # while decoding the first)
    assert len(calls) == 1 and engine.stats.prefill_tokens == TINY.llm_length(turn2, [(40, 90)]) - 2


def test_generate_py_answers_with_a_1_6_checkpoint(tmp_path, capsys):
    """One-shot, a batch file (positions counted from each image's header) and a chat, on a llava_next
    checkpoint with the mistral_instruct template: each answer equals the engine's on the same inputs."""
    from minillava import generate as G
    from minillava import generation
    from tests.spm_util import train_tiny_spm
    from minillava.weights import write_random_checkpoint
    cfg = MISTRAL.replace(text=dataclasses.replace(MISTRAL.text, vocab_size=832), image_token_id=768,
                          pad_token_id=769)
    ckpt = str(write_random_checkpoint(tmp_path / "next", cfg, "A", seed=2,
                                       tokenizer=train_tiny_spm(tmp_path / "spm"))["model"])
    paths = []
    for k, (h, w) in enumerate([(40, 90), (70, 33), (49, 392)]):
        paths.append(tmp_path / f"{k}.png")
        image(h, w, k).save(paths[-1])
    flags = ["--model", ckpt, "--template", "mistral_instruct", "--temperature", "0", "--max-new-tokens", "6",
             "--threads", "1"]
    assert G.main([*flags, "--image", str(paths[0]), "--prompt", "What is it?"]) == 0
    out, err = capsys.readouterr()
    one_shot = out.strip()
    assert "vision tower: 1 image(s) as 3 tile(s) in " in err  # 40x90: the base image and 1x2 tiles
    model, tok = generation.load(ckpt)
    expected = generation.answer(model, tok, [(str(p), "What is it?") for p in paths], template="mistral_instruct",
                        max_new_tokens=6)
    assert one_shot == expected[0]
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": k, "image": p.name, "text": "What is it?"}) + "\n"
                                 for k, p in enumerate(paths)))
    assert G.main([*flags, "--questions", str(questions), "--answers", str(tmp_path / "a.jsonl"),
                   "--image-folder", str(tmp_path), "--batch-size", "2"]) == 0
    answers = {json.loads(line)["question_id"]: json.loads(line)["text"] for line in open(tmp_path / "a.jsonl")}
    assert answers == dict(enumerate(expected))
    chat = generation.Chat(model, tok, str(paths[1]), template="mistral_instruct", temperature=0, max_new_tokens=6)
    assert chat.ask("What is it?") == expected[1]
    chat.ask("And then?")  # the second turn reuses the image: prefilled once
    assert chat.stats.prefill_tokens < 2 * cfg.image_positions((70, 33))


def test_an_aspect_ratio_override_on_a_1_6_model_is_refused(tmp_path, capsys):
    from minillava import generate as G
    from tests.spm_util import train_tiny_spm
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, vocab_size=832), image_token_id=768, pad_token_id=769)
    ckpt = str(write_layout(random_llava(cfg), tmp_path / "next", "A", tokenizer=train_tiny_spm(tmp_path / "spm"))[
        "model"])
    image(40, 90).save(tmp_path / "a.png")
    rc = G.main(["--model", ckpt, "--image", str(tmp_path / "a.png"), "--prompt", "hi", "--image-aspect-ratio",
                 "square", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "is a LLaVA-1.6 (anyres) model: --image-aspect-ratio square would drop" in err
