"""The HTTP side of the server: routes, authentication, limits, OpenAI-shaped errors, one log line per request.

Routes: POST /v1/chat/completions (JSON, or server-sent events with `stream=true`), GET /v1/models, GET /health,
GET /metrics (Prometheus). Every error is `{"error": {"message", "type", "param", "code"}}` with its status: 400
bad input (malformed JSON or fields, an unreadable image, too many images or tiles, a prompt longer than the
context), 401 a missing or wrong key, 404 an unknown model or route, 413 a body over `max_body_bytes`, 429 a full
queue, 503 while shutting down. A request's log line names its model, status, token counts and latency, never its
media.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from vltrain.data.media import MediaError
from vltrain.data.records import IMAGE_TAG, VIDEO_TAG, RecordError
from vltrain.infer.engine import Conversation
from vltrain.model.tokenizer import IMAGE_CONTEXT_TOKEN
from vltrain.serve import media, schemas
from vltrain.serve.batcher import Batcher, Job
from vltrain.serve.metrics import Metrics
from vltrain.serve.models import ServedModels
from vltrain.serve.options import ServeOptions
from vltrain.serve.schemas import APIError, ImagePart, TextPart, VideoPart, bad_request

log = logging.getLogger("vltrain.serve")
CHAT = "/v1/chat/completions"
# Text that would be read as media or as image positions: media come only in image_url / video_url parts.
_RESERVED = (IMAGE_TAG, VIDEO_TAG, "<img>", "</img>", IMAGE_CONTEXT_TOKEN)


class EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client goes away (whatever ASGI version the server speaks):
    the body's generator is cancelled, and its `finally` cancels the job."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as group:
            async def stream():
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke while writing
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def create_app(served: ServedModels, options: ServeOptions) -> FastAPI:
    metrics = Metrics()
    batcher = Batcher(served, options.max_batch_size, options.max_queue, options.batch_wait_ms, metrics)
    engine = served.engine
    context_id = engine.tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import httpx2

        app.state.http = httpx2.AsyncClient(timeout=options.media_timeout, headers={"User-Agent": "vltrain"})
        batcher.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(batcher.close)
            await app.state.http.aclose()

    app = FastAPI(title="vltrain", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.metrics = metrics

    def error_response(error: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        metrics.requests.labels(request.url.path if error.status != 404 else "other", str(error.status)).inc()
        log.info("%s %s status=%d error=%r", request.method, request.url.path, error.status, error.message)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = f"{request.method} {request.url.path}: {error.detail}"
        return await api_error(request, APIError(error.status_code, message, "invalid_request_error", None, code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):  # a fault of the server, logged with its traceback
        log.exception("%s %s: %s", request.method, request.url.path, type(error).__name__, exc_info=error)
        metrics.requests.labels(request.url.path, "500").inc()
        return error_response(APIError(500, f"internal error ({type(error).__name__})", "server_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return await api_error(request, bad_request(str(error.errors()[0].get("msg", error))))

    def check_key(request: Request) -> None:
        if options.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), options.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)", "invalid_request_error",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if batcher.closing or not batcher.thread.is_alive():
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        metrics.requests.labels("/v1/models", "200").inc()
        cards = [schemas.model_card(name, served.created).model_dump() for name in served.names]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        check_key(request)
        if name not in served.names:
            raise _unknown_model(name, served)
        return schemas.model_card(name, served.created).model_dump()

    @app.post(CHAT)
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        check_key(request)
        chat = schemas.parse_request(_json(await _body(request, options.max_body_bytes)))
        if chat.model not in served.names:
            raise _unknown_model(chat.model, served)
        batcher.check_room()
        conversation, parts = _conversation(chat, served.takes_video)
        if len(parts) > options.max_images:
            raise bad_request(f"messages: {len(parts)} images and videos, more than this server takes "
                              f"(max_images={options.max_images})", param="messages", code="too_many_images")
        fetched = await media.resolve(parts, options, request.app.state.http)
        try:
            conversation.images, conversation.videos = fetched.images, fetched.videos
            sample = await anyio.to_thread.run_sync(engine.encode, conversation)
        except (RecordError, MediaError) as e:
            raise _media_error(e, parts) from None
        finally:
            fetched.cleanup()
        prompt_tokens = len(sample.input_ids)
        image_tokens = int((sample.input_ids == context_id).sum())
        tiles = sum(sample.tiles_per_image)
        if tiles > options.max_tiles:
            raise bad_request(f"messages: the images make {tiles} tiles of {engine.encoder.tile_size} px, more than "
                              f"max_tiles={options.max_tiles}", param="messages", code="too_many_tiles")
        room = served.context_length - prompt_tokens
        limit = chat.reply_limit
        if room < 1 or (limit is not None and limit > room):
            asked = f" + max_tokens {limit}" if limit is not None else ""
            raise bad_request(f"the prompt has {prompt_tokens} tokens ({image_tokens} of them image tokens){asked}, "
                              f"more than the model's context of {served.context_length} tokens",
                              param="messages", code="context_length_exceeded")
        job = Job(sample=sample, model=chat.model, max_tokens=limit or min(options.max_tokens, room),
                  stop_words=chat.stop_words, sampling=_sampling(chat), seed=chat.seed, stream=bool(chat.stream),
                  loop=asyncio.get_running_loop())
        batcher.submit(job)
        record = _Record(request, chat, job, prompt_tokens, image_tokens, len(parts), arrived, metrics)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return EventStream(_events(job, record, batcher, include_usage),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(request, job, record, batcher)

    return app


def _unknown_model(name: str, served: ServedModels) -> APIError:
    return APIError(404, f"model {name!r} does not exist; this server has {', '.join(served.names)}",
                    "invalid_request_error", "model", "model_not_found")


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` (from Content-Length, or while reading)."""
    too_large = APIError(413, f"the request body is larger than this server takes ({limit} bytes, max_body_bytes)",
                         "invalid_request_error", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise APIError(400, "the client went away while sending the request", code="client_disconnected") from None
    return bytes(body)


def _json(body: bytes):
    try:
        return json.loads(body)
    except ValueError as e:
        raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the body's JSON is nested too deeply", code="invalid_json") from None


def _check_text(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): no tokenizer takes it
        raise bad_request(f"{param}: not valid Unicode text ({e.reason} at character {e.start})", param=param) from None
    for tag in _RESERVED:
        if tag in text:
            raise bad_request(f"{param}: {tag} in the text; images and videos go in image_url / video_url parts",
                              param=param)
    return text


def _conversation(chat: schemas.ChatRequest, takes_video: bool) -> tuple[Conversation, list[tuple[str, str, str]]]:
    """The conversation of the messages (media left for `media.resolve`) and its media parts as (kind, url,
    param), in order. A user message's parts are joined by newlines, each image part becoming `<image>`."""
    messages = chat.messages
    system, rounds = schemas.split_turns(messages)
    if system is not None:
        _check_text(system, "messages[0].content")
    parts: list[tuple[str, str, str]] = []
    turns = []
    for user, assistant in rounds:
        turns.append((_user_text(messages[user], user, parts, takes_video),
                      None if assistant is None else
                      _check_text(schemas.text_of(messages[assistant], assistant), f"messages[{assistant}].content")))
    history = [(q, a) for q, a in turns[:-1]]
    return Conversation(query=turns[-1][0], history=history, system=system), parts


def _user_text(message: schemas.Message, index: int, parts: list, takes_video: bool) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return _check_text(content or "", f"messages[{index}].content")
    pieces = []
    for k, part in enumerate(content):
        param = f"messages[{index}].content[{k}]"
        if isinstance(part, TextPart):
            pieces.append(_check_text(part.text, param + ".text"))
        elif isinstance(part, ImagePart):
            pieces.append(IMAGE_TAG)
            parts.append(("image", part.image_url.url, param + ".image_url.url"))
        elif isinstance(part, VideoPart):
            if not takes_video:
                raise bad_request(f"{param}: this model takes no video (a V1.5 model type)", param=param)
            pieces.append(VIDEO_TAG)
            parts.append(("video", part.video_url.url, param + ".video_url.url"))
    return "\n".join(pieces)


def _media_error(error: Exception, parts: list[tuple[str, str, str]]) -> APIError:
    """An encoding error as a 400 naming the message part: `images[i]` / `videos[i]` of the record is the i-th
    image / video part."""
    if not isinstance(error, RecordError):
        return bad_request(str(error))
    field, message = error.field, error.message
    for kind in ("image", "video"):
        if field.startswith(f"{kind}s["):
            i = int(field[len(kind) + 2:].split("]")[0])
            of_kind = [p for p in parts if p[0] == kind]
            if i < len(of_kind):
                message = message.split(": ", 1)[-1] if message.startswith("data:") else message
                return bad_request(f"{of_kind[i][2]}: {message}", param=of_kind[i][2], code=f"invalid_{kind}")
    return bad_request(f"messages: {field}: {message}", param="messages")


GREEDY_BELOW = 1e-5
"""A temperature under this is greedy decoding (dividing logits by it would overflow)."""


def _sampling(chat: schemas.ChatRequest) -> dict:
    """Neither temperature nor top_p: the model's generation config (greedy for vltrain's models); temperature 0:
    greedy; otherwise sampling, an absent one of the two at its OpenAI default (1)."""
    if chat.temperature is None and chat.top_p is None:
        return {}
    if chat.temperature is None:
        return {"do_sample": True, "temperature": 1.0, "top_p": chat.top_p}
    if chat.temperature < GREEDY_BELOW:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": chat.temperature, "top_p": chat.top_p or 1.0}


class _Record:
    """The accounting of one chat request: metrics and its log line, written once at its end."""

    def __init__(self, request, chat, job, prompt_tokens, image_tokens, media, arrived, metrics):
        self.method, self.path = request.method, request.url.path
        self.chat, self.job, self.metrics = chat, job, metrics
        self.prompt_tokens, self.image_tokens, self.media, self.arrived = prompt_tokens, image_tokens, media, arrived
        self.done = False

    def finish(self, status: int, finish_reason: str | None, completion_tokens: int, note: str = "") -> None:
        if self.done:
            return
        self.done = True
        m, model = self.metrics, self.chat.model
        m.requests.labels(CHAT, str(status)).inc()
        m.prompt_tokens.labels(model).inc(self.prompt_tokens)
        m.image_tokens.labels(model).inc(self.image_tokens)
        m.generation_tokens.labels(model).inc(completion_tokens)
        latency = time.monotonic() - self.arrived
        m.latency.observe(latency)
        if finish_reason == "cancelled":
            m.cancelled.inc()
        log.info("%s %s status=%d model=%s stream=%s media=%d prompt_tokens=%d (image %d) completion_tokens=%d "
                 "finish=%s latency=%.3fs%s", self.method, self.path, status, model, bool(self.chat.stream),
                 self.media, self.prompt_tokens, self.image_tokens, completion_tokens, finish_reason, latency, note)

    def usage(self, completion_tokens: int):
        return schemas.usage(self.prompt_tokens, self.image_tokens, completion_tokens)


async def _complete(request: Request, job: Job, record: _Record, batcher: Batcher) -> Response:
    """The JSON reply; a client that leaves while it waits cancels its job (polled twice a second)."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                break
            except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                if await request.is_disconnected():
                    batcher.cancel(job)
                    record.finish(499, "cancelled", len(job.ids), " (client went away)")
                    return Response(status_code=499)
    except asyncio.CancelledError:
        batcher.cancel(job)
        record.finish(499, "cancelled", len(job.ids), " (client went away)")
        raise
    if event[0] == "error":
        record.finish(event[1].status, None, 0, f" error={event[1].message!r}")
        return JSONResponse(event[1].body(), status_code=event[1].status)
    _, reply, reason, tokens = event
    record.finish(200, reason, tokens)
    body = schemas.completion(schemas.completion_id(), record.chat.model, reply, reason, record.usage(tokens))
    return JSONResponse(body.model_dump(exclude_none=True))


async def _events(job: Job, record: _Record, batcher: Batcher, include_usage: bool):
    """SSE lines: a first chunk with the role, content deltas, a last chunk with `finish_reason`, the usage chunk
    when asked for, then `[DONE]`."""
    id, created, model = schemas.completion_id(), int(time.time()), record.chat.model

    def line(chunk) -> str:
        return f"data: {json.dumps(chunk.model_dump(exclude_none=True), ensure_ascii=False)}\n\n"

    try:
        yield line(schemas.chunk(id, model, created, ChoiceDelta(role="assistant", content="")))
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                yield line(schemas.chunk(id, model, created, ChoiceDelta(content=event[1])))
                continue
            if event[0] == "error":
                record.finish(event[1].status, None, len(job.ids), f" error={event[1].message!r}")
                yield f"data: {json.dumps(event[1].body())}\n\n"
                return
            _, _, reason, tokens = event
            yield line(schemas.chunk(id, model, created, ChoiceDelta(), finish_reason=reason))
            if include_usage:
                yield line(schemas.chunk(id, model, created, use=record.usage(tokens)))
            yield "data: [DONE]\n\n"
            record.finish(200, reason, tokens)
            return
    finally:
        if not record.done:  # cancelled: the client went away mid-stream
            batcher.cancel(job)
            record.finish(499, "cancelled", len(job.ids), " (client went away)")
