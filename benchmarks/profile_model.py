"""Profile a stage-2 training step and a decoding loop of a LLaVA-1.5-7B-shaped model (random weights) with
torch.profiler, and print the kernels that take the GPU's time: what to fuse or speed up next.

    python benchmarks/profile_model.py --train                     # 7B shapes, 4 of the 32 decoder layers, batch 2 x 2048
    python benchmarks/profile_model.py --train --layers 0 --optimizer none   # all 32 layers (fits one 80 GB GPU)
    python benchmarks/profile_model.py --decode --layers 0         # prefill one image + 64 prompt tokens, decode 64
    python benchmarks/profile_model.py --train --kernels 0         # the same step on the plain-torch path
    python benchmarks/profile_model.py --train --trace train.json  # also write a trace for chrome://tracing / Perfetto
    python benchmarks/profile_model.py --train --decode --device cpu --preset tiny --seq-len 48 --batch 1
                                                             # a CPU run that checks the script (figures mean nothing)

Stage 2 as in LLaVA-1.5: the CLIP tower frozen, the projector and the LLM trained, every sequence holding one
image (576 positions) and text up to --seq-len positions, the loss over the second half of the text. The model is
built on the device in --dtype with random weights; MINILLAVA_KERNELS is set from --kernels. Printed: time per
step and tokens/s (training), time per token and tokens/s (decoding), then the top kernels by self time.
"""
import os
import sys
import time
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.bench_common import DTYPES, fail, parse_args, require_cuda  # noqa: E402
from minillava.config import get_preset  # noqa: E402
from minillava.engine import Engine, Request  # noqa: E402
from minillava.llava import IGNORE_INDEX, Llava  # noqa: E402


@dataclass
class Defaults:
    train: bool = False  # profile a training step
    decode: bool = False  # profile a decoding loop
    preset: str = "llava-1.5-7b"
    layers: int = 4  # decoder layers kept (0: all of the preset's)
    batch: int = 2  # sequences per step (training) or per decoding batch
    seq_len: int = 2048  # training positions per sequence, image included
    prompt_len: int = 64  # text tokens of each decoding prompt (plus the image)
    new_tokens: int = 64  # decoded tokens (profiled)
    steps: int = 3  # profiled training steps, after one warm-up step
    optimizer: str = "adamw"  # adamw | sgd | none (all 32 layers: AdamW states do not fit next to the model)
    grad_checkpointing: bool = False
    dtype: str = "bf16"
    kernels: str = "1"  # MINILLAVA_KERNELS: 1 (Triton on CUDA), 0 (plain torch)
    device: str = "cuda"
    top: int = 25  # kernels printed
    trace: str = ""  # write a chrome trace here (suffixed .train.json / .decode.json)


def build(a, device, dtype):
    cfg = get_preset(a.preset)
    if a.layers:
        cfg = cfg.replace(text=replace(cfg.text, num_hidden_layers=a.layers))
    with torch.device(device):
        model = Llava(cfg)
    return model.to(dtype)


def batch(model, a, device, n_text):
    """ids (B, n_text) with one image token after BOS; pixel values (B, 3, S, S); labels on the second half."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.text.vocab_size - 2, (a.batch, n_text), generator=g)
    ids[:, 0] = 1  # BOS
    ids[:, 1] = cfg.image_token_id
    labels = ids.clone()
    labels[:, : n_text // 2] = IGNORE_INDEX
    S = cfg.vision.image_size
    pix = torch.randn(a.batch, 3, S, S, generator=g)
    return ids.to(device), labels.to(device), pix.to(device, next(model.parameters()).dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def print_top(prof, device, top, title):
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n## top {top} kernels by self time: {title}")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70))


def profiled(device, trace, suffix):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, record_shapes=False), (f"{trace}.{suffix}.json" if trace else "")


def profile_train(a, model, device):
    model.train()
    model.vision_tower.requires_grad_(False)  # stage 2: CLIP frozen
    model.language_model.model.gradient_checkpointing = a.grad_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {"adamw": lambda: torch.optim.AdamW(params, lr=1e-5, foreach=True),
           "sgd": lambda: torch.optim.SGD(params, lr=1e-5), "none": lambda: None}[a.optimizer]()
    n_text = a.seq_len - model.config.num_image_tokens + 1  # the image token becomes num_image_tokens positions
    if n_text < 4:
        fail(f"profile_model.py: --seq-len {a.seq_len} leaves no room for text next to "
             f"{model.config.num_image_tokens} image positions")
    ids, labels, pix = batch(model, a, device, n_text)

    def step():
        loss_sum, n = model.loss(ids, labels, pix)
        (loss_sum / n).backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: autotuning, allocator, lazy inits
    sync(device)
    prof, trace = profiled(device, a.trace, "train")
    t0 = time.perf_counter()
    with prof:
        for _ in range(a.steps):
            step()
        sync(device)
    dt = (time.perf_counter() - t0) / a.steps
    n_params = sum(p.numel() for p in params)
    print(f"\n# train: {a.batch} x {a.seq_len} positions, {n_params / 1e6:.1f}M trainable parameters, "
          f"optimizer {a.optimizer}: {dt * 1e3:.1f} ms/step (under the profiler), "
          f"{a.batch * a.seq_len / dt:.0f} tokens/s")
    if device.type == "cuda":
        print(f"# peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print_top(prof, device, a.top, "training step")
    if trace:
        prof.export_chrome_trace(trace)
        print(f"trace written to {trace}")


@torch.no_grad()
def profile_decode(a, model, device):
    """a.batch prompts prefilled into the slots of a decode engine, then a.new_tokens greedy decode steps."""
    model.eval()
    ids, _, pix = batch(model, a, device, a.prompt_len + 2)
    warmup = 2  # decode steps before profiling: the decode kernels' first launch compiles them
    prompt = model.config.llm_length(ids[0].tolist())
    engine = Engine(model, slots=a.batch, max_seq_len=prompt + warmup + a.new_tokens + 1)
    sync(device)
    t0 = time.perf_counter()
    tokens = {b: int(engine.prefill(Request(ids[b].tolist(), pix[b:b + 1]), b).argmax()) for b in range(a.batch)}
    sync(device)
    t_prefill = time.perf_counter() - t0

    def greedy_step(tokens):
        return dict(zip(tokens, engine.decode(tokens).argmax(-1).tolist()))
    for _ in range(warmup):
        tokens = greedy_step(tokens)
    sync(device)
    prof, trace = profiled(device, a.trace, "decode")
    t0 = time.perf_counter()
    with prof:
        for _ in range(a.new_tokens):
            tokens = greedy_step(tokens)
        sync(device)
    dt = (time.perf_counter() - t0) / a.new_tokens
    print(f"\n# decode: batch {a.batch}, prompt {prompt} positions (prefill "
          f"{t_prefill * 1e3:.0f} ms), {a.new_tokens} tokens: {dt * 1e3:.2f} ms/token (under the profiler), "
          f"{a.batch / dt:.0f} tokens/s")
    print_top(prof, device, a.top, "decoding")
    if trace:
        prof.export_chrome_trace(trace)
        print(f"trace written to {trace}")


def main():
    a = parse_args(Defaults, __doc__)
    if not (a.train or a.decode):
        fail("profile_model.py: say what to profile: --train and/or --decode")
    device = torch.device(a.device)
    if device.type == "cuda":
        require_cuda("profile_model.py")
    os.environ["MINILLAVA_KERNELS"] = a.kernels
    dtype = DTYPES[a.dtype]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# profile_model.py on {name}; torch {torch.__version__}; MINILLAVA_KERNELS={a.kernels}\n# {a}")
    torch.manual_seed(0)
    model = build(a, device, dtype)
    if a.train:
        profile_train(a, model, device)
    if a.decode:
        profile_decode(a, model, device)


if __name__ == "__main__":
    main()
