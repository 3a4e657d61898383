"""Two nodes without a shared encode cache (two torchrun launches of 2 processes on this machine, each node with its
own `data.encode_cache`): each node encodes its records once, on its local rank 0, never once per rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vltrain.data.demo import write_demo_dataset

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parent.parent

# Runs `python -m vltrain`, recording each entry written into an encode cache as `<rank> <cache folder>`.
RUNNER = r"""
import os, sys
import vltrain.data.cache_store as store
writing = store.EncodeCache.writing
def recorded(self, name, info=None):
    with open(os.environ["WRITES_LOG"], "a") as log:
        log.write(f"{os.environ['RANK']} {self.root}\n")
    return writing(self, name, info)
store.EncodeCache.writing = recorded
from vltrain.cli import entry
sys.argv = ["vltrain", *sys.argv[1:]]
if __name__ == "__main__":  # DataLoader workers import this file as __mp_main__ (fork server)
    entry()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_node_encodes_once_into_its_own_cache(tmp_path):
    demo = write_demo_dataset(tmp_path / "demo", n_train=8, n_val=0)
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER, encoding="utf-8")
    writes = tmp_path / "writes.log"
    port = free_port()
    args = ["parallel=ddp", "dataset=custom", f"dataset.train=[{demo.train}]", "dataset.val_ratio=0",
            "global_batch_size=4", "trainer.per_device_train_batch_size=1", "trainer.max_steps=1",
            "trainer.save_steps=1", "trainer.eval_strategy=no", "trainer.dataloader_num_workers=0",
            f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WRITES_LOG": str(writes)}
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), str(runner), *args,
               f"data.encode_cache={tmp_path / f'node{node}' / 'cache'}"]
        nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [proc.communicate(timeout=600)[0] for proc in nodes]
    for proc, out in zip(nodes, outputs):
        assert proc.returncode == 0, out[-4000:]
    lines = sorted(writes.read_text().splitlines())
    assert lines == [f"0 {tmp_path / 'node0' / 'cache'}", f"2 {tmp_path / 'node1' / 'cache'}"]  # local rank 0 each
    for node in (0, 1):
        entries = [p for p in (tmp_path / f"node{node}" / "cache").iterdir() if (p / "complete.json").is_file()]
        assert len(entries) == 1
    assert (tmp_path / "run" / "checkpoint-1").is_dir()
