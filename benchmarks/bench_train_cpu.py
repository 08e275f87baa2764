"""One training step on CPU: minillava (what train.py runs) vs transformers' LlavaForConditionalGeneration, same
weights, same batch, same trainable set, same optimizer, same threads.

    python benchmarks/bench_train_cpu.py                     # stage-2 step: projector + LLM train, CLIP frozen
    python benchmarks/bench_train_cpu.py --threads 2 --repeat 7 --batch 4

The model: a random LLaVA-1.5-shaped checkpoint in layout A (llava-hf), loaded by both libraries from the very
same file: LLM 8 x 512 (8 heads, MLP 1408, vocabulary 32064: ~51M parameters), CLIP at 336 px with 14 px
patches (576 image positions per image, as LLaVA-1.5) but a small tower (4 x 256), the mlp2x_gelu projector.
The batch: `--batch` sequences of one image and `--text` text ids (the last 40% supervised, as a reply), every
other one `--pad` ids shorter (right padding, as train.py collates), fp32.

A step = zero_grad, forward, loss (mean over the supervised tokens), backward, AdamW. minillava runs
train.py's own LossModel (Llava.loss: summed cross-entropy, divided by the token count as train.py does);
transformers gets `labels` (its mean cross-entropy) with the image id repeated Np times in input_ids and
its default attention (SDPA). The runs alternate (ours, theirs, ours, ...) so that load from other processes on a
shared machine falls on both; each figure is the median (and best) of --repeat steps. The first step's losses
must agree (same weights, same batch): the script checks it.
"""
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root
from benchmarks import bench_common as common  # noqa: E402
from minillava.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402

CONFIG = LlavaConfig(
    vision=VisionConfig(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, projection_dim=256),
    text=TextConfig(vocab_size=32064, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048),
    image_token_id=32000, pad_token_id=32001)


@dataclass
class Defaults:
    threads: int = torch.get_num_threads()
    repeat: int = 5  # timed steps per library (after 2 warm-up steps each)
    batch: int = 2  # sequences per step
    text: int = 160  # text ids per sequence (plus one image = 576 positions)
    pad: int = 24  # every other sequence is this many ids shorter
    grad_checkpointing: bool = False
    dir: str = ""  # where the checkpoint is written (default: a temporary directory)


def make_batch(a):
    """-> minillava batch (one image id per image) and the transformers batch (the image id repeated Np times)."""
    g = torch.Generator().manual_seed(0)
    img, Np = CONFIG.image_token_id, CONFIG.num_image_tokens
    rows, labels = [], []
    for b in range(a.batch):
        n = a.text - (a.pad if b % 2 else 0)
        ids = torch.randint(3, 31999, (n,), generator=g).tolist()
        ids = [1] + ids[:20] + [img] + ids[20:]  # BOS, a system prompt, the image, the question and reply
        n_sup = int(0.4 * n)
        rows.append(ids)
        labels.append([-100] * (len(ids) - n_sup) + ids[-n_sup:])
    T = max(map(len, rows))

    def pad(r, v):
        return r + [v] * (T - len(r))

    ours = {"input_ids": torch.tensor([pad(r, 0) for r in rows]),
            "labels": torch.tensor([pad(r, -100) for r in labels]),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]).bool(),
            "pixel_values": torch.randn(a.batch, 3, 336, 336, generator=g)}
    x_rows = [[j for i in r for j in ([img] * Np if i == img else [i])] for r in rows]
    x_labels = [[j for i, y in zip(r, ls) for j in ([-100] * Np if i == img else [y])] for r, ls in zip(rows, labels)]
    T = max(map(len, x_rows))
    theirs = {"input_ids": torch.tensor([r + [0] * (T - len(r)) for r in x_rows]),
              "labels": torch.tensor([r + [-100] * (T - len(r)) for r in x_labels]),
              "attention_mask": torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in x_rows]),
              "pixel_values": ours["pixel_values"]}
    n_tokens = int(ours["attention_mask"].sum()) + a.batch * (Np - 1)
    return ours, theirs, n_tokens


def main():
    a = common.parse_args(Defaults, __doc__)
    torch.set_num_threads(a.threads)
    from transformers import LlavaForConditionalGeneration
    from minillava import train
    from minillava.weights import load_llava, write_random_checkpoint

    root = a.dir or tempfile.mkdtemp(prefix="bench_train_")
    ckpt = os.path.join(root, "llava-51m")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        write_random_checkpoint(ckpt, CONFIG, "A", seed=0)
    ours_batch, theirs_batch, n_tokens = make_batch(a)

    # minillava: train.py's stage-2 set-up (CLIP frozen, projector + LLM train) and its loss module
    llava = load_llava(ckpt)
    cfg = train.TrainConfig(stage=2, model=ckpt, data="-", grad_checkpointing=a.grad_checkpointing)
    train.set_trainable(llava, train.resolve(cfg))
    llava.language_model.model.gradient_checkpointing = a.grad_checkpointing
    ours = train.LossModel(llava)
    n_sup = int((ours_batch["labels"] != -100).sum())

    hf = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    hf.model.vision_tower.requires_grad_(False)
    hf.train()
    if a.grad_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
        sum(p.numel() for p in hf.parameters() if p.requires_grad)

    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
            for name, m in (("ours", ours), ("theirs", hf))}

    def step_ours():
        opts["ours"].zero_grad(set_to_none=True)
        loss = ours(**ours_batch) / n_sup
        loss.backward()
        opts["ours"].step()
        return loss.item()

    def step_theirs():
        opts["theirs"].zero_grad(set_to_none=True)
        loss = hf(**theirs_batch).loss
        loss.backward()
        opts["theirs"].step()
        return loss.item()

    steps = {"minillava": step_ours, "transformers": step_theirs}
    first = {name: fn() for name, fn in steps.items()}
    if abs(first["minillava"] - first["transformers"]) > 1e-4 * abs(first["transformers"]):
        sys.exit(f"first-step losses differ: {first}; the comparison is not valid")
    for fn in steps.values():
        fn()  # second warm-up step (AdamW state now allocated)
    times = {name: [] for name in steps}
    for _ in range(a.repeat):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    n_train = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    print(f"LLaVA: LLM {sum(p.numel() for p in llava.language_model.parameters()) / 1e6:.0f}M, CLIP "
          f"{sum(p.numel() for p in llava.vision_tower.parameters()) / 1e6:.1f}M (frozen); {n_train / 1e6:.1f}M "
          f"trainable; batch {a.batch} x {ours_batch['input_ids'].shape[1] - 1 + CONFIG.num_image_tokens} positions "
          f"({n_tokens} real, {n_sup} supervised); fp32, {a.threads} thread(s), grad checkpointing "
          f"{'on' if a.grad_checkpointing else 'off'}; first-step loss {first['minillava']:.6f} vs "
          f"{first['transformers']:.6f}")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(f"{name:13s} step {med[name] * 1e3:8.1f} ms median, {min(ts) * 1e3:8.1f} ms best of {len(ts)} "
              f"({n_tokens / med[name]:7.0f} tokens/s)")
    best = min(times["transformers"]) / min(times["minillava"])
    print(f"speed-up (transformers / minillava): {med['transformers'] / med['minillava']:.2f}x median, "
          f"{best:.2f}x best (target >= 1.2x)")


if __name__ == "__main__":
    main()
