"""Image preprocessing for LLaVA: file -> RGB -> pad to square -> resize -> center crop -> normalise.

This is the original LLaVA-1.5 pipeline (`image_aspect_ratio = "pad"`):
    img = Image.open(path).convert("RGB")
    img = expand2square(img, tuple(int(x * 255) for x in image_mean))          # (122, 116, 104)
    pixel_values = CLIPImageProcessor(...).preprocess(img)["pixel_values"][0]  # (3, 336, 336)
rewritten with PIL + numpy only. The CLIP processor step resizes the shortest edge to `size` with PIL
bicubic on uint8 pixels, center crops `size` x `size`, then computes (x / 255 - mean) / std in float32;
we do the same operations in the same order, so the result equals transformers' bit for bit.
LLaVA v1 used size 224 and no padding (pad=False).
"""
import os

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path, name=None) -> Image.Image:
    """Open and fully decode an image file (first frame of an animated GIF/WebP); `path` may also be an open binary
    file (a download, a request's bytes), then called `name` in errors.

    Decoding happens here, so a truncated or corrupt file fails now, with its path, not later in a batch.
    """
    if hasattr(path, "read"):
        source, path = path, name or "(in memory)"
    else:
        source = path = _image_file(path)
    try:
        with Image.open(source) as f:  # a multi-frame file starts at frame 0
            f.load()
            img = f.copy()  # detached from the file: multi-frame files would keep it open
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError... depending on the plugin
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image {path} has zero size {img.size}")
    return img


def _image_file(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"image path is a directory, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"image file is empty (0 bytes): {path}")
    return path


def image_size(path) -> tuple[int, int]:
    """(height, width) of an image file, from its header (nothing decoded: an AnyRes image's positions depend on
    it, and datasets are checked before training); errors as load_image's."""
    path = _image_file(path)
    try:
        with Image.open(path) as f:
            h, w = f.height, f.width
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... depending on the plugin
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    if h == 0 or w == 0:
        raise ValueError(f"image {path} has zero size {(w, h)}")
    return h, w


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way the original LLaVA did: `img.convert("RGB")`.

    Alpha (RGBA, LA, PA, P with transparency) is dropped, not composited on white: that is what LLaVA
    trained on (transformers >= 5 composites on white, an intentional difference). 16/32-bit integer and
    float grayscale would be clipped at 255 by PIL, so they are scaled to 8 bit first: I;16 by 1/257
    (65535 -> 255), I and F likewise when their values exceed 255, F in [0, 1] by 255.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)  # (H, W)
        if img.mode.startswith("I;16") or a.max() > 255:
            a = a / 257
        elif img.mode == "F" and a.max() <= 1:
            a = a * 255
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # mode L
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert image mode {img.mode!r} to RGB: {e}") from e


def expand_to_square(img: Image.Image, background: tuple) -> Image.Image:
    """LLaVA's expand2square: paste the image centered on a max(w, h)-sided canvas of `background`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shortest edge is `size`; the long edge is truncated, not rounded,
    as in transformers' get_resize_output_image_size: int(size * long / short)."""
    w, h = img.size
    new_long = int(size * max(w, h) / min(w, h))
    return img.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop size x size at transformers' offsets top = (h - size) // 2, left = (w - size) // 2.

    When the image is smaller than the crop, PIL fills the outside with zeros, which is exactly
    transformers' zero-pad-then-crop. (After resize_shortest_edge to the same size this never happens.)
    """
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _as_pil(image) -> Image.Image:
    """A path, a PIL image or a (H, W[, C]) uint8 numpy array (C in 1, 3, 4) as a PIL image."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
            raise ValueError(f"numpy image must be uint8 (H, W), (H, W, 1|3|4); got {image.dtype} {image.shape}")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")


def preprocess_image(image, size=336, pad=True, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Path / PIL image / HWC uint8 array -> normalised float32 tensor (3, size, size) for the CLIP tower."""
    img = _as_pil(image)
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image has zero size {img.size}")
    img = to_rgb(img)
    if pad:
        img = expand_to_square(img, tuple(int(x * 255) for x in mean))  # truncation: (122, 116, 104)
    return normalise(center_crop(resize_shortest_edge(img, size), size), mean, std)


def normalise(img: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """RGB PIL image (H, W) -> (3, H, W) float32: transformers rescales in float64, casts to float32, then
    normalises in float32."""
    x = (np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)


def model_pixels(image, config) -> tuple[torch.Tensor, tuple[int, int]]:
    """An image (as for preprocess_image) as `config`'s model takes it -> (pixels (n, 3, S, S), its size (h, w)).

    image_aspect_ratio "pad" / "square": one tile (n = 1); "anyres" (LLaVA-1.6): the base image and its grid of
    tiles (minillava/anyres.py). The size (before any resizing) says how many tiles and LLM positions it takes."""
    img = _as_pil(image)
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image has zero size {img.size}")
    S = config.vision.image_size
    if config.image_aspect_ratio != "anyres":
        return preprocess_image(img, S, pad=config.image_aspect_ratio == "pad")[None], (img.height, img.width)
    from minillava.anyres import anyres_pixels
    return anyres_pixels(to_rgb(img), S, config.image_grid_pinpoints, normalise), (img.height, img.width)


def preprocess_images(images, size=336, pad=True, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """A list of images (each as for preprocess_image) -> float32 tensor (N, 3, size, size)."""
    if len(images) == 0:
        raise ValueError("preprocess_images got an empty list")
    return torch.stack([preprocess_image(im, size, pad, mean, std) for im in images])  # (N, 3, S, S)
