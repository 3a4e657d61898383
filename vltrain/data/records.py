"""Records: one JSONL row in the ms-swift 2.x format, read and checked into a `Record`.

A row holds `query`, `response`, optional `history` ([[query, response], ...]), `system` and `images` (paths
relative to the JSONL file, or absolute). Every problem is a `RecordError` that reads `file:line: field: message`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

KNOWN_FIELDS = ("query", "response", "history", "system", "images")


class RecordError(ValueError):
    """A problem with one row, located as `file:line: field: message`."""

    def __init__(self, source: str, line: int, field_name: str, message: str):
        self.source, self.line, self.field, self.message = source, line, field_name, message
        super().__init__(f"{source}:{line}: {field_name}: {message}")


@dataclass
class Record:
    """One conversation. `history` rounds come before the final (`query`, `response`) round."""

    query: str
    response: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None
    images: list[Path] = field(default_factory=list)
    source: str = "<memory>"
    line: int = 0

    @property
    def rounds(self) -> list[tuple[str, str]]:
        return [*self.history, (self.query, self.response)]

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_records(path: str | Path) -> list[Record]:
    """Read every row of a JSONL file; the first malformed row raises a RecordError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset file not found")
    if path.suffix != ".jsonl":
        raise RecordError(str(path), 0, "file", f"unsupported extension '{path.suffix}' (expected .jsonl)")
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(str(path), line_no, "json", f"invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(parse_row(row, str(path), line_no, path.parent))
    if not records:
        raise RecordError(str(path), 0, "file", "no rows")
    return records


def parse_row(row, source: str, line: int, base_dir: Path) -> Record:
    def fail(field_name: str, message: str):
        raise RecordError(source, line, field_name, message)

    if not isinstance(row, dict):
        fail("row", f"expected a JSON object, got {type(row).__name__}")
    unknown = [k for k in row if k not in KNOWN_FIELDS]
    if unknown:
        fail(unknown[0], f"unknown field (known: {', '.join(KNOWN_FIELDS)})")
    for name in ("query", "response"):
        if not isinstance(row.get(name), str):
            fail(name, "missing" if name not in row else f"expected a string, got {type(row[name]).__name__}")
    if not row["response"].strip():
        fail("response", "empty: the row has nothing to learn")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        fail("system", f"expected a string or null, got {type(system).__name__}")

    history = row.get("history") or []
    if not isinstance(history, list):
        fail("history", f"expected a list of [query, response] pairs, got {type(history).__name__}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            fail(f"history[{i}]", "expected a [query, response] pair of strings")
        if not pair[1].strip():
            fail(f"history[{i}][1]", "empty response: the round has nothing to learn")

    images = row.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        fail("images", "expected a list of image paths")
    paths = [base_dir / p for p in images]  # an absolute path stays absolute
    for i, p in enumerate(paths):
        if not p.is_file():
            fail(f"images[{i}]", f"file not found: {p}")

    return Record(
        query=row["query"],
        response=row["response"],
        history=[(q, a) for q, a in history],
        system=system,
        images=paths,
        source=source,
        line=line,
    )
