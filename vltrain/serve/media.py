"""Media of a request: `image_url` / `video_url` parts -> references the encoder reads, within the server's limits.

  data:image/...;base64,...   passed on as it is (the encoder decodes and checks it: an image that is not one
                              is a 400 there)
  http(s) URL                 fetched here: a host allow-list (`media_allowed_hosts`, checked again on every
                              redirect, at most 5), `media_timeout` for the whole fetch, at most `media_max_bytes`
                              (Content-Length and the bytes read); images become data URIs, videos temporary files
  file:// URL or a path       only with `allow_local_media=true` (else 400: clients never read the server's disk)
  data:video/...;base64,...   written to a temporary file (video readers take files)

Every refusal is an `APIError` 400 naming the part (`messages[i].content[k]`).
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass, field

from vltrain.data.media import MediaError, decode_base64, describe, is_data_uri, is_url
from vltrain.serve.options import ServeOptions
from vltrain.serve.schemas import APIError, bad_request

MAX_REDIRECTS = 5


@dataclass
class Fetched:
    """What a request's media became: references for `Conversation.images` / `.videos`, and the temporary files
    to remove once the request is encoded."""

    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        for path in self.temporary:
            try:
                os.unlink(path)
            except OSError:
                pass


def host_allowed(url: str, allowed: list[str]) -> bool:
    if not allowed:
        return True
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    return any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in allowed)


async def fetch(url: str, param: str, options: ServeOptions, client) -> bytes:
    """The body of `url` within the limits (timeout for the whole fetch, size cap, allowed hosts)."""
    try:
        return await asyncio.wait_for(_fetch(url, param, options, client), timeout=options.media_timeout)
    except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
        raise bad_request(f"{param}: {describe(url)}: not fetched within media_timeout={options.media_timeout} s",
                          param=param, code="media_fetch_failed") from None


def _check_url(url: str, param: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError as e:
        raise bad_request(f"{param}: {describe(url)}: not a valid URL ({e})", param=param,
                          code="invalid_media_url") from None
    if not parts.hostname or any(c.isspace() for c in url):
        raise bad_request(f"{param}: {describe(url)}: not a valid URL", param=param, code="invalid_media_url")


async def _fetch(url: str, param: str, options: ServeOptions, client) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        _check_url(url, param)
        if not host_allowed(url, options.media_allowed_hosts):
            raise bad_request(f"{param}: {describe(url)}: host not in media_allowed_hosts", param=param,
                              code="media_host_not_allowed")
        try:
            async with client.stream("GET", url, follow_redirects=False) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urllib.parse.urljoin(url, response.headers["location"])
                    if not is_url(url):
                        raise bad_request(f"{param}: redirected to a non-http URL", param=param)
                    continue
                if response.status_code >= 400:
                    raise bad_request(f"{param}: {describe(url)}: HTTP {response.status_code}", param=param,
                                      code="media_fetch_failed")
                length = response.headers.get("content-length", "")
                if length.isdigit() and int(length) > options.media_max_bytes:
                    raise bad_request(f"{param}: {describe(url)}: {length} bytes, more than media_max_bytes="
                                      f"{options.media_max_bytes}", param=param, code="media_too_large")
                body = bytearray()
                async for piece in response.aiter_bytes():
                    body += piece
                    if len(body) > options.media_max_bytes:
                        raise bad_request(f"{param}: {describe(url)}: more than media_max_bytes="
                                          f"{options.media_max_bytes} bytes", param=param, code="media_too_large")
                return bytes(body)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a URL makes the HTTP client raise is the URL's fault
            raise bad_request(f"{param}: {describe(url)}: {type(e).__name__}: {e}", param=param,
                              code="media_fetch_failed") from None
    raise bad_request(f"{param}: more than {MAX_REDIRECTS} redirects", param=param, code="media_fetch_failed")


def _local_path(url: str, param: str, options: ServeOptions) -> str:
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
    if scheme and scheme[1].lower() != "file":
        raise bad_request(f"{param}: {describe(url)}: only http(s) URLs and data: URIs are read", param=param,
                          code="invalid_media_url")
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme else url
    if not options.allow_local_media:
        raise bad_request(f"{param}: {describe(url)}: only http(s) URLs and data: URIs are read "
                          "(server-side files need allow_local_media=true)", param=param, code="invalid_media_url")
    if not os.path.isabs(path) or not os.path.isfile(path):
        raise bad_request(f"{param}: {describe(url)}: no such file on the server (an absolute path)", param=param)
    return path


def _temporary(body: bytes) -> str:
    handle, path = tempfile.mkstemp(prefix="vltrain-serve-", suffix=".video")
    with os.fdopen(handle, "wb") as f:
        f.write(body)
    return path


async def resolve(parts: list[tuple[str, str, str]], options: ServeOptions, client) -> Fetched:
    """`parts`: (kind "image" / "video", url, param) in conversation order -> a `Fetched` (URLs fetched
    concurrently)."""
    fetched = Fetched()

    async def one(kind: str, url: str, param: str) -> tuple[str, str]:
        if is_url(url):
            body = await fetch(url, param, options, client)
            if kind == "image":
                return kind, "data:image/fetched;base64," + base64.b64encode(body).decode("ascii")
            path = _temporary(body)
            fetched.temporary.append(path)
            return kind, path
        if is_data_uri(url):
            if kind == "image":
                return kind, url
            if not url[5:].lower().startswith("video/"):
                raise bad_request(f"{param}: {describe(url)}: a video data URI is data:video/<type>;base64,...",
                                  param=param)
            try:
                body = decode_base64("data:image/" + url[len("data:video/"):])  # the same base64 rules
            except MediaError as e:
                raise bad_request(f"{param}: {e}", param=param) from None
            path = _temporary(body)
            fetched.temporary.append(path)
            return kind, path
        return kind, _local_path(url, param, options)

    try:
        results = await asyncio.gather(*(one(*p) for p in parts), return_exceptions=True)
    except BaseException:  # cancelled (the client went away)
        fetched.cleanup()
        raise
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:  # every fetch has ended, so every temporary file is listed
        fetched.cleanup()
        raise failures[0]
    for kind, ref in results:
        (fetched.images if kind == "image" else fetched.videos).append(ref)
    return fetched
