"""The encode cache's folder: its entries, which of them running jobs use, and its size budget.

Layout of `data.encode_cache` (default `~/.cache/vltrain/encoded`):

    <fingerprint>/                    one entry: encoded.arrow, complete.json (rows, bytes, sources), lock
    .tmp-<fingerprint>-<host>-<pid>/  an entry being written, renamed to <fingerprint>/ once complete
    .evict-<fingerprint>-<pid>/       an entry being deleted

In use: a process that writes or reads an entry holds a shared `flock` on the entry's `lock` file until it ends
(the kernel releases it however the process ends, SIGKILL included; DataLoader workers share it). Eviction takes
the exclusive lock without waiting, so an entry in use is never evicted; it renames the entry away under that lock
and deletes it after, and a reader checks, once it holds its shared lock, that the entry is still the one at its
name. Least recently used: the `lock` file's mtime, touched at every use. flock works across the processes of one
machine and, on Linux, across NFS clients (the kernel maps it to NFS byte-range locks).

Budget (`data.encode_cache_max_gb`): after a run writes an entry, complete entries are evicted whole, least
recently used first, until the folder holds at most the budget; entries in use stay (a warning says when they
alone exceed it). Leftovers of killed writers or evictions (`.tmp-*` no process holds, `.evict-*`) count against
the budget and are removed on the way. `python -m vltrain.check ... cache=info` lists the entries,
`cache=clear` evicts every entry not in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = "lock"
COMPLETE = "complete.json"
TMP_PREFIX = ".tmp-"
EVICT_PREFIX = ".evict-"
STALE_TMP_S = 600.0
"""A `.tmp-*` folder whose lock no process holds is a killed writer's once this old (a live writer holds its lock
from the moment after it creates the folder)."""

_IN_USE: dict[str, int] = {}
"""Entry path -> the descriptor holding its shared lock, for the life of this process."""


@dataclass
class Entry:
    name: str
    path: Path
    bytes: int
    rows: int | None
    sources: list[str]
    last_used: float
    in_use: bool


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _touch(path: Path) -> None:
    """Record a use (the lock file's mtime); a cache this user may not write keeps its times."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _try_exclusive(lock_file: Path) -> int | None:
    """A descriptor holding the exclusive lock on `lock_file`, or None when some process holds it (or it is
    gone)."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class EncodeCache:
    """The entries under `root` (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    # ---- using an entry ---------------------------------------------------------------------------------------

    def open(self, name: str) -> Path | None:
        """The complete entry `name`, now marked in use by this process (and its last use now), or None when the
        cache has no complete entry of that name."""
        path = self.root / name
        key = str(path)
        if key in _IN_USE:
            _touch(path / LOCK)
            return path
        if not (path / COMPLETE).is_file():
            return None
        try:
            # O_CREAT: an entry written before entries had locks gets one; inside a renamed-away folder the open
            # fails (the folder is gone from this name)
            fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            return None
        except PermissionError:  # a cache shared read-only: still marked in use (flock needs no write access)
            try:
                fd = os.open(path / LOCK, os.O_RDONLY)
            except OSError:
                return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an eviction renames it away
        try:
            same = os.fstat(fd).st_ino == os.stat(path / LOCK).st_ino and (path / COMPLETE).is_file()
        except FileNotFoundError:
            same = False
        if not same:  # evicted while this process waited
            os.close(fd)
            return None
        _touch(path / LOCK)
        _IN_USE[key] = fd
        return path

    @contextlib.contextmanager
    def writing(self, name: str, info: dict | None = None) -> Iterator[Path]:
        """Yield a private folder to write entry `name` into; when the block ends without an error, record it
        complete (`info` plus its rows and size) and rename it into place, in use by this process. Another process
        that completed the same entry first wins: this copy is discarded and that one is used. An error (or a
        kill) leaves nothing behind, or a `.tmp-*` folder that a later eviction removes."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{name}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)  # in use from the start: an eviction leaves a live writer's folder alone
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(fd)
            raise
        (tmp / COMPLETE).write_text(json.dumps({**(info or {}), "bytes": folder_bytes(tmp)}), encoding="utf-8")
        final = self.root / name
        try:
            tmp.rename(final)  # atomic; fails when `final` exists (another process renamed its copy first)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            os.close(fd)
            if self.open(name) is None:
                raise
            return
        _IN_USE[str(final)] = fd  # the same lock file, now at the entry's name

    # ---- what is there ----------------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Complete entries, least recently used first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not (path / COMPLETE).is_file():
                continue
            try:
                info = json.loads((path / COMPLETE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {}
            lock = path / LOCK
            last_used = (lock if lock.is_file() else path / COMPLETE).stat().st_mtime
            found.append(Entry(path.name, path, folder_bytes(path), info.get("rows"), info.get("sources", []),
                               last_used, self._in_use(path)))
        return sorted(found, key=lambda e: e.last_used)

    def _in_use(self, path: Path) -> bool:
        if str(path) in _IN_USE:
            return True
        if not (path / LOCK).is_file():
            return False
        fd = _try_exclusive(path / LOCK)
        if fd is None:
            return True
        os.close(fd)
        return False

    def leftovers(self) -> list[Path]:
        """Folders of killed writers (a `.tmp-*` no process holds, older than `STALE_TMP_S`) and interrupted
        evictions (`.evict-*`)."""
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.iterdir():
            if path.name.startswith(EVICT_PREFIX):
                out.append(path)
            elif path.name.startswith(TMP_PREFIX) and time.time() - path.stat().st_mtime > STALE_TMP_S:
                fd = _try_exclusive(path / LOCK) if (path / LOCK).is_file() else -1
                if fd is not None:
                    if fd >= 0:
                        os.close(fd)
                    out.append(path)
        return out

    # ---- the budget -------------------------------------------------------------------------------------------

    def evict(self, max_bytes: float, keep: tuple[str, ...] = ()) -> tuple[list[Entry], list[Entry]]:
        """Delete leftovers, then complete entries least recently used first until the folder holds at most
        `max_bytes`; never an entry in use or named in `keep`. Returns (evicted, kept in use while over budget)."""
        for path in self.leftovers():
            shutil.rmtree(path, ignore_errors=True)
        entries = self.entries()
        writing = sum(folder_bytes(p) for p in self.root.glob(f"{TMP_PREFIX}*")) if self.root.is_dir() else 0
        total = writing + sum(e.bytes for e in entries)
        evicted, busy = [], []
        for entry in entries:
            if total <= max_bytes:
                break
            if entry.name in keep or str(entry.path) in _IN_USE:
                busy.append(entry)
                continue
            fd = _try_exclusive(entry.path / LOCK) if (entry.path / LOCK).is_file() else None
            if fd is None and (entry.path / LOCK).is_file():
                busy.append(entry)  # in use by another process
                continue
            gone = self.root / f"{EVICT_PREFIX}{entry.name}-{os.getpid()}"
            try:
                entry.path.rename(gone)  # under the exclusive lock: no reader holds it, none can take it after
            except OSError:
                continue  # another process evicted it first
            finally:
                if fd is not None:
                    os.close(fd)
            shutil.rmtree(gone, ignore_errors=True)
            total -= entry.bytes
            evicted.append(entry)
        return evicted, (busy if total > max_bytes else [])

    def enforce(self, max_gb: float | None, keep: tuple[str, ...] = ()) -> list[Entry]:
        """`evict` down to `max_gb` GB (None: no budget), logging what went and warning when entries in use alone
        exceed it. Returns the evicted entries."""
        if max_gb is None or not self.root.is_dir():
            return []
        evicted, busy = self.evict(max_gb * 1e9, keep)
        for entry in evicted:
            log.info("encode cache: evicted %s (%.2f GB, last used %s) to stay within data.encode_cache_max_gb=%g",
                     entry.name[:16], entry.bytes / 1e9, time.strftime("%Y-%m-%d %H:%M", time.localtime(
                         entry.last_used)), max_gb)
        if busy:
            log.warning("encode cache %s: entries in use by running jobs (%.2f GB) exceed data.encode_cache_max_gb="
                        "%g; they stay until no job uses them (raise the budget, or use data.encode=lazy for data "
                        "this large)", self.root, sum(e.bytes for e in busy) / 1e9, max_gb)
        return evicted


def describe(cache: EncodeCache, max_gb: float | None) -> str:
    """`cache=info`: one line per entry (least recently used first) and the total against the budget."""
    entries = cache.entries()
    lines = [f"encode cache {cache.root}: {len(entries)} entries, "
             f"{sum(e.bytes for e in entries) / 1e9:.2f} GB"
             + (f" of data.encode_cache_max_gb={max_gb:g}" if max_gb is not None else " (no budget)")]
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        sources = ", ".join(e.sources[:3]) + (f" and {len(e.sources) - 3} more" if len(e.sources) > 3 else "")
        lines.append(f"  {e.name[:16]}  {e.bytes / 1e9:8.3f} GB  {e.rows if e.rows is not None else '?':>8} rows  "
                     f"last used {when}{'  IN USE' if e.in_use else ''}  {sources}")
    leftovers = cache.leftovers()
    if leftovers:
        lines.append(f"  {len(leftovers)} leftover folder(s) of interrupted writes, "
                     f"{sum(folder_bytes(p) for p in leftovers) / 1e9:.3f} GB (removed by cache=clear)")
    return "\n".join(lines)
