"""Weight-only quantization on the CPU: decode tokens/s, GB/s of weights and peak RSS of fp32, bf16, int8, int4.

    python benchmarks/bench_quant.py                         # ~1.1B-parameter LLM, 1 and 2 threads, 128 tokens
    python benchmarks/bench_quant.py --threads 1 --new-tokens 64
    python benchmarks/bench_quant.py --sizes                 # bytes of LLaVA-1.5-7B / 13B in each form
    python benchmarks/bench_quant.py --llama-cpp DIR         # and llama.cpp on the same LLM weights, side by side
    python benchmarks/bench_quant.py --llm 7b --new-tokens 32  # LLaVA-1.5-7B's LLM: bf16, int8, int4 (no fp32)
    python benchmarks/bench_quant.py --compile               # the decode step compiled (generate.py --compile)

--llama-cpp: a llama.cpp source tree with llama-bench and llama-quantize built (`cmake -B build && cmake --build
build --target llama-bench llama-quantize`; `pip download llama-cpp-python --no-binary :all:` holds one in
vendor/llama.cpp). The LLM's weights are written as a Hugging Face LLaMA directory (layout C), converted by its
convert_hf_to_gguf.py (which needs its gguf-py, numpy, sentencepiece and transformers) to F32, BF16 and Q8_0,
and quantized to Q4_0 by llama-quantize; llama-bench then decodes 128 tokens from an empty context (where
minillava's decode starts after its prompt) and evaluates a prompt as long as ours, at the same thread count,
right after our run of the same setting (interleaved: the machine's drift hits both alike).

The model: a random LLaVA whose LLM has TinyLlama-1.1B's shape (22 x 2048, MLP 5632, 32 heads, 4 key/value
heads, vocabulary 32064: 1.1 B parameters), written once in bf16, layout A (llava-hf); a small CLIP tower at
224 px (256 image tokens) so the prefill stays short. Every setting loads that same file through generate.py's
loader (fp32 and int8/int4 cast or quantize while loading, bf16 maps the file) in a fresh process, answers the
same question about the same image with the decode engine (one slot, greedy, EOS ignored, 128 new tokens), and
reports the engine's own decode time (prefill excluded), the weights read per decode step (every LLM weight but
the embedding table), their GB/s and its % of the machine's read speed (torch.sum over 1 GiB at the same thread
count, measured in the same run), the prefill's LLM tokens/s (the vision tower's time excluded), and the
process's peak RSS (VmHWM, which counts the mapped file's pages once touched). A second table says where one
decode step's time goes (forward hooks: linear layers, attention, the rest) and which torch ops took it.

--compile: each setting's decode step through torch.compile (inductor's C++ on the CPU: what `generate.py
--compile` runs); tokens/s then leave out the first step, which compiles (its seconds are printed), and the
step's parts are not measured (forward hooks see no modules inside compiled code).

--llm 7b: the LLM has LLaVA-1.5-7B's shape (32 x 4096, MLP 11008, 32 heads, 6.7 B parameters, 13.5 GB in bf16
on disk); fp32 (27 GB) does not fit a 24 GiB machine, so it starts at bf16 and the ratios are against bf16.

Targets (issue 14, 1 thread): int8 >= 1.8x and int4 >= 3x fp32's decode tokens/s. The greedy ids are compared
with fp32's: how many of the first tokens agree (a random model's logits are close together, so late
disagreement says little).
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SETTINGS = [("fp32", "none"), ("bf16", "none"), ("fp32", "int8"), ("fp32", "int4")]
LLMS = {  # the LLM's shape: hidden, MLP, layers, heads, key/value heads; and the settings measured
    "1.1b": ((2048, 5632, 22, 32, 4), SETTINGS),
    "7b": ((4096, 11008, 32, 32, 32), SETTINGS[1:]),
}
TARGETS = {"int8": 1.8, "int4": 3.0}  # x fp32 decode tokens/s at 1 thread
QUESTION = "What is the man in the picture holding, and what is he doing with it?"


def config(llm="1.1b"):
    from minillava.config import LlavaConfig, TextConfig, VisionConfig
    hidden, mlp, layers, heads, kv_heads = LLMS[llm][0]
    return LlavaConfig(
        vision=VisionConfig(image_size=224, patch_size=14, hidden_size=256, intermediate_size=1024,
                            num_hidden_layers=4, num_attention_heads=4, projection_dim=256),
        text=TextConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048),
        image_token_id=32000, pad_token_id=32001)


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1e6


def step_breakdown(engine, model, ids, pix, steps=8) -> dict:
    """Where a decode step's time goes, ms per step: the LLM's linear layers (reading the weights; the MLPs' whole
    time, their activation included), attention (rope, the cache write and the scores: each attention module's
    time less its linear layers'), the rest (norms, the head, sampling, Python, these hooks), timed by forward
    hooks over `steps` decode steps after a prefill; then the torch ops that took the most time (the profiler
    over 2 more steps, the three largest by self time: which ops the linear layers ran)."""
    import torch
    import torch.nn as nn
    from minillava.engine import Request
    from minillava.kernels.quant import QuantLinear
    from minillava.llama import LlamaAttention, LlamaMLP
    lm = model.language_model
    inside = {id(m): type(a) for a in lm.modules() if isinstance(a, (LlamaAttention, LlamaMLP))
              for m in a.modules() if m is not a}
    spent = {"weights": 0.0, "attention": 0.0, "attention's weights": 0.0, "MLP": 0.0}
    start = {}

    def hooks(kind):
        def before(m, inputs):
            start[m] = time.perf_counter()

        def after(m, inputs, output):
            spent[kind] += time.perf_counter() - start[m]
        return before, after
    handles = []
    for m in lm.modules():  # the MLP as a whole: on the CPU dense gate and up layers are not called as modules
        if isinstance(m, (LlamaAttention, LlamaMLP)):
            kind = "attention" if isinstance(m, LlamaAttention) else "MLP"
        elif isinstance(m, (nn.Linear, QuantLinear)) and inside.get(id(m)) is not LlamaMLP:
            kind = "attention's weights" if id(m) in inside else "weights"
        else:
            continue
        before, after = hooks(kind)
        handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    engine.admit(Request(ids, pix, max_new_tokens=steps + 4))
    engine.step()
    spent.update({k: 0.0 for k in spent})
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    weights = spent["weights"] + spent["attention's weights"] + spent["MLP"]
    attention = spent["attention"] - spent["attention's weights"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.step()
        engine.step()
    ops = sorted(((e.self_cpu_time_total, e.key) for e in prof.key_averages()), reverse=True)
    share = sum(t for t, _ in ops)
    return {"step_ms": total / steps * 1e3, "weights_ms": weights / steps * 1e3, "attention_ms": attention / steps
            * 1e3, "rest_ms": (total - weights - attention) / steps * 1e3,
            "ops": ", ".join(f"{k} {100 * t / share:.0f}%" for t, k in ops[:3])}


def child(args):
    """One setting in this (fresh) process: prints one JSON line."""
    import torch
    from minillava import generation
    from minillava.engine import Engine, Request
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = generation.load(args.ckpt, dtype=args.dtype, device="cpu", quantize=args.quantize)
    load_s = time.perf_counter() - t0
    ids = generation.prompt_ids([("human", generation.with_image_placeholder(QUESTION, 1))], tok, model.config,
                                "vicuna_v1")
    pix = generation.load_pixels(args.image, model.config)[0]
    lm = model.language_model
    embed = lm.model.embed_tokens.weight
    step_bytes = sum(t.numel() * t.element_size() for t in generation.weight_tensors(lm) if t is not embed)
    room = model.config.llm_length(ids) + args.new_tokens
    engine = Engine(model, slots=1, max_seq_len=room, compile=args.compile)
    out = engine.run([Request(ids, pix, max_new_tokens=args.new_tokens)])[0].out
    s = engine.stats
    steps, decode_s = s.decode_steps - bool(s.compile_s), s.decode_s - s.compile_s  # compiled: the first step out
    parts = {} if args.compile else step_breakdown(Engine(model, slots=1, max_seq_len=room, image_cache_mb=0),
                                                    model, ids, pix)
    print(json.dumps({"tokens_per_s": steps / decode_s, "prefill_s": s.prefill_s, "load_s": load_s,
                      "compile_s": s.compile_s,
                      "prefill_tokens_per_s": s.prefill_tokens / (s.prefill_s - s.vision_s),  # the LLM's alone
                      "prompt": s.prefill_tokens,
                      "step_gb": step_bytes / 1e9, "gbps": step_bytes * steps / decode_s / 1e9,
                      "peak_rss_gb": peak_rss_gb(), "ids": out, **parts,
                      "weights_gb": sum(t.numel() * t.element_size() for t in generation.weight_tensors(model)) / 1e9}))


def run_setting(args, dtype, quantize, threads) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--ckpt", args.ckpt, "--image", args.image,
           "--dtype", dtype, "--quantize", quantize, "--threads", str(threads), "--new-tokens", str(args.new_tokens)]
    cmd += ["--compile"] if args.compile else []
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode != 0:
        sys.exit(f"{dtype}/{quantize} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def write_checkpoint(root, llm) -> str:
    import torch
    from PIL import Image
    from tests.spm_util import train_tiny_spm
    from minillava.weights import write_random_checkpoint
    ckpt = os.path.join(root, f"llava-{llm}-bf16")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.perf_counter()
        print(f"writing a random {llm} checkpoint (bf16, layout A) to {ckpt} ...", flush=True)
        write_random_checkpoint(ckpt, config(llm), "A", seed=0, dtype=torch.bfloat16,
                                tokenizer=train_tiny_spm(os.path.join(root, "spm")))
        print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    image = os.path.join(root, "image.png")
    Image.radial_gradient("L").convert("RGB").resize((500, 375)).save(image)
    return ckpt, image


def sizes():
    """What LLaVA-1.5-7B and -13B take in each form: the LLM's linear layers at 4 / 2 / 1 / 0.5 bytes per weight
    (plus scales and offsets), everything else (embedding, tower, projector, norms) at the --dtype's bytes."""
    import torch
    from minillava.config import get_preset
    from minillava.llava import Llava
    from minillava.weights.quantize import Quantization, replace_linears
    print("what fits where (GB of weights; the KV cache comes on top, per slot: 1.05 MB per position at 7B in "
          "fp32, 1.64 MB at 13B, halved in bf16: 2.1 / 3.4 GB for a full 2048-position fp32 slot)")
    print(f"{'model':14s} {'fp32':>6s} {'bf16':>6s} {'int8+fp32':>10s} {'int8+bf16':>10s} {'int4+fp32':>10s} "
          f"{'int4+bf16':>10s}")
    for name in ("llava-1.5-7b", "llava-1.5-13b"):
        row = []
        for dtype, q in ((torch.float32, None), (torch.bfloat16, None), (torch.float32, Quantization(8)),
                         (torch.bfloat16, Quantization(8)), (torch.float32, Quantization(4, 64)),
                         (torch.bfloat16, Quantization(4, 64))):
            with torch.device("meta"):
                model = Llava(get_preset(name)).to(dtype)
                if q:
                    replace_linears(model, q)
            row.append(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e9)
        print(f"{name:14s} " + " ".join(f"{v:{6 if i < 2 else 10}.2f}" for i, v in enumerate(row)))


LLAMA_CPP = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # our setting -> llama.cpp's type


def gguf_files(tree, ckpt, root) -> dict:
    """The LLM's weights for llama.cpp, {setting: GGUF path}: written once (layout C, convert_hf_to_gguf.py,
    llama-quantize for Q4_0) and reused."""
    from minillava.weights import load_llava, write_layout
    llama_dir = os.path.join(root, "layout-c", "llama")
    if not os.path.exists(os.path.join(llama_dir, "config.json")):
        write_layout(load_llava(ckpt, dtype=None), os.path.join(root, "layout-c"), "C",
                     tokenizer=os.path.join(ckpt, "tokenizer.model"))
    files = {}
    for ours, theirs in LLAMA_CPP.items():
        files[ours] = os.path.join(root, f"llm-{theirs}.gguf")
        if os.path.exists(files[ours]):
            continue
        if theirs == "q4_0":
            cmd = [os.path.join(tree, "build", "bin", "llama-quantize"), files["bf16"], files[ours], "Q4_0"]
        else:
            cmd = [sys.executable, os.path.join(tree, "convert_hf_to_gguf.py"), llama_dir, "--outfile", files[ours],
                   "--outtype", theirs]
        r = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.path.join(tree, "gguf-py")})
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return files


def llama_cpp_rate(tree, gguf, threads, prompt, new_tokens) -> float:
    """llama-bench's tokens/s: decoding `new_tokens` from an empty context (prompt 0), or evaluating a
    `prompt`-token prompt (new_tokens 0)."""
    for extra in [[], ["--repack", "0"]]:
        cmd = [os.path.join(tree, "build", "bin", "llama-bench"), "-m", gguf, "-p", str(prompt), "-n",
               str(new_tokens), "-t", str(threads), "-r", "1", "-o", "json", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return json.loads(r.stdout)[0]["avg_ts"]
        # llama.cpp's AMX path for prompts dies on some CPUs (Q8_0 / Q4_0 on this sandbox's Xeon)
        print(f"llama-bench exit {r.returncode} on {os.path.basename(gguf)}, prompt {prompt}: rerunning with "
              "--repack 0", flush=True)
    sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--llm", choices=LLMS, default="1.1b", help="the LLM's shape (default: TinyLlama-1.1B's)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dir", default="/tmp/minillava_bench_quant", help="where the checkpoint is written (reused)")
    p.add_argument("--llama-cpp", default="", help="a llama.cpp tree with llama-bench built: measure it too")
    p.add_argument("--compile", action="store_true", help="the decode step compiled (generate.py --compile)")
    p.add_argument("--sizes", action="store_true", help="print what LLaVA-1.5-7B/13B take in each form, and stop")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--quantize", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.threads = args.threads[0]
        return child(args)
    if args.sizes:
        return sizes()
    import torch
    from benchmarks.bench_common import read_bandwidth
    if args.llama_cpp and args.llm != "1.1b":
        sys.exit("--llama-cpp measures the 1.1b LLM only (its F32 GGUF of a 7B LLM alone is 27 GB)")
    settings = LLMS[args.llm][1]
    first = settings[0][0] if settings[0][1] == "none" else settings[0][1]
    args.ckpt, args.image = write_checkpoint(args.dir, args.llm)
    gguf = gguf_files(args.llama_cpp, args.ckpt, args.dir) if args.llama_cpp else {}
    print(f"torch {torch.__version__}, {args.new_tokens} greedy tokens, one slot, same prompt and image; "
          f"each setting in a fresh process; % read: of torch.sum's read speed at the same threads"
          + ("; decode step compiled (tokens/s without the first step, which compiles)" if args.compile else ""),
          flush=True)
    print(f"{'setting':8s} {'thr':>3s} {'tokens/s':>9s} {'x ' + first:>7s} {'GB/step':>8s} {'GB/s':>6s} {'% read':>6s} "
          f"{'weights GB':>10s} {'peak RSS GB':>11s} {'load s':>7s} {'prefill t/s':>11s}  same ids as {first}")
    results, bandwidth, theirs = {}, {}, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        bandwidth[threads] = read_bandwidth(5)
        print(f"{threads} thread(s): read {bandwidth[threads]:.1f} GB/s", flush=True)
        for dtype, quantize in settings:
            name = dtype if quantize == "none" else quantize
            r = results[name, threads] = run_setting(args, dtype, quantize, threads)
            base = results[first, threads]
            same = next((i for i, (a, b) in enumerate(zip(r["ids"], base["ids"])) if a != b), len(r["ids"]))
            print(f"{name:8s} {threads:3d} {r['tokens_per_s']:9.2f} {r['tokens_per_s'] / base['tokens_per_s']:6.2f}x "
                  f"{r['step_gb']:8.2f} {r['gbps']:6.1f} {100 * r['gbps'] / bandwidth[threads]:5.0f}% "
                  f"{r['weights_gb']:10.2f} {r['peak_rss_gb']:11.2f} {r['load_s']:7.1f} "
                  f"{r['prefill_tokens_per_s']:11.1f}  first {same} of {len(r['ids'])}"
                  + (f", compiled in {r['compile_s']:.0f} s" if args.compile else ""), flush=True)
            if gguf:  # llama.cpp's same setting right after ours: the machine's drift hits both alike
                theirs[name, threads] = (llama_cpp_rate(args.llama_cpp, gguf[name], threads, 0, args.new_tokens),
                                         llama_cpp_rate(args.llama_cpp, gguf[name], threads, r["prompt"], 0))
    if args.compile:
        print("\nwhere a decode step goes: not measured with --compile (hooks see no modules in compiled code)")
    else:
        print("\nwhere a decode step goes (ms; weights: the linear layers and the MLPs' activation, attention: the "
              "rest of the attention modules, rest: everything else) and the step's top torch ops by self time")
        print(f"{'setting':8s} {'thr':>3s} {'step':>6s} {'weights':>8s} {'attention':>9s} {'rest':>6s}  ops")
        for (name, threads), r in results.items():
            print(f"{name:8s} {threads:3d} {r['step_ms']:6.1f} {r['weights_ms']:8.1f} {r['attention_ms']:9.1f} "
                  f"{r['rest_ms']:6.1f}  {r['ops']}")
    if args.llama_cpp:
        prompt = results["fp32", args.threads[0]]["prompt"]
        print(f"\nllama.cpp ({args.llama_cpp}) on the same LLM weights: decode {args.new_tokens} tokens from an "
              f"empty context, and a {prompt}-token prompt (ours: the LLM's share of the prefill, tower excluded)")
        print(f"{'setting':8s} {'llama.cpp':>9s} {'thr':>3s} {'decode t/s: llama.cpp':>21s} {'ours':>7s} "
              f"{'ratio':>6s} {'prefill t/s: llama.cpp':>22s} {'ours':>7s} {'ratio':>6s}   (ratio: llama.cpp / ours)")
        for threads in args.threads:
            for name, kind in LLAMA_CPP.items():
                r = results[name, threads]
                (a, c), b, d = theirs[name, threads], r["tokens_per_s"], r["prefill_tokens_per_s"]
                print(f"{name:8s} {kind.upper():>9s} {threads:3d} {a:21.2f} {b:7.2f} {a / b:5.2f}x {c:22.1f} "
                      f"{d:7.1f} {c / d:5.2f}x")
    if 1 in args.threads and first == "fp32":
        for name, target in TARGETS.items():
            ratio = results[name, 1]["tokens_per_s"] / results["fp32", 1]["tokens_per_s"]
            verdict = "met" if ratio >= target else "MISSED"
            print(f"target {name} >= {target}x fp32 at 1 thread: {ratio:.2f}x, {verdict}")


if __name__ == "__main__":
    main()
