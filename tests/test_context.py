"""The process context: read once from the launcher's environment (torchrun's RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE), a single process being rank 0 of a world of 1."""

from __future__ import annotations

import pytest

from vltrain.config import ConfigError
from vltrain.context import ProcessContext, process


def test_a_single_process_is_the_main_one():
    single = ProcessContext.from_environ({})
    assert (single.rank, single.local_rank, single.world_size, single.local_world_size) == (0, 0, 1, 1)
    assert single.is_main and single.is_local_main and not single.distributed


def test_torchrun_environment():
    second_node = ProcessContext.from_environ({"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16",
                                               "LOCAL_WORLD_SIZE": "8"})
    assert (second_node.rank, second_node.local_rank, second_node.world_size, second_node.local_world_size) == (
        9, 1, 16, 8)
    assert not second_node.is_main and not second_node.is_local_main and second_node.distributed
    assert ProcessContext.from_environ({"RANK": "8", "LOCAL_RANK": "0", "WORLD_SIZE": "16"}).is_local_main
    assert ProcessContext.from_environ({"RANK": ""}) == ProcessContext()  # set but empty: the default
    with pytest.raises(ConfigError, match="WORLD_SIZE=x: not a whole number"):
        ProcessContext.from_environ({"WORLD_SIZE": "x"})


def test_read_once():
    assert process() is process()
