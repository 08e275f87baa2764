"""generate.py: one-shot, chat and batch answers on a tiny random layout-A checkpoint; equality with a cache-free
greedy loop and with transformers' generate; chat equals a fresh prompt; bad input fails loudly, writes nothing
half-done, and a batch run resumes where it stopped."""
import dataclasses
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from minillava import generate as G

from minillava import generation
from minillava.config import get_preset
from minillava.engine import Engine, Request
from tests.spm_util import train_tiny_spm

TINY = get_preset("tiny")
# The tiny model with room for the tiny tokenizer's 768 pieces, plus <image> and <pad> as llava-hf adds them
# (vocabulary padded to a multiple of 64).
CFG = TINY.replace(text=dataclasses.replace(TINY.text, vocab_size=832), image_token_id=768, pad_token_id=769)
GREEDY = dict(temperature=0.0, max_new_tokens=10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from minillava.weights import write_random_checkpoint
    root = tmp_path_factory.mktemp("gen")
    tok = train_tiny_spm(root / "spm")
    return str(write_random_checkpoint(root / "llava-tiny", CFG, "A", seed=1, tokenizer=tok)["model"])


@pytest.fixture(scope="module")
def loaded(ckpt):
    return generation.load(ckpt)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two odd-sized images on disk, one RGB and one palette."""
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    a, b = root / "a.png", root / "b.gif"
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 256, (61, 29, 3), dtype=np.uint8)).quantize(32).save(b)
    return str(a), str(b)


def greedy_without_cache(model, tok, ids, image, n):
    """The reference: a full forward over the prompt and everything generated so far, at every step."""
    pix = None if image is None else generation.load_pixels(image, model.config)[0]
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids + out]), pix)[0, -1].argmax())
            if t == tok.eos_id:
                break
            out.append(t)
    return out


def ask_ids(model, tok, question, n_images, template="vicuna_v1"):
    return generation.prompt_ids([("human", generation.with_image_placeholder(question, n_images))], tok,
                                 model.config, template)


# --- prompts ------------------------------------------------------------------------------------------------
def test_image_placeholder_is_prepended_and_moved_to_the_front(loaded):
    model, tok = loaded
    ids = ask_ids(model, tok, "What is the man holding?", 1)
    assert ids.count(CFG.image_token_id) == 1
    assert ids == ask_ids(model, tok, "<image>\nWhat is the man holding?", 1)
    assert ids == ask_ids(model, tok, "What is the man holding? <image>", 1)  # moved to the front of the turn
    assert ask_ids(model, tok, "What is the man holding?", 0).count(CFG.image_token_id) == 0
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 image"):
        ask_ids(model, tok, "<image>\nWhat?", 0)
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 image"):
        ask_ids(model, tok, "<image> and <image>", 1)


def test_reply_cuts_at_stop_strings_and_holds_back_their_start(loaded):
    _, tok = loaded
    ids = tok.encode("the dog\nthe cat")
    reply, shown, stopped_at = generation.Reply(tok, ["\n"]), [], None
    for n in range(1, len(ids) + 1):
        if reply.update(ids[:n]) and stopped_at is None:
            stopped_at = n
        shown.append(reply.new_text())
    assert reply.finish() == "the dog" and "".join(shown) + reply.new_text(final=True) == "the dog"
    assert tok.decode(ids[:stopped_at]).startswith("the dog\n")  # it stopped at the id that made the "\n"
    # "</s>" written as characters: its start "</" is held back until it is clearly not a stop string.
    reply = generation.Reply(tok, ["</s>"])
    ids = tok.encode("a dog</")
    reply.update(ids)
    assert reply.new_text() == "a dog"
    ids = tok.encode("a dog</x cat")
    reply.update(ids)
    assert reply.new_text() == "</x cat" and reply.finish() == "a dog</x cat"
    reply = generation.Reply(tok, ["</s>"])
    assert reply.update(tok.sp.encode("a dog</s> cat")) and reply.finish() == "a dog"  # (encode would give EOS)


# --- answers --------------------------------------------------------------------------------------------------
def test_batched_answers_equal_cache_free_greedy_per_question(loaded, images):
    """Left-padded batch (two images of different sizes and a text-only question, prompts of different lengths),
    cached decoding with the image prefix: each answer equals a full forward at every step on that question alone."""
    model, tok = loaded
    pairs = [(images[0], "What is the man holding?"), (None, "Describe a red bus."),
             (images[1], "Is there a dog near the tree in this picture?")]
    texts, stats = generation.answer_batch(model, tok, pairs, **GREEDY)
    assert stats.decode_steps >= 1 and stats.prefill_tokens + stats.prefix_reused == sum(
        len(ask_ids(model, tok, q, im is not None)) + (im is not None) * (CFG.num_image_tokens - 1) for im, q in pairs)
    assert stats.prefix_reused > 0  # the system prompt, computed once and copied into the other slots
    for (image, question), text in zip(pairs, texts):
        ids = ask_ids(model, tok, question, image is not None)
        want = greedy_without_cache(model, tok, ids, image, GREEDY["max_new_tokens"])
        assert len(set(want)) >= 5  # the random model writes varied text, so equality means something
        assert text == tok.decode(want).strip()
    assert generation.answer(model, tok, pairs, batch_size=2, **GREEDY) == texts


def test_greedy_equals_transformers_generate(ckpt, loaded, images):
    """32 greedy tokens, fp32, same weights (the layout-A directory on disk) and inputs: the same ids as
    transformers' LlavaForConditionalGeneration.generate, which wants the image id repeated Np times."""
    pytest.importorskip("transformers")
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    hf, info = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    model, tok = loaded
    ids = ask_ids(model, tok, "What is the man holding?", 1)
    pix = generation.load_pixels(images[0], model.config)[0]  # (1, 3, S, S)
    ours = Engine(model, slots=1).run([Request(ids, pix, max_new_tokens=32)])[0].out
    expanded = [j for i in ids for j in ([i] * CFG.num_image_tokens if i == CFG.image_token_id else [i])]
    gc = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        input_ids = torch.tensor([expanded])
        out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pix,
                          generation_config=gc)
    theirs = out[0, len(expanded):].tolist()
    assert len(ours) == 32 and len(set(ours)) >= 16
    assert ours == theirs


# --- chat ---------------------------------------------------------------------------------------------------
def test_chat_over_two_turns_equals_a_fresh_prompt_of_the_history(loaded, images, monkeypatch):
    model, tok = loaded
    calls = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda *a, **kw: (calls.append(1), original(*a, **kw))[1])
    chat = generation.Chat(model, tok, images[0], **GREEDY)
    q1, q2 = "What is the man holding?", "Why is he there?"
    r1 = chat.ask(q1)
    first = generation.prompt_ids([("human", "<image>\n" + q1)], tok, model.config, "vicuna_v1")
    assert chat.stats.prefill_tokens == model.config.llm_length(first)
    cached, prefilled = list(chat.engine.state[0].ids), chat.stats.prefill_tokens
    r2 = chat.ask(q2)
    assert calls == [1]  # the image was encoded once
    history = [("human", "<image>\n" + q1), ("gpt", r1), ("human", q2)]
    ids = generation.prompt_ids(history, tok, model.config, "vicuna_v1")
    assert chat.engine.state[0].ids[:len(ids)] == ids  # exactly the fresh prompt's ids (then the reply's)
    # Turn 2 ran only what the slot did not hold: the history (image included) stayed in the cache.
    shared = next(i for i, (a, b) in enumerate(zip(ids, cached + [None] * len(ids))) if a != b)
    assert shared >= len(first) - 1 and model.config.image_token_id in ids[:shared]
    assert chat.stats.prefill_tokens - prefilled == model.config.llm_length(ids) - model.config.llm_length(ids[:shared])
    want = greedy_without_cache(model, tok, ids, images[0], GREEDY["max_new_tokens"])
    assert len(set(want)) >= 5 and r2 == tok.decode(want).strip()
    assert chat.history == history + [("gpt", r2)]


def test_chat_command_line(ckpt, loaded, images, monkeypatch, capsys):
    model, tok = loaded
    chat = generation.Chat(model, tok, images[0], **GREEDY)
    want = [chat.ask("What is it?"), chat.ask("And the colour?")]
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\nAnd the colour?\n\n"))
    assert G.main(["--model", ckpt, "--image", images[0], "--chat", "--temperature", "0",
                   "--max-new-tokens", "10"]) == 0
    out, err = capsys.readouterr()
    replies = [line.split("ASSISTANT: ", 1)[1] for line in out.splitlines() if "ASSISTANT: " in line]
    assert [r.strip() for r in replies] == want
    assert "decode:" in err and "tokens/s" in err


# --- one-shot -----------------------------------------------------------------------------------------------
def test_one_shot_streams_the_answer_and_prints_speed(ckpt, loaded, images, capsys):
    model, tok = loaded
    want = generation.answer(model, tok, [(images[1], "What is in the picture?")], **GREEDY)[0]
    assert G.main(["--model", ckpt, "--image", images[1], "--prompt", "What is in the picture?",
                   "--temperature", "0", "--max-new-tokens", "10"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == want and out.endswith("\n")
    assert "prefill:" in err and "decode:" in err and "tokens/s" in err and "GB/s" in err
    assert "tokenizer: legacy=true add_bos_token=true add_eos_token=false (from " in err
    assert f"threads: {torch.get_num_threads()} (" in err
    assert G.main(["--model", ckpt, "--image", images[1], "--prompt", "What is in the picture?",
                   "--temperature", "0", "--max-new-tokens", "10", "--tokenizer-legacy", "false"]) == 0
    assert "tokenizer: legacy=false" in capsys.readouterr().err


def test_original_layout_with_separate_clip_gives_the_same_answer(ckpt, loaded, images, tmp_path, capsys):
    """Layout B (original LLaVA: the -200 image sentinel, CLIP in its own directory, --vision) from the same seed
    answers exactly as the layout-A directory."""
    from minillava.weights import write_random_checkpoint
    model, tok = loaded
    paths = write_random_checkpoint(tmp_path / "b", CFG, "B", seed=1, tokenizer=tok.path)
    want = generation.answer(model, tok, [(images[0], "What is in the picture?")], **GREEDY)[0]
    assert G.main(["--model", str(paths["model"]), "--vision", str(paths["vision"]), "--image", images[0],
                   "--prompt", "What is in the picture?", "--temperature", "0", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == want


# --- bad input -------------------------------------------------------------------------------------------------
def run_main(argv, capsys):
    rc = G.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def bad_image_files(root):
    good = root / "good.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(good)
    data = good.read_bytes()
    files = {"truncated.png": data[:len(data) // 2], "corrupt.jpg": b"\xff\xd8\xff" + os.urandom(64),
             "empty.png": b""}
    for name, content in files.items():
        (root / name).write_bytes(content)
    return {"missing.png": "not found", "truncated.png": "cannot decode", "corrupt.jpg": "cannot decode",
            "empty.png": "empty", ".": "directory"}


def test_bad_images_fail_before_anything_is_printed(ckpt, tmp_path, capsys):
    for name, message in bad_image_files(tmp_path).items():
        path = str(tmp_path / name)
        rc, out, err = run_main(["--model", ckpt, "--image", path, "--prompt", "What?"], capsys)
        assert rc == 1 and out == "", name
        assert err.startswith("error: ") and message in err and os.path.normpath(path) in err, err
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "good.png"
        locked.chmod(0)
        rc, out, err = run_main(["--model", ckpt, "--image", str(locked), "--prompt", "What?"], capsys)
        assert rc == 1 and out == "" and "good.png" in err


def test_prompt_that_does_not_fit_says_by_how_much(ckpt, images, capsys):
    context, Np = CFG.text.max_position_embeddings, CFG.num_image_tokens
    rc, out, err = run_main(["--model", ckpt, "--image", images[0], "--prompt", "the dog " * 150], capsys)
    assert rc == 1 and out == ""
    err = next(line for line in err.splitlines() if line.startswith("error: "))
    text_tokens = int(err.split("(")[1].split(" text")[0])
    L = text_tokens + Np
    assert f"the prompt is {L} tokens ({text_tokens} text + 1 image(s): {Np})" in err
    assert f"{L - context} more than the context of {context}" in err


def test_model_directory_that_is_not_a_checkpoint(tmp_path, images, capsys):
    for path, message in [(tmp_path / "nope", "model directory not found"),
                          (tmp_path, "is not a checkpoint directory: it has no config.json")]:
        rc, out, err = run_main(["--model", str(path), "--image", images[0], "--prompt", "What?"], capsys)
        assert rc == 1 and out == "" and message in err and str(path) in err
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    rc, out, err = run_main(["--model", str(tmp_path), "--image", images[0], "--prompt", "What?"], capsys)
    assert rc == 1 and out == "" and "tokenizer.model" in err


# --- batch ----------------------------------------------------------------------------------------------------
def write_lines(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def read_answers(path):
    lines = path.read_text().splitlines(keepends=True)
    assert all(l.endswith("\n") for l in lines)
    return [json.loads(l) for l in lines]


def test_batch_answers_errors_and_resume(ckpt, loaded, images, tmp_path, capsys):
    model, tok = loaded
    folder = os.path.dirname(images[0])
    bad_image_files(tmp_path)
    good = [{"question_id": "q0", "image": "a.png", "text": "What is the man holding?"},
            {"question_id": 1, "image": "b.gif", "text": "Describe the picture. <image>"},
            {"question_id": "q2", "text": "A question without an image."},
            {"question_id": "q3", "image": "a.png", "text": "Is it day or night?"}]
    questions = tmp_path / "q.jsonl"
    write_lines(questions, [good[0], good[1], "{not json", {"question_id": "q9", "image": "a.png"},
                            {"question_id": "q4", "image": str(tmp_path / "truncated.png"), "text": "What?"},
                            good[2], dict(good[0]), good[3]])
    answers = tmp_path / "out" / "answers.jsonl"
    argv = ["--model", ckpt, "--questions", str(questions), "--answers", str(answers), "--image-folder", folder,
            "--temperature", "0", "--max-new-tokens", "10", "--batch-size", "2"]
    rc, out, err = run_main(argv, capsys)
    assert rc == 1
    for line, what in [(3, "Expecting property name"), (4, "missing key(s) text"), (5, "cannot decode image"),
                       (7, "duplicate question 'q0' (the same id and text as line 1)")]:
        assert f"{questions}:{line}: " in err and what in err.split(f"{questions}:{line}: ")[1].split("\n")[0]
    assert "4 question(s) not answered" in err and "answered" in err
    got = read_answers(answers)
    assert [a["question_id"] for a in got] == ["q0", 1, "q2", "q3"]  # the good ones, in file order
    want = generation.answer(model, tok, [(None if "image" not in q else os.path.join(folder, q["image"]), q["text"])
                                 for q in good], **GREEDY)
    for a, q, text in zip(got, good, want):
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert a["prompt"] == q["text"] and a["text"] == text and a["model_id"] == "llava-tiny"
    assert len({a["answer_id"] for a in got}) == 4

    # Resume after fixing the file: only the new question is answered, the earlier answers stay as they were.
    write_lines(questions, good + [{"question_id": "q5", "image": "b.gif", "text": "What colour?"}])
    rc, out, err = run_main(argv, capsys)
    assert rc == 0 and "4 already answered" in err
    again = read_answers(answers)
    assert again[:4] == got and [a["question_id"] for a in again[4:]] == ["q5"]


def test_batch_interrupted_loses_nothing_already_answered(ckpt, images, tmp_path, capsys, monkeypatch):
    folder = os.path.dirname(images[0])
    qs = [{"question_id": i, "image": "a.png", "text": f"Question number {i}?"} for i in range(5)]
    questions, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    write_lines(questions, qs)
    argv = ["--model", ckpt, "--questions", str(questions), "--answers", str(answers), "--image-folder", folder,
            "--temperature", "0", "--max-new-tokens", "6", "--batch-size", "2"]
    real, calls = generation.request_for, []

    def interrupted_at_the_third_question(*args, **kwargs):  # 2 slots: read when the first two have ended
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(generation, "request_for", interrupted_at_the_third_question)
    rc, out, err = run_main(argv, capsys)  # Ctrl-C: no traceback, says where the answers are
    assert rc == 130 and f"interrupted; the answers so far are in {answers}: run the same command" in err
    assert [a["question_id"] for a in read_answers(answers)] == [0, 1]
    # A process killed in the middle of a write leaves a partial line: the next run drops it and goes on.
    with open(answers, "a") as f:
        f.write('{"question_id": 2, "pro')
    monkeypatch.setattr(generation, "request_for", real)
    rc, out, err = run_main(argv, capsys)
    assert rc == 0 and "dropping an incomplete last line" in err
    assert [a["question_id"] for a in read_answers(answers)] == [0, 1, 2, 3, 4]


def test_the_original_scripts_flag_names(ckpt, images, tmp_path, capsys):
    """model_vqa.py's command line (--model-path, --question-file, --answers-file, --conv-mode, --num-chunks /
    --chunk-idx, --temperature 0, --max_new_tokens) answers as minillava's own flags do, chunk by chunk."""
    folder = os.path.dirname(images[0])
    qs = [{"question_id": i, "image": "a.png", "text": f"Question number {i}?"} for i in range(5)]
    questions = tmp_path / "q.jsonl"
    write_lines(questions, qs)
    ours = ["--model", ckpt, "--questions", str(questions), "--answers", str(tmp_path / "ours.jsonl"),
            "--image-folder", folder, "--template", "vicuna_v1", "--temperature", "0", "--max-new-tokens", "6"]
    assert run_main(ours, capsys)[0] == 0
    want = read_answers(tmp_path / "ours.jsonl")
    got = []
    for k in range(2):  # ceil(5 / 2) = 3 questions in chunk 0, 2 in chunk 1, as the original's get_chunk
        path = tmp_path / f"chunk{k}.jsonl"
        original = ["--model-path", ckpt, "--question-file", str(questions), "--answers-file", str(path),
                    "--image-folder", folder, "--conv-mode", "vicuna_v1", "--num-chunks", "2", "--chunk-idx",
                    str(k), "--temperature", "0", "--max_new_tokens", "6", "--num_beams", "1"]
        assert run_main(original, capsys)[0] == 0
        got.append(read_answers(path))
    assert [len(c) for c in got] == [3, 2]
    assert [(a["question_id"], a["text"]) for a in got[0] + got[1]] == [(a["question_id"], a["text"]) for a in want]
    with pytest.raises(SystemExit):
        G.parse_args(["--model-path", ckpt, "--prompt", "x", "--num_beams", "3"])
    assert "only 1 (no beam search)" in capsys.readouterr().err


def test_batch_missing_questions_file_writes_nothing(ckpt, tmp_path, capsys):
    answers = tmp_path / "a.jsonl"
    rc, out, err = run_main(["--model", ckpt, "--questions", str(tmp_path / "nope.jsonl"), "--answers",
                             str(answers)], capsys)
    assert rc == 1 and "questions file not found" in err and "nope.jsonl" in err and not answers.exists()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_image_and_pad_tokens_are_never_sampled(loaded, images, monkeypatch, temperature):
    """Even when the model puts nearly all its mass on them (here: their logits raised by 1e4), generation
    emits neither the image token nor the pad token: fed back, an image id without an image is an error."""
    model, tok = loaded
    head = model.language_model.lm_head
    banned = torch.tensor([CFG.image_token_id, CFG.pad_token_id])
    real = head.forward
    monkeypatch.setattr(head, "forward", lambda h: real(h).index_fill(-1, banned, 1e4))
    ids = ask_ids(model, tok, "What is the man holding?", 1)
    pixels = generation.load_pixels(images[0], model.config)[0]
    out = Engine(model, slots=2).run([Request(ids, pixels, max_new_tokens=6, temperature=temperature, seed=0)])
    assert len(out[0].out) == 6 and not set(out[0].out) & set(banned.tolist())


# --- what a user of the original types, and the mistakes of a first hour ----------------------------------------
def test_an_image_url_is_downloaded_with_a_size_cap(ckpt, loaded, images, monkeypatch, capsys):
    """--image https://... (the original's cli.py takes URLs): fetched with the standard library from a server on
    this machine; a missing file and a file over the cap are one-line errors naming the URL."""
    import functools
    import http.server
    import threading
    model, tok = loaded
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.path.dirname(images[1]))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        want = generation.answer(model, tok, [(images[1], "What is it?")], **GREEDY)[0]
        flags = ["--model", ckpt, "--prompt", "What is it?", "--temperature", "0", "--max-new-tokens", "10"]
        rc, out, err = run_main(flags + ["--image", f"{base}/b.gif"], capsys)
        assert rc == 0 and out.strip() == want
        rc, out, err = run_main(flags + ["--image", f"{base}/nothing.png"], capsys)
        assert rc == 1 and f"error: --image {base}/nothing.png: cannot download it (" in err and "Traceback" not in err
        monkeypatch.setattr(G, "MAX_DOWNLOAD_MB", os.path.getsize(images[1]) / 2**20 / 2)
        rc, out, err = run_main(flags + ["--image", f"{base}/b.gif"], capsys)
        assert rc == 1 and "MB; download it and give the file" in err
    finally:
        server.shutdown()


def test_model_and_image_alone_start_a_chat(ckpt, loaded, images, monkeypatch, capsys):
    """`--model-path X --image-file Y` and nothing else: a chat, as the original's llava.serve.cli."""
    model, tok = loaded
    want = generation.Chat(model, tok, images[0], **GREEDY).ask("What is it?")
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\n\n"))
    assert G.main(["--model-path", ckpt, "--image-file", images[0], "--temperature", "0",
                   "--max-new-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert [line.split("ASSISTANT: ", 1)[1].strip() for line in out.splitlines() if "ASSISTANT: " in line] == [want]


def test_load_bits_device_and_conv_mode_flags(ckpt, images, capsys):
    flags = ["--model", ckpt, "--image", images[0], "--prompt", "Hi?", "--temperature", "0", "--max-new-tokens", "3"]
    rc, out, err = run_main(flags + ["--load-8bit"], capsys)
    assert rc == 0 and "LLM linear layers int8" in err
    rc, out, err = run_main(flags + ["--conv-mode", "llava_llama_2"], capsys)
    assert rc == 0
    if not torch.cuda.is_available():
        rc, out, err = run_main(flags + ["--device", "cuda"], capsys)
        assert rc == 1 and err.strip().splitlines()[-1].startswith("error: --device cuda: this machine has no CUDA GPU")
        assert "Traceback" not in err


def test_batch_with_a_wrong_image_folder_is_one_message(ckpt, images, tmp_path, capsys):
    qs = [{"question_id": i, "image": "a.png", "text": f"Question {i}?"} for i in range(30)]
    questions = tmp_path / "q.jsonl"
    write_lines(questions, qs + ["{not json"])
    argv = ["--model", ckpt, "--questions", str(questions), "--answers", str(tmp_path / "a.jsonl"),
            "--image-folder", str(tmp_path / "elsewhere"), "--temperature", "0", "--max-new-tokens", "3"]
    rc, out, err = run_main(argv, capsys)
    assert rc == 1 and len(err.splitlines()) < 10
    assert "30 questions, 0 already answered" in err and "1 malformed line(s); 30 question(s) whose image" in err
    assert "error: no image found for 30 of 30 questions with an image under --image-folder" in err
    assert "check --image-folder" in err
    # most images there, some not: each missing one is named, the list capped on the screen and whole in a file
    qs += [{"question_id": 100 + i, "image": f"gone{i}.png", "text": "Where?"} for i in range(25)]
    write_lines(questions, qs)
    argv[argv.index("--image-folder") + 1] = os.path.dirname(images[0])
    rc, out, err = run_main(argv, capsys)
    assert rc == 1 and "25 question(s) whose image or prompt does not work" in err
    assert err.count("image file not found") == 20 and f"... and 5 more (all in {tmp_path / 'a.jsonl'}.errors)" in err
    assert len((tmp_path / "a.jsonl.errors").read_text().splitlines()) == 25
    assert len(read_answers(tmp_path / "a.jsonl")) == 30


def test_batch_counts_only_absent_images_toward_a_wrong_image_folder(ckpt, images, tmp_path, capsys):
    """An image that is there but unreadable (empty, not an image) is its question's problem, not the folder's: each
    is named, and only the file that is not there counts toward a wrong --image-folder; by what the error is, not by
    its text (one unreadable file here has the missing-file message in its name)."""
    Image.open(images[0]).save(tmp_path / "a.png")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("notes.png", "image file not found.png"):
        (tmp_path / name).write_bytes(b"not an image")
    names = ["a.png", "empty.png", "notes.png", "image file not found.png", "missing.png"]
    questions, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    write_lines(questions, [{"question_id": i, "image": name, "text": "What?"} for i, name in enumerate(names)])
    rc, out, err = run_main(["--model", ckpt, "--questions", str(questions), "--answers", str(answers),
                             "--image-folder", str(tmp_path), "--temperature", "0", "--max-new-tokens", "3"], capsys)
    assert rc == 1 and "no image found" not in err and "check --image-folder" not in err
    assert "4 question(s) whose image or prompt does not work" in err and "error: 4 question(s) not answered" in err
    assert err.count("cannot decode image") == 2 and "image file is empty" in err and "image file not found" in err
    assert [a["question_id"] for a in read_answers(answers)] == [0]
