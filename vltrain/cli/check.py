"""vltrain check (also python -m vltrain.check): every record of a run read and encoded before any weights load,
and the samples shown as the model sees them.

Run as:
    vltrain check                                  # the demo data with the tiny model's tokenizer
    vltrain check model=internvl2-8b dataset=custom dataset.train=[data.jsonl]   # same overrides as training
    vltrain check show=3                           # the first 3 samples, trained tokens marked
    vltrain check dump=samples.jsonl tiles_png=tiles/   # ids and labels of every sample; tiles as PNGs
    vltrain check cache=info                       # the encode cache's entries, sizes, last use
    vltrain check cache=clear                      # delete the entries no running job uses

It prints rows per split, images, videos, tiles and tokens (min / median / max), rows over `data.max_length`, and
every problem as `file:line: field: message`. Exit status: 0 when every record encodes, 1 when some do not, 2 for
a configuration error. Training runs the same check (`check_splits`) before it loads the model: `data.on_error`
decides whether a problem stops the run (`raise`, all problems listed) or its row is left out (`skip`, listed
in the log and in the run folder's `skipped_rows.jsonl`).
"""

from __future__ import annotations

from vltrain.cli import run_command
from vltrain.config import TrainConfig, compose_command
from vltrain.data.inspect import CheckOptions


def compose_check(overrides: list[str]) -> tuple[TrainConfig, CheckOptions]:
    """The TrainConfig training would use with these overrides, and the check-only options."""
    return compose_command(overrides, "check", CheckOptions, run_dir="outputs/check")


def check_command(argv: list[str]) -> int:
    from vltrain.data.inspect import cache_command, run_check

    cfg, options = compose_check(argv)
    if options.cache is not None:
        return cache_command(cfg, options.cache)
    return 0 if run_check(cfg, options).ok else 1


def main(argv: list[str]) -> int:
    return run_command("vltrain.check", check_command, argv, help_text=__doc__)
