"""eval.py's scorers (minillava/eval_scores.py) on small files in the official formats, with the original scripts' edge cases; answering
on a tiny model: the official protocol, batch-size invariance, resume; bad input named by file and line.
tests/test_original_llava.py runs the original eval_pope / eval_science_qa / eval_textvqa on the same files."""
import json
import os
import subprocess
import sys

import pytest

from minillava import eval as E
from minillava.eval_files import BENCHMARKS, SQA_SUFFIX, EvalError, benchmark, questions_for_generate
from minillava.eval_scores import (evalai_normalize, lmms_eval_yes_no, mmbench_letter, mme_yes_no, pope_yes_no,
                                   sqa_letter, textvqa_question, vqa_soft_scores)

# ----------------------------------------------------------------------------------------------------------
# Small benchmark folders in eval.zip's layout


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def answers_file(path, pairs):
    """[(question dict as generate.py reads it, answer text)] -> an answers file in the original's format."""
    write_jsonl(path, [{"question_id": q["question_id"], "prompt": q.get("prompt", q["text"]), "text": t,
                        "answer_id": str(i), "model_id": "m", "metadata": {}} for i, (q, t) in enumerate(pairs)])
    return str(path)


POPE_ANSWERS = {  # (category, label) -> answers; each is "yes" or "no" as eval_pope.py reads it
    "adversarial": [("yes", "Yes, there is a dog."), ("yes", "No, there is not."), ("no", "There is no dog."),
                    ("no", "Yes."), ("yes", "I see a cat. It is not a dog.")],  # only the first sentence counts
    "popular": [("yes", "yes"), ("no", "Not sure, no."), ("no", "Nope"), ("yes", "Yes,no")],  # "Nope": yes
    "random": [("yes", "Yes"), ("no", "no")],
}


@pytest.fixture
def pope(tmp_path):
    questions, pairs = [], []
    for cat, rows in POPE_ANSWERS.items():
        write_jsonl(tmp_path / "coco" / f"coco_pope_{cat}.json", [{"label": label} for label, _ in rows])
        for label, text in rows:
            q = {"question_id": len(questions), "image": "x.jpg", "category": cat,
                 "text": "Is there a dog in the image?"}
            questions.append(q)
            pairs.append((q, text))
    write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    return tmp_path, pairs


def test_pope_reads_answers_as_eval_pope(pope):
    assert [pope_yes_no(t) for t in ["No, there is not", "Yes, no doubt", "Nope", "I cannot say.", "nothing",
                                     "Yes. No.", "no."]] == ["no", "no", "yes", "yes", "yes", "yes", "no"]
    data, pairs = pope
    r = E.score("pope", str(data), answers_file(data / "a.jsonl", pairs))
    m = r["metrics"]
    # adversarial: preds yes, no, no, yes, yes vs labels yes, yes, no, no, yes -> TP 2, FN 1, TN 1, FP 1
    assert m["adversarial"] == {"accuracy": 60.0, "precision": 200 / 3, "recall": 200 / 3, "f1": 200 / 3,
                                "yes_ratio": 60.0, "n": 5}
    # popular: preds yes, no, yes ("Nope" is not "no"), yes ("Yes,no" -> "Yesno") vs yes, no, no, yes:
    # TP 2, TN 1, FP 1 -> precision 2/3, recall 1, F1 0.8
    assert m["popular"]["accuracy"] == 75.0 and m["popular"]["f1"] == pytest.approx(80.0)
    assert m["popular"]["yes_ratio"] == 75.0 and m["random"]["f1"] == 100.0
    assert m["f1"] == m["headline"] == pytest.approx((200 / 3 + 80 + 100) / 3)
    assert r["unanswered"] == 0


def test_score_takes_eval_pope_py_flags(pope, tmp_path, capsys, monkeypatch):
    """eval_pope.py's command line (--annotation-dir .../pope/coco --question-file PATH --result-file PATH) scores
    as --data does; an --annotation-dir that is not POPE's layout says what to give instead."""
    data, pairs = pope
    answers = answers_file(data / "a.jsonl", pairs)
    assert E.main(["score", "pope", "--data", str(data), "--answers", answers]) == 0
    ours = capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert E.main(["score", "pope", "--annotation-dir", os.path.relpath(data / "coco"), "--question-file",
                   os.path.relpath(data / "llava_pope_test.jsonl"), "--result-file", answers]) == 0
    assert capsys.readouterr().out == ours and ours.startswith("pope: f1 ")
    with pytest.raises(SystemExit):
        E.main(["score", "pope", "--annotation-dir", str(tmp_path), "--result-file", answers])
    assert "POPE's folder of coco_pope_*.json, named coco/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        E.main(["score", "pope", "--result-file", answers])
    assert "--data is required" in capsys.readouterr().err


def test_an_unanswered_question_is_wrong_and_counted(pope):
    data, pairs = pope
    r = E.score("pope", str(data), answers_file(data / "a.jsonl", pairs[:-1]))  # random's "no" question missing
    assert r["unanswered"] == 1 and r["metrics"]["random"]["accuracy"] == 50.0


def test_bad_answers_are_named(pope, tmp_path):
    data, pairs = pope
    path = answers_file(data / "a.jsonl", pairs)
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(EvalError, match=r"a.jsonl:12: not JSON"):
        E.score("pope", str(data), path)
    other = answers_file(data / "b.jsonl", [({"question_id": "20968379", "text": "Is it red?"}, "yes")])
    with pytest.raises(EvalError, match=r"1 answer\(s\) to questions pope does not have \(first: '20968379' on "
                                        r"line 1\); is it the answers file of another benchmark"):
        E.score("pope", str(data), other)
    (data / "coco" / "coco_pope_random.json").unlink()
    assert E.main(["score", "pope", "--data", str(data), "--answers", path]) == 1


def test_missing_files_are_named_with_where_they_come_from(tmp_path, capsys):
    assert E.main(["score", "gqa", "--data", str(tmp_path), "--answers", str(tmp_path / "a.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"missing {tmp_path}/llava_gqa_testdev_balanced.jsonl, {tmp_path}/data/testdev_balanced_questions.json" \
           in err and "from eval.zip (gqa/)" in err


# ----------------------------------------------------------------------------------------------------------
# ScienceQA


def test_sqa_letters_as_eval_science_qa():
    cases = {"B": "B", "B.": "FAILED", "B. Because": "B", "The answer is C.": "C", "The answer is C!": "C",
             "The answer is C": "FAILED", "The answer is A. The answer is B.": "FAILED", "F": "FAILED",
             "b": "FAILED", "FAILED": "FAILED", "The answer is F.": "F",
             # its options are a list: `"" in options` is False (a substring test on "ABCDE" would say True)
             "": "FAILED", "AB": "FAILED", "CDE": "FAILED", "ABCDE": "FAILED", "A ": "FAILED"}
    assert {t: sqa_letter(t) for t in cases} == cases


def test_sqa_empty_answer_and_letter_runs_are_wrong(tmp_path):
    """Issue 30: eval_science_qa.py tests `pred_text in args.options` on the list ["A", ..., "E"], so an empty
    answer or "AB" is FAILED (wrong), not the letter at index "ABCDE".index(text) of a substring test."""
    problems = {"1": {"choices": ["a", "b"], "answer": 0}, "2": {"choices": ["a", "b", "c"], "answer": 0},
                "3": {"choices": ["a", "b", "c", "d"], "answer": 2}, "4": {"choices": ["a", "b"], "answer": 0}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(problems), "val": []}))
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps([
        {"id": pid, "image": "i.png", "conversations": [{"from": "human", "value": f"<image>\nQ{pid}?"},
                                                        {"from": "gpt", "value": "A"}]} for pid in problems]))
    qs = questions_for_generate(BENCHMARKS["sqa"], str(tmp_path))
    # "" (answer A), "AB" (answer A), "CD" (answer C): FAILED, wrong; "A": right. 1 of 4 (the substring test: 4)
    path = answers_file(tmp_path / "a.jsonl", list(zip(qs, ["", "AB", "CD", "A"])))
    r = E.score("sqa", str(tmp_path), path)
    assert r["metrics"]["accuracy"] == 25.0 and r["metrics"]["img_accuracy"] == 25.0 and r["unanswered"] == 0


def test_sqa_scores_img_accuracy(tmp_path):
    problems = {"1": {"choices": ["a", "b"], "answer": 1}, "2": {"choices": ["a", "b", "c"], "answer": 0},
                "3": {"choices": ["a", "b"], "answer": 0}, "4": {"choices": ["x", "y"], "answer": 1},
                "5": {"choices": ["x", "y"], "answer": 0}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "5"], "val": []}))
    records = [{"id": pid, "conversations": [{"from": "human", "value": f"<image>\nQuestion {pid}?\nOptions: ..."},
                                             {"from": "gpt", "value": "x"}]} for pid in problems]
    for r in records:
        if r["id"] != "3":
            r["image"] = "i.png"
    for r in records:
        if "image" not in r:
            r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>\n", "")
    (tmp_path / "llava_test_CQM-A.json").write_text(json.dumps(records))
    qs = questions_for_generate(BENCHMARKS["sqa"], str(tmp_path))
    assert qs[0]["text"] == "<image>\nQuestion 1?\nOptions: ...\n" + SQA_SUFFIX and qs[0]["image"] == "i.png"
    assert qs[2]["text"] == "Question 3?\nOptions: ...\n" + SQA_SUFFIX and "image" not in qs[2]
    # 1 right (B), 2 right (A), 3 (text) right, 4 wrong (C: past its 2 choices), 5 unanswered: FAILED, and counted
    # as a text question, as the original does (its prompt is "Unknown")
    path = answers_file(tmp_path / "a.jsonl", [(qs[0], "B"), (qs[1], "The answer is A."), (qs[2], "A"),
                                                (qs[3], "C")])
    r = E.score("sqa", str(tmp_path), path)
    assert r["metrics"]["accuracy"] == 60.0 and r["metrics"]["img_accuracy"] == pytest.approx(200 / 3)
    assert r["metrics"]["n_img"] == 3 and r["unanswered"] == 1 and r["metrics"]["headline"] == r["metrics"][
        "img_accuracy"]


# ----------------------------------------------------------------------------------------------------------
# EvalAI normalisation and TextVQA


@pytest.mark.parametrize("raw, normalized", [
    ("The Cat.", "cat"), ("two dogs", "2 dogs"), ("3.", "3"), ("3.5", "3.5"), ("dont", "don't"),
    ("a man's hat", "man 's hat"), ("yes!", "yes"), ("1,000", "1000"), ("left-hand", "left hand"),
    ("left - right", "left right"), ("none", "0"), ("an apple", "apple"), ("Hello,  World?", "hello world"),
    ("e.g. this", "eg this"), ("." * 40, "." * 8), ("somebody'd", "somebodyd"), ("(a) b", "b"),
])
def test_evalai_normalization(raw, normalized):
    assert evalai_normalize(raw) == normalized


def test_vqa_soft_accuracy():
    s = vqa_soft_scores(["two"] * 3 + ["2"] + ["three"] * 2 + ["four"] + ["five"] * 3)
    assert s["2"] == 1.0  # 4 annotators: at least 3 others agree with it in every leave-one-out
    assert s["3"] == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert s["4"] == pytest.approx(9 * (1 / 3) / 10)
    assert s["5"] == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)


def test_textvqa_prompt_shapes():
    assert textvqa_question("What is it?\nReference OCR token: a, b\nAnswer the question using a single word "
                            "or phrase.") == "what is it?"
    assert textvqa_question("Reference OCR token: a\nWhat Is It?\nAnswer.") == "what is it?"
    assert textvqa_question("OCR tokens: x y Question: Who? Short answer:") == "who?"
    assert textvqa_question("What?\nAnswer briefly.") == "what?"
    with pytest.raises(EvalError, match="three shapes"):
        textvqa_question("one line")


def test_textvqa_scores_by_image_and_question(tmp_path):
    ann = [{"image_id": "img1", "question": "What brand?", "answers": ["nikon"] * 10},
           {"image_id": "img1", "question": "What year?", "answers": ["1999"] * 2 + ["2000"] * 8},
           {"image_id": "img2", "question": "What word?", "answers": ["stop"] * 10}]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": ann}))
    suffix = "\nReference OCR token: x\nAnswer the question using a single word or phrase."
    qs = [{"question_id": "img1", "image": "img1.jpg", "text": "What brand?" + suffix},
          {"question_id": "img1", "image": "img1.jpg", "text": "What year?" + suffix},  # the same question_id
          {"question_id": "img2", "image": "img2.jpg", "text": "What word?" + suffix}]
    write_jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", qs)
    path = answers_file(tmp_path / "a.jsonl", [(qs[0], "Nikon."), (qs[1], "1999"), (qs[2], "go")])
    r = E.score("textvqa", str(tmp_path), path)
    assert r["metrics"]["accuracy"] == pytest.approx(100 * (1 + 0.6) / 3)  # 1999: min(1, 2/3) x8 + 1/3 x2 = 0.6
    assert r["metrics"]["headline"] == r["metrics"]["accuracy"]


# ----------------------------------------------------------------------------------------------------------
# GQA and MME


def test_gqa(tmp_path):
    gold = {"q1": {"answer": "yes", "types": {"structural": "verify"}, "isBalanced": True},
            "q2": {"answer": "red", "types": {"structural": "query"}, "isBalanced": True},
            "q3": {"answer": "left", "types": {"structural": "choose"}, "isBalanced": True},
            "q4": {"answer": "cat", "types": {"structural": "query"}, "isBalanced": True}}
    os.makedirs(tmp_path / "data")
    (tmp_path / "data" / "testdev_balanced_questions.json").write_text(json.dumps(gold))
    qs = [{"question_id": q, "image": f"{q}.jpg", "text": f"{q}?\nAnswer the question using a single word or "
                                                           "phrase."} for q in gold]
    write_jsonl(tmp_path / "llava_gqa_testdev_balanced.jsonl", qs)
    path = answers_file(tmp_path / "a.jsonl", [(qs[0], "Yes."), (qs[1], "Red.."), (qs[2], "the left")])
    m = E.score("gqa", str(tmp_path), path)["metrics"]  # rstrip(".").lower() only: "the left" is wrong
    assert (m["accuracy"], m["binary"], m["open"]) == (50.0, 50.0, 50.0)


def test_mme(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    for task, rows in {"existence": [("001.jpg", "Is there a dog? Please answer yes or no.", "Yes"),
                                     ("001.jpg", "Is there a cat? Please answer yes or no.", "No"),
                                     ("002.jpg", "Is there a car?  Please answer yes or no.", "Yes"),  # 2 spaces
                                     ("002.jpg", "Is there a bus?  Please answer yes or no.", "No")],
                       "code_reasoning": [("003.png", "Is the output 3? Please answer yes or no.", "Yes"),
                                          ("003.png", "Is the output 4? Please answer yes or no.", "No")]}.items():
        folder = root / task / ("questions_answers_YN" if task == "existence" else "")
        os.makedirs(folder, exist_ok=True)
        for img, q, a in rows:
            with open(folder / img.replace(".jpg", ".txt").replace(".png", ".txt"), "a") as f:
                f.write(f"{q}\t{a}\n")
    short = " Answer the question using a single word or phrase."
    qs = [{"question_id": "existence/001.jpg", "text": "Is there a dog?" + short, "image": "x"},
          {"question_id": "existence/001.jpg", "text": "Is there a cat?" + short, "image": "x"},
          {"question_id": "existence/002.jpg", "text": "Is there a car?" + short, "image": "x"},
          {"question_id": "existence/002.jpg", "text": "Is there a bus?" + short, "image": "x"},
          {"question_id": "code_reasoning/003.png", "text": "Is the output 3? Please answer yes or no.", "image": "x"},
          {"question_id": "code_reasoning/003.png", "text": "Is the output 4? Please answer yes or no.", "image": "x"}]
    write_jsonl(tmp_path / "llava_mme.jsonl", qs)
    path = answers_file(tmp_path / "a.jsonl", [(qs[0], "Yes"), (qs[1], "No, it is not."), (qs[2], "yes"),
                                                (qs[3], "Sure"), (qs[4], "Yes"), (qs[5], "Not at all")])
    assert [mme_yes_no(t) for t in ["Yes", "No, it is not.", "Sure", "Not at all", "I say yes"]] == \
        ["yes", "no", "other", "no", "other"]
    m = E.score("mme", str(tmp_path), path)["metrics"]
    assert m["existence"] == {"accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0}
    assert m["code_reasoning"]["score"] == 200.0
    assert (m["perception"], m["cognition"], m["headline"]) == (125.0, 200.0, 125.0)


def test_score_imports_no_torch(pope):
    """`score` is light: it runs without importing torch (or the model)."""
    data, pairs = pope
    path = answers_file(data / "a.jsonl", pairs)
    code = (f"import sys, eval; rc = eval.main(['score', 'pope', '--data', {str(data)!r}, '--answers', {path!r}]); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pope: f1 ")


# ----------------------------------------------------------------------------------------------------------
# Answering on a tiny model (the official protocol through generate.py's batch mode)

@pytest.fixture(scope="module")
def tiny_pope(tmp_path_factory):
    """A random layout-A checkpoint and a POPE folder of 7 questions about 3 images (prompts of different
    lengths)."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from minillava.config import get_preset
    from tests.spm_util import train_tiny_spm
    from minillava.weights import write_random_checkpoint
    root = tmp_path_factory.mktemp("eval")
    t = get_preset("tiny")
    cfg = t.replace(text=dataclasses.replace(t.text, vocab_size=832), image_token_id=768, pad_token_id=769)
    ckpt = write_random_checkpoint(root / "ckpt", cfg, "A", seed=1, tokenizer=train_tiny_spm(root / "spm"))["model"]
    data = root / "pope"
    os.makedirs(data / "val2014")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20 + 7 * i, 30, 3), dtype=np.uint8)).save(data / "val2014" / f"{i}.jpg")
    questions, k = [], 0
    for cat, n in (("adversarial", 3), ("popular", 2), ("random", 2)):
        write_jsonl(data / "coco" / f"coco_pope_{cat}.json", [{"label": "yes" if j % 2 else "no"} for j in range(n)])
        for j in range(n):
            questions.append({"question_id": k, "image": f"{k % 3}.jpg", "category": cat,
                              "text": "Is there a dog" + " in the picture" * j + "?"})
            k += 1
    write_jsonl(data / "llava_pope_test.jsonl", questions)
    return str(ckpt), data


def run_eval(args, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, *launcher, "eval.py", *args], cwd=root, capture_output=True, text=True,
                          env=env, timeout=300)


def test_run_answers_with_the_protocol_and_scores(tiny_pope, tmp_path):
    ckpt, data = tiny_pope
    out = run_eval(["run", "pope", "--model", ckpt, "--data", str(data), "--out", str(tmp_path / "b1"),
                    "--batch-size", "1", "--threads", "1"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pope: f1 ") and "(LLaVA-1.5 paper: 7B 85.9, 13B 85.9)" in out.stdout
    metrics = json.load(open(tmp_path / "b1" / "metrics.json"))
    assert metrics["benchmark"] == "pope" and metrics["metrics"]["headline"] == metrics["metrics"]["f1"]
    lines = [json.loads(line) for line in open(tmp_path / "b1" / "answers.jsonl")]
    questions = [json.loads(line) for line in open(data / "llava_pope_test.jsonl")]
    assert [(a["question_id"], a["prompt"]) for a in lines] == [(q["question_id"], q["text"]) for q in questions]
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    # greedy answers do not depend on the batch size (fp32, CPU, prompts of different lengths) ...
    out = run_eval(["answer", "pope", "--model", ckpt, "--data", str(data), "--answers", str(tmp_path / "b4.jsonl"),
                    "--batch-size", "4", "--threads", "1"])
    assert out.returncode == 0, out.stderr
    by_key = lambda answers: sorted((a["question_id"], a["prompt"], a["text"]) for a in answers)  # finish order
    assert by_key(map(json.loads, open(tmp_path / "b4.jsonl"))) == by_key(lines)
    # ... nor on the number of processes: torchrun shards the questions and rank 0 merges in question order
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    out = run_eval(["answer", "pope", "--model", ckpt, "--data", str(data), "--answers", str(tmp_path / "t2.jsonl"),
                    "--threads", "1"], launcher=torchrun)
    assert out.returncode == 0, out.stderr
    merged = [json.loads(line) for line in open(tmp_path / "t2.jsonl")]
    assert [(a["question_id"], a["text"]) for a in merged] == [(a["question_id"], a["text"]) for a in lines]


def test_answer_checks_files_before_loading_a_model(tiny_pope, tmp_path, capsys):
    _, data = tiny_pope
    assert E.main(["answer", "pope", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path),
                   "--answers", str(tmp_path / "a.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "llava_pope_test.jsonl" in err and "no-model" not in err


def test_vqav2_and_vizwiz_submissions(tmp_path):
    vq = tmp_path / "vqav2"
    test = [{"question_id": i, "image": f"{i}.jpg", "text": f"Q{i}?"} for i in range(5)]
    write_jsonl(vq / "llava_vqav2_mscoco_test2015.jsonl", test)
    write_jsonl(vq / "llava_vqav2_mscoco_test-dev2015.jsonl", [test[3], test[1], test[4]])
    path = answers_file(vq / "a.jsonl", [(test[3], "Two dogs."), (test[1], "The Yes")])  # test[4] unanswered
    r = E.score("vqav2", str(vq), path, str(vq / "up" / "submission.json"))
    assert r["metrics"] == {"answered": 2, "questions": 3, "submission": str(vq / "up" / "submission.json"),
                            "headline": None} and r["unanswered"] == 1
    assert json.load(open(vq / "up" / "submission.json")) == [  # every test2015 question, in its file's order
        {"question_id": 0, "answer": ""}, {"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": ""},
        {"question_id": 3, "answer": "2 dogs"}, {"question_id": 4, "answer": ""}]
    with pytest.raises(EvalError, match="--output-submission"):
        E.score("vqav2", str(vq), path)
    vw = tmp_path / "vizwiz"
    qs = [{"question_id": i, "image": f"VizWiz_test_{i}.jpg", "text": f"Q{i}?"} for i in range(2)]
    write_jsonl(vw / "llava_test.jsonl", qs)
    path = answers_file(vw / "a.jsonl", [(qs[0], "A can of soup.")])
    with pytest.raises(EvalError, match="1 question\\(s\\) have no answer"):
        E.score("vizwiz", str(vw), path, str(vw / "s.json"))
    path = answers_file(vw / "a.jsonl", [(qs[0], "A can of soup."), (qs[1], "unanswerable")])
    E.score("vizwiz", str(vw), path, str(vw / "s.json"))
    assert json.load(open(vw / "s.json")) == [{"image": "VizWiz_test_0.jpg", "answer": "can of soup"},
                                             {"image": "VizWiz_test_1.jpg", "answer": "unanswerable"}]


# ----------------------------------------------------------------------------------------------------------
# MMBench: a TSV with the images inside, circular evaluation, the .xlsx its server takes

def png_base64(seed, size=(24, 20)):
    import base64
    import io

    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]


def write_mmbench(folder, rows, name="mmbench_dev_20230712.tsv"):
    """rows: dicts of MMB_COLUMNS (missing ones empty, as pandas writes NaN)."""
    import csv
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(MMB_COLUMNS)
        for i, r in enumerate(rows):
            w.writerow([r.get(c, png_base64(i) if c == "image" else "") for c in MMB_COLUMNS])
    return str(folder)


MMB_ROWS = [  # question 7 and its circular copy (the options rotated by one, as MMBench's TSV holds them)
    {"index": "7", "question": "What is it?", "hint": "nan", "A": "cat", "B": "dog", "C": "bird", "D": "fish",
     "answer": "B", "category": "animals", "split": "dev"},
    {"index": "1000007", "question": "What is it?", "hint": "nan", "A": "dog", "B": "bird", "C": "fish",
     "D": "cat", "answer": "A", "category": "animals", "split": "dev"},
    {"index": "8", "question": "Which colour?", "hint": "Look at the car.", "A": "red", "B": "None",
     "C": "blue", "answer": "A", "category": "colours", "split": "dev"},  # "None" ends the options (pandas: NaN)
]


def test_mmbench_prompts_as_model_vqa_mmbench(tmp_path):
    data = write_mmbench(tmp_path, MMB_ROWS)
    qs = questions_for_generate(BENCHMARKS["mmbench"], data)
    assert [q["text"] for q in qs] == [
        "What is it?\nA. cat\nB. dog\nC. bird\nD. fish\n" + SQA_SUFFIX,
        "What is it?\nA. dog\nB. bird\nC. fish\nD. cat\n" + SQA_SUFFIX,
        "Look at the car.\nWhich colour?\nA. red\n" + SQA_SUFFIX]
    assert [q["question_id"] for q in qs] == [7, 1000007, 8] and qs[0]["image"] == "7"
    rounds = questions_for_generate(BENCHMARKS["mmbench"], data, all_rounds=True)
    assert len(rounds) == 4 + 4 + 1
    assert rounds[1]["text"] == qs[1]["text"] and rounds[1]["option_char"] == ["B", "C", "D", "A"]
    cn = write_mmbench(tmp_path / "cn", MMB_ROWS[:1], "mmbench_dev_cn_20231003.tsv")
    assert questions_for_generate(BENCHMARKS["mmbench_cn"], cn)[0]["text"].endswith("\n请直接回答选项字母。")


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B.", "B"), ("(C) bird", "C"), ("The answer is C.", "C"), ("D: fish", "D"),
    ("A or B", None),                 # two letters, and no option's text: unmatched
    ("A cat sits there", "A"),        # "A" in 4 words may be the article: the option text "cat" decides
    ("A dog or a cat, maybe", None),  # ... and two options' texts match: unmatched
    ("It is a fish", "D"), ("Z", "Z"), ("", None)])
def test_mmbench_letter_as_vlmevalkit(text, letter):
    assert mmbench_letter(text, {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}) == letter


def test_mmbench_circular_score_and_submission(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")  # an independent reader of the .xlsx (the `parity` extra)
    data = write_mmbench(tmp_path, MMB_ROWS)
    qs = questions_for_generate(BENCHMARKS["mmbench"], data)
    path = answers_file(tmp_path / "a.jsonl", [(qs[0], "B"), (qs[1], "A dog and a bird"), (qs[2], "A")])
    r = E.score("mmbench", data, path, str(tmp_path / "up.xlsx"))
    m = r["metrics"]  # 7: the copy's answer names two options' texts -> unmatched -> wrong -> 7 is wrong
    assert m["accuracy"] == pytest.approx(200 / 3) and m["circular_accuracy"] == m["headline"] == 50.0
    assert m["animals"] == {"circular_accuracy": 0.0, "n": 1} and m["colours"]["circular_accuracy"] == 100.0
    assert m["unmatched"] == 1 and m["n"] == 2 and r["unanswered"] == 0
    path = answers_file(tmp_path / "a.jsonl", [(qs[0], "B"), (qs[1], "A."), (qs[2], "B")])
    assert E.score("mmbench", data, path)["metrics"]["animals"]["circular_accuracy"] == 100.0
    sheet = openpyxl.load_workbook(tmp_path / "up.xlsx").active
    rows = [list(row) for row in sheet.iter_rows(values_only=True)]
    assert rows[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert rows[1] == [7, "What is it?", "cat", "dog", "bird", "fish", "B", "B", "dev"]
    assert rows[3] == [8, "Which colour?", "red", None, "blue", None, "A", "A", "dev"]  # "None" is NaN to pandas
    # with the options rotated (--all-rounds), scoring finds the rounds by itself; every round must be right
    rounds = questions_for_generate(BENCHMARKS["mmbench"], data, all_rounds=True)
    right = {7: "B", 1000007: "A", 8: "A"}
    pairs = [(q, "ABCD"[q["option_char"].index(right[q["question_id"]])]) for q in rounds]
    assert E.score("mmbench", data, answers_file(tmp_path / "r.jsonl", pairs))["metrics"]["lines"] == 9
    pairs[2] = (pairs[2][0], "D" if pairs[2][1] != "D" else "C")  # one wrong round of question 7
    m = E.score("mmbench", data, answers_file(tmp_path / "r.jsonl", pairs))["metrics"]
    assert m["circular_accuracy"] == 50.0 and m["accuracy"] == pytest.approx(800 / 9)


def test_mmbench_test_split_goes_to_the_server(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in MMB_ROWS]
    data = write_mmbench(tmp_path, rows, "mmbench_test_20230712.tsv")
    qs = questions_for_generate(benchmark("mmbench", "mmbench_test_20230712.tsv"), data)
    path = answers_file(tmp_path / "a.jsonl", [(q, "A") for q in qs])
    with pytest.raises(EvalError, match="scored by its server"):
        E.score("mmbench", data, path, question_file="mmbench_test_20230712.tsv")
    r = E.score("mmbench", data, path, str(tmp_path / "s.xlsx"), question_file="mmbench_test_20230712.tsv")
    assert r["metrics"]["headline"] is None and r["metrics"]["answered"] == 3


def test_mmbench_bad_tsv_is_named(tmp_path):
    data = write_mmbench(tmp_path, [dict(MMB_ROWS[0], index="seven")])
    with pytest.raises(EvalError, match=r"mmbench_dev_20230712.tsv:2: index 'seven'"):
        questions_for_generate(BENCHMARKS["mmbench"], data)
    with open(tmp_path / "mmbench_dev_20230712.tsv", "w") as f:
        f.write("index\tquestion\n1\tQ?\n")
    with pytest.raises(EvalError, match="no column\\(s\\) hint, A, B, image"):
        questions_for_generate(BENCHMARKS["mmbench"], data)


# ----------------------------------------------------------------------------------------------------------
# --protocol lmms-eval

def test_lmms_eval_protocol_scoring(pope, tmp_path):
    data, pairs = pope
    path = answers_file(data / "a.jsonl", pairs)
    r = E.score("pope", str(data), path, protocol="lmms-eval")
    m = r["metrics"]  # exact yes/no, pooled: "Yes, there is a dog." is neither, so it is wrong
    exact = [lmms_eval_yes_no(t) for _, t in pairs]
    labels = [label for rows in POPE_ANSWERS.values() for label, _ in rows]
    assert exact == ["other", "other", "other", "other", "other", "yes", "other", "other", "other", "yes", "no"]
    assert m["accuracy"] == m["pooled"]["accuracy"] == pytest.approx(300 / 11)
    # TP 2, FP 0 of 6 "yes" labels: precision 1, recall 1/3, F1 1/2 (the mean of the categories' would differ)
    assert sum(lab == "yes" for lab in labels) == 6 and m["pooled"]["precision"] == 100.0
    assert m["f1"] == m["headline"] == m["pooled"]["f1"] == pytest.approx(50.0)
    assert r["protocol"] == "lmms-eval"
    tv = tmp_path / "textvqa"
    text = "what is written?\nReference OCR token: STOP, sign\nAnswer the question using a single word or phrase."
    write_jsonl(tv / "llava_textvqa_val_v051_ocr.jsonl", [{"question_id": 1, "image": "1.jpg", "text": text}])
    q = questions_for_generate(BENCHMARKS["textvqa"], str(tv), protocol="lmms-eval")[0]
    assert q["text"] == "what is written?\nAnswer the question using a single word or phrase."
    assert textvqa_question(q["text"]) == "what is written?"


def test_run_mmbench_decodes_its_images_and_lmms_eval_does_not_pad(tiny_pope, tmp_path, monkeypatch):
    import minillava.image
    ckpt, _ = tiny_pope
    data = write_mmbench(tmp_path / "mmbench", MMB_ROWS)
    pads = []
    real = minillava.image.preprocess_image
    monkeypatch.setattr(minillava.image, "preprocess_image", lambda *a, **k: pads.append(k["pad"]) or real(*a, **k))
    for protocol, out in (("llava", tmp_path / "o1"), ("lmms-eval", tmp_path / "o2")):
        assert E.main(["run", "mmbench", "--model", ckpt, "--data", data, "--out", str(out), "--threads", "1",
                       "--batch-size", "3", "--protocol", protocol]) == 0
        lines = [json.loads(line) for line in open(out / "answers.jsonl")]
        assert [a["question_id"] for a in lines] == [7, 1000007, 8]
        assert sorted(os.listdir(out)) == ["answers.jsonl", "metrics.json", "submission.xlsx"]  # images removed
        assert json.load(open(out / "metrics.json"))["protocol"] == protocol
    assert pads == [True] * 3 + [False] * 3  # the checkpoint says pad; lmms-eval resizes MMBench unpadded


def test_run_quantizes_while_loading(tiny_pope, tmp_path, capsys):
    ckpt, data = tiny_pope
    assert E.main(["run", "pope", "--model", ckpt, "--data", str(data), "--out", str(tmp_path / "q"), "--threads",
                   "1", "--batch-size", "4", "--quantize", "int4", "--group-size", "32"]) == 0
    assert "LLM linear layers int4 (groups of 32)" in capsys.readouterr().err
    assert len(open(tmp_path / "q" / "answers.jsonl").read().splitlines()) == 7


def test_run_on_a_llava_1_6_checkpoint_with_its_template(tiny_pope, tmp_path):
    """A llava_next (Mistral) checkpoint, --template mistral_instruct: the same answers as generation.answer on that
    template (image positions from each image's size), scored."""
    import dataclasses

    from minillava import generation
    from minillava.config import get_preset
    from tests.spm_util import train_tiny_spm
    from minillava.weights import write_random_checkpoint
    _, data = tiny_pope
    t = get_preset("tiny-anyres")
    cfg = t.replace(text=dataclasses.replace(t.text, vocab_size=832, model_type="mistral"), image_token_id=768,
                    pad_token_id=769)
    ckpt = str(write_random_checkpoint(tmp_path / "next", cfg, "A", seed=1,
                                       tokenizer=train_tiny_spm(tmp_path / "spm"))["model"])
    assert E.main(["run", "pope", "--model", ckpt, "--data", str(data), "--out", str(tmp_path / "o"), "--threads", "1",
                   "--batch-size", "3", "--template", "mistral_instruct"]) == 0
    lines = {a["question_id"]: a["text"] for a in map(json.loads, open(tmp_path / "o" / "answers.jsonl"))}
    questions = [json.loads(line) for line in open(data / "llava_pope_test.jsonl")]
    model, tok = generation.load(ckpt)
    expected = generation.answer(model, tok, [(str(data / "val2014" / q["image"]), q["text"]) for q in questions],
                               template="mistral_instruct", max_new_tokens=BENCHMARKS["pope"].max_new_tokens)
    assert [lines[q["question_id"]] for q in questions] == expected
    assert "f1" in json.load(open(tmp_path / "o" / "metrics.json"))["metrics"]
