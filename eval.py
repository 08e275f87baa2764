"""Evaluate LLaVA on LLaVA-1.5's benchmarks with the official protocol and the official scoring.

    python eval.py list                                                  # benchmarks, their files, the paper's numbers
    python eval.py answer BENCH --model DIR [--vision DIR] --data DIR --answers FILE [--batch-size N]
    python eval.py score  BENCH --data DIR --answers FILE [--output metrics.json]
    python eval.py run    BENCH --model DIR [--vision DIR] --data DIR --out DIR   # answer, then score
    torchrun --nproc_per_node N eval.py answer ...                       # each rank a contiguous chunk, merged

--data is the benchmark's folder as LLaVA's eval.zip lays it out (playground/data/eval/<bench>); `list` names the
files each benchmark needs. Answering is the original's model_vqa_loader.py / model_vqa_science.py /
model_vqa_mmbench.py: vicuna_v1, greedy, pad-to-square, "<image>\\n" before the question, 128 new tokens (1024
for ScienceQA and MMBench), the answers file in their format (resumable: a killed run goes on where it stopped).
Scoring is the original's scripts, quirks included (each one moves a published number; see the scorers'
docstrings), and imports neither torch nor the model. A question without an answer counts as wrong, as in the
original; how many there were is printed. --protocol lmms-eval switches to lmms-eval's documented differences.
"""
import argparse
import base64
import csv
import dataclasses
import functools
import io
import json
import os
import re
import shutil
import sys
import zipfile
from xml.sax.saxutils import escape

from minillava.cli import DEFAULT_GROUP_SIZE, GROUP_SIZES, QUANTIZE_CHOICES, add_load_bits_flags  # no torch: `score`

# ----------------------------------------------------------------------------------------------------------
# The benchmarks


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    questions: str          # in --data: what the model answers
    images: str             # in --data: the folder the questions' "image" paths are relative to
    ground_truth: tuple     # in --data: what `score` reads
    source: str             # where the files come from
    paper: tuple            # LLaVA-1.5 7B, 13B (MODEL_ZOO.md), in the headline's unit
    headline: str           # the paper's number among the metrics
    max_new_tokens: int = 128
    submission: str = ""    # the file its server takes (`run` writes it as OUT/submission.<ext>); "" = none
    server_only: bool = False  # no ground truth here: only its server scores it


BENCHMARKS = {b.name: b for b in [
    Benchmark("pope", "llava_pope_test.jsonl", "val2014",
              ("coco/coco_pope_adversarial.json", "coco/coco_pope_popular.json", "coco/coco_pope_random.json"),
              "eval.zip (pope/); images: COCO val2014", (85.9, 85.9), "f1"),
    Benchmark("sqa", "llava_test_CQM-A.json", "images/test", ("problems.json", "pid_splits.json"),
              "eval.zip (scienceqa/); problems.json, pid_splits.json and images/test from ScienceQA",
              (66.8, 71.6), "img_accuracy", max_new_tokens=1024),
    Benchmark("textvqa", "llava_textvqa_val_v051_ocr.jsonl", "train_images", ("TextVQA_0.5.1_val.json",),
              "eval.zip (textvqa/); TextVQA_0.5.1_val.json and train_images from TextVQA 0.5.1", (58.2, 61.3),
              "accuracy"),
    Benchmark("gqa", "llava_gqa_testdev_balanced.jsonl", "data/images", ("data/testdev_balanced_questions.json",),
              "eval.zip (gqa/); data/ (questions1.2 and images) from GQA", (62.0, 63.3), "accuracy"),
    Benchmark("mme", "llava_mme.jsonl", "MME_Benchmark_release_version", ("MME_Benchmark_release_version",),
              "eval.zip (MME/); MME_Benchmark_release_version from the MME authors", (1510.7, 1531.3),
              "perception"),
    # the images are inside the TSV; dev is scored here (circular), test by MMBench's server (--output-submission)
    Benchmark("mmbench", "mmbench_dev_20230712.tsv", "", (), "eval.zip (mmbench/); the TSV from MMBench (images "
              "inside, base64); upload the .xlsx to MMBench's server", (64.3, 67.7), "circular_accuracy",
              max_new_tokens=1024, submission="xlsx"),
    Benchmark("mmbench_cn", "mmbench_dev_cn_20231003.tsv", "", (), "eval.zip (mmbench/); the TSV from MMBench "
              "(images inside, base64); upload the .xlsx to MMBench's server", (58.3, 63.6), "circular_accuracy",
              max_new_tokens=1024, submission="xlsx"),
    # scored by their servers: `score` writes the file they take (--output-submission)
    Benchmark("vqav2", "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015", ("llava_vqav2_mscoco_test2015.jsonl",),
              "eval.zip (vqav2/); test2015 images from COCO; upload to the VQAv2 EvalAI server", (78.5, 80.0),
              "server", submission="json", server_only=True),
    Benchmark("vizwiz", "llava_test.jsonl", "test", (), "eval.zip (vizwiz/); test images from VizWiz; upload to "
              "the VizWiz EvalAI server", (50.0, 53.6), "server", submission="json", server_only=True),
]}
SQA_SUFFIX = "Answer with the option's letter from the given choices directly."
LMMS_EVAL_NO_PAD = {"sqa", "mmbench", "mmbench_cn"}  # lmms-eval resizes these without padding to square
MMBENCH_SUFFIX = {"mmbench": SQA_SUFFIX, "mmbench_cn": "请直接回答选项字母。"}  # model_vqa_mmbench --lang en / cn


class EvalError(ValueError):
    """Bad benchmark files or answers; the message names the file (and line)."""


def check_files(bench: Benchmark, data: str, for_answering: bool):
    """Every file the step needs, named with where it comes from, before any model is loaded."""
    need = [bench.questions] + ([bench.images] if for_answering else list(bench.ground_truth))
    missing = [p for p in need if not os.path.exists(os.path.join(data, p))]
    if missing:
        raise EvalError(f"{bench.name}: missing {', '.join(os.path.join(data, p) for p in missing)} "
                        f"(from {bench.source})")


def read_jsonl(path) -> list:
    """[(line number, object)]; a malformed line is an error naming path:line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path}:{n}: not JSON ({e})") from None
    return out


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not JSON ({e})") from None


def questions_for_generate(bench: Benchmark, data: str, all_rounds: bool = False, protocol: str = "llava") -> list:
    """The benchmark's questions as generate.py answers them: {"question_id", "image", "text"}, "text" being
    what the answers file records as "prompt". POPE, TextVQA, GQA, MME: the question file's lines as they are
    (model_vqa_loader puts "<image>\\n" before the text). ScienceQA (model_vqa_science --single-pred-prompt): the
    first human turn without "<image>", "<image>\\n" in front when the problem has an image, the letter
    instruction after it. MMBench: see mmbench_questions. protocol "lmms-eval" drops TextVQA's OCR line."""
    path = os.path.join(data, bench.questions)
    if bench.name in MMBENCH_SUFFIX:
        return mmbench_questions(bench, path, all_rounds)
    if bench.name == "textvqa" and protocol == "lmms-eval":  # lmms-eval's textvqa_val: no OCR tokens
        return [dict(q, text="\n".join(line for line in q["text"].split("\n")
                                       if not line.startswith("Reference OCR token:"))) for _, q in read_jsonl(path)]
    if bench.name != "sqa":
        return [q for _, q in read_jsonl(path)]
    out = []
    for rec in read_json(path):
        text = rec["conversations"][0]["value"].replace("<image>", "").strip()
        q = {"question_id": rec["id"], "text": ("<image>\n" if "image" in rec else "") + text + "\n" + SQA_SUFFIX}
        if "image" in rec:
            q["image"] = rec["image"]
        out.append(q)
    return out


# MMBench's TSV as the original reads it (pandas.read_table): these strings are missing values, and
# model_vqa_mmbench's is_none adds "none" in any case; the options stop at the first missing one.
_PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
              "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def _missing(value) -> bool:
    return value is None or value in _PANDAS_NA or value.lower() in ("nan", "none")


def read_tsv(path) -> tuple[list, list]:
    """(columns, [(line number, row dict)]) of a tab-separated file with a header line, quoted as pandas does.
    Read once per version of the file (an MMBench TSV is hundreds of MB of base64 images, and a command needs
    its rows for the questions and again for the images or the submission); the rows are not to be changed."""
    st = os.stat(path)
    return _read_tsv(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _read_tsv(path, mtime_ns, size) -> tuple[list, list]:
    csv.field_size_limit(sys.maxsize)  # a row holds a whole base64 image
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = [(reader.line_num, row) for row in reader]
    columns = reader.fieldnames or []
    need = [c for c in ("index", "question", "hint", "A", "B", "image") if c not in columns]
    if need:
        raise EvalError(f"{path}: no column(s) {', '.join(need)}; is it an MMBench TSV?")
    for n, row in rows:
        if None in row or None in row.values():
            raise EvalError(f"{path}:{n}: {len(columns)} columns in the header, another number on this line")
        if not row["index"].lstrip("-").isdigit():
            raise EvalError(f"{path}:{n}: index {row['index']!r} is not an integer")
    return columns, rows


def mmbench_questions(bench: Benchmark, path: str, all_rounds: bool) -> list:
    """model_vqa_mmbench.py: the hint (when there is one) and the question on their own lines, then "A. ..." for
    each option up to the first missing one, then the letter instruction (the answer's "prompt" is the question
    without it, as the original records it, so its answers files score here); the image is the row's. With
    all_rounds, one question per option with the options rotated by one each round (the letters stay A, B, ...;
    "option_char" says which original option each letter shows). The MMBench TSVs already hold the circular
    copies as rows of their own (index + k * 1e6), so LLaVA-1.5's script does not rotate."""
    _, rows = read_tsv(path)
    out = []
    for _, row in rows:
        options = []
        for letter in "ABCD":
            if _missing(row.get(letter)):
                break
            options.append(row[letter])
        chars = list("ABCD"[:len(options)])
        for round_id in range(len(options) if all_rounds else 1):
            question = row["question"] if _missing(row["hint"]) else row["hint"] + "\n" + row["question"]
            question += "".join(f"\n{letter}. {option}" for letter, option in zip("ABCD", options))
            out.append({"question_id": int(row["index"]), "image": row["index"], "round_id": round_id,
                        "text": question + "\n" + MMBENCH_SUFFIX[bench.name], "prompt": question, "options": options,
                        "option_char": chars, "answer": row.get("answer"), "category": row.get("category")})
            options, chars = options[1:] + options[:1], chars[1:] + chars[:1]
    return out


def write_mmbench_images(path: str, folder: str):
    """Each row's base64 image, decoded, as folder/<index> (its bytes as they are: PIL reads them by content)."""
    os.makedirs(folder, exist_ok=True)
    for n, row in read_tsv(path)[1]:
        try:
            data = base64.b64decode(row["image"], validate=True)
        except ValueError as e:
            raise EvalError(f"{path}:{n}: the image of index {row['index']} is not base64 ({e})") from None
        with open(os.path.join(folder, row["index"]), "wb") as f:
            f.write(data)


def key(q) -> tuple:
    """A question's identity, as generate.py's question_key (which `score` cannot import: generate.py imports
    torch): (question_id, the prompt its answer records)."""
    return q["question_id"], q.get("prompt", q["text"])


def read_answers(bench: Benchmark, path: str, questions) -> dict:
    """{(question_id, prompt): answer dict} from an answers file; malformed lines, duplicates and answers to
    questions this benchmark does not have are errors naming path:line (an answers file of another benchmark
    is caught here)."""
    known = {key(q) for q in questions}
    answers, unknown = {}, []
    for n, a in read_jsonl(path):
        if not (isinstance(a, dict) and "question_id" in a and isinstance(a.get("text"), str)
                and isinstance(a.get("prompt"), str)):
            raise EvalError(f"{path}:{n}: not an answer line (expected question_id, prompt and text)")
        k = (a["question_id"], a["prompt"])
        if k not in known:
            unknown.append((n, k[0]))
        elif k in answers:
            raise EvalError(f"{path}:{n}: a second answer to question {k[0]!r}")
        answers[k] = a
    if unknown:
        n, qid = unknown[0]
        raise EvalError(f"{path}: {len(unknown)} answer(s) to questions {bench.name} does not have (first: "
                        f"{qid!r} on line {n}); is it the answers file of another benchmark, or of another "
                        "--protocol?")
    return answers


# ----------------------------------------------------------------------------------------------------------
# Scorers: the original scripts' arithmetic. Each takes the benchmark folder and {question_id: answer} in
# answers-file order, and returns metrics in the paper's units (percent; MME in points).

def _ratio(a, b):
    return 100.0 * a / b if b else 0.0


def pope_yes_no(text: str) -> str:
    """eval_pope.py: the text before the first ".", commas dropped, split on single spaces; "no" when a word is
    exactly "No", "no" or "not", else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def lmms_eval_yes_no(text: str) -> str:
    """lmms-eval's POPE: the lower-cased, stripped answer must be exactly "yes" or "no"; anything else is wrong."""
    text = text.lower().strip()
    return text if text in ("yes", "no") else "other"


def score_pope(data, answers, questions, protocol="llava"):
    """Per category (coco/coco_pope_<category>.json, one {"label"} per line): the category's questions, in file
    order, are paired with the labels in order (the original pairs the answers, which are in that order).
    Accuracy, precision, recall, F1 and the share of "yes"; the paper's number is the mean F1 of the three;
    "pooled" is the same over all questions at once. Protocol lmms-eval: exact yes/no, and f1 is the pooled one."""
    parse = lmms_eval_yes_no if protocol == "lmms-eval" else pope_yes_no
    metrics, n_missing, pooled = {}, 0, ([], [])
    for file in BENCHMARKS["pope"].ground_truth:
        category = os.path.basename(file)[len("coco_pope_"):-len(".json")]
        labels = ["no" if json.loads(line)["label"] == "no" else "yes"
                  for line in open(os.path.join(data, file)) if line.strip()]
        mine = [q for q in questions if q.get("category") == category]
        if len(mine) != len(labels):
            raise EvalError(f"{os.path.join(data, file)} has {len(labels)} labels for {len(mine)} {category} "
                            "questions")
        preds = []
        for q, label in zip(mine, labels):
            a = answers.get(key(q))
            n_missing += a is None
            preds.append(parse(a["text"]) if a else ("no" if label == "yes" else "yes"))  # missing: wrong
        metrics[category] = _yes_no_metrics(preds, labels)
        pooled[0].extend(preds)
        pooled[1].extend(labels)
    cats = list(metrics.values())
    metrics["pooled"] = _yes_no_metrics(*pooled)  # lmms-eval's POPE: one set of 9000 questions
    for k in ("f1", "accuracy"):
        metrics[k] = metrics["pooled"][k] if protocol == "lmms-eval" else sum(m[k] for m in cats) / len(cats)
    return metrics, n_missing


def _yes_no_metrics(preds, labels) -> dict:
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(preds, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(preds, labels))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, labels.count("yes"))
    return {"accuracy": _ratio(tp + tn, len(labels)), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if tp else 0.0,
            "yes_ratio": _ratio(preds.count("yes"), len(preds)), "n": len(preds)}


def sqa_letter(text: str) -> str:
    """eval_science_qa.py: the text itself when it is a letter A-E; its first letter when it reads "B. ...";
    else the X of exactly one "The answer is X." (the "." matches any character); else "FAILED"."""
    options = "ABCDE"
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else "FAILED"


def score_sqa(data, answers, questions):
    """Over pid_splits.json["test"]: a problem is right when the parsed letter is its answer's (letters A-E,
    an index past the choices never right). IMG-accuracy (the LLaVA-1.5 table's) counts the problems whose
    answer's prompt holds "<image>", so an unanswered problem counts as wrong and as a text problem."""
    problems = read_json(os.path.join(data, "problems.json"))
    test = read_json(os.path.join(data, "pid_splits.json"))["test"]
    answers = {qid: a for (qid, _), a in answers.items()}  # ScienceQA's ids are unique
    right = total = img_right = img_total = n_missing = 0
    for pid in test:
        a = answers.get(pid)
        n_missing += a is None
        text, prompt = (a["text"], a.get("prompt", "")) if a else ("FAILED", "Unknown")
        letter = sqa_letter(text)
        choices = problems[pid]["choices"]
        ok = letter in "ABCDE"[:len(choices)] and "ABCDE".index(letter) == problems[pid]["answer"]
        img = "<image>" in prompt
        right, total = right + ok, total + 1
        img_right, img_total = img_right + (ok and img), img_total + img
    return {"accuracy": _ratio(right, total), "img_accuracy": _ratio(img_right, img_total), "n": total,
            "n_img": img_total}, n_missing


# EvalAI's answer normalisation (TextVQA, VQAv2, VizWiz), as m4c_evaluator.EvalAIAnswerProcessor. The tables
# are the EvalAI data; "somebody'd" -> "somebodyd" is theirs too.
_CONTRACTIONS = dict(pair.split("=") for pair in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
    "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
    "howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've "
    "it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
    "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
    "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
    "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't "
    "shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've "
    "somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd "
    "someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's "
    "somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll "
    "thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's "
    "theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've "
    "twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll "
    "whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've "
    "whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll "
    "whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've "
    "wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've "
    "y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll "
    "youre=you're youve=you've").split())
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, so "3." loses its period too
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")


def evalai_normalize(text: str) -> str:
    """Lower-case; drop "," "?"; "'s" -> " 's"; punctuation removed (or made a space when no space touches it
    and no digit comma is present); at most 32 periods not followed by a digit removed (the original passes
    re.UNICODE = 32 as the count); number words to digits; articles dropped; contractions restored."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, 32)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def vqa_soft_scores(gt_answers) -> dict:
    """{normalised answer: its accuracy}: for each of the 10 annotators, min(1, matches among the other 9 / 3),
    averaged."""
    gts = [evalai_normalize(a) for a in gt_answers]
    if len(gts) != 10:
        raise EvalError(f"expected 10 annotator answers, got {len(gts)}")
    return {u: sum(min(1.0, sum(g == u for j, g in enumerate(gts) if j != i) / 3) for i in range(10)) / 10
            for u in set(gts)}


def textvqa_question(prompt: str) -> str:
    """eval_textvqa.prompt_processor: the question inside the prompt, lower-cased, for its three prompt shapes."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = m.group(1) if m else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    if question is None:
        raise EvalError(f"a TextVQA prompt of none of the original's three shapes: {prompt!r}")
    return question.lower()


def score_textvqa(data, answers, questions):
    """Each answer is matched to its annotation by (question_id = image_id, the question parsed from its
    prompt); the mean over the answers file of the soft accuracy of the normalised answer. Unanswered
    questions of the question file add 0 (the original averages over the answers file only; here they count
    as wrong, as for every benchmark, and are counted)."""
    ann = {(a["image_id"], a["question"].lower()): a
           for a in read_json(os.path.join(data, "TextVQA_0.5.1_val.json"))["data"]}
    scores = []
    for q in questions:
        a = answers.get(key(q))
        if a is None:
            scores.append(0.0)
            continue
        k = (a["question_id"], textvqa_question(a["prompt"]))
        if k not in ann:
            raise EvalError(f"TextVQA_0.5.1_val.json has no annotation for image {k[0]!r}, question {k[1]!r}")
        scores.append(vqa_soft_scores(ann[k]["answers"]).get(evalai_normalize(a["text"]), 0.0))
    return {"accuracy": _ratio(sum(scores), len(scores)), "n": len(scores)}, sum(key(q) not in answers
                                                                                for q in questions)


def score_gqa(data, answers, questions):
    """convert_gqa_for_eval.py (prediction = text.rstrip(".").lower()) + GQA's eval.py on the balanced
    testdev questions: exact match; "open" questions are those of structural type "query", the rest binary."""
    gold = read_json(os.path.join(data, "data", "testdev_balanced_questions.json"))
    answers = {qid: a for (qid, _), a in answers.items()}
    by_kind = {"open": [], "binary": []}
    n_missing = 0
    for qid, g in gold.items():
        if not g.get("isBalanced", True):
            continue
        a = answers.get(qid)
        n_missing += a is None
        ok = a is not None and a["text"].rstrip(".").lower() == g["answer"]
        by_kind["open" if g["types"]["structural"] == "query" else "binary"].append(ok)
    every = by_kind["open"] + by_kind["binary"]
    return {"accuracy": _ratio(sum(every), len(every)), "open": _ratio(sum(by_kind["open"]), len(by_kind["open"])),
            "binary": _ratio(sum(by_kind["binary"]), len(by_kind["binary"])), "n": len(every)}, n_missing


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_ground_truth(root) -> dict:
    """{(subtask, question file, question): "Yes"/"No"} from MME's per-subtask .txt files (question<TAB>answer),
    in <subtask>/ or <subtask>/questions_answers_YN/."""
    gt = {}
    for task in sorted(os.listdir(root)):
        folder = os.path.join(root, task)
        if not os.path.isdir(folder):
            continue
        qa = os.path.join(folder, "questions_answers_YN")
        qa = qa if os.path.isdir(qa) else folder
        for name in sorted(os.listdir(qa)):
            if name.endswith(".txt"):
                for n, line in enumerate(open(os.path.join(qa, name), encoding="utf-8"), 1):
                    if line.strip():
                        parts = line.rstrip("\n").split("\t")
                        if len(parts) != 2:
                            raise EvalError(f"{os.path.join(qa, name)}:{n}: expected question<TAB>answer")
                        gt[task, name, parts[0]] = parts[1]
    return gt


def mme_yes_no(text: str) -> str:
    """calculation.py: "yes"/"no" when the lower-cased text is exactly that, else by its first 4 characters."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def score_mme(data, answers, questions):
    """convert_answer_to_mme.py rebuilds each answer's ground-truth line from its prompt (the short-answer
    suffix removed, " Please answer yes or no." appended when absent, with two spaces where MME's file has
    them); calculation.py then pairs consecutive lines of a subtask (the two questions of one image): per
    subtask accuracy + accuracy+ (both right), each in percent; perception and cognition are their sums."""
    gt = mme_ground_truth(os.path.join(data, "MME_Benchmark_release_version"))
    per_task, n_missing = {}, 0
    for q in questions:
        task = q["question_id"].split("/")[0]
        file = q["question_id"].split("/")[-1].split(".")[0] + ".txt"
        a = answers.get(key(q))
        n_missing += a is None
        prompt = q["text"].replace("Answer the question using a single word or phrase.",
                                                           "").strip()
        if "Please answer yes or no." not in prompt:
            prompt += " Please answer yes or no."
            if (task, file, prompt) not in gt:
                prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
        if (task, file, prompt) not in gt:
            raise EvalError(f"MME has no ground truth for {task}/{file}: {prompt!r}")
        truth = gt[task, file, prompt].lower()
        pred = mme_yes_no(a["text"]) if a else ("no" if truth == "yes" else "yes")
        per_task.setdefault(task, []).append(pred == truth)
    metrics = {}
    for task, right in per_task.items():
        pairs = [right[i:i + 2] for i in range(0, len(right), 2)]
        metrics[task] = {"accuracy": _ratio(sum(right), len(right)),
                         "accuracy_plus": _ratio(sum(all(p) for p in pairs), len(pairs))}
        metrics[task]["score"] = metrics[task]["accuracy"] + metrics[task]["accuracy_plus"]
    metrics["perception"] = sum(metrics[t]["score"] for t in MME_PERCEPTION if t in metrics)
    metrics["cognition"] = sum(metrics[t]["score"] for t in MME_COGNITION if t in metrics)
    return metrics, n_missing


def submission_vqav2(bench, data, answers, questions, path):
    """convert_vqav2_for_submission.py: every question of test2015, in its file's order, with its EvalAI-normalised
    answer, or '' where test-dev did not ask (or the model did not answer) it."""
    by_id = {qid: a["text"] for (qid, _), a in answers.items()}
    split = [q for _, q in read_jsonl(os.path.join(data, "llava_vqav2_mscoco_test2015.jsonl"))]
    write_json_atomic(path, [{"question_id": q["question_id"], "answer": evalai_normalize(by_id[q["question_id"]])
                              if q["question_id"] in by_id else ""} for q in split])


def submission_vizwiz(bench, data, answers, questions, path):
    """convert_vizwiz_for_submission.py: {"image", "answer"} for every question, which must all be answered."""
    missing = [q["question_id"] for q in questions if key(q) not in answers]
    if missing:
        raise EvalError(f"vizwiz: {len(missing)} question(s) have no answer (first: {missing[0]!r}); the "
                        "submission needs them all: run `answer` again to complete the answers file")
    write_json_atomic(path, [{"image": q["image"], "answer": evalai_normalize(answers[key(q)]["text"])}
                             for q in questions])


def mmbench_letter(text: str, options: dict):
    """VLMEvalKit's rule matching for MMBench (can_infer): with ".()[],:;!*#{}" made spaces, the one option
    letter among the words ("A" not trusted in more than 3 words: it may be the article); else "Z" when
    it alone is there (a refusal); else the one option whose text is in the lower-cased answer; else None
    (VLMEvalKit then asks ChatGPT; here the answer counts as wrong, and how many there were is reported)."""
    words = text
    for c in ".()[],:;!*#{}":
        words = words.replace(c, " ")
    words = words.split()
    hits = [letter for letter in options if letter in words]
    if len(hits) == 1 and not ("A" in words and len(words) > 3):
        return hits[0]
    if not hits and "Z" in words:
        return "Z"
    hits = [letter for letter, option in options.items() if str(option).lower() in text.lower()]
    return hits[0] if len(hits) == 1 else None


def score_mmbench(data, answers, questions):
    """Circular evaluation, as MMBench's: a question is right only when all its copies are (the rows whose
    index is equal modulo 1e6, and every round of each with --all-rounds); the headline is the share of such
    questions, overall and per category; `accuracy` counts the lines one by one (vanilla)."""
    groups, categories, lines, unmatched, n_missing = {}, {}, [], 0, 0
    for q in questions:
        a = answers.get(key(q))
        n_missing += a is None
        letter = mmbench_letter(a["text"], dict(zip("ABCD", q["options"]))) if a else "Z"
        unmatched += letter is None
        ok = letter is not None and letter in "ABCD"[:len(q["options"])] and \
            q["option_char"]["ABCD".index(letter)] == q["answer"]
        group = q["question_id"] % 1_000_000
        groups[group] = groups.get(group, True) and ok
        categories.setdefault(q["category"], set()).add(group)
        lines.append(ok)
    metrics = {"circular_accuracy": _ratio(sum(groups.values()), len(groups)), "accuracy": _ratio(sum(lines),
               len(lines)), "n": len(groups), "lines": len(lines), "unmatched": unmatched}
    for category, members in sorted(categories.items(), key=lambda kv: str(kv[0])):
        metrics[category] = {"circular_accuracy": _ratio(sum(groups[g] for g in members), len(members)),
                             "n": len(members)}
    return metrics, n_missing


def submission_mmbench(bench, data, answers, questions, path):
    """convert_mmbench_for_submission.py: the TSV without its hint, category, source, image, comment and
    l2-category columns, a "prediction" column inserted as the 7th (the answer's text; with several rounds, the
    last in the answers file, as the original's overwriting leaves it), as .xlsx; columns whose every value
    is an integer are written as numbers, as pandas reads them."""
    columns, rows = read_tsv(os.path.join(data, bench.questions))
    keep = [c for c in columns if c not in ("hint", "category", "source", "image", "comment", "l2-category")]
    header = keep[:6] + ["prediction"] + keep[6:]
    prediction = {qid: a["text"] for (qid, _), a in answers.items()}
    numeric = {c for c in keep if all(_missing(r[c]) or r[c].lstrip("-").isdigit() for _, r in rows)}
    table = [[None if _missing(r[c]) else int(r[c]) if c in numeric else r[c] for c in keep] for _, r in rows]
    for row, (_, r) in zip(table, rows):
        row.insert(6, prediction.get(int(r["index"])))
    write_atomic(path, xlsx_bytes(header, table))


def xlsx_bytes(header: list, rows: list) -> bytes:
    """A one-sheet Excel workbook from the standard library: the four Office Open XML parts in a zip; strings
    inline, numbers as numbers, None as no cell (what pandas' to_excel writes, less the styles)."""
    def column(i):  # 0 -> A, 25 -> Z, 26 -> AA
        return column(i // 26 - 1) + chr(65 + i % 26) if i >= 26 else chr(65 + i)

    def cell(ref, v):
        if v is None:
            return ""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f'<c r="{ref}"><v>{v}</v></c>'
        text = escape("".join(ch for ch in str(v) if ch in "\t\n\r" or ord(ch) >= 32))  # XML 1.0's characters
        return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'

    sheet = "".join(f'<row r="{r}">' + "".join(cell(f"{column(c)}{r}", v) for c, v in enumerate(values)) + "</row>"
                    for r, values in enumerate([header] + rows, 1))
    ns, rel = "http://schemas.openxmlformats.org", "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    ct = "application/vnd.openxmlformats-officedocument.spreadsheetml"
    parts = {
        "[Content_Types].xml": f'<Types xmlns="{ns}/package/2006/content-types"><Default Extension="rels" '
        'ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" '
        f'ContentType="application/xml"/><Override PartName="/xl/workbook.xml" ContentType="{ct}.sheet.main+xml"/>'
        f'<Override PartName="/xl/worksheets/sheet1.xml" ContentType="{ct}.worksheet+xml"/></Types>',
        "_rels/.rels": f'<Relationships xmlns="{ns}/package/2006/relationships"><Relationship Id="rId1" '
        f'Type="{rel}/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<workbook xmlns="{ns}/spreadsheetml/2006/main" xmlns:r="{rel}"><sheets><sheet '
        'name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'<Relationships xmlns="{ns}/package/2006/relationships"><Relationship '
        f'Id="rId1" Type="{rel}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<worksheet xmlns="{ns}/spreadsheetml/2006/main"><sheetData>{sheet}'
        '</sheetData></worksheet>'}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, xml in parts.items():
            z.writestr(name, '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n' + xml)
    return buf.getvalue()


SCORERS = {"pope": score_pope, "sqa": score_sqa, "textvqa": score_textvqa, "gqa": score_gqa, "mme": score_mme,
           "mmbench": score_mmbench, "mmbench_cn": score_mmbench}
SUBMITTERS = {"vqav2": submission_vqav2, "vizwiz": submission_vizwiz, "mmbench": submission_mmbench,
              "mmbench_cn": submission_mmbench}


def benchmark(name: str, question_file: str = None) -> Benchmark:
    """The benchmark, with another question file of its folder when given (MMBench's test split, say)."""
    return dataclasses.replace(BENCHMARKS[name], questions=question_file or BENCHMARKS[name].questions)


def score(name: str, data: str, answers_path: str, submission_path: str = None, question_file: str = None,
          protocol: str = "llava") -> dict:
    """{"benchmark", "metrics": {..., "headline"}, "unanswered": n}. The submission file for a benchmark's server
    goes to submission_path; where only the server scores (no ground truth here), the metrics count answers
    and the headline is null."""
    bench = benchmark(name, question_file)
    check_files(bench, data, for_answering=False)
    mmbench = bench.name in MMBENCH_SUFFIX
    questions = questions_for_generate(bench, data, all_rounds=mmbench, protocol=protocol)
    answers = read_answers(bench, answers_path, questions)
    if mmbench and not any(q["round_id"] and key(q) in answers for q in questions):  # not answered --all-rounds
        questions = [q for q in questions if q["round_id"] == 0]
    n_missing = sum(key(q) not in answers for q in questions)
    if submission_path:
        if name not in SUBMITTERS:
            raise EvalError(f"{name} is scored here; only {', '.join(SUBMITTERS)} have a submission file")
        SUBMITTERS[name](bench, data, answers, questions, submission_path)
    server_only = bench.server_only or (name in MMBENCH_SUFFIX and any(_missing(q["answer"]) for q in questions))
    if server_only:
        if not submission_path:
            raise EvalError(f"{bench.questions} of {name} is scored by its server (no ground truth here): give "
                            "--output-submission FILE for the file it takes")
        metrics = {"answered": len(questions) - n_missing, "questions": len(questions),
                   "submission": submission_path, "headline": None}
        return {"benchmark": name, "protocol": protocol, "metrics": metrics, "unanswered": n_missing}
    extra = {"protocol": protocol} if name == "pope" else {}  # the one scorer lmms-eval's protocol changes
    metrics, n_missing = SCORERS[name](data, answers, questions, **extra)
    metrics["headline"] = metrics[bench.headline]
    if submission_path:
        metrics["submission"] = submission_path
    return {"benchmark": name, "protocol": protocol, "metrics": metrics, "unanswered": n_missing}


def write_atomic(path, data: bytes):
    """The whole file or nothing: written beside it, fsynced, renamed over it, the directory fsynced. (The same
    steps as minillava.weights.save.atomic_file, which `score` cannot import: it would pull in torch.)"""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"))


def print_metrics(result: dict, file=None):
    file = file or sys.stdout  # looked up now: a default bound at import would miss a redirected stdout
    bench = BENCHMARKS[result["benchmark"]]
    m = result["metrics"]
    got = "for its server" if m["headline"] is None else f"{m['headline']:.2f}"
    print(f"{bench.name}: {bench.headline} {got} (LLaVA-1.5 paper: 7B {bench.paper[0]}, 13B {bench.paper[1]})",
          file=file)
    for key, value in m.items():
        if isinstance(value, dict):
            print(f"  {key:24s} " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in value.items()), file=file)
        elif key != "headline":
            print(f"  {key:24s} {value:.2f}" if isinstance(value, float) else f"  {key:24s} {value}", file=file)
    if result["unanswered"]:
        print(f"  {result['unanswered']} question(s) had no answer and count as wrong", file=file)


# ----------------------------------------------------------------------------------------------------------
# Answering (minillava.generation.answer_file, generate.py's batch mode, under the benchmark's protocol)

def answer(name, model, data, answers_path, vision=None, batch_size=8, threads=0, device="auto", dtype="auto",
           question_file=None, all_rounds=False, protocol="llava", quantize="none", group_size=64,
           template="vicuna_v1", projector=None, model_base=None):
    """Answer every question not yet in answers_path; under torchrun each rank answers a contiguous chunk into
    its own file and rank 0 merges them in question order. Returns 0, or 1 when a question could not be answered
    (each is named) or the model could not be loaded."""
    from minillava import generation  # here, not at the top: `score` imports neither torch nor the model
    from minillava.cli import set_threads
    bench = benchmark(name, question_file)
    check_files(bench, data, for_answering=True)
    questions = questions_for_generate(bench, data, all_rounds, protocol)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = answers_path if world == 1 else f"{answers_path}.rank{rank}-of-{world}"
    prepared = out + ".questions.jsonl"  # the questions as generation.answer_file reads them (the prompts it records)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(prepared, "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    images = os.path.join(data, bench.images)
    if name in MMBENCH_SUFFIX:  # the TSV's images, decoded beside the answers file
        images = out + ".images"
        write_mmbench_images(os.path.join(data, bench.questions), images)
    threads, errors, rc = set_threads(threads), [], 1
    try:
        model_dir = model
        model, tokenizer = generation.load(model_dir, vision, dtype=dtype, device=device, quantize=quantize,
                                           group_size=group_size, projector=projector, model_base=model_base)
        if protocol == "lmms-eval" and name in LMMS_EVAL_NO_PAD and not model.config.anyres:
            model.config = dataclasses.replace(model.config, image_aspect_ratio="square")  # AnyRes never pads
        print(threads, file=sys.stderr)
        print(generation.weights_line(model), file=sys.stderr)
        stats, errors = generation.answer_file(
            model, tokenizer, prepared, out, images, template, temperature=0.0, max_new_tokens=bench.max_new_tokens,
            batch_size=batch_size, num_chunks=world, chunk_idx=rank,
            model_id=os.path.basename(os.path.normpath(model_dir)))
        print(f"tokenizer: {tokenizer.describe()}", file=sys.stderr)
        generation.print_stats(stats, model)
        rc = generation.report_unanswered(errors, out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the answers so far are in {out}: run the same command to go on", file=sys.stderr)
        rc = 130
    os.remove(prepared)
    if name in MMBENCH_SUFFIX:
        shutil.rmtree(images)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        dist.barrier()
        if rank == 0:
            parts = {}
            for r in range(world):
                part = f"{answers_path}.rank{r}-of-{world}"
                parts.update(((a["question_id"], a["prompt"]), line) for line, a in
                             ((line, json.loads(line)) for line in open(part, encoding="utf-8") if line.strip()))
            with open(answers_path, "w", encoding="utf-8") as f:
                f.writelines(parts[key(q)] for q in questions if key(q) in parts)
        dist.barrier()
        dist.destroy_process_group()
    return rc


# ----------------------------------------------------------------------------------------------------------

def benchmark_folder(parser, a) -> str:
    """--data, or the folder eval_pope.py's --annotation-dir implies (playground/data/eval/pope/coco -> .../pope)."""
    if a.annotation_dir is None:
        if a.data is None:
            parser.error("--data is required (the benchmark's folder)")
        return a.data
    expected = os.path.dirname(BENCHMARKS["pope"].ground_truth[0])  # coco
    folder, name = os.path.split(os.path.normpath(a.annotation_dir))
    if a.bench != "pope" or name != expected or (a.data and os.path.normpath(a.data) != folder):
        parser.error(f"--annotation-dir is POPE's folder of coco_pope_*.json, named {expected}/ inside the benchmark's "
                     f"folder; got {a.annotation_dir} for {a.bench}: give --data (the folder holding "
                     f"{BENCHMARKS[a.bench].questions})")
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the benchmarks, the files each needs, the paper's numbers")
    for cmd in ("answer", "score", "run"):
        s = sub.add_parser(cmd)
        s.add_argument("bench", choices=list(BENCHMARKS))
        s.add_argument("--data", help="the benchmark's folder (playground/data/eval/<bench>)")
        s.add_argument("--annotation-dir", help="POPE, as eval_pope.py takes it: the folder of coco_pope_*.json "
                       "(the benchmark's folder is then the one above it)")
        s.add_argument("--question-file", help="another question file in --data (MMBench's test TSV, say), or a "
                       "path to one")
        s.add_argument("--protocol", choices=("llava", "lmms-eval"), default="llava",
                       help="llava: the original's scripts (default); lmms-eval: its documented differences "
                       "(TextVQA without OCR tokens, POPE pooled with exact yes/no, SQA and MMBench not padded)")
        if cmd in ("answer", "run"):
            s.add_argument("--model", "--model-path", required=True, help="checkpoint directory (any layout)")
            s.add_argument("--vision", help="CLIP directory, for layouts B and C")
            s.add_argument("--projector", help="layout C: the stage-1 projector file (or the dir holding it)")
            s.add_argument("--model-base", help="the original's: the LLM dir, when --model is a stage-1 output")
            s.add_argument("--batch-size", type=int, default=8, help="questions answered together (default: 8)")
            s.add_argument("--template", "--conv-mode", default="vicuna_v1", help="the conversation template "
                           "(default: vicuna_v1, the paper's; LLaVA-1.6 Mistral: mistral_instruct, 34B: chatml_direct)")
            s.add_argument("--threads", type=int, default=0, help="CPU threads (0: the cores this process may use)")
            s.add_argument("--device", default="auto", help="cuda or cpu (default: cuda when available)")
            s.add_argument("--dtype", default="auto", help="fp32 | fp16 | bf16 (default: bf16 on CUDA, fp32 on CPU)")
            s.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                           help="the LLM's linear layers, quantized while loading (default: none)")
            s.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES,
                           help=f"int4: inputs per scale (default: {DEFAULT_GROUP_SIZE})")
            add_load_bits_flags(s)
            s.add_argument("--all-rounds", action="store_true", help="MMBench: ask once per option, the options "
                           "rotated (model_vqa_mmbench --all-rounds); scoring finds the rounds by itself")
        if cmd in ("answer", "score"):
            s.add_argument("--answers", "--answers-file", "--result-file", required=True,
                           help="the answers file (jsonl)")
        if cmd == "score":
            s.add_argument("--output", help="write the metrics here as JSON")
        if cmd in ("score", "run"):
            s.add_argument("--output-submission", help="vqav2, vizwiz, mmbench: write the file their server takes")
        if cmd == "run":
            s.add_argument("--out", required=True, help="writes answers.jsonl and metrics.json here")
    a = p.parse_args(argv)
    if a.cmd != "list":
        a.data = benchmark_folder(p, a)
        if a.question_file and not os.path.isfile(os.path.join(a.data, a.question_file)) \
                and os.path.isfile(a.question_file):
            a.question_file = os.path.abspath(a.question_file)  # a path from here, as the original's scripts take it
    try:
        if a.cmd == "list":
            for b in BENCHMARKS.values():
                images = f" + {b.images}/" if b.images else " (images inside)"
                print(f"{b.name:10s} {b.headline} (paper 7B {b.paper[0]}, 13B {b.paper[1]})\n"
                      f"           answer: {b.questions}{images}; score: {', '.join(b.ground_truth) or b.questions}"
                      f"\n           from {b.source}")
            return 0
        if a.cmd == "run":
            a.answers, a.output = os.path.join(a.out, "answers.jsonl"), os.path.join(a.out, "metrics.json")
            if BENCHMARKS[a.bench].submission and not a.output_submission:
                a.output_submission = os.path.join(a.out, f"submission.{BENCHMARKS[a.bench].submission}")
            check_files(benchmark(a.bench, a.question_file), a.data, for_answering=False)  # before any model
        if a.cmd in ("answer", "run"):
            rc = answer(a.bench, a.model, a.data, a.answers, a.vision, a.batch_size, a.threads, a.device, a.dtype,
                        a.question_file, a.all_rounds, a.protocol, a.quantize, a.group_size, a.template,
                        a.projector, a.model_base)
            if rc != 0 or a.cmd == "answer" or int(os.environ.get("RANK", 0)) != 0:
                return rc
        result = score(a.bench, a.data, a.answers, a.output_submission, a.question_file, a.protocol)
        print_metrics(result)
        if a.output:
            write_json_atomic(a.output, result)
        return 0
    except (EvalError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
