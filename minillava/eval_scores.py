"""The scorers: the official scripts' arithmetic, quirks included (each one moves a published number; see the
docstrings). POPE as eval_pope.py (or lmms-eval's), ScienceQA as eval_science_qa.py, TextVQA as eval_textvqa.py with
m4c_evaluator's EvalAI answer normalisation, GQA as convert_gqa_for_eval.py + GQA's eval.py, MME as
convert_answer_to_mme.py + calculation.py, MMBench's circular evaluation with VLMEvalKit's answer matching. Each
scorer takes the benchmark folder, {(question_id, prompt): answer} in answers-file order and the questions, and
returns (metrics in the paper's units: percent, MME in points; how many questions had no answer). Standard library
only: `eval.py score` imports no torch."""
import json
import os
import re

from minillava.eval_files import BENCHMARKS, EvalError, key, read_json


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


SQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options: a list, so `in` is membership


def sqa_letter(text: str) -> str:
    """eval_science_qa.py: the text itself when it is one of the letters A-E (membership in its list: "", "AB"
    or "CDE" are not letters, where a substring test on "ABCDE" would take them for "", "A"...: "FAILED");
    its first letter when it reads "B. ..."; else the X of exactly one "The answer is X." (the "." matches any
    character); else "FAILED"."""
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else "FAILED"


def score_sqa(data, answers, questions):
    """Over pid_splits.json["test"]: a problem is right when the parsed letter is its answer's (letters A-E,
    an index past the choices never right; an unparsed answer is wrong: the original's random.choice fallback
    comes after a `return -1`, so its scores do not depend on a seed). IMG-accuracy (the LLaVA-1.5 table's)
    counts the problems whose answer's prompt holds "<image>", so an unanswered problem counts as wrong and as a
    text problem."""
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
        ok = letter in SQA_OPTIONS[:len(choices)] and SQA_OPTIONS.index(letter) == problems[pid]["answer"]
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


SCORERS = {"pope": score_pope, "sqa": score_sqa, "textvqa": score_textvqa, "gqa": score_gqa, "mme": score_mme,
           "mmbench": score_mmbench, "mmbench_cn": score_mmbench}
