"""The OpenAI-compatible server, started for real (uvicorn on a free local port) on a tiny LoRA checkpoint pair and
driven with the official `openai` client: replies equal `vltrain.infer`'s and the Python API's under greedy
decoding, streamed deltas add up to the reply, usage counts image tokens, adapters are chosen by name, concurrent
streams share generate calls, a client that leaves frees its slot, every bad request gets its OpenAI-shaped error
(never a 500, never a traceback in the log), and SIGTERM lets the running request finish."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="the server's tests need the serve extras (pip install 'vltrain[serve]')")
httpx2 = pytest.importorskip("httpx2")

from tests.test_infer import make_lora_checkpoint  # noqa: E402
from tests.test_media import Server, send, write_video  # noqa: E402
from vltrain.config import compose_command, compose_config  # noqa: E402
from vltrain.data.demo import write_demo_dataset  # noqa: E402
from vltrain.infer.engine import Conversation, Engine  # noqa: E402
from vltrain.serve.options import ServeOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
MAX_TOKENS = 6


def png(size=(224, 224), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def data_uri(body: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(body).decode("ascii")


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


class LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


def adapter_pair(root: Path, demo, extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Two LoRA checkpoints of one random base: b has a's adapters with lora_B negated."""
    from safetensors.torch import load_file, save_file

    a = make_lora_checkpoint(root, demo, extra=extra)
    b = root / "checkpoint-2"
    shutil.copytree(a, b)
    weights = load_file(b / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, b / "adapter_model.safetensors")
    return a, b


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two LoRA checkpoints of one base (LoRA on the LLM and the projector, the default) and the demo images."""
    root = tmp_path_factory.mktemp("serve")
    demo = write_demo_dataset(root / "demo", n_train=16, n_val=6)
    a, b = adapter_pair(root / "run", demo)
    images = sorted((demo.train.parent / "images").iterdir())[:3]
    return SimpleNamespace(a=a, b=b, base=root / "run" / "base_model", images=images, root=root, demo=demo)


def start_server(overrides: list[str]):
    """The real server (uvicorn in a thread); returns (namespace with base URL and client, stop function)."""
    from vltrain.serve.server import build_server

    cfg, options = compose_command(overrides, "serve", ServeOptions, run_dir="outputs/serve")
    uv = build_server(cfg, options)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{uv.servers[0].sockets[0].getsockname()[1]}"
    client = openai.OpenAI(api_key=options.api_key or "none", base_url=base + "/v1", max_retries=0)

    def stop():
        uv.should_exit = True
        thread.join(timeout=60)

    return SimpleNamespace(base=base, client=client, app=uv.config.app), stop


@pytest.fixture(scope="module")
def media_server():
    s = Server()
    s.routes["/red.png"] = lambda h, n: send(h, png())
    s.routes["/text.png"] = lambda h, n: send(h, b"this is not an image at all", content_type="text/plain")
    s.routes["/big.png"] = lambda h, n: send(h, b"\x89PNG" + b"0" * 600_000)
    s.routes["/moved.png"] = lambda h, n: (h.send_response(302), h.send_header("Location", "/red.png"),
                                           h.send_header("Content-Length", "0"), h.end_headers())

    def slow(h, n):
        time.sleep(3)
        send(h, png())

    s.routes["/slow.png"] = slow
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(scope="module")
def server(ckpts):
    """The server with adapters a and b of one base, a key and small limits; its log records collected."""
    logs = LogRecords()
    logging.getLogger().addHandler(logs)
    for name in ("vltrain.serve", "uvicorn"):
        logging.getLogger(name).setLevel(logging.INFO)
    running, stop = start_server(
        [f"adapters={{a: {ckpts.a}, b: {ckpts.b}}}", "port=0", f"api_key={KEY}", f"max_tokens={MAX_TOKENS}",
         "max_tiles=8", "max_body_bytes=2000000", "media_max_bytes=500000", "media_timeout=1.0",
         "media_allowed_hosts=[127.0.0.1]", "batch_wait_ms=50"])
    running.logs = logs
    yield running
    stop()
    logging.getLogger().removeHandler(logs)


@pytest.fixture(scope="module")
def reference(ckpts):
    """What `vltrain.infer` (Engine on the loaded checkpoint) and the Python API answer, greedy, MAX_TOKENS."""
    from vltrain.infer.session import open_session
    from vltrain.model.load import load_model_tokenizer, make_encoder

    sessions = {name: open_session(ckpt_dir=path) for name, path in (("a", ckpts.a), ("b", ckpts.b))}
    for session in sessions.values():
        session.model.generation_config.max_new_tokens = MAX_TOKENS
        session.model.vltrain_config = session.cfg  # the Python API reads the tile budget from it
    cfg = compose_config(["dataset=custom", "dataset.train=[unused.jsonl]", f"model.path={ckpts.base}",
                          "model.init=pretrained"])
    model, tokenizer = load_model_tokenizer(cfg.model)
    engines = {name: s.engine for name, s in sessions.items()} | {"tiny": Engine(model, make_encoder(cfg, model,
                                                                                                     tokenizer))}

    def answer(name: str, conversations: list[Conversation]) -> list[str]:
        return engines[name].generate(conversations, max_new_tokens=MAX_TOKENS, do_sample=False)

    return SimpleNamespace(answer=answer, sessions=sessions, engines=engines)


def metric(base: str, name: str) -> float:
    text = httpx2.get(base + "/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith("#") and (line[len(name)] in " {")]
    return sum(values)


# ---------------------------------------------------------------- what works


def test_models_health_and_metrics(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny", "a", "b"] and {m.owned_by for m in models.data} == {"vltrain"}
    assert httpx2.get(server.base + "/health").json() == {"status": "ok"}
    response = httpx2.get(server.base + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    for name in ("vltrain_requests_total", "vltrain_queue_depth", "vltrain_generation_tokens_total",
                 "vltrain_request_latency_seconds_bucket", "vltrain_running_requests"):
        assert name in response.text


def test_image_as_data_uri_equals_infer_and_the_python_api(server, reference, ckpts):
    from vltrain import get_template, inference

    question = "What colour is the shape?"
    reply = server.client.chat.completions.create(
        model="a", messages=[user(image_part(data_uri(ckpts.images[0].read_bytes())), question)])
    conversation = Conversation(f"<image>\n{question}", images=[str(ckpts.images[0])])
    expected = reference.answer("a", [conversation])[0]
    session = reference.sessions["a"]
    api, _ = inference(session.model, get_template("Hermes-2", session.tokenizer), f"<image>\n{question}",
                       images=[str(ckpts.images[0])])
    choice = reply.choices[0]
    assert choice.message.content == expected == api and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == MAX_TOKENS
    prompt = session.engine.encode(conversation).input_ids
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.prompt_tokens_details.image_tokens == 64
    assert reply.usage.total_tokens == len(prompt) + MAX_TOKENS and reply.model == "a"
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"


def test_stream_with_an_http_image_adds_up_to_the_reply(server, media_server, reference):
    messages = [user("Describe it.", image_part(media_server.url("/moved.png")))]  # a redirect to /red.png
    chunks = list(server.client.chat.completions.create(model="b", messages=messages, stream=True,
                                                        stream_options={"include_usage": True}))
    plain = server.client.chat.completions.create(model="b", messages=messages)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(deltas) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert len({c.id for c in chunks}) == 1
    red = media_server.url("/red.png")
    assert plain.choices[0].message.content == reference.answer(
        "b", [Conversation("Describe it.\n<image>", images=[red])])[0]


def test_multi_turn_with_system_and_the_base_model(server, reference, ckpts):
    messages = [{"role": "system", "content": "You answer briefly."},
                user(image_part(data_uri(ckpts.images[1].read_bytes())), "How many shapes?"),
                {"role": "assistant", "content": "2"},
                user("And their colour?", image_part(data_uri(ckpts.images[2].read_bytes())))]
    conversation = Conversation("And their colour?\n<image>", history=[("<image>\nHow many shapes?", "2")],
                                system="You answer briefly.", images=[str(p) for p in ckpts.images[1:3]])
    for name in ("a", "b", "tiny"):
        reply = server.client.chat.completions.create(model=name, messages=messages)
        assert reply.choices[0].message.content == reference.answer(name, [conversation])[0], name
        assert reply.usage.prompt_tokens_details.image_tokens == 128
    replies = {n: server.client.chat.completions.create(model=n, messages=messages).choices[0].message.content
               for n in ("a", "b", "tiny")}
    assert len(set(replies.values())) == 3  # each name is its own adapter (or none)


def test_stop_words_seed_and_temperature(server):
    messages = [user("Count to ten.")]
    full = server.client.chat.completions.create(model="a", messages=messages, max_tokens=MAX_TOKENS)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = server.client.chat.completions.create(model="a", messages=messages, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.index(stop)].strip()
    streamed = server.client.chat.completions.create(model="a", messages=messages, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content
    short = server.client.chat.completions.create(model="a", messages=messages, max_tokens=2)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    for temperature in (0, 1e-9):  # greedy
        zero = server.client.chat.completions.create(model="a", messages=messages, temperature=temperature)
        assert zero.choices[0].message.content == text
    sampled = [server.client.chat.completions.create(model="a", messages=messages, temperature=1.5, top_p=0.9,
                                                     seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    other_seed = server.client.chat.completions.create(model="a", messages=messages, temperature=1.5, top_p=0.9,
                                                       seed=8).choices[0].message.content
    assert other_seed != sampled[0] and sampled[0] != text  # the seed and the temperature reach the sampler
    # top_p alone samples with temperature at its OpenAI default of 1 (not the greedy generation config)
    top_p_only = [server.client.chat.completions.create(model="a", messages=messages, top_p=0.9, seed=s)
                  .choices[0].message.content for s in (7, 7, 8)]
    explicit = server.client.chat.completions.create(model="a", messages=messages, temperature=1, top_p=0.9,
                                                     seed=7).choices[0].message.content
    assert top_p_only[0] == top_p_only[1] == explicit and top_p_only[0] != text and top_p_only[2] != top_p_only[0]


def test_video_as_data_uri_and_url(server, media_server, tmp_path):
    clip = write_video(tmp_path / "clip.mp4", 40)
    before = set(Path(tempfile.gettempdir()).glob("vltrain-serve-*"))
    media_server.routes["/clip.mp4"] = lambda h, n: send(h, clip.read_bytes(), content_type="video/mp4")
    replies = [server.client.chat.completions.create(model="a", messages=[user(
        {"type": "video_url", "video_url": {"url": url}}, "What happens?")])
        for url in (data_uri(clip.read_bytes(), "video/mp4"), media_server.url("/clip.mp4"))]
    assert replies[0].usage.prompt_tokens_details.image_tokens == 8 * 64  # 8 frames, one tile each
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    assert set(Path(tempfile.gettempdir()).glob("vltrain-serve-*")) <= before  # the temporary files are gone


def test_eight_concurrent_streams_share_generate_calls(server, reference, ckpts):
    questions = [f"Question number {i}: what is in the picture?" for i in range(8)]
    calls_before = metric(server.base, "vltrain_batch_size_count")
    results: dict[int, str] = {}

    def ask(i):
        stream = server.client.chat.completions.create(
            model="a", stream=True, messages=[user(image_part(data_uri(ckpts.images[0].read_bytes())), questions[i])])
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    expected = reference.answer("a", [Conversation(f"<image>\n{q}", images=[str(ckpts.images[0])]) for q in questions])
    assert [results.get(i) for i in range(8)] == expected
    calls = metric(server.base, "vltrain_batch_size_count") - calls_before
    assert calls < 8, f"8 concurrent requests took {calls} generate calls"


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    cancelled = metric(server.base, "vltrain_cancelled_requests_total")
    body = {"model": "a", "messages": [user("Tell me a very long story.")], "max_tokens": 3000, "stream": True}
    with httpx2.Client(timeout=60) as client:
        with client.stream("POST", server.base + "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                    break  # a first token arrived: leave
    deadline = time.monotonic() + 60
    while metric(server.base, "vltrain_cancelled_requests_total") == cancelled or metric(
            server.base, "vltrain_running_requests") != 0:
        assert time.monotonic() < deadline, "the request kept running after its client left"
        time.sleep(0.2)
    line = [r.getMessage() for r in server.logs.records if "client went away" in r.getMessage()][-1]
    assert int(re.search(r"completion_tokens=(\d+)", line)[1]) < 3000
    # the same without streaming: the client gives up waiting for the JSON reply
    with pytest.raises(httpx2.TimeoutException):
        httpx2.post(server.base + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.5,
                    headers={"Authorization": f"Bearer {KEY}"})
    while metric(server.base, "vltrain_cancelled_requests_total") < cancelled + 2 or metric(
            server.base, "vltrain_running_requests") != 0:
        assert time.monotonic() < deadline + 60, "the request kept running after its client left"
        time.sleep(0.2)
    assert server.client.chat.completions.create(model="a", messages=[user("Still there?")]).choices


def test_adapters_on_the_llm_only_share_generate_calls(ckpts, tmp_path):
    """With LoRA in the language model only, requests for the base and two adapters go in ONE generate call
    (peft's adapter_names), each row answered as its own checkpoint answers alone."""
    from vltrain.infer.session import open_session

    a, b = adapter_pair(tmp_path / "run", ckpts.demo,
                        extra=("sft_type.lora_targets='.*language_model.*(q_proj|v_proj|down_proj)'",))
    running, stop = start_server([f"adapters={{a: {a}, b: {b}}}", "port=0", "batch_wait_ms=1000",
                                  f"max_tokens={MAX_TOKENS}"])
    try:
        assert running.app.state.batcher.served.mixed_batches
        calls = metric(running.base, "vltrain_batch_size_count")
        messages = [user(image_part(data_uri(ckpts.images[0].read_bytes())), "What is it?")]
        replies: dict[str, str] = {}

        def ask(name):
            replies[name] = running.client.chat.completions.create(model=name, messages=messages).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(n,)) for n in ("tiny", "a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert metric(running.base, "vltrain_batch_size_count") - calls == 1
    finally:
        stop()
    conversation = Conversation("<image>\nWhat is it?", images=[str(ckpts.images[0])])
    for name, path in (("a", a), ("b", b)):
        expected = open_session(ckpt_dir=path).engine.generate([conversation], max_new_tokens=MAX_TOKENS,
                                                                do_sample=False)[0]
        assert replies[name] == expected, name
    session = open_session(ckpt_dir=a)
    with session.model.disable_adapter():
        base = session.engine.generate([conversation], max_new_tokens=MAX_TOKENS, do_sample=False)[0]
    assert replies["tiny"] == base and len(set(replies.values())) == 3


# ---------------------------------------------------------------- errors


def post(server, body, key: str | None = KEY, raw: bytes | None = None):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    return httpx2.post(server.base + "/v1/chat/completions", headers=headers, timeout=60,
                       content=raw if raw is not None else json.dumps(body).encode())


def chat(*messages, **fields):
    return {"model": "a", "messages": list(messages), **fields}


def wide_png():
    return png((1400, 200))


ERRORS = [
    # (id, body or raw bytes, key, status, code, param)
    ("no key", chat(user("hi")), None, 401, "invalid_api_key", None),
    ("wrong key", chat(user("hi")), "sk-wrong", 401, "invalid_api_key", None),
    ("unknown model", {"model": "gpt-4o", "messages": [user("hi")]}, KEY, 404, "model_not_found", "model"),
    ("malformed JSON", b'{"model": "a", "messages": [', KEY, 400, "invalid_json", None),
    ("not an object", b"[1, 2]", KEY, 400, None, None),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, KEY, 400, "invalid_json", None),
    ("not UTF-8", b'{"model": "\xff\xfe"}', KEY, 400, "invalid_json", None),
    ("lone surrogate", b'{"model": "a", "messages": [{"role": "user", "content": "hi \\ud800"}]}', KEY, 400, None,
     "messages[0].content"),
    ("grounding placeholder without objects", chat(user("Where is <ref-object>?")), KEY, 400, None, "messages"),
    ("NaN temperature", b'{"model": "a", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', KEY,
     400, None, "temperature"),
    ("no messages", {"model": "a"}, KEY, 400, None, "messages"),
    ("empty messages", chat(), KEY, 400, None, "messages"),
    ("bad temperature", chat(user("hi"), temperature="hot"), KEY, 400, None, "temperature"),
    ("temperature too high", chat(user("hi"), temperature=3), KEY, 400, None, "temperature"),
    ("max_tokens 0", chat(user("hi"), max_tokens=0), KEY, 400, None, "max_tokens"),
    ("n=2", chat(user("hi"), n=2), KEY, 400, "unsupported_parameter", "n"),
    ("seed out of range", chat(user("hi"), seed=2**70), KEY, 400, None, "seed"),
    ("stop not text", chat(user("hi"), stop=[1, 2]), KEY, 400, None, "stop[0]"),
    ("content of the wrong type", chat({"role": "user", "content": 5}), KEY, 400, None, "messages[0].content"),
    ("tools", chat(user("hi"), tools=[{"type": "function", "function": {"name": "f"}}]), KEY, 400,
     "unsupported_parameter", "tools"),
    ("unknown role", chat({"role": "tool", "content": "x"}), KEY, 400, None, "messages[0].role"),
    ("second message not an object", chat(user("hi"), "x"), KEY, 400, None, "messages[1]"),
    ("audio part", chat({"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}),
     KEY, 400, None, "messages[0].content[0]"),
    ("ends with assistant", chat(user("hi"), {"role": "assistant", "content": "yo"}), KEY, 400, None, "messages"),
    ("two users in a row", chat(user("hi"), user("hi")), KEY, 400, None, "messages[1].role"),
    ("image tag in text", chat(user("<image>\nWhat is it?")), KEY, 400, None, "messages[0].content[0].text"),
    ("inline server path", chat(user("<img>/etc/hostname</img> what?")), KEY, 400, None, "messages[0].content[0].text"),
    ("not an image", chat(user(image_part(data_uri(b"hello, I am text, not a picture")))), KEY, 400, "invalid_image",
     "messages[0].content[0].image_url.url"),
    ("bad base64", chat(user(image_part("data:image/png;base64,!!!!"), "x")), KEY, 400, "invalid_image",
     "messages[0].content[0].image_url.url"),
    ("server path", chat(user(image_part("/etc/hostname"))), KEY, 400, "invalid_media_url",
     "messages[0].content[0].image_url.url"),
    ("file URL", chat(user("x", image_part("file:///etc/hostname"))), KEY, 400, "invalid_media_url",
     "messages[0].content[1].image_url.url"),
    ("too many images", chat(user(*[image_part(data_uri(png((8, 8)))) for _ in range(9)])), KEY, 400,
     "too_many_images", "messages"),
    ("too many tiles", chat(user(*[image_part(data_uri(wide_png())) for _ in range(3)])), KEY, 400, "too_many_tiles",
     "messages"),  # 3 images of 2 tiles and a thumbnail each: 9 > max_tiles=8
    ("prompt over the context", chat(user("word " * 5000)), KEY, 400, "context_length_exceeded", "messages"),
    ("max_tokens over the context", chat(user("hi"), max_tokens=5000), KEY, 400, "context_length_exceeded",
     "messages"),
    ("body too large", chat(user(image_part(data_uri(os.urandom(1_600_000))))), KEY, 413, "request_too_large", None),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_errors_are_openai_shaped(server, case):
    _, body, key, status, code, param = case
    response = post(server, None if isinstance(body, bytes) else body, key, raw=body if isinstance(body, bytes) else None)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code or code is None
    assert error["param"] == param or param is None
    assert "base64," not in error["message"] or len(error["message"]) < 300  # no image bytes echoed


@pytest.mark.parametrize("path,code", [("/missing.png", "media_fetch_failed"), ("/big.png", "media_too_large"),
                                       ("/slow.png", "media_fetch_failed"), ("/text.png", "invalid_image")])
def test_url_errors(server, media_server, path, code):
    response = post(server, chat(user("What is it?", image_part(media_server.url(path)))))
    assert response.status_code == 400 and response.json()["error"]["code"] == code, response.text
    assert response.json()["error"]["param"] == "messages[0].content[1].image_url.url"


@pytest.mark.parametrize("url", ["http://", "http://[::1", "https://exa mple.com/x.png", "http://127.0.0.1:0/x.png",
                                 "http://127.0.0.1:99999/x.png", "data:image/png;base64,", "ftp://127.0.0.1/x.png"])
def test_malformed_urls(server, url):
    response = post(server, chat(user(image_part(url))))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages[0].content[0].image_url.url"


def test_a_video_that_is_not_one(server):
    response = post(server, chat(user({"type": "video_url", "video_url": {"url": data_uri(png(), "video/mp4")}})))
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_video", response.text


def test_mutated_requests_never_get_a_500(server, ckpts):
    """Random changes to a valid request (a value of another type, a key dropped or added, at any depth): every
    answer is a 200 or an OpenAI-shaped 4xx."""
    import random

    rng = random.Random(0)
    odd = [None, 0, -1, 2**65, 1.5, float("inf"), "", "x" * 300, [], {}, [1], {"a": 1}, True, "<image>", "\u0000"]
    valid = chat({"role": "system", "content": "Be brief."},
                 user(image_part(data_uri(png((32, 32)))), "What is it?"),
                 {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
                 user("And its colour?"), max_tokens=2, temperature=0.5, top_p=0.9, stop=["x"], seed=1)

    def mutate(node):
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            action = rng.random()
            if action < 0.2:
                return {k: v for k, v in node.items() if k != key}
            if action < 0.3:
                return {**node, rng.choice(["extra", "n", "tools", "logprobs", "stream"]): rng.choice(odd)}
            return {**node, key: mutate(node[key]) if rng.random() < 0.6 else rng.choice(odd)}
        if isinstance(node, list) and node:
            i = rng.randrange(len(node))
            return [*node[:i], mutate(node[i]) if rng.random() < 0.7 else rng.choice(odd), *node[i + 1:]]
        return rng.choice(odd)

    statuses = []
    for _ in range(60):
        body = mutate(mutate(valid))
        if isinstance(body, dict) and body.get("max_tokens", 0) not in (1, 2):
            body["max_tokens"] = 2  # keep the answers short
        response = post(server, None, raw=json.dumps(body).encode())
        statuses.append(response.status_code)
        assert response.status_code in (200, 400, 404, 413), (body, response.text)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert 200 in statuses and 400 in statuses


def test_url_host_not_allowed(server, media_server):
    url = media_server.url("/red.png").replace("127.0.0.1", "localhost")
    response = post(server, chat(user(image_part(url))))
    assert response.status_code == 400 and response.json()["error"]["code"] == "media_host_not_allowed"


def test_openai_client_raises_its_own_error_classes(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=server.base + "/v1", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as e:
        server.client.chat.completions.create(model="nope", messages=[user("hi")])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="a", messages=[user("hi")], n=3)
    assert httpx2.get(server.base + "/nowhere").json()["error"]["code"] == "not_found"


def test_a_client_leaving_while_sending_its_body(server):
    import socket

    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"model\": \"a\"".encode())
        time.sleep(0.3)
    deadline = time.monotonic() + 30
    while not any("client went away while sending" in r.getMessage() for r in server.logs.records):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_still_healthy_after_everything_and_never_a_500_or_traceback(server):
    assert httpx2.get(server.base + "/health").status_code == 200
    assert server.client.chat.completions.create(model="a", messages=[user("hi")]).choices[0].message.content
    metrics = httpx2.get(server.base + "/metrics").text
    assert not re.search(r'status="5\d\d"', metrics)
    for record in server.logs.records:
        assert record.exc_info is None and "Traceback" not in record.getMessage(), record.getMessage()
    request_lines = [r.getMessage() for r in server.logs.records if r.getMessage().startswith("POST /v1/chat")]
    assert request_lines and all(len(line) < 1000 for line in request_lines)  # one line each, no image bytes


# ---------------------------------------------------------------- the command, the queue limit, shutdown


@pytest.mark.slow
def test_command_queue_limit_and_graceful_shutdown(ckpts, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "vltrain.serve", f"ckpt_dir={ckpts.a}", "port=0", "max_queue=1", "max_tokens=30",
         "served_model_name=mine"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    port: list[int] = []
    started = threading.Event()

    def read():
        for line in process.stdout:
            output.append(line)
            if match := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                port.append(int(match[1]))
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not started.wait(0.5):
            assert process.poll() is None and time.monotonic() < deadline, "".join(output)
        client = openai.OpenAI(api_key="none", base_url=f"http://127.0.0.1:{port[0]}/v1", max_retries=0)
        first_token = threading.Event()
        chunks = []

        def long_stream():
            for c in client.chat.completions.create(model="mine", messages=[user("Tell me a story.")], stream=True):
                chunks.append(c)
                if c.choices and c.choices[0].delta.content:
                    first_token.set()

        streamer = threading.Thread(target=long_stream)
        streamer.start()
        assert first_token.wait(120)
        with pytest.raises(openai.RateLimitError) as e:  # max_queue=1: the running stream fills it
            client.chat.completions.create(model="mine", messages=[user("me too")])
        assert e.value.body["code"] == "queue_full"
        process.send_signal(signal.SIGTERM)
        streamer.join(timeout=120)
        # uvicorn re-raises the signal once it has shut down, so the exit status is SIGTERM's
        assert process.wait(timeout=120) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    log = "".join(output)
    assert chunks[-1].choices[0].finish_reason == "length", log  # the running request finished
    assert "Traceback" not in log and "status=429" in log and "status=200" in log, log
    assert "Application shutdown complete" in log, log


def test_configuration_errors(ckpts, tmp_path, capsys):
    from vltrain.cli.serve import main
    from vltrain.serve.models import load_served

    assert main(["max_queue=0"]) == 2 and "max_queue must be >= 1" in capsys.readouterr().err
    assert main([f"ckpt_dir={ckpts.a}", f"adapters={{x: {ckpts.b}}}"]) == 2
    assert main(["max_batch_sise=4"]) == 2 and "max_batch_size" in capsys.readouterr().err  # the closest key
    other = tmp_path / "other"
    shutil.copytree(ckpts.b, other)
    saved = (other / "vltrain.yaml").read_text(encoding="utf-8")
    (other / "vltrain.yaml").write_text(saved.replace(str(ckpts.base), str(tmp_path / "another_base")),
                                        encoding="utf-8")
    cfg, options = compose_command([f"adapters={{a: {ckpts.a}, o: {other}}}"], "serve", ServeOptions,
                                   run_dir="outputs/serve")
    from vltrain.config import ConfigError

    with pytest.raises(ConfigError, match="adapters.o: trained on base .* share one base"):
        load_served(cfg, options)
    cfg, options = compose_command([f"adapters={{tiny: {ckpts.a}}}"], "serve", ServeOptions, run_dir="outputs/serve")
    with pytest.raises(ConfigError, match="adapters.tiny: .* base model's served name 'tiny' .model.name"):
        load_served(cfg, options)  # the base would be shadowed
    cfg, options = compose_command([f"adapters={{a: {ckpts.root}}}"], "serve", ServeOptions, run_dir="outputs/serve")
    with pytest.raises(ConfigError, match="adapters.a=.*: not a vltrain LoRA checkpoint"):
        load_served(cfg, options)


def test_local_media_only_when_allowed(tmp_path):
    import asyncio

    from vltrain.serve.media import host_allowed, resolve
    from vltrain.serve.schemas import APIError

    image = tmp_path / "red.png"
    image.write_bytes(png())
    parts = [("image", str(image), "p0"), ("image", image.as_uri(), "p1")]
    allowed = asyncio.run(resolve(parts, ServeOptions(allow_local_media=True), client=None))
    assert allowed.images == [str(image), str(image)]
    with pytest.raises(APIError, match="p0: .*allow_local_media=true"):
        asyncio.run(resolve(parts, ServeOptions(), client=None))
    with pytest.raises(APIError, match="no such file"):
        asyncio.run(resolve([("image", "relative.png", "p")], ServeOptions(allow_local_media=True), client=None))
    assert host_allowed("https://img.example.com/a.png", ["*.example.com"])
    assert not host_allowed("https://example.com.evil.org/a.png", ["*.example.com", "example.com"])
    assert host_allowed("http://anything/", [])
