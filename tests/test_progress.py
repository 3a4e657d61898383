"""Progress: a bar on a terminal; plain periodic lines (no carriage returns) in logs and pipes; silence for quick work."""

from __future__ import annotations

import io
import re
import sys

from vltrain.progress import bar_class, progress, progress_line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_off_a_terminal():
    stream = io.StringIO()
    assert list(progress(range(4), desc="data check", unit="records", stream=stream, interval=0)) == [0, 1, 2, 3]
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"data check: {n}/4 records ({25 * n}%)" for n in (1, 2, 3, 4)]
    assert all(re.search(r", [\d.]+ records/s, \d:\d\d:\d\d elapsed", line) for line in lines)
    assert "ETA" not in lines[-1]


def test_quick_work_prints_nothing():
    stream = io.StringIO()
    assert sum(progress(range(1000), desc="quick", stream=stream, interval=3600)) == sum(range(1000))
    assert stream.getvalue() == ""


def test_a_bar_on_a_terminal():
    stream = Terminal()
    list(progress(range(3), desc="tty", stream=stream))
    assert "\r" in stream.getvalue() and "3/3" in stream.getvalue()


def test_library_bars_get_lines_or_tqdm():
    stream = io.StringIO()
    bar = bar_class(stream, interval=0)(total=2_000_000, unit="B", unit_scale=True, desc="Downloading")
    bar.update(1_000_000)
    bar.update(1_000_000)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("Downloading: 1.00MB/2.00MB (50%)") and lines[-1].startswith("Downloading: 2.00MB/2.00MB")
    assert "\r" not in stream.getvalue()
    from tqdm.auto import tqdm

    assert bar_class(Terminal()) is tqdm


def test_progress_line():
    assert progress_line("x", 1200, 20000, 3.0) == "x: 1200/20000 it (6%), 400.0 it/s, 0:00:03 elapsed, ETA 0:00:47"
    assert progress_line("x", 5, None, 2.0, "rows") == "x: 5 rows, 2.5 rows/s, 0:00:02 elapsed"
    assert progress_line("get", 1.5e9, 3e9, 3600.0, "B", unit_scale=True) == \
        "get: 1.50GB/3.00GB (50%), 417kB/s, 1:00:00 elapsed, ETA 1:00:00"


def test_library_bars_quiet_off_a_terminal():
    import datasets
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    from vltrain.progress import quiet_library_bars

    def enable():
        datasets.enable_progress_bars()
        enable_progress_bars()
        transformers_logging.enable_progress_bar()

    try:
        enable()
        quiet_library_bars(Terminal())
        assert datasets.is_progress_bar_enabled() and not are_progress_bars_disabled()
        quiet_library_bars(io.StringIO())
        assert not datasets.is_progress_bar_enabled() and are_progress_bars_disabled()
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        enable()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_training_draws_bars_only_on_a_terminal(tmp_path, monkeypatch):
    """Off a terminal the Trainer prints each logged step as a line (no carriage-return bars in log files)."""
    from vltrain.config import compose_config
    from vltrain.train.recipe import build_training_arguments

    cfg = compose_config([], run_dir=str(tmp_path / "run"))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert build_training_arguments(cfg, tmp_path / "run", 1).disable_tqdm
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert not build_training_arguments(cfg, tmp_path / "run", 1).disable_tqdm
    cfg = compose_config(["trainer.disable_tqdm=false"], run_dir=str(tmp_path / "run"))
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not build_training_arguments(cfg, tmp_path / "run", 1).disable_tqdm  # the user's choice wins
