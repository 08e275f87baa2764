"""The README's file table: every file it lists exists with the line count it states, and every source file of
the project is listed (counts that go stale mislead the learners the table is for)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _table():
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", (ROOT / "README.md").read_text(), flags=re.M)
    assert rows, "README.md has no file table"
    return {path: int(n) for path, n in rows}


def test_line_counts_are_true():
    for path, n in _table().items():
        f = ROOT / path
        assert f.is_file(), f"README lists {path}, which does not exist"
        assert len(f.read_text().splitlines()) == n, f"README says {path} has {n} lines"


def test_every_source_file_is_listed():
    sources = {str(p.relative_to(ROOT)) for d in ("minillava", "kernels", "weights") for p in (ROOT / d).glob("*.py")}
    sources |= {p.name for p in ROOT.glob("*.py")}
    missing = sources - set(_table())
    assert not missing, f"README's file table lacks {sorted(missing)}"


# ----------------------------------------------------------------------------------------------------------
# Every command and code block of "Use it on real checkpoints" runs as written, on tiny files in the official
# formats: only the paths are substituted.

def _blocks(lang, title="Use it on real checkpoints"):
    section = (ROOT / "README.md").read_text().split(f"## {title}")[1].split("\n## ")[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny stand-ins for each path the README names."""
    import dataclasses
    import json

    from minillava import synthetic
    from minillava.config import get_preset
    from minillava.weights import write_random_checkpoint
    root = tmp_path_factory.mktemp("readme")
    cfg = get_preset("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=576), image_token_id=512, pad_token_id=513)
    data = synthetic.write_dataset(str(root / "data"), n_train=256, n_test=2, seed=0, image_size=32)
    tok = synthetic.train_tokenizer(data["corpus"], str(root / "tok"), vocab_size=512)  # + <image>, <pad>
    hf = write_random_checkpoint(root / "hf", cfg, "A", seed=0, tokenizer=tok)["model"]
    long = cfg.replace(text=dataclasses.replace(cfg.text, max_position_embeddings=2048))  # train.py's recipe length
    c = write_random_checkpoint(root / "c", long, "C", seed=0, tokenizer=tok)
    image = str(root / "data" / json.load(open(data["pretrain"]))[0]["image"])
    (root / "q.jsonl").write_text(json.dumps({"question_id": 1, "image": os.path.basename(image),
                                              "text": "What is in this image?"}) + "\n")
    nxt = get_preset("tiny-anyres").replace(text=cfg.text, image_token_id=512, pad_token_id=513)
    mistral = nxt.replace(text=dataclasses.replace(cfg.text, model_type="mistral", rope_theta=1e6))
    next_hf = write_random_checkpoint(root / "next-hf", mistral, "A", seed=0, tokenizer=tok)["model"]
    next_b = write_random_checkpoint(root / "next-b", nxt, "B", seed=0, tokenizer=tok)["model"]
    return {"llava-v1.6-mistral-7b-hf": str(next_hf), "llava-v1.6-vicuna-7b": str(next_b),
            "runs/next": str(root / "next"),
            "llava-1.5-7b-hf": str(hf), "photo.jpg": image, "q.jsonl": str(root / "q.jsonl"),
            "a.jsonl": str(root / "a.jsonl"), "images": os.path.dirname(image),
            "vicuna-7b-v1.5": str(c["model"]), "clip-vit-large-patch14-336": str(c["vision"]),
            "blip_laion_cc_sbu_558k.json": data["pretrain"], "LLaVA-Pretrain/images": str(root / "data"),
            "llava_v1_5_mix665k.json": data["instruct"], "data": str(root / "data"),
            "runs/stage1": str(root / "runs" / "stage1"), "runs/stage2": str(root / "runs" / "stage2")}


def _substitute(text, files):
    # whole tokens only ("data" is a path, "--data" a flag; a path inside a quoted string is replaced too)
    return re.sub(r"(?<![\w./-])(" + "|".join(map(re.escape, sorted(files, key=len, reverse=True))) + r")(?![\w.-])",
                  lambda m: files[m.group(1)], text)


def _run(args, stdin=""):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, cwd=ROOT, input=stdin, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_python_block_runs_as_written(files):
    (block,) = _blocks("python")
    proc = _run([sys.executable, "-c", _substitute(block, files)])
    lines = proc.stdout.splitlines()
    assert len(lines) == 3  # the greedy answer, the first answer token by hand, the engine's two answers
    assert lines[0].startswith(lines[1].strip()) or lines[1].strip() == ""
    greedy, sampled = lines[2].split(" | ")
    assert greedy.endswith(" length")  # 16 ids, no stop id
    assert lines[0].split()[:1] == greedy.split()[:1]  # the same greedy answer begins both


def test_commands_run_as_written(files):
    """The generate.py lines (one-shot, chat, batch), then stage 1 and stage 2 under torchrun, in order."""
    block = _blocks("bash")[0]
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]
    commands = [shlex.split(_substitute(c.split("  #")[0], files)) for c in commands]
    assert [c[0] for c in commands] == ["python"] * 4 + ["torchrun"]
    for c in commands:
        launcher = [sys.executable] if c[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
        proc = _run(launcher + c[1:], stdin="What color is it?\n" if "--chat" in c else "")
        if "--chat" in c:
            assert proc.stdout.count("ASSISTANT: ") == 1
    assert len(open(files["a.jsonl"]).read().splitlines()) == 1
    assert os.path.isfile(os.path.join(files["runs/stage1"], "mm_projector.safetensors"))
    assert os.path.isfile(os.path.join(files["runs/stage2"], "model.safetensors"))


def test_llava_1_6_commands_run_as_written(files):
    """generate.py on a llava_next dir (Mistral) and an original 1.6 dir (its tower inside, --vision for CLIP's
    config), then train.py's stage 2 with --image-aspect-ratio anyres into a llava_next checkpoint."""
    import json
    import shutil
    block = _blocks("bash")[2]
    commands = [shlex.split(_substitute(c.split("  #")[0], files)) for c in block.replace("\\\n", " ").splitlines()
                if c.strip() and not c.startswith("#")]
    assert [c[1] for c in commands] == ["generate.py", "generate.py", "train.py"]
    projector = os.path.join(files["runs/stage1"], "mm_projector.safetensors")
    if not os.path.isfile(projector):  # test_commands_run_as_written's stage 1 writes it when run first
        os.makedirs(files["runs/stage1"], exist_ok=True)
        shutil.copyfile(os.path.join(os.path.dirname(files["vicuna-7b-v1.5"]), "mm_projector.safetensors"), projector)
    for c in commands[:2]:
        assert "vision tower: 1 image(s) as " in _run([sys.executable] + c[1:]).stderr
    _run([sys.executable] + commands[2][1:])
    assert json.load(open(os.path.join(files["runs/next"], "config.json")))["model_type"] == "llava_next"


def test_quantization_commands_run_as_written(files, tmp_path):
    """The laptop block: generate.py --quantize int8, quantize.py to int4 (groups of 32 here: the tiny
    model's MLP is 96 wide) and an answer from what it wrote, and serve.py until it says it serves."""
    import signal
    block = _blocks("bash")[1]
    files = {**files, "llava-1.5-7b-int4": str(tmp_path / "int4")}
    commands = [shlex.split(_substitute(c.split("  #")[0], files)) for c in block.splitlines()
                if c.strip() and not c.startswith("#")]
    assert [c[1] for c in commands] == ["generate.py", "quantize.py", "serve.py"]
    commands[1] = ["32" if prev == "--group-size" else a for prev, a in zip([""] + commands[1], commands[1])]
    assert "LLM linear layers int8" in _run([sys.executable] + commands[0][1:]).stderr
    _run([sys.executable] + commands[1][1:])
    again = [files["llava-1.5-7b-int4"] if prev == "--model" else a for prev, a in zip([""] + commands[0], commands[0])]
    assert "LLM linear layers int4" in _run([sys.executable] + [a for a in again[1:] if a not in ("--quantize",
                                                                                                  "int8")]).stderr
    serve = subprocess.Popen([sys.executable] + commands[2][1:] + ["--group-size", "32", "--port", "0", "--threads",
                                                                    "1"], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        for line in serve.stderr:
            seen.append(line)
            if line.startswith("serving "):
                break
        assert any("LLM linear layers int4" in line for line in seen) and seen[-1].startswith("serving "), seen
    finally:
        serve.kill()


@pytest.fixture(scope="module")
def benchmarks(files, tmp_path_factory):
    """Tiny benchmark folders in eval.zip's layout for the README's eval.py commands."""
    import json
    import shutil

    from tests.test_eval import write_jsonl
    root = tmp_path_factory.mktemp("eval")
    image = files["photo.jpg"]

    def folder(name, questions_file, images, questions):
        d = root / name
        os.makedirs(d / images)
        for q in questions:
            shutil.copyfile(image, d / images / q["image"])
        write_jsonl(d / questions_file, questions)
        return d
    qs = [{"question_id": i, "image": f"{i}.png", "category": c, "text": "Is there a dog in the image?"}
          for i, c in enumerate(["adversarial", "popular", "random"])]
    pope = folder("pope", "llava_pope_test.jsonl", "val2014", qs)
    for q in qs:
        write_jsonl(pope / "coco" / f"coco_pope_{q['category']}.json", [{"label": "yes"}])
    qs = [{"question_id": f"q{i}", "image": f"{i}.png", "text": "What color is it?\nAnswer the question using a "
           "single word or phrase."} for i in range(2)]
    gqa = folder("gqa", "llava_gqa_testdev_balanced.jsonl", "data/images", qs)
    (gqa / "data" / "testdev_balanced_questions.json").write_text(json.dumps(
        {q["question_id"]: {"answer": "red", "types": {"structural": "query"}, "isBalanced": True} for q in qs}))
    qs = [{"question_id": "img1", "image": "img1.png", "text": f"What is written {w}?\nReference OCR token: stop\n"
           "Answer the question using a single word or phrase."} for w in ("here", "there")]
    textvqa = folder("textvqa", "llava_textvqa_val_v051_ocr.jsonl", "train_images", qs[:1])
    write_jsonl(textvqa / "llava_textvqa_val_v051_ocr.jsonl", qs)
    ann = [{"image_id": "img1", "question": f"What is written {w}?", "answers": ["stop"] * 10}
           for w in ("here", "there")]
    (textvqa / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": ann}))
    qs = [{"question_id": i, "image": f"{i}.png", "text": "What is it?"} for i in range(3)]
    vqav2 = folder("vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015", qs[:2])
    write_jsonl(vqav2 / "llava_vqav2_mscoco_test2015.jsonl", qs)
    from tests.test_eval import MMB_ROWS, write_mmbench
    mmbench = Path(write_mmbench(root / "mmbench", MMB_ROWS))
    return {"llava-1.5-7b-hf": files["llava-1.5-7b-hf"], **{f"playground/data/eval/{d.name}": str(d)
                                                           for d in (pope, gqa, textvqa, vqav2, mmbench)},
            **{n: str(root / n) for n in ("runs/pope", "runs/vqav2", "runs/mmbench", "runs/tv", "gqa.jsonl",
                                           "gqa_metrics.json", "textvqa.jsonl")}}


def test_reproduce_the_paper_commands_run_as_written(benchmarks):
    import json
    (block,) = _blocks("bash", "Reproduce the paper")
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    commands = [shlex.split(_substitute(c.split("  #")[0], benchmarks)) for c in commands]
    assert [c[0] for c in commands] == ["python"] * 3 + ["torchrun"] + ["python"] * 3
    for c in commands:
        launcher = [sys.executable] if c[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
        _run(launcher + c[1:])
    assert json.load(open(os.path.join(benchmarks["runs/pope"], "metrics.json")))["benchmark"] == "pope"
    assert json.load(open(benchmarks["gqa_metrics.json"]))["metrics"]["n"] == 2
    assert len(open(benchmarks["textvqa.jsonl"]).read().splitlines()) == 2
    assert len(json.load(open(os.path.join(benchmarks["runs/vqav2"], "submission.json")))) == 3
    assert os.path.isfile(os.path.join(benchmarks["runs/mmbench"], "submission.xlsx"))
    assert json.load(open(os.path.join(benchmarks["runs/tv"], "metrics.json")))["protocol"] == "lmms-eval"
