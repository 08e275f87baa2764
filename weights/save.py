"""Save a model in layout A (llava-hf: what transformers' LlavaForConditionalGeneration and minillava.weights.load_llava
read), or its projector alone in layout C (a stage-1 `mm_projector` file).

Every write is atomic: files go to a temporary sibling, are fsynced, and are renamed into place at the end, so
an interrupted save leaves the previous checkpoint (if any) untouched and never a half-written one.
"""
import dataclasses
import json
import math
import os
import shutil
import struct
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from minillava.config import to_hf_config
from minillava.weights import keymaps
from minillava.weights.load import ALIGN, SAFETENSORS_DTYPES
from minillava.weights.quantize import QUANT_KEY

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size ("5GB")
VOCAB_MULTIPLE = 64  # llava-hf padded its vocabulary (32000 + <image> + <pad>) to 32064


def fsync(path):
    """fsync a file or a directory (after a rename: the directory entry itself reaches the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_file(path):
    """Yield a temporary sibling of `path` to write; on success it is fsynced and renamed over `path`, and the
    directory fsynced: a reader sees the old file or the whole new one, never part of one. On failure the
    temporary goes and `path` is as it was. Every single-file write of checkpoints goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(out_dir):
    """Yield a fresh temporary directory beside out_dir; on success it replaces out_dir (renames only)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(out_dir, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync(f)
        fsync(tmp)
        old = None
        if out_dir.exists():
            old = _temp_sibling(out_dir, "old")
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.rename(old, out_dir)  # put the previous checkpoint back
            raise
        fsync(out_dir.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there when something failed


def _save_file(tensors: dict, path, metadata: dict):
    """A safetensors file: the header's length (u64, little-endian), the JSON header {key: {dtype, shape,
    data_offsets}, "__metadata__": {str: str}}, then every tensor's bytes, back to back. Written here, not by
    safetensors' save_file, for what that one does not do: the header is padded with spaces (as the format allows)
    so that the data starts a multiple of ALIGN bytes into the file, and the tensors whose sizes are whole multiples
    of ALIGN come first, so that every weight of a LLaMA-shaped model lies aligned when the file is mapped (on the
    CPU a misaligned one is read into memory of its own: weights/load.py). Tensors that share memory are
    each written in full (the callers drop a tied lm_head themselves)."""
    if "__metadata__" in tensors or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"cannot save {path}: metadata must map str to str and no tensor may be named "
                         f"__metadata__ (metadata {metadata!r})")
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    order = sorted(tensors, key=lambda k: tensors[k].nbytes % ALIGN != 0)  # stable: the aligned sizes first
    header, offset = {"__metadata__": metadata}, 0
    for key in order:
        t = tensors[key]
        if t.dtype not in names:
            raise ValueError(f"cannot save tensor {key}: dtype {t.dtype} has no safetensors name here")
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:  # mode 0666 less the umask (save_file made files 0600: unreadable to a team)
        f.write(struct.pack("<Q", len(text)) + text)
        for key in order:
            f.write(tensors[key].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def write_json(path: Path, d: dict):
    Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def write_safetensors(tensors: dict, out_dir: Path, max_shard_bytes=None, metadata=None, stem="model"):
    """`{stem}.safetensors`, or, above max_shard_bytes, shards `{stem}-0000i-of-0000n.safetensors` plus
    `{stem}.safetensors.index.json` = {"metadata": {"total_size": bytes}, "weight_map": {key: shard}}."""
    metadata = {"format": "pt", **(metadata or {})}  # transformers requires format=pt
    shards, size = [{}], 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().contiguous()
        size += n
    if len(shards) == 1:
        _save_file(shards[0], out_dir / f"{stem}.safetensors", metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_file(shard, out_dir / name, metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(out_dir / f"{stem}.safetensors.index.json", {"metadata": {"total_size": total},
                                                             "weight_map": weight_map})


def copy_tokenizer(tokenizer, out_dir: Path):
    """tokenizer.model + tokenizer_config.json with the settings in force (legacy, add_bos_token,
    add_eos_token), from a Tokenizer or a tokenizer path (read with its own tokenizer_config.json)."""
    from minillava.tokenizer import Tokenizer
    (tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)).save(out_dir)


def llava_hf_state(model) -> tuple[dict, dict]:
    """The model's tensors under layout-A names and its llava-hf config.json.

    A model using the original -200 image sentinel has no `<image>` in its vocabulary; llava-hf's format needs
    one (transformers looks the image token up in input_ids). As llava-hf did when converting LLaVA-1.5, append
    `<image>` = V and `<pad>` = V + 1 and pad the vocabulary to a multiple of 64; the new rows of embed_tokens and
    lm_head are the mean of the existing rows (llava-hf initialised them around it). The first V logits are
    unchanged."""
    cfg = model.config
    state = dict(model.state_dict())  # minillava's names are layout A's
    if cfg.text.tie_word_embeddings:
        del state[keymaps.LM_HEAD_KEY]  # stored once, as transformers does
    V = cfg.text.vocab_size
    quantization = getattr(model, "quantization", None)
    if cfg.image_token_id < 0 and quantization is not None:
        raise ValueError("a quantized model with the original -200 image sentinel cannot be saved in layout A "
                         "(its quantized lm_head cannot grow the <image> and <pad> rows): quantize the dense "
                         "checkpoint with python quantize.py, which pads the vocabulary first")
    if cfg.image_token_id < 0:
        new_v = math.ceil((V + 2) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        for key in (keymaps.EMBED_KEY, keymaps.LM_HEAD_KEY):
            if key in state:
                w = state[key]  # (V, C)
                mean = w.float().mean(0, keepdim=True).to(w.dtype)  # (1, C)
                state[key] = torch.cat([w, mean.expand(new_v - V, -1)])  # (new_v, C)
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=new_v), image_token_id=V, pad_token_id=V + 1)
    elif cfg.image_token_id >= V:
        raise ValueError(f"image_token_id {cfg.image_token_id} is outside the vocabulary of {V}")
    hf = to_hf_config(cfg)
    hf["torch_dtype"] = str(model.language_model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    if quantization is not None:
        hf[QUANT_KEY] = quantization.to_json()
    return state, hf


def save_llava(model, out_dir, tokenizer=None, max_shard_bytes=MAX_SHARD_BYTES):
    """Save in layout A: config.json + model.safetensors (or shards + index) [+ tokenizer.model and
    tokenizer_config.json, from a Tokenizer or a tokenizer path]. Atomic."""
    state, hf = llava_hf_state(model)
    return write_checkpoint(state, hf, out_dir, tokenizer, max_shard_bytes)


def write_checkpoint(state: dict, hf: dict, out_dir, tokenizer=None, max_shard_bytes=MAX_SHARD_BYTES):
    """Layout-A tensors and config.json (what llava_hf_state returns) [+ the tokenizer] -> out_dir, atomically."""
    with atomic_dir(out_dir) as tmp:
        write_safetensors(state, tmp, max_shard_bytes)
        write_json(tmp / "config.json", hf)
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
    return Path(out_dir)


def save_projector(model, path):
    """Save the projector alone as a layout-C stage-1 file: `model.mm_projector.{0,2}.{weight,bias}`
    (`model.mm_projector.{weight,bias}` for linear) + metadata {"mm_projector_type", "mm_vision_select_layer"}
    (the CLIP layer it takes features from: loading the file with its LLaMA and CLIP gives the same model). Atomic."""
    path = Path(path)
    ptype = model.config.projector_type
    rules = keymaps.projector_rules(ptype)
    state = {keymaps.to_official(keymaps.PROJECTOR + k, rules): v.detach().contiguous()
             for k, v in model.multi_modal_projector.state_dict().items()}
    with atomic_file(path) as tmp:
        _save_file(state, tmp, {"format": "pt", "mm_projector_type": ptype,
                                "mm_vision_select_layer": str(model.config.vision_feature_layer)})
    return path
