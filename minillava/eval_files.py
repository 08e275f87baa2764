"""LLaVA-1.5's benchmarks and their files: the registry (where each benchmark's questions, images and ground truth
lie in eval.zip's layout, where they come from, the paper's numbers), the readers of question and answers files
(JSONL, JSON, MMBench's TSV with its base64 images) as the original's scripts read them, and atomic writing.
Standard library only: `eval.py score` imports no torch."""
import base64
import csv
import dataclasses
import functools
import json
import os
import sys


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


def benchmark(name: str, question_file: str = None) -> Benchmark:
    """The benchmark, with another question file of its folder when given (MMBench's test split, say)."""
    return dataclasses.replace(BENCHMARKS[name], questions=question_file or BENCHMARKS[name].questions)


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


def is_missing(value) -> bool:
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
            if is_missing(row.get(letter)):
                break
            options.append(row[letter])
        chars = list("ABCD"[:len(options)])
        for round_id in range(len(options) if all_rounds else 1):
            question = row["question"] if is_missing(row["hint"]) else row["hint"] + "\n" + row["question"]
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
