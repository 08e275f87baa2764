"""Decode speed on CPU: generate.py's loop vs transformers' `generate`, same weights, prompt, image and threads.

    python benchmarks/bench_generate_cpu.py                      # ~134M-parameter LLM, 128 new tokens, greedy
    python benchmarks/bench_generate_cpu.py --threads 2 --repeat 5

The model: a random LLaVA-1.5-shaped checkpoint written in layout A (llava-hf), so both libraries load the very
same file: LLM 12 x 768 (12 heads, MLP 2048, vocabulary 32064: ~134M parameters, ~0.54 GB in fp32), CLIP at
336 px with 14 px patches (576 image tokens, as in LLaVA-1.5) but a small tower (4 x 256). The prompt is the
vicuna_v1 prompt of one question about one image (~620 positions), greedy, EOS ignored so both write exactly
`--new-tokens` ids (which must be identical: the script checks).

Decode tokens/s = (new_tokens - 1) / (time(new_tokens) - time(1)): the difference of two end-to-end calls
removes the prefill (vision tower + prompt) and the set-up, for both libraries in the same way. The two
libraries' runs are interleaved and each figure is the best (and the median) of --repeat runs; the best is the
least disturbed when the machine is shared. With --threads 1 the rate per CPU-second is printed too (time spent
descheduled does not count). On a machine shared with other jobs, use --threads 1: with every core's thread in
use, each operator's OpenMP barrier waits for a descheduled thread and both figures collapse to noise.
The achieved bandwidth counts every LLM weight except the embedding table read once per decode step.

What bounds it (measured on the 2-core AMD EPYC of the project's CI-like machine, fp32, 1 thread): decoding one
sequence reads 0.44 GB of weights per token, so both libraries are memory-bound. F.linear with one row goes to
MKL's sgemv, ~17-19 GB/s here, against ~37 GB/s for a plain read (torch.sum); oneDNN with prepacked weights
reaches ~25 GB/s. transformers adds a torch.cat of its growing KV cache per layer per step and its generate
loop; minillava writes into a preallocated cache and runs ~2.5 ms of other operators per step.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


from minillava import generation
from minillava.engine import Engine, Request  # noqa: E402
from minillava.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402

CONFIG = LlavaConfig(
    vision=VisionConfig(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, projection_dim=256),
    text=TextConfig(vocab_size=32064, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048),
    image_token_id=32000, pad_token_id=32001)
QUESTION = "What is the man in the picture holding, and what is he doing with it?"


def decode_times(run, new_tokens):
    """run(n) generates n ids -> (wall s, CPU s) per decode step, and the ids: the difference of a run of
    new_tokens and a run of 1 removes the prefill and the set-up from both clocks."""
    out = []
    for n in (1, new_tokens):
        w0, c0 = time.perf_counter(), time.process_time()
        ids = run(n)
        out.append((time.perf_counter() - w0, time.process_time() - c0))
    (w1, c1), (wn, cn) = out
    return (wn - w1) / (new_tokens - 1), (cn - c1) / (new_tokens - 1), ids


def compare(runs: dict, new_tokens, repeat):
    """Interleave the libraries' runs (ours, theirs, ours, ...) so that load from other processes on a shared
    machine falls on both alike. -> {name: (wall s per step list, CPU s per step list, ids)}."""
    results = {name: ([], [], None) for name in runs}
    for run in runs.values():
        run(2)  # warm up: first-call allocations, lazy inits
    for _ in range(repeat):
        for name, run in runs.items():
            wall, cpu, ids = decode_times(run, new_tokens)
            results[name][0].append(wall)
            results[name][1].append(cpu)
            results[name] = (*results[name][:2], ids)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image
    from transformers import GenerationConfig, LlavaForConditionalGeneration
    from tests.spm_util import train_tiny_spm
    from minillava.weights import write_random_checkpoint

    root = args.dir or tempfile.mkdtemp(prefix="bench_generate_")
    ckpt = os.path.join(root, "llava-134m")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        write_random_checkpoint(ckpt, CONFIG, "A", seed=0, tokenizer=train_tiny_spm(os.path.join(root, "spm")))
    image = os.path.join(root, "image.png")
    Image.radial_gradient("L").convert("RGB").resize((500, 375)).save(image)

    # ours: generate.py's loader and prompt, the decode engine with one slot (as generate.py's one-shot), EOS ignored
    model, tok = generation.load(ckpt, dtype="fp32", device="cpu")
    ids = generation.prompt_ids([("human", generation.with_image_placeholder(QUESTION, 1))], tok, model.config,
                                "vicuna_v1")
    pix = generation.load_pixels(image, model.config)[0]  # (1, 3, 336, 336)
    n_llm = sum(p.numel() for p in model.language_model.parameters())
    weight_bytes = 4 * (n_llm - model.language_model.model.embed_tokens.weight.numel())

    def ours(n):
        engine = Engine(model, slots=1, max_seq_len=model.config.llm_length(ids) + n)
        return engine.run([Request(ids, pix, max_new_tokens=n)])[0].out

    # transformers: the same directory; input_ids carry the image id Np times
    hf = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    Np = model.config.num_image_tokens
    expanded = torch.tensor([[j for i in ids for j in ([i] * Np if i == CONFIG.image_token_id else [i])]])

    def theirs(n):
        gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            out = hf.generate(input_ids=expanded, attention_mask=torch.ones_like(expanded), pixel_values=pix,
                              generation_config=gc)
        return out[0, expanded.shape[1]:].tolist()

    print(f"LLM {n_llm / 1e6:.0f}M parameters, prompt {expanded.shape[1]} positions ({Np} image), "
          f"{args.new_tokens} new tokens, greedy, fp32, {args.threads} thread(s), {args.repeat} interleaved runs")
    results = compare({"minillava generate.py": ours, "transformers generate": theirs}, args.new_tokens, args.repeat)
    rates = {}
    for name, (walls, cpus, _) in results.items():
        best, median = 1 / min(walls), 1 / statistics.median(walls)
        rates[name] = (best, median, 1 / min(cpus))
        cpu = f", {1 / min(cpus):.1f} per CPU-second" if args.threads == 1 else ""  # CPU time: not the time
        print(f"{name:24s} decode {best:6.1f} tokens/s best, {median:6.1f} median{cpu} "  # spent descheduled
              f"({weight_bytes * best / 1e9:.1f} GB/s of weights at the best)")
    (b0, m0, c0), (b1, m1, c1) = rates.values()
    cpu = f", {c0 / c1:.2f}x per CPU-second" if args.threads == 1 else ""
    print(f"speed-up (ours / transformers): {b0 / b1:.2f}x best, {m0 / m1:.2f}x median{cpu}")
    (_, _, ids0), (_, _, ids1) = results.values()
    print(f"same {len(ids0)} token ids: {ids0 == ids1}")
    if ids0 != ids1:
        sys.exit("the two generations differ: the comparison is not valid")


if __name__ == "__main__":
    main()
