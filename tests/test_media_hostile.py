"""Hostile media, generated in tmp_path: decompression bombs, EXIF orientation, CMYK / 16-bit / palette / alpha /
animated images, zero-byte and misnamed files, videos with too many frames or too large frames.

The rule is the official InternVL one (`Image.open(f).convert("RGB")`), so each accepted case is compared with
exactly that; the refused cases name the file and the config key to change."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vltrain.config import ConfigError, DataConfig
from vltrain.data.media import MediaError, MediaOptions, load_image, load_video_frames


def official(path: Path) -> np.ndarray:
    """What InternVL's `load_image` reads (its model card: `Image.open(image_file).convert('RGB')`)."""
    return np.asarray(Image.open(path).convert("RGB"))


def forged_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit RGB pixels, with almost no pixel data (a decompression bomb
    as far as the header goes; decoding it would fail on the missing data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def halves(size=(40, 20), left=(220, 20, 20), right=(30, 60, 220)) -> Image.Image:
    """Left half red, right half blue: a rotation or mirror shows in the pixels."""
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


# ---------------------------------------------------------------- refused before decoding


def test_decompression_bomb_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(forged_png(30_000, 30_000))  # 900 M pixels claimed in a file of ~100 bytes
    assert bomb.stat().st_size < 200
    with pytest.raises(MediaError, match=r"bomb\.png: image of (30000x30000 = )?900,000,000 pixels, more than "
                                         r"data\.max_image_pixels=89,478,485; refused before decoding"):
        load_image(str(bomb))
    # A smaller forged file under the limit reaches the decoder, which fails on the missing pixel data; just over
    # the limit it is refused with no decoding: the refusal comes from the header alone.
    smaller = tmp_path / "smaller.png"
    smaller.write_bytes(forged_png(2_000, 2_000))
    with pytest.raises(MediaError, match=r"smaller\.png: cannot decode the image"):
        load_image(str(smaller))
    with pytest.raises(MediaError, match=r"smaller\.png: image of 2000x2000 = 4,000,000 pixels, more than "
                                         r"data\.max_image_pixels=3,999,999; refused before decoding"):
        load_image(str(smaller), MediaOptions(max_image_pixels=3_999_999))


def test_pixel_limit_is_configurable(tmp_path):
    small = save(halves((24, 16)), tmp_path / "small.png")
    assert load_image(str(small), MediaOptions(max_image_pixels=24 * 16)).size == (24, 16)
    with pytest.raises(MediaError, match=r"small\.png: image of 24x16 = 384 pixels, more than "
                                         r"data\.max_image_pixels=383"):
        load_image(str(small), MediaOptions(max_image_pixels=383))
    built = MediaOptions.from_config(DataConfig(max_image_pixels=1000, max_video_frames=50))
    assert (built.max_image_pixels, built.max_video_frames) == (1000, 50)
    with pytest.raises(ConfigError, match="data.max_image_pixels must be >= 1"):
        DataConfig(max_image_pixels=0)


@pytest.mark.parametrize("mode,dtype,value", [("I;16", np.uint16, 40_000), ("I", np.int32, 70_000),
                                              ("F", np.float32, 0.5)])
def test_wide_single_channel_images_are_refused(tmp_path, mode, dtype, value):
    path = tmp_path / f"wide_{mode.replace(';', '')}.tiff"
    image = Image.fromarray(np.full((8, 8), value, dtype=dtype))
    image.save(path) if mode != "I;16" else image.save(path.with_suffix(".png"))
    path = path if mode != "I;16" else path.with_suffix(".png")
    assert Image.open(path).mode == mode
    with pytest.raises(MediaError, match=rf"{path.name}: a {mode} image .* convert it to 8 bits first"):
        load_image(str(path))


@pytest.mark.parametrize("content", [b"", None])
def test_zero_byte_files(tmp_path, content):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    ref = str(empty) if content is not None else "data:image/png;base64,"
    with pytest.raises(MediaError, match=r"empty file \(0 bytes\)"):
        load_image(ref)


# ---------------------------------------------------------------- converted as the official code converts


def test_exif_orientation_is_not_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a viewer shows it 20 x 40
    path = save(halves(), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    assert Image.open(path).getexif()[0x0112] == 6
    got = load_image(str(path))
    assert got.size == (40, 20)  # the stored grid, not the displayed one
    assert np.array_equal(np.asarray(got), official(path))
    assert got.getpixel((2, 10))[0] > 150 and got.getpixel((37, 10))[2] > 150  # red still left, blue right


def test_cmyk_grey_and_ycbcr_convert_like_pil(tmp_path):
    for name, image, kwargs in [
        ("cmyk.jpg", halves().convert("CMYK"), {"quality": 95}),
        ("cmyk.tiff", halves().convert("CMYK"), {}),
        ("grey.png", halves().convert("L"), {}),
        ("bilevel.png", halves().convert("1"), {}),
    ]:
        path = save(image, tmp_path / name, **kwargs)
        got = load_image(str(path))
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), official(path)), name


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 10), (0, 255, 0, 255), (255, 255, 255, 0)])
    path = save(rgba, tmp_path / "alpha.png")
    got = load_image(str(path))
    assert list(got.getdata()) == [(0, 0, 0), (255, 0, 0), (0, 255, 0), (255, 255, 255)]
    assert np.array_equal(np.asarray(got), official(path))
    la = save(Image.new("LA", (2, 2), (90, 0)), tmp_path / "la.png")
    assert load_image(str(la)).getpixel((0, 0)) == (90, 90, 90)


def test_palette_with_transparency_keeps_the_palette_colour(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1])
    path = save(palette, tmp_path / "palette.png", transparency=0)
    assert "transparency" in Image.open(path).info
    got = load_image(str(path))
    assert list(got.getdata()) == [(10, 20, 30), (200, 100, 50)]
    assert np.array_equal(np.asarray(got), official(path))


def test_animated_images_give_their_first_frame(tmp_path):
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    for name in ("anim.gif", "anim.webp", "anim.png"):
        path = save(red, tmp_path / name, save_all=True, append_images=[blue], duration=100, loop=0,
                    **({"lossless": True} if name.endswith("webp") else {}))
        assert getattr(Image.open(path), "n_frames", 1) == 2, name
        got = load_image(str(path))
        assert got.getpixel((4, 4)) == (255, 0, 0), name
        assert np.array_equal(np.asarray(got), official(path)), name


def test_content_decides_not_the_extension(tmp_path):
    png_named_jpg = save(halves(), tmp_path / "really_a_png.jpg", format="PNG")
    got = load_image(str(png_named_jpg))
    assert np.array_equal(np.asarray(got), np.asarray(halves()))  # lossless: the PNG's exact pixels
    text_named_png = tmp_path / "notes.png"
    text_named_png.write_text("a text file with an image's name")
    with pytest.raises(MediaError, match=r"notes\.png: not an image PIL can read"):
        load_image(str(text_named_png))


def test_base64_follows_the_same_rules():
    ref = "data:image/png;base64," + base64.b64encode(forged_png(20_000, 20_000)).decode()
    with pytest.raises(MediaError, match=r"image of (20000x20000 = )?400,000,000 pixels, more than data\.max_image_pixels"):
        load_image(ref)


# ---------------------------------------------------------------- videos


def write_video(path: Path, frames: int, size=(64, 48)) -> Path:
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 10 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # Matroska has no frame count: PyAV counts, up to the limit
def test_video_with_too_many_frames(backend, tmp_path, suffix):
    clip = write_video(tmp_path / f"long{suffix}", 12)
    assert len(load_video_frames(str(clip), 4, MediaOptions(max_video_frames=12))) == 4
    with pytest.raises(MediaError, match=rf"long\{suffix}: the video has (12|11|13) frames, more than "
                                         r"data\.max_video_frames=10"):
        load_video_frames(str(clip), 4, MediaOptions(max_video_frames=10))


def test_video_with_too_large_frames(backend, tmp_path):
    clip = write_video(tmp_path / "wide.mp4", 8)
    with pytest.raises(MediaError, match=r"wide\.mp4: video frame of 64x48 = 3,072 pixels, more than "
                                         r"data\.max_image_pixels=3,000"):
        load_video_frames(str(clip), 4, MediaOptions(max_image_pixels=3000))


def test_zero_byte_video(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.mp4: empty file \(0 bytes\)"):
        load_video_frames(str(empty), 4)
