"""Request and response shapes of the chat completions API, and OpenAI's error body.

Requests are validated into the models below (the subset of OpenAI's `CompletionCreateParams` the server does:
text, `image_url` and `video_url` parts, sampling, stop, seed, `n=1`, streaming with usage); a parameter it does
not do is refused by name rather than ignored. Responses are the `openai` package's own types
(`ChatCompletion`, `ChatCompletionChunk`, `CompletionUsage`, `Model`), so the official client reads them unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from openai.types import CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.completion_usage import PromptTokensDetails
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Parameters the client may send that change nothing here (at these values, for the penalties).
_HARMLESS = {"user": None, "metadata": None, "store": None, "service_tier": None, "parallel_tool_calls": None,
             "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False}


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    """Not in OpenAI's API; the `video_url` part vLLM and others take."""

    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The body of POST /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @property
    def stop_words(self) -> list[str]:
        words = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [w for w in words if w]

    @property
    def reply_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse_request(data) -> ChatRequest:
    """A `ChatRequest` from decoded JSON; every problem is a 400 naming the parameter."""
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as e:
        error = max(e.errors(), key=lambda err: len(err["loc"]))  # of a union's branches, the one that got furthest
        param = ""
        for part in error["loc"]:
            if isinstance(part, int):
                param += f"[{part}]"
            elif part == "str" or "[" in part:
                continue  # pydantic's name of a union branch, not a field
            else:
                param += f".{part}" if param else part
        raise bad_request(f"{param}: {error['msg']}", param=param) from None
    for key, value in (request.model_extra or {}).items():
        if key not in _HARMLESS or (_HARMLESS[key] is not None and value not in (None, _HARMLESS[key])):
            raise bad_request(f"{key}: not supported by this server", param=key, code="unsupported_parameter")
    if request.n not in (None, 1):
        raise bad_request("n: only n=1 is supported", param="n", code="unsupported_parameter")
    if len(request.stop_words) > 4:
        raise bad_request("stop: at most 4 stop sequences", param="stop")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options: only with stream=true", param="stream_options")
    return request


def text_of(message: Message, index: int) -> str:
    """The text of a message that may hold no media (system, assistant)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for k, part in enumerate(message.content):
        if not isinstance(part, TextPart):
            raise bad_request(f"messages[{index}].content[{k}]: a {message.role} message takes text only",
                              param=f"messages[{index}].content[{k}]")
        texts.append(part.text)
    return "".join(texts)


def split_turns(messages: list[Message]) -> tuple[str | None, list[tuple[int, int | None]]]:
    """(system text, [(user message index, assistant message index or None)]): the conversation's rounds, the
    last of which has no assistant reply yet. One leading system (or developer) message at most; user and
    assistant messages alternate and the last is a user message."""
    system = None
    start = 0
    if messages[0].role in ("system", "developer"):
        system = text_of(messages[0], 0)
        start = 1
    rounds: list[tuple[int, int | None]] = []
    expected = "user"
    for i in range(start, len(messages)):
        role = messages[i].role
        if role in ("system", "developer"):
            raise bad_request(f"messages[{i}]: a system message may only come first", param=f"messages[{i}].role")
        if role != expected:
            article = "an" if expected == "assistant" else "a"
            raise bad_request(f"messages[{i}]: expected {article} {expected} message (user and assistant "
                              "messages alternate, starting with user)", param=f"messages[{i}].role")
        if role == "user":
            rounds.append((i, None))
        else:
            rounds[-1] = (rounds[-1][0], i)
        expected = "assistant" if role == "user" else "user"
    if not rounds or rounds[-1][1] is not None:
        raise bad_request("messages: the last message must be a user message", param="messages")
    return system, rounds


# ---- responses ----------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, image_tokens: int, completion_tokens: int) -> CompletionUsage:
    """Prompt tokens count the image context tokens (`prompt_tokens_details.image_tokens`)."""
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens,
                           prompt_tokens_details=PromptTokensDetails(image_tokens=image_tokens,
                                                                     text_tokens=prompt_tokens - image_tokens))


def completion(id: str, model: str, text: str, finish_reason: str, use: CompletionUsage) -> ChatCompletion:
    return ChatCompletion(id=id, object="chat.completion", created=int(time.time()), model=model, usage=use,
                          choices=[Choice(index=0, finish_reason=finish_reason, logprobs=None,
                                          message=ChatCompletionMessage(role="assistant", content=text))])


def chunk(id: str, model: str, created: int, delta: ChoiceDelta | None = None, finish_reason: str | None = None,
          use: CompletionUsage | None = None) -> ChatCompletionChunk:
    """One SSE chunk: a delta (with `finish_reason` on the last), or the final usage chunk (`choices=[]`)."""
    choices = [] if delta is None else [ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)]
    return ChatCompletionChunk(id=id, object="chat.completion.chunk", created=created, model=model, choices=choices,
                               usage=use)


def model_card(name: str, created: int) -> Model:
    return Model(id=name, object="model", created=created, owned_by="vltrain")
