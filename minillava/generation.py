"""Generation as a library: load a checkpoint and its tokenizer, build a request from a question and an image,
stream a reply cut at its stop strings, answer many questions on the decode engine, chat about one image, and
answer a question file. generate.py, serve.py and eval.py are command lines over it.

    from minillava import generation
    model, tokenizer = generation.load("llava-1.5-7b-hf")                       # any official layout
    texts = generation.answer(model, tokenizer, [("cat.jpg", "What is this?"), ...], batch_size=8)   # greedy
    chat = generation.Chat(model, tokenizer, "cat.jpg", temperature=0)
    chat.ask("What is this?"); chat.ask("And its colour?")

How an answer is made: the prompt is tokenized the way the original LLaVA does (one image id per image, spliced
into Np = 576 embeddings inside the model) and handed to the decode engine (minillava/engine.py): each question is
prefilled alone into a slot of a fixed (slots, n_kv, S_max, hs) KV cache, then every decode step runs one token
for every slot; a finished answer's slot takes the next question at once (continuous batching).
"""
import contextlib
import json
import os
import sys
import time
import uuid

import torch

from minillava.cli import device_from_flag, first_lines, wrong_image_folder
from minillava.engine import Engine, GenerationStats, Request
from minillava.image import image_size, load_image, model_pixels
from minillava.kernels.dispatch import startup_line
from minillava.llama import KVCache
from minillava.templates import build_prompt, stop_strings
from minillava.tokenizer import IMAGE_PLACEHOLDER, StreamDecoder, Tokenizer, tokenize_with_images
from minillava.weights import load_llava
from minillava.weights.save import atomic_file
from minillava.weights.quantize import DEFAULT_GROUP_SIZE, Quantization

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
                found[id(t) if t.is_mkldnn else t.data_ptr()] = t  # oneDNN's packed int8 codes have no pointer
    return list(found.values())


def weights_line(model) -> str:
    """What the loaded weights take, and in which form: the line the scripts print after loading."""
    q = getattr(model, "quantization", None)
    return (f"weights: {sum(t.numel() * t.element_size() for t in weight_tensors(model)) / 1e9:.2f} GB, "
            f"{str(model.language_model.model.embed_tokens.weight.dtype).removeprefix('torch.')}"
            + (f", LLM linear layers {q}" if q else ""))


def kernels_line(model) -> str:
    """Which path (Triton or torch) each op takes on the model's device, and why: printed after weights_line."""
    return startup_line(model.language_model.model.embed_tokens.weight.device)


def load(model_dir, vision=None, tokenizer=None, dtype="auto", device="auto", tokenizer_legacy=None,
         quantize="none", group_size=DEFAULT_GROUP_SIZE, projector=None, model_base=None):
    """A checkpoint directory (any official layout) -> (Llava in eval mode, for inference only: on the CPU its
    q, k, v and gate, up layers are joined, see load_llava; Tokenizer). The tokenizer follows
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
                       quantize=Quantization.parse(quantize, group_size), inference=True).eval()
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
    config.check_fits(ids, image_sizes)
    return ids


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

    return Request(ids, pixels, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   seed=seed, stop_ids=(tokenizer.eos_id,), on_token=on_token, image_sizes=sizes or None), reply


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
    if stats.prefix_reused or stats.images_reused:
        print(f"reused: {stats.prefix_reused} prompt positions from the KV cache ({stats.prefix_copied} copied from "
              f"another slot) against {stats.prefill_tokens} computed; {stats.images_reused} image(s) from the image "
              f"cache against {stats.images} encoded", file=file or sys.stderr)
    if stats.images:
        peak = f", CUDA peak {stats.vision_peak_bytes / 2**30:.2f} GiB" if stats.vision_peak_bytes else ""
        print(f"vision tower: {stats.images} image(s) as {stats.tiles} tile(s) in {stats.vision_s:.2f} s "
              f"({stats.vision_s / stats.tiles * 1e3:.0f} ms per tile, in the prefill time above); pixels + "
              f"features {stats.vision_bytes / 2**20:.1f} MiB{peak}", file=file or sys.stderr)
    if stats.compile_s:
        print(f"compile: the first decode step took {stats.compile_s:.1f} s, torch.compile included (in the decode "
              "time above; later steps reuse the compiled code)", file=file or sys.stderr)



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


def answer_file(model, tokenizer, questions_path, answers_path, image_folder="", template="vicuna_v1",
                temperature=0.0, top_p=None, top_k=None, max_new_tokens=512, seed=None, batch_size=8, num_chunks=1,
                chunk_idx=0, compile=False, model_id="minillava") -> tuple[GenerationStats, list[str]]:
    """Answer every question of the file questions_path (LLaVA's model_vqa format, jsonl) not yet in answers_path,
    on an engine of batch_size slots, questions about one image together: each answer line is written and flushed
    as soon as it ends (a kill loses no answer; resuming finds them by their key), and the file is put in the
    questions' order at the end. num_chunks / chunk_idx: only this contiguous
    chunk (the original's sharding). -> (stats, errors): malformed lines and questions that could not be answered,
    each named."""
    questions, errors = read_questions(questions_path)
    n_malformed = len(errors)
    if num_chunks > 1:  # the original's get_chunk: contiguous chunks of ceil(n / num_chunks)
        size = -(-len(questions) // num_chunks)
        questions = questions[chunk_idx * size:(chunk_idx + 1) * size]
    done = read_answered(answers_path)
    todo, lengths, n_done, missing = [], [], 0, 0
    for n, q in questions:  # check each prompt now (text only), so one bad question spares the rest
        if question_key(q) in done:
            n_done += 1
            continue
        try:  # an AnyRes image's positions depend on its size: read from the file's header, not decoded
            sizes = [image_size(os.path.join(image_folder, q["image"]))] if q.get("image") else []
            ids = prompt_ids([("human", with_image_placeholder(q["text"], len(sizes)))], tokenizer, model.config,
                             template, sizes)
        except (ValueError, OSError) as e:
            errors.append(f"{questions_path}:{n}: question {q['question_id']!r}: {e}")
            missing += isinstance(e, FileNotFoundError)  # no file at that path (minillava.image); not a bad one
            continue
        todo.append((n, q))
        lengths.append(model.config.llm_length(ids, sizes))
    # questions about one image asked one after another: the engine then computes its positions once (POPE asks
    # ~18 questions per image); in_file_order puts the answers back in the file's order
    todo.sort(key=lambda nq: nq[1].get("image") or "")
    unanswerable = len(errors) - n_malformed
    print(f"{len(questions)} questions, {n_done} already answered in {answers_path}, {len(todo)} to go"
          + (f"; {n_malformed} malformed line(s)" if n_malformed else "")
          + (f"; {unanswerable} question(s) whose image or prompt does not work" if unanswerable else "")
          + ("; listed at the end" if errors else ""), file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(answers_path)), exist_ok=True)
    open(answers_path, "a").close()  # the file exists afterwards, answers or not (torchrun's merge reads each rank's)
    wrong = wrong_image_folder(missing, missing + sum(bool(q.get("image")) for _, q in todo), image_folder,
                               "questions")
    if wrong:
        raise wrong
    if not todo:
        in_file_order(answers_path, questions)  # a run killed before its end left it unordered
        return GenerationStats(), errors
    engine = Engine(model, slots=min(batch_size, len(todo)), compile=compile,
                    max_seq_len=cache_size(model.config, lengths, max_new_tokens))
    print(engine.describe(), file=sys.stderr)
    t0, n_answered = time.perf_counter(), 0
    with open(answers_path, "a", encoding="utf-8") as out:

        def write(q, reply):
            nonlocal n_answered
            text = reply.finish().strip()  # one whole line per write, flushed: a kill loses no answer
            out.write(json.dumps({"question_id": q["question_id"], "prompt": question_key(q)[1], "text": text,
                                  "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}},
                                 ensure_ascii=False) + "\n")
            out.flush()
            n_answered += 1
            if n_answered % batch_size == 0 or n_answered == len(todo):
                os.fsync(out.fileno())
                elapsed = time.perf_counter() - t0
                print(f"answered {n_answered}/{len(todo)} | {elapsed:.0f} s | {n_answered / elapsed:.2f} questions/s"
                      f" | decode {engine.stats.decode_tokens_per_s:.1f} tokens/s | "
                      f"~{elapsed / n_answered * (len(todo) - n_answered):.0f} s left", file=sys.stderr)

        def requests():  # read lazily: one image in memory per slot, not one per question
            for n, q in todo:
                try:
                    image = load_image(os.path.join(image_folder, q["image"])) if q.get("image") else None
                    request, reply = request_for(model, tokenizer, image, q["text"], template, temperature,
                                                 top_p, top_k, max_new_tokens, seed)
                except (ValueError, OSError) as e:
                    errors.append(f"{questions_path}:{n}: question {q['question_id']!r}: {e}")
                    continue
                request.on_finish = lambda r, q=q, reply=reply: write(q, reply)
                yield request

        engine.run(requests())
        os.fsync(out.fileno())
    in_file_order(answers_path, questions)
    return engine.stats, errors


def in_file_order(answers_path, questions):
    """Rewrite the answers file, written in the order answers finished, in the order of `questions` (read_questions'
    [(line, question)]), atomically: a kill before this leaves the file as it was, complete. Answers of other
    questions keep their order after the others."""
    order = {question_key(q): i for i, (_, q) in enumerate(questions)}
    with open(answers_path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    place = [order.get((a["question_id"], a["prompt"]), len(order)) for a in map(json.loads, lines)]
    ordered = [line for _, line in sorted(zip(place, lines), key=lambda pl: pl[0])]  # stable
    if ordered != lines:
        with atomic_file(answers_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(ordered)


def report_unanswered(errors: list, answers_path) -> int:
    """After answer_file: each question that could not be answered, named on stderr (the first 20; all of them in
    ANSWERS.errors when there are more). -> the exit status: 1 if any, else 0."""
    if not errors:
        return 0
    shown = first_lines(errors, f"{answers_path}.errors")
    if shown != errors:  # too many for the screen: all of them in a file
        with open(f"{answers_path}.errors", "w", encoding="utf-8") as f:
            f.writelines(e + "\n" for e in errors)
    for e in shown:
        print(f"error: {e}", file=sys.stderr)
    print(f"error: {len(errors)} question(s) not answered (see above); the others are in {answers_path}",
          file=sys.stderr)
    return 1


def answer_questions(model, tokenizer, questions_path, answers_path, profiler=None, **kwargs) -> int:
    """generate.py's batch mode and eval.py's answering: answer_file (kwargs as for it), then on stderr the tokenizer,
    the speed (print_stats) and each question not answered (report_unanswered). profiler: a context manager to answer
    inside (generate.py's --profile), so that what it prints comes before these lines. -> the exit status: 1 if a
    question was not answered, else 0."""
    with profiler or contextlib.nullcontext():
        stats, errors = answer_file(model, tokenizer, questions_path, answers_path, **kwargs)
    print(f"tokenizer: {tokenizer.describe()}", file=sys.stderr)
    print_stats(stats, model)
    return report_unanswered(errors, answers_path)
