"""The data check: every record of a run read and encoded before any weights load, summarised per split.

Training and `python -m vltrain.check` share it. `check_splits` encodes each distinct record once (in `num_proc`
processes), collects sizes and problems into a `CheckReport`; `enforce` applies `data.on_error`: `raise` stops with
every problem listed (`DataError`), `skip` leaves the rows out, logged and written to `skipped_rows.jsonl`.
"""

from __future__ import annotations

import functools
import json
import logging
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vltrain.config import ConfigError
from vltrain.data.encode import IGNORE_INDEX, Encoder
from vltrain.data.encode_cache import parallel_map, row_error, try_encode
from vltrain.data.records import Record, RecordError
from vltrain.progress import progress

log = logging.getLogger(__name__)

SKIPPED_ROWS = "skipped_rows.jsonl"
PROGRESS_INTERVAL = 5.0
"""Seconds between progress lines of the data check on a non-terminal stream."""


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
    """Encode `records` in order, in `num_proc` worker processes when > 1; pixels stay in the workers. Progress
    goes to stderr (`vltrain.progress.progress`: a bar on a terminal, a line every few seconds elsewhere)."""
    outcomes = parallel_map(functools.partial(encode_outcome, encoder, keep_ids=keep_ids), records, num_proc)
    yield from progress(outcomes, len(records), desc="data check", unit="records", interval=PROGRESS_INTERVAL)


def outcome_from_encoded_row(row: dict) -> Outcome:
    """The Outcome of one row of `vltrain.data.encode_cache.encode_with_datasets`."""
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
        outcomes = dict(zip(unique, list(iter_outcomes(todo, encoder, num_proc, keep_ids))))  # list: the closing line
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
