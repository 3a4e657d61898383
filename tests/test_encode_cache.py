"""The encode cache stays within `data.encode_cache_max_gb`: least recently used entries are evicted whole, never one a
running process uses (held by real processes here, one of them killed); leftovers of killed writers go too;
`python -m vltrain.check cache=info|clear`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vltrain.data import cache_store
from vltrain.data.cache_store import EncodeCache

ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000

HOLDER = r"""
import sys, time
from vltrain.data.cache_store import EncodeCache
cache = EncodeCache(sys.argv[1])
if sys.argv[2] == "read":
    assert cache.open(sys.argv[3]) is not None
    print("holding", flush=True)
else:  # start writing an entry and stay inside the write
    with cache.writing(sys.argv[3]) as tmp:
        (tmp / "encoded.arrow").write_bytes(b"x" * 1000)
        print("holding", flush=True)
        time.sleep(600)
time.sleep(600)
"""


@pytest.fixture
def holder():
    """Start processes that hold a cache entry (reading it, or inside its write) until killed."""
    procs = []

    def start(cache: EncodeCache, mode: str, name: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache.root), mode, name], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout.readline().strip() == "holding"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def make_entry(cache: EncodeCache, name: str, size: int, last_used: float) -> None:
    """A complete entry of `size` bytes last used at `last_used` (not held by this process afterwards)."""
    with cache.writing(name, {"rows": 1, "sources": [f"{name}.jsonl"]}) as tmp:
        (tmp / "encoded.arrow").write_bytes(b"\0" * size)
    release(cache, name)
    os.utime(cache.root / name / "lock", (last_used, last_used))


def release(cache: EncodeCache, name: str) -> None:
    fd = cache_store._IN_USE.pop(str(cache.root / name), None)
    if fd is not None:
        os.close(fd)


def names(cache: EncodeCache) -> list[str]:
    return [e.name for e in cache.entries()]


def test_least_recently_used_entries_are_evicted_whole_until_within_budget(tmp_path):
    cache = EncodeCache(tmp_path / "cache")
    now = time.time()
    for i, name in enumerate(["a", "b", "c", "d"]):
        make_entry(cache, name, 3 * MB, now - 100 + i)  # a is the least recently used
    assert cache.open("b") is not None  # using b makes it the most recent
    release(cache, "b")
    assert names(cache) == ["a", "c", "d", "b"]
    evicted = cache.enforce(7 * MB / 1e9)  # 12 MB -> at most 7: two entries go, the least recently used
    assert [e.name for e in evicted] == ["a", "c"]
    assert names(cache) == ["d", "b"]
    assert not any(p.name.startswith(".") for p in cache.root.iterdir())  # nothing half-deleted left
    assert (cache.root / "d" / "encoded.arrow").stat().st_size == 3 * MB  # survivors intact
    assert cache.open("a") is None  # an evicted entry is gone for readers


def test_an_entry_in_use_is_never_evicted(tmp_path, holder, caplog):
    cache = EncodeCache(tmp_path / "cache")
    now = time.time()
    for i, name in enumerate(["old", "mid", "new"]):
        make_entry(cache, name, 2 * MB, now - 100 + i)
    reader = holder(cache, "read", "old")  # another process reads the least recently used entry
    assert [e.name for e in cache.entries() if e.in_use] == ["old"]
    evicted = cache.enforce(1 * MB / 1e9)
    assert [e.name for e in evicted] == ["mid", "new"]
    assert names(cache) == ["old"] and "entries in use by running jobs" in caplog.text
    reader.send_signal(signal.SIGKILL)  # killed: the kernel drops its lock
    reader.wait()
    assert [e.name for e in cache.enforce(1 * MB / 1e9)] == ["old"]
    assert names(cache) == []


def test_this_process_s_own_entry_is_kept(tmp_path):
    cache = EncodeCache(tmp_path / "cache")
    make_entry(cache, "other", MB, time.time() - 10)
    with cache.writing("mine") as tmp:
        (tmp / "encoded.arrow").write_bytes(b"\0" * 2 * MB)
    try:
        assert [e.name for e in cache.enforce(1e-9)] == ["other"]
        assert names(cache) == ["mine"]
    finally:
        release(cache, "mine")


def test_leftovers_of_killed_writers_go_but_a_live_writer_s_folder_stays(tmp_path, holder, monkeypatch):
    cache = EncodeCache(tmp_path / "cache")
    killed = holder(cache, "write", "k")
    live = holder(cache, "write", "l")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    monkeypatch.setattr(cache_store, "STALE_TMP_S", 0.0)
    (cache.root / f".evict-x-{os.getpid()}").mkdir()  # an eviction killed between rename and delete
    leftovers = {p.name.split("-")[1] if p.name.startswith(".tmp") else p.name for p in cache.leftovers()}
    assert leftovers == {"k", f".evict-x-{os.getpid()}"}
    cache.enforce(100)
    remaining = sorted(p.name for p in cache.root.iterdir())
    assert len(remaining) == 1 and remaining[0].startswith(".tmp-l-")
    live.kill()


def test_a_killed_write_leaves_no_entry_and_a_finished_one_is_in_use(tmp_path):
    cache = EncodeCache(tmp_path / "cache")
    with pytest.raises(RuntimeError):
        with cache.writing("broken") as tmp:
            (tmp / "encoded.arrow").write_bytes(b"\0" * 100)
            raise RuntimeError("encoding failed")
    assert not list(cache.root.iterdir())
    with cache.writing("ok", {"rows": 3}) as tmp:
        (tmp / "encoded.arrow").write_bytes(b"\0" * 100)
    try:
        (entry,) = cache.entries()
        assert entry.name == "ok" and entry.rows == 3 and entry.in_use and entry.bytes >= 100
    finally:
        release(cache, "ok")


def test_encoding_keeps_the_cache_within_its_budget(tmp_path, monkeypatch):
    """Three runs on different records with a budget that holds two of their entries: the first is evicted when
    the third is written; a run whose entry alone exceeds the budget keeps it while it runs."""
    import vltrain.data.encode_cache as ds
    from vltrain.config import compose_config
    from vltrain.data.demo import write_demo_dataset
    from vltrain.data.records import read_records
    from vltrain.model.load import make_encoder

    demo = write_demo_dataset(tmp_path / "demo", n_train=12, n_val=0)
    records = read_records(demo.train)
    encoder = make_encoder(compose_config(["dataset=custom", f"dataset.train=[{demo.train}]"]))
    root = tmp_path / "cache"
    sizes = []
    for part in range(3):
        ds.encode_with_datasets(records[4 * part:4 * part + 4], encoder, root)
        sizes.append(EncodeCache(root).entries()[-1].bytes)
    cache = EncodeCache(root)
    for entry in cache.entries():
        release(cache, entry.name)  # as if those runs had ended
    budget = (sizes[1] + sizes[2] + max(sizes)) / 1e9
    first = cache.entries()[0].name
    ds.encode_with_datasets(records[1:5], encoder, root, max_gb=budget)  # a fourth entry: the oldest goes
    assert first not in names(cache) and len(names(cache)) == 3
    tiny_budget = 1e-9
    again = ds.encode_with_datasets(records[2:6], encoder, root, max_gb=tiny_budget)
    assert len(again) == 4 and len(names(cache)) == 2  # its own entry and the one this process still uses


def test_check_command_lists_and_clears_the_cache(tmp_path, holder, capsys):
    from vltrain.cli.check import main as check_main

    cache = EncodeCache(tmp_path / "cache")
    now = time.time()
    make_entry(cache, "a" * 64, 2 * MB, now - 50)
    make_entry(cache, "b" * 64, 1 * MB, now - 10)
    holder(cache, "read", "b" * 64)
    args = [f"data.encode_cache={cache.root}", "data.encode_cache_max_gb=5"]
    assert check_main([*args, "cache=info"]) == 0
    out = capsys.readouterr().out
    assert f"encode cache {cache.root}: 2 entries, 0.00 GB of data.encode_cache_max_gb=5" in out
    assert "aaaaaaaaaaaaaaaa     0.002 GB" in out and "IN USE" in out and "a" * 64 + ".jsonl" in out
    assert check_main([*args, "cache=clear"]) == 0
    out = capsys.readouterr().out
    assert "deleted 1 entries (0.00 GB); 1 in use by running jobs kept" in out
    assert names(cache) == ["b" * 64]
    assert check_main([*args, "cache=everything"]) == 2
    assert "cache: 'everything' is not one of info, clear" in capsys.readouterr().err
