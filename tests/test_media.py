"""Media: images from files, base64 and URLs (cache, timeout, size cap, retries), video frames by decord or PyAV."""

from __future__ import annotations

import base64
import io
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vltrain.data import media
from vltrain.data.media import (
    MediaError,
    MediaOptions,
    cache_path,
    frame_indices,
    load_image,
    load_video_frames,
    media_kind,
)


def png_bytes(colour=(200, 30, 40), size=(24, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def noise_bytes(fmt: str) -> bytes:
    """An image that compresses badly, so cutting the file in half loses pixel data."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


# ---------------------------------------------------------------- a local HTTP server


class Server:
    """Serves `routes` (path -> callable(handler)) on 127.0.0.1 and counts the requests per path."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.routes: dict[str, callable] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.counts[self.path] = server.counts.get(self.path, 0) + 1
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                else:
                    route(self, server.counts[self.path])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path


def send(handler, body: bytes, status: int = 200, length: int | None = None, content_type="image/png"):
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, size cap)
        pass


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture()
def options(tmp_path):
    return MediaOptions(cache_dir=tmp_path / "cache", timeout=5.0, retries=2, backoff=0.01)


# ---------------------------------------------------------------- URLs


def test_url_fetched_once_then_read_from_cache(server, options, tmp_path):
    server.routes["/red.png"] = lambda h, n: send(h, png_bytes())
    url = server.url("/red.png")
    first = load_image(url, options)
    second = load_image(url, options)
    assert server.counts["/red.png"] == 1
    assert first.mode == "RGB" and first.size == (24, 16) and first.getpixel((3, 3)) == (200, 30, 40)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    cached = cache_path(url, options)
    assert cached.parent == options.cache_dir and cached.name.endswith(".png")
    assert [p.name for p in options.cache_dir.iterdir()] == [cached.name]  # no temporary file left behind
    load_image(url, MediaOptions(cache_dir=tmp_path / "other", backoff=0.01))
    assert server.counts["/red.png"] == 2  # a different cache fetches again


def test_url_timeout(server, options):
    def slow(handler, n):
        time.sleep(1.5)
        send(handler, png_bytes())

    server.routes["/slow.png"] = slow
    options.timeout, options.retries = 0.3, 0
    with pytest.raises(MediaError, match=r"/slow\.png: timed out.*after 1 attempt\)"):
        load_image(server.url("/slow.png"), options)
    assert server.counts["/slow.png"] == 1  # given up on, not retried
    assert not list(options.cache_dir.iterdir())


def test_url_size_cap_stops_streaming(server, options):
    def endless(handler, n):  # no Content-Length: the body ends when the connection closes
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            for _ in range(100):
                handler.wfile.write(b"x" * 10_000)
        except (BrokenPipeError, ConnectionResetError):
            pass

    server.routes["/endless"] = endless
    server.routes["/declared"] = lambda h, n: send(h, b"x" * 100, length=10**9)
    options.max_bytes = 50_000
    with pytest.raises(MediaError, match=r"/endless: more than the limit of 50000 bytes"):
        load_image(server.url("/endless"), options)
    with pytest.raises(MediaError, match=r"/declared: 1000000000 bytes, more than the limit of 50000"):
        load_image(server.url("/declared"), options)
    assert server.counts["/endless"] == server.counts["/declared"] == 1  # not retried
    assert not list(options.cache_dir.iterdir())


def test_url_404_fails_without_retry(server, options):
    with pytest.raises(MediaError, match=r"/missing\.png: HTTP 404"):
        load_image(server.url("/missing.png"), options)
    assert server.counts["/missing.png"] == 1


def test_url_server_errors_are_retried(server, options):
    server.routes["/flaky.png"] = lambda h, n: send(h, png_bytes()) if n > 2 else h.send_error(503)
    server.routes["/down.png"] = lambda h, n: h.send_error(503)
    assert load_image(server.url("/flaky.png"), options).size == (24, 16)
    assert server.counts["/flaky.png"] == 3  # two failures, then the image
    options.retries = 1
    with pytest.raises(MediaError, match=r"/down\.png: HTTP 503 .*\(after 2 attempts\)"):
        load_image(server.url("/down.png"), options)
    assert server.counts["/down.png"] == 2


def test_url_that_is_not_an_image_is_not_kept(server, options):
    server.routes["/page.png"] = lambda h, n: send(h, b"<html>login</html>", content_type="text/html")
    url = server.url("/page.png")
    with pytest.raises(MediaError, match=r"/page\.png: not an image .*removed from the cache"):
        load_image(url, options)
    assert not cache_path(url, options).exists()
    with pytest.raises(MediaError):
        load_image(url, options)
    assert server.counts["/page.png"] == 2


# ---------------------------------------------------------------- base64 and files


def test_base64_raw_and_data_uri(tmp_path):
    raw = base64.b64encode(png_bytes((10, 20, 30))).decode()
    for ref in (raw, f"data:image/png;base64,{raw}", raw[:40] + "\n" + raw[40:]):
        assert media_kind(ref) == "base64"
        image = load_image(ref)
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("ref,message", [
    ("data:image/png;base64,iVBO@@@@", "invalid base64"),
    ("data:text/plain;base64,aGVsbG8=", "only base64 image data URIs"),
    ("data:image/png,%89PNG", "only base64 image data URIs"),
    ("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(), "not an image"),
])
def test_bad_base64(ref, message):
    with pytest.raises(MediaError, match=message):
        load_image(ref)


def test_media_kind(tmp_path):
    jpeg = base64.b64encode(noise_bytes("JPEG")).decode()
    assert jpeg.startswith("/9j/")  # looks like an absolute path, is base64
    existing = tmp_path / "a.png"
    existing.write_bytes(png_bytes())
    assert [media_kind(r) for r in ("http://x/a.png", "HTTPS://x/a", "data:image/png;base64,AAAA", jpeg,
                                    str(existing), "/no/such/file.png", "/data/sets/coco/images/abcdefgh")] == \
        ["url", "url", "base64", "base64", "path", "path", "path"]
    assert load_image(jpeg).size == (96, 96)


def test_files(tmp_path):
    Image.new("RGBA", (8, 8), (1, 2, 3, 0)).save(tmp_path / "rgba.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("P", (8, 8), 5).save(tmp_path / "palette.gif")
    for name in ("rgba.png", "grey.png", "palette.gif"):
        image = load_image(str(tmp_path / name))
        assert image.mode == "RGB" and image.size == (8, 8)
    image = load_image(str(tmp_path / "grey.png"))
    (tmp_path / "grey.png").unlink()  # fully loaded: the pixels do not need the file
    assert image.getpixel((7, 7)) == (77, 77, 77)


@pytest.mark.parametrize("name,content,message", [
    ("corrupt.png", b"\x89PNG not really", "not an image PIL can read"),
    ("text.jpg", b"just text", "not an image PIL can read"),
    ("empty.png", b"", r"empty file \(0 bytes\)"),
    ("truncated.png", noise_bytes("PNG")[:15_000], "cannot decode the image"),
    ("truncated.jpg", noise_bytes("JPEG")[:5_000], "cannot decode the image"),
])
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(MediaError, match=f"{name}: {message}"):
        load_image(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(MediaError, match=r"nope\.png: file not found"):
        load_image(str(tmp_path / "nope.png"))


# ---------------------------------------------------------------- videos

STEP = 6  # grey level per frame index: frame i is filled with 10 + 6 i


def write_video(path: Path, n_frames: int) -> Path:
    """A lossless (x264, crf 0) 32x32 video whose frame i is a flat grey of 10 + 6 i."""
    av = pytest.importorskip("av", reason="PyAV writes the test videos (pip install 'vltrain[video]')")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 + STEP * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_index(image: Image.Image) -> int:
    return round((np.asarray(image, dtype=float).mean() - 10) / STEP)


def official_indices(total: int, n: int) -> list[int]:
    """InternVL2's get_index without a time bound, written the way its model card does (numpy rounding)."""
    seg = float(total - 1) / n
    return [int(seg / 2 + np.round(seg * k)) for k in range(n)]


def test_frame_indices():
    assert frame_indices(40, 8) == [2, 7, 12, 17, 22, 26, 31, 36]  # seg 4.875, worked by hand
    assert frame_indices(21, 8) == [1, 3, 6, 9, 11, 13, 16, 19]  # seg 2.5: round(2.5) = 2, round(12.5) = 12
    assert frame_indices(8, 8) == [0, 1, 2, 3, 4, 4, 5, 6]  # as many frames as asked: one repeats, one is unused
    for total in range(1, 120):
        for n in range(1, min(total, 33) + 1):
            indices = frame_indices(total, n)
            assert indices == official_indices(total, n)
            assert all(0 <= i < total for i in indices) and indices == sorted(indices)


@pytest.fixture()
def video(tmp_path):
    return write_video(tmp_path / "clip.mp4", 40)


def test_video_with_decord(video):
    pytest.importorskip("decord", reason="decord is optional (pip install 'vltrain[video]')")
    frames = load_video_frames(str(video), 8)
    assert [frame_index(f) for f in frames] == frame_indices(40, 8)
    assert all(f.mode == "RGB" and f.size == (32, 32) for f in frames)


def test_video_pyav_fallback(video, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError

    def never(*args):
        raise AssertionError("decord must not be used")

    monkeypatch.setattr(media, "_frames_decord", never)
    assert [frame_index(f) for f in load_video_frames(str(video), 8)] == frame_indices(40, 8)
    every = [frame_index(f) for f in load_video_frames(str(video), 40)]
    assert every == frame_indices(40, 40) and every.count(20) == 2  # a repeated index is decoded twice
    # Matroska does not store a frame count: PyAV counts by decoding.
    mkv = write_video(tmp_path / "clip.mkv", 23)
    assert [frame_index(f) for f in load_video_frames(str(mkv), 5)] == frame_indices(23, 5)


def test_short_video(backend, tmp_path):
    short = write_video(tmp_path / "short.mp4", 5)
    with pytest.raises(MediaError, match=r"short\.mp4: the video has 5 frames, fewer than the 8 asked"):
        load_video_frames(str(short), 8)


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100, "half"])
def test_unreadable_video(backend, tmp_path, video, content):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(video.read_bytes()[: len(video.read_bytes()) // 2] if content == "half" else content)
    with pytest.raises(MediaError, match=r"bad\.mp4: (cannot read the video|no video stream|the video has 0|empty file)"):
        load_video_frames(str(bad), 8)


def test_missing_video(tmp_path):
    with pytest.raises(MediaError, match=r"gone\.mp4: file not found"):
        load_video_frames(str(tmp_path / "gone.mp4"), 8)


def test_video_url(server, options, video):
    server.routes["/clip.mp4"] = lambda h, n: send(h, video.read_bytes(), content_type="video/mp4")
    for _ in range(2):
        frames = load_video_frames(server.url("/clip.mp4"), 4)
        assert [frame_index(f) for f in frames] == frame_indices(40, 4)
    assert server.counts["/clip.mp4"] == 1


def test_video_url_that_is_not_a_video_is_not_kept(server, options):
    server.routes["/page.mp4"] = lambda h, n: send(h, b"<html>login</html>" * 20, content_type="text/html")
    url = server.url("/page.mp4")
    for attempt in (1, 2):
        with pytest.raises(MediaError, match=r"/page\.mp4: cannot read the video.*removed from the cache"):
            load_video_frames(url, 4, options)
        assert not cache_path(url, options).exists() and server.counts["/page.mp4"] == attempt


def test_options_from_config(tmp_path):
    from vltrain.config import DataConfig

    built = MediaOptions.from_config(DataConfig(media_cache=str(tmp_path), url_timeout=3.0, url_retries=0,
                                                url_max_bytes=1000))
    assert (built.cache_dir, built.timeout, built.retries, built.max_bytes) == (tmp_path, 3.0, 0, 1000)
    assert MediaOptions.from_config(DataConfig()).cache_dir is None


def test_offline_mode_reads_the_cache_and_fetches_nothing(server, options, monkeypatch):
    from huggingface_hub import constants

    server.routes["/cached.png"] = lambda h, n: send(h, png_bytes())
    server.routes["/new.png"] = lambda h, n: send(h, png_bytes())
    load_image(server.url("/cached.png"), options)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert load_image(server.url("/cached.png"), options).size == (24, 16)
    with pytest.raises(MediaError, match=r"/new\.png: not in the media cache .* HF_HUB_OFFLINE is set"):
        load_image(server.url("/new.png"), options)
    assert server.counts["/cached.png"] == 1 and "/new.png" not in server.counts  # no request reached the server


def test_url_body_that_breaks_off(server, options):
    def cut(handler, n):
        send(handler, png_bytes()[:40], length=len(png_bytes()))  # promises more than it sends, then closes
        handler.close_connection = True

    server.routes["/cut.png"] = cut
    with pytest.raises(MediaError, match=r"/cut\.png: the body broke off after \d+ bytes"):
        load_image(server.url("/cut.png"), options)
    assert server.counts["/cut.png"] == 1  # not retried: the next run fetches again, nothing was cached
    assert not list(options.cache_dir.iterdir())
