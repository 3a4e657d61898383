"""Data check: every record of a run read and encoded before any weights load, and the samples shown as the model
sees them.

Run as:
    python -m vltrain.check                                  # the demo data with the tiny model's tokenizer
    python -m vltrain.check model=internvl2-8b dataset=custom dataset.train=[data.jsonl]   # same overrides as training
    python -m vltrain.check show=3                           # the first 3 samples, trained tokens marked
    python -m vltrain.check dump=samples.jsonl tiles_png=tiles/   # ids and labels of every sample; tiles as PNGs

It prints rows per split, images, videos, tiles and tokens (min / median / max), rows over `data.max_length`, and
every problem as `file:line: field: message`. Exit status: 0 when every record encodes, 1 when some do not, 2 for
a configuration error. Training runs the same check (`check_splits`) before it loads the model: `data.on_error`
decides whether a problem stops the run (`raise`, all problems listed) or its row is left out (`skip`, listed
in the log and in the run folder's `skipped_rows.jsonl`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vltrain.config import ConfigError, TrainConfig, build_dataclass, validate
from vltrain.data.dataset import parallel_map, row_error, try_encode
from vltrain.data.encode import IGNORE_INDEX, Encoder
from vltrain.data.records import Record, RecordError
from vltrain.data.tiling import denormalise
from vltrain.model.tokenizer import IMAGE_CONTEXT_TOKEN

log = logging.getLogger(__name__)

SKIPPED_ROWS = "skipped_rows.jsonl"


# ---- encoding every record ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What encoding one record gave: sizes, or the problem. `input_ids` / `labels` only when asked for."""

    tokens: int = 0
    trained: int = 0
    tiles_per_image: list[int] = field(default_factory=list)
    error: RecordError | None = None
    input_ids: list[int] | None = None
    labels: list[int] | None = None


def encode_outcome(encoder: Encoder, record: Record, keep_ids: bool = False) -> Outcome:
    """Encode one record and keep only its sizes (and ids when `keep_ids`), or its problem."""
    sample, error = try_encode(encoder, record, normalise=False)  # the pixels are dropped: skip the float math
    if sample is None:
        return Outcome(error=error)
    labels = sample.labels
    return Outcome(
        tokens=len(sample.input_ids),
        trained=int((labels != IGNORE_INDEX).sum()),
        tiles_per_image=list(sample.tiles_per_image),
        input_ids=sample.input_ids.tolist() if keep_ids else None,
        labels=labels.tolist() if keep_ids else None,
    )


def iter_outcomes(records: list[Record], encoder: Encoder, num_proc: int = 1,
                  keep_ids: bool = False) -> Iterator[Outcome]:
    """Encode `records` in order, in `num_proc` DataLoader worker processes when > 1; pixels stay in the workers."""
    yield from parallel_map(functools.partial(encode_outcome, encoder, keep_ids=keep_ids), records, num_proc)


def outcome_from_encoded_row(row: dict) -> Outcome:
    """The Outcome of one row of `vltrain.data.dataset.encode_with_datasets`."""
    error = row_error(row)
    if error is not None:
        return Outcome(error=error)
    labels = row["labels"]
    return Outcome(tokens=len(row["input_ids"]), trained=sum(1 for t in labels if t != IGNORE_INDEX),
                   tiles_per_image=list(row["tiles_per_image"]))


# ---- the report -----------------------------------------------------------------------------------------------


@dataclass
class SplitStats:
    """Sizes of the rows of one split that encoded (tiles and tokens: one entry per row)."""

    rows: int = 0
    images: int = 0
    videos: int = 0
    tiles: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    over_length: int = 0
    failed: int = 0


@dataclass
class CheckReport:
    """Per-split statistics and every problem found (each row's first problem, once per row)."""

    splits: dict[str, SplitStats]
    problems: list[RecordError]
    max_length: int = 0
    unreadable: int = 0
    """Rows that failed to parse (in no split; listed among the problems)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad_rows(self) -> set[tuple[str, int]]:
        """`Record.key` of every row with a problem."""
        return {p.key for p in self.problems}

    def format(self, problems: bool = True) -> str:
        """The summary table, then every problem (or only their count with `problems=False`)."""
        header = ("split", "rows", "images", "videos", "tiles min/med/max", "tokens min/med/max",
                  "trained min/med/max", f"over {self.max_length}", "failed")
        table = [header]
        for name, s in self.splits.items():
            table.append((name, str(s.rows), str(s.images), str(s.videos), _spread(s.tiles), _spread(s.tokens),
                          _spread(s.trained), str(s.over_length), str(s.failed)))
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in table]
        tiles = sum(sum(s.tiles) for s in self.splits.values())
        tokens = sum(sum(s.tokens) for s in self.splits.values())
        lines.append(f"total: {tiles} tiles, {tokens} tokens; {self.unreadable} row(s) could not be read")
        if self.problems:
            lines.append(f"{len(self.problems)} problem{'s' if len(self.problems) > 1 else ''}"
                         + (":" if problems else ""))
            lines += [f"  {p}" for p in self.problems] if problems else []
        else:
            lines.append("no problems")
        return "\n".join(lines)


def _spread(values: list[int]) -> str:
    if not values:
        return "-"
    return f"{min(values)} / {statistics.median(values):g} / {max(values)}"


class DataError(ConfigError):
    """Problems in the data that stop training (`data.on_error=raise`); the message lists every one."""


def check_splits(splits: dict[str, list[Record]], encoder: Encoder, num_proc: int = 1,
                 read_errors: Iterable[RecordError] = (),
                 on_outcome: Callable[[str, Record, Outcome], None] | None = None,
                 outcomes: dict[int, Outcome] | None = None, keep_ids: bool = False) -> CheckReport:
    """Encode every record of every split once (a record listed twice, e.g. by `#N`, is encoded once) and report.

    `read_errors`: rows that failed to parse, already collected by `load_splits`. `on_outcome(split, record,
    outcome)` sees each distinct record of each split in order (with ids when `keep_ids`). `outcomes`: results
    already computed elsewhere (by `id(record)`), e.g. by `encode_with_datasets`.
    """
    problems: dict[tuple[str, int], RecordError] = {}
    for e in read_errors:
        problems.setdefault(e.key, e)
    unique: dict[int, Record] = {}
    for records in splits.values():
        for r in records:
            unique.setdefault(id(r), r)
    if outcomes is None:
        todo = list(unique.values())
        outcomes = dict(zip(unique, iter_outcomes(todo, encoder, num_proc, keep_ids)))
    report = CheckReport(splits={}, problems=[], max_length=encoder.max_length, unreadable=len(problems))
    for name, records in splits.items():
        stats = report.splits[name] = SplitStats()
        seen: set[int] = set()
        for record in records:
            outcome = outcomes[id(record)]
            stats.rows += 1
            stats.images += len(record.images)
            stats.videos += len(record.videos)
            if outcome.error:
                stats.failed += 1
                stats.over_length += outcome.error.field.endswith("length")
                problems.setdefault(outcome.error.key, outcome.error)
            else:
                stats.tiles.append(sum(outcome.tiles_per_image))
                stats.tokens.append(outcome.tokens)
                stats.trained.append(outcome.trained)
            if on_outcome is not None and id(record) not in seen:
                seen.add(id(record))
                on_outcome(name, record, outcome)
    report.problems = sorted(problems.values(), key=lambda p: p.key)
    return report


def check_records(records: list[Record], encoder: Encoder, num_proc: int = 1) -> CheckReport:
    """`check_splits` for one list of records (reported as split `records`)."""
    return check_splits({"records": records}, encoder, num_proc)


def enforce(report: CheckReport, on_error: str, run_dir: Path | None = None) -> set[tuple[str, int]]:
    """Apply `data.on_error`: `raise` -> DataError listing every problem; `skip` -> log and write the rows left
    out (`skipped_rows.jsonl` in `run_dir`) and return their `Record.key` for the caller to drop."""
    if report.ok:
        return set()
    listing = "\n".join(f"  {p}" for p in report.problems)
    if on_error == "raise":
        raise DataError(f"{len(report.problems)} bad row(s) in the data (data.on_error=raise):\n{listing}\n"
                        "Fix them, or set data.on_error=skip to train without them; "
                        "`python -m vltrain.check <same overrides>` lists them without loading a model.")
    log.warning("data.on_error=skip: leaving out %d bad row(s):\n%s", len(report.problems), listing)
    if run_dir is not None:
        with (Path(run_dir) / SKIPPED_ROWS).open("w", encoding="utf-8") as f:
            for p in report.problems:
                f.write(json.dumps({"source": p.source, "line": p.line, "row": p.row, "field": p.field,
                                    "message": p.message}, ensure_ascii=False) + "\n")
    return report.bad_rows()


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


# ---- the command ----------------------------------------------------------------------------------------------


@dataclass
class CheckOptions:
    show: int = 0
    """Print the first N samples with trained tokens marked."""
    dump: str | None = None
    """JSONL file receiving `source`, `line`, `row`, `split`, `input_ids`, `labels`, `tiles_per_image` of every
    sample."""
    tiles_png: str | None = None
    """Folder receiving one PNG grid of tiles per image: of the first `show` records, or of all when show=0."""


CHECK_KEYS = tuple(CheckOptions.__dataclass_fields__)


def compose_check(overrides: list[str]) -> tuple[TrainConfig, CheckOptions]:
    """The TrainConfig training would use with these overrides, and the check-only options."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from vltrain.__main__ import add_or_override, check_overrides

    check_overrides(list(overrides), extra_keys=CHECK_KEYS)
    with initialize_config_module("vltrain.conf", version_base="1.3"):
        cfg = compose("check", overrides=["run_dir=outputs/check", *add_or_override(overrides)])
    data = OmegaConf.to_container(cfg, resolve=True)
    options = build_dataclass(CheckOptions, {k: data.pop(k) for k in CHECK_KEYS if k in data}, "")
    data.pop("recipe", None)
    return validate(data), options


def make_encoder(cfg: TrainConfig, model=None, tokenizer=None) -> Encoder:
    """The record encoder of a run: its template, system, tile budget and image geometry. The geometry comes from
    `model` when given, else from the model config alone (no weights loaded); `tokenizer` None loads the model's."""
    from vltrain.model.load import load_tokenizer_for, model_geometry, vision_geometry

    if tokenizer is None:
        tokenizer = load_tokenizer_for(cfg.model)
    tile_size, tokens_per_tile = vision_geometry(model) if model is not None else model_geometry(cfg.model)
    return Encoder.from_config(cfg, tokenizer, tile_size, tokens_per_tile)


def run_check(cfg: TrainConfig, options: CheckOptions) -> CheckReport:
    from vltrain.data.dataset import load_splits

    encoder = make_encoder(cfg)
    read_errors: list[RecordError] = []
    train, val = load_splits(cfg.dataset, errors=read_errors)
    splits = {"train": train, "val": val}
    print(f"model {cfg.model.name}: template {cfg.model.template}, {encoder.image_tokens_per_tile} tokens per "
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from hydra.errors import HydraException

    try:
        cfg, options = compose_check(argv)
    except (ConfigError, HydraException) as e:
        print(f"vltrain.check: config error: {e}", file=sys.stderr)
        return 2
    try:
        report = run_check(cfg, options)
    except ConfigError as e:  # a missing dataset file, an unreachable hub dataset, an unreadable tokenizer, ...
        print(f"vltrain.check: {e}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
