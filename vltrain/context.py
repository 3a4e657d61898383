"""The process context: this process's place in a (possibly multi-process) job, read once from the launcher.

torchrun (and the `deepspeed` launcher, whose `--local_rank` the train command moves into LOCAL_RANK first) tell a
process where it stands through RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE. `process()` reads them once;
everything else asks it (`process().is_main`) instead of reading the environment again. A single process is
rank 0 of a world of 1.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass

from vltrain.config import ConfigError


@dataclass(frozen=True)
class ProcessContext:
    rank: int = 0
    """Global rank: 0 .. world_size - 1."""
    local_rank: int = 0
    """Rank on this node (the GPU this process uses)."""
    world_size: int = 1
    """Processes in the job, over every node."""
    local_world_size: int = 1
    """Processes on this node (they share its cores)."""

    @property
    def is_main(self) -> bool:
        """This process writes the shared files (run folder, checkpoints' run files, logs)."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """This process does a node's one-off work (downloads into a node-local cache)."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ProcessContext:
        env = os.environ if environ is None else environ

        def number(key: str, default: int) -> int:
            value = env.get(key, "")
            try:
                return int(value) if value else default
            except ValueError:
                raise ConfigError(f"{key}={value}: not a whole number (set by the launcher: torchrun, deepspeed)") \
                    from None

        return cls(rank=number("RANK", 0), local_rank=number("LOCAL_RANK", 0),
                   world_size=number("WORLD_SIZE", 1), local_world_size=number("LOCAL_WORLD_SIZE", 1))


@functools.cache
def process() -> ProcessContext:
    """This process's context, read from the launcher's environment on first use."""
    return ProcessContext.from_environ()
