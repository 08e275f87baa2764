"""Train LLaVA: stage 1 (feature alignment: the projector) or stage 2 (visual instruction tuning: projector + LLM,
or LoRA adapters), on a CPU, one GPU, or many of either through torchrun. The recipe is LLaVA-1.5's
(the table in the README); every default is in TrainConfig below and every field is a flag, explained
by `python train.py --help`.

    # stage 1 from CLIP + Vicuna (layout C), writes OUT/mm_projector.safetensors
    python train.py --stage 1 --model vicuna-7b-v1.5 --vision clip-vit-large-patch14-336 \\
        --data blip_laion_cc_sbu_558k.json --image-folder LLaVA-Pretrain/images --out runs/stage1
    # stage 2 from the stage-1 projector, writes OUT/ in layout A (llava-hf) with tokenizer.model
    python train.py --stage 2 --model vicuna-7b-v1.5 --vision clip-vit-large-patch14-336 \\
        --projector runs/stage1/mm_projector.safetensors --data llava_v1_5_mix665k.json --image-folder data \\
        --out runs/stage2                        # add --lora 128 for LoRA (merged into the weights on save)
    # 8 GPUs: FSDP2 (one shard unit per decoder block; --ddp for DDP); on CPU the same line runs with gloo
    torchrun --nproc_per_node 8 train.py --stage 2 ...
    # CPU, seconds: a tiny random LLaVA (layout C) and synthetic.py's dataset (what demo.py does, larger)
    python -c "import dataclasses as d; from minillava import synthetic as s; from minillava.config import \
    get_preset; from minillava.weights import write_random_checkpoint as w; \
    p = s.write_dataset('runs/data', n_train=200); c = get_preset('tiny'); \
    w('runs/tiny', c.replace(text=d.replace(c.text, vocab_size=512)), 'C', \
    tokenizer=s.train_tokenizer(p['corpus'], 'runs/tok', 512))"
    python train.py --stage 1 --model runs/tiny/llama --vision runs/tiny/clip --data runs/data/pretrain.json \
        --image-folder runs/data --out runs/stage1 --global-batch 16 --micro-batch 8 --max-length 256 \
        --no-grad-checkpointing --log-every 4
    python train.py --stage 2 --model runs/tiny/llama --vision runs/tiny/clip \
        --projector runs/stage1/mm_projector.safetensors --data runs/data/instruct.json --image-folder runs/data \
        --out runs/stage2 --global-batch 16 --micro-batch 8 --max-length 256 --no-grad-checkpointing --log-every 4
    torchrun --nproc_per_node 2 train.py --stage 2 ...  # the same on 2 CPU processes (gloo), same loss curve

Outputs in --out: log.jsonl (one JSON line per logged step), data_report.json (records left out and why),
checkpoints/step_NNNNNNN.pt (trainable weights, optimizer, step, RNG; --resume continues from the newest),
profile/ (--profile), and the result: mm_projector.safetensors (stage 1) or the layout-A model (stage 2).
Python: `main(["--stage", "1", ...])` runs the same code as the command line and returns
{"output": the saved path, "model": the trained Llava (LoRA merged; None on ranks > 0), "steps": n}.
"""
import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import resource
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from minillava import data
from minillava.cli import (add_config_args, device_from_flag, first_lines, optional_bool, set_threads,
                           wrong_image_folder)
from minillava.kernels.dispatch import report, startup_line
from minillava.llava import Llava
from minillava.lora import apply_lora, merge_lora
from minillava.tokenizer import Tokenizer
from minillava.weights import load_llava, save_llava, save_projector
from minillava.weights.save import atomic_file, fsync


@dataclass
class TrainConfig:
    stage: int = 2  # 1: projector only (CLIP + LLM frozen); 2: projector + LLM, or LoRA (CLIP frozen)
    model: str = ""  # LLM dir (layout C, config "llama"), or a LLaVA dir (layouts A, B)
    vision: str = ""  # CLIP dir (layouts B, C)
    projector: str = ""  # stage-1 projector file (stage 2 from layout C)
    tokenizer: str = ""  # tokenizer.model or a dir holding one (default: the --model dir's)
    tokenizer_legacy: str = ""  # true | false: overrides "legacy" of the tokenizer_config.json beside it
    data: str = ""  # the official JSON list of records
    image_folder: str = ""  # image paths in --data are relative to it
    out: str = "out"  # output dir: model files, checkpoints/, log.jsonl, data_report.json
    template: str = ""  # plain, vicuna_v1, llava_v1, llava_hf, mistral_instruct (default: plain / vicuna_v1)
    image_aspect_ratio: str = ""  # pad | square | anyres (LLaVA-1.6: a 1.5 model gains a fresh image_newline)
    mm_projector_type: str = ""  # stage 1's fresh projector: mlp2x_gelu (1.5, default), linear (LLaVA v1), mlpNx_gelu
    mm_vision_select_layer: int = None  # the CLIP layer the projector reads (default: the checkpoint's; 1.5: -2)
    # optimisation; 0 means "the recipe's value for this stage" (RECIPES)
    lr: float = 0.0  # peak learning rate, cosine decay after a linear warmup (0: 1e-3 stage 1, 2e-5 stage 2, 2e-4 LoRA)
    projector_lr: float = 0.0  # the projector's lr; LoRA recipe 2e-5, else = lr
    global_batch: int = 0  # sequences per optimizer step, over all ranks and accumulation steps
    micro_batch: int = 4  # sequences per forward/backward on one rank
    epochs: float = 1.0  # passes over the data (fractions allowed)
    max_steps: int = 0  # > 0: train this many optimizer steps instead of `epochs`
    warmup_ratio: float = 0.03  # fraction of the steps with a linear lr warmup
    weight_decay: float = 0.0  # AdamW; biases and norm weights never decay
    grad_clip: float = 1.0  # max global grad norm (0: no clipping)
    max_length: int = 2048  # LLM positions per sample, each image counting Np
    group_by_modality_length: bool = True  # batches all-image or all-text, of similar lengths (the original's)
    lora: int = 0  # LoRA rank (0: full fine-tuning); the recipe uses 128
    lora_alpha: float = 0.0  # 0: 2 * rank (256 for r 128)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    grad_checkpointing: bool = True  # recompute each decoder block in backward
    ddp: bool = False  # under torchrun: DDP instead of FSDP2
    seed: int = 42  # initial weights of new modules, data order
    # bookkeeping
    log_every: int = 10  # optimizer steps between log lines (and log.jsonl records)
    save_every: int = 500  # optimizer steps between checkpoints; one is always written at the end
    keep_checkpoints: int = 2  # checkpoints kept in OUT/checkpoints (older ones are deleted)
    resume: bool = False  # continue from the newest checkpoint in OUT/checkpoints (if there is one)
    skip_bad_records: bool = False  # train without the records the data check rejects (listed)
    workers: int = -1  # data loader and data check processes (-1: 4 on GPU, 0 on CPU)
    profile: bool = False  # torch profiler trace of steps 3-5 to OUT/profile/
    device: str = ""  # cuda or cpu (default: cuda when available)
    threads: int = 0  # CPU threads per process (0: the cores this process may use; OMP_NUM_THREADS if set)


RECIPES = {1: dict(lr=1e-3, global_batch=256, template="plain"),
           2: dict(lr=2e-5, global_batch=128, template="vicuna_v1")}
LORA_RECIPE = dict(lr=2e-4, projector_lr=2e-5)
# Fields that change what a resumed run computes; the others (logging, workers...) may differ.
RESUME_FREE = {"out", "resume", "log_every", "save_every", "keep_checkpoints", "workers", "profile", "device",
               "threads", "skip_bad_records", "grad_checkpointing", "ddp", "micro_batch"}


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, TrainConfig, choices={"stage": (1, 2), "tokenizer_legacy": ("", "true", "false"),
                                             "image_aspect_ratio": ("", "pad", "square", "anyres")})
    return TrainConfig(**vars(p.parse_args(argv)))


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the recipe's values into the fields left at 0 / "", and check the combination."""
    recipe = {**RECIPES[cfg.stage], **(LORA_RECIPE if cfg.lora else {})}
    changes = {k: v for k, v in recipe.items() if not getattr(cfg, k)}
    cfg = dataclasses.replace(cfg, **changes)
    cfg = dataclasses.replace(cfg, projector_lr=cfg.projector_lr or cfg.lr,
                              lora_alpha=cfg.lora_alpha or 2.0 * cfg.lora)
    for name in ("model", "data"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    if cfg.lora and cfg.stage != 2:
        raise ValueError("--lora is a stage-2 option (stage 1 trains the projector only)")
    if cfg.stage == 2 and cfg.template == "plain":
        raise ValueError("stage 2 trains on conversations: --template plain is stage 1's")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers: with one process every collective is skipped

def setup_distributed(cfg: TrainConfig):
    """-> (rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU."""
    device = device_from_flag(cfg.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def gather_objects(obj, world: int, group=None) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(world: int):
    if world > 1:
        dist.barrier()


class TrainingError(RuntimeError):
    """A run that cannot start or go on (bad data, non-finite loss, changed inputs on resume)."""


# ----------------------------------------------------------------------------------------------------------
# Model

class LossModel(torch.nn.Module):
    """DDP and FSDP run their communication hooks around forward(): route Llava.loss through it.

    Every rank must run the same modules, forward and backward, in each micro-step: FSDP2 all-gathers a sharded
    block when it runs either way (a collective every rank joins), and DDP and FSDP reduce the gradients of the
    same parameters on every rank. A micro-batch without images (LLaVA-1.5's mix holds 40K text-only records
    among 665K) would skip the tower and the projector on its rank alone, and in stage 1 even the LLM's
    backward. So, as the original gives a text-only sample a zero image, such a micro-batch encodes one black
    image and adds 0 x its features to the LLM's input (Llava.embed_inputs): the same collectives in the same
    order, gradients of exactly 0 where the image path was unused, the same loss. One process runs the same
    code, so it computes what many do."""

    def __init__(self, llava):
        super().__init__()
        self.llava = llava

    def forward(self, input_ids, labels, attention_mask, pixel_values, image_sizes):
        zero_image = self.zero_image_features(input_ids.device) if pixel_values is None else None
        loss, _ = self.llava.loss(input_ids, labels, pixel_values, attention_mask, image_sizes,
                                  image_features=zero_image)  # summed over tokens
        return loss

    def zero_image_features(self, device) -> list:
        """The features of one all-zero image at the tower's size (AnyRes: with its tiles and image_newline)."""
        S = self.llava.config.vision.image_size
        pixels = torch.zeros(self.llava.config.image_tiles((S, S)), 3, S, S, device=device)  # (N_tiles, 3, S, S)
        return self.llava.encode_images(pixels, [(S, S)])


def load_model(cfg: TrainConfig):
    fresh = cfg.stage == 1 and not cfg.projector  # on a LLaVA checkpoint, load_llava says it has its projector
    if cfg.mm_projector_type and not fresh:
        raise ValueError("--mm-projector-type chooses stage 1's fresh projector; a projector that is loaded keeps "
                         "its own type")
    model = load_llava(cfg.model, vision_path=cfg.vision or None, new_projector=fresh,
                       projector_path=cfg.projector or None, projector_type=cfg.mm_projector_type or None)
    if getattr(model, "quantization", None):
        raise ValueError(f"--model {cfg.model} is quantized ({model.quantization}): its layers are for inference; "
                         "train from the dense checkpoint it was made from")
    if cfg.mm_vision_select_layer is not None:
        n = model.config.vision.num_hidden_layers
        if not -n - 1 <= cfg.mm_vision_select_layer <= n:
            raise ValueError(f"--mm-vision-select-layer {cfg.mm_vision_select_layer}: the tower has {n} layers "
                             f"(hidden states {-n - 1}..{n}, the embeddings first; LLaVA-1.5 takes -2)")
        model.config = model.config.replace(vision_feature_layer=cfg.mm_vision_select_layer)
    if cfg.image_aspect_ratio == "anyres" and not model.config.anyres:
        model.use_anyres(seed=cfg.seed)
    elif cfg.image_aspect_ratio and cfg.image_aspect_ratio != model.config.image_aspect_ratio:
        if model.config.anyres:
            raise ValueError(f"{cfg.model} is a LLaVA-1.6 (anyres) model: it cannot train with "
                             f"--image-aspect-ratio {cfg.image_aspect_ratio}")
        model.config = model.config.replace(image_aspect_ratio=cfg.image_aspect_ratio)
    return model


def set_trainable(model, cfg: TrainConfig):
    """Stage 1: the projector. Stage 2: projector + LLM, or projector + LoRA adapters. CLIP never: with no
    parameter (and no input) requiring a gradient, autograd records nothing for it, exactly as under no_grad."""
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    if model.config.anyres:  # the learned row end belongs with the projector (the original trains both)
        model.image_newline.requires_grad_(True)
    if cfg.stage == 2 and cfg.lora:
        apply_lora(model.language_model.model, cfg.lora, cfg.lora_alpha, cfg.lora_dropout)  # not lm_head
    elif cfg.stage == 2:
        model.language_model.requires_grad_(True)
    model.train()
    model.vision_tower.eval()


def source_files(cfg: TrainConfig) -> dict:
    """Where the frozen weights come from: every weight/config file with its size and mtime, so a resumed
    run can tell that they are the same files (a checkpoint stores only the trainable tensors)."""
    out = {}
    for path in (cfg.model, cfg.vision, cfg.projector):
        if not path:
            continue
        files = sorted(glob.glob(os.path.join(path, "*"))) if os.path.isdir(path) else [path]
        for f in files:
            if f.endswith((".safetensors", ".bin", ".json")):
                st = os.stat(f)
                out[os.path.abspath(f)] = [st.st_size, st.st_mtime_ns]
    return out


def param_groups(model, cfg: TrainConfig) -> list:
    """AdamW groups: projector vs the rest (their own lr), weight decay only on matrices."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            proj = ".multi_modal_projector." in f".{name}" or name == "image_newline"
            key = (proj, p.dim() >= 2)
            groups.setdefault(key, []).append(p)
    return [{"params": ps, "base_lr": cfg.projector_lr if proj else cfg.lr,
             "weight_decay": cfg.weight_decay if decay else 0.0} for (proj, decay), ps in sorted(groups.items())]


def lr_scale(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps (the first step already gets 1/warmup), then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def wrap_model(model, cfg, world: int, device):
    """One process: as is. torchrun: FSDP2 (`fully_shard` each decoder and CLIP block, then the root) or DDP."""
    loss_model = LossModel(model)
    if world == 1:
        return loss_model
    if cfg.ddp:
        return DDP(loss_model, device_ids=[device.index] if device.type == "cuda" else None)
    # On GPU the all-gathered weights are bf16 (half the traffic), gradients are reduced in fp32.
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for block in [*model.vision_tower.vision_model.encoder.layers, *model.language_model.model.layers]:
        fully_shard(block, mp_policy=mp)
    return fully_shard(loss_model, mp_policy=mp)


def accumulation_context(model, cfg, world: int, sync: bool):
    """Gradients are reduced across ranks only on the last micro-step of an optimizer step."""
    if world == 1:
        return nullcontext()
    if cfg.ddp:
        return nullcontext() if sync else model.no_sync()
    model.set_requires_gradient_sync(sync)
    return nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: atomic (temporary file, fsync, rename), so a crash or a full disk never breaks the last one

def atomic_torch_save(obj, path: str):
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # weights/save.py: temporary sibling, fsync, rename
        torch.save(obj, f)


def list_checkpoints(out: str) -> list:
    """Finished checkpoints, oldest first (temporary files of an interrupted save are not listed)."""
    return sorted(glob.glob(os.path.join(out, "checkpoints", "step_*.pt")))


def open_log(path: str, start: int):
    """log.jsonl for appending. A fresh run starts it empty; a run resumed at step `start` drops the records
    of steps after the checkpoint (the interrupted run logged them, and they are about to be run again), then
    marks the resume."""
    if not start:
        return open(path, "w")
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start]
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.writelines(kept)
        f.write(json.dumps({"event": "resume", "step": start}) + "\n")
    return open(path, "a")


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(model, opt, step, meta, cfg, rank, world, device):
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = {"step": step, "model": get_model_state_dict(model, options=opts),
             "optimizer": get_optimizer_state_dict(model, opt, options=opts),
             "rng": gather_objects(rng_state(device), world), "world_size": world, **meta}
    if rank == 0:
        os.makedirs(os.path.join(cfg.out, "checkpoints"), exist_ok=True)
        path = os.path.join(cfg.out, "checkpoints", f"step_{step:07d}.pt")
        try:
            atomic_torch_save(state, path)
        except OSError as e:
            raise TrainingError(f"could not write checkpoint {path} ({e}); the previous checkpoints are "
                                f"untouched: {', '.join(map(os.path.basename, list_checkpoints(cfg.out))) or 'none'}")
        for old in list_checkpoints(cfg.out)[:-cfg.keep_checkpoints]:
            os.remove(old)
    barrier(world)


def load_checkpoint(model, opt, path, meta, cfg, rank, world, device) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    changed = [k for k in meta if state.get(k) != meta[k]]
    if changed:
        raise TrainingError(f"{path} was written by a different run ({', '.join(changed)} differ): "
                            + "; ".join(_diff(state.get(k), meta[k]) for k in changed))
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, state["model"], options=opts)
    set_optimizer_state_dict(model, opt, state["optimizer"], options=opts)
    if state["world_size"] == world:
        set_rng_state(state["rng"][rank], device)
    else:  # dropout masks will differ from an uninterrupted run; everything else is restored
        print(f"[rank {rank}] note: checkpoint from {state['world_size']} processes, now {world}: "
              "RNG streams reseeded", flush=True)
        torch.manual_seed(cfg.seed + state["step"] + rank)
    return state["step"]


def _diff(old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:5])
    return f"{str(old)[:80]} -> {str(new)[:80]}"


def full_model(model, llava, cfg, rank, world):
    """The trained Llava with every tensor in full on rank 0 (FSDP shards gathered), LoRA merged; else None."""
    if world == 1:  # the model itself
        merge_lora(llava)
        return llava
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    with torch.device("meta"):
        out = Llava(llava.config)
        if cfg.lora:
            apply_lora(out.language_model.model, cfg.lora, cfg.lora_alpha)
    out.load_state_dict({k.removeprefix("llava."): v for k, v in sd.items()}, assign=True)
    out.language_model.tie_weights()
    merge_lora(out)
    return out


def export(model, cfg, tokenizer):
    """Stage 1: OUT/mm_projector.safetensors. Stage 2: the layout-A model files in OUT, beside the run's log and
    checkpoints. save_llava writes them into a fresh directory (fsynced); config.json is the commit mark: the old
    one is removed first and the new one renamed in last, so OUT never holds a config.json with a mix of old and
    new shards (in between, loading OUT fails on the missing config.json; the checkpoints can redo the export)."""
    if cfg.stage == 1:
        return save_projector(model, os.path.join(cfg.out, "mm_projector.safetensors"))
    tmp = os.path.join(cfg.out, f".model.tmp{os.getpid()}")
    save_llava(model, tmp, tokenizer=tokenizer)
    config = os.path.join(cfg.out, "config.json")
    if os.path.exists(config):
        os.remove(config)
        fsync(cfg.out)
    names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
    for old in glob.glob(os.path.join(cfg.out, "model*.safetensors*")):
        if os.path.basename(old) not in names:
            os.remove(old)  # shards of an earlier save that this one does not overwrite
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(cfg.out, name))
    os.rmdir(tmp)
    fsync(cfg.out)
    return cfg.out


# ----------------------------------------------------------------------------------------------------------
# Data

def prepare_data(cfg, model, tokenizer, rank, world, workers):
    """Read and check every record (shared out over ranks and worker processes) and report what is left out.
    -> (records, DataConfig, usable samples sorted by index)."""
    records = data.read_records(cfg.data)
    mc = model.config
    dcfg = data.DataConfig(image_folder=cfg.image_folder, template=cfg.template, tokenizer=tokenizer, model=mc,
                           max_length=cfg.max_length)
    t0 = time.time()
    mine = data.check_records(records, dcfg, range(rank, len(records), world), workers)
    checked = sorted((c for part in gather_objects(mine, world) for c in part), key=lambda c: c.index)
    bad = [c for c in checked if c.problem]
    excluded = [c for c in checked if c.excluded]
    if rank == 0:
        s = data.summarize(checked)
        print(f"data: {s['records']} records checked in {time.time() - t0:.1f}s: {s['usable']} usable "
              f"({s['with_image']} with an image, {s['text_only']} text-only; length mean {s['mean_length']:.0f}, "
              f"max {s['max_length']}), {s['bad']} bad, {s['excluded']} with nothing to train on", flush=True)
        print(f"tokenizer: {tokenizer.describe()}", flush=True)
        if s["original_masks_all"]:
            print(f"data: {s['original_masks_all']} usable record(s) the original LLaVA train.py would train on "
                  "nothing from (its 'tokenization mismatch ... (ignored)': it masks every label); minillava trains "
                  "on their replies (listed in data_report.json)", flush=True)
        report = {"data": os.path.abspath(cfg.data), "summary": s,
                  "bad": [{"record": c.id, "problem": c.problem} for c in bad],
                  "excluded": [{"record": c.id, "reason": c.excluded} for c in excluded],
                  "original_masks_all": [c.id for c in checked if c.original_masks_all]}
        with open(os.path.join(cfg.out, "data_report.json"), "w") as f:
            json.dump(report, f, indent=1)
        for line in first_lines([f"left out {c.id}: {c.excluded}" for c in excluded], "data_report.json"):
            print(f"  {line}", flush=True)
        for line in first_lines([f"{'skipped' if cfg.skip_bad_records else 'bad'} {c.id}: {c.problem}"
                                 for c in bad], "data_report.json"):
            print(f"  {line}", flush=True)
    wrong = wrong_image_folder(*data.images_not_found(checked), cfg.image_folder, "records")
    if wrong:
        raise TrainingError(str(wrong))
    if bad and not cfg.skip_bad_records:
        raise TrainingError(f"{len(bad)} bad record(s) in {cfg.data} (listed above and in "
                            f"{os.path.join(cfg.out, 'data_report.json')}); fix them, or pass --skip-bad-records "
                            "to train without them")
    if bad and rank == 0:
        print(f"data: skipping {len(bad)} bad record(s) (--skip-bad-records)", flush=True)
    usable = [c for c in checked if not c.problem and not c.excluded]
    if not usable:
        raise TrainingError(f"{cfg.data}: no usable record")
    return records, dcfg, usable


class RankSchedule:
    """The micro-batches (record indices) this rank runs from `start` to `total` steps, in order; the
    training order is a pure function of (seed, epoch), so resuming at a step needs only the step."""

    def __init__(self, samples, cfg, start, total, rank, world):
        self.data, self.samples, self.cfg = data, samples, cfg
        self.start, self.total, self.rank, self.world = start, total, rank, world
        self.steps_per_epoch = data.steps_per_epoch(samples, cfg.global_batch, cfg.group_by_modality_length)
        self._epoch, self._order = None, None

    def global_batch(self, step: int) -> list:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = self.data.global_batches(self.samples, self.cfg.global_batch, self.cfg.seed, epoch,
                                                   self.cfg.group_by_modality_length)
        return self._order[k]

    def __iter__(self):
        for step in range(self.start, self.total):
            yield from self.data.micro_batches(self.global_batch(step), self.world, self.rank, self.cfg.micro_batch)


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = resolve(parse_args(argv))
    rank, world, device = setup_distributed(cfg)
    try:
        return train(cfg, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def start_profiler(cfg, rank, device):
    """--profile: torch.profiler over steps 3-5 (wait 1, warm up 1, record 3), a Chrome trace per rank; the log
    then gets the top operators and which path (Triton or torch) each op took and why."""
    def on_trace(prof):
        os.makedirs(os.path.join(cfg.out, "profile"), exist_ok=True)
        prof.export_chrome_trace(os.path.join(cfg.out, "profile", f"trace_rank{rank}.json"))
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if device.type == "cuda" else [])
    profiler = torch.profiler.profile(activities=acts, schedule=torch.profiler.schedule(
        wait=1, warmup=1, active=3, repeat=1), on_trace_ready=on_trace, record_shapes=True)
    profiler.start()
    return profiler


def step_profiler(profiler, last: bool, device, log):
    """After each step: advance the profiler's schedule; at its last step print the top operators and stop.
    -> the profiler, or None once stopped."""
    profiler.step()
    if not last:
        return profiler
    profiler.stop()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(profiler.key_averages().table(sort_by=sort, row_limit=15), flush=True)
    log(report(), flush=True)  # which path each op took, and why
    return None


def clip_and_check(trainable, loss_sum, cfg, world, step, n_sup) -> tuple[float, float]:
    """Clip the gradients; -> (the global batch's summed loss, the gradient norm), the step's one host sync.
    A non-finite loss or norm stops the run before the update, naming the last good checkpoint."""
    gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if hasattr(gnorm, "full_tensor"):  # FSDP: a replicated DTensor
        gnorm = gnorm.full_tensor()
    if world > 1:
        dist.all_reduce(loss_sum)
    loss_val, gnorm_val = torch.stack([loss_sum, gnorm.to(loss_sum)]).tolist()
    if not (math.isfinite(loss_val) and math.isfinite(gnorm_val)):
        kept = list_checkpoints(cfg.out)
        raise TrainingError(f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss_val) else 'gradient'}"
                            f" (loss {loss_val / n_sup}, grad norm {gnorm_val}); stopped before the update. "
                            f"Last good checkpoint: {kept[-1] if kept else 'none'}")
    return loss_val, gnorm_val


@dataclass
class Run:
    """Everything the training loop needs, built by `setup` before its first step."""
    llava: torch.nn.Module  # the model itself
    model: torch.nn.Module  # what the loop calls: llava wrapped for FSDP2 / DDP, or llava
    opt: torch.optim.Optimizer
    tokenizer: Tokenizer
    schedule: "RankSchedule"
    batches: object  # iterator over this rank's micro-batches, from `start` on
    samples: dict  # index -> data.Checked: length, supervised tokens, image of every usable record
    meta: dict  # what a checkpoint must match to be resumed
    start: int
    total: int
    warmup: int
    steps_per_epoch: int
    accum: int  # micro-batches per step on each rank
    cfg: TrainConfig
    cpu_group: object  # torchrun: a gloo group over every rank, for agreeing without a GPU sync; else None


def setup(cfg: TrainConfig, rank: int, world: int, device, log) -> Run:
    """Check the run's settings, load the model, check the data, build the optimizer, resume: the run's state
    at its first step."""
    workers = cfg.workers if cfg.workers >= 0 else (4 if device.type == "cuda" else 0)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise TrainingError(f"--out {cfg.out} is a file; give a directory (it is created if missing)")
    if list_checkpoints(cfg.out) and not cfg.resume:
        raise TrainingError(f"{cfg.out} already holds checkpoints: pass --resume to continue that run, or "
                            "choose another --out")
    accum, rest = divmod(cfg.global_batch, cfg.micro_batch * world)
    if rest or not accum:
        raise ValueError(f"--global-batch {cfg.global_batch} is not a multiple of --micro-batch "
                         f"{cfg.micro_batch} x {world} process(es)")

    # model (on the CPU: the data check forks worker processes, which must happen before CUDA starts)
    torch.manual_seed(cfg.seed)  # the same initial weights (stage 1's projector, LoRA's A) on every rank
    llava = load_model(cfg)
    os.makedirs(cfg.out, exist_ok=True)  # only once the model loaded: a wrong --model leaves no empty dir
    mc = llava.config
    if cfg.max_length > mc.text.max_position_embeddings:
        raise ValueError(f"--max-length {cfg.max_length} exceeds the model's {mc.text.max_position_embeddings} "
                         "positions")
    tokenizer = Tokenizer(cfg.tokenizer or cfg.model, legacy=optional_bool(cfg.tokenizer_legacy))
    records, dcfg, samples = prepare_data(cfg, llava, tokenizer, rank, world, workers)
    spe = data.steps_per_epoch(samples, cfg.global_batch, cfg.group_by_modality_length)
    if spe == 0:
        raise TrainingError(f"{len(samples)} usable records do not fill one global batch of {cfg.global_batch} "
                            f"sequences (the recipe's for stage {cfg.stage}): pass a smaller --global-batch, a "
                            f"multiple of --micro-batch {cfg.micro_batch} x {world} process(es)")
    total = cfg.max_steps or max(1, round(cfg.epochs * spe))
    warmup = math.ceil(cfg.warmup_ratio * total)

    set_trainable(llava, cfg)
    llava.language_model.model.gradient_checkpointing = cfg.grad_checkpointing
    llava.to(device)
    model = wrap_model(llava, cfg, world, device)
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    n_train = sum(p.numel() for g in opt.param_groups for p in g["params"])
    n_all = sum(p.numel() for p in llava.parameters())
    meta = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE},
            "sources": source_files(cfg),  # where the frozen tensors (not in checkpoints) come from
            "frozen": [n for n, p in llava.named_parameters() if not p.requires_grad],
            "data_digest": hashlib.sha256(repr([(s.index, s.length, s.n_supervised) for s in samples])
                                          .encode()).hexdigest()}  # the usable records, as checked
    log(f"stage {cfg.stage}{f' LoRA r={cfg.lora}' if cfg.lora else ''}: training {n_train / 1e6:.2f}M of "
        f"{n_all / 1e6:.2f}M parameters on {world} x {device.type}"
        f"{'' if world == 1 else (' (DDP)' if cfg.ddp else ' (FSDP2)')}; {total} steps of {cfg.global_batch} "
        f"sequences ({accum} x {cfg.micro_batch} per process), {spe} steps per epoch; lr {cfg.lr:g} "
        f"(projector {cfg.projector_lr:g}), warmup {warmup}", flush=True)
    log(startup_line(device), flush=True)

    start = 0
    if cfg.resume and list_checkpoints(cfg.out):
        path = list_checkpoints(cfg.out)[-1]
        start = load_checkpoint(model, opt, path, meta, cfg, rank, world, device)
        log(f"resumed from {path} at step {start}", flush=True)
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout masks: each rank its own stream, rank 0 as one process
    if rank == 0:
        with open(os.path.join(cfg.out, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)

    schedule = RankSchedule(samples, cfg, start, total, rank, world)
    loader = torch.utils.data.DataLoader(
        data.LlavaDataset(records, dcfg), batch_sampler=schedule, num_workers=workers,
        collate_fn=partial(data.collate, pad_id=tokenizer.pad_id), pin_memory=device.type == "cuda",
        generator=torch.Generator())  # its own: iter(loader) must not draw from the restored RNG stream
    cpu_group = dist.new_group(backend="gloo") if world > 1 else None
    return Run(llava, model, opt, tokenizer, schedule, iter(loader), {s.index: s for s in samples}, meta, start,
               total, warmup, spe, accum, cfg, cpu_group)


def next_micro_batch(run, step: int, world: int) -> dict:
    """This rank's next micro-batch, once every rank holds one. A rank that cannot load its own (an image changed
    or gone since the data check) would leave the others waiting in the step's first collective (with NCCL, for
    ever), so the ranks first agree, over a CPU group, and all stop with the same message."""
    try:
        batch, problem = next(run.batches), ""
    except (OSError, ValueError) as e:  # what reading a record raises (minillava.data)
        last = str(e).strip().splitlines()[-1:] or [""]  # a loader worker's error carries its traceback: the last line
        batch, problem = None, f"{type(e).__name__}: {last[0]}"
    states = gather_objects((step, problem), world, run.cpu_group)
    steps = sorted({s for s, _ in states})
    if len(steps) > 1:
        raise TrainingError(f"the ranks are at different steps ({steps}): each rank must read the same --data and "
                            "settings")
    failed = [(r, p) for r, (_, p) in enumerate(states) if p]
    if failed:
        kept = list_checkpoints(run.cfg.out)
        raise TrainingError(f"step {step + 1}: " + "; ".join(f"rank {r} could not load its micro-batch ({p})"
                                                              for r, p in failed)
                            + f". Every rank stops here; the last checkpoint is {kept[-1] if kept else 'none'}")
    return batch


class Window:
    """What the log line reports: sums over the steps since the last one."""

    def __init__(self):
        self.loss, self.sup, self.tokens, self.images, self.t0 = 0.0, 0, 0, 0, time.time()

    def add(self, loss_sum: float, n_sup: int, batch, samples):
        self.loss += loss_sum
        self.sup += n_sup
        self.tokens += sum(samples[i].length for i in batch)
        self.images += sum(samples[i].has_image for i in batch)

    def record(self, done, run, t_run, t_start, grad_norm, device) -> dict:
        now = time.time()
        return {"step": done, "total": run.total, "epoch": round(done / run.steps_per_epoch, 3),
                "loss": self.loss / self.sup, "lr": run.opt.param_groups[0]["lr"], "grad_norm": grad_norm,
                "tokens_per_s": self.tokens / (now - self.t0), "images_per_s": self.images / (now - self.t0),
                "elapsed_s": round(now - t_start, 1),
                "left_s": round((now - t_run) / (done - run.start) * (run.total - done), 1),
                "peak_mem_gib": peak_memory(device) / 2**30}


def train(cfg: TrainConfig, rank: int, world: int, device):
    t_start = time.time()
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    log(set_threads(cfg.threads), flush=True)
    run = setup(cfg, rank, world, device, log)
    model, opt, samples, accum, total = run.model, run.opt, run.samples, run.accum, run.total
    trainable = [p for g in opt.param_groups for p in g["params"]]
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    log_file = open_log(os.path.join(cfg.out, "log.jsonl"), run.start) if master else None
    profiler = start_profiler(cfg, rank, device) if cfg.profile else None

    t_run, window = time.time(), Window()
    for step in range(run.start, total):
        scale = lr_scale(step, total, run.warmup)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        gb = run.schedule.global_batch(step)
        n_sup = sum(samples[i].n_supervised for i in gb)  # supervised tokens of the whole global batch (all ranks)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            batch = next_micro_batch(run, step, world)
            batch = {k: v if v is None else v.to(device, non_blocking=True) for k, v in batch.items()}
            with accumulation_context(model, cfg, world, sync=micro == accum - 1), autocast:
                loss = model(**batch)
            # DDP and FSDP average gradients over ranks: * world turns that into the global-batch sum
            (loss * (world / n_sup)).backward()
            loss_sum += loss.detach()
        loss_val, gnorm_val = clip_and_check(trainable, loss_sum, cfg, world, step, n_sup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if profiler:
            profiler = step_profiler(profiler, step + 1 - run.start == 5 or step + 1 == total, device, log)

        window.add(loss_val, n_sup, gb, samples)
        done = step + 1
        if done % cfg.log_every == 0 or done in (run.start + 1, total):  # the first step too: the starting loss
            rec = window.record(done, run, t_run, t_start, gnorm_val, device)
            log(progress_line(rec), flush=True)
            if log_file:
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
            window = Window()
        if done % cfg.save_every == 0 or done == total:
            save_checkpoint(model, opt, done, run.meta, cfg, rank, world, device)

    result = full_model(model, run.llava, cfg, rank, world)
    path = None
    if master:
        path = str(export(result, cfg, run.tokenizer))
        log(f"saved {path} ({_hms(time.time() - t_start)})", flush=True)
        log_file.close()
    barrier(world)
    return {"output": path, "model": result, "steps": total}


def peak_memory(device) -> int:
    """Bytes: the CUDA allocator's peak on a GPU, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def progress_line(rec: dict) -> str:
    return (f"step {rec['step']}/{rec['total']} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
            f"{rec['tokens_per_s']:.0f} tok/s | {rec['images_per_s']:.1f} img/s | {_hms(rec['elapsed_s'])} elapsed, "
            f"{_hms(rec['left_s'])} left | peak {rec['peak_mem_gib']:.2f} GiB")


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def interrupted(argv) -> str:
    """What to tell a user who pressed Ctrl-C: where the last checkpoint is and the command that continues."""
    cfg = parse_args(argv)
    ckpts = list_checkpoints(cfg.out)
    if not ckpts:
        return f"interrupted before the first checkpoint: nothing saved in {cfg.out}/checkpoints"
    command = "python train.py" if sys.argv[0].endswith(".py") else os.path.basename(sys.argv[0])  # minillava-train
    again = " ".join([command, *map(shlex.quote, argv), *([] if cfg.resume else ["--resume"])])
    return f"interrupted; the last checkpoint is {ckpts[-1]}. Continue from it with:\n  {again}"


def cli() -> int:
    """The command line (`python train.py`, `minillava-train`): a user's mistake is one line, not a traceback."""
    try:
        main()
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{interrupted(sys.argv[1:])}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
