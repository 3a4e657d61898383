"""Seeing the data as the model sees it: the data check of a whole config (`run_check`, what `vltrain check` runs),
samples printed with their trained tokens marked, every sample's ids dumped, tiles saved as PNG grids; and the
encode cache's entries listed or cleared (`cache_command`).

The check itself (every record encoded, problems and statistics) is vltrain.data.check; training runs it too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vltrain.config import ConfigError, TrainConfig
from vltrain.data.check import CheckReport, Outcome, check_splits
from vltrain.data.encode import IGNORE_INDEX, Encoder
from vltrain.data.encode_cache import try_encode
from vltrain.data.records import Record, RecordError
from vltrain.data.specs import load_splits
from vltrain.data.tiling import denormalise
from vltrain.model.load import make_encoder
from vltrain.model.tokenizer import IMAGE_CONTEXT_TOKEN

# ---- seeing what the model sees -------------------------------------------------------------------------------

TRAINED_OPEN, TRAINED_CLOSE = "«", "»"


def token_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, str]]:
    """(kind, text) runs of a sample: kind `trained`, `masked` or `image` (a run of `<IMG_CONTEXT>`, collapsed to
    `<IMG_CONTEXT>*N`)."""
    context_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
    runs: list[tuple[str, list[int]]] = []
    for token, label in zip(input_ids, labels):
        kind = "image" if token == context_id else ("masked" if label == IGNORE_INDEX else "trained")
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(token)
        else:
            runs.append((kind, [token]))
    return [(kind, f"{IMAGE_CONTEXT_TOKEN}*{len(ids)}" if kind == "image" else
             tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            for kind, ids in runs]


def render_plain(runs: list[tuple[str, str]]) -> str:
    """Trained text between « and », everything else (masked, -100) as is."""
    return "".join(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if kind == "trained" else text for kind, text in runs)


def render_rich(runs: list[tuple[str, str]]):
    from rich.text import Text

    styles = {"trained": "bold green", "masked": "dim", "image": "magenta"}
    text = Text()
    for kind, piece in runs:
        text.append(piece, style=styles[kind])
    return text


def show_samples(splits: dict[str, list[Record]], encoder: Encoder, count: int, color: bool | None = None) -> None:
    """Print the first `count` records (train first, then val) as the model sees them."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    color = console.is_terminal if color is None else color
    legend = ("[bold green]trained[/] [dim]masked (-100)[/] [magenta]image tokens[/]" if color else
              f"{TRAINED_OPEN}trained{TRAINED_CLOSE}, everything else masked (-100)")
    shown = 0
    for name, record, sample in _first_samples(splits, encoder, count):
        runs = token_runs(encoder.tokenizer, sample.input_ids.tolist(), sample.labels.tolist())
        trained = int((sample.labels != IGNORE_INDEX).sum())
        head = (f"--- {name} {record.source}:{record.line}  tokens {len(sample.input_ids)}, trained {trained}, "
                f"tiles per image {sample.tiles_per_image} ---")
        if color:
            console.print(head, style="bold", markup=False)
            console.print(render_rich(runs))
        else:
            print(head)
            print(render_plain(runs))
        shown += 1
    if shown:
        if color:
            console.print(legend)
        else:
            print(legend)


def _first_samples(splits, encoder, count):
    for name, records in splits.items():
        for record in records:
            if count <= 0:
                return
            sample, error = try_encode(encoder, record)
            if error is not None:
                continue  # already listed among the problems
            count -= 1
            yield name, record, sample


def tiles_grid(pixel_values: torch.Tensor):
    """(T, 3, S, S) normalised tiles -> one PIL image: tiles row-major in a near-square grid, 4 px white gaps."""
    from PIL import Image

    pixels = denormalise(pixel_values)  # (T, 3, S, S) uint8
    n, _, size, _ = pixels.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    gap = 4
    canvas = Image.new("RGB", (cols * size + (cols - 1) * gap, rows * size + (rows - 1) * gap), "white")
    for k in range(n):
        tile = Image.fromarray(pixels[k].transpose(1, 2, 0))
        canvas.paste(tile, ((k % cols) * (size + gap), (k // cols) * (size + gap)))
    return canvas


def save_tiles(splits: dict[str, list[Record]], encoder: Encoder, folder: Path, count: int | None) -> int:
    """One PNG grid per image (per video frame) of the first `count` records (all when None); returns files."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    limit = sum(len(r) for r in splits.values()) if count is None else count
    for name, record, sample in _first_samples(splits, encoder, limit):
        if sample.pixel_values is None:
            continue
        stem = f"{name}-{Path(record.source).stem}-line{record.line}"
        if record.row and record.row != record.line:  # rows sharing a line (a compact .json array)
            stem += f"-row{record.row}"
        for i, chunk in enumerate(torch.split(sample.pixel_values, sample.tiles_per_image)):
            tiles_grid(chunk).save(folder / f"{stem}-image{i}.png")
            written += 1
    return written


# ---- `vltrain check` ------------------------------------------------------------------------------------------


@dataclass
class CheckOptions:
    show: int = 0
    """Print the first N samples with trained tokens marked."""
    dump: str | None = None
    """JSONL file receiving `source`, `line`, `row`, `split`, `input_ids`, `labels`, `tiles_per_image` of every
    sample."""
    tiles_png: str | None = None
    """Folder receiving one PNG grid of tiles per image: of the first `show` records, or of all when show=0."""
    cache: str | None = None
    """`info`: list the entries of the encode cache (`data.encode_cache`) and their sizes against
    `data.encode_cache_max_gb`; `clear`: delete every entry no running job uses. Neither checks the data."""


def run_check(cfg: TrainConfig, options: CheckOptions) -> CheckReport:
    encoder = make_encoder(cfg)
    read_errors: list[RecordError] = []
    train, val = load_splits(cfg.dataset, errors=read_errors)
    splits = {"train": train, "val": val}
    template = cfg.model.template + (" (thinking)" if cfg.model.thinking else "")
    print(f"model {cfg.model.name}: template {template}, {encoder.image_tokens_per_tile} tokens per "
          f"{encoder.tile_size} px tile, max_tiles {cfg.model.max_tiles}, data.max_length {cfg.data.max_length}")
    dump = open(options.dump, "w", encoding="utf-8") if options.dump else None  # noqa: SIM115
    try:
        def write(split: str, record: Record, outcome: Outcome) -> None:
            if dump is not None and outcome.error is None:
                dump.write(json.dumps({"source": record.source, "line": record.line, "row": record.row, "split": split,
                                       "input_ids": outcome.input_ids, "labels": outcome.labels,
                                       "tiles_per_image": outcome.tiles_per_image}) + "\n")

        report = check_splits(splits, encoder, cfg.data.num_proc, read_errors, on_outcome=write,
                              keep_ids=dump is not None)
    finally:
        if dump is not None:
            dump.close()
    if options.show > 0:
        show_samples(splits, encoder, options.show)
    if options.tiles_png:
        n = save_tiles(splits, encoder, Path(options.tiles_png), options.show or None)
        print(f"tiles: {n} PNG file(s) in {options.tiles_png}")
    if options.dump:
        print(f"samples: written to {options.dump}")
    print(report.format())
    return report


def cache_command(cfg: TrainConfig, action: str) -> int:
    """`cache=info` or `cache=clear` on the encode cache of `cfg`."""
    from vltrain.data.cache_store import EncodeCache, describe
    from vltrain.data.encode_cache import DEFAULT_ENCODE_CACHE

    if action not in ("info", "clear"):
        raise ConfigError(f"cache: '{action}' is not one of info, clear")
    cache = EncodeCache(cfg.data.encode_cache or DEFAULT_ENCODE_CACHE)
    if action == "clear":
        evicted, busy = cache.evict(0)
        print(f"encode cache {cache.root}: deleted {len(evicted)} entries "
              f"({sum(e.bytes for e in evicted) / 1e9:.2f} GB)"
              + (f"; {len(busy)} in use by running jobs kept" if busy else ""))
    print(describe(cache, cfg.data.encode_cache_max_gb))
    return 0
