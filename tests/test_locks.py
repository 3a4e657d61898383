"""Files that several processes (the ranks of a run) create in a shared folder: one writes, the others wait and
read its result. Real processes, no threads: the demo dataset and a hub dataset's rows."""

from __future__ import annotations

import io
import json
import multiprocessing
import time
from pathlib import Path

import pytest
from PIL import Image

from vltrain.data import specs
from vltrain.data.demo import write_demo_dataset

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
FORK = multiprocessing.get_context("fork")  # the children inherit the stand-in fetch below


def _rows(n: int):
    import datasets

    def png(i):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    return datasets.Dataset.from_dict({"image": [png(i) for i in range(n)],
                                       "answer": [[f"caption {i}"] for i in range(n)]})


def _fetch_slowly(log: Path):
    def fetch(name, entry, hub):
        with open(log, "a") as f:
            f.write("fetch\n")
        time.sleep(0.5)  # long enough for the other process to arrive while this one holds the lock
        return _rows(5)
    return fetch


def _hub_worker(cache: str, out: str):
    path = specs.hub_spec_file("coco-en-2-mini", None, 3, 0, Path(cache))
    Path(out).write_text(path.read_text())


def test_hub_rows_fetched_once_by_racing_processes(tmp_path, monkeypatch):
    log = tmp_path / "fetches.log"
    monkeypatch.setattr(specs, "_fetch_hub_rows", _fetch_slowly(log))
    procs = [FORK.Process(target=_hub_worker, args=(str(tmp_path / "cache"), str(tmp_path / f"out{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "fetch\n"  # one process fetched; the other waited and read its file
    first, second = (tmp_path / "out0").read_text(), (tmp_path / "out1").read_text()
    assert first == second and len(first.splitlines()) == 3
    assert all(json.loads(line)["response"].startswith("caption ") for line in first.splitlines())


def _demo_worker(root: str, out: str):
    split = write_demo_dataset(Path(root), n_train=20, n_val=5)
    Path(out).write_text(split.train.read_text() + split.val.read_text())


def test_demo_data_written_once_by_racing_processes(tmp_path):
    root = tmp_path / "demo"
    procs = [FORK.Process(target=_demo_worker, args=(str(root), str(tmp_path / f"out{i}"))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    texts = {(tmp_path / f"out{i}").read_text() for i in range(3)}
    assert len(texts) == 1 and len(texts.pop().splitlines()) == 25
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == \
        ["demo_stamp.json", "images", "train.jsonl", "val.jsonl"]  # no temporary file left behind
