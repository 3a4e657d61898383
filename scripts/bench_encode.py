"""Benchmark: records encoded per second (what the data check and `data.encode` cost), against the floor of only
decoding and resizing the same media.

A realistic mix is generated into a temporary folder: JPEG photos-like images of varied sizes and aspect ratios
(1 to 13 tiles each with max_tiles 12), 65% one-image rows, 15% two- or three-image rows, 10% video rows (an
MJPEG AVI of 40 frames, 8 read), 10% text-only rows; a fifth are multi-turn. The encoder is InternVL2's
(internlm2-chat template, 256 tokens per 448 px tile, max_tiles 12) with the real InternLM2 tokenizer when
../shared/tokenizers is there, else the embedded tiny tokenizer.

Rows of the table, each with 1 and `--procs` processes:
  decode         images fully decoded, video frames read (PIL / decord)
  decode+resize  the floor: decode, then resize to the tile grid and the thumbnail (no tiles cut, no
                 normalisation, no tokenization)
  encode         the Encoder as the data check runs it (uint8 tiles, template, tokenization, image-token
                 expansion; no float normalisation); only sizes come back from the workers
  lazy samples   whole normalised samples back from the workers: what `data.encode=lazy` costs in training
  datasets       `encode_with_datasets` (`data.encode=datasets`): encode + write the samples to the Arrow cache
  read back      samples read back from that cache (`PreEncodedDataset`): what `data.encode=datasets` costs in
                 training
Then the data check of the demo dataset (2000 + 200 rows, tiny tokenizer), as `build_trainer` runs it.

    OMP_NUM_THREADS=1 python scripts/bench_encode.py [--records 200] [--procs 2]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image, ImageDraw

from vltrain.check import check_splits, iter_outcomes
from vltrain.data.dataset import EncodedDataset, PreEncodedDataset, encode_with_datasets, parallel_map
from vltrain.data.encode import Encoder
from vltrain.data.media import load_image, load_video_frames
from vltrain.data.records import Record
from vltrain.data.tiling import TILE_SIZE, choose_grid, num_tiles
from vltrain.model.load import EMBEDDED_TOKENIZER
from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer

SHARED_INTERNLM2 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "internlm2"
MAX_TILES = 12
VIDEO_FRAMES = 8
# Photo-like sizes: square, 4:3, 3:2, 16:9, portrait, panoramas, small and large.
SIZES = [(448, 448), (640, 480), (800, 600), (1024, 768), (1280, 720), (1920, 1080), (480, 640), (1080, 1920),
         (600, 400), (2048, 1536), (3000, 1000), (1000, 3000), (320, 240), (1024, 1024), (2400, 600), (512, 384)]
WORDS = ["the", "a", "image", "shows", "red", "blue", "green", "small", "large", "object", "on", "left", "right",
         "of", "with", "near", "next", "to", "behind", "person", "car", "tree", "building", "sky", "road", "water",
         "table", "cup", "dog", "cat", "two", "three", "several"]


# ---- data ---------------------------------------------------------------------------------------------------------


def photo(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A photo-like picture: a colour gradient, a few shapes and mild noise (compresses like a photo)."""
    w, h = size
    gradient = Image.linear_gradient("L").resize((w, h))
    image = Image.merge("RGB", [gradient.point(lambda v, k=k: (v * rng.uniform(0.3, 1.0) + 40 * k) % 256)
                                for k in range(3)])
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(w), rng.randrange(h)
        r = rng.randrange(10, max(11, min(w, h) // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = Image.effect_noise((w, h), 24).convert("RGB")
    return Image.blend(image, noise, 0.08)


def _chunk(fourcc: bytes, data: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def write_mjpeg_avi(path: Path, frames: list[Image.Image], fps: int = 10) -> None:
    """A minimal MJPEG AVI (RIFF: hdrl, movi, idx1), readable by FFmpeg-based readers; no video library needed."""
    jpegs = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    (w, h), n, biggest = frames[0].size, len(frames), max(map(len, jpegs))
    avih = struct.pack("<14I", 1_000_000 // fps, 0, 0, 0x10, n, 0, 1, biggest, w, h, 0, 0, 0, 0)
    strh = b"vidsMJPG" + struct.pack("<IHHIIIIIIiI", 0, 0, 0, 0, 1, fps, 0, n, biggest, -1, 0) + \
        struct.pack("<4h", 0, 0, w, h)
    strf = struct.pack("<IiiHH4sIiiII", 40, w, h, 1, 24, b"MJPG", w * h * 3, 0, 0, 0, 0)
    strl = _chunk(b"LIST", b"strl" + _chunk(b"strh", strh) + _chunk(b"strf", strf))
    hdrl = _chunk(b"LIST", b"hdrl" + _chunk(b"avih", avih) + strl)
    movi, index, offset = b"", b"", 4
    for jpeg in jpegs:
        chunk = _chunk(b"00dc", jpeg)
        index += b"00dc" + struct.pack("<III", 0x10, offset, len(jpeg))
        movi += chunk
        offset += len(chunk)
    body = b"AVI " + hdrl + _chunk(b"LIST", b"movi" + movi) + _chunk(b"idx1", index)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_records(folder: Path, n: int, seed: int = 0) -> list[Record]:
    rng = random.Random(seed)
    images = []
    for i, size in enumerate(SIZES):
        path = folder / f"image{i}.jpg"
        photo(size, rng).save(path, "JPEG", quality=90)
        images.append(str(path))
    video = folder / "clip.avi"
    write_mjpeg_avi(video, [photo((640, 360), rng) for _ in range(40)])
    records = []
    for i in range(n):
        kind = rng.random()
        media = {}
        if kind < 0.65:
            media["images"] = [rng.choice(images)]
        elif kind < 0.80:
            media["images"] = rng.sample(images, rng.choice((2, 3)))
        elif kind < 0.90:
            media["videos"] = [str(video)]
        history = [(text(rng, 12), text(rng, 30))] if rng.random() < 0.2 else []
        records.append(Record(query=text(rng, rng.randrange(8, 30)), response=text(rng, rng.randrange(10, 60)),
                              history=history, source=str(folder / "mix.jsonl"), line=i + 1, **media))
    return records


# ---- measured work ------------------------------------------------------------------------------------------------


def decode_only(record: Record) -> int:
    for ref in record.images:
        load_image(ref)
    for ref in record.videos:
        load_video_frames(ref, VIDEO_FRAMES)
    return 0


def decode_resize(record: Record) -> int:
    """Decode, then resize each image to its tile grid and thumbnail (each video frame to one tile)."""
    budget = 1 if record.videos else max(1, MAX_TILES // max(1, len(record.images)))
    for ref in record.images:
        image = load_image(ref)
        cols, rows = choose_grid(image.width, image.height, budget, 1, TILE_SIZE)
        image.resize((TILE_SIZE * cols, TILE_SIZE * rows), Image.Resampling.BICUBIC)
        if cols * rows > 1:
            image.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC)
    for ref in record.videos:
        for frame in load_video_frames(ref, VIDEO_FRAMES):
            frame.resize((TILE_SIZE, TILE_SIZE), Image.Resampling.BICUBIC)
    return 0


def run(fn, records, procs: int) -> float:
    start = time.perf_counter()
    for _ in parallel_map(fn, records, procs):
        pass
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- main ---------------------------------------------------------------------------------------------------------


def load_encoder(tokenizer_dir: Path, template: str, tokens_per_tile: int, max_tiles: int) -> Encoder:
    tokenizer = load_tokenizer(tokenizer_dir, template=template)
    add_internvl_tokens(tokenizer)
    return Encoder(tokenizer, template, None, max_tiles, 16384, tokens_per_tile, TILE_SIZE,
                   video_frames=VIDEO_FRAMES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--skip-demo", action="store_true", help="skip the demo-data check timing")
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}), torch threads "
          f"{torch.get_num_threads()}")
    real = SHARED_INTERNLM2.is_dir()
    encoder = load_encoder(SHARED_INTERNLM2 if real else EMBEDDED_TOKENIZER, "internlm2-chat" if real else "Hermes-2",
                           256, MAX_TILES)
    print(f"tokenizer: {'InternLM2 (shared)' if real else 'embedded tiny'}; template {encoder.template.name}; "
          f"{encoder.image_tokens_per_tile} tokens per tile; max_tiles {MAX_TILES}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records = make_records(folder, args.records)
        tiles_per_size = sorted({num_tiles(w, h, MAX_TILES) for w, h in SIZES})
        outcomes = list(iter_outcomes(records, encoder, 1))
        assert not [o.error for o in outcomes if o.error], [o.error for o in outcomes if o.error][:3]
        tiles = [sum(o.tiles_per_image) for o in outcomes]
        tokens = [o.tokens for o in outcomes]
        print(f"{len(records)} records: {sum(len(r.images) for r in records)} images, "
              f"{sum(len(r.videos) for r in records)} videos; tiles per single image {tiles_per_size}; "
              f"tiles per record min/median/max {min(tiles)}/{statistics.median(tiles):g}/{max(tiles)} "
              f"(total {sum(tiles)}); tokens per record {min(tokens)}/{statistics.median(tokens):g}/{max(tokens)}")

        rows = []
        for name, fn in (("decode", decode_only), ("decode+resize", decode_resize)):
            for procs in (1, args.procs):
                rows.append((name, procs, run(fn, records, procs)))
        for procs in (1, args.procs):
            rows.append(("encode", procs, timed(lambda p=procs: list(iter_outcomes(records, encoder, p)))))
        lazy = EncodedDataset(records, encoder)
        for procs in (1, args.procs):  # whole samples back from the workers, as data.encode=lazy trains
            rows.append(("lazy samples", procs, run(lazy.__getitem__, list(range(len(lazy))), procs)))
        for procs in (1, args.procs):
            cache = folder / f"cache{procs}"
            seconds = timed(lambda p=procs, c=cache: encode_with_datasets(records, encoder, c, p))
            rows.append(("datasets", procs, seconds))
        encoded = encode_with_datasets(records, encoder, folder / f"cache{args.procs}")
        served = PreEncodedDataset(encoded)
        for procs in (1, args.procs):  # samples are dropped as they come, as a training loop does
            rows.append(("read back", procs, run(served.__getitem__, list(range(len(served))), procs)))
        size_mb = sum(f.stat().st_size for f in (folder / f"cache{args.procs}").rglob("*") if f.is_file()) / 1e6

    floor = {p: s for n, p, s in rows if n == "decode+resize"}
    print("\n| step | processes | seconds | records/s | tiles/s | x floor |\n|---|---:|---:|---:|---:|---:|")
    for name, procs, seconds in rows:
        ratio = seconds / floor[procs] if procs in floor else float("nan")
        print(f"| {name} | {procs} | {seconds:.2f} | {len(records) / seconds:.1f} | {sum(tiles) / seconds:.0f} | "
              f"{ratio:.2f} |")
    print(f"\ndatasets cache: {size_mb:.0f} MB for {sum(tiles)} tiles ({size_mb / sum(tiles):.2f} MB per tile)")

    if not args.skip_demo:
        from vltrain.data.demo import write_demo_dataset

        with tempfile.TemporaryDirectory() as tmp:
            demo = write_demo_dataset(Path(tmp) / "demo")
            from vltrain.data.records import read_records

            splits = {"train": read_records(demo.train), "val": read_records(demo.val)}
            tiny = load_encoder(EMBEDDED_TOKENIZER, "Hermes-2", 64, 6)
            print("\n| demo data check (2000 + 200 rows, tiny tokenizer) | processes | seconds | records/s |")
            print("|---|---:|---:|---:|")
            n = sum(len(r) for r in splits.values())
            for procs in (1, args.procs):
                seconds = timed(lambda p=procs: check_splits(splits, tiny, p))
                print(f"| check_splits | {procs} | {seconds:.2f} | {n / seconds:.0f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
