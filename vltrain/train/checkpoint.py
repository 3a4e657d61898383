"""Checkpoints a run can always resume from: written under a temporary name and renamed into place when complete.

A checkpoint is `<run>/checkpoint-<step>/`. The Trainer writes it into `<run>/.staging/checkpoint-<step>/`; vltrain
then adds the run files (`vltrain.yaml`, `data_manifest.json`) and, last, `vltrain_checkpoint.json` (the step, the
world size and the size of every file), and renames the folder into place: a `checkpoint-<step>` folder is
complete by construction, and resume also requires its completion file with every listed file at its size. A kill
at any moment leaves either the previous checkpoints or the new one, never half of one; a full disk removes the
staging folder and says so. Rotation (`save_total_limit`) counts complete checkpoints only and keeps the newest.

Resume (`resume=auto` or `resume=<run folder or checkpoint>`): the newest complete checkpoint, the saved config
(overrides that change what is trained are refused), and the data manifest (the record files, their sizes and
hashes, and the held-out keys): changed data is refused unless `resume_force=true`. Checkpoints after the one
resumed are moved aside (`superseded/`), never deleted, so that the resumed branch is the run folder's newest.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path

from vltrain.config import ConfigError
from vltrain.files import write_atomic
from vltrain.manifest import (
    COMPLETE_FILE,
    LOG_FILE,
    STAGING_DIR,
    ResumePoint,
    checkpoint_folders,
    checkpoint_step,
    complete_checkpoints,
    newest_checkpoint,
)

log = logging.getLogger(__name__)

class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, a failing writer); the previous ones are intact."""


# ---- leftovers -----------------------------------------------------------------------------------------------


def clean_leftovers(run_dir: Path) -> None:
    """Remove what a killed run left half-written: the staging folder and checkpoints being deleted."""
    run_dir = Path(run_dir)
    for path in [run_dir / STAGING_DIR, *run_dir.glob(".deleting-checkpoint-*")]:
        shutil.rmtree(path, ignore_errors=True)


# ---- writing a checkpoint ------------------------------------------------------------------------------------


def staging_dir(run_dir: Path) -> Path:
    return Path(run_dir) / STAGING_DIR


def publish(staged: Path, run_dir: Path, files: dict[str, str], step: int, world_size: int,
            parallel: str) -> Path:
    """Add `files` (name -> text) and the completion file to the staged checkpoint, flush it and rename it to
    `<run>/checkpoint-<step>`. Raises CheckpointError (staging removed, older checkpoints untouched) on failure."""
    target = Path(run_dir) / staged.name
    try:
        for name, text in files.items():
            write_atomic(staged / name, text)
        sizes = {str(p.relative_to(staged)): p.stat().st_size for p in sorted(staged.rglob("*")) if p.is_file()}
        record = {"step": step, "world_size": world_size, "parallel": parallel, "files": sizes}
        write_atomic(staged / COMPLETE_FILE, json.dumps(record, indent=1))
        _fsync_tree(staged)
        if target.exists():  # this step's folder of the trajectory a resume from an earlier checkpoint replaces
            _discard(target)
        os.replace(staged, target)
        _fsync_dir(Path(run_dir))
        with contextlib.suppress(OSError):
            staged.parent.rmdir()  # the staging folder, when no other rank still writes there
    except Exception as e:
        shutil.rmtree(staged, ignore_errors=True)
        raise checkpoint_error(e, target) from e
    return target


SUPERSEDED_DIR = "superseded"
"""Where checkpoints later than the one a run resumed from are moved, with their logging.jsonl rows."""


def set_aside_later(run_dir: Path, step: int) -> Path | None:
    """Move every checkpoint folder after `step` (complete or not) and the logging.jsonl rows after it into
    `<run>/superseded/<time>-after-step-<step>/`, so that the branch resumed from `step` is the run folder's
    newest and a later `resume=auto` continues it; nothing is deleted. Returns that folder (None: nothing later)."""
    import time

    run_dir = Path(run_dir)
    later = [p for p in checkpoint_folders(run_dir) if checkpoint_step(p) > step]
    if not later:
        return None
    aside = run_dir / SUPERSEDED_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}"
    aside.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / LOG_FILE
    if log_file.is_file():
        lines = log_file.read_text(encoding="utf-8").splitlines(keepends=True)
        after = [line for line in lines if _row_step(line) > step]
        with (aside / "logging.jsonl").open("a", encoding="utf-8") as f:
            f.writelines(after)
        write_atomic(log_file, "".join(line for line in lines if _row_step(line) <= step))
    for path in later:
        os.replace(path, aside / path.name)
    _fsync_dir(run_dir)
    log.warning("resuming from step %d: the later %s moved to %s with their logging.jsonl rows", step,
                ", ".join(p.name for p in later), aside)
    return aside


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 0  # a line cut short by a kill stays with the resumed branch, which drops it


def checkpoint_error(e: BaseException, target: Path) -> CheckpointError:
    """One message for a failed save (torch.save and safetensors report a full disk as RuntimeError text)."""
    previous = newest_checkpoint(target.parent)
    kept = f"{previous.name} is the newest complete checkpoint, intact" if previous else "there is no earlier one"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        s in str(e) for s in ("No space left", "StorageFull", "ENOSPC", "file write failed"))
    what = "the disk is full" if full else f"{type(e).__name__}: {text}"
    return CheckpointError(f"could not save {target}: {what}; the partial checkpoint was removed and {kept}")


def rotate(run_dir: Path, limit: int | None, keep: list[str | Path | None] = ()) -> None:
    """Delete the oldest complete checkpoints beyond `limit` (None or < 1: keep all); never the newest one, nor
    those in `keep` (the best model, the one just written: a run resumed from an older checkpoint may still have
    higher-numbered ones of the run it replaces). A deleted checkpoint is first renamed away, so a kill midway
    leaves no half of one."""
    if not limit or limit < 1:
        return
    found = complete_checkpoints(run_dir)
    protected = {found[-1].resolve()} if found else set()
    protected |= {Path(k).resolve() for k in keep if k}
    excess = len(found) - max(limit, len(protected & {p.resolve() for p in found}))
    for ckpt in [p for p in found if p.resolve() not in protected][:max(0, excess)]:
        _discard(ckpt)


def _discard(path: Path) -> None:
    aside = path.parent / f".deleting-{path.name}"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


# ---- resuming ------------------------------------------------------------------------------------------------


def check_world_size(point: ResumePoint, world_size: int, zero: bool) -> None:
    """A DDP run resumes on another world size (same global batch); a ZeRO-partitioned optimizer cannot."""
    if point.checkpoint is None:
        return
    record = json.loads((point.checkpoint / COMPLETE_FILE).read_text(encoding="utf-8"))
    saved = int(record.get("world_size", 1))
    if saved == world_size:
        return
    if zero:
        raise ConfigError(f"resume: {point.checkpoint.name} was saved by {saved} processes with ZeRO-partitioned "
                          f"optimizer states; it resumes on {saved} processes only (this run has {world_size})")
    log.warning("resuming a checkpoint of %d processes on %d: same data order and global batch, but the RNG "
                "states of the processes do not carry over, so the result is not bitwise that of %d", saved,
                world_size, saved)
