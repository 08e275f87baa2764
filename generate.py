"""Ask LLaVA about images: one question, an interactive chat, or a file of questions in the evaluation format.

    # one question, the answer streamed to stdout (CPU; add --device cuda --dtype bf16 on a GPU)
    python generate.py --model llava-1.5-7b-hf --image cat.jpg --prompt "What is in the picture?"
    # original LLaVA-1.5 weights (layout B) with their separate CLIP tower
    python generate.py --model llava-v1.5-7b --vision clip-vit-large-patch14-336 --image cat.jpg --prompt "..."
    # a conversation about one image: the image is encoded once, the history stays in the KV cache
    python generate.py --model llava-1.5-7b-hf --image cat.jpg --chat
    # evaluation (LLaVA's model_vqa_loader format): greedy, batched, resumable
    python generate.py --model llava-1.5-7b-hf --questions q.jsonl --image-folder images --answers a.jsonl \\
        --temperature 0 --batch-size 8

How it works: the prompt is tokenized the way the original LLaVA does (one image id per image, spliced into
Np = 576 embeddings inside the model) and handed to the decode engine (minillava/engine.py): each question is
prefilled alone into a slot of a fixed (slots, n_kv, S_max, hs) KV cache, then every decode step runs one token
for every slot; a finished answer's slot takes the next question at once (continuous batching, --batch-size
slots). At the end, prefill and decode tokens/s go to stderr, with the memory bandwidth decoding reaches (every
step reads every LLM weight). --compile compiles the decode step (CUDA graphs on a GPU).

Template: vicuna_v1 by default, for every checkpoint. It is what LLaVA-1.5 was trained (stage 2) and evaluated
with; llava-hf's checkpoints are a conversion of the same weights, and nothing in a layout-A directory says
reliably whether it came from llava-hf or from train.py. `--template llava_hf` gives llava-hf's model-card
prompt ("USER: <image>\\n... ASSISTANT:", no system prompt); `--template plain` suits a stage-1 model.

Python use (demo.py does this):
    model, tokenizer = load("llava-1.5-7b-hf")
    texts = answer(model, tokenizer, [("cat.jpg", "What is this?"), ...], batch_size=8, temperature=0)
"""
import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass

import torch

from minillava.cli import (add_config_args, add_load_bits_flags, device_from_flag, first_lines, optional_bool,
                           set_threads)
from minillava.image import image_size, load_image, model_pixels
from minillava.engine import Engine, GenerationStats, Request
from minillava.llama import KVCache
from minillava.templates import TEMPLATES, build_prompt, stop_strings
from minillava.tokenizer import IMAGE_PLACEHOLDER, StreamDecoder, Tokenizer, tokenize_with_images
from minillava.weights import load_llava
from minillava.weights.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, QUANTIZE_CHOICES, Quantization


@dataclass
class GenerateConfig:
    # what to load
    model: str = None         # checkpoint dir: llava-hf (layout A), original LLaVA (B, with --vision), LLaMA (C)
    vision: str = None        # CLIP directory, for layouts B and C
    projector: str = None     # layout C: the stage-1 projector file (train.py's OUT/mm_projector.safetensors) or dir
    model_base: str = None    # the original's: the LLM dir, when --model is a stage-1 output (its mm_projector file)
    tokenizer: str = None     # tokenizer.model, or a directory holding one (default: the model directory's)
    tokenizer_legacy: str = None  # true | false: overrides the "legacy" of the tokenizer_config.json beside it
    # what to ask: --image + --prompt (one-shot), --image + --chat, or --questions + --answers (batch)
    image: str = None         # the image to ask about (one-shot and chat): a file, or an http(s) URL to download
    prompt: str = None        # one-shot: the question; the answer is streamed to stdout
    chat: bool = False        # interactive conversation about --image (the image is encoded once)
    questions: str = None     # batch: jsonl, {"question_id", "image", "text"} per line
    answers: str = None       # batch: jsonl written here ({"question_id", "prompt", "text", ...}); resumable
    image_folder: str = ""    # where the questions' "image" paths are relative to
    num_chunks: int = 1       # batch: split the questions into this many contiguous chunks (the original's sharding)
    chunk_idx: int = 0        # batch: answer only this chunk
    # how to answer. The command line's temperature is the original cli.py's 0.2; the Python API is greedy.
    template: str = "vicuna_v1"  # conversation template: plain, vicuna_v1, llava_v1, llava_hf
    temperature: float = 0.2  # 0 = greedy (evaluation); 0.2 = the original's cli.py default
    top_p: float = None       # nucleus sampling: keep the smallest set of tokens with this much probability
    top_k: int = None         # sample among the k most likely tokens only
    max_new_tokens: int = 512  # the answer is cut after this many tokens
    seed: int = 0             # sampling seed: the same seed and prompt give the same answer
    batch_size: int = 8       # batch: questions answered together (the engine's slots: continuous batching)
    num_beams: int = 1        # the original's flag; only 1 (no beam search) is supported
    image_aspect_ratio: str = None  # pad | square (resize + centre crop): overrides the checkpoint's config.json
    # where
    dtype: str = "auto"       # fp32 | fp16 | bf16; auto = bf16 on CUDA, fp32 on CPU
    quantize: str = "none"    # none | int8 | int4: the LLM's linear layers, quantized while loading
    group_size: int = DEFAULT_GROUP_SIZE  # int4: inputs per scale (32, 64, 128)
    device: str = "auto"      # auto = cuda when available, else cpu
    compile: bool = False     # torch.compile the decode step (CUDA graphs on a GPU); its compile time is printed
    threads: int = 0          # CPU threads (0: the cores this process may use; OMP_NUM_THREADS if set)
    profile: str = None       # write a torch.profiler trace (chrome://tracing) of the generation here


# The original LLaVA scripts' flag names (llava/eval/model_vqa*.py, llava/serve/cli.py): same meaning, so their
# eval scripts run with minillava by changing the command.
ORIGINAL_FLAGS = {"model": ["--model-path"], "image": ["--image-file"], "questions": ["--question-file"],
                  "answers": ["--answers-file"], "template": ["--conv-mode"], "max_new_tokens": ["--max_new_tokens"],
                  "top_p": ["--top_p"], "num_beams": ["--num_beams"]}


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


# --- loading ------------------------------------------------------------------------------------------------
def resolve_device_dtype(device="auto", dtype="auto"):
    device = device if isinstance(device, torch.device) else device_from_flag(device)
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return device, dtype


def weight_tensors(module) -> list:
    """Every weight tensor once (a tied head counted once): parameters, and the buffers of quantized layers (their
    codes and scales); the KV caches are not weights."""
    found = {}
    for m in module.modules():
        if not isinstance(m, KVCache):
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
                found[t.data_ptr()] = t
    return list(found.values())


def weights_line(model) -> str:
    """What the loaded weights take, and in which form: the line the scripts print after loading."""
    q = getattr(model, "quantization", None)
    return (f"weights: {sum(t.numel() * t.element_size() for t in weight_tensors(model)) / 1e9:.2f} GB, "
            f"{str(model.language_model.model.embed_tokens.weight.dtype).removeprefix('torch.')}"
            + (f", LLM linear layers {q}" if q else ""))


def load(model_dir, vision=None, tokenizer=None, dtype="auto", device="auto", tokenizer_legacy=None,
         quantize="none", group_size=DEFAULT_GROUP_SIZE, projector=None, model_base=None):
    """A checkpoint directory (any official layout) -> (Llava in eval mode, Tokenizer). The tokenizer follows
    its tokenizer_config.json (legacy, add_bos_token, add_eos_token); tokenizer_legacy (bool) overrides.
    quantize: none | int8 | int4 (groups of group_size), done while loading; a quantized checkpoint needs none.
    Layout C (a stage-1 result): model_dir the LLaMA dir, vision the CLIP dir, projector the stage-1 file (or the
    dir holding it); or, as the original's --model-base, model_base the LLaMA dir and model_dir the stage-1 output."""
    model_dir, projector = checkpoint_paths(os.fspath(model_dir), projector, model_base)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir} is not a checkpoint directory: it has no config.json (expected a llava-hf, "
                         "original LLaVA or HF LLaMA directory)")
    tok_path = tokenizer or model_dir
    if tokenizer is None and not os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
        raise ValueError(f"{model_dir} has no tokenizer.model: pass --tokenizer PATH")
    tok = Tokenizer(tok_path, legacy=tokenizer_legacy)
    device, dtype = resolve_device_dtype(device, dtype)
    model = load_llava(model_dir, vision_path=vision, projector_path=projector, dtype=dtype, device=device,
                       quantize=Quantization.parse(quantize, group_size)).eval()
    cfg = model.config
    if tok.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocabulary is "
                         f"{cfg.text.vocab_size}: they do not belong together")
    if 0 <= cfg.image_token_id < tok.vocab_size:
        raise ValueError(f"the model's image token id {cfg.image_token_id} is a text piece of tokenizer {tok.path} "
                         f"({tok.id_to_piece(cfg.image_token_id)!r}): they do not belong together")
    return model, tok


def checkpoint_paths(model_dir, projector=None, model_base=None) -> tuple:
    """(--model, --projector, --model-base) -> (the checkpoint dir to load, the stage-1 projector or None). The
    original's --model-base names the LLM a projector-only --model-path was trained on (its stage 1)."""
    if model_base is None:
        return model_dir, projector
    if projector is not None:
        raise ValueError("give --projector FILE (with --model the LLaMA dir) or --model-base DIR (with --model the "
                         "stage-1 output), not both")
    if os.path.isfile(os.path.join(model_dir, "adapter_config.json")):
        raise ValueError(f"{model_dir} holds LoRA adapters: minillava reads no separate LoRA files (its train.py "
                         "merges LoRA into the model it saves); merge them into the base model first")
    return os.fspath(model_base), model_dir


def load_pixels(image, config) -> tuple[torch.Tensor, tuple[int, int]]:
    """A path or PIL image -> (pixels (n, 3, S, S), its size (h, w)) as the checkpoint's model takes it: one tile
    at the tower's size, padded to square when the config says so, or LLaVA-1.6's AnyRes tiles."""
    return model_pixels(image, config)


MAX_DOWNLOAD_MB = 50  # --image URL: at most this much is read
DOWNLOAD_TIMEOUT = 30.0  # --image URL: seconds without progress before giving up


def open_image(path_or_url: str):
    """--image: a local file, or an http(s) URL fetched with the standard library (a timeout, a size cap) and
    decoded from memory. Only here: serve.py never fetches a remote URL for a client."""
    if not path_or_url.startswith(("http://", "https://")):
        return load_image(path_or_url)
    import io
    import urllib.error
    import urllib.request
    limit = int(MAX_DOWNLOAD_MB * 2**20)
    try:
        request = urllib.request.Request(path_or_url, headers={"User-Agent": "minillava"})
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT) as r:
            data = r.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:  # HTTPError, timeouts and refused connections too
        raise ValueError(f"--image {path_or_url}: cannot download it ({getattr(e, 'reason', e)})") from None
    if len(data) > limit:
        raise ValueError(f"--image {path_or_url}: larger than {MAX_DOWNLOAD_MB} MB; download it and give the file")
    return load_image(io.BytesIO(data), name=path_or_url)


# --- prompts ------------------------------------------------------------------------------------------------
def with_image_placeholder(question: str, n_images: int) -> str:
    """The original code prepends "<image>\\n" to a question that has none (the template then moves every
    placeholder to the front of its turn); the count must match the images given."""
    if n_images and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question
    if question.count(IMAGE_PLACEHOLDER) != n_images:
        raise ValueError(f"the prompt has {question.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders "
                         f"but {n_images} image(s) were given")
    return question


def prompt_ids(history, tokenizer, config, template, image_sizes=()) -> list[int]:
    """Token ids of the generation prompt for `history` [(role, text)], checked against the context length."""
    ids = tokenize_with_images(build_prompt(history, template), tokenizer, config.image_token_id)
    check_fits(ids, config, image_sizes)
    return ids


def check_fits(ids, config, image_sizes=()):
    """The prompt, each image id counted as its LLM positions, must fit the context. (The answer is then cut
    where the context ends, as in the original code.)"""
    n_img = ids.count(config.image_token_id)
    L = config.llm_length(ids, image_sizes)
    context = config.text.context_length
    if L > context:
        raise ValueError(f"the prompt is {L} tokens ({len(ids) - n_img} text + {n_img} image(s): "
                         f"{L - len(ids) + n_img}), {L - context} more than the context of {context}")


class Reply:
    """One reply's text as its ids arrive: decoded incrementally and cut at the first stop string.

    `update(ids)` returns True once a stop string has appeared (the generation loop then ends the sequence);
    `new_text()` is what can be shown now: text that could still turn into a stop string is held back."""

    def __init__(self, tokenizer, stops):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.text, self.shown, self.stopped = "", 0, False

    def _append(self, new: str):
        start = max(0, len(self.text) - max(map(len, self.stops), default=1) + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def update(self, ids) -> bool:
        if not self.stopped:
            self._append(self.decoder.step(ids))
        return self.stopped

    def new_text(self, final=False) -> str:
        end = len(self.text)
        if not final and not self.stopped:  # hold back a tail that is the start of a stop string
            for s in self.stops:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out, self.shown = self.text[self.shown:end], max(self.shown, end)
        return out

    def finish(self) -> str:
        if not self.stopped:
            self._append(self.decoder.flush())
        return self.text


# --- answering: (image, question) pairs on the decode engine ----------------------------------------------------
def request_for(model, tokenizer, image, question, template="vicuna_v1", temperature=0.0, top_p=None, top_k=None,
                max_new_tokens=512, seed=None, on_text=None, history=()):
    """A question about an image (a path, a PIL image, load_pixels' (pixels, size), or None) -> (engine Request,
    Reply).

    A question without "<image>" gets it prepended; `history` [(role, text)] are the turns before it (the image
    goes with the first). The Reply collects the answer's text as the engine runs; on_text(text) receives each
    new piece of it."""
    cfg = model.config
    n_img = 0 if image is None or history else 1
    pixels, sizes = None, ()
    if image is not None:
        pixels, size = image if isinstance(image, tuple) else load_pixels(image, cfg)  # (n, 3, S, S), (h, w)
        sizes = [size]
    ids = prompt_ids([*history, ("human", with_image_placeholder(question, n_img))], tokenizer, cfg, template, sizes)
    reply = Reply(tokenizer, stop_strings(template))

    def on_token(out):
        stopped = reply.update(out)
        if on_text:
            on_text(reply.new_text())
        return stopped

    return Request(ids, pixels, max_new_tokens, temperature, top_p, top_k, seed, (tokenizer.eos_id,), on_token,
                   image_sizes=sizes or None), reply


def cache_size(config, prompt_lengths, max_new_tokens) -> int:
    """Positions per slot that the longest prompt (LLM positions) plus its answer needs (at most the context)."""
    return min(max(prompt_lengths) + max_new_tokens, config.text.context_length)


def answer_batch(model, tokenizer, pairs, template="vicuna_v1", temperature=0.0, top_p=None, top_k=None,
                 max_new_tokens=512, seed=None, on_text=None, slots=None, compile=False):
    """pairs [(image or None, question)] -> (reply texts, GenerationStats), answered by one engine of `slots`
    slots (default: one per pair); on_text(b, text) receives each answer's text as it streams."""
    if not pairs:
        raise ValueError("answer_batch: no questions")
    requests, replies = [], []
    for b, (image, question) in enumerate(pairs):
        stream = None if on_text is None else (lambda text, b=b: on_text(b, text))
        r, reply = request_for(model, tokenizer, image, question, template, temperature, top_p, top_k,
                               max_new_tokens, seed, stream)
        requests.append(r)
        replies.append(reply)
    lengths = [model.config.llm_length(r.ids, r.image_sizes) for r in requests]
    engine = Engine(model, slots=slots or len(pairs), max_seq_len=cache_size(model.config, lengths, max_new_tokens),
                    compile=compile)
    engine.run(requests)
    texts = [r.finish() for r in replies]
    if on_text:
        for b, r in enumerate(replies):
            on_text(b, r.new_text(final=True))
    return [t.strip() for t in texts], engine.stats


def answer(model, tokenizer, pairs, batch_size=8, **kwargs) -> list[str]:
    """Answers to [(image or None, question)], batch_size at a time (continuous batching: a finished answer's
    slot takes the next question at once); kwargs as for answer_batch."""
    return answer_batch(model, tokenizer, pairs, slots=min(batch_size, len(pairs)), **kwargs)[0]


# --- chat: one image, many turns, one KV cache slot ---------------------------------------------------------
class Chat:
    """A conversation about one image, on an engine of one slot. The image is encoded once, at the first turn;
    every later turn's prompt is the whole conversation, tokenized exactly as a fresh run would, and the engine
    keeps what its slot shares with it (the system prompt, the image, earlier turns) and runs only the rest."""

    def __init__(self, model, tokenizer, image=None, template="vicuna_v1", temperature=0.2, top_p=None,
                 top_k=None, max_new_tokens=512, seed=None, compile=False):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.pixels = None if image is None else load_pixels(image, model.config)  # ((n, 3, S, S), (h, w))
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)
        self.seed = seed
        self.history = []  # [(role, text)]
        self.engine = Engine(model, slots=1, compile=compile)
        self.stats = self.engine.stats

    def ask(self, question: str, on_text=None) -> str:
        turn = len(self.history) // 2
        seed = None if self.seed is None else self.seed + turn  # each turn its own reproducible draws
        question = with_image_placeholder(question, 0 if self.pixels is None or self.history else 1)
        request, reply = request_for(self.model, self.tokenizer, self.pixels, question, self.template,
                                     seed=seed, on_text=on_text, history=self.history, **self.sampling)
        self.engine.run([request])
        text = reply.finish()
        if on_text:
            on_text(reply.new_text(final=True))
        self.history += [("human", question), ("gpt", text.strip())]
        return text.strip()


# --- the three modes ---------------------------------------------------------------------------------------
def print_stats(stats: GenerationStats, model, file=None):
    """Prefill and decode throughput; decode's memory bandwidth counts every LLM weight read once per step
    (the embedding table excepted: a step reads B rows of it)."""
    lm = model.language_model
    embed = lm.model.embed_tokens.weight  # read in full only when it is also the (tied) lm_head
    weight_bytes = sum(t.numel() * t.element_size() for t in weight_tensors(lm)
                       if t is not embed or lm.cfg.tie_word_embeddings)
    gbps = weight_bytes * stats.decode_steps / max(stats.decode_s, 1e-9) / 1e9
    print(f"prefill: {stats.prefill_tokens} tokens in {stats.prefill_s:.2f} s = {stats.prefill_tokens_per_s:.1f} "
          f"tokens/s | decode: {stats.decode_tokens} tokens in {stats.decode_s:.2f} s = "
          f"{stats.decode_tokens_per_s:.1f} tokens/s ({stats.decode_steps} steps, {gbps:.3g} GB/s of "
          f"{weight_bytes / 1e9:.3g} GB weights)", file=file or sys.stderr)
    if stats.images:
        peak = f", CUDA peak {stats.vision_peak_bytes / 2**30:.2f} GiB" if stats.vision_peak_bytes else ""
        print(f"vision tower: {stats.images} image(s) as {stats.tiles} tile(s) in {stats.vision_s:.2f} s "
              f"({stats.vision_s / stats.tiles * 1e3:.0f} ms per tile, in the prefill time above); pixels + "
              f"features {stats.vision_bytes / 2**20:.1f} MiB{peak}", file=file or sys.stderr)
    if stats.compile_s:
        print(f"compile: the first decode step took {stats.compile_s:.1f} s, torch.compile included (in the decode "
              "time above; later steps reuse the compiled code)", file=file or sys.stderr)


def _write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def run_one_shot(model, tokenizer, cfg: GenerateConfig, image=None) -> GenerationStats:
    _, stats = answer_batch(model, tokenizer, [(image, cfg.prompt)], cfg.template, cfg.temperature, cfg.top_p,
                            cfg.top_k, cfg.max_new_tokens, cfg.seed, on_text=lambda b, text: _write(text),
                            compile=cfg.compile)
    _write("\n")
    return stats


def run_chat(model, tokenizer, cfg: GenerateConfig, image=None, stdin=None) -> GenerationStats:
    """Ask, answer, repeat. On a terminal the line is read with the standard library's line editing (arrow
    keys, history); an empty line, end of input or Ctrl-C ends the chat."""
    stdin = stdin or sys.stdin
    interactive = stdin is sys.stdin and sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    chat = Chat(model, tokenizer, image, cfg.template, cfg.temperature, cfg.top_p, cfg.top_k,
                cfg.max_new_tokens, cfg.seed, cfg.compile)
    print(f"chat about {cfg.image or 'no image'}; an empty line, end of input or Ctrl-C ends it", file=sys.stderr)
    try:
        while True:
            if interactive:
                try:
                    line = input("USER: ") + "\n"
                except EOFError:
                    line = ""
            else:
                _write("USER: ")
                line = stdin.readline()
            if not line.strip():
                _write("\n" if not line else "")
                return chat.stats
            _write("ASSISTANT: ")
            chat.ask(line.strip(), on_text=_write)
            _write("\n")
    except KeyboardInterrupt:
        _write("\n")
        return chat.stats


def read_questions(path):
    """-> ([question dicts with their line number], [errors naming file:line]). Blank lines are skipped."""
    questions, errors, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                if not isinstance(q, dict):
                    raise ValueError(f"expected a JSON object, got {type(q).__name__}")
                missing = [k for k in ("question_id", "text") if k not in q]
                if missing:
                    raise ValueError(f"missing key(s) {', '.join(missing)}")
                if not all(isinstance(q.get(k, ""), str) for k in ("text", "image", "prompt")):
                    raise ValueError("'text', 'image' and 'prompt' must be strings")
                key = question_key(q)
                if key in seen:
                    raise ValueError(f"duplicate question {q['question_id']!r} (the same id and text as line "
                                     f"{seen[key]})")
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                errors.append(f"{path}:{n}: {e}")
                continue
            seen[key] = n
            questions.append((n, q))
    return questions, errors


def question_key(q) -> tuple:
    """A question's identity, and its answer's: (question_id, prompt). TextVQA's question_id is its image's, shared
    by the questions of one image. "prompt" is what the answer records, the question's "text" unless the question
    says otherwise (MMBench records the question without the instruction the model is given after it)."""
    return q["question_id"], q.get("prompt", q["text"])


def read_answered(path) -> set:
    """(question_id, prompt) of the answers already in the answers file. An incomplete last line (the process was
    killed in the middle of writing it) is cut off; any other unreadable line is an error."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        print(f"{path}: dropping an incomplete last line ({len(data) - cut} bytes)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    done = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                a = json.loads(line)
                done.add((a["question_id"], a["prompt"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not an answer line ({e}); fix or move the answers file") from e
    return done


def run_batch(model, tokenizer, cfg: GenerateConfig) -> tuple[GenerationStats, list[str]]:
    """Answer every question not yet in cfg.answers, on an engine of cfg.batch_size slots: each answer line is
    written and flushed as soon as it ends (so the file is in the order answers finish; resuming finds them by
    their key). -> (stats, errors): malformed lines and questions that could not be answered, each named."""
    questions, errors = read_questions(cfg.questions)
    n_malformed = len(errors)
    if cfg.num_chunks > 1:  # the original's get_chunk: contiguous chunks of ceil(n / num_chunks)
        size = -(-len(questions) // cfg.num_chunks)
        questions = questions[cfg.chunk_idx * size:(cfg.chunk_idx + 1) * size]
    done = read_answered(cfg.answers)
    todo, lengths, n_done = [], [], 0
    for n, q in questions:  # check each prompt now (text only), so one bad question spares the rest
        if question_key(q) in done:
            n_done += 1
            continue
        try:  # an AnyRes image's positions depend on its size: read from the file's header, not decoded
            sizes = [image_size(os.path.join(cfg.image_folder, q["image"]))] if q.get("image") else []
            ids = prompt_ids([("human", with_image_placeholder(q["text"], len(sizes)))], tokenizer, model.config,
                             cfg.template, sizes)
        except (ValueError, OSError) as e:
            errors.append(f"{cfg.questions}:{n}: question {q['question_id']!r}: {e}")
            continue
        todo.append((n, q))
        lengths.append(model.config.llm_length(ids, sizes))
    unanswerable = len(errors) - n_malformed
    print(f"{len(questions)} questions, {n_done} already answered in {cfg.answers}, {len(todo)} to go"
          + (f"; {n_malformed} malformed line(s)" if n_malformed else "")
          + (f"; {unanswerable} question(s) whose image or prompt does not work" if unanswerable else "")
          + ("; listed at the end" if errors else ""), file=sys.stderr)
    missing = sum("image file not found" in e for e in errors)
    if missing and missing * 2 > missing + len(todo):  # most images missing: the folder, not the questions
        raise ValueError(f"no image found for {missing} of {missing + len(todo)} questions with --image-folder "
                         f"{os.path.abspath(cfg.image_folder or '.')}: check --image-folder (the questions' "
                         "\"image\" paths are relative to it)")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.answers)), exist_ok=True)
    open(cfg.answers, "a").close()  # the file exists afterwards, answers or not (torchrun's merge reads each rank's)
    if not todo:
        return GenerationStats(), errors
    model_id = os.path.basename(os.path.normpath(cfg.model)) if cfg.model else "minillava"
    engine = Engine(model, slots=min(cfg.batch_size, len(todo)), compile=cfg.compile,
                    max_seq_len=cache_size(model.config, lengths, cfg.max_new_tokens))
    print(engine.describe(), file=sys.stderr)
    t0, n_answered = time.perf_counter(), 0
    with open(cfg.answers, "a", encoding="utf-8") as out:

        def write(q, reply):
            nonlocal n_answered
            text = reply.finish().strip()  # one whole line per write, flushed: a kill loses no answer
            out.write(json.dumps({"question_id": q["question_id"], "prompt": question_key(q)[1], "text": text,
                                  "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}},
                                 ensure_ascii=False) + "\n")
            out.flush()
            n_answered += 1
            if n_answered % cfg.batch_size == 0 or n_answered == len(todo):
                os.fsync(out.fileno())
                elapsed = time.perf_counter() - t0
                print(f"answered {n_answered}/{len(todo)} | {elapsed:.0f} s | {n_answered / elapsed:.2f} questions/s"
                      f" | decode {engine.stats.decode_tokens_per_s:.1f} tokens/s | "
                      f"~{elapsed / n_answered * (len(todo) - n_answered):.0f} s left", file=sys.stderr)

        def requests():  # read lazily: one image in memory per slot, not one per question
            for n, q in todo:
                try:
                    image = load_image(os.path.join(cfg.image_folder, q["image"])) if q.get("image") else None
                    request, reply = request_for(model, tokenizer, image, q["text"], cfg.template, cfg.temperature,
                                                 cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.seed)
                except (ValueError, OSError) as e:
                    errors.append(f"{cfg.questions}:{n}: question {q['question_id']!r}: {e}")
                    continue
                request.on_finish = lambda r, q=q, reply=reply: write(q, reply)
                yield request

        engine.run(requests())
        os.fsync(out.fileno())
    return engine.stats, errors


# --- command line ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def profiler(path):
    """--profile PATH: a torch.profiler trace of the generation (open it in chrome://tracing or Perfetto) and the
    top operators by self time on stderr."""
    if not path:
        yield
        return
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        yield
    prof.export_chrome_trace(path)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
    print(f"profile written to {path}", file=sys.stderr)


def parse_args(argv=None) -> GenerateConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, GenerateConfig, aliases=ORIGINAL_FLAGS,
                    choices={"template": list(TEMPLATES), "tokenizer_legacy": ["true", "false"],
                             "quantize": QUANTIZE_CHOICES, "group_size": list(GROUP_SIZES),
                             "image_aspect_ratio": ["pad", "square"]})
    add_load_bits_flags(p)
    cfg = GenerateConfig(**vars(p.parse_args(argv)))
    if cfg.model is None:
        p.error("--model is required")
    modes = [cfg.questions is not None, cfg.chat, cfg.prompt is not None]
    if sum(modes) == 0 and cfg.image is not None:  # --model-path X --image-file Y: a chat, as the original's cli.py
        cfg.chat = True
    elif sum(modes) != 1:
        p.error("choose one mode: --prompt TEXT (one-shot), --chat, or --questions FILE --answers FILE")
    if cfg.questions is not None and cfg.answers is None:
        p.error("--questions needs --answers OUT.jsonl")
    if cfg.num_beams != 1:
        p.error("--num-beams: only 1 (no beam search) is supported; the LLaVA-1.5 evaluation uses 1")
    if not 0 <= cfg.chunk_idx < cfg.num_chunks:
        p.error(f"--chunk-idx {cfg.chunk_idx} must be in [0, --num-chunks {cfg.num_chunks})")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        p.error("--batch-size and --max-new-tokens must be >= 1")
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    errors = []
    threads = set_threads(cfg.threads)
    try:
        # fail on a bad image before loading gigabytes of weights
        image = None if cfg.image is None else open_image(cfg.image)
        if cfg.questions is not None and not os.path.isfile(cfg.questions):
            raise FileNotFoundError(f"questions file not found: {cfg.questions}")
        model, tokenizer = load(cfg.model, cfg.vision, cfg.tokenizer, cfg.dtype, cfg.device,
                                optional_bool(cfg.tokenizer_legacy), cfg.quantize, cfg.group_size, cfg.projector,
                                cfg.model_base)
        if cfg.image_aspect_ratio and model.config.anyres:
            raise ValueError(f"{cfg.model} is a LLaVA-1.6 (anyres) model: --image-aspect-ratio "
                             f"{cfg.image_aspect_ratio} would drop its tiles and image_newline")
        if cfg.image_aspect_ratio:
            model.config = dataclasses.replace(model.config, image_aspect_ratio=cfg.image_aspect_ratio)
        print(threads, file=sys.stderr)
        print(weights_line(model), file=sys.stderr)
        if cfg.prompt is not None:  # check the prompt fits before anything is printed
            sizes = [] if image is None else [(image.height, image.width)]
            prompt_ids([("human", with_image_placeholder(cfg.prompt, len(sizes)))], tokenizer, model.config,
                       cfg.template, sizes)
        with profiler(cfg.profile):
            if cfg.questions is not None:
                stats, errors = run_batch(model, tokenizer, cfg)
            elif cfg.chat:
                stats = run_chat(model, tokenizer, cfg, image)
            else:
                stats = run_one_shot(model, tokenizer, cfg, image)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = f"; the answers so far are in {cfg.answers}: run the same command to go on" if cfg.answers else ""
        print(f"\ninterrupted{resume}", file=sys.stderr)
        return 130
    print(f"tokenizer: {tokenizer.describe()}", file=sys.stderr)
    print_stats(stats, model)
    shown = first_lines(errors, f"{cfg.answers}.errors")
    if shown != errors:  # too many for the screen: all of them in a file
        with open(cfg.answers + ".errors", "w", encoding="utf-8") as f:
            f.writelines(e + "\n" for e in errors)
    for e in shown:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        print(f"error: {len(errors)} question(s) not answered (see above); the others are in {cfg.answers}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
