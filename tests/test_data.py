"""Training data: every bad record is found and named, truncation counts image positions, right-padded
batches, and the training order (grouped by modality and length, identical for any number of ranks)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from minillava import data
from minillava.config import get_preset
from minillava.image import preprocess_image
from minillava.templates import IGNORE_INDEX, tokenize_conversation
from minillava.tokenizer import Tokenizer
from tests.spm_util import train_tiny_spm

IMG, NP, SIZE = -200, 16, 32
MODEL = get_preset("tiny").replace(image_token_id=IMG)  # 32 px, 16 positions per image, padded to square


def turns(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 24)), ("b.jpg", (32, 32))):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / name)
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).convert("P").save(root / "palette.png")
    (root / "corrupt.jpg").write_bytes(open(root / "b.jpg", "rb").read()[:60])  # truncated JPEG
    (root / "text.jpg").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def cfg(folder, tmp_path_factory):
    tok = Tokenizer(train_tiny_spm(tmp_path_factory.mktemp("spm")))
    return data.DataConfig(image_folder=folder, template="vicuna_v1", tokenizer=tok, model=MODEL, max_length=512)


GOOD = [
    {"id": "before", "image": "a.png", "conversations": turns("<image>\nWhat is it?", "A dog.")},
    {"id": "after", "image": "b.jpg", "conversations": turns("What is it?\n<image>", "A cat.", "And?", "Red.")},
    {"id": "text", "conversations": turns("Hello there", "Hi, how can I help?")},
    {"id": 7, "image": "palette.png", "conversations": turns("<image> Colour?", "Grey.")},
]
BAD = [  # (record, words the problem must contain)
    ("not a record", "expected a JSON object"),
    ({"id": "noconv", "image": "a.png"}, "'conversations' must be a non-empty list"),
    ({"id": "emptyconv", "conversations": []}, "'conversations' must be a non-empty list"),
    ({"id": ["x"], "conversations": turns("a", "b")}, "'id' must be a string"),
    ({"id": "two-images", "image": ["a.png", "b.jpg"], "conversations": turns("<image>\nq", "a")},
     "one image per record"),
    ({"id": "missing", "image": "nope.jpg", "conversations": turns("<image>\nq", "a")}, "not found"),
    ({"id": "corrupt", "image": "corrupt.jpg", "conversations": turns("<image>\nq", "a")}, "cannot decode"),
    ({"id": "textfile", "image": "text.jpg", "conversations": turns("<image>\nq", "a")}, "cannot decode"),
    ({"id": "no-placeholder", "image": "a.png", "conversations": turns("q", "a")}, "0 <image> placeholder"),
    ({"id": "placeholder-no-image", "conversations": turns("<image>\nq", "a")}, "1 <image> placeholder"),
    ({"id": "two-placeholders", "image": "a.png", "conversations": turns("<image>\nq", "a", "<image>", "b")},
     "2 <image> placeholder"),
    ({"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]},
     "roles must alternate"),
    ({"id": "two-humans", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
     "roles must alternate"),
    ({"id": "ends-with-human", "conversations": turns("q", "a", "q2")}, "must end with a gpt reply"),
    ({"id": "bad-role", "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "a"}]},
     "unknown role"),
    ({"id": "no-value", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "expected keys"),
    ({"id": "int-value", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
     "must be a str"),
    ({"id": "empty-reply", "conversations": turns("q", "")}, "empty assistant reply"),
]


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_record_is_found_and_named(cfg, workers):
    records = GOOD[:2] + [r for r, _ in BAD] + GOOD[2:]
    checked = data.check_records(records, cfg, workers=workers)
    assert [c.index for c in checked] == list(range(len(records)))
    problems = {c.index: c.problem for c in checked if c.problem}
    assert sorted(problems) == list(range(2, 2 + len(BAD)))
    for (rec, words), c in zip(BAD, checked[2:]):
        assert words in c.problem, (rec, c.problem)
        assert c.id == data.record_name(rec, c.index)
    assert checked[3].id == "#4 (id noconv)" and checked[2].id == "#3"  # counted from 1
    good = [c for c in checked if not c.problem]
    assert [c.has_image for c in good] == [True, True, False, True] and all(c.excluded is None for c in good)
    assert data.summarize(checked)["bad"] == len(BAD)


def test_lengths_count_image_positions_and_supervision(cfg):
    checked = data.check_records(GOOD, cfg)
    for rec, c in zip(GOOD, checked):
        ids, labels = tokenize_conversation(rec["conversations"], "vicuna_v1", cfg.tokenizer, IMG)
        n_img = 1 if "image" in rec else 0
        assert c.length == len(ids) + n_img * (NP - 1)
        assert c.n_supervised == sum(y != IGNORE_INDEX for y in labels) > 0


def test_records_the_original_would_mask_are_counted(cfg):
    """With legacy=false on a vocabulary where "USER" after "</s>" is not one piece shorter than "▁USER", the
    original train.py masks every label of a multi-turn record; such records are kept (with their real spans)
    and counted for the data report."""
    new = dataclasses.replace(cfg, tokenizer=Tokenizer(cfg.tokenizer.path, legacy=False))
    for c, checked in ((cfg, [False] * len(GOOD)), (new, [False, True, False, False])):
        got = data.check_records(GOOD, c)
        assert [x.original_masks_all for x in got] == checked and all(x.n_supervised > 0 for x in got)
        assert data.summarize(got)["original_masks_all"] == sum(checked)


def test_truncation_counts_np_and_reports_samples_left_without_supervision(cfg):
    rec = {"id": "long", "image": "a.png", "conversations": turns("<image>\n" + "word " * 40, "the answer " * 10)}
    ids, labels = tokenize_conversation(rec["conversations"], "vicuna_v1", cfg.tokenizer, IMG)
    first_sup = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
    # Cut inside the reply: the sample keeps max_length - (Np - 1) ids, i.e. exactly max_length positions.
    max_length = first_sup + 3 + (NP - 1)
    c = dataclass_replace(cfg, max_length=max_length)
    assert data.image_path(rec, c) == os.path.join(cfg.image_folder, "a.png")
    got_ids, got_labels, excluded = data.encode(rec, c, Image.open(data.image_path(rec, c)).size[::-1])
    assert excluded is None
    assert got_ids == ids[:first_sup + 3] and got_labels == labels[:first_sup + 3]
    [checked] = data.check_records([rec], c)
    assert checked.length == max_length and checked.n_supervised == 3
    # Cut right before the reply: nothing left to learn from -> excluded (reported), not trained as loss 0.
    [checked] = data.check_records([rec], dataclass_replace(cfg, max_length=first_sup + NP - 1))
    assert checked.problem is None and "no supervised token left" in checked.excluded
    # Cut before the image: the image no longer fits.
    [checked] = data.check_records([rec], dataclass_replace(cfg, max_length=NP))
    assert "image does not fit" in checked.excluded
    with pytest.raises(RuntimeError, match="should have been excluded"):
        data.LlavaDataset([rec], dataclass_replace(cfg, max_length=NP))[0]


def dataclass_replace(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


def test_dataset_items_and_right_padded_collate(cfg, monkeypatch):
    ds = data.LlavaDataset(GOOD, cfg)
    opened = []  # each sample opens its image file once (the size it needs comes from the decoded image)
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    items = [ds[i] for i in range(len(GOOD))]
    assert len(opened) == sum("image" in rec for rec in GOOD) > 0
    opened.clear()
    data.check_records(GOOD, cfg)
    assert len(opened) == sum("image" in rec for rec in GOOD)
    monkeypatch.undo()
    for rec, item in zip(GOOD, items):
        ids, labels = tokenize_conversation(rec["conversations"], "vicuna_v1", cfg.tokenizer, IMG)
        assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
        if "image" in rec:
            path = os.path.join(cfg.image_folder, rec["image"])
            assert torch.equal(item["pixel_values"], preprocess_image(path, SIZE, pad=True)[None])
            assert item["image_size"] == Image.open(path).size[::-1]
        else:
            assert item["pixel_values"] is None
    batch = data.collate([items[2], items[0], items[1]], pad_id=0)
    lens = [len(items[i]["input_ids"]) for i in (2, 0, 1)]
    T = max(lens)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    for b, (i, n) in enumerate(zip((2, 0, 1), lens)):
        assert batch["input_ids"][b, :n].tolist() == items[i]["input_ids"].tolist()
        assert (batch["input_ids"][b, n:] == 0).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [True] * n + [False] * (T - n)
    # images in sample order: sample 0 (text-only) has none, then records 0 and 1
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[1]["pixel_values"]]))
    assert batch["image_sizes"].tolist() == [list(items[0]["image_size"]), list(items[1]["image_size"])]
    assert data.collate([items[2]])["pixel_values"] is None


def fake_samples(n_img, n_txt, seed=0):
    rng = np.random.default_rng(seed)
    out = [data.Checked(i, f"#{i}", length=int(rng.integers(20, 200)), n_supervised=1, has_image=i < n_img)
           for i in range(n_img + n_txt)]
    return [out[i] for i in rng.permutation(len(out))]  # not in index order: the order must not matter


@pytest.mark.parametrize("group", [True, False])
def test_global_batches(group):
    samples = fake_samples(45, 22)
    G = 8
    length = {s.index: s.length for s in samples}
    image = {s.index: s.has_image for s in samples}
    epoch0 = data.global_batches(samples, G, seed=1, epoch=0, group_by_modality_length=group)
    assert epoch0 == data.global_batches(list(reversed(samples)), G, seed=1, epoch=0, group_by_modality_length=group)
    assert epoch0 != data.global_batches(samples, G, seed=1, epoch=1, group_by_modality_length=group)
    assert epoch0 != data.global_batches(samples, G, seed=2, epoch=0, group_by_modality_length=group)
    assert len(epoch0) == data.steps_per_epoch(samples, G, group) == (8 if group else 67 // G)
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat)) and all(len(b) == G for b in epoch0)
    for b in epoch0:
        assert [length[i] for i in b] == sorted((length[i] for i in b), reverse=True)
    if group:  # all but the last batch (the two remainders together) hold one modality
        mixed = [k for k, b in enumerate(epoch0) if len({image[i] for i in b}) > 1]
        assert mixed in ([], [len(epoch0) - 1])
        assert sum(len({image[i] for i in b}) == 1 for b in epoch0) >= 45 // G + 22 // G


def test_micro_batches_are_the_same_chunks_for_any_world_size():
    batch = list(range(12))
    one = data.micro_batches(batch, world_size=1, rank=0, micro_batch=3)
    assert one == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    two = [data.micro_batches(batch, 2, r, 3) for r in range(2)]
    assert two == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9, 10, 11]]]


def test_read_records_errors(tmp_path):
    p = tmp_path / "d.json"
    with pytest.raises(FileNotFoundError, match="data file not found"):
        data.read_records(p)
    p.write_text("[{]")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.read_records(p)
    p.write_text(json.dumps({"id": 1}))
    with pytest.raises(ValueError, match="expected a JSON list of records, got a JSON dict"):
        data.read_records(p)
    p.write_text("[]")
    with pytest.raises(ValueError, match="empty"):
        data.read_records(p)
    p.write_text(json.dumps(GOOD))
    assert data.read_records(p) == json.loads(json.dumps(GOOD))
