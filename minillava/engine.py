"""The decode engine: one fixed-shape KV cache serving many sequences at once (continuous batching).

    engine = Engine(model, slots=8)
    done = engine.run([Request(ids, pixel_values, max_new_tokens=128), ...])  # each request's .out: its ids

The cache holds `slots` sequences of up to S_max positions each: (slots, n_kv, S_max + 1, hs) per layer (the
extra position is where idle slots write, never read). Requests are prefilled into free slots, those admitted
together in one forward (a right-padded batch: one read of the weights for all; see admissible), join the decode batch
at the next step and leave it when they stop (a stop id such as EOS, its on_token callback saying a stop string
appeared, max_new_tokens, or a full slot); a slot is refilled at once.
A decode step runs every slot, one token each, so it has one shape for the engine's life: it can be compiled and,
on CUDA, captured in a CUDA graph (`compile=True`). Inside the LLM a sequence has no padding: a slot's position
t holds the sequence's t-th LLM position, so the positions of the next token are simply the slots' lengths.

Prefixes are shared across slots. A slot remembers the ids (and images) it holds after its request ends, and a
running slot's prompt is in its row too. A new request goes to the free slot whose contents share the longest
prefix with it (ties: the one used longest ago, so the cache keeps what was used last); when another slot, running
or not, holds a longer prefix of it, those positions are copied from that slot's row (KVCache.copy_prefix: a
copy of n positions, against a forward over them), and only the rest is run. A chat's later turn reuses its
system prompt, image and history; eight questions about one image prefill the image's positions once. Images are
also kept by content (a hash of their pixels): an image the engine encoded before, in any prompt, is not encoded
again while its features fit the image cache's budget (least recently used first out). With share_prefixes=False,
image_cache_mb=0 and batch_prefill=False a request reuses only what its own slot holds and is prefilled alone:
the engine before prefix sharing, kept for comparisons (benchmarks/bench_engine.py --pope). Whatever is shared,
a request's positions hold what a forward over it alone gives, to fp32 rounding (the order of a matrix product's
additions depends on its shape): the tests find the same greedy answers in any order, with any number of slots.

Each request samples with its own temperature / top-p / top-k and its own seeded generator, so its tokens do not
depend on its neighbours; greedy rows take the argmax. The image and pad ids are never sampled: they are not text
(a model that emitted the image id would, fed back, hold an image token without an image).
"""
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from minillava.llama import DecodeWrite, PrefillWrite
from minillava.sampling import check_settings, sample


WAVE_PADDING = 0.25  # requests prefilled together waste at most this share of their positions on padding (plus
# 64 positions, which cost no more than one: a short prefill reads every weight once whatever its length)


class PrefillError(RuntimeError):
    """A step's prefill failed: its requests ended ("abort"), the running ones are untouched (serve.py fails only
    those clients)."""

    def __init__(self, requests: list, cause: Exception):
        super().__init__(f"prefill failed: {cause}")
        self.requests, self.cause = requests, cause


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
    images: list = field(default_factory=list)  # the images of `ids` (maybe more; the ids say how many count)
    next_token: int = 0  # the id it feeds at the next decode step
    generator: torch.Generator = None  # the request's own seeded generator (None: torch's global one)
    last_used: int = 0  # when a request last took it (the engine's count of admissions): eviction order
    pending: torch.Tensor = None  # (L, C) the request's embeddings still to prefill (None: decoding, or free)


@dataclass
class GenerationStats:
    prefill_tokens: int = 0  # prompt positions run through the LLM (images expanded, reused prefixes excluded)
    prefix_reused: int = 0  # prompt positions taken from the cache instead (held by the slot or copied into it)
    prefix_copied: int = 0  # of those, positions copied from another slot's row
    prefill_s: float = 0.0  # includes the vision tower
    decode_tokens: int = 0  # ids produced by decode steps, over running sequences
    decode_steps: int = 0  # decode steps: each reads every LLM weight once
    decode_s: float = 0.0
    compile_s: float = 0.0  # with compile=True: the first decode step's time, compilation included (in decode_s)
    images: int = 0  # images encoded by the vision tower (reused ones excluded)
    images_reused: int = 0  # images whose features came from the image cache
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


def common_prefix(ids, images, other_ids, other_images, image_token_id: int) -> int:
    """How many leading ids two prompts share, an image id counting only when its image ((pixels, size)) is the same."""
    n, n_img = 0, 0
    while n < min(len(ids), len(other_ids)) and ids[n] == other_ids[n]:
        if ids[n] == image_token_id:
            (pix, size), (other_pix, other_size) = images[n_img], other_images[n_img]
            if size != other_size or not torch.equal(pix, other_pix):
                break
            n_img += 1
        n += 1
    return n


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    def __init__(self, model, slots: int = 8, max_seq_len: int = None, compile: bool = False,
                 share_prefixes: bool = True, image_cache_mb: float = 256, batch_prefill: bool = True,
                 prefill_chunk: int = None):
        """max_seq_len: S_max, positions per slot (default and upper bound: the model's context length).
        share_prefixes: reuse a prefix any slot holds (False: only the request's own slot). image_cache_mb: the
        budget of the features kept by image content (0: none kept). batch_prefill: requests admitted together
        are prefilled in one forward (False: one at a time). All three False / 0: the engine before issue 30.
        prefill_chunk: positions of a prompt run per engine step, between decode steps, so that a long prompt
        never stalls the running requests for a whole prefill (None: a prompt at once, at admission)."""
        cfg = model.config
        context = cfg.text.context_length
        if slots < 1 or (max_seq_len is not None and not 1 <= max_seq_len <= context):
            raise ValueError(f"Engine needs slots >= 1 and 1 <= max_seq_len <= the context {context}; got {slots}, "
                             f"{max_seq_len}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"Engine needs prefill_chunk >= 1 (or None: no chunks); got {prefill_chunk}")
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
        self.share_prefixes, self.batch_prefill, self.prefill_chunk = share_prefixes, batch_prefill, prefill_chunk
        self.image_cache = OrderedDict()  # hash of (pixels, size) -> features (n, C), least recently used first
        self.image_cache_budget, self.image_cache_bytes = int(image_cache_mb * 2**20), 0
        self.admitted = 0
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
                + (", prefixes shared across slots" if self.share_prefixes else "")
                + f", image cache {self.image_cache_budget / 2**20:.0f} MiB"
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

    def _shared_prefix(self, slot: int, req: Request, images=None) -> int:
        """How many leading ids of the request the slot already holds (images compared by their pixels)."""
        st = self.state[slot]
        images = self._images(req) if images is None else images
        keep = common_prefix(req.ids, images, st.ids, st.images, self.cfg.image_token_id)
        return min(keep, len(req.ids) - 1)  # at least one id runs, for the logits of the next token

    def _take_prefix(self, slot: int, req: Request, images) -> int:
        """Make the slot hold the longest prefix of the request that any slot holds: its own, or one copied from
        another slot's row (positions [0, start) of every layer). -> the request's ids now held."""
        st = self.state[slot]
        keep = self._shared_prefix(slot, req, images)
        others = {s: self._shared_prefix(s, req, images) for s in range(self.slots)
                  if s != slot and self.share_prefixes}  # each slot's prefix of the request
        best = max(others, key=others.get, default=None)
        if best is not None and others[best] > keep:
            keep, src = others[best], self.state[best]
            start = self.cfg.llm_length(req.ids[:keep], req.image_sizes)
            for cache in self.caches:
                cache.copy_prefix(best, slot, start)
            n_img = req.ids[:keep].count(self.cfg.image_token_id)
            st.ids, st.images = src.ids[:keep], src.images[:n_img]
            self.stats.prefix_copied += start
        return keep

    def _features(self, images) -> list:
        """Each image's projected features: from the image cache by content, the others encoded in one batch
        (and kept, the least recently used dropped past the budget)."""
        keys = [hashlib.sha256(pix.contiguous().view(torch.uint8).cpu().numpy().tobytes()
                               + repr(size).encode()).hexdigest() for pix, size in images]
        new = [i for i, k in enumerate(keys) if k not in self.image_cache and k not in keys[:i]]
        if new:
            pixels = torch.cat([images[i][0] for i in new]).to(self.device, self.dtype)
            sizes = [images[i][1] for i in new] if self.cfg.anyres else None
            for i, f in zip(new, self._encode(pixels, sizes)):
                self.image_cache[keys[i]] = f = f.clone()  # its own memory, not a view of the batch's
                self.image_cache_bytes += f.numel() * f.element_size()
        feats = [self.image_cache[k] for k in keys]
        for k in keys:
            self.image_cache.move_to_end(k)  # just used
        while self.image_cache_bytes > self.image_cache_budget and self.image_cache:
            _, f = self.image_cache.popitem(last=False)
            self.image_cache_bytes -= f.numel() * f.element_size()
        self.stats.images_reused += len(keys) - len(new)
        return feats

    def prefill(self, req: Request, slot: int):
        """Run the request's ids that the slot does not hold yet into it (images encoded here); the slot is then
        the request's. -> logits of its next id (1, V). (The engine's own step; public for benchmarks and tests
        that feed chosen tokens.)"""
        self._start([(req, slot)])
        done = {}
        while not done:
            done = self._advance([slot])
        return done[slot]

    def _start(self, batch):
        """Make each slot of [(request, slot)] the request's: take the longest prefix any slot holds, and embed
        the rest (its images' features from the image cache or encoded) as the slot's pending prefill."""
        t0 = time.perf_counter()
        self._own_cache()
        with torch.inference_mode():
            for req, slot in batch:
                st, images = self.state[slot], self._images(req)
                keep = self._take_prefix(slot, req, images)
                n_kept_img = req.ids[:keep].count(self.cfg.image_token_id)
                st.ids = st.ids[:keep]  # what the row holds, until the prefill is done
                feats, sizes = None, None
                if len(images) > n_kept_img:
                    feats = self._features(images[n_kept_img:])
                    sizes = [s for _, s in images[n_kept_img:]] if self.cfg.anyres else None
                new = torch.tensor([req.ids[keep:]], device=self.device)  # (1, T)
                embeds, _, _, _ = self.model.embed_inputs(new, image_sizes=sizes, image_features=feats)  # (1, L, C)
                st.request, st.pending, st.images = req, embeds[0], images
                st.length = self.cfg.llm_length(req.ids[:keep], req.image_sizes)
                self.admitted += 1
                st.last_used = self.admitted
                st.generator = None if req.seed is None else torch.Generator(self.device).manual_seed(req.seed)
                req.out, req.finish_reason = [], None
                self.stats.prefix_reused += st.length
        self.stats.prefill_s += time.perf_counter() - t0

    def _advance(self, slots) -> dict:
        """One forward over the slots' pending prefills (one read of the weights for all of them), at most
        prefill_chunk positions of each (all of it without chunks), right-padded to the longest. -> {slot: logits
        (1, V)} of the slots whose prefill is now done."""
        t0 = time.perf_counter()
        self._own_cache()
        chunks = [self.state[s].pending[:self.prefill_chunk or None] for s in slots]  # (L_b, C) each
        lengths, starts = [len(c) for c in chunks], [self.state[s].length for s in slots]
        with torch.inference_mode():
            x = chunks[0].new_zeros(len(slots), max(lengths), chunks[0].shape[-1])  # (B, T, C), right-padded
            for b, c in enumerate(chunks):
                x[b, :len(c)] = c
            positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(x.shape[1], device=self.device)
            lm = self.model.language_model
            hidden = lm.model(x, positions, cache=PrefillWrite(slots, starts, lengths))  # (B, T, C)
            done = {}
            for b, s in enumerate(slots):
                st = self.state[s]
                st.length, st.pending = st.length + lengths[b], st.pending[lengths[b]:]
                if len(st.pending) == 0:
                    st.pending, st.ids = None, list(st.request.ids)
                    done[s] = lm.lm_head(hidden[b:b + 1, lengths[b] - 1])  # (1, V)
        _sync(self.device)
        self.stats.prefill_tokens += sum(lengths)
        self.stats.prefill_s += time.perf_counter() - t0
        return done

    def _prefilled(self, done: dict):
        """Sample the first id of each request whose prefill is done: it runs in the next decode step."""
        slots = list(done)
        if slots:
            for slot, token in zip(slots, self._sample(torch.cat([done[s] for s in slots]), slots)):
                self._accept(slot, token)

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
        self.admit_many([req])

    def admit_many(self, reqs: list):
        """admit() for several requests at once, prefilled in one forward (at most the free slots)."""
        for req in reqs:
            self.check(req)
        free = [s for s in range(self.slots) if self.state[s].request is None]
        if len(reqs) > len(free):
            raise RuntimeError(f"{len(reqs)} request(s) for {len(free)} free slot(s): admit when `has_free_slot`")
        batch = []
        for req in reqs:
            images = self._images(req)
            slot = max(free, key=lambda s: (self._shared_prefix(s, req, images), -self.state[s].last_used, -s))
            free.remove(slot)
            batch.append((req, slot))
        try:
            self._start(batch)
            if not self.prefill_chunk:  # else their first chunk runs in the next step, with the decode step
                self._prefilled(self._advance([slot for _, slot in batch]))
        except BaseException:  # nothing half-admitted stays: these requests end ("abort"), their slots free
            for req, slot in batch:
                if self.state[slot].request is req:
                    self._finish(slot, "abort")
            raise

    def admissible(self, waiting: list) -> int:
        """How many of the waiting requests (as many as there are free slots) to prefill together: all of them,
        up to one that shares a longer prefix with an earlier one of them, or with a request still being
        prefilled, than any slot holds yet (it waits, to copy that prefix instead of computing it again: 0 when
        the first must wait), or one whose length would make the batch's right padding more than WAVE_PADDING of
        its positions."""
        n = min(len(waiting), self.free_slots) if self.batch_prefill else 1
        images = [self._images(r) for r in waiting[:n]]
        coming = [(st.request.ids, st.images) for st in self.state if st.pending is not None]  # prefixes to come
        rest = []  # LLM positions each has to compute, beyond the longest prefix a slot holds
        for i, r in enumerate(waiting[:n]):
            slots = range(self.slots) if self.share_prefixes else [s for s in range(self.slots)
                                                                    if self.state[s].request is None]
            held = max(self._shared_prefix(s, r, images[i]) for s in slots)
            earlier = coming + [(w.ids, im) for w, im in zip(waiting, images[:i])]
            if self.share_prefixes and any(common_prefix(ids, imgs, r.ids, images[i], self.cfg.image_token_id) > held
                                           for ids, imgs in earlier):
                return i
            rest.append(self.cfg.llm_length(r.ids, r.image_sizes) - self.cfg.llm_length(r.ids[:held], r.image_sizes))
            if max(rest) * len(rest) > (1 + WAVE_PADDING) * sum(rest) + 64:
                return max(i, 1)
        return n

    @property
    def has_free_slot(self) -> bool:
        return self.free_slots > 0

    @property
    def free_slots(self) -> int:
        return sum(st.request is None for st in self.state)

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
        ends = [st.length + 1 if st.request is not None and st.pending is None else 0 for st in self.state]
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
        if st.pending is None:  # (mid-prefill, st.ids is the prefix the row held before: still true)
            n_fed = st.length - self.cfg.llm_length(req.ids, req.image_sizes)  # the last sampled id: not fed
            st.ids = req.ids + req.out[:n_fed]
        st.request, st.pending = None, None
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
        """One chunk of every pending prefill (with prefill_chunk), then one decode step for every running
        request."""
        pending = [s for s in range(self.slots) if self.state[s].pending is not None]
        if pending:
            try:
                done = self._advance(pending)
            except Exception as e:  # the newcomers end; the running requests go on
                requests = [self.state[s].request for s in pending]
                for s in pending:
                    self._finish(s, "abort")
                raise PrefillError(requests, e) from e
            self._prefilled(done)
        active = [s for s in range(self.slots) if self.state[s].request is not None and self.state[s].pending is None]
        if not active:
            return
        t0 = time.perf_counter()
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
        exhausted, waiting = False, []
        while True:
            while not exhausted and len(waiting) < self.free_slots:
                req = next(pending, None)
                if req is None:
                    exhausted = True
                    break
                served.append(req)
                waiting.append(req)
            while waiting and self.has_free_slot:
                n = self.admissible(waiting)
                if n == 0:  # the next one waits for a prefix being prefilled now
                    break
                self.admit_many(waiting[:n])
                del waiting[:n]
            if not self.busy:
                if exhausted and not waiting:
                    return
                continue
            self.step()
