"""Progress on long work (the data check, encoding, downloads, conversion, export, evaluation).

On a terminal: a tqdm bar. Anywhere else (a log file, CI, a pipe): `LineBar`, the same tqdm with its drawing
replaced by one plain line every `interval` seconds (count, rate, time left) and no carriage returns. Libraries
that take a tqdm class (`huggingface_hub` downloads) get one from `bar_class`; those that draw their own bars
(`datasets.map`, transformers' shard writing) are turned off on a non-terminal by `quiet_library_bars`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm

T = TypeVar("T")


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class LineBar(plain_tqdm):  # tqdm.std: in a notebook tqdm.auto would be the widget class
    """tqdm that prints `progress_line` at most every `interval` seconds instead of redrawing a bar, and a closing
    line with the total time when the work took longer than `interval`. Nothing is written before the first
    interval has passed, so quick work stays silent."""

    monitor_interval = 0  # no monitor thread (tqdm starts one per bar class, and it outlives the bar)

    def __init__(self, *args, interval: float = 5.0, **kwargs):
        self.interval = interval
        self._shown_n = 0
        self._shown_at: float | None = None  # None: nothing printed yet (the interval counts from the start)
        kwargs["mininterval"] = interval  # tqdm asks `display` no more often than this
        kwargs.pop("dynamic_ncols", None)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None) -> bool:
        if msg == "":  # tqdm clearing the line (on close): nothing to clear
            return False
        start = getattr(self, "start_t", None)
        if start is None:  # tqdm's first refresh, from inside its constructor
            return True
        now = self._time()
        if self.n != self._shown_n and now - (self._shown_at or start) >= self.interval:
            self._print(now)
        return True

    def _print(self, now: float) -> None:
        self._shown_n, self._shown_at = self.n, now
        line = progress_line(self.desc, self.n, self.total, now - self.start_t, self.unit, self.unit_scale)
        print(line, file=self.fp, flush=True)

    def close(self) -> None:
        if not self.disable:
            now = self._time()
            if self.n != self._shown_n and now - self.start_t >= self.interval:
                self._print(now)
            self.leave = False  # tqdm then "clears" through display(msg=""), which writes nothing
        super().close()

    def clear(self, nolock=False) -> None:
        pass

    def moveto(self, n) -> None:
        pass


def bar_class(stream: TextIO | None = None, interval: float = 5.0) -> type[plain_tqdm]:
    """A tqdm class for libraries that take one (`tqdm_class=`): tqdm's own on a terminal, else a `LineBar`
    writing to `stream` (default stderr) every `interval` seconds."""
    stream = stream or sys.stderr
    if is_terminal(stream):
        return tqdm

    class BoundLineBar(LineBar):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("file", stream)
            kwargs.setdefault("interval", interval)
            super().__init__(*args, **kwargs)

    return BoundLineBar


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             stream: TextIO | None = None, interval: float = 5.0) -> Iterator[T]:
    """Yield `items`, showing progress on `stream` (default stderr): a bar on a terminal, a line every `interval`
    seconds elsewhere, and a closing line with the total time."""
    stream = stream or sys.stderr
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar_class(stream, interval)(items, total=total, desc=desc, unit=unit, file=stream,
                                     dynamic_ncols=True) as bar:
        yield from bar


def progress_line(desc: str, n: float, total: float | None, elapsed: float, unit: str = "it",
                  unit_scale: bool = False) -> str:
    """`desc: 1200/20000 it (6%), 350.2 it/s, 0:00:03 elapsed, ETA 0:00:48`; with `unit_scale`, sizes as
    `1.20MB/3.00GB`."""
    rate = n / elapsed if elapsed > 0 else 0.0
    if unit_scale:  # 1.20MB/3.00GB, 98.5MB/s
        count = f"{plain_tqdm.format_sizeof(n)}{unit}" + (f"/{plain_tqdm.format_sizeof(total)}{unit}" if total else "")
        speed = f"{plain_tqdm.format_sizeof(rate)}{unit}/s"
    else:  # 1200/20000 it, 350.2 it/s
        count = f"{n:g}" + (f"/{total:g}" if total is not None else "") + f" {unit}"
        speed = f"{rate:.1f} {unit}/s"
    if total:
        count += f" ({100 * n / total:.0f}%)"
    parts = [f"{desc}: {count}" if desc else count, speed, f"{_clock(elapsed)} elapsed"]
    if total and rate > 0 and n < total:
        parts.append(f"ETA {_clock((total - n) / rate)}")
    return ", ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Turn off the bars that `datasets`, `huggingface_hub` and `transformers` (e.g. "Writing model shards") draw
    themselves when `stream` is not a terminal (they would fill a log with carriage returns); progress then comes
    from `progress` lines. The Trainer's own bar follows `TrainingArguments.disable_tqdm` instead."""
    if is_terminal(stream):
        return
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
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
