"""engine.py: cached decoding equals a full forward at every step for every slot; greedy answers do not depend on
the batch (alone, 8 at once, joining mid-way); per-request stops and seeds; prefix reuse; a prompt too long for
the cache is refused before anything runs."""
import pytest
import torch

from minillava.config import get_preset
from minillava.engine import Engine, PrefillError, Request
from minillava.llava import Llava


def tiny_model(seed=0, std=1.0):
    torch.manual_seed(seed)
    model = Llava(get_preset("tiny"))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)  # std 1.0: varied, non-repeating greedy text
    return model.eval()


MODEL = tiny_model()  # for comparing ids
SMOOTH = tiny_model(std=0.1)  # for comparing logits: std 1.0 makes them large, and their rounding with them
CFG = MODEL.config
IMG = CFG.image_token_id


def prompts(n=8, seed=0):
    """n prompts of different lengths: image ones (the image anywhere in the turn) and text-only ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        text = torch.randint(3, 200, (3 + 5 * i % 13,), generator=g).tolist()
        if i % 3 == 2:  # text only
            out.append(([1] + text, None))
        else:
            cut = i % len(text)
            out.append(([1] + text[:cut] + [IMG] + text[cut:], torch.randn(1, 3, 32, 32, generator=g)))
    return out


def full_forward_greedy(ids, pixels, n, model=MODEL):
    """Greedy without a cache: a full forward over the whole sequence for every new id; -> (ids, logits)."""
    ids, out, logits = list(ids), [], []
    with torch.no_grad():
        for _ in range(n):
            last = model(torch.tensor([ids]), pixels)[0, -1]  # (V,)
            last[[IMG, CFG.pad_token_id]] = float("-inf")  # never sampled (see test_generate)
            logits.append(last)
            out.append(int(last.argmax()))
            ids.append(out[-1])
    return out, logits


def run(requests, slots, model=MODEL, **kw):
    engine = Engine(model, slots=slots, **kw)
    return engine, engine.run(requests)


@pytest.mark.parametrize("slots", [3, 1])
def test_cached_decoding_equals_a_full_forward_at_every_step_for_every_slot(monkeypatch, slots):
    pairs = prompts(5)
    seen = {}  # id(request) -> the logits rows the engine sampled from, in order
    engine = Engine(SMOOTH, slots=slots)  # 5 requests: on 3 slots two join mid-way, into reused slots
    real, real_step, masked = engine._sample, engine._step, []

    def recording(logits, slots):
        for row, s in zip(logits, slots):
            seen.setdefault(id(engine.running[s]), []).append(row.clone())
        return real(logits, slots)

    def step(tokens, positions, kv_len, all_visible):  # one slot: its exact keys, no mask; several: masked
        masked.append(not all_visible)
        return real_step(tokens, positions, kv_len, all_visible)
    monkeypatch.setattr(engine, "_sample", recording)
    monkeypatch.setattr(engine, "_step", step)
    done = engine.run([Request(ids, pix, max_new_tokens=6 + 2 * i) for i, (ids, pix) in enumerate(pairs)])
    assert all(masked) if slots > 1 else not any(masked)
    if slots > 1:
        assert engine.stats.decode_steps < sum(len(r.out) for r in done) - len(done)  # slots did run together
    for r in done:
        want, want_logits = full_forward_greedy(r.ids, r.pixel_values, r.max_new_tokens, SMOOTH)
        assert r.out == want and r.finish_reason == "length"
        assert len(seen[id(r)]) == r.max_new_tokens
        for t, (got, ref) in enumerate(zip(seen[id(r)], want_logits)):
            torch.testing.assert_close(got.index_fill(0, torch.tensor([IMG, CFG.pad_token_id]), 0),
                                       ref.index_fill(0, torch.tensor([IMG, CFG.pad_token_id]), 0),
                                       atol=3e-5, rtol=1e-5, msg=lambda m: f"step {t}: {m}")


def test_greedy_answers_do_not_depend_on_the_batch():
    pairs = prompts(8)
    lengths = [8, 20, 5, 32, 12, 9, 27, 16]  # max_new_tokens: requests end at different steps
    make = lambda: [Request(ids, pix, max_new_tokens=n) for (ids, pix), n in zip(pairs, lengths)]
    alone = [run([r], slots=1)[1][0].out for r in make()]
    assert [len(a) for a in alone] == lengths
    for slots in (8, 3):  # all at once; 3 slots: requests join mid-way as others end
        assert [r.out for r in run(make(), slots)[1]] == alone
    reversed_order = [r.out for r in run(make()[::-1], slots=8)[1]]
    assert reversed_order == alone[::-1]


def test_stop_ids_and_on_token_end_one_request_while_the_others_go_on():
    pairs = prompts(3)
    free = [run([Request(ids, pix, max_new_tokens=16)], slots=1)[1][0].out for ids, pix in pairs]
    eos = free[0][4]  # an id request 0 produces at its fifth step
    finished = []
    reqs = [Request(ids, pix, max_new_tokens=16, stop_ids=(eos,), on_finish=finished.append) for ids, pix in pairs]
    reqs[1].on_token = lambda out: len(out) == 3  # request 1: "a stop string appeared" after 3 ids
    engine, done = run(reqs, slots=3)
    cut = lambda ids: ids[:ids.index(eos)] if eos in ids else ids
    assert done[0].out == cut(free[0]) and done[0].finish_reason == "stop" and len(done[0].out) <= 4
    assert done[1].out == cut(free[1])[:3] and done[1].finish_reason == "stop"
    assert done[2].out == cut(free[2])
    assert sorted(map(id, finished)) == sorted(map(id, done))  # on_finish once each


def test_a_requests_sampled_tokens_do_not_depend_on_its_neighbours():
    pairs = prompts(4)
    sampled = lambda seed: Request(*pairs[0], max_new_tokens=12, temperature=1.0, top_k=50, seed=seed)
    alone = run([sampled(3)], slots=1, model=SMOOTH)[1][0].out  # small logits: sampling is far from greedy
    others = [Request(ids, pix, max_new_tokens=n, temperature=0.7 * (n % 2), seed=n)
              for n, (ids, pix) in zip((5, 9, 14), pairs[1:])]
    assert run([others[0], sampled(3), *others[1:]], slots=4, model=SMOOTH)[1][1].out == alone
    assert run([sampled(4)], slots=1, model=SMOOTH)[1][0].out != alone
    assert run([sampled(3)], slots=1, model=SMOOTH)[1][0].out == alone


def test_a_later_turn_reuses_the_slot_and_equals_a_fresh_run():
    """What chat does: the second request starts with the first one's prompt and answer; only the rest runs."""
    (ids, pix), = prompts(1)
    engine = Engine(MODEL, slots=1)
    first = engine.run([Request(ids, pix, max_new_tokens=5)])[0]
    prefilled = engine.stats.prefill_tokens
    calls = []
    real = MODEL.encode_images
    MODEL.encode_images = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
    try:
        turn2 = ids + first.out + [7, 8, 9]
        second = engine.run([Request(turn2, pix, max_new_tokens=6)])[0]
    finally:
        del MODEL.encode_images
    assert calls == []  # the image stayed in the cache
    # the cache held the prompt and the answer's ids but the last (never fed): the rest ran
    assert engine.stats.prefill_tokens - prefilled == 1 + 3
    assert second.out == full_forward_greedy(turn2, pix, 6)[0]
    # Another image with the same ids cannot reuse the image's positions: it is encoded, and the answer is its own.
    other = torch.randn(1, 3, 32, 32)
    third = engine.run([Request(turn2, other, max_new_tokens=6)])[0]
    assert third.out == full_forward_greedy(turn2, other, 6)[0]


def test_a_prompt_too_long_for_the_cache_is_refused_before_anything_runs():
    (ids, pix), = prompts(1)
    engine = Engine(MODEL, slots=2, max_seq_len=CFG.llm_length(ids) + 2)
    before = engine.stats.prefill_tokens
    too_long = ids + [5, 6, 7]
    with pytest.raises(ValueError, match=rf"takes {CFG.llm_length(too_long)} positions .* 1 more than the KV "
                                         rf"cache's {CFG.llm_length(ids) + 2}"):
        engine.run([Request(too_long, pix)])
    assert engine.stats.prefill_tokens == before and engine.running == [None, None]
    with pytest.raises(ValueError, match="1 image id.* but 0 image"):
        engine.run([Request(ids, None)])
    # A prompt that fits with 2 positions to spare: 3 ids (the last is never fed), then "length".
    done = engine.run([Request(ids, pix, max_new_tokens=50)])[0]
    assert done.finish_reason == "length" and len(done.out) == 3
    assert done.out == full_forward_greedy(ids, pix, 3)[0]


def test_an_error_mid_run_ends_the_running_requests_and_keeps_the_engine_usable():
    pairs = prompts(3)

    def requests():
        yield Request(*pairs[0], max_new_tokens=30)
        yield Request(*pairs[1], max_new_tokens=30)
        raise KeyboardInterrupt
    engine = Engine(MODEL, slots=3)  # both admitted, then the third read fails while they run
    with pytest.raises(KeyboardInterrupt):
        engine.run(requests())
    assert engine.running == [None] * 3 and engine.stats.decode_steps == 0
    again = engine.run([Request(*pairs[2], max_new_tokens=10)])[0]
    assert again.out == full_forward_greedy(*pairs[2], 10)[0]


def test_two_engines_on_one_model_keep_their_own_caches():
    (ids, pix), = prompts(1)
    chat = Engine(MODEL, slots=1)
    first = chat.run([Request(ids, pix, max_new_tokens=5)])[0]
    Engine(MODEL, slots=2).run([Request(*prompts(2)[1], max_new_tokens=5)])  # another engine, its own cache
    turn2 = ids + first.out + [7, 8]
    before = chat.stats.prefill_tokens
    assert chat.run([Request(turn2, pix, max_new_tokens=6)])[0].out == full_forward_greedy(turn2, pix, 6)[0]
    assert chat.stats.prefill_tokens - before == 1 + 2  # its slot still held the first turn


def test_the_compiled_decode_step_gives_the_same_answers():
    """torch.compile of the decode step (inductor on the CPU, ~30 s here): one shape, so it compiles once, and the
    greedy ids equal the eager engine's; the first step's time, compilation included, is reported."""
    pairs = prompts(3)
    make = lambda: [Request(ids, pix, max_new_tokens=6 + 3 * i) for i, (ids, pix) in enumerate(pairs)]
    compiled = Engine(MODEL, slots=2, max_seq_len=64, compile=True)
    got = [r.out for r in compiled.run(make())]
    assert got == [r.out for r in run(make(), slots=2, max_seq_len=64)[1]]
    assert compiled.stats.compile_s > 0 and compiled.stats.decode_steps > 5
    assert "decode step compiled" in compiled.describe()


def test_a_request_with_bad_sampling_settings_fails_where_it_is_made():
    """One check of the sampling settings (minillava.sampling.check_settings), when the Request is built: nothing
    is admitted, prefilled or decoded for it."""
    for kw in (dict(temperature=-1.0), dict(temperature=1.0, top_k=0), dict(temperature=1.0, top_p=1.5)):
        with pytest.raises(ValueError, match="need temperature >= 0, top_k >= 1, 0 < top_p <= 1"):
            Request([1, 2, 3], **kw)
    with pytest.raises(ValueError, match="need max_new_tokens >= 1; got 0"):
        Request([1, 2, 3], max_new_tokens=0)


# ---- prefixes shared across slots, images kept by content (issue 30) ----
def same_image_questions(n_images=3, per_image=4, seed=1):
    """POPE-shaped: a shared system prefix, then one image and a short question; several questions per image
    (each question carries its own copy of the image's pixels, as read from a file), plus two text-only ones."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 200, (9,), generator=g).tolist()
    images = [torch.randn(1, 3, 32, 32, generator=g) for _ in range(n_images)]
    out = [([1] + system + [IMG] + torch.randint(3, 200, (2 + q % 3,), generator=g).tolist(), images[i].clone())
           for i in range(n_images) for q in range(per_image)]
    return out + [([1] + system + torch.randint(3, 200, (5,), generator=g).tolist(), None) for _ in range(2)]


def answers(pairs, slots, **kw):
    engine, done = run([Request(ids, pix, max_new_tokens=6) for ids, pix in pairs], slots, **kw)
    return [r.out for r in done], engine.stats


def test_shared_prefixes_give_the_same_greedy_answers_in_any_order_and_batch():
    """Prefixes copied between slots, images kept by content, requests prefilled together in one forward: the
    same greedy answers as the engine without any of it, in any order and with any number of slots."""
    pairs = same_image_questions()
    want, before = answers(pairs, 8, share_prefixes=False, image_cache_mb=0, batch_prefill=False)  # the old engine
    assert before.images == 12 and before.images_reused == 0  # every question encodes its image
    g = torch.Generator().manual_seed(0)
    for slots in (1, 3, 8):
        for order in (list(range(len(pairs))), torch.randperm(len(pairs), generator=g).tolist()):
            got, stats = answers([pairs[i] for i in order], slots)
            assert [got[order.index(i)] for i in range(len(pairs))] == want, (slots, order)
            assert stats.images == 3  # each picture encoded once, whatever the order
            assert stats.prefill_tokens + stats.prefix_reused == before.prefill_tokens + before.prefix_reused
    _, stats = answers(pairs, 8)  # eight slots: the prefixes are copied between running slots
    assert stats.prefix_copied >= 7 * 10 + 5 * CFG.num_image_tokens  # the system prompt 7 times, images 5 times
    assert stats.prefill_tokens < before.prefill_tokens - 5 * CFG.num_image_tokens


def test_a_request_reads_no_other_request_positions_past_the_shared_prefix():
    """Change one request's image: the other answers stay, and the changed one follows its own image (it equals
    that request run alone on a fresh engine), though its text is the same as its neighbours'."""
    pairs = same_image_questions(n_images=1, per_image=6)[:6]
    base, _ = answers(pairs, 4)
    other = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    changed = list(pairs)
    changed[3] = (pairs[3][0], other)
    got, stats = answers(changed, 4)
    assert [a for i, a in enumerate(got) if i != 3] == [a for i, a in enumerate(base) if i != 3]
    assert got[3] == answers([changed[3]], 1)[0][0] and got[3] != base[3]
    assert stats.images == 2


def test_eviction_under_a_tiny_budget_gives_the_same_answers():
    pairs = same_image_questions()[:12]
    pairs = [pairs[q + 4 * i] for q in range(4) for i in range(3)]  # the images in turn: A B C A B C ...
    want, _ = answers(pairs, 1, share_prefixes=False, image_cache_mb=0)
    got, stats = answers(pairs, 1)  # one slot: each picture's features come back from the image cache
    assert got == want and stats.images == 3 and stats.images_reused == 9
    got, stats = answers(pairs, 1, image_cache_mb=1e-6)  # no image's features fit: each encoded where needed
    assert got == want and stats.images == 12 and stats.images_reused == 0
    one = CFG.num_image_tokens * CFG.text.hidden_size * 4  # one image's fp32 features, bytes
    engine = Engine(MODEL, slots=1, image_cache_mb=2.5 * one / 2**20)  # room for two images' features
    assert [r.out for r in engine.run([Request(ids, pix, max_new_tokens=6) for ids, pix in pairs])] == want
    assert engine.image_cache_bytes == 2 * one and len(engine.image_cache) == 2
    assert engine.stats.images == 12  # A B C in turn through a cache of two: the least recently used is always out


@pytest.mark.parametrize("chunk", [1, 5, 17])
def test_chunked_prefill_gives_the_same_answers(chunk):
    pairs = prompts(8) + same_image_questions(n_images=2, per_image=3)
    want, whole = answers(pairs, 3)
    got, stats = answers(pairs, 3, prefill_chunk=chunk)
    assert got == want and stats.images == 2 + sum(p is not None for _, p in prompts(8))
    assert stats.prefill_tokens <= whole.prefill_tokens  # a shared prefix still computed once: the others wait


def test_a_long_prompt_is_prefilled_between_the_running_requests_decode_steps():
    """With prefill_chunk, a newcomer's prompt runs a chunk per step: the running request gets a token at every
    step meanwhile, instead of waiting for the whole prefill."""
    (short, _), (long_ids, long_pix) = prompts(3)[2], prompts(3)[1]  # text only; an image
    long_ids = long_ids + list(range(3, 40))  # 16 image positions + ~45 text ids: 13 chunks of 5
    engine = Engine(MODEL, slots=2, prefill_chunk=5)
    seen = []  # at each of the running request's tokens: positions of the newcomer still to prefill
    first = Request(short, max_new_tokens=20,
                    on_token=lambda out: seen.append(engine.state[1].pending.shape[0]
                                                     if engine.state[1].pending is not None else 0))
    done = engine.run([first, Request(long_ids, long_pix, max_new_tokens=3)])
    assert sum(n > 0 for n in seen) >= 10  # the running request kept decoding through the newcomer's prefill
    assert [r.out for r in done] == [r.out for r in Engine(MODEL, slots=2).run(
        [Request(short, max_new_tokens=20), Request(long_ids, long_pix, max_new_tokens=3)])]
    with pytest.raises(ValueError, match="prefill_chunk >= 1"):
        Engine(MODEL, slots=1, prefill_chunk=0)


def test_a_failed_prefill_ends_only_its_requests():
    (short, _), (other, pix) = prompts(3)[2], prompts(3)[1]
    engine = Engine(MODEL, slots=2)
    real = engine._advance
    engine._advance = lambda slots: (_ for _ in ()).throw(RuntimeError("out of memory"))
    bad = Request(other, pix, max_new_tokens=3)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.admit(bad)
    assert engine.running == [None, None] and bad.finish_reason == "abort"  # nothing half-admitted stays
    engine._advance = real
    chunked = Engine(MODEL, slots=2, prefill_chunk=4)
    running = Request(short, max_new_tokens=8)
    chunked.admit(running)
    while len(running.out) < 2:  # its prefill, a chunk a step, then its first decode step
        chunked.step()
    newcomer = Request(other, pix, max_new_tokens=3)
    chunked.admit(newcomer)
    advance, chunked._advance = chunked._advance, lambda slots: (_ for _ in ()).throw(RuntimeError("oom"))
    with pytest.raises(PrefillError) as e:
        chunked.step()
    assert e.value.requests == [newcomer] and newcomer.finish_reason == "abort"
    assert running in chunked.running and newcomer not in chunked.running  # the running request goes on
    chunked._advance = advance
    n = len(running.out)
    chunked.step()
    assert len(running.out) == n + 1


def test_the_same_image_twice_in_one_prompt_is_encoded_once():
    pix = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    engine = Engine(MODEL, slots=1)
    engine.run([Request([1, IMG, 7, IMG, 8], torch.cat([pix, pix.clone()]), max_new_tokens=2)])
    one = CFG.num_image_tokens * CFG.text.hidden_size * 4
    assert engine.stats.images == 1 and engine.stats.images_reused == 1 and engine.image_cache_bytes == one


def test_a_request_waits_for_a_prefix_being_prefilled_rather_than_compute_it_again():
    """serve.py admits as requests come: with chunked prefill, a second question about the image of a prompt still
    being prefilled is not admissible until that prefill is done, then copies its positions."""
    (a, pa), (b, pb) = same_image_questions(n_images=1, per_image=2)[:2]
    engine = Engine(MODEL, slots=2, prefill_chunk=4)
    first, second = Request(a, pa, max_new_tokens=2), Request(b, pb, max_new_tokens=2)
    engine.admit(first)
    assert engine.admissible([second]) == 0
    while engine.state[0].pending is not None:
        engine.step()
    assert engine.admissible([second]) == 1
    before = engine.stats.prefill_tokens
    engine.admit(second)
    while second.finish_reason is None:
        engine.step()
    assert engine.stats.prefill_tokens - before == len(b) - 11  # only its question: 10 system ids + the image copied
    assert engine.stats.images == 1
