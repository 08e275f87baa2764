"""Load LLaVA weights in every official layout (weights/keymaps.py lists them) into a Llava.

    model = load_llava("llava-1.5-7b-hf")                                    # A, A-flat, A', ... (llava-hf)
    model = load_llava("llava-v1.5-7b", vision_path="clip-vit-large-patch14-336")         # B (original)
    model = load_llava("vicuna-7b-v1.5", vision_path="clip-...", projector_path="mm_projector.safetensors")  # C

How, in five steps (as gpt-fast does it):
1. config.json -> LlavaConfig (minillava/config.py); its model_type picks the layout.
2. Build the model on the meta device: no memory, no random init.
3. Open every weight file memory-mapped (safetensors; pickle `.bin` only through torch.load(weights_only=True)).
4. Rename the keys with weights/keymaps.py and check that the checkpoint holds exactly the model's tensors,
   each with the model's shape; every problem is reported at once, naming the file, the key and both shapes.
5. load_state_dict(assign=True): the model's parameters ARE the mapped tensors, no second copy. Only a change
   of dtype or device copies, one tensor at a time; and on the CPU a tensor whose bytes do not start on a
   64-byte boundary of memory is read into memory of its own, with plain file reads (`TensorFiles.read`):
   safetensors writers align the data to 8 bytes only, a misaligned weight makes every 64-byte vector load
   straddle two cache lines, and a CPU decode step of bf16 weights mapped so measured 6-12% slower. (Such a
   copy is the process's own memory: processes loading the same file no longer share its pages; and the read
   costs ~0.8 s per GB up front, page faults mostly, where a mapping costs little: a 1.1B bf16 model's first
   token came 1.5-1.8 s later, paid back after ~100 decoded tokens. Files we write are aligned: no read.)
For inference (`inference=True`: generation.load) on the CPU, each layer's q, k, v weights are read into one block
of rows, in order, as are its gate and up, and the model's `join` makes each block one layer (a decode step then
reads one larger matrix where it read several: kernels/linear.py's DecodeLinear.concat); where a file already lays
a group out so, aligned (ours do), the block is the file mapped, no copy.
Quantizing while loading (`quantize=`, weights/quantize.py) reads each of the LLM's linear weights in blocks of
rows with plain file reads instead (`TensorFiles.rows`), so the dense weight never stays in memory beside its
codes; a quantized checkpoint (its config.json says so) is loaded as stored, its codes and scales checked.
"""
import ctypes
import json
import math
import struct
import sys
import time
from pathlib import Path

import torch

from minillava.config import from_hf_config
from minillava.kernels.quant import QuantLinear
from minillava.llama import LlamaAttention, LlamaMLP
from minillava.llava import Llava
from minillava.projector import Projector
from minillava.weights import keymaps
from minillava.weights import quantize as wq  # as wq: `quantize` is load_llava's argument

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Weight files looked for in a checkpoint directory, in this order.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")
MAX_LISTED = 12  # problems listed in one error message
ALIGN = 64  # bytes: where a CPU's widest vector loads (AVX-512) want a weight to start; torch's allocator gives it
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
                      "I64": torch.int64, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint on disk that cannot be loaded; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------
# Reading files

def _existing(path, what: str, is_dir: bool) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if is_dir and not path.is_dir():
        raise CheckpointError(f"{what} {path} is not a directory")
    return path


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _open_safetensors(file: Path):
    from safetensors import safe_open
    try:
        return safe_open(str(file), framework="pt", device="cpu")  # memory-mapped: tensors are views of the file
    except Exception as e:  # safetensors raises its own SafetensorError (truncated, corrupt header, ...)
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _open_pickle(file: Path) -> dict:
    """A pickle `.bin` state dict, read only through torch.load(weights_only=True): that unpickler accepts
    tensors and plain containers and refuses everything else, so a malicious file cannot run code."""
    import pickle
    convert = (f"If you trust {file.name}, convert it once to safetensors and load that instead:\n"
               f"  python -c \"import torch; from safetensors.torch import save_file; "
               f"sd = torch.load('{file}', map_location='cpu', weights_only=False); "
               f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{file.with_suffix('.safetensors')}')\"")
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused to unpickle (it holds more than tensors; plain unpickling could "
                              f"run arbitrary code): {str(e).splitlines()[0]}\n{convert}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:  # legacy (non-zip) format, truncated file...
        raise CheckpointError(f"{file}: cannot read it as a torch.save zip archive ({str(e).splitlines()[0]})."
                              f"\n{convert}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{file} does not hold a flat {{name: tensor}} state dict")
    return sd


class TensorFiles:
    """The tensors of one checkpoint: a directory (single file or shards + index) or one file.
    Maps each key to its file; tensors are read memory-mapped, on demand."""

    def __init__(self, path: Path, candidates=WEIGHT_FILES):
        path = Path(path)
        if path.is_dir():
            found = [path / name for name in candidates if (path / name).is_file()]
            if not found:
                present = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
                raise CheckpointError(f"{path} holds no weights: expected one of {', '.join(candidates)} "
                                      f"(found: {', '.join(present) or 'nothing'})")
            path = found[0]
        self.path = path
        self._handles = {}  # file -> safe_open handle or state dict
        self._headers = {}  # file -> its safetensors header, read once
        self._mapped = {}  # file -> the whole file mapped as bytes (for block())
        self.file_of = {}  # key -> file
        if path.name.endswith(".index.json"):
            self._read_index(path)
        else:
            for key in self._keys(path):
                self.file_of[key] = path

    def _read_index(self, index: Path):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map' {{tensor name: shard file}}")
        for shard in sorted(set(weight_map.values())):
            file = index.parent / shard
            if not file.is_file():
                raise CheckpointError(f"{index} names shard {shard}, which is missing from {index.parent}")
            listed = {k for k, v in weight_map.items() if v == shard}
            held = set(self._keys(file))
            if listed != held:
                diff = sorted(listed - held)[:3] + sorted(held - listed)[:3]
                raise CheckpointError(f"{index} and its shard {file} disagree on which tensors the shard holds "
                                      f"(e.g. {', '.join(diff)})")
            for key in held:
                self.file_of[key] = file

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _open_pickle(file) if file.suffix == ".bin" else _open_safetensors(file)
        return self._handles[file]

    def _keys(self, file: Path) -> list:
        return list(self._handle(file).keys())

    def keys(self):
        return self.file_of.keys()

    def close(self, file: Path):
        self._handles.pop(file, None)
        self._mapped.pop(file, None)  # the tensors viewing it keep it mapped

    def shape(self, key: str) -> tuple:
        h = self._handle(self.file_of[key])
        return tuple(h[key].shape) if isinstance(h, dict) else tuple(h.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        h = self._handle(self.file_of[key])
        return h[key] if isinstance(h, dict) else h.get_tensor(key)

    def metadata(self) -> dict:
        h = self._handle(self.path)
        return {} if isinstance(h, dict) else (h.metadata() or {})

    def read(self, key: str) -> torch.Tensor:
        """The tensor in memory of its own (torch's allocator: ALIGN-aligned), read with plain file reads."""
        out = torch.empty(self.shape(key), dtype=self.stored_dtype(key))
        self.read_into(key, out)
        return out

    def rows(self, key: str):
        """The tensor as something sliceable by rows, read with plain file reads: a block's bytes are copied and
        nothing stays mapped (quantizing while loading keeps only the current block of the dense weight)."""
        file = self.file_of[key]
        if file.suffix == ".bin":
            return self.get(key)  # a pickle is mapped by torch.load; its rows are read from the mapping
        data_start, header = self._header(file)
        return _FileRows(file, key, self.shape(key), header[key], data_start)

    def _header(self, file: Path) -> tuple:
        if file not in self._headers:
            self._headers[file] = read_safetensors_header(file)
        return self._headers[file]

    def block(self, keys: list, dtype=None):
        """Room for the 2-D tensors of keys (one width, one floating-point dtype) as one block of rows, in this
        order, where that costs no memory beyond theirs -> (each one's rows of it, filled) or None. The file
        mapped (filled) where they lie back to back in one safetensors file, aligned, of dtype (None: as stored);
        memory of its own (empty, for `read_into`) where each would be copied anyway: cast to dtype, or misaligned
        in its file (read, not mapped: _read); else None: they stay as stored, apart (a pickle's, those of several
        files...)."""
        stored = {self.stored_dtype(k) for k in keys}
        if len(stored) != 1 or None in stored or not next(iter(stored)).is_floating_point:
            return None  # _read takes them one by one (and names any problem)
        stored = stored.pop()
        places = [self._place(k) for k in keys]
        rows, width = [self.shape(k)[0] for k in keys], self.shape(keys[0])[1]
        if dtype in (None, stored):
            if None in places:
                return None  # a pickle's tensors: mapped by torch.load
            file, start, end = places[0][0], places[0][1], places[-1][2]
            if (start % ALIGN == 0 and all(p[0] == file for p in places)
                    and all(a[2] == b[1] for a, b in zip(places, places[1:]))):
                if file not in self._mapped:  # the whole file, once (private: writes to it stay in memory)
                    self._mapped[file] = torch.from_file(str(file), shared=False, size=file.stat().st_size,
                                                         dtype=torch.uint8)
                return self._mapped[file][start:end].view(stored).view(-1, width).split(rows), True
            if any(p[1] % ALIGN == 0 for p in places):
                return None  # some would stay mapped: a block would copy them
        return torch.empty(sum(rows), width, dtype=dtype or stored).split(rows), False

    def stored_dtype(self, key: str):
        """The dtype key is stored in (None: one not read here)."""
        file = self.file_of[key]
        if file.suffix == ".bin":
            return self.get(key).dtype
        return SAFETENSORS_DTYPES.get(self._header(file)[1][key]["dtype"])

    def _place(self, key: str):
        """(file, where key's bytes start in it, where they end) in a safetensors file; None in a pickle."""
        file = self.file_of[key]
        if file.suffix == ".bin":
            return None
        data_start, header = self._header(file)
        first, end = header[key]["data_offsets"]
        return file, data_start + first, data_start + end

    def read_into(self, key: str, out: torch.Tensor):
        """The tensor of key into out (its shape; cast to its dtype), with plain file reads: nothing stays mapped."""
        rows = self.rows(key)
        if not rows.dtype.is_floating_point:
            raise CheckpointError(f"tensor {key} in {self.file_of[key]} has dtype {rows.dtype}, expected floating "
                                  "point")
        if not isinstance(rows, _FileRows):  # a pickle's tensor, mapped by torch.load
            out.copy_(rows)
        elif rows.dtype == out.dtype:
            rows.read_into(out)
        else:  # a cast: 64 MB of the file at a time
            step = max(1, (64 << 20) // max(1, rows.row_bytes))
            for r in range(0, out.shape[0], step):
                out[r:r + step].copy_(rows[r:r + step])


def read_safetensors_header(file: Path) -> tuple:
    """A safetensors file's header: u64 little-endian length + JSON {key: {dtype, shape, data_offsets}}, offsets
    counted from the end of the header. -> (where the data starts, the JSON)."""
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


class _FileRows:
    """Rows of one tensor of a safetensors file (row-major), read with plain file reads."""

    def __init__(self, file: Path, key: str, shape: tuple, entry: dict, data_start: int):
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key} in {file} has dtype {entry['dtype']}, which is not read here")
        self.file, self.key, self.shape = file, key, shape
        self.dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        self.start = data_start + entry["data_offsets"][0]
        self.row_bytes = self.dtype.itemsize * math.prod(shape[1:])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        out = torch.empty(max(stop - start, 0), *self.shape[1:], dtype=self.dtype)
        return self._read_into(out, self.start + start * self.row_bytes)

    def read_into(self, out: torch.Tensor) -> torch.Tensor:
        """The whole tensor into out (contiguous, of its shape and dtype)."""
        return self._read_into(out, self.start)

    def _read_into(self, out: torch.Tensor, offset: int) -> torch.Tensor:
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # out's own bytes
        done = 0
        with open(self.file, "rb", buffering=0) as f:
            f.seek(offset)
            while done < len(buf):  # one read returns at most ~2 GiB on Linux
                got = f.readinto(buf[done:])
                if not got:
                    raise CheckpointError(f"{self.file}: tensor {self.key} is cut short (truncated file?)")
                done += got
        return out


# ----------------------------------------------------------------------------------------------------------
# Matching checkpoint keys to the model's

def _raise_problems(problems: list, header: str):
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise CheckpointError(header + "\n  " + "\n  ".join(problems[:MAX_LISTED]) + more)


def _pick_llava_hf_rules(files: TensorFiles, expected: dict) -> list:
    """The llava-hf layouts (A, A-flat, A-mixed, A', A'-flat) share model_type "llava": the prefix family that
    explains most keys wins (A on a tie). Keys of any other family then show up as unexpected."""
    def n_matched(rules):
        return sum(keymaps.to_internal(k, rules) in expected for k in files.keys())
    return max(keymaps.LLAVA_HF.values(), key=n_matched)


def match_tensors(parts: list, expected: dict, config_file: Path, optional=()) -> dict:
    """parts: [(TensorFiles, keymap rules)]; expected: {internal name: shape} (from the meta model).
    -> {internal name: (TensorFiles, checkpoint key)}, covering every expected name not in `optional`.
    Ignored keys are exactly those of keymaps.IGNORED; everything else must map onto the model."""
    found, problems = {}, []
    for files, rules in parts:
        for key in sorted(files.keys()):
            if keymaps.is_ignored(key):
                continue
            name = keymaps.to_internal(key, rules)
            where = files.file_of[key]
            if name not in expected:
                problems.append(f"unexpected tensor {key} in {where}")
            elif name in found:
                problems.append(f"tensor {key} in {where} duplicates {found[name][1]} in "
                                f"{found[name][0].file_of[found[name][1]]}")
            else:
                found[name] = (files, key)
    for name in expected:
        if name not in found and name not in optional:
            # Name it as the file that should hold it would (the later parts are the narrower ones).
            files, key = next((f, keymaps.to_official(name, r)) for f, r in reversed(parts)
                              if keymaps.to_official(name, r) is not None)
            problems.append(f"missing tensor {key} (not in {files.path})")
    _raise_problems(problems, f"the checkpoint does not hold exactly the tensors the model needs "
                              f"(config: {config_file}):")
    mis_shaped = []
    for name, (files, key) in found.items():
        shape = files.shape(key)
        if shape != tuple(expected[name]):
            mis_shaped.append(f"tensor {key} in {files.file_of[key]}: expected shape {tuple(expected[name])}, "
                              f"found {shape}")
    _raise_problems(mis_shaped, f"{config_file} does not match the weights (shapes below are expected from the "
                                f"config vs found in the files):")
    return found


# ----------------------------------------------------------------------------------------------------------
# The layouts

def _config(config_file: Path, d: dict, **kwargs):
    try:
        return from_hf_config(d, **kwargs)
    except ValueError as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def _vision_dir(path: Path, d: dict, vision_path) -> Path:
    """Layout B/C's CLIP directory: the argument, else (layout B) mm_vision_tower when it is a local dir."""
    if vision_path is not None:
        return _existing(vision_path, "CLIP directory", is_dir=True)
    tower = d.get("mm_vision_tower")
    if tower and Path(tower).is_dir():
        return Path(tower)
    kind = f"an original LLaVA checkpoint ({d.get('model_type')!r})" if d.get("model_type") != "llama" else \
        "a plain LLaMA checkpoint ('llama')"
    named = f"; its config.json names mm_vision_tower={tower!r}, which is not a local directory" if tower else ""
    raise CheckpointError(f"{path} is {kind}: its vision tower is not in it. Pass the CLIP directory "
                          f"(vision_path= / --vision){named}")


def _check_original_config(config_file: Path, d: dict, vision_dir: Path, vision_hidden: int):
    """Original-LLaVA fields minillava cannot honour are errors, not silently different numbers."""
    if d.get("mm_use_im_start_end"):
        raise CheckpointError(f"{config_file}: mm_use_im_start_end=true (<im_start>/<im_end> tokens) is not "
                              "supported")
    if d.get("mm_hidden_size", vision_hidden) != vision_hidden:
        raise CheckpointError(f"{config_file} has mm_hidden_size {d['mm_hidden_size']} but the CLIP tower in "
                              f"{vision_dir} has hidden_size {vision_hidden}: wrong CLIP directory?")


def _layout(path: Path, d: dict, vision_path, projector_path, projector_type, new_projector):
    """config.json's model_type -> (LlavaConfig, [(TensorFiles, keymap rules)]); rules None = pick from keys."""
    config_file = path / "config.json"
    model_type = d.get("model_type")
    if new_projector and model_type != "llama":
        raise ValueError(f"a fresh projector (stage 1 without --projector) goes on a plain LLaMA checkpoint "
                         f"(layout C); {path} is {model_type!r}, which has its projector")
    if model_type in ("llava", "llava_next"):  # the llava-hf layouts: one directory holds everything
        return _config(config_file, d, projector_type=projector_type), [(TensorFiles(path), None)]
    if model_type not in ("llava_llama", "llava_mistral", "llama"):
        raise CheckpointError(f"{config_file}: unknown model_type {model_type!r}; expected 'llava' / 'llava_next' "
                              "(llava-hf), 'llava_llama' / 'llava_mistral' (original LLaVA, with a CLIP dir) or "
                              "'llama' (with a CLIP dir and a projector)")
    vision_dir = _vision_dir(path, d, vision_path)
    vision_d = read_json(vision_dir / "config.json")
    llm = TensorFiles(path)
    if model_type != "llama":  # B: LLM + projector (1.6: + its tuned tower and newline) in one file, CLIP apart
        cfg = _config(config_file, d, vision=vision_d, projector_type=projector_type)
        _check_original_config(config_file, d, vision_dir, cfg.vision.hidden_size)
        parts = [(llm, keymaps.layout_b_rules(cfg.projector_type))]
        # A self-trained original checkpoint may also carry the tower; then it is the model's own and the CLIP
        # dir only gives its config.
        if not any(k.startswith(keymaps.B_TOWER_RULES[0][0]) for k in llm.keys()):
            parts.append((TensorFiles(vision_dir), keymaps.CLIP_RULES))
        return cfg, parts
    # C: CLIP + LLaMA + a stage-1 projector file (or a fresh projector)
    if projector_path is not None and new_projector:
        raise ValueError("a projector file and a fresh projector: give one (new_projector=True is train.py's "
                         "stage 1 without --projector)")
    if projector_path is None and not new_projector:
        raise CheckpointError(f"{path} is a plain LLaMA checkpoint: give the stage-1 projector file "
                              "(projector_path= / --projector), or new_projector=True to start stage 1 with a "
                              "freshly initialised projector")
    proj, layer = None, None
    if projector_path is not None:
        proj = TensorFiles(_existing(projector_path, "projector file", is_dir=False), PROJECTOR_FILES)
        file_type = proj.metadata().get("mm_projector_type")
        if projector_type and file_type and projector_type != file_type:
            raise CheckpointError(f"{proj.path} holds a {file_type!r} projector, not {projector_type!r}")
        projector_type = projector_type or file_type
        layer = proj.metadata().get("mm_vision_select_layer")  # the CLIP layer it was trained on (save_projector)
    cfg = _config(config_file, d, vision=vision_d, projector_type=projector_type or "mlp2x_gelu")
    if layer is not None:
        cfg = cfg.replace(vision_feature_layer=int(layer))
    parts = [(TensorFiles(vision_dir), keymaps.CLIP_RULES), (llm, keymaps.LLAMA_RULES)]
    if proj is not None:
        parts.append((proj, keymaps.stage1_projector_rules(cfg.projector_type)))
    return cfg, parts


def _read(found: dict, dtype, device, stored: dict, quantize=None, to_quantize=(), joined=()) -> dict:
    """{name: (TensorFiles, key)} -> {name: tensor}, file by file, letting each file's mapping go after it.
    Without a cast the tensors keep their mapping alive (they ARE it); with one, only one shard's pages are
    resident beside the converted copies. stored: {name: dtype} of a quantized checkpoint's codes and scales,
    read as stored; to_quantize: dense weights quantized as they are read, block by block (name.weight ->
    name.qweight, name.scales[, name.offsets]); joined: groups of names (a layer's q, k, v weights; gate, up)
    that inference multiplies as one matrix (DecodeLinear.concat), each read into one block of rows, in order,
    whose views they are: mapped, no copy, where the file lays them out so (TensorFiles.block; ours do)."""
    by_file = {}
    for name, (files, key) in found.items():
        by_file.setdefault(files.file_of[key], []).append((name, files, key))
    group_of = {name: group for group in joined for name in group}
    blocks = {}  # group -> (each part's rows of its block, filled already) or None, made at its first part
    state, progress = {}, Progress(len(to_quantize), "quantizing while loading")
    for file, items in by_file.items():
        for name, files, key in items:
            part = _part(group_of[name], name, blocks, found, dtype) if name in group_of else None
            if part is not None:
                state[name] = part
                continue
            if name in to_quantize:
                rows = files.rows(key)
                if not rows.dtype.is_floating_point:
                    raise CheckpointError(f"tensor {key} in {file} has dtype {rows.dtype}, expected floating point")
                prefix = name.removesuffix(".weight")
                state.update({f"{prefix}.{k}": t.to(device) for k, t in quantize.tensors(rows).items()})
                _return_freed_memory()
                progress.step()
                continue
            t = files.get(key)
            if name in stored:
                state[name] = _checked_quantized(t, stored[name], key, file).to(device)
                continue
            if not t.is_floating_point():
                raise CheckpointError(f"tensor {key} in {file} has dtype {t.dtype}, expected floating point")
            if t.data_ptr() % ALIGN and torch.device(device).type == "cpu" and dtype in (None, t.dtype):
                t = files.read(key)  # mapped misaligned: a copy of its own (the module docstring's step 5)
            state[name] = t.to(device=device, dtype=dtype)  # a no-op (no copy) when both already match
        files.close(file)
    return state


def _part(group: tuple, name: str, blocks: dict, found: dict, dtype):
    """name's rows of its group's block (see _read), read now unless the block is the file mapped; None where the
    group gets no block (TensorFiles.block)."""
    files, key = found[name]
    if group not in blocks:
        blocks[group] = files.block([found[n][1] for n in group], dtype)
    if blocks[group] is None:
        return None
    parts, filled = blocks[group]
    part = parts[group.index(name)]
    if not filled:
        files.read_into(key, part)
    return part


def _return_freed_memory():
    """Give the memory freed so far back to the OS (glibc's malloc_trim; elsewhere nothing). Quantizing leaves
    each layer's codes in the heap between the freed blocks of the dense weight it read (packing for the
    CPU, between the freed portable codes); glibc does not return such holes by itself, and a 7B model loaded as
    int8 peaked 1.4 GB higher without this (26% above its bytes), as int4 at 1.8x its bytes."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Progress:
    """A one-line progress report on stderr: done/total, rate, time left; redrawn at most once a second."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done, self.t0, self.shown = total, what, 0, time.perf_counter(), 0.0

    def step(self):
        self.done += 1
        now = time.perf_counter()
        if now - self.shown < 1 and self.done < self.total:
            return
        self.shown, spent = now, now - self.t0
        left = spent / self.done * (self.total - self.done)
        print(f"\r{self.what}: {self.done}/{self.total} layers, {self.done / spent:.1f}/s, {left:.0f} s left",
              end="\n" if self.done == self.total else "", file=sys.stderr, flush=True)


def _checked_quantized(t, dtype, key, file):
    """A quantized checkpoint's codes and scales: the dtype the format fixes; scales finite and >= 0."""
    if t.dtype != dtype:
        raise CheckpointError(f"tensor {key} in {file} has dtype {t.dtype}, expected {dtype} (quantized format, "
                              "kernels/quant.py)")
    if key.endswith((".scales", ".offsets")):
        bad = ~torch.isfinite(t) | ((t < 0) if key.endswith(".scales") else False)
        if bad.any():
            raise CheckpointError(f"corrupt scale tensor {key} in {file}: {int(bad.sum())} of {t.numel()} values "
                                  f"are {'negative or ' if key.endswith('.scales') else ''}not finite")
    return t


def load_llava(path, vision_path=None, projector_path=None, dtype=torch.float32, device="cpu",
               projector_type=None, new_projector=False, quantize=None, inference=False) -> Llava:
    """Load a LLaVA checkpoint in any official layout; see the module docstring.

    path:           checkpoint dir; config.json's model_type picks the layout: "llava" (A and its variants),
                    "llava_llama" / "llava_mistral" (B), "llama" (C); "llava_next" is LLaVA-1.6 in A.
    vision_path:    the CLIP dir for layouts B and C.
    projector_path: layout C's stage-1 projector file (or a dir holding mm_projector.safetensors/.bin).
    new_projector:  layout C without a projector file: initialise it fresh (training stage 1).
    projector_type: override config.json's (layouts A/B) or the projector file's (C, default mlp2x_gelu).
    dtype:          of every floating-point weight; None keeps each as stored (no copy).
    quantize:       a minillava.weights.quantize.Quantization: quantize the LLM's linear layers while loading.
                    A quantized checkpoint (its config.json says so) loads quantized without it.
    inference:      for inference only (generation.load): on the CPU the LLM's q, k, v weights are one layer, as
                    are gate and up (`join`, as quantized layers always are there); such a model cannot be saved.
    """
    if dtype not in DTYPES + (None,):
        raise ValueError(f"dtype {dtype} not supported: use one of {DTYPES}")
    path = _existing(path, "checkpoint directory", is_dir=True)
    config_file = path / "config.json"
    d = read_json(config_file)
    try:
        quantized = wq.Quantization.from_config(d, config_file)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if quantized and quantize:
        raise CheckpointError(f"{path} is already quantized ({quantized}): load it without a quantization")
    cfg, parts = _layout(path, d, vision_path, projector_path, projector_type, new_projector)

    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        model = Llava(cfg)
    to_quantize = {f"{name}.weight" for name in wq.targets(model)} if quantize else set()
    if quantized:
        _quantized_model(model, quantized, config_file)  # the model now expects codes and scales
    stored = {k: v.dtype for k, v in model.state_dict().items()
              if k.endswith((".qweight", ".scales", ".offsets"))}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if parts[0][1] is None:
        parts[0] = (parts[0][0], _pick_llava_hf_rules(parts[0][0], expected))
    fresh = {}
    if new_projector:  # initialised here (nn.Linear's default init), not loaded
        proj = Projector(cfg.projector_type, cfg.vision.hidden_size, cfg.text.hidden_size)
        fresh = {keymaps.PROJECTOR + k: v for k, v in proj.state_dict().items()}
        expected = {k: v for k, v in expected.items() if k not in fresh}
    tied = cfg.text.tie_word_embeddings  # the head is the embedding; files may omit it

    if quantize:
        _quantized_model(model, quantize, config_file)  # checked before reading; filled by _read's quantization
    found = match_tensors(parts, expected, config_file, {keymaps.LM_HEAD_KEY} if tied else ())
    on_cpu = torch.device(device).type == "cpu"
    joined = [group for group in _joinable(model) if all(n in found and n not in to_quantize for n in group)
              ] if inference and on_cpu else []
    state = _read(found, dtype, device, stored, quantize, to_quantize, joined)
    state.update({k: v.to(device=device, dtype=dtype) for k, v in fresh.items()})
    if tied:
        head = state.pop(keymaps.LM_HEAD_KEY, None)
        if head is not None and not torch.equal(head, state[keymaps.EMBED_KEY]):
            raise CheckpointError(f"{config_file} says tie_word_embeddings=true but the checkpoint's lm_head "
                                  "differs from its embed_tokens")
        state[keymaps.LM_HEAD_KEY] = state[keymaps.EMBED_KEY]
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model holds the tensors now (packing below frees the portable codes)
    model.language_model.tie_weights()
    assert not any(t.is_meta for t in model.state_dict().values()), "a parameter was left on the meta device"
    if on_cpu:
        prepare_for_cpu(model, dense=inference)
    return model.eval()


def _joinable(model) -> list:
    """The groups of weight names that `join` makes one layer of: each attention's q, k, v; each MLP's gate, up."""
    return [tuple(f"{prefix}.{layer}.weight" for layer in m.JOINED) for prefix, m in model.named_modules()
            if isinstance(m, (LlamaAttention, LlamaMLP))]


def prepare_for_cpu(model, dense=False):
    """The CPU's layers for inference: those reading the same x joined (q, k, v; gate, up): quantized ones always,
    dense ones with dense; quantized layers then packed into the kernels' layouts (kernels/quant.py), the
    portable codes freed."""
    for m in [m for m in model.language_model.modules() if isinstance(m, (LlamaAttention, LlamaMLP))]:
        m.join(dense)
        _return_freed_memory()  # the separate codes, before the next join allocates
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.pack_for_cpu()
            _return_freed_memory()


def _quantized_model(model, q, config_file):
    try:
        wq.check_targets(model, q, str(config_file))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    wq.replace_linears(model, q)
