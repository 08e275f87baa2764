"""Continuous batching vs static batches: 64 questions of mixed lengths on the decode engine, same answers.

    python benchmarks/bench_engine.py                 # CPU, 2 threads, 8 slots, fp32
    python benchmarks/bench_engine.py --device cuda --dtype bf16 --compile   # CUDA graphs

The questions: 64 prompts (every other one with an image, text of 10-70 ids) whose answers are cut at
max_new_tokens from 8 to 128 (EOS ignored, greedy), so they end at very different steps. Static: the questions in
batches of --slots, each batch run until its longest answer ends (what generate.py did before the engine: a
left-padded batch waits for its longest answer). Continuous: one run of the engine over all 64; a slot whose
answer ends takes the next question at the next step. Both use the same engine and kernels; the script checks
that every answer is the same and prints questions/s, decode steps and the ratio.

--pope: a POPE-shaped file instead (50 images, 18 yes/no questions each, vicuna_v1's system prompt, answers of
--pope-tokens ids), answered by today's engine (prefixes shared across slots, images kept by content, the requests
admitted together prefilled in one forward) and by the engine before that (a request reused only what its own
slot held, prefilled alone: share_prefixes=False, image_cache_mb=0, batch_prefill=False), in the
questions' file order (each image's questions in three blocks, as POPE's adversarial / popular / random files
make it) and grouped by image as generation.answer_file orders them. Prints questions/s, images encoded and
prompt positions computed / reused per run, and checks that every answer is the same.

--chunked: one request decodes 150 ids while 600-position prompts keep arriving in the other slots (each
answered in 8 ids, then the next arrives); prints the running request's median and longest gap between two of
its tokens without chunks (each newcomer prefilled whole at admission) and with --chunk positions per step.

The model: a random LLaVA-1.5-shaped model with a 12 x 768 LLM (~134M parameters, as bench_generate_cpu.py) and
a small CLIP tower at 112 px (64 image positions), so that decoding, which batching changes, dominates.
"""
import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks import bench_generate_cpu  # noqa: E402
from minillava.engine import Engine, Request  # noqa: E402
from minillava.llava import Llava  # noqa: E402

# bench_generate_cpu.py's model with its tower at 112 px (64 image positions instead of 576)
CONFIG = bench_generate_cpu.CONFIG.replace(vision=dataclasses.replace(bench_generate_cpu.CONFIG.vision, image_size=112))


def questions(n, device, dtype):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        text = torch.randint(3, 32000, (10 + (i * 23) % 61,), generator=g).tolist()
        image = i % 2 == 0
        ids = [1] + ([CONFIG.image_token_id] if image else []) + text
        pix = torch.randn(1, 3, 112, 112, generator=g).to(device, dtype) if image else None
        out.append((ids, pix, 8 + (i * 37) % 121))  # max_new_tokens 8..128
    return out


def pope_questions(n_images, per_image, device, dtype, size=112):
    """POPE-shaped: a shared system prompt, one image, a short yes/no question; each image's questions spread over
    three blocks of the file (the three POPE splits), each question with its own copy of the pixels (read from a
    file per question, as answer_file does)."""
    g = torch.Generator().manual_seed(1)
    system = torch.randint(3, 32000, (35,), generator=g).tolist()  # vicuna_v1's system prompt: ~35 ids
    images = [torch.randn(1, 3, size, size, generator=g).to(device, dtype) for _ in range(n_images)]
    blocks = [[] for _ in range(3)]
    for i in range(n_images):
        for q in range(per_image):
            text = torch.randint(3, 32000, (9 + q % 5,), generator=g).tolist()  # "Is there a dog in the image?"
            blocks[q % 3].append(([1] + system + [CONFIG.image_token_id] + text, images[i], i))
    return [q for block in blocks for q in block]


def pope(model, a):
    qs = pope_questions(a.pope_images, a.pope_per_image, a.device, model.language_model.lm_head.weight.dtype,
                        model.config.vision.image_size)
    grouped = sorted(range(len(qs)), key=lambda k: qs[k][2])  # generation.answer_file's order: by image
    print(f"POPE-shaped: {a.pope_images} images ({model.config.num_image_tokens} positions each) x "
          f"{a.pope_per_image} questions, {a.pope_tokens}-id answers, "
          f"{a.slots} slots, {a.dtype}, {a.device}, {a.threads} thread(s)")
    results = {}
    before = dict(share_prefixes=False, image_cache_mb=0, batch_prefill=False)
    for name, kw, order in (("before (issue 30)", before, range(len(qs))),
                            ("shared, file order", {}, range(len(qs))), ("shared, grouped by image", {}, grouped)):
        engine = Engine(model, slots=a.slots, max_seq_len=model.config.num_image_tokens + 64, **kw)
        engine.run([Request([1, 5, 6], max_new_tokens=2)])  # warm up
        engine.stats = type(engine.stats)()
        t0 = time.perf_counter()
        done = engine.run(Request(qs[k][0], qs[k][1].clone(), a.pope_tokens) for k in order)
        dt = time.perf_counter() - t0
        answers = [None] * len(qs)
        for k, r in zip(order, done):
            answers[k] = r.out
        st = engine.stats
        results[name] = (dt, answers)
        print(f"{name:26s} {dt:7.1f} s  {len(qs) / dt:6.2f} questions/s  images encoded {st.images:4d}  prompt "
              f"positions computed {st.prefill_tokens:6d}, reused {st.prefix_reused:6d} ({st.prefix_copied} copied)")
    (t_b, before), *rest = results.values()
    same = all(answers == before for _, answers in rest)
    print("shared / before: " + ", ".join(f"{t_b / dt:.2f}x ({name})" for name, (dt, _) in list(results.items())[1:])
          + f"; same answers: {same}")
    if not same:
        sys.exit("the answers differ: the comparison is not valid")


def chunked(model, a):
    g = torch.Generator().manual_seed(2)
    runner = [1] + torch.randint(3, 32000, (20,), generator=g).tolist()
    newcomers = [[1] + torch.randint(3, 32000, (599,), generator=g).tolist() for _ in range(3 * a.slots)]
    print(f"chunked prefill: one request decoding 150 ids, {len(newcomers)} prompts of 600 positions arriving in "
          f"the other {a.slots - 1} slots, {a.dtype}, {a.device}, {a.threads} thread(s)")
    results = {}
    for chunk in (None, a.chunk):
        engine = Engine(model, slots=a.slots, max_seq_len=700, prefill_chunk=chunk)
        engine.run([Request([1, 5, 6], max_new_tokens=2)])  # warm up
        times = []
        first = Request(runner, max_new_tokens=150, on_token=lambda out: times.append(time.perf_counter()))
        done = engine.run([first] + [Request(ids, max_new_tokens=8) for ids in newcomers])
        gaps = sorted(b - c for b, c in zip(times[1:], times))
        median, longest = gaps[len(gaps) // 2], gaps[-1]
        results[chunk] = [r.out for r in done]
        print(f"prefill_chunk {str(chunk):5s} running request's gap between tokens: median {median * 1e3:6.1f} ms, "
              f"longest {longest * 1e3:6.1f} ms ({longest / median:.1f}x the median)")
    print(f"same answers: {results[None] == results[a.chunk]}")
    if results[None] != results[a.chunk]:
        sys.exit("the answers differ: the comparison is not valid")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (both runs)")
    p.add_argument("--pope", action="store_true", help="the POPE-shaped file instead (see the docstring)")
    p.add_argument("--chunked", action="store_true", help="the gaps of a running request (see the docstring)")
    p.add_argument("--chunk", type=int, default=32, help="--chunked: prefill_chunk, positions per step")
    p.add_argument("--pope-images", type=int, default=50)
    p.add_argument("--pope-per-image", type=int, default=18)
    p.add_argument("--pope-tokens", type=int, default=2, help="ids per answer (EOS ignored): yes/no and a stop")
    p.add_argument("--pope-image-size", type=int, default=336, help="336: LLaVA-1.5's 576 positions per image")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    config = CONFIG
    if a.pope:
        config = CONFIG.replace(vision=dataclasses.replace(CONFIG.vision, image_size=a.pope_image_size))
    model = Llava(config)
    for prm in model.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    model = model.to(a.device, dtype).eval()
    if a.pope:
        return pope(model, a)
    if a.chunked:
        return chunked(model, a)
    qs = questions(a.questions, a.device, dtype)
    n_tokens = sum(n for _, _, n in qs)
    print(f"{a.questions} questions ({sum(p is not None for _, p, _ in qs)} with an image), {n_tokens} answer tokens "
          f"(8..128 each), {a.slots} slots, {a.dtype}, {a.device}, {a.threads} thread(s)"
          + (", decode step compiled" if a.compile else ""))
    def timed(batches):  # a fresh engine each time: no slot holds a question of the other run
        engine = Engine(model, slots=a.slots, max_seq_len=512, compile=a.compile)
        engine.run([Request([1, 5, 6], max_new_tokens=4)])  # warm up (and compile: its time is not counted)
        if a.compile:
            print(f"compile: {engine.stats.compile_s:.1f} s (first decode step)")
        engine.stats.decode_steps = 0
        t0 = time.perf_counter()
        answers = [r.out for batch in batches for r in engine.run(Request(ids, pix, n) for ids, pix, n in batch)]
        return time.perf_counter() - t0, engine.stats.decode_steps, answers

    results = {}
    for name, batches in (("static batches", [qs[i:i + a.slots] for i in range(0, len(qs), a.slots)]),
                          ("continuous batching", [qs])):
        results[name] = timed(batches)
        dt, steps, answers = results[name]
        print(f"{name:20s} {dt:7.1f} s  {len(qs) / dt:6.2f} questions/s  {n_tokens / dt:7.1f} tokens/s  "
              f"{steps} decode steps")
    (t_s, _, static), (t_c, _, cont) = results.values()
    print(f"continuous / static: {t_s / t_c:.2f}x questions/s; same answers: {static == cont}")
    if static != cont:
        sys.exit("the answers differ: the comparison is not valid")


if __name__ == "__main__":
    main()
