"""An OpenAI-compatible server for LLaVA, and a chat page, on the decode engine. Standard library only.

    python serve.py --model llava-1.5-7b-hf                     # http://127.0.0.1:8000/ (the page), /v1/...
    python serve.py --model llava-v1.5-7b --vision clip-vit-large-patch14-336 --slots 16 --api-key KEY
    python serve.py --model vicuna-7b-v1.5 --vision clip-vit-large-patch14-336 --projector OUT/mm_projector.safetensors

    from openai import OpenAI                                   # any OpenAI client
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="llava-1.5-7b-hf", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}], temperature=0)

Endpoints: POST /v1/chat/completions (streamed as server-sent events with "stream": true), GET /v1/models,
GET /health, GET / (one self-contained HTML page). One thread owns the engine: it admits waiting requests into
free slots and runs decode steps; each HTTP connection has its own thread, which hands its request to the engine
thread through a bounded queue (full: 429 with Retry-After) and streams what the engine produces. A client that
disconnects mid-stream frees its slot at the next token.

Mapping onto LLaVA: messages become the template's turns (default vicuna_v1); a system message replaces the
template's system prompt; the image (a data URL, or a path under --image-root) goes with its message as
"<image>\\n" first, as the original code does. Defaults are OpenAI's: temperature 1, top_p 1, no token limit but
the context. Errors are OpenAI's {"error": {...}} with "param" naming the field at fault. Safety: binds to
127.0.0.1 unless --host says otherwise; never fetches a remote URL; bounded body (Content-Length or chunked), image
bytes and pixels; a text too long for the context is refused before it is tokenized; socket timeouts.
"""
import argparse
import base64
import binascii
import io
import json
import os
import queue
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from PIL import Image

from minillava import generation
from minillava.cli import (DEFAULT_GROUP_SIZE, GROUP_SIZES, QUANTIZE_CHOICES, add_config_args, add_load_bits_flags,
                           set_threads)
from minillava.engine import Engine, PrefillError, Request
from minillava.image import model_pixels
from minillava.templates import TEMPLATES, build_prompt, get_template, stop_strings
from minillava.tokenizer import IMAGE_PLACEHOLDER, tokenize_with_images


@dataclass
class ServeConfig:
    model: str = None         # checkpoint dir (any official layout)
    vision: str = None        # CLIP directory, for layouts B and C
    projector: str = None     # layout C: the stage-1 projector file (train.py's OUT/mm_projector.safetensors) or dir
    model_base: str = None    # the original's: the LLM dir, when --model is a stage-1 output (its mm_projector file)
    host: str = "127.0.0.1"   # 0.0.0.0 to listen on every interface (then set --api-key)
    port: int = 8000
    api_key: str = None       # clients must send "Authorization: Bearer KEY"
    slots: int = 8            # sequences decoded together (the engine's KV cache slots)
    queue: int = 32           # requests waiting for a slot; more get 429
    max_seq_len: int = 0      # positions per slot; 0: the model's context
    prefill_chunk: int = 256  # prompt positions prefilled per decode step: a newcomer never stalls streams; 0: whole
    image_cache_mb: float = 256  # features of recent images kept by content (the same picture is encoded once)
    template: str = "vicuna_v1"
    model_name: str = None    # the id /v1/models lists and requests name (default: the directory's name)
    image_root: str = None    # local image paths are read only under this directory (default: none are)
    max_images: int = 1       # images per request (LLaVA-1.5 was trained with one)
    max_body_mb: float = 20.0  # request body limit (413 beyond)
    max_image_pixels: int = 25_000_000  # width x height limit before an image is decoded (decompression bombs)
    timeout: float = 60.0     # socket timeout per connection, seconds
    dtype: str = "auto"
    quantize: str = "none"    # none | int8 | int4: the LLM's linear layers, quantized while loading
    group_size: int = DEFAULT_GROUP_SIZE  # int4: inputs per scale (32, 64, 128)
    device: str = "auto"
    threads: int = 0
    compile: bool = False     # torch.compile the decode step (CUDA graphs on a GPU)


DRAIN_BYTES = 64 * 2**20  # at most this much of a body over the limit is read before the 413 is sent


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- requests: OpenAI's JSON -> an engine Request ---------------------------------------------------------------
FIELDS = {"model": str, "messages": list, "temperature": (int, float), "top_p": (int, float), "top_k": int,
          "max_tokens": int, "max_completion_tokens": int, "stop": (str, list), "seed": int, "n": int,
          "stream": bool, "stream_options": dict}
# JSON integers have no size; OpenAI's integer fields are 64-bit, and torch's seeds and sizes overflow beyond
INT_MIN, INT_MAX = -2**63, 2**63 - 1


def check_fields(body):
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, kind in FIELDS.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise APIError(400, f"'{name}' must be {names}, got {type(value).__name__}", param=name)
        if kind is int and value is not None and not INT_MIN <= value <= INT_MAX:
            raise APIError(400, f"'{name}' must be an integer from {INT_MIN} to {INT_MAX}, got {value}", param=name)
    if body.get("n", 1) != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    if not body.get("messages"):
        raise APIError(400, "'messages' is required and must not be empty", param="messages")


class Server:
    """What the handlers share: the model, the tokenizer, the engine thread and its queue."""

    def __init__(self, cfg: ServeConfig, model, tokenizer):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.name = cfg.model_name or os.path.basename(os.path.normpath(cfg.model or "minillava"))
        self.engine = Engine(model, slots=cfg.slots, max_seq_len=cfg.max_seq_len or None, compile=cfg.compile,
                             prefill_chunk=cfg.prefill_chunk or None, image_cache_mb=cfg.image_cache_mb)
        # No token covers more characters of the text than its piece has ("▁the" is " the", "</s>" is itself, a
        # byte piece less than one), as LLaMA's tokenizer keeps every character (identity normalization, spaces
        # kept, byte fallback): a text longer than the context times this cannot fit, however it tokenizes.
        self.max_piece = max(len(tokenizer.id_to_piece(i)) for i in range(tokenizer.vocab_size))
        self.waiting = queue.Queue()  # requests for the engine thread, in arrival order
        self.held = []  # taken from `waiting`, waiting for a prefix the engine is prefilling now (engine thread)
        self.capacity = threading.Semaphore(cfg.slots + cfg.queue)  # requests in flight: running or waiting
        self.stopping = False
        self.thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        self.thread.start()

    # the engine thread ----------------------------------------------------------------------------------
    def _engine_loop(self):
        engine = self.engine
        while not self.stopping:
            while engine.has_free_slot:
                try:
                    req = self.held.pop(0) if self.held else self.waiting.get(block=not engine.busy, timeout=0.1)
                except queue.Empty:
                    break
                if req.owner.cancelled:
                    continue
                if engine.admissible([req]) == 0:  # e.g. the same image as a chat being prefilled: copy it after
                    self.held.insert(0, req)
                    break
                try:
                    engine.admit(req)
                except Exception as e:  # noqa: BLE001  one bad request must not stop the server
                    req.owner.fail(e)
            for req in list(engine.running):
                if req is not None and req.owner.cancelled:
                    engine.cancel(req)
            if engine.busy:
                try:
                    engine.step()
                except PrefillError as e:  # the newcomers' prefill: only they fail
                    for req in e.requests:
                        req.owner.fail(e.cause)
                except Exception as e:  # noqa: BLE001
                    for req in list(engine.running):
                        if req is not None:
                            engine.cancel(req)
                            req.owner.fail(e)

    def close(self):
        self.stopping = True
        self.thread.join(timeout=5)

    # one request ---------------------------------------------------------------------------------------------
    def image(self, url: str, where: str) -> tuple:
        """An image_url's url -> (pixels (n, 3, S, S) as the model takes them, its size (h, w)). `where` is the
        part's place in the request (messages[0].content[1].image_url): errors name it."""
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if ";base64" not in head:
                raise APIError(400, f"{where}: an image data URL must be base64 (data:image/png;base64,...)", where)
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                raise APIError(400, f"{where}: the image's base64 data is not valid: {e}", where) from None
            source = io.BytesIO(raw)
        elif url.startswith(("http://", "https://")):
            raise APIError(400, f"{where}: this server never fetches remote URLs: send the image as a data URL "
                                "(data:image/jpeg;base64,...)", where, "remote_url")
        else:
            source = self._local_path(url[len("file://"):] if url.startswith("file://") else url, where)
        try:
            im = Image.open(source)
            w, h = im.size
            if w * h > self.cfg.max_image_pixels:
                raise APIError(400, f"{where}: the image has {w} x {h} = {w * h} pixels, more than the limit of "
                                    f"{self.cfg.max_image_pixels}", where, "image_too_large")
            im.load()
        except APIError:
            raise
        except Image.UnidentifiedImageError:  # its message is "cannot identify image file <_io.BytesIO ...>"
            raise APIError(400, f"{where}: the image could not be decoded: its data is not in an image format "
                                "PIL reads (PNG, JPEG, GIF, BMP, ...)", where, "invalid_image") from None
        except Exception as e:  # noqa: BLE001  PIL's plugins raise OSError, SyntaxError, struct.error... on bad data
            raise APIError(400, f"{where}: the image could not be decoded: {str(e) or type(e).__name__}", where,
                           "invalid_image") from None
        try:
            return model_pixels(im, self.model.config)
        except ValueError as e:  # a mode that does not convert to RGB
            raise APIError(400, f"{where}: the image could not be decoded: {e}", where, "invalid_image") from None

    def _local_path(self, path: str, where: str):
        root = self.cfg.image_root
        if not root:
            raise APIError(400, f"{where}: local image paths are not served (start the server with --image-root "
                                "DIR); send the image as a data URL", where)
        real, base = os.path.realpath(os.path.join(root, path)), os.path.realpath(root)
        if os.path.commonpath([real, base]) != base:
            raise APIError(400, f"{where}: image path {path!r} is outside --image-root", where)
        if not os.path.isfile(real):
            raise APIError(400, f"{where}: image file not found under --image-root: {path!r}", where)
        return real

    def parse(self, body) -> tuple:
        """The request body -> (engine Request, Reply, prompt tokens). Errors are APIErrors naming the field."""
        check_fields(body)
        if body.get("model") not in (None, self.name):
            raise APIError(404, f"model {body['model']!r} does not exist; this server serves {self.name!r}",
                           "model", "model_not_found")
        # the cheap checks first: nothing is decoded or tokenized for a request that fails them
        temperature, top_p, top_k = body.get("temperature"), body.get("top_p"), body.get("top_k")
        if temperature is not None and not 0 <= temperature <= 2:
            raise APIError(400, f"need 0 <= temperature <= 2, got {temperature}", "temperature")
        if top_p is not None and not 0 < top_p <= 1:
            raise APIError(400, f"need 0 < top_p <= 1, got {top_p}", "top_p")
        if top_k is not None and top_k < 1:
            raise APIError(400, f"need top_k >= 1, got {top_k}", "top_k")
        limit_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        limit = body.get(limit_field)
        if limit is not None and limit < 1:
            raise APIError(400, f"{limit_field} must be >= 1, got {limit}", limit_field)
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        if len(stops) > 4 or not all(isinstance(s, str) for s in stops):
            raise APIError(400, "'stop' is a string or a list of up to 4 strings", "stop")
        template, history, images = get_template(self.cfg.template), [], []
        for i, m in enumerate(body["messages"]):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}]")
            text, n_img = self._content(m.get("content"), i, images)
            if m["role"] == "system":
                template = replace(template, system=text)
                continue
            if IMAGE_PLACEHOLDER in text:
                raise APIError(400, f"messages[{i}]: the text may not contain {IMAGE_PLACEHOLDER}; send images as "
                                    "image_url parts", f"messages[{i}]")
            history.append(("human" if m["role"] == "user" else "gpt", IMAGE_PLACEHOLDER * n_img + "\n" * bool(n_img)
                            + text))
        if not history or history[-1][0] != "human":
            raise APIError(400, "the last message must be the user's", "messages")
        cfg, S = self.model.config, self.engine.S
        prompt = build_prompt(history, template)
        chars = len(prompt) - len(IMAGE_PLACEHOLDER) * len(images)  # an image takes one position or more
        if chars > S * self.max_piece:  # tokenizing megabytes takes seconds: refuse what cannot fit at once
            raise APIError(400, f"the prompt has {chars} characters of text: more than the context of {S} positions "
                                f"can hold (a token covers at most {self.max_piece} characters)", "messages",
                           "context_length_exceeded")
        try:
            ids = tokenize_with_images(prompt, self.tokenizer, cfg.image_token_id)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        sizes = [size for _, size in images]
        kept = f" and {limit_field} is {limit}" if limit else ""
        try:  # room for the prompt and at least one answer token in the engine's slot
            L = cfg.check_fits(ids, sizes, room=S, answer=limit or 1, message="the prompt takes {L} positions "
                               "({images} image(s): {image_positions})" + kept + ": {need} > the context of {room}")
        except ValueError as e:
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        # (N_tiles, 3, S, S) at the tower's size, as the checkpoint prepares images (image.model_pixels)
        pixels = torch.cat([p for p, _ in images]) if images else None
        reply = generation.Reply(self.tokenizer, stop_strings(self.cfg.template) + stops)
        # no max_tokens: until the slot is full, as generate.py (the engine ends the answer there)
        req = Request(ids, pixels, max_new_tokens=limit or S, temperature=1.0 if temperature is None else
                      float(temperature), top_p=top_p, top_k=top_k, seed=body.get("seed"),
                      stop_ids=(self.tokenizer.eos_id,), image_sizes=sizes if cfg.anyres else None)
        return req, reply, L

    def _content(self, content, i, images) -> tuple:
        """A message's content (a string, or a list of text and image_url parts) -> (text, number of images).
        Each image is appended to `images` as (pixels, size), the result of `image`."""
        if isinstance(content, str):
            return content, 0
        if not isinstance(content, list):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
        texts, n = [], 0
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict) \
                    and isinstance(part["image_url"].get("url"), str):
                if len(images) >= self.cfg.max_images:
                    raise APIError(400, f"{where}: too many images: this server takes at most {self.cfg.max_images} "
                                        "per request", where, "too_many_images")
                images.append(self.image(part["image_url"]["url"], where + ".image_url"))
                n += 1
            else:
                raise APIError(400, f"{where}: each part is {{'type': 'text', 'text': ...}} or "
                                    "{'type': 'image_url', 'image_url': {'url': ...}}", where)
        return "\n".join(texts), n


class Job:
    """One request between its HTTP thread and the engine thread: the engine's callbacks put text pieces on a
    queue that the HTTP thread reads."""

    def __init__(self, req: Request, reply):
        self.req, self.reply, self.pieces = req, reply, queue.Queue()
        self.cancelled = False
        req.owner = self
        req.on_token = self._on_token
        req.on_finish = self._on_finish

    def _on_token(self, out):
        stopped = self.reply.update(out)
        text = self.reply.new_text()
        if text:
            self.pieces.put(("text", text))
        return stopped

    def _on_finish(self, req):
        self.reply.finish()
        tail = self.reply.new_text(final=True)
        if tail:
            self.pieces.put(("text", tail))
        self.pieces.put(("end", req.finish_reason))

    def fail(self, error):
        self.pieces.put(("error", error))


# --- HTTP -------------------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server_version = "minillava"
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> Server:
        return self.server.app

    def setup(self):
        self.timeout = self.app.cfg.timeout  # socket timeout: a slow client cannot hold its thread forever
        super().setup()

    # Errors (log_error: a timed-out or lost connection) always get their line on stderr; the stdlib's line per
    # request only off 127.0.0.1 or with MINILLAVA_SERVE_LOG set: on one's own machine it is noise.
    def log_request(self, code="-", size="-"):
        if self.app.cfg.host != "127.0.0.1" or os.environ.get("MINILLAVA_SERVE_LOG"):
            super().log_request(code, size)

    def handle(self):
        try:
            super().handle()
        except ConnectionError as e:  # the client reset or left: nothing to answer, and one line says it, where
            self.log_error("connection lost: %s", e)  # socketserver would print a traceback

    def _send_json(self, status: int, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError, headers=()):
        self._send_json(e.status, e.body(), headers)

    def _authorized(self) -> bool:
        key = self.app.cfg.api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            self._error(APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                 kind="authentication_error", code="invalid_api_key"))
            return False
        return True

    def do_GET(self):
        if self.path == "/health":
            e = self.app.engine
            return self._send_json(200, {"status": "ok", "slots": e.slots, "running": sum(r is not None for r in
                                                                                           e.running),
                                         "waiting": self.app.waiting.qsize()})
        if self.path in ("/", "/index.html"):
            data = PAGE.replace("MODEL_NAME", self.app.name).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        if not self._authorized():
            return
        if self.path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [
                {"id": self.app.name, "object": "model", "created": int(self.server.started),
                 "owned_by": "minillava"}]})
        self._error(APIError(404, f"no such endpoint: GET {self.path}", code="not_found"))

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self.close_connection = True  # the body is not read: the connection cannot be reused
            return self._error(APIError(404, f"no such endpoint: POST {self.path}", code="not_found"))
        if not self._authorized():
            self.close_connection = True
            return
        try:
            body = self._read_body()
            try:
                body = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise APIError(400, f"the body is not valid JSON: {e}") from None
            req, reply, n_prompt = self.app.parse(body)
            if not self.app.capacity.acquire(blocking=False):
                raise APIError(429, f"all {self.app.cfg.slots} slots are busy and {self.app.cfg.queue} requests "
                                    "wait: retry later", kind="rate_limit_error", code="queue_full")
        except APIError as e:
            return self._error(e, [("Retry-After", "1")] if e.status == 429 else [])
        job = Job(req, reply)
        stream = bool(body.get("stream"))
        usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            self.app.waiting.put(req)
            (self._stream if stream else self._complete)(job, n_prompt, usage)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled = True  # the engine thread frees the slot at its next step
        finally:
            self.app.capacity.release()

    def _read_body(self) -> bytes:
        """The body: Content-Length bytes, or chunks (Transfer-Encoding: chunked); at most --max-body-mb (413).
        A body not read to its end leaves the connection unusable: every error here closes it."""
        limit = self.app.cfg.max_body_mb * 2**20
        coding = ", ".join(self.headers.get_all("Transfer-Encoding", []))
        if coding:
            if "Content-Length" in self.headers:  # the two disagree about where this request ends: answer, then
                self.close_connection = True       # close (RFC 9112 6.3)
            try:
                if coding.strip().lower() != "chunked":
                    raise APIError(400, f"Transfer-Encoding {coding!r} is not supported: send the body as it is, "
                                        "or chunked")
                return self._read_chunked(limit)
            except APIError:
                self.close_connection = True
                raise
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise APIError(400, "Content-Length is not a number")
        if n > limit:
            self.close_connection = True
            self._skip(min(n, DRAIN_BYTES))  # read (a bounded part of) it: a client still sending would get a reset
            raise APIError(413, f"the body is {n} bytes, over the limit of {self.app.cfg.max_body_mb} MB")
        body = self.rfile.read(n)  # up to a timeout while the client is silent: TimeoutError, one log line
        if len(body) < n:
            self.close_connection = True
            raise APIError(400, f"the body ended after {len(body)} of the {n} bytes its Content-Length announced: "
                                "the client closed the connection before sending all of it")
        return body

    def _read_chunked(self, limit) -> bytes:
        """A chunked body (RFC 9112 7.1): chunks of a line "SIZE in hex[;extensions]", SIZE bytes and a line end, up
        to one of size 0, then trailer lines up to an empty one. Past `limit` the chunks are read and dropped, as a
        Content-Length body over it, before the 413."""
        chunks, total = [], 0
        while True:
            line = self._chunk_line()
            m = re.fullmatch(rb"([0-9a-fA-F]{1,15})[ \t]*(;.*)?\r?\n", line)
            if m is None:
                raise APIError(400, f"malformed chunked body: a chunk starts with {line[:40]!r}, not its size in hex")
            size = int(m.group(1), 16)
            total += size
            if size == 0 or total > limit + DRAIN_BYTES:
                break
            if total > limit:
                self._skip(size)
            else:
                chunks.append(self.rfile.read(size))
                if len(chunks[-1]) < size:
                    raise APIError(400, "the chunked body ended inside a chunk: the client closed the connection")
            if self._chunk_line() not in (b"\r\n", b"\n"):
                raise APIError(400, "malformed chunked body: a chunk is longer than its size says")
        if total > limit:
            raise APIError(413, f"the chunked body is over {int(limit)} bytes, the limit of "
                                f"{self.app.cfg.max_body_mb} MB")
        for _ in range(64):  # trailer fields, up to an empty line: none is used
            if self._chunk_line() in (b"\r\n", b"\n"):
                return b"".join(chunks)
        raise APIError(400, "malformed chunked body: more than 64 trailer lines")

    def _chunk_line(self) -> bytes:
        line = self.rfile.readline(1024)
        if len(line) == 1024 and not line.endswith(b"\n"):
            raise APIError(400, "malformed chunked body: a line longer than 1024 bytes")
        if not line.endswith(b"\n"):
            raise APIError(400, "the chunked body ended before its last (empty) chunk: the client closed the "
                                "connection")
        return line

    def _skip(self, n: int):
        """Read and drop n bytes of the body (fewer if the client closes the connection first)."""
        while n > 0:
            got = len(self.rfile.read(min(n, 2**20)))
            if not got:
                return
            n -= got

    def _chunk(self, cid, created, delta, finish=None):
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.app.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def _events(self, job):
        while True:
            kind, value = job.pieces.get()
            if kind == "error":
                raise value
            yield kind, value
            if kind == "end":
                return

    def _complete(self, job, n_prompt, _):
        text, reason = [], None
        try:
            for kind, value in self._events(job):
                if kind == "text":
                    text.append(value)
                else:
                    reason = value
        except Exception as e:  # noqa: BLE001
            return self._error(APIError(500, f"generation failed: {e}", kind="server_error"))
        message = {"role": "assistant", "content": "".join(text).strip()}
        self._send_json(200, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                              "created": int(time.time()), "model": self.app.name,
                              "choices": [{"index": 0, "message": message, "finish_reason": reason}],
                              "usage": usage_of(n_prompt, job.req)})

    def _stream(self, job, n_prompt, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        cid, created, started, held = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), False, ""
        send = lambda obj: (self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n"), self.wfile.flush())
        send(self._chunk(cid, created, {"role": "assistant", "content": ""}))
        try:
            for kind, value in self._events(job):
                if kind == "text":  # the answer is stripped, as the non-streamed one: leading and trailing spaces
                    value = held + (value if started else value.lstrip())  # go; trailing ones wait for more
                    shown = value.rstrip()
                    held, started = value[len(shown):], started or bool(shown)
                    if shown:
                        send(self._chunk(cid, created, {"content": shown}))
                else:
                    send(self._chunk(cid, created, {}, value))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise
        except Exception as e:  # noqa: BLE001
            send(APIError(500, f"generation failed: {e}", kind="server_error").body())
        if include_usage:
            send({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.app.name,
                  "choices": [], "usage": usage_of(n_prompt, job.req)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def usage_of(n_prompt, req) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": len(req.out), "total_tokens": n_prompt + len(req.out)}


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a connection's thread never keeps the process alive

    def __init__(self, address, app: Server):
        # The listen backlog (the stdlib's default is 5: twenty clients connecting at once would get resets)
        # holds every request the server can take: the slots, the queue, and as many again arriving.
        self.request_queue_size = 2 * (app.cfg.slots + app.cfg.queue) + 16
        self.app, self.started = app, time.time()
        super().__init__(address, Handler)


def start(cfg: ServeConfig, model=None, tokenizer=None) -> HTTPServer:
    """Load (unless given) and bind; -> the server (serve_forever() to run it; port 0 picks a free port)."""
    if model is None:
        model, tokenizer = generation.load(cfg.model, cfg.vision, dtype=cfg.dtype, device=cfg.device,
                                         quantize=cfg.quantize, group_size=cfg.group_size, projector=cfg.projector,
                                         model_base=cfg.model_base)
    if cfg.template not in TEMPLATES:
        raise ValueError(f"unknown template {cfg.template!r}")
    return HTTPServer((cfg.host, cfg.port), Server(cfg, model, tokenizer))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>minillava: MODEL_NAME</title>
<style>
 body { font: 15px system-ui, sans-serif; max-width: 760px; margin: 2em auto; padding: 0 1em; }
 #log div { margin: .6em 0; white-space: pre-wrap; } .user { color: #245; } .assistant { color: #222; }
 img#preview { max-width: 240px; max-height: 240px; display: block; margin: .5em 0; }
 textarea { width: 100%; height: 4em; } button { padding: .4em 1.2em; }
</style></head><body>
<h1>minillava: MODEL_NAME</h1>
<p>Choose an image, ask about it; the answer streams in. The conversation goes on about the same image.</p>
<input type="file" id="image" accept="image/*"><img id="preview" alt="">
<div id="log"></div>
<textarea id="question" placeholder="What is in the picture?"></textarea>
<p><button id="send">Send</button> temperature <input id="temperature" type="number" value="0.2" min="0" max="2"
 step="0.1" style="width: 4em"> <span id="status"></span></p>
<script>
const messages = []; let imageUrl = null;
const $ = id => document.getElementById(id);
$("image").onchange = () => {
  const file = $("image").files[0]; if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { imageUrl = reader.result; $("preview").src = imageUrl; messages.length = 0;
                          $("log").textContent = ""; };
  reader.readAsDataURL(file);
};
function line(cls, text) { const d = document.createElement("div"); d.className = cls; d.textContent = text;
                           $("log").appendChild(d); return d; }
$("send").onclick = async () => {
  const q = $("question").value.trim(); if (!q) return;
  const content = [{type: "text", text: q}];
  if (imageUrl && messages.length === 0) content.push({type: "image_url", image_url: {url: imageUrl}});
  messages.push({role: "user", content}); line("user", "USER: " + q); $("question").value = "";
  const out = line("assistant", "ASSISTANT: "); let answer = "";
  $("send").disabled = true; $("status").textContent = "answering...";
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({messages, stream: true, temperature: Number($("temperature").value)})});
    if (!r.ok) { const e = await r.json(); throw new Error(e.error.message); }
    const reader = r.body.getReader(), dec = new TextDecoder(); let buf = "";
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true}); const events = buf.split("\\n\\n"); buf = events.pop();
      for (const ev of events) {
        const data = ev.replace(/^data: /, ""); if (data === "[DONE]") continue;
        const delta = (JSON.parse(data).choices[0] || {}).delta || {};
        if (delta.content) { answer += delta.content; out.textContent = "ASSISTANT: " + answer; }
      }
    }
    messages.push({role: "assistant", content: answer}); $("status").textContent = "";
  } catch (e) { $("status").textContent = "error: " + e.message; messages.pop(); }
  $("send").disabled = false;
};
</script></body></html>
"""


def parse_args(argv=None) -> ServeConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, ServeConfig, aliases={"model": ["--model-path"]},  # the original LLaVA's flag names too
                    choices={"template": list(TEMPLATES), "quantize": QUANTIZE_CHOICES,
                             "group_size": list(GROUP_SIZES)})
    add_load_bits_flags(p)
    cfg = ServeConfig(**vars(p.parse_args(argv)))
    if cfg.model is None:
        p.error("--model is required")
    if cfg.slots < 1 or cfg.queue < 0:
        p.error("--slots must be >= 1 and --queue >= 0")
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    print(set_threads(cfg.threads), file=sys.stderr)
    try:
        server = start(cfg)
    except (ValueError, OSError) as e:  # a missing file, --device cuda without CUDA...: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(generation.weights_line(server.app.model), file=sys.stderr)
    print(generation.kernels_line(server.app.model), file=sys.stderr)
    print(f"serving {server.app.name} on http://{host}:{port}/ ({server.app.engine.describe()}; "
          f"{'API key required' if cfg.api_key else 'no API key'}); Ctrl-C stops", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    finally:
        server.server_close()
        server.app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
