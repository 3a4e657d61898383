"""Progress on long work (the data check, encoding, downloads, conversion, export, evaluation).

On a terminal: a tqdm bar. Anywhere else (a log file, CI, a pipe): one plain line every `interval` seconds, with
the count, the rate and the time left, and no carriage returns. Libraries that draw their own bars
(`datasets.map`, `huggingface_hub` downloads) follow the same rule through `quiet_library_bars`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             stream: TextIO | None = None, interval: float = 5.0) -> Iterator[T]:
    """Yield `items`, showing progress on `stream` (default stderr): a bar on a terminal, a line every `interval`
    seconds elsewhere, and a closing line with the total time."""
    stream = stream or sys.stderr
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if is_terminal(stream):
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    n = shown = 0
    for item in items:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= interval:
            last, shown = now, n
            print(progress_line(desc, n, total, now - start, unit), file=stream, flush=True)
    if n != shown and time.monotonic() - start >= interval:
        print(progress_line(desc, n, total, time.monotonic() - start, unit), file=stream, flush=True)


def progress_line(desc: str, n: int, total: int | None, elapsed: float, unit: str = "it") -> str:
    """`desc: 1200/20000 it (6%), 350.2 it/s, 0:00:03 elapsed, ETA 0:00:48`."""
    rate = n / elapsed if elapsed > 0 else 0.0
    parts = [f"{desc}: {n}/{total} {unit}" + (f" ({100 * n / total:.0f}%)" if total else "") if total is not None
             else f"{desc}: {n} {unit}", f"{rate:.1f} {unit}/s", f"{_clock(elapsed)} elapsed"]
    if total and rate > 0 and n < total:
        parts.append(f"ETA {_clock((total - n) / rate)}")
    return ", ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Turn off the bars that `datasets` and `huggingface_hub` draw themselves when `stream` is not a terminal
    (they would fill a log with carriage returns); progress then comes from `progress` lines."""
    if is_terminal(stream):
        return
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
