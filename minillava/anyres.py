"""AnyRes (LLaVA-1.6 / LLaVA-NeXT): an image of any aspect ratio as a grid of tower-sized tiles plus the whole.

Three steps, each below in one function:
1. `best_resolution`: of the checkpoint's `image_grid_pinpoints` (e.g. 336x672, 672x336, 672x672, 1008x336,
   336x1008), the one that keeps the most of the image's pixels after an aspect-preserving resize, the least
   wasted area on a tie, the first in list order on a full tie.
2. `anyres_pixels`: the image resized into that resolution keeping its aspect ratio (ceil), centred on black,
   cut into (rows, cols) tiles of S x S, after the whole image squashed to S x S (aspect not kept): 1 + rows*cols
   tower inputs, normalised as CLIP's.
3. `merge_features` (mm_patch_merge_type "spatial_unpad"): the tiles' p x p feature maps laid back as one
   (rows*p, cols*p) map, the rows or columns that came from padding removed (`unpadded_size`), the learned
   `image_newline` vector appended to each kept row; the base image's p*p features first, without a newline.
   So an image takes p*p + rows' * (cols' + 1) LLM positions (`num_positions`): it depends on the image's size.

Sizes are (height, width) everywhere here. The two checkpoint families differ in two details and each model gets
its own family's: the original code lists pinpoints as (width, height) (minillava.config swaps them on reading,
list order kept, so full ties still go to that family's first entry), and it truncates where transformers
rounds when unpadding (`unpad_rounding` "truncate" vs "round": at 336 px a 176x55 (w x h) image keeps 686 vs 784
grid positions, where 55 * 48 / 176 = 14.999999999999998 truncates to 14 rows).
"""
import math

import torch
from PIL import Image


def best_resolution(size, pinpoints) -> tuple[int, int]:
    """size (h, w), pinpoints [(h, w), ...] -> the pinpoint (h, w) an image of that size is resized into."""
    h, w = size
    best, best_kept, best_wasted = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        kept = min(int(w * scale) * int(h * scale), w * h)  # pixels the resized image keeps (never more than it has)
        wasted = ph * pw - kept
        if kept > best_kept or (kept == best_kept and wasted < best_wasted):
            best, best_kept, best_wasted = (ph, pw), kept, wasted
    return best


def grid_shape(size, pinpoints, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of size (h, w)."""
    ph, pw = best_resolution(size, pinpoints)
    return ph // tile, pw // tile


def unpadded_size(size, grid_hw, rounding: str) -> tuple[int, int]:
    """The (rows, cols) of a (H, W) feature map that hold the image of size (h, w) rather than its padding.

    The padding was added on one axis, (H - new) // 2 removed from each end, so an odd difference keeps one
    extra row (or column). rounding "round" (transformers: round(x, 7) absorbs float error) or "truncate" (the
    original); the arithmetic below is theirs, in their order, so that every float comes out the same."""
    h, w = size
    H, W = grid_hw
    if w / h > W / H:  # wider than the map: padding above and below
        new = h * (W / w)
        new = int(round(new, 7)) if rounding == "round" else int(new)
        return max(H - 2 * ((H - new) // 2), 0), W
    new = w * (H / h)
    new = int(round(new, 7)) if rounding == "round" else int(new)
    return H, max(W - 2 * ((W - new) // 2), 0)


def num_tiles(size, pinpoints, tile: int) -> int:
    """Tower inputs of one image: the base image and its rows x cols tiles."""
    rows, cols = grid_shape(size, pinpoints, tile)
    return 1 + rows * cols


def num_positions(size, pinpoints, tile: int, patch: int, rounding: str) -> int:
    """LLM positions of one image of size (h, w): p*p base features + rows' x (cols' + 1) (a newline per row)."""
    p = tile // patch
    rows, cols = grid_shape(size, pinpoints, tile)
    kept_h, kept_w = unpadded_size(size, (rows * p, cols * p), rounding)
    return p * p + kept_h * (kept_w + 1)


def anyres_pixels(img: Image.Image, tile: int, pinpoints, normalise) -> torch.Tensor:
    """An RGB PIL image -> (1 + rows*cols, 3, S, S): the base image, then the tiles in row-major order.
    normalise: a (S, S) PIL image -> (3, S, S) tensor (CLIP's rescale and normalisation)."""
    w, h = img.size
    ph, pw = best_resolution((h, w), pinpoints)
    if pw / w < ph / h:  # the width fills the target: the height shrinks (rounded up), and the other way round
        nw, nh = pw, min(math.ceil(h * (pw / w)), ph)
    else:
        nw, nh = min(math.ceil(w * (ph / h)), pw), ph
    canvas = Image.new("RGB", (pw, ph), (0, 0, 0))  # black: it normalises to -mean/std
    canvas.paste(img.resize((nw, nh), Image.Resampling.BICUBIC), ((pw - nw) // 2, (ph - nh) // 2))
    tiles = [img.resize((tile, tile), Image.Resampling.BICUBIC)]
    tiles += [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, ph, tile) for x in range(0, pw, tile)]
    return torch.stack([normalise(t) for t in tiles])  # (1 + rows*cols, 3, S, S)


def merge_features(feats, size, pinpoints, tile: int, rounding: str, newline) -> torch.Tensor:
    """spatial_unpad: one image's tile features (1 + rows*cols, p*p, C) -> its LLM embeddings (n, C),
    n = num_positions(size, ...). newline: the learned (C,) image_newline."""
    p = math.isqrt(feats.shape[1])
    rows, cols = grid_shape(size, pinpoints, tile)
    C = feats.shape[-1]
    base, grid = feats[0], feats[1:]  # (p*p, C), (rows*cols, p*p, C)
    grid = grid.view(rows, cols, p, p, C).permute(0, 2, 1, 3, 4).reshape(rows * p, cols * p, C)  # (H, W, C)
    kept_h, kept_w = unpadded_size(size, (rows * p, cols * p), rounding)
    top, left = (rows * p - kept_h) // 2, (cols * p - kept_w) // 2
    grid = grid[top:top + kept_h, left:left + kept_w]  # (H', W', C)
    grid = torch.cat([grid, newline.to(grid.dtype).expand(kept_h, 1, C)], dim=1)  # (H', W' + 1, C)
    return torch.cat([base, grid.reshape(-1, C)])  # (p*p + H' * (W' + 1), C)

