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

How it works (minillava/generation.py, the library this is a command line over): the prompt is tokenized the way
the original LLaVA does (one image id per image, spliced into Np = 576 embeddings inside the model) and handed to
the decode engine (minillava/engine.py): each question is prefilled alone into a slot of a fixed (slots, n_kv,
S_max, hs) KV cache, then every decode step runs one token for every slot; a finished answer's slot takes the next
question at once (continuous batching, --batch-size slots). At the end, prefill and decode tokens/s go to stderr,
with the memory bandwidth decoding reaches (every step reads every LLM weight). --compile compiles the decode step
(CUDA graphs on a GPU).

Template: vicuna_v1 by default, for every checkpoint. It is what LLaVA-1.5 was trained (stage 2) and evaluated
with; llava-hf's checkpoints are a conversion of the same weights, and nothing in a layout-A directory says
reliably whether it came from llava-hf or from train.py. `--template llava_hf` gives llava-hf's model-card
prompt ("USER: <image>\\n... ASSISTANT:", no system prompt); `--template plain` suits a stage-1 model.

Python use (demo.py does this): minillava.generation
    model, tokenizer = generation.load("llava-1.5-7b-hf")
    texts = generation.answer(model, tokenizer, [("cat.jpg", "What is this?"), ...], batch_size=8, temperature=0)
"""
import argparse
import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass

# Light imports only: `--help` and a wrong flag answer at once; torch and the model come in main(), after parsing.
from minillava.cli import (DEFAULT_GROUP_SIZE, GROUP_SIZES, QUANTIZE_CHOICES, add_config_args, add_load_bits_flags,
                           optional_bool, set_threads)
from minillava.templates import TEMPLATES


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


MAX_DOWNLOAD_MB = 50  # --image URL: at most this much is read
DOWNLOAD_TIMEOUT = 30.0  # --image URL: seconds without progress before giving up


def open_image(path_or_url: str):
    """--image: a local file, or an http(s) URL fetched with the standard library (a timeout, a size cap) and
    decoded from memory. Only here: serve.py never fetches a remote URL for a client."""
    import io

    from minillava.image import load_image
    if not path_or_url.startswith(("http://", "https://")):
        return load_image(path_or_url)
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


def _write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def run_one_shot(model, tokenizer, cfg: GenerateConfig, image=None):
    from minillava.generation import answer_batch
    _, stats = answer_batch(model, tokenizer, [(image, cfg.prompt)], cfg.template, cfg.temperature, cfg.top_p,
                            cfg.top_k, cfg.max_new_tokens, cfg.seed, on_text=lambda b, text: _write(text),
                            compile=cfg.compile)
    _write("\n")
    return stats


def run_chat(model, tokenizer, cfg: GenerateConfig, image=None, stdin=None):
    """Ask, answer, repeat. On a terminal the line is read with the standard library's line editing (arrow
    keys, history); an empty line, end of input or Ctrl-C ends the chat."""
    stdin = stdin or sys.stdin
    interactive = stdin is sys.stdin and sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    from minillava.generation import Chat
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


# --- command line ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def profiler(path):
    """--profile PATH: a torch.profiler trace of the generation (open it in chrome://tracing or Perfetto), the
    top operators by self time and which path (Triton or torch) each op took and why, on stderr."""
    if not path:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        yield
    prof.export_chrome_trace(path)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
    from minillava.kernels import dispatch, linear
    print(dispatch.report(), file=sys.stderr)  # which path each op took, and why
    print(f"CPU decode linears: {linear.describe() or 'none measured'}", file=sys.stderr)
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
    from minillava import generation as G  # torch and the model: only once the flags are known to be good
    threads = set_threads(cfg.threads)
    try:
        # fail on a bad image before loading gigabytes of weights
        image = None if cfg.image is None else open_image(cfg.image)
        if cfg.questions is not None and not os.path.isfile(cfg.questions):
            raise FileNotFoundError(f"questions file not found: {cfg.questions}")
        model, tokenizer = G.load(cfg.model, cfg.vision, cfg.tokenizer, cfg.dtype, cfg.device,
                                  optional_bool(cfg.tokenizer_legacy), cfg.quantize, cfg.group_size, cfg.projector,
                                  cfg.model_base)
        if cfg.image_aspect_ratio and model.config.anyres:
            raise ValueError(f"{cfg.model} is a LLaVA-1.6 (anyres) model: --image-aspect-ratio "
                             f"{cfg.image_aspect_ratio} would drop its tiles and image_newline")
        if cfg.image_aspect_ratio:
            model.config = dataclasses.replace(model.config, image_aspect_ratio=cfg.image_aspect_ratio)
        print(threads, file=sys.stderr)
        print(G.weights_line(model), file=sys.stderr)
        print(G.kernels_line(model), file=sys.stderr)
        if cfg.prompt is not None:  # check the prompt fits before anything is printed
            sizes = [] if image is None else [(image.height, image.width)]
            G.prompt_ids([("human", G.with_image_placeholder(cfg.prompt, len(sizes)))], tokenizer, model.config,
                         cfg.template, sizes)
        if cfg.questions is not None:  # batch mode: the run eval.py's `answer` makes too
            return G.answer_questions(
                model, tokenizer, cfg.questions, cfg.answers, profiler(cfg.profile), image_folder=cfg.image_folder,
                template=cfg.template, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=cfg.batch_size, num_chunks=cfg.num_chunks,
                chunk_idx=cfg.chunk_idx, compile=cfg.compile, model_id=os.path.basename(os.path.normpath(cfg.model)))
        with profiler(cfg.profile):
            stats = run_chat(model, tokenizer, cfg, image) if cfg.chat else run_one_shot(model, tokenizer, cfg, image)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = f"; the answers so far are in {cfg.answers}: run the same command to go on" if cfg.answers else ""
        print(f"\ninterrupted{resume}", file=sys.stderr)
        return 130
    print(f"tokenizer: {tokenizer.describe()}", file=sys.stderr)
    G.print_stats(stats, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
