"""A synthetic visual-instruction dataset in LLaVA's own formats, for the CPU demo and the tests.

It is `minillava.synthetic`, a helper of demo.py at the level of the scripts (synthetic.py sits beside them at the
repository root; setup.py copies it into the installed package like them): it imports the library
(minillava.templates) and no script, and of the scripts only demo.py imports it.

Each image is a small scene (default 48x48) on a plain or lightly noisy background: a row of 1-3 identical
shapes. The canvas is a 3x3 grid; the shapes fill some of the cells of one row, one shape per cell:

    shape  circle | square | triangle | star               4
    colour red | green | blue | yellow | purple | orange   6
    size   small | large                                   2
    count  1 | 2 | 3                                       3
    row    top | middle | bottom                           3     (and which columns of the row are filled)

Every question is about the whole scene ("What color are the shapes?", "How many shapes are there?",
"Are the shapes at the top, in the middle, or at the bottom?"), so a model of a few M parameters on top of a
frozen *random* vision tower can learn to answer from the image in minutes of CPU training, and chance level
(about 1/4) is far below a trained model. With 48 px images and 16 px patches each grid cell is one patch.

`write_dataset(out_dir)` writes, with image paths relative to `out_dir` (it is LLaVA's `image_folder`):

    images/train_000000.png ...   training scenes      images/test_000000.png ...  held-out scenes
    pretrain.json   stage 1, one caption pair per image: "<image>\\nDescribe the image concisely." -> caption
    instruct.json   stage 2, one record per image, of four kinds (like LLaVA-Instruct + the 665K VQA mix):
                    conversation (several Q/A turns), detail (a paragraph), reasoning (an answer with its
                    reason), vqa (short-answer turns with the official suffix); plus a few text-only records
    test.json       held-out short-answer questions: {"id", "image", "question", "answer", "kind"},
                    one per kind ("color", "shape", "count", "position") per test image
    scenes.json     {image path: scene} with every object's attributes and pixel position (ground truth)
    corpus.txt      every training text, the vicuna_v1 system prompt and role words, for the tokenizer
    bench/pope/, bench/sqa/   the held-out images as POPE and ScienceQA benchmarks (`write_benchmarks`)

Everything is a pure function of `seed` (one numpy Generator per image, one per record's text), uses only
PIL + numpy, and never touches the network. `train_tokenizer` fits a LLaMA-like SentencePiece model on
corpus.txt; `chance_level` and `exact_match` score a model's answers on test.json.
"""
import json
import os
import re
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

from minillava.templates import VICUNA_SYSTEM

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 205, 40), "purple": (150, 60, 190), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (200, 200, 200), "beige": (235, 222, 200)}
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
RADIUS = {"small": 0.36, "large": 0.44}   # shape radius as a fraction of the grid cell's side
JITTER = 0.4                              # how far a shape may move from its cell's centre, as a fraction of the room
NOISE_STD = (0.0, 6.0)                    # plain or lightly noisy (per-pixel Gaussian, in 0..255 units)
SUPERSAMPLE = 4                           # draw at 4x and box-downsample: anti-aliased edges

ROLES = ("USER", "ASSISTANT")
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
TEST_KINDS = ("color", "shape", "count", "position")
POPE_CATEGORIES = ("adversarial", "popular", "random")  # POPE's three files; what each asks: `exists`

# A few of the brief-description instructions of LLaVA's 558K pretraining set.
PRETRAIN_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
)
DETAIL_INSTRUCTIONS = (
    "Describe the image in detail.",
    "Give a detailed description of the image.",
    "Explain the visual content of the image in great detail.",
    "What is in this picture? Describe it thoroughly.",
    "Can you describe the main features of this image?",
)
_NUM = ("no", "one", "two", "three", "four")
_ROW_PHRASE = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}
_COL_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}
_CORNERS = {"circle": "no corners", "square": "four corners", "triangle": "three corners",
            "star": "ten corners, five pointing out and five pointing in"}
_SPLIT_CODE = {"train": 0, "test": 1, "text": 2}


# ----------------------------------------------------------------------------------------------- scenes
def make_scene(rng: np.random.Generator, image_size: int = 48) -> dict:
    """Sample a scene: 1-3 shapes of one kind, colour and size, in distinct cells of one grid row.

    Positions are pixel centres in the final image: the cell centre plus a jitter small enough that the
    shape (radius r) stays inside its cell, so shapes never touch and the cell is the true position.
    """
    shape, color = SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))]
    size, row = SIZES[int(rng.integers(len(SIZES)))], int(rng.integers(len(ROWS)))
    cols = sorted(rng.choice(3, size=int(rng.integers(1, 4)), replace=False).tolist())
    cell = image_size / 3
    r = RADIUS[size] * cell
    slack = JITTER * (0.5 * cell - r)  # keeps the shape inside its cell
    objects = []
    for col in cols:
        x, y = (col + 0.5) * cell + rng.uniform(-slack, slack), (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append({"shape": shape, "color": color, "size": size, "row": ROWS[row], "col": COLS[col],
                        "x": round(float(x), 2), "y": round(float(y), 2), "radius": round(float(r), 2)})
    return {"background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
            "noise": NOISE_STD[int(rng.integers(len(NOISE_STD)))], "objects": objects}


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a square / triangle / five-point star centred (centroid) at (x, y) with outer radius r."""
    if shape == "square":
        h = 0.85 * r  # a bit smaller than the bounding box so its area is close to the circle's
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":  # equilateral, pointing up; its centroid is the circumcentre
        angles, radii = np.deg2rad([-90, 30, 150]), [r] * 3
    else:  # star: alternate outer and inner (0.5 r) vertices, first point up
        angles, radii = np.deg2rad(-90 + 36 * np.arange(10)), [r, 0.5 * r] * 5
    return [(x + rr * np.cos(a), y + rr * np.sin(a)) for a, rr in zip(angles, radii)]


def render(scene: dict, image_size: int = 48, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw a scene as an RGB image; `rng` supplies the background noise (required when scene['noise'] > 0)."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (image_size * s, image_size * s), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        x, y, r, fill = o["x"] * s, o["y"] * s, o["radius"] * s, COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif o["shape"] in SHAPES:
            draw.polygon(_polygon(o["shape"], x, y, r), fill=fill)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}; expected one of {SHAPES}")
    img = img.reduce(s)  # box filter: (S*s, S*s) -> (S, S)
    if scene["noise"] > 0:
        if rng is None:
            raise ValueError("render: a noisy scene needs an rng for its noise")
        pix = np.asarray(img, dtype=np.float32) + rng.normal(0.0, scene["noise"], (image_size, image_size, 3))
        img = Image.fromarray(np.clip(np.rint(pix), 0, 255).astype(np.uint8))
    return img


# ----------------------------------------------------------------------------------------------- text
def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _group(scene: dict) -> tuple[dict, int]:
    """The scene's shape (all its objects are alike) and how many there are."""
    return scene["objects"][0], len(scene["objects"])


def _noun(o: dict, n: int, adjectives: str = "") -> str:
    """'a large red circle' / 'two large red circles' (adjectives: any words put before the shape)."""
    words = f"{adjectives} {o['shape']}".strip()
    return f"{_article(words)} {words}" if n == 1 else f"{_NUM[n]} {words}s"


def _columns(scene: dict) -> str:
    """Which cells of the row are filled: 'on the left', 'on the left and on the right', 'across the whole row'."""
    cols = [_COL_PHRASE[o["col"]] for o in scene["objects"]]
    return "across the whole row" if len(cols) == 3 else " and ".join(cols)


def caption(scene: dict) -> str:
    """Short stage-1 caption: 'two large red circles at the top, on the left and in the center'."""
    o, n = _group(scene)
    return f"{_noun(o, n, o['size'] + ' ' + o['color'])} {_ROW_PHRASE[o['row']]}, {_columns(scene)}"


def questions(scene: dict, rng: np.random.Generator, kind: str) -> tuple[str, str, str]:
    """One question of `kind` about the scene -> (question, short answer, full-sentence answer).

    kinds: the four test kinds plus "size" and "columns" (which cell of the row). A question and its
    answers name only the attribute asked about ("The shapes are red.", never "The circles are red."), so in
    a conversation one turn never gives away another's answer: the model has to read it from the image.
    """
    o, n = _group(scene)
    are = "is" if n == 1 else "are"
    things = _pick(rng, ("shape", "object")) + ("" if n == 1 else "s")
    if kind == "color":
        q = _pick(rng, ("What color {are} the {things}?", "What is the color of the {things}?",
                        "Which color {do} the {things} have?"))
        q = q.format(are=are, things=things, do="does" if n == 1 else "do")
        return q, o["color"], f"The {things} {are} {o['color']}."
    if kind == "shape":
        q = _pick(rng, ("What shape {are} the {things}?", "What kind of shape is in the image?",
                        "Which shape do you see?"))
        q = q.format(are=are, things="object" + ("" if n == 1 else "s"))
        return q, o["shape"], (f"It is {_article(o['shape'])} {o['shape']}." if n == 1
                               else f"They are {o['shape']}s.")
    if kind == "count":
        q = _pick(rng, ("How many shapes are there?", "How many shapes are in the image?",
                        "How many objects can you see?", "What is the number of shapes in the picture?"))
        return q, str(n), "There is one shape." if n == 1 else f"There are {_NUM[n]} shapes."
    if kind == "position":
        q = _pick(rng, ("{Are} the {things} at the top, in the middle, or at the bottom?",
                        "Which row {are} the {things} in: top, middle, or bottom?",
                        "Where in the image {are} the {things}: top, middle, or bottom?"))
        q = q.format(Are=are.capitalize(), are=are, things=things)
        return q, o["row"], f"The {things} {are} {_ROW_PHRASE[o['row']]} of the image."
    if kind == "size":
        q = _pick(rng, ("{Are} the {things} large or small?", "What size {are} the {things}?"))
        q = q.format(Are=are.capitalize(), are=are, things=things)
        return q, o["size"], f"The {things} {are} {o['size']}."
    if kind == "columns":  # one word: the single shape's column, or the row's empty place ("none" when full)
        if n == 1:
            q = _pick(rng, ("Is the shape on the left, in the center, or on the right?", "Which side is the shape on?"))
            return q, o["col"], f"The shape is {_COL_PHRASE[o['col']]}."
        empty = [c for c in COLS if c not in {p["col"] for p in scene["objects"]}]
        q = "Which place in the row is empty: left, center, or right?"
        if not empty:
            return q, "none", "None is empty: the shapes fill the whole row."
        return q, empty[0], f"The place {_COL_PHRASE[empty[0]]} is empty."
    raise ValueError(f"unknown question kind {kind!r}")


_CONVERSATION_KINDS = ("color", "shape", "count", "position", "size", "columns")


def detail(scene: dict) -> str:
    """A paragraph: what the shapes are, on which background, in which row and which of its cells."""
    o, n = _group(scene)
    out = [f"The image shows {_noun(o, n, o['size'] + ' ' + o['color'])} on a {scene['background']} background."]
    where = "It is" if n == 1 else "They are"
    out.append(f"{where} {_ROW_PHRASE[o['row']]} of the image, {_columns(scene)}.")
    others = [r for r in ROWS if r != o["row"]]
    out.append(f"The {others[0]} and {others[1]} rows are empty.")
    return " ".join(out)


def reasoning(scene: dict, rng: np.random.Generator) -> tuple[str, str]:
    """One complex-reasoning question with a one-sentence answer that gives its reason."""
    o, n = _group(scene)
    kind = _pick(rng, ("add", "remove", "room", "corners"))
    plural = o["shape"] + ("" if n == 1 else "s")
    if kind == "add":
        return (f"If one more {o['shape']} were added, how many {o['shape']}s would there be?",
                f"There would be {_NUM[n + 1]}, because the image shows {_NUM[n]} {plural} "
                f"and one more makes {_NUM[n + 1]}.")
    if kind == "remove":
        q = f"If one {o['shape']} were taken away, how many would be left?"
        if n == 1:
            return q, f"None would be left, because the {o['shape']} is the only shape in the image."
        return q, (f"{_NUM[n - 1].capitalize()} would be left, because there are {_NUM[n]} {plural} "
                   f"and taking one away leaves {_NUM[n - 1]}.")
    if kind == "room":
        q = f"Is there room for another {o['shape']} in the same row?"
        if n == 3:
            return q, f"No, because all three places in the {o['row']} row are already taken."
        taken = "is" if n == 1 else "are"
        return q, f"Yes, because only {_NUM[n]} of the three places in the {o['row']} row {taken} taken."
    q = "How many corners does each shape in the image have?"
    return q, f"Each one has {_CORNERS[o['shape']]}, because {'it is a' if n == 1 else 'they are'} {plural}."


def exists(scene: dict, rng: np.random.Generator, category: str) -> tuple[str, str]:
    """A POPE-style question "Is there ... in the image?" and its label, "yes" or "no" with equal odds. POPE's
    categories differ in how the absent object is chosen; here: random asks about a shape, popular about a
    colour, adversarial about a colour and a shape of which a "no" gets one right (the hard negative)."""
    o, _ = _group(scene)
    yes = rng.random() < 0.5
    other = lambda values, v: _pick(rng, [x for x in values if x != v])
    color, shape = o["color"], o["shape"]
    if category == "random":
        thing = shape if yes else other(SHAPES, shape)
    elif category == "popular":
        thing = (color if yes else other(list(COLORS), color)) + " shape"
    elif category == "adversarial":
        if not yes and rng.random() < 0.5:
            color = other(list(COLORS), color)
        elif not yes:
            shape = other(SHAPES, shape)
        thing = f"{color} {shape}"
    else:
        raise ValueError(f"unknown POPE category {category!r}; expected one of {POPE_CATEGORIES}")
    return f"Is there {_article(thing)} {thing} in the image?", "yes" if yes else "no"


def choice(scene: dict, rng: np.random.Generator, kind: str = None) -> tuple[str, list[str], int]:
    """A multiple-choice question in ScienceQA's shape as LLaVA feeds it ("Context: ...", the question, then
    "A. ..." lines) about `kind` (default: a random test kind) -> (text, choices, index of the right one);
    3 or 4 choices."""
    kind = kind or _pick(rng, TEST_KINDS)
    q, answer, _ = questions(scene, rng, kind)
    pool = {"color": list(COLORS), "shape": list(SHAPES), "count": ["1", "2", "3"], "position": list(ROWS)}[kind]
    n = min(len(pool), int(rng.integers(3, 5)))
    wrong = [pool[int(i)] for i in rng.choice(len(pool), size=len(pool), replace=False) if pool[int(i)] != answer]
    choices = [answer] + wrong[:n - 1]
    choices = [choices[int(i)] for i in rng.permutation(n)]
    text = f"Context: N/A\n{q}\n" + "\n".join(f"{letter}. {c}" for letter, c in zip("ABCD", choices))
    return text, choices, choices.index(answer)


_TEXT_FACTS = (
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides of equal length."),
    ("How many corners does a circle have?", "A circle has no corners."),
    ("How many points does a star shape usually have?", "A star shape usually has five points."),
    ("What color do you get when you mix red and yellow?", "Mixing red and yellow gives orange."),
    ("What color do you get when you mix blue and yellow?", "Mixing blue and yellow gives green."),
    ("What color do you get when you mix red and blue?", "Mixing red and blue gives purple."),
    ("What is the opposite of left?", "The opposite of left is right."),
    ("What is the opposite of top?", "The opposite of top is bottom."),
    ("Which is larger, a large square or a small square?", "A large square is larger than a small square."),
)


def _with_image(rng, text: str) -> str:
    """The image placeholder goes before or after the first human turn's text, as in the real data."""
    return f"<image>\n{text}" if rng.random() < 0.5 else f"{text}\n<image>"


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    return [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def instruct_record(scene: dict, rng: np.random.Generator, rid: str, image: str) -> dict:
    """One stage-2 record of a random kind: conversation 35%, vqa 35%, detail 15%, reasoning 15%.

    A conversation asks each kind of question at most once, so no answer is given away by an earlier turn.
    """
    def ask(p_short: float) -> list[tuple[str, str]]:  # 3-5 turns of distinct kinds; short-answer form w.p. p_short
        kinds = rng.choice(len(_CONVERSATION_KINDS), size=int(rng.integers(3, 6)), replace=False)
        pairs = []
        for k in kinds:
            q, short, long = questions(scene, rng, _CONVERSATION_KINDS[int(k)])
            pairs.append((q + SHORT_SUFFIX, short) if rng.random() < p_short else (q, long))
        return pairs

    u = rng.random()
    if u < 0.35:  # conversation: about a third of the turns short-answer
        pairs = ask(0.33)
    elif u < 0.70:  # vqa: short-answer turns only (the 665K mix's VQAv2 / GQA records look like this)
        pairs = ask(1.0)
    elif u < 0.85:
        pairs = [(_pick(rng, DETAIL_INSTRUCTIONS), detail(scene))]
    else:
        pairs = [reasoning(scene, rng)]
    pairs[0] = (_with_image(rng, pairs[0][0]), pairs[0][1])
    return {"id": rid, "image": image, "conversations": _turns(pairs)}


def text_record(rng: np.random.Generator, rid: str) -> dict:
    """A text-only record (no "image" key), like the ShareGPT part of the 665K mix: 1-2 general questions."""
    idx = rng.choice(len(_TEXT_FACTS), size=int(rng.integers(1, 3)), replace=False)
    return {"id": rid, "conversations": _turns([_TEXT_FACTS[int(i)] for i in idx])}


# ----------------------------------------------------------------------------------------------- writing
def _rng(seed: int, split: str, i: int, stream: int) -> np.random.Generator:
    """Independent generator per (seed, split, index, stream): 0 = scene + pixels, 1 = text."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], i, stream])


def _corpus_lines(records: list[dict], system: bool) -> list[str]:
    """Each turn's lines (without <image>, which the tokenizer never sees) prefixed with its role word;
    with system=True each record starts with the vicuna_v1 system prompt, as stage 2 renders it."""
    lines = []
    for rec in records:
        if system:
            lines.append(VICUNA_SYSTEM)  # the vicuna_v1 system prompt the demo trains with
        for turn in rec["conversations"]:
            role = ROLES[turn["from"] == "gpt"]
            text = [t.strip() for t in turn["value"].replace("<image>", "").split("\n") if t.strip()]
            lines += [f"{role}: {text[0]}"] + text[1:]
    return lines


def _dump(obj, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def write_dataset(out_dir: str, n_train: int = 2000, n_test: int = 200, seed: int = 0,
                  image_size: int = 48) -> dict:
    """Generate the dataset under out_dir (see the module docstring); return {name: absolute path}.

    Image paths inside the JSON files are relative to out_dir. Test images come from their own seed stream,
    so they are new renderings never seen in training (scene layouts come from the same distribution).
    """
    if n_train < 1 or n_test < 0:
        raise ValueError(f"write_dataset: need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    if image_size < 24:
        raise ValueError(f"write_dataset: image_size {image_size} is too small to draw shapes (need >= 24)")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    scenes, pretrain, instruct, test = {}, [], [], []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            rng = _rng(seed, split, i, 0)
            scene = make_scene(rng, image_size)
            image = f"images/{split}_{i:06d}.png"
            render(scene, image_size, rng).save(os.path.join(out_dir, image))
            scenes[image] = scene
            trng = _rng(seed, split, i, 1)
            if split == "train":
                rid = f"{split}_{i:06d}"
                instr = _with_image(trng, _pick(trng, PRETRAIN_INSTRUCTIONS))
                pretrain.append({"id": rid, "image": image, "conversations": _turns([(instr, caption(scene))])})
                instruct.append(instruct_record(scene, trng, rid, image))
            else:
                for kind in TEST_KINDS:
                    q, a, _ = questions(scene, trng, kind)
                    test.append({"id": f"{split}_{i:06d}_{kind}", "image": image,
                                 "question": q + SHORT_SUFFIX, "answer": a, "kind": kind})
    for i in range(max(1, n_train // 50)):  # ~2% text-only records, spread through the list
        rec = text_record(_rng(seed, "text", i, 1), f"text_{i:06d}")
        instruct.insert(int(_rng(seed, "text", i, 0).integers(len(instruct) + 1)), rec)
    paths = {name: os.path.join(out_dir, f"{name}.json") for name in ("pretrain", "instruct", "test", "scenes")}
    for name, obj in (("pretrain", pretrain), ("instruct", instruct), ("test", test), ("scenes", scenes)):
        _dump(obj, paths[name])
    paths["corpus"] = os.path.join(out_dir, "corpus.txt")
    lines = _corpus_lines(pretrain, system=False) + _corpus_lines(instruct, system=True)
    with open(paths["corpus"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    paths["image_folder"] = out_dir
    paths.update(write_benchmarks(os.path.join(out_dir, "bench"), out_dir, scenes, seed))
    return paths


def write_benchmarks(bench_dir: str, image_folder: str, scenes: dict, seed: int) -> dict:
    """The held-out images as two benchmarks in LLaVA's eval layout, for `eval.py`: {"pope": dir, "sqa": dir}.
    Their formats (yes/no, an option's letter) are not in the training data: the demo shows what a model scores
    on a benchmark whose answer format it was never taught, as the scorers read it.

    pope/  llava_pope_test.jsonl, coco/coco_pope_{adversarial,popular,random}.json, val2014/ (the images): one
           `exists` question per image, the categories in turn.
    sqa/   llava_test_CQM-A.json, problems.json, pid_splits.json, images/test/<pid>/image.png: one `choice`
           question per image, every problem in the test split.
    """
    import shutil

    test = [image for image in scenes if os.path.basename(image).startswith("test_")]
    pope, sqa = os.path.join(bench_dir, "pope"), os.path.join(bench_dir, "sqa")
    for folder in (os.path.join(pope, "coco"), os.path.join(pope, "val2014"), os.path.join(sqa, "images", "test")):
        os.makedirs(folder, exist_ok=True)  # also with no held-out image: empty benchmarks, not missing ones
    questions, labels, records, problems = [], {c: [] for c in POPE_CATEGORIES}, [], {}
    for i, image in enumerate(test):
        rng = _rng(seed, "test", i, 2)
        name, category = os.path.basename(image), POPE_CATEGORIES[i % len(POPE_CATEGORIES)]
        q, label = exists(scenes[image], rng, category)
        line = {"question_id": i + 1, "image": name, "text": q + SHORT_SUFFIX, "category": category}
        questions.append(line)
        labels[category].append({"question_id": i + 1, "image": name, "text": q, "label": label})
        shutil.copyfile(os.path.join(image_folder, image), os.path.join(pope, "val2014", name))
        text, choices, right = choice(scenes[image], rng)
        pid = str(i + 1)
        problems[pid] = {"question": text.split("\n")[1], "choices": choices, "answer": right, "hint": "",
                         "image": "image.png", "split": "test"}
        records.append({"id": pid, "image": f"{pid}/image.png", "conversations": [
            {"from": "human", "value": text + "\n<image>"},
            {"from": "gpt", "value": f"The answer is {'ABCD'[right]}."}]})
        os.makedirs(os.path.join(sqa, "images", "test", pid), exist_ok=True)
        shutil.copyfile(os.path.join(image_folder, image), os.path.join(sqa, "images", "test", pid, "image.png"))
    for path, lines in [(os.path.join(pope, "llava_pope_test.jsonl"), questions)] + [
            (os.path.join(pope, "coco", f"coco_pope_{c}.json"), labels[c]) for c in POPE_CATEGORIES]:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    _dump(records, os.path.join(sqa, "llava_test_CQM-A.json"))
    _dump(problems, os.path.join(sqa, "problems.json"))
    _dump({"test": list(problems)}, os.path.join(sqa, "pid_splits.json"))
    return {"pope": pope, "sqa": sqa}


# ----------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(corpus_path: str, out_dir: str, vocab_size: int = 768) -> str:
    """Train a LLaMA-like BPE SentencePiece model on corpus_path; return out_dir/tokenizer.model.

    Same special ids and normalizer as LLaMA's tokenizer.model: unk 0, bos 1, eos 2, no pad, byte fallback
    (so "\\n" and any unseen character become <0xNN> pieces, never <unk>), digits split, identity
    normalization. The 256 byte pieces and 3 specials come out of vocab_size; the rest are BPE merges.
    Single-threaded, so the same corpus always gives the same bytes.
    """
    import sentencepiece as spm

    if not os.path.isfile(corpus_path):
        raise FileNotFoundError(f"train_tokenizer: corpus {corpus_path} does not exist")
    with open(corpus_path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line]
    if any("<image>" in line for line in lines):
        raise ValueError(f"train_tokenizer: {corpus_path} contains '<image>'; it is split out before tokenizing")
    if vocab_size < 259 + 16:
        raise ValueError(f"train_tokenizer: vocab_size {vocab_size} leaves too few merges beyond 256 bytes + "
                         "3 specials")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=f, vocab_size=vocab_size, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    return path


# ----------------------------------------------------------------------------------------------- scoring
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                                   "eight", "nine", "ten"))}


def normalize_answer(s: str) -> str:
    """VQA-style normalisation: lowercase, punctuation -> space, number words -> digits, drop a/an/the."""
    words = re.sub(r"[^\w\s]", " ", s.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in ("a", "an", "the"))


def exact_match(prediction: str, answer: str) -> bool:
    """True when prediction and answer are equal after `normalize_answer` ("Red." matches "red")."""
    return normalize_answer(prediction) == normalize_answer(answer)


def chance_level(test_records: list[dict]) -> float:
    """Accuracy of always answering each kind's most frequent answer (the floor a model must beat)."""
    if not test_records:
        raise ValueError("chance_level: no test records")
    by_kind: dict[str, Counter] = {}
    for i, rec in enumerate(test_records):
        if "kind" not in rec or "answer" not in rec:
            raise ValueError(f"chance_level: record {i} ({rec.get('id', '?')}) lacks 'kind' or 'answer'")
        by_kind.setdefault(rec["kind"], Counter())[normalize_answer(rec["answer"])] += 1
    return sum(c.most_common(1)[0][1] for c in by_kind.values()) / len(test_records)
