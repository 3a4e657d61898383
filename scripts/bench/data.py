"""Benchmark: the data cost of training, against the floor of only decoding and resizing the same media and against
ms-swift 2.x's InternVL2 `template.encode` on the same records.

A realistic mix is generated into a temporary folder as an ms-swift-format JSONL file: photo-like JPEGs of varied
sizes and aspect ratios (1 to 13 tiles each), 60% one-image rows, 15% two- or three-image rows, 10% video rows
(an MJPEG AVI of 40 frames, 8 read), 5% grounding rows (`<ref-object>` / `<bbox>`), 10% text-only rows; a fifth
multi-turn. Encoder: InternVL2's internlm2-chat template, 256 tokens per 448 px tile, 12 tiles per image (every
image the full budget, ms-swift 2.x's rule, so both sides cut the same tiles) with the real InternLM2 tokenizer
when ../shared/tokenizers is there, else the embedded tiny tokenizer (then on both sides).

ms-swift runs in its own virtual environment (`--swift-python`, see BENCHMARKS.md for how it was installed) through
`swift_encode.py`; no ms-swift code is in this repository. Times are CPU seconds of one process and one thread
(least of `--repeat` runs): on a shared machine far steadier than wall time.

One pass: the floor; ms-swift's encode (what ms-swift 2.x does per record per epoch with lazy_tokenize); the data
check (sizes kept); the encoder's normalised samples (`data.encode=lazy`, per epoch); encoding into the cache
(`data.encode=datasets`, once per run and data); reading a sample back from the cache and normalising it (per
epoch). Whole run: those combined for `--epochs` epochs.

    python scripts/bench/data.py [--records 40] [--epochs 3] [--swift-python ../swift-venv/bin/python]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from PIL import Image, ImageDraw

from vltrain.data.check import iter_outcomes, outcome_from_encoded_row
from vltrain.data.dataset import PreEncodedDataset
from vltrain.data.encode import Encoder
from vltrain.data.encode_cache import encode_row, encode_with_datasets
from vltrain.data.media import load_image, load_video_frames
from vltrain.data.records import Record, read_records
from vltrain.data.tiling import TILE_SIZE, choose_grid, normalise
from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer
from vltrain.model.vocab import EMBEDDED_TOKENIZER
from vltrain.speed import keep_freed_memory

# ../shared/tokenizers next to the checkout
SHARED_INTERNLM2 = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "internlm2"
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


def make_rows(folder: Path, n: int, seed: int = 0) -> Path:
    """`n` ms-swift-format rows in `folder/mix.jsonl`: 60% one image, 15% two or three images, 10% a video, 5%
    grounding (`<ref-object>` / `<bbox>` on one image), 10% text only; a fifth multi-turn."""
    rng = random.Random(seed)
    images = []
    for i, size in enumerate(SIZES):
        path = folder / f"image{i}.jpg"
        photo(size, rng).save(path, "JPEG", quality=90)
        images.append((str(path), size))
    video = folder / "clip.avi"
    write_mjpeg_avi(video, [photo((640, 360), rng) for _ in range(40)])
    rows = []
    for _ in range(n):
        kind = rng.random()
        row = {"query": text(rng, rng.randrange(8, 30)), "response": text(rng, rng.randrange(10, 60))}
        if kind < 0.60:
            row["images"] = [rng.choice(images)[0]]
        elif kind < 0.75:
            row["images"] = [p for p, _ in rng.sample(images, rng.choice((2, 3)))]
        elif kind < 0.85:
            row["videos"] = [str(video)]
        elif kind < 0.90:
            path, (w, h) = rng.choice(images)
            x, y = rng.randrange(w // 2), rng.randrange(h // 2)
            row.update(query="Find <ref-object>", response="<bbox>", images=[path],
                       objects=[{"caption": rng.choice(WORDS), "bbox": [x, y, x + w // 3, y + h // 3],
                                 "bbox_type": "real", "image": 0}])
        if rng.random() < 0.2 and "objects" not in row:
            row["history"] = [[text(rng, 12), text(rng, 30)]]
        rows.append(row)
    path = folder / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- measured work ------------------------------------------------------------------------------------------------


def decode_only(record: Record) -> int:
    for ref in record.images:
        load_image(ref)
    for ref in record.videos:
        load_video_frames(ref, VIDEO_FRAMES)
    return 0


def decode_resize(record: Record) -> int:
    """Decode, then resize each image to its tile grid and thumbnail (each video frame to one tile)."""
    budget = 1 if record.videos else MAX_TILES  # every image the full budget, as ms-swift 2.x
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


# CPU seconds of this process (user + system), not wall time: on a shared machine the wall time of one process
# swings with the load of the others, its CPU time much less. Every row runs in one process and one thread.
class CPUSeconds(float):
    """CPU seconds (user + system) of a run; `system`: its kernel part (page faults, file writes)."""

    def __new__(cls, total: float, system: float):
        seconds = super().__new__(cls, total)
        seconds.system = system
        return seconds


def run(fn, records, repeat: int = 1) -> CPUSeconds:
    """`fn` over `records`, each result dropped at once (as a training loop drops a batch)."""
    def loop():
        for record in records:
            fn(record)
    return timed(loop, repeat)


def timed(fn, repeat: int = 1) -> CPUSeconds:
    """The least CPU time of `repeat` runs of `fn`."""
    best = CPUSeconds(float("inf"), 0.0)
    for _ in range(repeat):
        start = os.times()
        fn()
        end = os.times()
        seconds = CPUSeconds(end.user + end.system - start.user - start.system, end.system - start.system)
        best = min(best, seconds)
    return best


def swift_pass(python: str, rows: Path, tokenizer: Path, repeat: int) -> dict | None:
    """One pass of ms-swift 2.x's `template.encode` over `rows`, in its own virtual environment."""
    script = Path(__file__).with_name("swift_encode.py")
    done = subprocess.run([python, str(script), str(rows), str(tokenizer), "--passes", str(repeat)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""})
    if done.returncode != 0:
        print(f"ms-swift run failed:\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- main ---------------------------------------------------------------------------------------------------------


def load_encoder(tokenizer_dir: Path, template: str, tokens_per_tile: int, max_tiles: int,
                 split_tile_budget: bool = True) -> Encoder:
    tokenizer = load_tokenizer(tokenizer_dir, template=template)
    add_internvl_tokens(tokenizer)
    return Encoder(tokenizer, template, None, max_tiles, 16384, tokens_per_tile, TILE_SIZE,
                   video_frames=VIDEO_FRAMES, split_tile_budget=split_tile_budget)


def read_back(served: PreEncodedDataset) -> None:
    for i in range(len(served)):  # what a training epoch costs: the row, then the collator's normalisation
        sample = served[i]
        if sample.pixel_values is not None:
            normalise(sample.pixel_values.numpy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each row; the least CPU time is kept")
    parser.add_argument("--procs", type=int, default=2, help="processes for the datasets-API comparison (1: skip)")
    parser.add_argument("--swift-python", default="../swift-venv/bin/python",
                        help="Python of a virtual environment with ms-swift 2.x, outside the repository (its row is "
                             "skipped when absent)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()  # as the DataLoader workers do (vltrain.speed)
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}); one process per row")
    real = SHARED_INTERNLM2.is_dir()
    tokenizer_dir = SHARED_INTERNLM2 if real else EMBEDDED_TOKENIZER
    template = "internlm2-chat" if real else "Hermes-2"
    # ms-swift 2.x gives every image of a row the full tile budget: compare at that rule (the same tiles).
    encoder = load_encoder(tokenizer_dir, template, 256, MAX_TILES, split_tile_budget=False)
    print(f"tokenizer: {'InternLM2 (shared)' if real else 'embedded tiny'}; template {template}; 256 tokens per "
          f"tile; max_tiles {MAX_TILES} per image (data.split_tile_budget=false, as ms-swift 2.x)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows_path = make_rows(folder, args.records)
        records = read_records(rows_path)
        outcomes = list(iter_outcomes(records, encoder, 1))
        assert not [o.error for o in outcomes if o.error], [o.error for o in outcomes if o.error][:3]
        tiles = [sum(o.tiles_per_image) for o in outcomes]
        tokens = [o.tokens for o in outcomes]
        print(f"{len(records)} records: {sum(len(r.images) for r in records)} images, "
              f"{sum(len(r.videos) for r in records)} videos, {sum(bool(r.objects) for r in records)} grounding, "
              f"{sum(not r.images and not r.videos for r in records)} text-only; tiles per record min/median/max "
              f"{min(tiles)}/{statistics.median(tiles):g}/{max(tiles)} (total {sum(tiles)}); tokens per record "
              f"{min(tokens)}/{statistics.median(tokens):g}/{max(tokens)}")

        r = args.repeat
        swift = (swift_pass(args.swift_python, rows_path, tokenizer_dir, r) if Path(args.swift_python).exists()
                 else None)
        floor = run(decode_resize, records, r)
        check = timed(lambda: list(iter_outcomes(records, encoder, 1)), r)
        samples = run(encoder, records, r)  # normalised samples, as a batch needs them
        caches = iter(folder / f"encoded{k}" for k in range(r))
        first = timed(lambda: encode_with_datasets(records, encoder, next(caches)), r)  # a fresh cache each time
        cache = folder / "encoded0"
        size_mb = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6
        served = PreEncodedDataset(encode_with_datasets(records, encoder, cache))
        epoch = timed(lambda: read_back(served), r)
        reopen = timed(lambda: outcome_sizes(encode_with_datasets(records, encoder, cache)), r)
        writers = datasets_api(records, encoder, folder / "api", args.procs) if args.procs > 1 else []
        python_write, table_write = cache_writers(records, encoder, folder / "writers", max(r, 3))

    n, e = len(records), args.epochs
    print(f"\n## One pass over {n} records (CPU seconds of one process, one thread; least of {r} runs)\n")
    print("| work | seconds | of which system | records/s | x decode+resize floor |"
          + (" x ms-swift |" if swift else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if swift else ""))
    single = [("decode + resize (the floor)", floor), ("vltrain data check (sizes kept)", check),
              ("vltrain encode, normalised samples (data.encode=lazy, per epoch)", samples),
              ("vltrain encode + write the cache (data.encode=datasets, once)", first),
              ("vltrain read back + normalise (data.encode=datasets, per epoch)", epoch)]
    if swift:
        single.insert(1, (f"ms-swift {swift['version']} template.encode", min(swift["seconds_per_pass"])))
    for name, seconds in single:
        ratio = f" {seconds / min(swift['seconds_per_pass']):.2f} |" if swift else ""
        system = f"{seconds.system:.2f}" if isinstance(seconds, CPUSeconds) else "-"
        print(f"| {name} | {seconds:.2f} | {system} | {n / seconds:.1f} | {seconds / floor:.2f} |{ratio}")
    if swift:
        print(f"\nms-swift encoded {swift['encoded']}/{swift['records']} records, {swift['tiles']} tiles, "
              f"{swift['tokens']} tokens; vltrain {sum(tiles)} tiles, {sum(tokens)} tokens")

    print(f"\n## Data cost of a whole {e}-epoch run (the check included; CPU seconds of one process)\n")
    runs = [("vltrain data.encode=lazy: check + encode every epoch", check + e * samples),
            ("vltrain data.encode=datasets, first run: encode once + read back every epoch", first + e * epoch),
            ("vltrain data.encode=datasets, rerun (cache warm): open + read back every epoch", reopen + e * epoch)]
    if swift:
        runs.insert(0, (f"ms-swift {swift['version']} (lazy_tokenize): encode every epoch",
                        e * min(swift["seconds_per_pass"])))
    base = runs[0][1]
    print("| run | seconds | x first row |\n|---|---:|---:|")
    for name, seconds in runs:
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |")
    if writers:
        print(f"\n## Encoding into the Arrow cache with {args.procs} processes (one run each)\n")
        print("| writer | wall s | x vltrain | CPU s (all processes) | x vltrain |\n|---|---:|---:|---:|---:|")
        for name, wall, cpu in writers:
            print(f"| {name} | {wall:.2f} | {wall / writers[0][1]:.2f} | {cpu:.2f} | {cpu / writers[0][2]:.2f} |")
    print(f"\n## Writing the {n} encoded rows into the cache file (CPU seconds, least of {max(r, 3)}, taking turns)\n")
    print("| writer | seconds | x before |\n|---|---:|---:|")
    print(f"| datasets ArrowWriter.write of Python rows (before) | {python_write:.2f} | 1.00 |")
    print(f"| ArrowWriter.write_table of one-row tables on the tile memory (now) | {table_write:.2f} | "
          f"{table_write / python_write:.2f} |")
    print(f"\nencode cache: {size_mb:.0f} MB for {sum(tiles)} tiles ({size_mb / sum(tiles):.2f} MB per tile)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


def _python_row(row: dict) -> dict:
    """An `encode_row` row with its pixels as bytes: the Python row datasets' own writers take."""
    return {**row, "pixels": b"" if row["pixels"] is None else row["pixels"].numpy().tobytes()}


def _map_row(row: dict, records: list[Record], encoder: Encoder) -> dict:
    return _python_row(encode_row(encoder, records[row["index"]]))


def _generate_rows(shards: list[list[int]], records: tuple[Record, ...], encoder: Encoder):
    for shard in shards:  # datasets hands each process a slice of the `shards` list
        for i in shard:
            yield _python_row(encode_row(encoder, records[i]))


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def datasets_api(records: list[Record], encoder: Encoder, folder: Path, procs: int) -> list[tuple[str, float, float]]:
    """(writer, wall seconds, CPU seconds with the workers) to encode `records` into an Arrow cache with `procs`
    processes: vltrain's `encode_with_datasets` (DataLoader workers feeding one ArrowWriter) against HF datasets'
    `Dataset.from_generator(num_proc=...)` (contiguous shards, our fingerprint given so nothing is hashed) and
    `Dataset.map(num_proc=...)` over an index column."""
    import datasets

    from vltrain.data.encode_cache import _features, fingerprint

    bounds = [len(records) * k // procs for k in range(procs + 1)]
    shards = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    writers = {
        f"vltrain encode_with_datasets ({procs} DataLoader workers + ArrowWriter)":
            lambda: encode_with_datasets(records, encoder, folder / "ours", procs),
        f"datasets Dataset.from_generator(num_proc={procs})":
            lambda: datasets.Dataset.from_generator(
                _generate_rows, features=_features(), cache_dir=str(folder / "gen"), num_proc=procs,
                gen_kwargs={"shards": shards, "records": tuple(records), "encoder": encoder},
                fingerprint=fingerprint(records, encoder), writer_batch_size=8),
        f"datasets Dataset.map(num_proc={procs}) over an index column":
            lambda: datasets.Dataset.from_dict({"index": list(range(len(records)))}).map(
                _map_row, fn_kwargs={"records": records, "encoder": encoder}, num_proc=procs, features=_features(),
                remove_columns=["index"], cache_file_name=str(folder / "map" / "encoded.arrow"), writer_batch_size=8,
                new_fingerprint="bench"),
    }
    out = []
    for name, write in writers.items():
        wall, cpu = time.perf_counter(), _cpu()
        write()
        out.append((name, time.perf_counter() - wall, _cpu() - cpu))
    return out


def cache_writers(records: list[Record], encoder: Encoder, folder: Path, rounds: int) -> tuple[float, float]:
    """(CPU seconds, least of `rounds`) to write the same encoded rows into an Arrow file: datasets' `ArrowWriter.write`
    of Python rows (pixels as bytes; vltrain's writer before), then `write_table(row_table(row))` (now), taking
    turns, each into a fresh file."""
    from datasets.arrow_writer import ArrowWriter

    from vltrain.data.encode_cache import _features, row_table

    rows = [encode_row(encoder, record) for record in records]
    python_rows = [_python_row(row) for row in rows]

    def write(name: str, as_table: bool) -> None:
        writer = ArrowWriter(features=_features(), path=str(folder / name), writer_batch_size=8)
        for row, python_row in zip(rows, python_rows):
            writer.write_table(row_table(row)) if as_table else writer.write(python_row)
        writer.finalize()
        writer.close()
        (folder / name).unlink()

    folder.mkdir(parents=True, exist_ok=True)
    before = after = float("inf")
    for k in range(rounds):
        before = min(before, timed(lambda: write(f"python{k}.arrow", False)))
        after = min(after, timed(lambda: write(f"table{k}.arrow", True)))
    return before, after


def outcome_sizes(encoded) -> list:
    """What a rerun does with a warm cache before training: the check's sizes from the stored rows."""
    return [outcome_from_encoded_row(row)
            for row in encoded.select_columns(["input_ids", "labels", "tiles_per_image", "error"])]


if __name__ == "__main__":
    sys.exit(main())
