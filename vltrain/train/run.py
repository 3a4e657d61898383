"""The run folder: one per training run, its path decided once for every rank, its shared files written by rank 0.

Layout (README "Where outputs go"): the validated config (`vltrain.yaml`), the random base model (`base_model/`),
logs and plots, and `checkpoint-<step>/` folders. Every rank computes what it needs; only the main process writes
here, and writes are atomic (a temporary name renamed into place), so a reader never sees half a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vltrain.config import TrainConfig
from vltrain.context import process
from vltrain.files import write_atomic
from vltrain.manifest import BASE_MODEL_DIR


@dataclass(frozen=True)
class RunFolder:
    """One run's folder. `is_main`: this process writes the shared files."""

    path: Path
    is_main: bool = True

    @classmethod
    def for_config(cls, cfg: TrainConfig) -> RunFolder:
        return cls(Path(cfg.run_dir).resolve(), is_main=process().is_main)

    def create(self) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)

    def write_text(self, name: str, text: str) -> Path:
        """`text` into `<run>/<name>` atomically (main process only; a no-op elsewhere)."""
        target = self.path / name
        if self.is_main:
            write_atomic(target, text)
        return target

    @property
    def base_model(self) -> Path:
        return self.path / BASE_MODEL_DIR


def shared_stamp(fmt: str = "%Y%m%d-%H%M%S") -> str:
    """The launch time as rank 0 read it, on every rank (joins the process group of a multi-process launch):
    what names the run folder, so that all ranks use one."""
    import time

    from vltrain.train.parallel import broadcast_from_rank0, init_process_group

    stamp = time.strftime(fmt)
    if not init_process_group():
        return stamp
    return broadcast_from_rank0(stamp)
