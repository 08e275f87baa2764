"""The synthetic dataset: determinism, LLaVA's official JSON formats, answers that match the drawn scene,
held-out images, the tokenizer's special ids, and the scoring helpers."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from minillava import synthetic as syn
from minillava.templates import VICUNA_SYSTEM

N_TRAIN, N_TEST, SIZE, SEED = 60, 15, 48, 3
SUFFIX = "\nAnswer the question using a single word or phrase."
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 205, 40), "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "star")
ROW = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}
COL = {"left": "on the left", "center": "in the center", "right": "on the right"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    paths = syn.write_dataset(root, n_train=N_TRAIN, n_test=N_TEST, seed=SEED, image_size=SIZE)
    loaded = {k: json.load(open(paths[k], encoding="utf-8")) for k in ("pretrain", "instruct", "test", "scenes")}
    return root, paths, loaded


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_same_seed_same_bytes_other_seed_differs(data, tmp_path):
    root, _, _ = data
    syn.write_dataset(str(tmp_path / "again"), n_train=N_TRAIN, n_test=N_TEST, seed=SEED, image_size=SIZE)
    a, b = _files(root), _files(str(tmp_path / "again"))
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    syn.write_dataset(str(tmp_path / "other"), n_train=N_TRAIN, n_test=N_TEST, seed=SEED + 1, image_size=SIZE)
    c = _files(str(tmp_path / "other"))
    assert c["pretrain.json"] != a["pretrain.json"]
    assert c["images/train_000000.png"] != a["images/train_000000.png"]


def _check_conversations(rec):
    conv = rec["conversations"]
    assert isinstance(rec["id"], str) and len(conv) >= 2 and len(conv) % 2 == 0, rec["id"]
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2), rec["id"]
    assert all(set(t) == {"from", "value"} and t["value"].strip() for t in conv), rec["id"]
    n_image = [t["value"].count("<image>") for t in conv]
    if "image" in rec:
        assert n_image == [1] + [0] * (len(conv) - 1), rec["id"]
        first = conv[0]["value"]
        assert first.startswith("<image>\n") or first.endswith("\n<image>"), first
    else:
        assert sum(n_image) == 0, rec["id"]


def test_official_format_and_images(data):
    root, paths, d = data
    assert paths["image_folder"] == root
    ids = [r["id"] for r in d["pretrain"] + d["instruct"]]
    assert len(set(r["id"] for r in d["instruct"])) == len(d["instruct"])
    assert len(d["pretrain"]) == N_TRAIN and len(ids) > 2 * N_TRAIN
    for rec in d["pretrain"] + d["instruct"]:
        assert set(rec) <= {"id", "image", "conversations"} and {"id", "conversations"} <= set(rec)
        _check_conversations(rec)
    for rec in d["pretrain"]:
        assert len(rec["conversations"]) == 2
    firsts = [r["conversations"][0]["value"] for r in d["instruct"] if "image" in r]
    assert any(f.startswith("<image>\n") for f in firsts) and any(f.endswith("\n<image>") for f in firsts)
    assert any("image" not in r for r in d["instruct"])  # a text-only record
    images = {r["image"] for r in d["pretrain"] + d["instruct"] + d["test"] if "image" in r}
    assert images == set(d["scenes"]) and len(images) == N_TRAIN + N_TEST
    for rel in images:
        with Image.open(os.path.join(root, rel)) as im:
            im.load()
            assert im.mode == "RGB" and im.size == (SIZE, SIZE), rel


def test_instruct_has_all_kinds_and_short_answers(data):
    _, _, d = data
    image_recs = [r for r in d["instruct"] if "image" in r]
    replies = [(r["conversations"][i]["value"], r["conversations"][i + 1]["value"])
               for r in image_recs for i in range(0, len(r["conversations"]), 2)]
    short = [(q, a) for q, a in replies if q.replace("<image>", "").strip().endswith(SUFFIX.strip())]
    assert len(short) > len(replies) // 4
    assert all(len(a.split()) <= 2 and a == a.lower() and a.isascii() and "." not in a for _, a in short), short[:3]
    long = [a for q, a in replies if (q, a) not in short]
    assert any(a.startswith("The image shows") and len(a.split()) > 15 for a in long)  # detailed description
    assert any("because" in a for a in long)                                         # complex reasoning
    for r in image_recs:  # no question is asked twice in one conversation
        qs = [t["value"].replace("<image>", "").strip() for t in r["conversations"][::2]]
        assert len(qs) == len(set(qs)), r["id"]


def test_scenes_are_valid_and_drawn_where_recorded(data):
    root, _, d = data
    for rel, scene in d["scenes"].items():
        objs = scene["objects"]
        assert 1 <= len(objs) <= 3
        assert len({(o["shape"], o["color"], o["size"], o["row"]) for o in objs}) == 1  # a row of identical shapes
        assert len({o["col"] for o in objs}) == len(objs)
        pix = np.asarray(Image.open(os.path.join(root, rel)), dtype=np.float32)
        tol = 5 * scene["noise"] + 3  # 5 sigma of the pixel noise, plus rounding
        for o in objs:
            assert o["radius"] <= o["x"] <= SIZE - o["radius"] and o["radius"] <= o["y"] <= SIZE - o["radius"]
            centre = pix[int(o["y"]), int(o["x"])]  # (3,) RGB at the shape's centre
            assert np.abs(centre - PALETTE[o["color"]]).max() <= tol, (rel, o)
        # the image corners are never covered (shapes stay inside their cells' interiors)
        corners = pix[[0, 0, -1, -1], [0, -1, 0, -1]]  # (4, 3)
        bg = {"white": (245, 245, 245), "gray": (200, 200, 200), "beige": (235, 222, 200)}[scene["background"]]
        assert np.abs(corners - bg).max() <= tol, rel


def test_captions_describe_the_row(data):
    _, _, d = data
    for rec in d["pretrain"]:
        cap, objs = rec["conversations"][1]["value"], d["scenes"][rec["image"]]["objects"]
        o, n = objs[0], len(objs)
        noun = f"{o['size']} {o['color']} {o['shape']}" + ("s" if n > 1 else "")
        assert cap.startswith(f"{['a', 'two', 'three'][n - 1]} {noun} {ROW[o['row']]}, "), cap
        assert all(COL[p["col"]] in cap for p in objs) or (n == 3 and cap.endswith("across the whole row")), cap


def test_no_turn_gives_away_a_later_answer(data):
    """A colour or shape asked about in a conversation is never named in an earlier turn: the model must look."""
    _, _, d = data
    checked = 0
    for rec in d["instruct"]:
        conv = rec["conversations"]
        for k in range(1, len(conv), 2):
            answer = conv[k]["value"].lower()
            named = [w for w in list(PALETTE) + list(SHAPES) if w in answer]
            earlier = " ".join(t["value"].lower() for t in conv[:k - 1])
            for w in named:
                assert w not in earlier, (rec["id"], w, conv[:k + 1])
            checked += bool(named) and k > 1
    assert checked > 20  # later turns that do name a colour or shape exist


def test_test_answers_match_scene(data):
    _, _, d = data
    assert len(d["test"]) == 4 * N_TEST
    assert sorted({r["kind"] for r in d["test"]}) == ["color", "count", "position", "shape"]
    for r in d["test"]:
        assert set(r) == {"id", "image", "question", "answer", "kind"}
        assert r["question"].endswith(SUFFIX) and "<image>" not in r["question"]
        assert len(r["answer"].split()) == 1, r
        objs = d["scenes"][r["image"]]["objects"]
        want = {"count": str(len(objs)), "color": objs[0]["color"], "shape": objs[0]["shape"],
                "position": objs[0]["row"]}[r["kind"]]
        assert r["answer"] == want, r
        for w in list(PALETTE) + list(SHAPES):  # the question does not name the answer
            assert w not in r["question"].lower(), r


def test_test_images_unseen_in_training(data):
    root, _, d = data
    train = {r["image"] for r in d["pretrain"] + d["instruct"] if "image" in r}
    test = {r["image"] for r in d["test"]}
    assert train.isdisjoint(test)
    digest = lambda rel: hashlib.sha256(open(os.path.join(root, rel), "rb").read()).hexdigest()
    assert {digest(p) for p in train}.isdisjoint({digest(p) for p in test})


def test_tokenizer_special_ids_round_trip_and_determinism(data, tmp_path):
    import sentencepiece as spm

    _, paths, d = data
    assert "<image>" not in open(paths["corpus"], encoding="utf-8").read()
    model = syn.train_tokenizer(paths["corpus"], str(tmp_path / "a"), vocab_size=512)
    again = syn.train_tokenizer(paths["corpus"], str(tmp_path / "b"), vocab_size=512)
    assert open(model, "rb").read() == open(again, "rb").read()
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.vocab_size() == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    cap, q = d["pretrain"][0]["conversations"][1]["value"], d["test"][0]["question"]
    for text in (cap, q, VICUNA_SYSTEM + " USER: hi ASSISTANT:"):
        ids = sp.encode(text)
        assert sp.decode(ids) == text and 0 not in ids
    assert "<0x0A>" in sp.encode(q, out_type=str)  # "\n" goes through byte fallback, as in LLaMA
    for word in ("the", "shapes", "image", "large"):  # frequent corpus words became single pieces
        assert sp.encode(word, out_type=str) == ["\u2581" + word]


def test_tokenizer_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        syn.train_tokenizer(str(tmp_path / "missing.txt"), str(tmp_path))
    bad = tmp_path / "bad.txt"
    bad.write_text("<image>\nDescribe the image.\n")
    with pytest.raises(ValueError, match="<image>"):
        syn.train_tokenizer(str(bad), str(tmp_path))


def test_chance_level_on_handmade_records():
    recs = [{"kind": "color", "answer": a} for a in ("red", "red", "blue")]
    recs += [{"kind": "count", "answer": a} for a in ("2", "3", "3")]
    recs += [{"kind": "position", "answer": "left"}]
    # always "red" for colour (2/3), always "3" for count (2/3), always "left" for position (1/1)
    assert syn.chance_level(recs) == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="no test records"):
        syn.chance_level([])
    with pytest.raises(ValueError, match="record 1"):
        syn.chance_level([{"kind": "color", "answer": "red"}, {"kind": "color"}])


def test_exact_match():
    assert syn.exact_match("Red.", "red")
    assert syn.exact_match("  two ", "2")
    assert syn.exact_match("The circle", "circle")
    assert not syn.exact_match("blue", "red")
    assert not syn.exact_match("top left", "left")
    assert not syn.exact_match("3", "2")
    assert not syn.exact_match("", "red")


def test_write_dataset_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        syn.write_dataset(str(tmp_path), n_train=0)
    with pytest.raises(ValueError, match="image_size"):
        syn.write_dataset(str(tmp_path), n_train=1, n_test=0, image_size=16)


def _truth(scene, text):
    """Whether the scene has what an "Is there ... in the image?" question names (a shape, a colour, or both)."""
    o = scene["objects"][0]
    words = text[len("Is there "):-len(" in the image?")].split()[1:]  # without the article
    return all(w in (o["color"], o["shape"], "shape") for w in words)


def test_benchmarks_in_pope_and_sqa_layouts_match_the_scenes(data):
    root, paths, d = data
    pope = [json.loads(line) for line in open(os.path.join(paths["pope"], "llava_pope_test.jsonl"))]
    assert len(pope) == N_TEST and [q["category"] for q in pope[:3]] == list(syn.POPE_CATEGORIES)
    for category in syn.POPE_CATEGORIES:  # labels in the questions' order, as eval_pope pairs them
        labels = [json.loads(line) for line in open(os.path.join(paths["pope"], "coco", f"coco_pope_{category}.json"))]
        mine = [q for q in pope if q["category"] == category]
        assert [lab["question_id"] for lab in labels] == [q["question_id"] for q in mine]
        for q, lab in zip(mine, labels):
            assert q["text"] == lab["text"] + SUFFIX and lab["label"] in ("yes", "no")
            assert (lab["label"] == "yes") == _truth(d["scenes"]["images/" + q["image"]], lab["text"]), lab
            assert os.path.isfile(os.path.join(paths["pope"], "val2014", q["image"]))
    assert len({_truth(d["scenes"]["images/" + q["image"]], q["text"][:-len(SUFFIX)]) for q in pope}) == 2  # both
    problems = json.load(open(os.path.join(paths["sqa"], "problems.json")))
    records = json.load(open(os.path.join(paths["sqa"], "llava_test_CQM-A.json")))
    assert json.load(open(os.path.join(paths["sqa"], "pid_splits.json"))) == {"test": list(problems)}
    for rec, (pid, p) in zip(records, problems.items()):
        scene = d["scenes"][f"images/test_{int(pid) - 1:06d}.png"]
        o, n = scene["objects"][0], len(scene["objects"])
        assert p["choices"][p["answer"]] in (o["color"], o["shape"], o["row"], str(n))
        assert rec["id"] == pid and rec["conversations"][0]["value"].endswith("\n<image>")
        letters = [line[0] for line in rec["conversations"][0]["value"].split("\n") if line[1:3] == ". "]
        assert letters == list("ABCD"[:len(p["choices"])]) and 3 <= len(p["choices"]) <= 4
        assert os.path.isfile(os.path.join(paths["sqa"], "images", "test", pid, "image.png"))
