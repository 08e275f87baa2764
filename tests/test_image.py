"""Tests for minillava/image.py: parity with transformers' CLIP processor, mode conversions, errors."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minillava.image import (
    CLIP_MEAN, CLIP_STD, center_crop, expand_to_square, load_image, preprocess_image, preprocess_images, to_rgb,
)

SHAPES = [(333, 517), (900, 17), (17, 900), (640, 480), (100, 50), (336, 336), (1, 1)]  # (w, h)


def make_image(mode, w, h, seed=0):
    """Random noise plus some drawn shapes, in the given PIL mode."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(250, 20, 90))
    if mode == "RGBA":
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    elif mode == "P":
        img = img.quantize(64)
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def expand2square(pil_img, background_color):
    """Verbatim from the original LLaVA (llava/mm_utils.py): the oracle for the pad step."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.fixture(scope="module")
def clip_processor():
    transformers = pytest.importorskip("transformers")
    # transformers >= 5: the PIL backend is CLIPImageProcessorPil (CLIPImageProcessor needs torchvision);
    # before 5, CLIPImageProcessor itself was the PIL one that LLaVA used.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor

    def make(size):  # the official openai/clip-vit-large-patch14-336 preprocessor_config.json, at `size`
        return cls(size={"shortest_edge": size}, crop_size=size, do_resize=True, do_center_crop=True,
                   do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                   image_std=list(CLIP_STD), resample=3, do_convert_rgb=True)
    return make


@pytest.mark.parametrize("size", [336, 224])
@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("w,h", SHAPES)
def test_parity_with_llava_pipeline(clip_processor, size, pad, w, h):
    proc = clip_processor(size)
    for i, mode in enumerate(["RGB", "RGBA", "L", "P", "CMYK"]):
        img = make_image(mode, w, h, seed=i)
        ref = img.convert("RGB")  # what LLaVA does right after Image.open
        if pad:
            ref = expand2square(ref, tuple(int(x * 255) for x in proc.image_mean))
        want = torch.as_tensor(np.asarray(proc(ref, return_tensors="np")["pixel_values"][0]))
        got = preprocess_image(img, size=size, pad=pad)
        assert got.dtype == torch.float32 and got.shape == (3, size, size), (mode, got.shape)
        err = (got - want).abs().max().item()
        assert err <= 1e-6, f"{mode} {w}x{h} size={size} pad={pad}: max abs err {err}"  # one pixel step = 0.015


@pytest.mark.parametrize("w,h,s", [(5, 4, 8), (4, 7, 7), (10, 3, 6), (3, 3, 4), (9, 12, 5), (8, 8, 8)])
def test_center_crop_matches_transformers_including_zero_pad(w, h, s):
    pytest.importorskip("transformers")
    from transformers.image_transforms import center_crop as hf_center_crop

    img = make_image("RGB", w, h)
    want = hf_center_crop(np.asarray(img), (s, s), input_data_format="channels_last")
    np.testing.assert_array_equal(np.asarray(center_crop(img, s)), want)


def test_expand_to_square_matches_original():
    for w, h in [(7, 4), (4, 7), (8, 5), (5, 5), (1, 6)]:
        img = make_image("RGB", w, h)
        np.testing.assert_array_equal(np.asarray(expand_to_square(img, (122, 116, 104))),
                                      np.asarray(expand2square(img, (122, 116, 104))))


def test_pad_colour_and_constant_image():
    # the pad colour is int(mean * 255) = (122, 116, 104) (truncation, not rounding: round would give 123, 117)
    x = preprocess_image(np.full((10, 30, 3), 7, np.uint8), size=24, pad=True)  # (3, 24, 24)
    mean, std = torch.tensor(CLIP_MEAN)[:, None], torch.tensor(CLIP_STD)[:, None]
    pad_px = (torch.tensor([122.0, 116.0, 104.0])[:, None] / 255 - mean) / std
    torch.testing.assert_close(x[:, 0, :], pad_px.expand(3, 24))  # top rows are background
    torch.testing.assert_close(x[:, 12, 12:13], (7 / 255 - mean) / std)  # image in the middle (bicubic of a constant)
    x = preprocess_image(np.full((10, 30, 3), 7, np.uint8), size=24, pad=False)
    torch.testing.assert_close(x, ((7 / 255 - mean) / std)[:, :, None].expand(3, 24, 24))


def test_input_types_agree_and_batch(tmp_path):
    img = make_image("RGB", 40, 25)
    path = tmp_path / "a.png"
    img.save(path)
    a = preprocess_image(img, size=32)
    assert torch.equal(a, preprocess_image(np.asarray(img), size=32))
    assert torch.equal(a, preprocess_image(str(path), size=32))
    assert torch.equal(a, preprocess_image(path, size=32))
    gray = np.asarray(img.convert("L"))
    assert torch.equal(preprocess_image(gray, size=32), preprocess_image(gray[:, :, None], size=32))
    batch = preprocess_images([img, path, make_image("L", 25, 40)], size=32)
    assert batch.shape == (3, 3, 32, 32) and torch.equal(batch[0], a)


def test_mode_conversions():
    rgb = make_image("RGB", 6, 5)
    for mode in ["L", "1", "P", "CMYK", "YCbCr", "LA", "PA", "RGBA"]:
        img = rgb.convert(mode)
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (6, 5)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img.convert("RGB")))
    # alpha is dropped, not composited on white: a fully transparent pixel keeps its colour
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[10, 20, 30]] * 2]
    # palette with a transparent index keeps the palette colour
    p = Image.new("P", (2, 1), 3)
    p.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    p.info["transparency"] = 3
    assert np.asarray(to_rgb(p)).tolist() == [[[200, 100, 50]] * 2]
    assert np.asarray(to_rgb(Image.new("1", (1, 1), 1))).tolist() == [[[255, 255, 255]]]


def test_high_bit_depth_grayscale_scaled_to_8_bit():
    v16 = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    want = [0, 1, 128, 255]
    for img in [Image.fromarray(v16), Image.fromarray(v16.astype(np.int32)), Image.fromarray(v16.astype(np.float32))]:
        assert img.mode in ("I;16", "I", "F")
        assert np.asarray(to_rgb(img))[0, :, 0].tolist() == want, img.mode
    big_endian = Image.frombytes("I;16B", (4, 1), v16.astype(">u2").tobytes())
    assert np.asarray(to_rgb(big_endian))[0, :, 1].tolist() == want
    # 32-bit data already in 0..255 and float data in [0, 1] keep their meaning
    assert np.asarray(to_rgb(Image.fromarray(np.array([[0, 5, 255]], np.int32))))[0, :, 2].tolist() == [0, 5, 255]
    assert np.asarray(to_rgb(Image.fromarray(np.array([[0, 0.5, 1]], np.float32))))[0, :, 0].tolist() == [0, 128, 255]
    # a 16-bit PNG round trip (PIL opens it as I;16)
    buf = io.BytesIO()
    Image.fromarray(v16).save(buf, "PNG")
    assert np.asarray(to_rgb(Image.open(buf)))[0, :, 0].tolist() == want


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = load_image(path)
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [255, 0, 0]


def _png_jpeg_bytes():
    img = make_image("RGB", 64, 48)
    out = {}
    for fmt in ["PNG", "JPEG"]:
        buf = io.BytesIO()
        img.save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_files_raise(tmp_path, fmt, keep):
    data = _png_jpeg_bytes()[fmt]
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="cut"):
        load_image(path)
    with pytest.raises(ValueError, match="cut"):
        preprocess_image(path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty .0 bytes.*empty.png"):
        load_image(tmp_path / "empty.png")
    for name, data in [("empty.png", b""), ("text.jpg", b"this is not an image"),
                       ("zero.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(8) + b"\x08\x02\x00\x00\x00")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            load_image(tmp_path / name)
    good = tmp_path / "good.png"
    make_image("RGB", 5, 3).save(good)
    img = load_image(good)
    assert img.size == (5, 3) and img.mode == "RGB"


def test_bad_inputs():
    with pytest.raises(ValueError, match="zero size"):
        preprocess_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="zero size"):
        preprocess_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        preprocess_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(4, 4, 2\)"):
        preprocess_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="int"):
        preprocess_image(3)
    with pytest.raises(ValueError, match="empty"):
        preprocess_images([])
