"""LLaVA's official training data: read the JSON list, check every record, batch the good ones.

Both stages read one JSON list (the README's training data) plus an image folder:
    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]},
     {"id": "i6IyJda_0", "conversations": [...]},        # text-only (no "image"): ShareGPT in the 665K mix
     ...]
Real downloads have missing, truncated and mislabeled images and a few malformed conversations, so nothing
is trained on before `check_records` has looked at every record (JSON shape, roles alternate, `<image>`
count matches the image, the image exists and decodes, the conversation tokenizes). The caller lists the
problems by record and refuses to start, or skips exactly those records and says which.

Truncation: a sample is cut to `max_length` positions *inside the LLM*, where each image takes Np positions
(576 for ViT-L/14-336), so its text keeps `max_length - n_img * (Np - 1)` ids. A sample left with no
supervised label (or whose image would be cut) is excluded and reported, never trained on as a loss of 0.

Batches: `collate` pads on the right with the pad id (LLaMA's <unk> = 0) and labels -100.
`global_batches` is the order of training: shuffled global batches, grouped by modality and length like the
original's `group_by_modality_length` (each global batch all-image or all-text, members of similar length).
"""
import json
import math
import multiprocessing
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from minillava.config import LlavaConfig
from minillava.image import load_image, model_pixels, to_rgb
from minillava.templates import IGNORE_INDEX, original_masks_all, tokenize_conversation
from minillava.tokenizer import IMAGE_PLACEHOLDER, Tokenizer


@dataclass(frozen=True)
class DataConfig:
    """How records become samples; everything `encode` needs besides the record."""
    image_folder: str
    template: str  # "plain" (stage 1), "vicuna_v1" (stage 2)
    tokenizer: Tokenizer
    model: LlavaConfig  # its image token id, how it prepares images and how many positions each takes
    max_length: int  # LLM positions per sample, images included


@dataclass(frozen=True)
class Checked:
    """What `check_records` learned about one record."""
    index: int  # position in the JSON list, from 0
    id: str  # record_name: "#13 (id 000000033471)", counted from 1
    problem: str | None = None  # bad data: the record cannot be used as it is
    excluded: str | None = None  # good data with nothing to train on after truncation
    length: int = 0  # LLM positions after truncation (an image counts its positions: Np, AnyRes more)
    n_supervised: int = 0  # positions with a label after truncation
    has_image: bool = False
    original_masks_all: bool = False  # the original train.py would mask every label (templates.original_masks_all)
    image_not_found: bool = False  # the record names an image file that is not there


def read_records(path) -> list:
    """The JSON list of records in `path` (any element may be malformed; `check_records` says which)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except json.JSONDecodeError as e:
        hint = (": training data is one JSON list of records ([{...}, {...}]), as LLaVA's; this looks like JSON "
                "Lines (one record per line)") if e.msg == "Extra data" else ""
        raise ValueError(f"{path}: not valid JSON ({e}){hint}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a JSON {type(records).__name__}")
    if not records:
        raise ValueError(f"{path}: the list of records is empty")
    return records


def record_name(rec, index: int) -> str:
    """'#13 (id 000000033471)': the position in the list counted from 1 (as people and editors count; `index` is
    Python's, from 0), and the id when the record has a usable one."""
    rid = rec.get("id") if isinstance(rec, dict) else None
    return f"#{index + 1}" + (f" (id {rid})" if isinstance(rid, (str, int)) and not isinstance(rid, bool) else "")


def _shape_problem(rec) -> str | None:
    """The JSON shape of one record, before anything is tokenized or opened."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if "id" in rec and (not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool)):
        return f"'id' must be a string, got {type(rec['id']).__name__}"
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "'conversations' must be a non-empty list of turns"
    if "image" in rec and (not isinstance(rec["image"], str) or not rec["image"]):
        return f"'image' must be a relative path string (one image per record), got {rec['image']!r}"
    n_placeholders = sum(t.get("value", "").count(IMAGE_PLACEHOLDER) for t in conv
                         if isinstance(t, dict) and isinstance(t.get("value"), str))
    expected = 1 if "image" in rec else 0
    if n_placeholders != expected:
        return (f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the conversation but "
                f"{'an image' if expected else 'no image'}: expected {expected}")
    return None


def image_path(rec, cfg: DataConfig) -> str | None:
    """The file of a well-formed record's image, or None for a text-only record."""
    return os.path.join(cfg.image_folder, rec["image"]) if "image" in rec else None


def encode(rec, cfg: DataConfig, size=None):
    """A well-formed record and its image's size (h, w) (None without one) -> (input_ids, labels, excluded reason
    or None). The size matters with AnyRes, where an image's LLM positions depend on it.

    Raises ValueError for a conversation the template cannot take (roles not alternating, ...). The ids are
    truncated so that the sample spans at most cfg.max_length LLM positions, images included."""
    image_id = cfg.model.image_token_id
    ids, labels = tokenize_conversation(rec["conversations"], cfg.template, cfg.tokenizer, image_id)
    n_img = ids.count(image_id)
    keep = cfg.max_length - (n_img * (cfg.model.image_positions(size) - 1) if n_img else 0)  # ids that fit
    excluded = None
    if len(ids) > keep:
        if image_id in ids[max(keep, 0):]:
            excluded = f"its image does not fit in max_length {cfg.max_length} ({len(ids)} ids + image)"
        ids, labels = ids[:max(keep, 0)], labels[:max(keep, 0)]
    if excluded is None and all(y == IGNORE_INDEX for y in labels):
        excluded = f"no supervised token left after truncation to max_length {cfg.max_length}"
    return ids, labels, excluded


def _load(rec, cfg: DataConfig):
    """A well-formed record's image, decoded (each sample opens its file once), and its size (h, w); or None, None."""
    path = image_path(rec, cfg)
    if path is None:
        return None, None
    img = load_image(path)
    return img, (img.height, img.width)


def check_record(rec, index: int, cfg: DataConfig) -> Checked:
    """Everything that could go wrong with one record, found now rather than in the middle of training."""
    rid = record_name(rec, index)
    problem = _shape_problem(rec)
    if problem:
        return Checked(index, rid, problem=problem)
    try:
        img, size = _load(rec, cfg)
        if img is not None:
            to_rgb(img)
        ids, labels, excluded = encode(rec, cfg, size)
    except (OSError, ValueError) as e:  # an unreadable image, the template's checks (roles alternate, ...)
        return Checked(index, rid, problem=str(e), image_not_found=isinstance(e, FileNotFoundError))
    masked = excluded is None and original_masks_all(rec["conversations"], cfg.template, cfg.tokenizer,
                                                     cfg.model.image_token_id, cfg.max_length)
    length = cfg.model.llm_length(ids, [size])
    return Checked(index, rid, excluded=excluded, length=length, n_supervised=sum(y != IGNORE_INDEX for y in labels),
                   has_image=img is not None, original_masks_all=masked)


_WORK = None  # (records, cfg) inherited by forked check workers


def _check_one(index: int) -> Checked:
    records, cfg = _WORK
    return check_record(records[index], index, cfg)


def check_records(records: list, cfg: DataConfig, indices=None, workers: int = 0) -> list[Checked]:
    """check_record for records[i], i in `indices` (default all), with `workers` forked processes.
    Fork before CUDA is initialised (train.py checks the data first)."""
    global _WORK
    indices = range(len(records)) if indices is None else indices
    if workers <= 0 or len(indices) < 2 * workers:
        return [check_record(records[i], i, cfg) for i in indices]
    _WORK = (records, cfg)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return pool.map(_check_one, indices, chunksize=max(1, min(256, len(indices) // (8 * workers))))
    finally:
        _WORK = None


class LlavaDataset(Dataset):
    """dataset[i] -> the sample of records[i] (index into the JSON list; train only checked indices)."""

    def __init__(self, records: list, cfg: DataConfig):
        self.records, self.cfg = records, cfg

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        img, size = _load(self.records[i], self.cfg)
        ids, labels, excluded = encode(self.records[i], self.cfg, size)
        if excluded:  # check_records keeps these out of the order; reaching one is a bug
            raise RuntimeError(f"record {record_name(self.records[i], i)} should have been excluded: {excluded}")
        pixels = None if img is None else model_pixels(img, self.cfg.model)[0]  # (n_tiles, 3, S, S)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels,
                "image_size": size}


def collate(samples: list[dict], pad_id: int = 0) -> dict:
    """Right-pad a list of samples into a batch: input_ids, labels (-100 on padding), attention_mask (B, T);
    pixel_values (n_tiles, 3, S, S) in sample order (one tile per image but with AnyRes) and image_sizes
    (n_images, 2) as (h, w), or both None for a text-only batch."""
    T = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), T), dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], True
    images = [s for s in samples if s["pixel_values"] is not None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.cat([s["pixel_values"] for s in images]) if images else None,  # (N_tiles, 3, S, S)
            "image_sizes": torch.tensor([s["image_size"] for s in images]) if images else None}  # (N, 2)


# --------------------------------------------------------------------------------------------- ordering
def _chunks(seq, n):
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def global_batches(samples: list[Checked], global_batch: int, seed: int, epoch: int,
                   group_by_modality_length: bool = True) -> list[list[int]]:
    """One epoch's training order: a list of global batches of `global_batch` record indices, each sorted
    longest first (so consecutive micro-batches pad little), a pure function of (seed, epoch).

    group_by_modality_length (the original's `get_modality_length_grouped_indices`): image and text-only
    samples are shuffled separately and cut into global batches, so a batch never mixes them; the full
    batches of both kinds are shuffled together; the two remainders form one last mixed batch. Otherwise one
    shuffle of everything. Whatever does not fill a last global batch is left out of this epoch (a
    different subset each epoch); `steps_per_epoch` counts the batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    samples = sorted(samples, key=lambda s: s.index)  # the order depends on the records, not on the list
    length = {s.index: s.length for s in samples}

    def shuffled(idx):
        return [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]

    if group_by_modality_length:
        full, rest = [], []
        for kind in (True, False):
            parts = _chunks(shuffled([s.index for s in samples if s.has_image == kind]), global_batch)
            if parts and len(parts[-1]) < global_batch:
                rest += parts.pop()
            full += parts
        batches = shuffled(full) + _chunks(rest, global_batch)
    else:
        batches = _chunks(shuffled([s.index for s in samples]), global_batch)
    batches = [b for b in batches if len(b) == global_batch]
    return [sorted(b, key=lambda i: (-length[i], i)) for b in batches]


def steps_per_epoch(samples: list[Checked], global_batch: int, group_by_modality_length: bool = True) -> int:
    """How many full global batches `global_batches` makes (the same for every epoch)."""
    if not group_by_modality_length:
        return len(samples) // global_batch
    n_img = sum(s.has_image for s in samples)
    n_txt = len(samples) - n_img
    return n_img // global_batch + n_txt // global_batch + (n_img % global_batch + n_txt % global_batch) // global_batch


def micro_batches(batch: list[int], world_size: int, rank: int, micro_batch: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: chunk k (of `micro_batch` indices) goes to rank
    k % world_size, so with one rank the chunks are the same as with many (same padding, same numbers)."""
    chunks = _chunks(batch, micro_batch)
    assert len(chunks) % world_size == 0, (len(batch), micro_batch, world_size)
    return chunks[rank::world_size]


def images_not_found(checked: list[Checked]) -> tuple[int, int]:
    """(records whose image file is not there, records that name an image), the counts a wrong --image-folder
    shows (minillava.cli.wrong_image_folder)."""
    missing = sum(c.image_not_found for c in checked)
    return missing, missing + sum(c.has_image for c in checked)


def summarize(checked: list[Checked]) -> dict:
    """Counts for the startup report."""
    good = [c for c in checked if c.problem is None and c.excluded is None]
    return {"records": len(checked), "usable": len(good), "bad": sum(c.problem is not None for c in checked),
            "excluded": sum(c.excluded is not None for c in checked),
            "original_masks_all": sum(c.original_masks_all for c in good),
            "with_image": sum(c.has_image for c in good), "text_only": sum(not c.has_image for c in good),
            "max_length": max((c.length for c in good), default=0),
            "mean_length": math.fsum(c.length for c in good) / max(1, len(good))}
