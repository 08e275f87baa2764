"""serve.py under load: N concurrent streaming clients vs the same requests one at a time.

    python benchmarks/bench_serve.py                    # CPU, 2 threads, 8 slots, 16 requests, 8 at once
    python benchmarks/bench_serve.py --clients 16 --slots 16 --device cuda --dtype bf16

The server runs in this process (a thread, port 0) on a random model with bench_engine.py's shapes (a 12 x 768
LLM, a small CLIP tower at 112 px: 64 image positions) and a small SentencePiece tokenizer; every request has an
image and asks for --max-tokens greedy tokens (EOS can end one earlier). Printed for each mode: aggregate tokens/s
(completion tokens over the wall time), time to first token (p50, p99) and the time between streamed pieces
(p50, p99), then the ratio of the aggregate rates.
"""
import argparse
import base64
import dataclasses
import io
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from minillava import serve  # noqa: E402
from benchmarks.bench_engine import CONFIG  # noqa: E402
from minillava.llava import Llava  # noqa: E402
from minillava.tokenizer import Tokenizer  # noqa: E402
from tests.spm_util import train_tiny_spm  # noqa: E402


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def one_request(url, i, max_tokens):
    """Stream one chat completion -> (seconds to the first piece, gaps between pieces, completion tokens)."""
    im = Image.effect_noise((64, 48), 40 + i).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": f"Question {i}: what is in the picture?"},
        {"type": "image_url", "image_url": {"url": image}}]}],
        "temperature": 0, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0, times, tokens = time.perf_counter(), [], 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])], tokens


def run(url, n, clients, max_tokens):
    results, lock = [], threading.Lock()
    todo = iter(range(n))

    def worker():
        for i in todo:  # each client takes the next request when its last one ends
            r = one_request(url, i, max_tokens)
            with lock:
                results.append(r)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tok = Tokenizer(train_tiny_spm(tempfile.mkdtemp(prefix="bench_serve_")))
    config = CONFIG.replace(text=dataclasses.replace(CONFIG.text, vocab_size=832), image_token_id=768,
                            pad_token_id=769)  # the tiny tokenizer's 768 pieces, then <image> and <pad>
    torch.manual_seed(0)
    model = Llava(config)  # the published init: N(0, 0.02)
    model = model.to(a.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]).eval()
    cfg = serve.ServeConfig(port=0, slots=a.slots, queue=max(a.requests, 1), max_seq_len=512)
    server = serve.start(cfg, model, tok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    n_llm = sum(p.numel() for p in model.language_model.parameters())
    print(f"{a.requests} requests (one image each, <= {a.max_tokens} greedy tokens), {a.slots} slots, {a.dtype}, "
          f"{a.device}, {a.threads} thread(s); LLM {n_llm / 1e6:.0f}M parameters")
    one_request(url, 999, 4)  # warm up
    rates = {}
    for name, clients in (("one at a time", 1), (f"{a.clients} concurrent", a.clients)):
        wall, results = run(url, a.requests, clients, a.max_tokens)
        tokens = sum(r[2] for r in results)
        ttft = [r[0] for r in results]
        gaps = [g for r in results for g in r[1]]
        rates[name] = tokens / wall
        print(f"{name:14s} {tokens / wall:7.1f} tokens/s ({tokens} tokens in {wall:.1f} s) | time to first token "
              f"p50 {percentile(ttft, 50) * 1e3:6.0f} ms p99 {percentile(ttft, 99) * 1e3:6.0f} ms | between pieces "
              f"p50 {percentile(gaps, 50) * 1e3:5.1f} ms p99 {percentile(gaps, 99) * 1e3:6.1f} ms")
    (r1, rn) = rates.values()
    print(f"concurrent / one at a time: {rn / r1:.2f}x aggregate tokens/s")
    server.shutdown()
    server.app.close()


if __name__ == "__main__":
    main()
