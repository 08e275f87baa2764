"""The whole model on a GPU with the Triton kernels on vs off: a LLaVA-1.5-7B-shaped model (every width of the
preset, --layers decoder and tower layers) with random weights, in bf16.

    python benchmarks/gpu_model_check.py                     # on a GPU; ~1 min with the first compiles
    python benchmarks/gpu_model_check.py --device cpu --preset tiny --layers 2   # checks the script runs (CPU)

For one left-padded batch of two prompts of different lengths, each with an image, it computes
  - the logits of a forward pass,
  - the stage-2 loss and the gradient of every trained parameter (projector + LLM; the tower frozen),
  - the decode engine: each prompt (without its padding) prefilled into a slot, then --steps decode steps for
    both slots (the tokens fed are the fp32 reference's, so every run sees the same inputs), the logits of each,
three ways: the kernels in bf16 (MINILLAVA_KERNELS=1), plain PyTorch in bf16 (MINILLAVA_KERNELS=0), and plain
PyTorch in fp32 (the reference). Each quantity's error is ||x - ref|| / ||ref||. A row passes when the kernels'
error is at most 1.5x plain bf16's + 1e-3: the kernels may round differently, not worse. Exit status 1 when a
row fails, 2 when there is no GPU (nothing measured).
"""
import os
import sys
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

from benchmarks.bench_common import fail, parse_args  # noqa: E402
from minillava.config import get_preset  # noqa: E402
from minillava.engine import Engine, Request  # noqa: E402
from minillava.llava import IGNORE_INDEX  # noqa: E402
from minillava.weights import random_llava  # noqa: E402


@dataclass
class Defaults:
    preset: str = "llava-1.5-7b"
    layers: int = 2  # decoder layers and tower layers kept
    steps: int = 8  # cached decoding steps compared
    device: str = "cuda"
    seed: int = 0


def build(a):
    cfg = get_preset(a.preset)
    # enough tower layers for the feature layer (-2) to exist, and --layers decoder layers
    cfg = cfg.replace(text=replace(cfg.text, num_hidden_layers=a.layers),
                      vision=replace(cfg.vision, num_hidden_layers=max(a.layers, 2)))
    return random_llava(cfg, seed=a.seed)  # fp32, on the CPU


def batch(cfg, device):
    g = torch.Generator().manual_seed(1)
    S, img = cfg.vision.image_size, cfg.image_token_id
    lengths = (24, 40)
    T = max(lengths)
    high = cfg.image_token_id if 0 < cfg.image_token_id < cfg.text.vocab_size else cfg.text.vocab_size  # text ids
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for b, n in enumerate(lengths):  # left padding, one image token after BOS
        text = torch.randint(3, high, (n,), generator=g)
        text[0], text[1] = 1, img
        ids[b, T - n:], mask[b, T - n:] = text, True
    labels = ids.clone()
    labels[:, :T - 12] = IGNORE_INDEX  # supervise the last 12 tokens of each prompt
    pixels = torch.randn(2, 3, S, S, generator=g)
    return [x.to(device) for x in (ids, mask, labels, pixels)]


def run(model, inputs, kernels, dtype, feed=None, steps=8):
    """-> {name: tensor (float32, CPU)} and the greedy tokens chosen at each decoding step."""
    os.environ["MINILLAVA_KERNELS"] = kernels
    ids, mask, labels, pixels = inputs
    pixels = pixels.to(dtype)
    out = {"logits": model(ids, pixels, mask).float().cpu()}
    model.zero_grad(set_to_none=True)
    loss, n = model.loss(ids, labels, pixels, mask)
    (loss / n).backward()
    out["loss"] = (loss / n).detach().float().cpu()
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[f"grad {name}"] = p.grad.float().cpu()
    context = model.config.text.max_position_embeddings
    engine = Engine(model, slots=ids.shape[0], max_seq_len=min(ids.shape[1] + 576 + steps + 1, context))
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]  # the engine takes each prompt without padding
    logits = torch.cat([engine.prefill(Request(r, pixels[b:b + 1]), b) for b, r in enumerate(rows)])  # (B, V)
    chosen = []
    for step in range(steps):
        out[f"decode step {step}"] = logits.float().cpu()
        token = logits.argmax(-1) if feed is None else feed[step]
        chosen.append(token)
        logits = engine.decode(dict(enumerate(token.tolist())))
    return out, chosen


def main():
    a = parse_args(Defaults, __doc__)
    if a.device == "cuda" and not torch.cuda.is_available():
        fail("gpu_model_check.py: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"# gpu_model_check.py on {name}; torch {torch.__version__}; {a}")
    base = build(a)
    base.vision_tower.requires_grad_(False)  # stage 2: the tower is frozen
    inputs = batch(base.config, a.device)
    ref, tokens = run(base.to(a.device), inputs, "0", torch.float32, steps=a.steps)
    model16 = base.to(torch.bfloat16)
    plain, _ = run(model16, inputs, "0", torch.bfloat16, tokens, a.steps)
    ours, _ = run(model16, inputs, "1", torch.bfloat16, tokens, a.steps)

    def rel(x, r):
        return ((x - r).norm() / r.norm().clamp_min(1e-30)).item()
    failed = 0
    print(f"{'quantity':60s} {'kernels bf16':>13s} {'plain bf16':>11s}  verdict")
    groups = {"logits": ["logits"], "loss": ["loss"], "decode": [k for k in ref if k.startswith("decode")],
              "grads": [k for k in ref if k.startswith("grad")]}
    for group, keys in groups.items():
        for k in keys:
            e_ours, e_plain = rel(ours[k], ref[k]), rel(plain[k], ref[k])
            ok = e_ours <= 1.5 * e_plain + 1e-3 and e_ours == e_ours  # NaN never passes
            failed += not ok
            if not ok or group != "grads" or k == keys[0] or k == keys[-1]:  # grads: first, last, failures
                print(f"{k[:60]:60s} {e_ours:13.2e} {e_plain:11.2e}  {'ok' if ok else 'FAIL'}")
        if group == "grads":
            print(f"  ({len(keys)} gradients compared)")
    print(f"\n{'FAILED' if failed else 'PASSED'}: {failed} of {sum(map(len, groups.values()))} quantities outside "
          "1.5x plain bf16's error + 1e-3")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
