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

The parts are library modules beside the model, in minillava/: eval_files.py (the benchmarks, their files and
the readers), eval_scores.py (the scorers) and eval_submit.py (the files the servers take); this script answers
(through minillava.generation), scores, and is the command line.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys

from minillava.cli import DEFAULT_GROUP_SIZE, GROUP_SIZES, QUANTIZE_CHOICES, add_load_bits_flags  # no torch: `score`
from minillava.eval_files import (BENCHMARKS, LMMS_EVAL_NO_PAD, MMBENCH_SUFFIX, EvalError, is_missing, benchmark,
                                  check_files, key, questions_for_generate, read_answers, write_json_atomic,
                                  write_mmbench_images)
from minillava.eval_scores import SCORERS
from minillava.eval_submit import SUBMITTERS


# ----------------------------------------------------------------------------------------------------------
# Scoring (the answers file against the benchmark's ground truth, minillava/eval_scores.py; no torch)

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
    server_only = bench.server_only or (name in MMBENCH_SUFFIX and any(is_missing(q["answer"]) for q in questions))
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


def print_metrics(result: dict, file=None):
    file = file or sys.stdout  # looked up now: a default bound at import would miss a redirected stdout
    bench = BENCHMARKS[result["benchmark"]]
    m = result["metrics"]
    got = "for its server" if m["headline"] is None else f"{m['headline']:.2f}"
    print(f"{bench.name}: {bench.headline} {got} (LLaVA-1.5 paper: 7B {bench.paper[0]}, 13B {bench.paper[1]})",
          file=file)
    for name, value in m.items():
        if isinstance(value, dict):
            print(f"  {name:24s} " + "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in value.items()), file=file)
        elif name != "headline":
            print(f"  {name:24s} {value:.2f}" if isinstance(value, float) else f"  {name:24s} {value}", file=file)
    if result["unanswered"]:
        print(f"  {result['unanswered']} question(s) had no answer and count as wrong", file=file)


# ----------------------------------------------------------------------------------------------------------
# Answering (minillava.generation.answer_questions, generate.py's batch mode, under the benchmark's protocol)

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
    threads, rc = set_threads(threads), 1
    try:
        model_dir = model
        model, tokenizer = generation.load(model_dir, vision, dtype=dtype, device=device, quantize=quantize,
                                           group_size=group_size, projector=projector, model_base=model_base)
        if protocol == "lmms-eval" and name in LMMS_EVAL_NO_PAD and not model.config.anyres:
            model.config = dataclasses.replace(model.config, image_aspect_ratio="square")  # AnyRes never pads
        print(threads, file=sys.stderr)
        print(generation.weights_line(model), file=sys.stderr)
        print(generation.kernels_line(model), file=sys.stderr)
        rc = generation.answer_questions(
            model, tokenizer, prepared, out, image_folder=images, template=template, temperature=0.0,
            max_new_tokens=bench.max_new_tokens, batch_size=batch_size, num_chunks=world, chunk_idx=rank,
            model_id=os.path.basename(os.path.normpath(model_dir)))
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
