"""Peak memory of loading a checkpoint: the process's peak RSS against the checkpoint's tensor bytes.

    python benchmarks/load_memory.py                          # writes a ~2.3 GB bf16 layout-A checkpoint, measures
    python benchmarks/load_memory.py --layout B               # the same weights as original LLaVA + a CLIP dir
    python benchmarks/load_memory.py --checkpoint DIR [--vision CLIP_DIR] [--projector FILE]   # your own
    python benchmarks/load_memory.py --load-dtype float32     # with a cast (a copy is then unavoidable)
    python benchmarks/load_memory.py --quantize int8          # quantized while loading (issue 14's target)

load_llava builds the model on the meta device and assigns the memory-mapped tensors themselves (no copy), so
after loading and reading every weight the process holds the file's pages once plus what Python and torch
hold anyway. Target: peak RSS < 1.25x the checkpoint's tensor bytes (issue 2).

Measured in a fresh child process (nothing else in it): RSS after `import torch, minillava` (the baseline),
then the peak (VmHWM) after load_llava, after reading every weight byte (as a forward pass would; pages of a
mapped file count in RSS only once touched), and after a short text-only forward. The random checkpoint has
LLaVA-1.5-7B's widths (CLIP ViT-L/14-336, LLM 4096 wide, vocabulary 32064) with fewer LLM layers.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclasses.dataclass
class Config:
    checkpoint: str = ""  # an existing checkpoint dir; empty: write a random one to --out
    vision: str = ""  # its CLIP dir (layouts B, C)
    projector: str = ""  # its projector file (layout C)
    out: str = "/tmp/minillava_load_memory"  # where the random checkpoint goes (reused when present)
    layout: str = "A"  # the random checkpoint's layout
    text_layers: int = 3  # LLM layers of the random checkpoint (4096 wide: ~0.4 GB each in bf16)
    dtype: str = "bfloat16"  # the checkpoint's stored dtype (of the random one: the dtype it is written in)
    load_dtype: str = ""  # dtype to load in; empty: --dtype (no cast, so no copy)
    quantize: str = "none"  # int8 | int4: quantize the LLM's linear layers while loading (weights/quantize.py)


def rss_kb() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


def child(cfg: Config):
    """Runs in the measured process: prints one JSON line."""
    import torch
    import minillava  # noqa: F401  (imported before the baseline: it is part of any program that loads)
    from minillava import generation  # (imported before the baseline, as minillava)
    from minillava.weights import load_llava
    from minillava.weights.quantize import Quantization
    base = rss_kb()["VmRSS"]
    t0 = time.perf_counter()
    model = load_llava(cfg.checkpoint, vision_path=cfg.vision or None, projector_path=cfg.projector or None,
                       dtype=getattr(torch, cfg.load_dtype or cfg.dtype), quantize=Quantization.parse(cfg.quantize))
    t_load = time.perf_counter() - t0
    after_load = rss_kb()["VmHWM"]
    tensors = generation.weight_tensors(model)  # a quantized layer's codes and scales too; tied weights once
    t0 = time.perf_counter()
    # max over the raw bytes reads every byte and, unlike a sum, needs no wider temporary; oneDNN's packed int8
    # weights are opaque, read through a dense copy of one weight at a time.
    checksum = sum(int((t.to_dense() if t.is_mkldnn else t).reshape(-1).view(torch.uint8).max()) for t in tensors)
    t_read = time.perf_counter() - t0
    after_read = rss_kb()["VmHWM"]
    with torch.no_grad():
        model.language_model(torch.tensor([[1, 319, 1024, 4096, 29871, 13]]))
    after_forward = rss_kb()["VmHWM"]
    print(json.dumps({"baseline_kb": base, "after_load_kb": after_load, "after_read_kb": after_read,
                      "after_forward_kb": after_forward, "model_bytes": sum(t.numel() * t.element_size()
                                                                           for t in tensors),
                      "load_s": t_load, "read_s": t_read, "checksum": checksum,
                      "dtype": str(next(iter(tensors)).dtype)}))


def tensor_bytes(paths, select=lambda key: True) -> int:
    """Bytes of the tensors `select` keeps in the checkpoint's weight files (headers excluded; ignored keys
    included)."""
    from minillava.weights.load import read_safetensors_header
    total = 0
    for p in paths:
        p = Path(p)
        for f in ([p] if p.is_file() else sorted(p.glob("*.safetensors"))):
            _, header = read_safetensors_header(f)
            total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                         if k != "__metadata__" and select(k))
    return total


def write_checkpoint(cfg: Config) -> Config:
    import torch
    from minillava.config import LlavaConfig, TextConfig
    from minillava.weights import write_random_checkpoint
    config = LlavaConfig(text=TextConfig(vocab_size=32064, num_hidden_layers=cfg.text_layers))  # 7B widths
    out = Path(cfg.out) / f"{cfg.layout.replace(chr(39), 'p')}-{cfg.dtype}-{cfg.text_layers}"
    if not (out / "done").exists():
        print(f"writing a random {cfg.dtype} layout-{cfg.layout} checkpoint to {out} ...", flush=True)
        t0 = time.perf_counter()
        paths = write_random_checkpoint(out / "ckpt", config, cfg.layout, dtype=getattr(torch, cfg.dtype),
                                        max_shard_bytes=10**9)
        (out / "done").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
        print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    paths = json.loads((out / "done").read_text())
    return dataclasses.replace(cfg, checkpoint=paths["model"], vision=paths.get("vision", ""),
                               projector=paths.get("projector", ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    cfg = Config(**{k: v for k, v in vars(p.parse_args(argv)).items() if k != "child"})
    if p.parse_args(argv).child:
        return child(cfg)
    if not cfg.checkpoint:
        cfg = write_checkpoint(cfg)
    args = [f"--{f.name.replace('_', '-')}={getattr(cfg, f.name)}" for f in dataclasses.fields(Config)]
    run = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"the measured process failed:\n{run.stderr}")
    r = json.loads(run.stdout.strip().splitlines()[-1])
    ckpt = tensor_bytes([x for x in (cfg.checkpoint, cfg.vision, cfg.projector) if x])
    gb = 2**30
    print(f"checkpoint {cfg.checkpoint}" + (f" + {cfg.vision}" if cfg.vision else ""))
    print(f"checkpoint tensor bytes  {ckpt / gb:7.3f} GiB   (model holds {r['model_bytes'] / gb:.3f} GiB "
          f"as {r['dtype']}; load {r['load_s']:.2f} s, reading every byte {r['read_s']:.1f} s)")
    print(f"RSS after imports        {r['baseline_kb'] / 2**20:7.3f} GiB")
    model = r["model_bytes"]
    for name, key in (("load_llava", "after_load_kb"), ("reading all weights", "after_read_kb"),
                      ("a forward pass", "after_forward_kb")):
        peak = r[key] * 1024
        print(f"peak RSS after {name:<20s} {peak / gb:7.3f} GiB = {peak / ckpt:.3f}x checkpoint tensor bytes, "
              f"{peak / model:.3f}x the loaded model's ({(peak - r['baseline_kb'] * 1024) / model:.3f}x above the "
              "import baseline)")
    if cfg.quantize != "none":  # issue 14: peak < the quantized model's bytes + one layer + 10%
        one = tensor_bytes([cfg.checkpoint], lambda k: ".layers.0." in k and "vision" not in k)  # one LLM layer
        limit = 1.1 * (model + one)
        peak = (r["after_forward_kb"] - r["baseline_kb"]) * 1024
        print(f"target ({cfg.quantize}) peak RSS above the import baseline < 1.1 x (model {model / gb:.3f} GiB + one "
              f"layer {one / gb:.3f} GiB) = {limit / gb:.3f} GiB: {'met' if peak < limit else 'NOT met'} "
              f"({peak / gb:.3f} GiB)")
        return
    ratio = r["after_forward_kb"] * 1024 / ckpt
    note = "" if model == ckpt else " (with a cast the model's own bytes exceed the checkpoint's: see the ratio above)"
    print(f"target peak RSS < 1.25x checkpoint tensor bytes: {'met' if ratio < 1.25 else 'NOT met'} "
          f"({ratio:.3f}x){note}")

if __name__ == "__main__":
    main()
