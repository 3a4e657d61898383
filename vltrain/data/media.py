"""Media: image and video references of a record read into PIL images.

A reference (`ref`) is a string of one of three kinds (`media_kind`):
  path    a local file, absolute (records resolve paths relative to their data file before this module sees them)
  url     `http://` or `https://`; fetched once into an on-disk cache, then read from there
  base64  `data:image/<type>;base64,<data>` or the raw base64 of the file's bytes (images only)

Images come back as RGB, fully decoded (a truncated or corrupt file fails here, not later in a worker's tiling),
with the file closed. The conversion is the official InternVL one, `Image.open(f).convert("RGB")`, so that
training sees what the published models saw:
  - the file's content decides its format, never its extension (a PNG named `.jpg` reads as the PNG it is);
  - EXIF orientation is NOT applied (the stored pixel grid is used, as the official `load_image` does);
  - CMYK, grey, palette and YCbCr images go through PIL's RGB conversion; an alpha channel (RGBA, LA, PA, a
    palette's transparency) is dropped, not composited: transparent pixels keep their stored colour;
  - an animated GIF / WebP / PNG gives its first frame;
  - refused: a zero-byte file; 16- and 32-bit single-channel images (modes I;16, I, F: PIL's RGB conversion
    clips them to white, so they must be converted to 8 bits first); any image wider x higher than
    `max_image_pixels` (decompression bombs), refused from the header, before a pixel is decoded.
Videos give `num_frames` RGB frames, the middle frame of each of `num_frames` equal segments (see
`frame_indices`), read with decord when it is installed and PyAV otherwise; a video whose frames exceed
`max_image_pixels` or that has more than `max_video_frames` frames is refused.

URL fetching (huggingface_hub's `http_stream_backoff` over httpx2): `timeout` seconds for the connection and for
each read, and for the whole body; at most `max_bytes` bytes (checked against Content-Length and while
streaming); `retries` extra attempts after a timeout, a failed connection, HTTP 408/429 or 5xx, waiting
`backoff`, 2 x `backoff`, ... seconds between attempts. Other HTTP errors (404, 403, ...), an oversized body and a
body that breaks off fail at once; with `HF_HUB_OFFLINE` set nothing is fetched (cached copies are still read).
A fetched file is stored under `cache_dir` as the SHA-256 of its URL (written atomically, so a reader never sees
half a file); a cached file that turns out not to decode is removed so the next attempt fetches again (likewise a
fetched video that no reader can open).

Every problem is a `MediaError` naming the reference and what went wrong; callers add `file:line: field:`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import struct
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vltrain.config import DataConfig
from vltrain.files import write_atomic

DEFAULT_CACHE = Path("~/.cache/vltrain/media")
_CHUNK = 1 << 16
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_DATA_URI = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)
# What PIL's decoders raise on a bad file (the plugins are not consistent).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error)
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}$")
# First bytes of the image formats PIL reads that appear in datasets; used only to tell base64 from a path.
_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00")
# Modes whose RGB conversion clips the values to 0..255 (a 16-bit grey 40000 becomes white).
_WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S")
_RETRY_STATUS = (408, 429, *range(500, 600))


class MediaError(ValueError):
    """An image or video that cannot be read; the message names the reference."""


@dataclass
class MediaOptions:
    """How media are fetched, cached and bounded. `MediaOptions.from_config(cfg.data)` builds it from `DataConfig`."""

    cache_dir: Path | None = None
    """Folder of fetched URLs; None: ~/.cache/vltrain/media."""
    timeout: float = DataConfig.url_timeout
    """Seconds for the connection, for each read and for the whole body of a URL."""
    retries: int = DataConfig.url_retries
    """Extra attempts after a transient failure (timeout, failed connection, HTTP 408/429/5xx)."""
    max_bytes: int = DataConfig.url_max_bytes
    """Largest body a URL may return."""
    backoff: float = 0.5
    """Seconds before the first retry; doubled before each later one."""
    max_image_pixels: int = DataConfig.max_image_pixels
    """Largest image or video frame (width x height) read."""
    max_video_frames: int = DataConfig.max_video_frames
    """Longest video (frames) read."""

    @classmethod
    def from_config(cls, data: DataConfig) -> MediaOptions:
        """From a `DataConfig` (`media_cache`, `url_timeout`, `url_retries`, `url_max_bytes`, `max_image_pixels`,
        `max_video_frames`)."""
        return cls(
            cache_dir=Path(data.media_cache).expanduser() if data.media_cache else None,
            timeout=data.url_timeout,
            retries=data.url_retries,
            max_bytes=data.url_max_bytes,
            max_image_pixels=data.max_image_pixels,
            max_video_frames=data.max_video_frames,
        )


# ---------------------------------------------------------------- references


def describe(ref: str) -> str:
    """A reference short enough for an error message (base64 data is cut)."""
    return ref if len(ref) <= 100 else f"{ref[:48]}... ({len(ref)} characters)"


def is_url(ref: str) -> bool:
    return ref[:8].lower().startswith(("http://", "https://"))


def is_data_uri(ref: str) -> bool:
    return ref[:5].lower() == "data:"


def looks_like_base64_image(ref: str) -> bool:
    """Raw base64 whose first bytes are those of a common image format (so a path never passes for it)."""
    text = "".join(ref.split())
    if len(text) < 24 or len(text) % 4 or not _BASE64.fullmatch(text):
        return False
    head = base64.b64decode(text[:24])
    return head.startswith(_IMAGE_SIGNATURES)


def media_kind(ref: str) -> str:
    """"url", "base64" or "path". A string that is an existing file is a path even if it could be base64."""
    if is_url(ref):
        return "url"
    if is_data_uri(ref):
        return "base64"
    if len(ref) < 4096 and os.path.isfile(ref):
        return "path"
    return "base64" if looks_like_base64_image(ref) else "path"


def decode_base64(ref: str) -> bytes:
    """The bytes of a `data:image/...;base64,` URI or of raw base64 (whitespace ignored)."""
    payload = ref
    if is_data_uri(ref):
        match = _DATA_URI.match(ref)
        params = match["params"].lower().split(";") if match else []
        if not match or "base64" not in params or not match["type"].lower().startswith("image/"):
            raise MediaError(f"{describe(ref)}: only base64 image data URIs are read (data:image/<type>;base64,...)")
        payload = ref[match.end():]
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{describe(ref)}: invalid base64 ({e})") from None


# ---------------------------------------------------------------- URLs


class _Permanent(Exception):
    """A fetch failure that another attempt would not fix."""


def cache_path(url: str, options: MediaOptions | None = None) -> Path:
    """Where `url` is (or will be) cached: `<cache_dir>/<sha256 of the URL><suffix of its path>`."""
    options = options or MediaOptions()
    folder = Path(options.cache_dir) if options.cache_dir else DEFAULT_CACHE.expanduser()
    suffix = _SUFFIX.search(urllib.parse.urlsplit(url).path)
    return folder / (hashlib.sha256(url.encode("utf-8")).hexdigest() + (suffix[0].lower() if suffix else ""))


def fetch_url(url: str, options: MediaOptions | None = None) -> Path:
    """The cached copy of `url`, fetched first when it is not cached yet."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    options = options or MediaOptions()
    target = cache_path(url, options)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    attempts = max(0, options.retries) + 1
    after = f" (after {attempts} attempt{'s' if attempts > 1 else ''})"
    try:
        body = _download(url, options)
    except _Permanent as e:
        raise MediaError(f"{url}: {e}") from None
    except OfflineModeIsEnabled:  # huggingface_hub's HTTP session makes no request at all in offline mode
        raise MediaError(f"{url}: not in the media cache ({target.parent}), and HF_HUB_OFFLINE is set, which "
                         "stops every download; unset it, or fetch the file where there is a network") from None
    except HfHubHTTPError as e:  # a retried status (408, 429, 5xx), still failing after the last attempt
        response = e.response
        raise MediaError(f"{url}: HTTP {response.status_code} {response.reason_phrase}{after}") from None
    except httpx2.TimeoutException as e:
        raise MediaError(f"{url}: timed out ({type(e).__name__}){after}") from None
    except (httpx2.HTTPError, httpx2.InvalidURL, OSError) as e:
        raise MediaError(f"{url}: {type(e).__name__}: {e}{after}") from None
    write_atomic(target, body)
    return target


def _download(url: str, options: MediaOptions) -> bytes:
    """The body of `url`. Connection failures and retried statuses are retried by `http_stream_backoff`; failures
    while reading the body are `_Permanent` (raising the transport's own errors there would restart the request
    inside the library's generator)."""
    import httpx2
    from huggingface_hub.utils import http_stream_backoff

    with http_stream_backoff("GET", url, max_retries=max(0, options.retries), base_wait_time=options.backoff,
                             max_wait_time=options.backoff * 2 ** max(0, options.retries),  # never caps
                             retry_on_status_codes=_RETRY_STATUS, timeout=options.timeout,
                             headers={"User-Agent": "vltrain"}) as response:
        if response.status_code >= 400:
            raise _Permanent(f"HTTP {response.status_code} {response.reason_phrase}")
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > options.max_bytes:
            raise _Permanent(f"{int(length)} bytes, more than the limit of {options.max_bytes} (data.url_max_bytes)")
        deadline = time.monotonic() + options.timeout
        body = bytearray()
        try:
            for chunk in response.iter_bytes(_CHUNK):
                body += chunk
                if len(body) > options.max_bytes:
                    raise _Permanent(f"more than the limit of {options.max_bytes} bytes (data.url_max_bytes)")
                if time.monotonic() > deadline:
                    raise _Permanent(f"timed out: body not complete after {options.timeout} s")
        except httpx2.HTTPError as e:
            raise _Permanent(f"the body broke off after {len(body)} bytes ({type(e).__name__}: {e})") from None
    return bytes(body)


# ---------------------------------------------------------------- images


def load_image(ref: str, options: MediaOptions | None = None) -> Image.Image:
    """The image `ref` names, as a fully decoded RGB image whose file is closed (rules in the module docstring)."""
    options = options or MediaOptions()
    kind = media_kind(ref)
    if kind == "base64":
        return _decode_image(io.BytesIO(decode_base64(ref)), ref, options)
    if kind == "path":
        if not os.path.isfile(ref):
            raise MediaError(f"{describe(ref)}: file not found")
        return _decode_image(ref, ref, options)
    cached = fetch_url(ref, options)
    try:
        return _decode_image(cached, ref, options)
    except MediaError as e:
        cached.unlink(missing_ok=True)  # a bad body must not stay cached for ever
        raise MediaError(f"{e} (fetched copy removed from the cache)") from None


def _decode_image(source, ref: str, options: MediaOptions) -> Image.Image:
    empty = source.getbuffer().nbytes == 0 if isinstance(source, io.BytesIO) else os.path.getsize(source) == 0
    if empty:
        raise MediaError(f"{describe(ref)}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # the limit below decides, not PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
        with image:
            _check_pixels(ref, image.width, image.height, options, "image")
            if image.mode in _WIDE_MODES:
                raise MediaError(f"{describe(ref)}: a {image.mode} image (16 or 32 bits per pixel, one channel) would "
                                 "be clipped to white by the RGB conversion; convert it to 8 bits first")
            image.load()  # decodes every pixel of the first frame: a truncated file raises here
            return image.convert("RGB")  # a new image, independent of the file
    except MediaError:
        raise
    except Image.UnidentifiedImageError:
        raise MediaError(f"{describe(ref)}: not an image PIL can read") from None
    except Image.DecompressionBombError as e:  # PIL's own refusal, in Image.open, above twice its warning threshold
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(claimed[1]):,} pixels" if claimed else "too many pixels"
        limit = (f"data.max_image_pixels={options.max_image_pixels:,}"
                 if options.max_image_pixels < 2 * (Image.MAX_IMAGE_PIXELS or 0)
                 else f"PIL's own limit of {2 * (Image.MAX_IMAGE_PIXELS or 0):,} (PIL.Image.MAX_IMAGE_PIXELS)")
        raise MediaError(f"{describe(ref)}: image of {size}, more than {limit}; refused before decoding") from None
    except _PIL_ERRORS as e:
        raise MediaError(f"{describe(ref)}: cannot decode the image ({type(e).__name__}: {e})") from None


def _check_pixels(ref: str, width: int, height: int, options: MediaOptions, what: str) -> None:
    if width * height > options.max_image_pixels:
        raise MediaError(f"{describe(ref)}: {what} of {width}x{height} = {width * height:,} pixels, more than "
                         f"data.max_image_pixels={options.max_image_pixels:,}; refused before decoding")


# ---------------------------------------------------------------- videos


def frame_indices(total: int, num_frames: int) -> list[int]:
    """The frames InternVL2 and ms-swift 2.x read: the middle of each of `num_frames` equal segments.

    With `seg = (total - 1) / num_frames`, frame k is `int(seg / 2 + round(seg * k))` for k = 0..num_frames-1
    (`round` halves to even, as numpy's does). Example: 40 frames, 8 segments -> seg 4.875 ->
    [2, 7, 12, 17, 22, 26, 31, 36]. Needs `total >= num_frames`; when `total` is close to `num_frames` a frame
    can repeat (8 of 8 frames -> [0, 1, 2, 3, 4, 4, 5, 6]), as in the official code.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    seg = (total - 1) / num_frames
    return [int(seg / 2 + round(seg * k)) for k in range(num_frames)]


class _NotAVideo(MediaError):
    """A file that the video readers cannot open as a video (a fetched copy of it is not kept)."""


def load_video_frames(ref: str, num_frames: int, options: MediaOptions | None = None) -> list[Image.Image]:
    """`num_frames` RGB frames of the video `ref` (a path or a URL), chosen by `frame_indices`."""
    options = options or MediaOptions()
    if media_kind(ref) == "url":
        cached = fetch_url(ref, options)
        try:
            return _read_frames(str(cached), ref, num_frames, options)
        except _NotAVideo as e:
            cached.unlink(missing_ok=True)  # a bad body must not stay cached for ever
            raise MediaError(f"{e} (fetched copy removed from the cache)") from None
    if media_kind(ref) == "base64" or not os.path.isfile(ref):
        raise MediaError(f"{describe(ref)}: file not found (videos are read from files or URLs)")
    if os.path.getsize(ref) == 0:
        raise MediaError(f"{describe(ref)}: empty file (0 bytes)")
    return _read_frames(ref, ref, num_frames, options)


def _read_frames(path: str, ref: str, num_frames: int, options: MediaOptions) -> list[Image.Image]:
    try:
        import decord
    except ImportError:
        decord = None
    try:
        if decord is not None:
            return _frames_decord(decord, path, ref, num_frames, options)
        return _frames_pyav(path, ref, num_frames, options)
    except MediaError:
        raise
    except ImportError:
        raise MediaError(f"{describe(ref)}: reading videos needs decord or PyAV "
                         "(pip install 'vltrain[video]')") from None
    except Exception as e:  # noqa: BLE001 - decord's and PyAV's many FFmpeg errors, all reported the same way
        raise _NotAVideo(f"{describe(ref)}: cannot read the video ({type(e).__name__}: {e})") from None


def _check_length(ref: str, total: int, num_frames: int, options: MediaOptions) -> list[int]:
    if total > options.max_video_frames:
        raise MediaError(f"{describe(ref)}: the video has {total:,} frames, more than "
                         f"data.max_video_frames={options.max_video_frames:,}")
    if total < num_frames:
        raise MediaError(f"{describe(ref)}: the video has {total} frame{'s' if total != 1 else ''}, "
                         f"fewer than the {num_frames} asked (data.video_frames)")
    return frame_indices(total, num_frames)


def _frames_decord(decord, path: str, ref: str, num_frames: int, options: MediaOptions) -> list[Image.Image]:
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    indices = _check_length(ref, len(reader), num_frames, options)
    height, width = reader[0].shape[:2]  # decord has no header size: one frame, before the others
    _check_pixels(ref, width, height, options, "video frame")
    batch = reader.get_batch(indices)
    frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # (N, H, W, 3) uint8
    return [Image.fromarray(frame).convert("RGB") for frame in frames]


def _frames_pyav(path: str, ref: str, num_frames: int, options: MediaOptions) -> list[Image.Image]:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise _NotAVideo(f"{describe(ref)}: no video stream")
        stream = container.streams.video[0]
        _check_pixels(ref, stream.codec_context.width, stream.codec_context.height, options, "video frame")
        total = stream.frames
    if not total:  # the container does not say (e.g. Matroska, WebM): count by decoding, up to the limit
        with av.open(path) as container:
            total = 0
            for _ in container.decode(video=0):
                total += 1
                if total > options.max_video_frames:
                    break
    indices = _check_length(ref, total, num_frames, options)
    wanted: dict[int, list[int]] = {}
    for k, index in enumerate(indices):
        wanted.setdefault(index, []).append(k)
    frames: list[Image.Image | None] = [None] * num_frames
    with av.open(path) as container:
        for index, frame in enumerate(container.decode(video=0)):
            for k in wanted.get(index, ()):
                frames[k] = frame.to_image().convert("RGB")
            if index >= indices[-1]:
                break
    if any(frame is None for frame in frames):
        raise MediaError(f"{describe(ref)}: the video ends before frame {indices[-1]} "
                         f"(its header says {total} frames)")
    return frames
