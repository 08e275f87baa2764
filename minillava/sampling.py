"""Sampling and the generation loop: prefill the prompt once, then decode one token at a time from the KV cache.

    ids, stats = generate(model, input_ids, pixel_values, attention_mask, max_new_tokens=128, temperature=0)

A batch of prompts of different lengths is left-padded (attention_mask 0 on the left) so that every sequence's
last prompt token sits in the same column: one prefill forward for the whole batch, then one token per sequence
per decode step. A sequence that samples an id of `stop_ids` (EOS) or whose `on_token` callback returns True (a
stop string appeared) is finished; it rides along in the batch, its tokens ignored, until all are finished.
"""
import time
from dataclasses import dataclass

import torch


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next ids (B,).

    temperature 0: argmax (greedy). Otherwise p = softmax(logits / temperature), restricted to the top_k most
    likely ids, then to the nucleus (the smallest set of most likely ids whose mass reaches top_p), renormalised,
    and one id is drawn with `generator` (seeded: reproducible). Same order as Hugging Face: temperature,
    top-k, top-p.
    """
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # (B, V) mass of the strictly more likely ids; 0 for the first
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)  # back to vocabulary order
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)


@dataclass
class GenerationStats:
    prefill_tokens: int = 0  # prompt positions run through the LLM (images expanded, padding excluded)
    prefill_s: float = 0.0  # includes the vision tower
    decode_tokens: int = 0  # ids produced by decode steps, over unfinished sequences
    decode_steps: int = 0  # decode_one_token calls: each reads every LLM weight once
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self):
        return self.prefill_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self):
        return self.decode_tokens / max(self.decode_s, 1e-9)


def prompt_length(config, input_ids) -> int:
    """Length L of the longest (padded) row inside the LLM: each image id becomes Np positions."""
    width = torch.where(input_ids == config.image_token_id, config.num_image_tokens, 1)  # (B, T)
    return int(width.sum(1).max())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=512, temperature=0.2,
             top_p=None, top_k=None, eos_id=2, stop_ids=(), seed=None, on_token=None, on_finish=None):
    """Prefill, then decode until every sequence is finished. -> (generated ids per sequence, GenerationStats).

    input_ids (B, T), left-padded with attention_mask (B, T) 0 on padding; one image id per image.
    A sequence ends when it samples `eos_id` or an id of `stop_ids` (not included in its ids), when
    `on_token(b, ids_b)` returns True (the caller's stop-string check; ids_b is kept as is), after
    max_new_tokens ids, or when the context is full. `on_finish(b, ids_b)` is called once as each one ends.
    """
    t0 = time.perf_counter()
    context = model.config.text.max_position_embeddings
    cache = min(prompt_length(model.config, input_ids) + max(max_new_tokens - 1, 0), context)
    logits, state = model.prefill(input_ids, pixel_values, attention_mask, max_seq_len=cache)
    _sync(logits.device)
    stats = GenerationStats(prefill_tokens=int(state.key_mask.sum()), prefill_s=time.perf_counter() - t0)
    generator = None if seed is None else torch.Generator(logits.device).manual_seed(seed)
    ids = decode(model, logits, state, stats, max_new_tokens, temperature, top_p, top_k, {eos_id, *stop_ids},
                 generator, on_token, on_finish)
    return ids, stats


def decode(model, logits, state, stats, max_new_tokens, temperature=0.0, top_p=None, top_k=None, stop_ids=(2,),
           generator=None, on_token=None, on_finish=None):
    """The decode loop from the prefill's last logits (B, V) and DecodeState; see `generate`. The image token and
    the pad token are never sampled: they are not text (a model that emitted the image id would, fed back, hold
    an image token without an image)."""
    B, V = logits.shape
    cfg = model.config
    banned = torch.tensor(sorted({i for i in (cfg.image_token_id, cfg.pad_token_id) if 0 <= i < V} - set(stop_ids)),
                          dtype=torch.long, device=logits.device)
    out, done = [[] for _ in range(B)], [False] * B
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        if step > 0:
            if state.cache_len >= state.key_mask.shape[1]:  # context full: finish whoever is left
                break
            logits = model.decode_one_token(token, state)  # (B, V); feeds last step's ids
            stats.decode_steps += 1
            stats.decode_tokens += done.count(False)
        token = sample(logits.index_fill(-1, banned, float("-inf")), temperature, top_k, top_p, generator)  # (B,)
        for b, t in enumerate(token.tolist()):  # .tolist() is the step's only host sync
            if done[b]:
                continue
            if t not in stop_ids:
                out[b].append(t)
            done[b] = t in stop_ids or bool(on_token and on_token(b, out[b])) or len(out[b]) == max_new_tokens
            if done[b] and on_finish:
                on_finish(b, out[b])
        if all(done):
            break
    for b in range(B):  # stopped by the context length
        if not done[b] and on_finish:
            on_finish(b, out[b])
    stats.decode_s += time.perf_counter() - t0
    return out


# --- continuing a cache (multi-turn chat) ----------------------------------------------------------------------
def rewind(state, n: int):
    """Forget cache slots [n, cache_len): the next token goes to slot n. Positions count real tokens only."""
    if not 0 <= n <= state.cache_len:
        raise ValueError(f"cannot rewind a cache of {state.cache_len} slots to {n}")
    state.key_mask[:, n:] = False
    state.cache_len = n
    state.next_position = state.key_mask[:, :n].sum(1)  # (B,)


@torch.inference_mode()
def extend(model, input_ids, state):
    """Append text ids (B, T) to every sequence's cache in one forward; -> logits of the last one (B, V)."""
    B, T = input_ids.shape
    pos = state.cache_len
    if pos + T > state.key_mask.shape[1]:
        raise ValueError(f"{pos + T} tokens exceed the cache of {state.key_mask.shape[1]}")
    if bool((input_ids == model.config.image_token_id).any()):
        raise ValueError("extend() takes text ids only; images go through prefill")
    lm = model.language_model
    embeds = lm.model.embed_tokens(input_ids)  # (B, T, C)
    state.key_mask[:, pos:pos + T] = True
    positions = state.next_position[:, None] + torch.arange(T, device=input_ids.device)  # (B, T)
    mask = state.key_mask[:, :pos + T] if state.padded else None
    hidden = lm.model(embeds, positions, mask, cache_start=pos)  # (B, T, C); causal from the cache offset
    state.cache_len, state.next_position = pos + T, state.next_position + T
    return lm.lm_head(hidden[:, -1])  # (B, V)
