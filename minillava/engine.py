"""The decode engine: one fixed-shape KV cache serving many sequences at once (continuous batching).

    engine = Engine(model, slots=8)
    done = engine.run([Request(ids, pixel_values, max_new_tokens=128), ...])  # each request's .out: its ids

The cache holds `slots` sequences of up to S_max positions each: (slots, n_kv, S_max + 1, hs) per layer (the
extra position is where idle slots write, never read). A request is prefilled alone into a free slot (its images
encoded once), joins the decode batch at the next step and leaves it when it stops (a stop id such as EOS, its
on_token callback saying a stop string appeared, max_new_tokens, or a full slot); its slot is refilled at once.
A decode step runs every slot, one token each, so it has one shape for the engine's life: it can be compiled and,
on CUDA, captured in a CUDA graph (`compile=True`). Inside the LLM a sequence has no padding: a slot's position
t holds the sequence's t-th LLM position, so the positions of the next token are simply the slots' lengths.

A slot remembers the ids (and images) it holds after its request ends. A new request goes to the free slot whose
contents share the longest prefix with it, keeps that prefix and runs only the rest: a chat's later turn reuses
its system prompt, image and history, and is computed exactly as a fresh run on the whole conversation would be.

Each request samples with its own temperature / top-p / top-k and its own seeded generator, so its tokens do not
depend on its neighbours; greedy rows take the argmax. The image and pad ids are never sampled: they are not text
(a model that emitted the image id would, fed back, hold an image token without an image).
"""
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from minillava.llama import DecodeWrite, PrefillWrite
from minillava.sampling import check_settings, sample


@dataclass
class Request:
    """One sequence to continue: its prompt ids (ONE image id per image) and how to sample its answer."""
    ids: list
    pixel_values: torch.Tensor = None  # (N, 3, S, S): the images of `ids`, in order (AnyRes: each image's tiles)
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = None
    top_k: int = None
    seed: int = None  # a seeded generator of its own; None: torch's global one
    stop_ids: tuple = ()  # ids that end the answer (EOS), not included in `out`
    on_token: Callable = None  # on_token(out) after each new id; True ends the answer (a stop string appeared)
    on_finish: Callable = None  # on_finish(request) once, as it ends
    image_sizes: list = None  # (h, w) of each image: an AnyRes (LLaVA-1.6) model needs them
    owner: object = None  # whoever submitted it, for its callbacks (serve.py: the HTTP request's Job)
    # filled by the engine
    out: list = field(default_factory=list)  # the answer's ids
    finish_reason: str = None  # "stop" (stop id or on_token), "length" (max_new_tokens or a full slot), "abort"

    def __post_init__(self):  # bad settings fail here, where the request is made, not in a decode step
        check_settings(self.temperature, self.top_k, self.top_p)
        if self.max_new_tokens < 1:
            raise ValueError(f"need max_new_tokens >= 1; got {self.max_new_tokens}")


@dataclass
class Slot:
    """One row of the KV cache: the request running there, and what the row holds."""
    request: Request = None  # None: the slot is free
    length: int = 0  # positions filled
    ids: list = field(default_factory=list)  # the ids cached there, kept after the request ends (for reuse)
    images: list = field(default_factory=list)  # their images [(pixels (n_tiles, 3, S, S), size (h, w) or None)]
    next_token: int = 0  # the id it feeds at the next decode step
    generator: torch.Generator = None  # the request's own seeded generator (None: torch's global one)


@dataclass
class GenerationStats:
    prefill_tokens: int = 0  # prompt positions run through the LLM (images expanded, reused prefixes excluded)
    prefill_s: float = 0.0  # includes the vision tower
    decode_tokens: int = 0  # ids produced by decode steps, over running sequences
    decode_steps: int = 0  # decode steps: each reads every LLM weight once
    decode_s: float = 0.0
    compile_s: float = 0.0  # with compile=True: the first decode step's time, compilation included (in decode_s)
    images: int = 0  # images encoded by the vision tower (reused ones excluded)
    tiles: int = 0  # tower inputs they took (AnyRes: the base image and its tiles)
    vision_s: float = 0.0  # the tower and projector (in prefill_s)
    vision_bytes: int = 0  # the largest image batch's pixels in + features out
    vision_peak_bytes: int = 0  # CUDA: the most memory allocated while encoding (0 on the CPU: not tracked)

    @property
    def prefill_tokens_per_s(self):
        return self.prefill_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self):
        return self.decode_tokens / max(self.decode_s, 1e-9)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    def __init__(self, model, slots: int = 8, max_seq_len: int = None, compile: bool = False):
        """max_seq_len: S_max, positions per slot (default and upper bound: the model's context length)."""
        cfg = model.config
        context = cfg.text.context_length
        if slots < 1 or (max_seq_len is not None and not 1 <= max_seq_len <= context):
            raise ValueError(f"Engine needs slots >= 1 and 1 <= max_seq_len <= the context {context}; got {slots}, "
                             f"{max_seq_len}")
        self.model, self.cfg, self.slots = model, cfg, slots
        self.S = max_seq_len or context
        lm = model.language_model
        self.device, self.dtype = lm.model.embed_tokens.weight.device, lm.model.embed_tokens.weight.dtype
        self.caches = lm.setup_cache(slots, self.S + 1, device=self.device)  # + the idle slots' position
        self.cache_bytes = sum(b.numel() * b.element_size() for c in self.caches for b in c.buffers())
        V = lm.cfg.vocab_size
        self.banned = torch.tensor([i for i in {cfg.image_token_id, cfg.pad_token_id} if 0 <= i < V],
                                   dtype=torch.long, device=self.device)
        self.state = [Slot() for _ in range(slots)]
        # the decode step's inputs: the same tensors every step (a CUDA graph replays on fixed addresses)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.stats = GenerationStats()
        self.compiled = compile
        step = self._decode_step
        if compile:  # CUDA graphs on a GPU; on the CPU plain inductor code
            step = torch.compile(step, mode="reduce-overhead" if self.device.type == "cuda" else None,
                                 fullgraph=True)
        self._step = step

    @property
    def running(self) -> list:
        """Each slot's running request (None: free)."""
        return [st.request for st in self.state]

    def _own_cache(self):
        """The model's layers hold one cache at a time: put this engine's back if another engine replaced it."""
        if self.model.language_model.model.layers[0].self_attn.kv_cache is not self.caches[0]:
            self.model.language_model.use_cache(self.caches)

    def describe(self) -> str:
        return (f"KV cache: {self.slots} slot(s) x {self.S} positions, {self.cache_bytes / 2**30:.2f} GiB"
                + (", decode step compiled" if self.compiled else ""))

    # --- admission: prefill one request into a slot -------------------------------------------------------
    def check(self, req: Request):
        """Errors a request would meet, raised before anything is computed: images vs image ids, the cache size."""
        n_img = req.ids.count(self.cfg.image_token_id)
        n_pix = len(self._images(req))
        if n_img != n_pix:
            raise ValueError(f"the prompt holds {n_img} image id(s) but {n_pix} image(s) were given")
        if not req.ids:
            raise ValueError("empty prompt")
        self.cfg.check_fits(req.ids, req.image_sizes, room=self.S, message=(
            "the prompt takes {L} positions ({text} text ids + {images} image(s): {image_positions}), {over} more "
            "than the KV cache's {room} per sequence"))

    def _images(self, req: Request) -> list:
        """The request's images as [(pixels (n_tiles, 3, S, S), size (h, w) or None)], checked against its sizes."""
        if req.pixel_values is None:
            return []
        if not self.cfg.anyres:
            return [(p[None], None) for p in req.pixel_values]
        sizes = [tuple(s) for s in req.image_sizes or ()]
        tiles = [self.cfg.image_tiles(s) for s in sizes]
        if sum(tiles) != req.pixel_values.shape[0]:
            raise ValueError(f"image_sizes {sizes} need {sum(tiles)} tiles but pixel_values holds "
                             f"{req.pixel_values.shape[0]} (an AnyRes model takes image_sizes with its pixels)")
        return list(zip(req.pixel_values.split(tiles), sizes))

    def _shared_prefix(self, slot: int, req: Request) -> int:
        """How many leading ids of the request the slot already holds (images compared by their pixels)."""
        ids, cached, images = req.ids, self.state[slot].ids, self._images(req)
        keep, img, n_img = 0, self.cfg.image_token_id, 0
        while keep < min(len(ids), len(cached)) and ids[keep] == cached[keep]:
            if ids[keep] == img:
                (pix, size), (cached_pix, cached_size) = images[n_img], self.state[slot].images[n_img]
                if size != cached_size or not torch.equal(pix, cached_pix):
                    break
                n_img += 1
            keep += 1
        return min(keep, len(ids) - 1)  # at least one id runs, for the logits of the next token

    def prefill(self, req: Request, slot: int):
        """Run the request's ids that the slot does not hold yet into it (images encoded here); the slot is then
        the request's. -> logits of its next id (1, V). (The engine's own step; public for benchmarks and tests
        that feed chosen tokens.)"""
        t0 = time.perf_counter()
        self._own_cache()
        st = self.state[slot]
        keep = self._shared_prefix(slot, req)
        start = self.cfg.llm_length(req.ids[:keep], req.image_sizes)
        n_kept_img = req.ids[:keep].count(self.cfg.image_token_id)
        new = torch.tensor([req.ids[keep:]], device=self.device)  # (1, T)
        st.ids = st.ids[:keep]  # what stays valid should the forward below fail midway
        images = self._images(req)
        pixels, sizes = None, None
        if len(images) > n_kept_img:
            pixels = torch.cat([p for p, _ in images[n_kept_img:]]).to(self.device, self.dtype)
            sizes = [s for _, s in images[n_kept_img:]] if self.cfg.anyres else None
        with torch.inference_mode():
            feats = None if pixels is None else self._encode(pixels, sizes)
            embeds, _, _, _ = self.model.embed_inputs(new, pixels, image_sizes=sizes, image_features=feats)  # (1, L, C)
            L = embeds.shape[1]
            positions = torch.arange(start, start + L, device=self.device)[None]  # (1, L)
            lm = self.model.language_model
            hidden = lm.model(embeds, positions, cache=PrefillWrite(slot, start))  # causal from the cached prefix
            logits = lm.lm_head(hidden[:, -1])  # (1, V)
        st.request, st.length, st.ids, st.images = req, start + L, list(req.ids), images
        st.generator = None if req.seed is None else torch.Generator(self.device).manual_seed(req.seed)
        req.out, req.finish_reason = [], None
        _sync(self.device)
        self.stats.prefill_tokens += L
        self.stats.prefill_s += time.perf_counter() - t0
        return logits

    def _encode(self, pixels, sizes) -> list:
        """The vision tower on one request's new images (all its tiles in one batch), timed and measured."""
        _sync(self.device)
        t0, cuda = time.perf_counter(), self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        feats = self.model.encode_images(pixels, sizes)
        _sync(self.device)
        st = self.stats
        st.vision_s += time.perf_counter() - t0
        st.images, st.tiles = st.images + len(feats), st.tiles + pixels.shape[0]
        st.vision_bytes = max(st.vision_bytes, pixels.numel() * pixels.element_size()
                              + sum(f.numel() * f.element_size() for f in feats))
        if cuda:
            st.vision_peak_bytes = max(st.vision_peak_bytes, torch.cuda.max_memory_allocated(self.device))
        return feats

    def admit(self, req: Request):
        """Check the request, prefill it into the free slot that holds the longest prefix of it, and sample its
        first id: it runs in the next step (or has ended already, e.g. at once on EOS)."""
        self.check(req)
        free = [s for s in range(self.slots) if self.state[s].request is None]
        if not free:
            raise RuntimeError("no free slot: admit a request when `has_free_slot`")
        slot = max(free, key=lambda s: (self._shared_prefix(s, req), -s))
        logits = self.prefill(req, slot)
        self._accept(slot, self._sample(logits, [slot])[0])

    @property
    def has_free_slot(self) -> bool:
        return any(st.request is None for st in self.state)

    @property
    def busy(self) -> bool:
        return any(st.request is not None for st in self.state)

    def cancel(self, req: Request):
        """End a running request now (its client went away): finish_reason "abort", its slot free."""
        for s in range(self.slots):
            if self.state[s].request is req:
                self._finish(s, "abort")

    # --- one token per slot -------------------------------------------------------------------------------
    def _decode_step(self, tokens, positions, kv_len: int, all_visible: bool = False):
        """tokens (slots,) at positions (slots,) -> logits (slots, V). Every slot's token is written at its own
        position and attends to its own positions <= that one, reading keys [0, kv_len) (all of them, with no mask,
        when all_visible: see DecodeWrite)."""
        lm = self.model.language_model
        x = lm.model.embed_tokens(tokens[:, None])  # (slots, 1, C)
        hidden = lm.model(x, positions[:, None], cache=DecodeWrite(positions, kv_len, all_visible))
        return lm.lm_head(hidden[:, 0])  # (slots, V)

    def _kv_len(self) -> tuple[int, bool]:
        """Keys a decode step reads, and whether every slot sees all of them. Compiled: all S_max (one shape), under
        the mask. Eager: exactly the longest running sequence's keys, so a short one does not pay for reading an
        empty cache, and no mask at all when every slot runs at that length (one slot: single-stream decoding).
        (The masked keys add exact zeros; a BLAS may still split a longer sum differently, so only the compiled
        step guarantees the last bit of a logit whatever the neighbours. The tests find the greedy ids equal.)"""
        if self.compiled:
            return self.S, False
        ends = [st.length + 1 if st.request is not None else 0 for st in self.state]
        return max(ends), min(ends) == max(ends)

    def _sample(self, logits, slots) -> list:
        """logits (n, V), row i for slots[i] -> the next id of each, with that slot's request's settings."""
        logits = logits.index_fill(-1, self.banned, float("-inf"))
        tokens = logits.argmax(-1)  # (n,) greedy rows
        for i, s in enumerate(slots):
            st = self.state[s]
            r = st.request
            if r.temperature > 0:
                tokens[i] = sample(logits[i:i + 1], r.temperature, r.top_k, r.top_p, st.generator)[0]
        return tokens.tolist()  # the step's one host sync

    def _accept(self, slot: int, token: int):
        """The slot's request sampled `token`: keep it, and end the request or feed the token next step."""
        st = self.state[slot]
        req = st.request
        if token in req.stop_ids:
            return self._finish(slot, "stop")
        req.out.append(token)
        if req.on_token is not None and req.on_token(req.out):
            return self._finish(slot, "stop")
        if len(req.out) >= req.max_new_tokens or st.length >= self.S:
            return self._finish(slot, "length")
        st.next_token = token

    def _finish(self, slot: int, reason: str):
        st = self.state[slot]
        req = st.request
        req.finish_reason = reason
        n_fed = st.length - self.cfg.llm_length(req.ids, req.image_sizes)  # the last sampled id: not fed
        st.ids, st.request = req.ids + req.out[:n_fed], None
        if req.on_finish is not None and reason != "abort":
            req.on_finish(req)

    def decode(self, tokens: dict):
        """Feed {slot: token} for the running slots (one decode step for all slots; idle ones write a scratch
        position) -> logits (len(tokens), V), rows in the order of `tokens`. Public like prefill."""
        self._own_cache()
        ids = [tokens.get(s, 0) for s in range(self.slots)]
        positions = [self.state[s].length if s in tokens else self.S for s in range(self.slots)]  # idle: scratch
        self.tokens.copy_(torch.tensor(ids), non_blocking=True)
        self.positions.copy_(torch.tensor(positions), non_blocking=True)
        with torch.inference_mode():
            logits = self._step(self.tokens, self.positions, *self._kv_len())  # (slots, V)
        for s in tokens:
            self.state[s].length += 1
        return logits[list(tokens)]

    def step(self):
        """One decode step for every running request."""
        t0 = time.perf_counter()
        active = [s for s in range(self.slots) if self.state[s].request is not None]
        new = self._sample(self.decode({s: self.state[s].next_token for s in active}), active)
        if self.compiled and self.stats.decode_steps == 0:
            self.stats.compile_s = time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(active)
        self.stats.decode_s += time.perf_counter() - t0
        for s, t in zip(active, new):
            self._accept(s, t)

    # --- serving ----------------------------------------------------------------------------------------------
    def run(self, requests) -> list:
        """Serve `requests` (any iterable, read one at a time as slots free up) until all have ended; -> them, in
        order. A request joins the decode batch at the step after a slot frees, so slots stay busy."""
        pending, served = iter(requests), []
        try:
            self._serve(pending, served)
        except BaseException:  # a bad request, Ctrl-C: the others end here; the slots keep what they hold
            for s in range(self.slots):
                if self.state[s].request is not None:
                    self._finish(s, "abort")
            raise
        return served

    def _serve(self, pending, served):
        exhausted = False
        while True:
            while not exhausted and self.has_free_slot:
                req = next(pending, None)
                if req is None:
                    exhausted = True
                    break
                served.append(req)
                self.admit(req)
            if not self.busy:
                if exhausted:
                    return
                continue
            self.step()
