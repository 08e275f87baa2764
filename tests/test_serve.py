"""serve.py on a tiny random checkpoint: the openai client gets generate.py's greedy answer (streamed and not),
concurrent clients get their own answers, a full queue answers 429, every bad request gets its status and
message naming the field and the server keeps serving, a client that disconnects frees its slot, chunked and
truncated bodies, a text too long to tokenize, a stage-1 checkpoint (--projector, --model-base)."""
import base64
import dataclasses
import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image


from minillava import generation
from minillava import serve
from minillava.engine import Engine, Request
from minillava.templates import build_prompt, get_template
from minillava.tokenizer import tokenize_with_images
from minillava.demo import model_config
from tests.spm_util import train_tiny_spm

# The demo's model shape (4-layer LLaMA of width 128, 9 image positions) with room for the tiny tokenizer's 768
# pieces and llava-hf's <image> and <pad>.
CFG = model_config(vocab_size=832, image_size=48).replace(image_token_id=768, pad_token_id=769)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from minillava.weights import write_random_checkpoint
    root = tmp_path_factory.mktemp("serve")
    tok = train_tiny_spm(root / "spm")
    return str(write_random_checkpoint(root / "llava-tiny", CFG, "A", seed=1, tokenizer=tok)["model"])


def data_url(seed, size=(40, 30), fmt="PNG"):
    im = Image.effect_noise(size, 60 + seed * 7).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode(), im


def truncated(url):
    """A data URL with the first half of its image's bytes."""
    raw = base64.b64decode(url.partition(",")[2])
    return url.partition(",")[0] + "," + base64.b64encode(raw[:len(raw) // 2]).decode()


@pytest.fixture(scope="module")
def app(ckpt):
    model, tok = generation.load(ckpt, dtype="fp32", device="cpu")
    cfg = serve.ServeConfig(model=ckpt, port=0, slots=4, queue=12, max_body_mb=1.0, max_image_pixels=100_000)
    server = serve.start(cfg, model, tok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield url, server, model, tok
    server.shutdown()
    server.server_close()
    server.app.close()


def call(url, path, body=None, headers=None, raw=None):
    """-> (status, parsed JSON or text, headers)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                 **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text, status, hdrs = r.read().decode(), r.status, r.headers
    except urllib.error.HTTPError as e:
        text, status, hdrs = e.read().decode(), e.code, e.headers
    try:
        return status, json.loads(text), hdrs
    except ValueError:
        return status, text, hdrs


def ask(question, url=None, **kw):
    content = [{"type": "text", "text": question}] + ([{"type": "image_url", "image_url": {"url": url}}] if url else [])
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 12, **kw}


def streamed(url, body):
    """POST with stream: true and read the events -> (joined content, finish_reason, usage or None)."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    text, reason, usage = [], None, None
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = r.read().decode().split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    for ev in events[:-2]:
        chunk = json.loads(ev.removeprefix("data: "))
        for choice in chunk["choices"]:
            text.append(choice["delta"].get("content", ""))
            reason = choice["finish_reason"] or reason
        usage = chunk.get("usage") or usage
    return "".join(text), reason, usage


def slow_steps(server, monkeypatch, seconds=0.02):
    real = server.app.engine.step
    monkeypatch.setattr(server.app.engine, "step", lambda: (time.sleep(seconds), real())[1])


def test_the_openai_client_gets_generate_pys_answer(app):
    openai = pytest.importorskip("openai")
    url, server, model, tok = app
    image_url, image = data_url(0)
    want = generation.answer(model, tok, [(image, "What is in the picture?")], temperature=0, max_new_tokens=12)[0]
    assert len(set(want.split())) >= 2  # the random model writes varied text: equality means something
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [server.app.name]
    body = ask("What is in the picture?", image_url)
    r = client.chat.completions.create(model=server.app.name, **body)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > CFG.num_image_tokens
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=server.app.name, stream=True, stream_options={"include_usage": True}, **body) if c.choices]
    assert "".join(pieces) == want and len([p for p in pieces if p]) >= 2  # streamed: several pieces
    # text only, a system message, and a later turn of a conversation: the template's turns
    history = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=server.app.name, messages=history, temperature=0, max_tokens=8)
    template = dataclasses.replace(get_template("vicuna_v1"), system="Answer briefly.")
    ids = tokenize_with_images(build_prompt([("human", "Hi there"), ("gpt", "Hello"), ("human", "Name a colour.")],
                                            template), tok, model.config.image_token_id)
    reply = generation.Reply(tok, ["</s>"])
    Engine(model, slots=1).run([Request(ids, max_new_tokens=8, stop_ids=(tok.eos_id,), on_token=reply.update)])
    assert r.choices[0].message.content == reply.finish().strip()


def test_concurrent_clients_get_their_own_answers_and_a_full_queue_gets_429(app, monkeypatch):
    url, server, model, tok = app
    questions = [(f"Question {i}: what do you see?" + " more" * (i % 5), data_url(i)) for i in range(16)]
    want = generation.answer(model, tok, [(im, q) for q, (_, im) in questions], batch_size=1, temperature=0,
                    max_new_tokens=12)
    slow_steps(server, monkeypatch)  # 16 requests on 4 slots + 12 waiting: all in flight at once
    got, health = {}, []

    def client(i):
        q, (u, _) = questions[i]
        got[i] = streamed(url, ask(q, u))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until the slots and the queue are full
        status, h, _ = call(url, "/health")
        health.append(status)
        if h["running"] == 4 and h["waiting"] == 12:
            break
        time.sleep(0.01)
    assert h["running"] == 4 and h["waiting"] == 12, h
    status, err, hdrs = call(url, "/v1/chat/completions", ask("one more?"))
    assert status == 429 and err["error"]["type"] == "rate_limit_error" and hdrs["Retry-After"] == "1"
    for t in threads:
        t.join(timeout=120)
    assert set(health) == {200}
    assert [got[i][0] for i in range(16)] == want  # nothing lost or crossed
    assert all(got[i][1] in ("stop", "length") for i in range(16))


BAD = [  # (description, raw body or dict, status, what the message says, param)
    ("malformed JSON", b'{"messages": [', 400, "not valid JSON", None),
    ("a field of the wrong type", ask("x", temperature="hot"), 400, "'temperature' must be", "temperature"),
    ("n > 1", ask("x", n=2), 400, "only n = 1", "n"),
    ("no messages", {"messages": []}, 400, "'messages' is required", "messages"),
    ("a last message that is not the user's", {"messages": [{"role": "assistant", "content": "hi"}]}, 400,
     "last message must be the user's", "messages"),
    ("too many images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(1)[0]}},
        {"type": "image_url", "image_url": {"url": data_url(2)[0]}}]}]}, 400, "too many images",
     "messages[0].content[1]"),
    ("prompt + max_tokens beyond the context", ask("x", data_url(1)[0], max_tokens=100_000), 400,
     "> the context of", "messages"),
    ("an undecodable image", ask("x", "data:image/png;base64," + base64.b64encode(b"not a png").decode()), 400,
     "messages[0].content[1].image_url: the image could not be decoded: its data is not in an image format",
     "messages[0].content[1].image_url"),
    ("a truncated image", ask("x", truncated(data_url(1)[0])), 400, "could not be decoded: image file is truncated",
     "messages[0].content[1].image_url"),
    ("an image over the pixel limit", ask("x", data_url(1, size=(400, 300))[0]), 400, "more than the limit",
     "messages[0].content[1].image_url"),
    ("a remote URL", ask("x", "https://example.com/cat.jpg"), 400, "never fetches remote URLs",
     "messages[0].content[1].image_url"),
    ("a local path without --image-root", ask("x", "/etc/passwd"), 400, "--image-root",
     "messages[0].content[1].image_url"),
    ("an unknown model", ask("x", model="gpt-4"), 404, "does not exist", "model"),
    ("a body over the limit", ask("x" * 2_000_000), 413, "over the limit", None),
    # integers beyond 64 bits (JSON's have no size), and each range check naming its own field
    *[(f"{name} beyond 64 bits", ask("x", **{name: 99999999999999999999999}), 400,
       "must be an integer from -9223372036854775808 to 9223372036854775807, got 99999999999999999999999", name)
      for name in ("seed", "max_tokens", "max_completion_tokens", "n", "top_k")],
    ("top_p 0", ask("x", top_p=0), 400, "need 0 < top_p <= 1, got 0", "top_p"),
    ("temperature 3", ask("x", temperature=3), 400, "need 0 <= temperature <= 2, got 3", "temperature"),
    ("top_k 0", ask("x", top_k=0, temperature=1), 400, "need top_k >= 1, got 0", "top_k"),
    ("max_completion_tokens 0", ask("x", max_completion_tokens=0), 400, "max_completion_tokens must be >= 1",
     "max_completion_tokens"),
    ("a part of the wrong kind", {"messages": [{"role": "user", "content": ["hi"]}]}, 400, "each part is",
     "messages[0].content[0]"),
]


@pytest.mark.parametrize("what, body, status, message, param", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_gets_its_status_and_the_server_keeps_serving(app, what, body, status, message, param):
    url = app[0]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, err, _ = call(url, "/v1/chat/completions", raw=raw)
    assert got == status, err
    assert message in err["error"]["message"] and err["error"]["param"] == param
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert " object at 0x" not in err["error"]["message"]  # no repr of a BytesIO, ...
    if param and param.startswith("messages["):  # the message says where, as the param does
        assert err["error"]["message"].startswith(param + ":")
    assert call(url, "/health")[0] == 200
    assert call(url, "/v1/chat/completions", ask("still there?"))[0] == 200


def test_json_null_means_the_default(app):
    status, r, _ = call(app[0], "/v1/chat/completions", ask("Hi?", temperature=None, top_p=None, seed=None,
                                                             max_completion_tokens=None, stop=None))
    assert status == 200 and r["usage"]["completion_tokens"] <= 12  # max_tokens, not a null max_completion_tokens


def test_the_openai_client_gets_a_400_naming_the_field_not_a_500_it_retries(app):
    openai = pytest.importorskip("openai")
    url, server, _, _ = app
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for kw, param, message in (({"seed": 99999999999999999999999}, "seed", "from -9223372036854775808 to "
                                "9223372036854775807"), ({"top_p": 0}, "top_p", "0 < top_p <= 1")):
        with pytest.raises(openai.BadRequestError) as e:  # a 500 would be an InternalServerError
            client.chat.completions.create(model=server.app.name, **ask("x", **kw))
        assert e.value.param == param and message in e.value.message, e.value.body
    r = client.chat.completions.create(model=server.app.name, **ask("x", seed=2**63 - 1, temperature=1))
    assert r.choices[0].finish_reason in ("stop", "length")  # the largest seed is fine
    client.close()


def post_raw(url, head: bytes, body: bytes = b"", timeout=30):
    """A hand-written POST /v1/chat/completions on a socket (`head`: more header lines), as a misbehaving client
    sends it -> the socket."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head
                 + b"\r\n" + body)
    return sock


def response(sock) -> tuple:
    """The server's answer on `sock` -> (status, parsed JSON)."""
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, json.loads(r.read())


def test_a_chunked_body(app):
    url, server, model, tok = app
    host, port = url.removeprefix("http://").split(":")
    image_url, _ = data_url(4)
    body = json.dumps(ask("What is it?", image_url)).encode()
    want = call(url, "/v1/chat/completions", raw=body)[1]["choices"][0]["message"]["content"]
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    for _ in range(2):  # the connection serves a second request after a chunked one
        conn.request("POST", "/v1/chat/completions", (body[i:i + 1000] for i in range(0, len(body), 1000)),
                     {"Content-Type": "application/json"}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["content"] == want
    big = json.dumps(ask("x" * 2_000_000)).encode()  # over the 1 MB limit: read, then refused
    conn.request("POST", "/v1/chat/completions", (big[i:i + 65536] for i in range(0, len(big), 65536)),
                 {"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "over 1048576 bytes, the limit of 1.0 MB" in json.loads(r.read())["error"]["message"]
    conn.close()
    small = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    for chunks, message in ((b"zz\r\nabc\r\n0\r\n\r\n", "malformed chunked body: a chunk starts with b'zz\\r\\n'"),
                            (b"3\r\n" + small + b"\r\n0\r\n\r\n", "a chunk is longer than its size says"),
                            (b"ff\r\n" + small + b"\r\n", "ended inside a chunk")):
        sock = post_raw(url, b"Transfer-Encoding: chunked\r\n", chunks)
        sock.shutdown(socket.SHUT_WR)
        status, err = response(sock)
        assert status == 400 and message in err["error"]["message"], err
        sock.close()
    status, err = response(post_raw(url, b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"))
    assert status == 400 and "Transfer-Encoding 'gzip, chunked' is not supported" in err["error"]["message"]
    assert call(url, "/health")[0] == 200


def test_a_body_shorter_than_its_content_length(app, monkeypatch, capsys):
    url, server, _, _ = app
    # the client closes its side: a 400 that says so, at once (not after the 60 s socket timeout)
    sock = post_raw(url, b"Content-Length: 100\r\n", b'{"messages"')
    sock.shutdown(socket.SHUT_WR)
    t0 = time.time()
    status, err = response(sock)
    assert status == 400 and "ended after 11 of the 100 bytes its Content-Length announced" in err["error"]["message"]
    assert time.time() - t0 < 5
    sock.close()

    def stderr_lines(n=1):  # the server's lines on stderr (its threads write there), once there are n
        deadline, lines = time.time() + 5, []
        while len(lines) < n and time.time() < deadline:
            lines += capsys.readouterr().err.splitlines()
            time.sleep(0.05)
        return lines
    capsys.readouterr()
    # the client stays silent: the socket timeout ends the connection, with one line on stderr and no traceback
    monkeypatch.setattr(server.app.cfg, "timeout", 0.5)
    sock = post_raw(url, b"Content-Length: 100\r\n", b'{"messages"')
    assert sock.recv(4096) == b""
    sock.close()
    lines = stderr_lines()
    assert len(lines) == 1 and "Request timed out" in lines[0], lines
    # the client resets the connection (SO_LINGER 0: RST, not FIN) while the server reads: one line again
    monkeypatch.setattr(server.app.cfg, "timeout", 60.0)
    sock = post_raw(url, b"Content-Length: 100\r\n", b'{"messages"')
    time.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    lines = stderr_lines()
    assert len(lines) == 1 and "connection lost" in lines[0], lines
    assert call(url, "/health")[0] == 200


def test_a_text_too_long_for_the_context_is_refused_before_it_is_tokenized(app, monkeypatch):
    url, server, _, _ = app
    S, piece = server.app.engine.S, server.app.max_piece
    calls = []
    real = serve.tokenize_with_images
    monkeypatch.setattr(serve, "tokenize_with_images", lambda *a: (calls.append(len(a[0])), real(*a))[1])
    status, err, _ = call(url, "/v1/chat/completions", ask("word " * 150_000))  # 750 kB, under the body limit
    assert status == 400 and err["error"]["param"] == "messages" and calls == []
    assert err["error"]["code"] == "context_length_exceeded"
    assert f"characters of text: more than the context of {S} positions can hold" in err["error"]["message"]
    # a text under that bound is tokenized, and the exact count decides: here, too long as well
    text = "word " * S
    assert len(text) < S * piece - 1000
    status, err, _ = call(url, "/v1/chat/completions", ask(text))
    assert status == 400 and len(calls) == 1 and f"> the context of {S}" in err["error"]["message"]
    assert call(url, "/v1/chat/completions", ask("still there?"))[0] == 200


def test_a_stage_1_checkpoint_with_projector_or_model_base(ckpt, tmp_path):
    """Layout C (a LLaMA dir, a CLIP dir, a stage-1 mm_projector file) by --projector FILE, or the original's way:
    --model-base LLAMA --model DIR (holding mm_projector.safetensors); the openai client gets generate.py's answer."""
    openai = pytest.importorskip("openai")
    from minillava.weights import write_random_checkpoint
    tok = train_tiny_spm(os.path.join(os.path.dirname(ckpt), "spm"))  # the ckpt fixture's, already trained
    paths = write_random_checkpoint(tmp_path / "c", CFG, "C", seed=0, tokenizer=tok)
    llama, clip, projector = (str(paths[k]) for k in ("model", "vision", "projector"))
    model, tok = generation.load(llama, clip, projector=projector, dtype="fp32", device="cpu")
    image_url, image = data_url(0)
    [want] = generation.answer(model, tok, [(image, "What is in the picture?")], temperature=0, max_new_tokens=12)
    for flags in (["--model", llama, "--vision", clip, "--projector", projector],
                  ["--model-base", llama, "--model", os.path.dirname(projector), "--vision", clip]):
        cfg = serve.parse_args(flags + ["--port", "0", "--dtype", "fp32", "--device", "cpu", "--slots", "1"])
        server = serve.start(cfg)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused",
                                   max_retries=0)
            r = client.chat.completions.create(model=server.app.name, **ask("What is in the picture?", image_url))
            assert r.choices[0].message.content == want, flags
            client.close()
        finally:
            server.shutdown()
            server.server_close()
            server.app.close()


def test_the_original_llavas_flags():
    assert serve.parse_args(["--model", "m", "--load-8bit"]).quantize == "int8"
    assert serve.parse_args(["--model", "m", "--load-4bit"]).quantize == "int4"
    assert serve.parse_args(["--model", "m"]).quantize == "none"
    cfg = serve.parse_args(["--model-path", "runs/stage1", "--model-base", "llama"])
    assert (cfg.model, cfg.model_base) == ("runs/stage1", "llama")


def test_device_cuda_without_cuda_is_one_line_and_exit_1(ckpt, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # --threads as it is now: main sets torch's thread count for this whole process
    assert serve.main(["--model", ckpt, "--device", "cuda", "--threads", str(torch.get_num_threads())]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --device cuda: ") and "Traceback" not in err, err


def test_the_api_key_and_local_images_under_the_root(app, tmp_path, monkeypatch):
    url, server, model, tok = app
    monkeypatch.setattr(server.app.cfg, "api_key", "sekret")
    assert call(url, "/v1/models")[0] == 401
    status, err, _ = call(url, "/v1/chat/completions", ask("x"), headers={"Authorization": "Bearer wrong"})
    assert status == 401 and err["error"]["type"] == "authentication_error"
    assert call(url, "/v1/models", headers={"Authorization": "Bearer sekret"})[0] == 200
    assert call(url, "/health")[0] == 200  # health needs no key
    monkeypatch.setattr(server.app.cfg, "api_key", None)
    root = tmp_path / "root"
    root.mkdir()
    _, image = data_url(3)
    image.save(root / "a.png")
    os.symlink("/etc/hostname", root / "out.png")
    monkeypatch.setattr(server.app.cfg, "image_root", str(root))
    status, r, _ = call(url, "/v1/chat/completions", ask("What is it?", "a.png"))
    assert status == 200
    want = generation.answer(model, tok, [(image, "What is it?")], temperature=0, max_new_tokens=12)[0]
    assert r["choices"][0]["message"]["content"] == want
    for path in ("../a.png", "out.png", str(tmp_path / "root" / ".." / "x.png")):
        status, err, _ = call(url, "/v1/chat/completions", ask("x", path))
        assert status == 400 and "outside --image-root" in err["error"]["message"], (path, err)
    shutil.rmtree(root)


def test_a_client_that_disconnects_frees_its_slot(app, monkeypatch):
    url, server, model, tok = app
    slow_steps(server, monkeypatch)
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({**ask("Tell a long story."), "max_tokens": 150, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head = b""
    while b"data: " not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200")
    deadline = time.time() + 10
    while not call(url, "/health")[1]["running"] and time.time() < deadline:  # admitted
        time.sleep(0.01)
    assert call(url, "/health")[1]["running"] == 1
    sock.close()  # the client goes away after its first event
    deadline = time.time() + 10
    while call(url, "/health")[1]["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert call(url, "/health")[1]["running"] == 0  # long before 150 tokens at 20 ms each


def test_many_connections_at_once_are_not_reset(app):
    url, server, _, _ = app
    assert server.request_queue_size >= 20  # the stdlib's default backlog of 5 would reset some of these
    results = []
    threads = [threading.Thread(target=lambda: results.append(call(url, "/health")[0])) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 40


def test_the_page_is_self_contained(app):
    url = app[0]
    with urllib.request.urlopen(url + "/", timeout=10) as r:
        page = r.read().decode()
    assert "<script>" in page and "/v1/chat/completions" in page and "http" not in page.replace(
        "/v1/chat/completions", "")  # no CDN, no remote script or style


def test_the_page_in_a_headless_browser(app):
    """Upload an image, ask, see the streamed answer, in Debian's chromium driven by playwright."""
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on this machine")
    url, server, model, tok = app
    _, image = data_url(5)
    path = os.path.join(os.path.dirname(__file__), "..", ".pytest_page_image.png")
    image.save(path)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page()
            page.goto(url + "/")
            page.set_input_files("#image", path)
            page.wait_for_function("document.getElementById('preview').src.startsWith('data:')")
            page.fill("#question", "What is this?")
            page.fill("#temperature", "0")
            page.click("#send")
            page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
            status = page.inner_text("#status")
            lines = page.evaluate("[...document.querySelectorAll('#log div')].map(d => d.textContent)")
            browser.close()
    finally:
        os.remove(path)
    [want] = generation.answer(model, tok, [(image, "What is this?")], temperature=0,
                      max_new_tokens=CFG.text.max_position_embeddings)  # as the page: no limit but the context
    assert status == "" and lines == ["USER: What is this?", "ASSISTANT: " + want]


def test_the_command_line_serves_a_quantized_model_and_stops_on_ctrl_c(ckpt):
    import re
    import signal
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Ctrl-C as a terminal delivers it: a suite started in the background inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler (see tests/test_train.py)
    proc = subprocess.Popen([sys.executable, "serve.py", "--model", ckpt, "--port", "0", "--threads", "1",
                             "--slots", "2", "--quantize", "int8"], cwd=root, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        before = []
        for line in proc.stderr:
            before.append(line)
            m = re.search(r"serving llava-tiny on (http://127\.0\.0\.1:\d+)/ \(KV cache: 2 slot", line)
            if m:
                break
        assert m, "no 'serving ...' line"
        assert any("LLM linear layers int8 (per channel)" in line for line in before)  # quantized while loading
        status, health, _ = call(m.group(1), "/health")
        assert status == 200 and health == {"status": "ok", "slots": 2, "running": 0, "waiting": 0}
        status, r, _ = call(m.group(1), "/v1/chat/completions", ask("Hello?"))
        assert status == 200 and r["choices"][0]["finish_reason"] in ("stop", "length")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0 and "stopped" in proc.stderr.read()
    finally:
        proc.kill()


def test_a_client_that_sends_nothing_is_cut_off_at_the_socket_timeout(app, monkeypatch):
    url, server, _, _ = app
    monkeypatch.setattr(server.app.cfg, "timeout", 0.5)
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")  # and then nothing more
    t0 = time.time()
    assert sock.recv(4096) == b""  # the server closed the connection
    assert time.time() - t0 < 5
    sock.close()
    assert call(url, "/health")[0] == 200
