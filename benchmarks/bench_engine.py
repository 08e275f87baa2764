"""Continuous batching vs static batches: 64 questions of mixed lengths on the decode engine, same answers.

    python benchmarks/bench_engine.py                 # CPU, 2 threads, 8 slots, fp32
    python benchmarks/bench_engine.py --device cuda --dtype bf16 --compile   # CUDA graphs

The questions: 64 prompts (every other one with an image, text of 10-70 ids) whose answers are cut at
max_new_tokens from 8 to 128 (EOS ignored, greedy), so they end at very different steps. Static: the questions in
batches of --slots, each batch run until its longest answer ends (what generate.py did before the engine: a
left-padded batch waits for its longest answer). Continuous: one run of the engine over all 64; a slot whose
answer ends takes the next question at the next step. Both use the same engine and kernels; the script checks
that every answer is the same and prints questions/s, decode steps and the ratio.

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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (both runs)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    model = Llava(CONFIG)
    for prm in model.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    model = model.to(a.device, dtype).eval()
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
