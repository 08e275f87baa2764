"""The built-in default: LLaVA's whole pipeline on a laptop CPU in a few minutes, with nothing downloaded.

    python demo.py                      # data, tokenizer, stage 1, stage 2, held-out evaluation -> demo_out/
    python generate.py --model demo_out/stage2 --image demo_out/data/images/test_000000.png \\
        --prompt "What color are the shapes?"

Each step runs the code a LLaVA-1.5-7B run uses:
 1. data       synthetic.py (minillava.synthetic, beside this file) draws small scenes (a row of 1-3 identical
               shapes) and writes them in LLaVA's formats: pretrain.json (captions), instruct.json (conversations,
               detailed descriptions, reasoning, short-answer VQA, text-only), test.json (short questions about
               held-out images), and the held-out images as a POPE and a ScienceQA benchmark (bench/).
 2. tokenizer  a LLaMA-like SentencePiece model (unk 0, bos 1, eos 2) trained on that text.
 3. base model a random CLIP-like vision tower and a random LLaMA-like decoder, written as official
               checkpoints in layout C (a CLIP dir and a LLaMA dir), as if they had been downloaded.
 4. stage 1    `train.py --stage 1`: the projector alone learns to map image features into the LLM.
 5. stage 2    `train.py --stage 2`: projector + LLM learn to follow visual instructions (CLIP frozen);
               `--image-aspect-ratio anyres` trains it the LLaVA-1.6 way (each image as tiles + image_newline).
 6. evaluation minillava.generation answers the held-out questions greedily: exact match per kind, vs chance;
               then again with the LLM's linear layers quantized to int8 and to int4 (weights/quantize.py).
 7. benchmarks `eval.py run` on the held-out images written as a POPE and a ScienceQA benchmark (LLaVA's eval
               layout): the official protocol and the official scoring, as for the paper's table. The demo
               never trains on yes/no or letter answers (a model this small, trained this briefly, was seen
               to learn their formats but not to compare a named colour or option with the image, at the cost
               of 3 minutes and 2 points held-out), so these scores show how the official scorers read
               answers in a format the model was not taught: at or below chance.

Two things differ from LLaVA because nothing here was pretrained: the base weights are random, initialised the
way a from-scratch run starts (`Llava.init_weights`), and the learning rates are those a small model trained from
scratch needs (train.py flags, like every other choice below). The vision tower stays frozen and random, as
LLaVA keeps CLIP frozen: its features still tell shapes, colours and places apart, and the projector and the
LLM learn to read them. Learning is not smooth: count and position come first, colour and shape later.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from minillava.config import LlavaConfig, TextConfig, VisionConfig


@dataclass
class DemoConfig:
    out: str = "demo_out"  # everything goes here: data/, base/, stage1/, stage2/
    seed: int = 0  # images, tokenizer, weights and data order
    n_train: int = 4000  # training images (one caption and one instruction record each)
    n_test: int = 200  # held-out images, 4 short questions each
    image_size: int = 48  # 3x3 grid of 16 px cells: one patch per cell
    vocab_size: int = 768  # SentencePiece pieces of the demo's tokenizer
    stage1_epochs: float = 1.0  # passes over the captions (projector only)
    stage1_lr: float = 1e-3  # LLaVA-1.5's stage-1 lr
    stage2_epochs: float = 10.0  # colour and shape are learned late (after ~5 epochs); 10 leaves a margin
    stage2_lr: float = 5e-4  # LLaVA uses 2e-5 on a pretrained Vicuna; a random 1M-parameter LLM needs more
    batch: int = 32  # sequences per optimizer step, both stages
    threads: int = 0  # CPU threads (0: the cores this process may use; OMP_NUM_THREADS if set)
    examples: int = 8  # held-out questions printed with the model's answers
    image_aspect_ratio: str = "pad"  # stage 2's images: pad (LLaVA-1.5) or anyres (LLaVA-1.6: tiles + image_newline)


def model_config(vocab_size: int, image_size: int) -> LlavaConfig:
    """A tiny LLaVA: 2-layer ViT (width 256, patch 16), mlp2x_gelu projector, 4-layer LLaMA (width 128)."""
    vision = VisionConfig(image_size=image_size, patch_size=16, hidden_size=256, intermediate_size=1024,
                          num_hidden_layers=2, num_attention_heads=4, projection_dim=256)
    text = TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=320, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlavaConfig(vision=vision, text=text, projector_type="mlp2x_gelu")


def write_base_checkpoint(out_dir: str, config, seed: int, tokenizer: str) -> dict:
    """Random base weights as official checkpoints in layout C: {"model": LLaMA dir, "vision": CLIP dir}."""
    from minillava.llava import Llava
    from minillava.weights.random_checkpoint import write_layout

    model = Llava(config)
    model.init_weights(seed)  # the published pretraining init, every parameter
    paths = write_layout(model, out_dir, "C", tokenizer=tokenizer)
    os.remove(paths["projector"])  # stage 1 starts a new projector; no one should mistake this one for trained
    return paths


def losses(log_path: str) -> tuple[float, float]:
    """First and last logged training loss of a train.py run (its log.jsonl)."""
    with open(log_path) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    return steps[0]["loss"], steps[-1]["loss"]


def run_stage(stage: int, cfg: DemoConfig, base: dict, data: dict, out: str, projector: str = "") -> dict:
    from minillava import train

    argv = ["--stage", str(stage), "--model", str(base["model"]), "--vision", str(base["vision"]),
            "--data", data["pretrain" if stage == 1 else "instruct"], "--image-folder", data["image_folder"],
            "--out", out, "--global-batch", str(cfg.batch), "--micro-batch", str(cfg.batch),
            "--epochs", str(cfg.stage1_epochs if stage == 1 else cfg.stage2_epochs),
            "--lr", str(cfg.stage1_lr if stage == 1 else cfg.stage2_lr), "--max-length", "256",
            "--no-grad-checkpointing", "--log-every", "50", "--save-every", "100000", "--seed", str(cfg.seed),
            "--threads", str(torch.get_num_threads())]
    if projector:
        argv += ["--projector", projector]
    if stage == 2:
        argv += ["--image-aspect-ratio", cfg.image_aspect_ratio]
    print(f"\n$ python train.py {' '.join(argv)}", flush=True)
    return train.main(argv)


def evaluate(model_dir: str, data: dict, quantize: str = "none") -> dict:
    """Greedy answers to every held-out question through minillava.generation; exact-match accuracy per kind.
    quantize: none | int8 | int4 (the LLM's linear layers, quantized while loading)."""
    from minillava import generation
    from minillava import synthetic

    model, tok = generation.load(model_dir, dtype="float32", device="cpu", quantize=quantize)
    with open(data["test"]) as f:
        test = json.load(f)
    pairs = [(os.path.join(data["image_folder"], r["image"]), r["question"]) for r in test]
    answers = generation.answer(model, tok, pairs, batch_size=50, max_new_tokens=8, temperature=0.0)
    right = {}
    for r, a in zip(test, answers):
        right.setdefault(r["kind"], []).append(synthetic.exact_match(a, r["answer"]))
    accuracy = sum(sum(v) for v in right.values()) / len(test)
    return {"accuracy": accuracy, "by_kind": {k: sum(v) / len(v) for k, v in right.items()},
            "chance": synthetic.chance_level(test), "test": test, "answers": answers}


def chance_sqa(sqa_dir: str) -> float:
    """Percent right when guessing uniformly among each problem's choices."""
    with open(os.path.join(sqa_dir, "problems.json")) as f:
        problems = json.load(f)
    return 100.0 * sum(1 / len(p["choices"]) for p in problems.values()) / len(problems)


def run_benchmark(name: str, model_dir: str, data_dir: str, out: str) -> dict:
    """`eval.py run` on one of the demo's benchmarks; -> its metrics (eval.py prints them as a table)."""
    from minillava import eval as evaluation

    argv = ["run", name, "--model", model_dir, "--data", data_dir, "--out", out, "--batch-size", "50",
            "--threads", str(torch.get_num_threads())]
    print(f"\n$ python eval.py {' '.join(argv)}", flush=True)
    if evaluation.main(argv) != 0:
        raise RuntimeError(f"eval.py run {name} failed (see above)")
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["metrics"]


def main(argv=None) -> dict:
    from minillava import synthetic

    from minillava.cli import add_config_args, set_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(p, DemoConfig, choices={"image_aspect_ratio": ("pad", "anyres")})
    cfg = DemoConfig(**vars(p.parse_args(argv)))
    print(set_threads(cfg.threads), flush=True)
    t0 = time.time()

    print(f"1-2. data and tokenizer -> {cfg.out}/data", flush=True)
    data = synthetic.write_dataset(os.path.join(cfg.out, "data"), n_train=cfg.n_train, n_test=cfg.n_test,
                                   seed=cfg.seed, image_size=cfg.image_size)
    tokenizer = synthetic.train_tokenizer(data["corpus"], os.path.join(cfg.out, "data"), cfg.vocab_size)
    config = model_config(cfg.vocab_size, cfg.image_size)
    print(f"3. random base checkpoint (layout C) -> {cfg.out}/base", flush=True)
    base = write_base_checkpoint(os.path.join(cfg.out, "base"), config, cfg.seed, tokenizer)

    stage1 = run_stage(1, cfg, base, data, os.path.join(cfg.out, "stage1"))
    stage2 = run_stage(2, cfg, base, data, os.path.join(cfg.out, "stage2"), projector=stage1["output"])
    loss1, loss2 = (losses(os.path.join(cfg.out, f"stage{k}", "log.jsonl")) for k in (1, 2))

    print("\n6. evaluation on held-out images", flush=True)
    ev = evaluate(os.path.join(cfg.out, "stage2"), data)
    shown = [j for j in (4 * i + i % 4 for i in range(cfg.examples)) if j < len(ev["test"])]  # image i, kind i % 4
    for r, a in ((ev["test"][j], ev["answers"][j]) for j in shown):
        mark = "ok " if synthetic.exact_match(a, r["answer"]) else "BAD"
        print(f"  {mark} {r['image']}  Q: {r['question'].splitlines()[0]}  A: {a!r}  (reference: {r['answer']!r})")
    quantized = {q: evaluate(os.path.join(cfg.out, "stage2"), data, q)["accuracy"] for q in ("int8", "int4")}
    print("  the same questions with the LLM's linear layers quantized while loading: " +
          ", ".join(f"{q} {a:.1%}" for q, a in quantized.items()), flush=True)
    print("\n7. benchmarks: the held-out images as POPE and ScienceQA", flush=True)
    bench = {name: run_benchmark(name, os.path.join(cfg.out, "stage2"), data[name],
                                 os.path.join(cfg.out, "eval", name)) for name in ("pope", "sqa")}
    print(f"\nstage 1 loss {loss1[0]:.3f} -> {loss1[1]:.3f} ({stage1['steps']} steps)")
    print(f"stage 2 loss {loss2[0]:.3f} -> {loss2[1]:.3f} ({stage2['steps']} steps)")
    kinds = "  ".join(f"{k} {v:.1%}" for k, v in ev["by_kind"].items())
    print(f"held-out accuracy {ev['accuracy']:.1%} ({len(ev['test'])} questions: {kinds}); chance {ev['chance']:.1%}"
          f"; quantized: int8 {quantized['int8']:.1%}, int4 {quantized['int4']:.1%} (groups of 64)")
    print(f"POPE F1 {bench['pope']['f1']:.1f} (accuracy {bench['pope']['accuracy']:.1f}, chance 50.0); "
          f"ScienceQA-format accuracy {bench['sqa']['accuracy']:.1f} (chance {chance_sqa(data['sqa']):.1f})")
    print(f"total {time.time() - t0:.0f} s.  Ask it yourself:\n  python generate.py --model {cfg.out}/stage2 "
          f"--image {cfg.out}/data/images/test_000000.png --prompt \"How many shapes are there?\"")
    return {"accuracy": ev["accuracy"], "by_kind": ev["by_kind"], "chance": ev["chance"], "quantized": quantized,
            "stage1_loss": loss1, "stage2_loss": loss2, "benchmarks": bench, "seconds": time.time() - t0}


def cli() -> int:
    """The command line (`python demo.py`, `minillava-demo`)."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
