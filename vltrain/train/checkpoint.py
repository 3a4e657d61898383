"""Checkpoints a run can always resume from: written under a temporary name and renamed into place when complete.

A checkpoint is `<run>/checkpoint-<step>/`. The Trainer writes it into `<run>/.staging/checkpoint-<step>/`; vltrain
then adds the run files (`vltrain.yaml`, `data_manifest.json`) and, last, `vltrain_checkpoint.json` (the step, the
world size and the size of every file), and renames the folder into place: a `checkpoint-<step>` folder is
complete by construction, and resume also requires its completion file with every listed file at its size. A kill
at any moment leaves either the previous checkpoints or the new one, never half of one; a full disk removes the
staging folder and says so. Rotation (`save_total_limit`) counts complete checkpoints only and keeps the newest.

Resume (`resume=auto` or `resume=<run folder or checkpoint>`): the newest complete checkpoint, the saved config
(overrides that change what is trained are refused), and the data manifest (the record files, their sizes and
hashes, and the held-out keys): changed data is refused unless `resume_force=true`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vltrain.config import RUN_CONFIG, ConfigError, TrainConfig, validate
from vltrain.files import file_sha256, write_atomic

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
"""Where a checkpoint is written before it is complete (inside the run folder, so the rename stays on one disk)."""
COMPLETE_FILE = "vltrain_checkpoint.json"
"""Written last into a checkpoint: step, world size, parallel mode and the size of every other file."""
MANIFEST_FILE = "data_manifest.json"
"""The data a checkpoint was trained on: record files (path, size, sha256) and the held-out record keys."""
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# Keys a resume may change: how the run is logged, evaluated, saved and fed, not what it trains.
HARMLESS_KEYS = {
    "run_dir", "resume", "resume_only_model", "resume_force", "on_nonfinite", "logger", "eval", "data.num_proc",
    "data.encode_cache_max_gb", "data.media_cache", "data.url_timeout", "data.url_retries", "data.url_max_bytes", "trainer.logging_steps",
    "trainer.logging_first_step", "trainer.logging_strategy", "trainer.eval_steps", "trainer.eval_strategy",
    "trainer.eval_on_start", "trainer.save_steps", "trainer.save_strategy", "trainer.save_total_limit",
    "trainer.dataloader_num_workers", "trainer.dataloader_prefetch_factor", "trainer.dataloader_persistent_workers",
    "trainer.dataloader_pin_memory", "trainer.per_device_eval_batch_size", "trainer.report_to", "trainer.max_steps",
    "trainer.disable_tqdm", "trainer.log_level",
}


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, a failing writer); the previous ones are intact."""


# ---- finding checkpoints -------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(Path(path).name)
    return int(match[1]) if match else None


def is_complete(ckpt: Path) -> bool:
    """The checkpoint's completion file exists and every file it lists has its recorded size."""
    try:
        record = json.loads((Path(ckpt) / COMPLETE_FILE).read_text(encoding="utf-8"))
        return all((Path(ckpt) / name).stat().st_size == size for name, size in record["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete `checkpoint-<step>` folders of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return [p for _, p in sorted(found) if is_complete(p)]


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def holds_run(run_dir: Path) -> bool:
    """The folder already holds a training run (its config, logs, a base model or checkpoints)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    return any((run_dir / name).exists() for name in (RUN_CONFIG, "logging.jsonl", "base_model", STAGING_DIR)) \
        or any(checkpoint_step(p) is not None for p in run_dir.iterdir())


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


# ---- the data manifest ---------------------------------------------------------------------------------------


def data_manifest(record_files: list[str], val_keys: list[tuple[str, int]]) -> dict[str, Any]:
    """{"files": [{"path", "size", "sha256"}], "val_keys": [[source, row], ...]}: the record files a run reads
    (media are not hashed) and the `Record.key` of every held-out record, paths made absolute."""
    files = []
    for name in dict.fromkeys(record_files):
        path = Path(name).resolve()  # absolute, as the checkpoint's config names them: usable from any folder
        if path.is_file():
            files.append({"path": str(path), "size": path.stat().st_size, "sha256": file_sha256(path)})
    return {"files": files, "val_keys": [[str(Path(source).resolve()), row] for source, row in val_keys]}


def manifest_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two manifests, one phrase per change (empty: the same data and held-out split)."""
    changes = []
    old = {f["path"]: f for f in saved.get("files", [])}
    new = {f["path"]: f for f in current.get("files", [])}
    for path in sorted(old.keys() | new.keys()):
        if path not in new:
            changes.append(f"{path} is gone")
        elif path not in old:
            changes.append(f"{path} is new")
        elif old[path]["sha256"] != new[path]["sha256"]:
            changes.append(f"{path} changed (size {old[path]['size']} -> {new[path]['size']} bytes)")
    old_val = {tuple(k) for k in saved.get("val_keys", [])}
    new_val = {tuple(k) for k in current.get("val_keys", [])}
    if old_val != new_val:
        changes.append(f"the held-out split changed ({len(old_val - new_val)} rows left it, "
                       f"{len(new_val - old_val)} joined it)")
    return changes


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    path = Path(ckpt) / MANIFEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---- resuming ------------------------------------------------------------------------------------------------


@dataclass
class ResumePoint:
    """Where a resumed run continues: its run folder, the checkpoint (None: no complete one yet, start at step 0
    in that folder) and the saved config (None when the run never got as far as writing it)."""

    run_dir: Path
    checkpoint: Path | None
    saved: dict[str, Any] | None


def find_resume_point(resume: str, run_dir: str) -> ResumePoint:
    """`resume=auto`: the newest complete checkpoint of `run_dir`. `resume=<path>`: that run folder's newest
    complete checkpoint, or that checkpoint (which must be complete)."""
    if resume == "auto":
        folder, ckpt = Path(run_dir).resolve(), None
    else:
        path = Path(resume).expanduser().resolve()
        if not path.exists():
            raise ConfigError(f"resume={resume}: no such run folder or checkpoint")
        ckpt = None
        if checkpoint_step(path) is not None:
            if not is_complete(path):
                raise ConfigError(f"resume={resume}: an incomplete checkpoint (no {COMPLETE_FILE} or a file of "
                                  "the wrong size; it was interrupted while saving); resume the run folder instead")
            folder, ckpt = path.parent, path
        else:
            folder = path
    ckpt = ckpt or newest_checkpoint(folder)
    source = ckpt / RUN_CONFIG if ckpt else folder / RUN_CONFIG
    saved = yaml.safe_load(source.read_text(encoding="utf-8")) if source.is_file() else None
    if resume != "auto" and saved is None:
        raise ConfigError(f"resume={resume}: {folder} is not a vltrain run folder (no {RUN_CONFIG})")
    return ResumePoint(folder, ckpt, saved)


def comparable(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a run saves it (data paths absolute), for comparing a resumed run with its checkpoint."""
    from vltrain.train.run import run_config_yaml

    return yaml.safe_load(run_config_yaml(cfg))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and (prefix == "" or prefix.rstrip(".") in ("model", "dataset", "data", "sft_type",
                                                                          "parallel", "logger", "eval", "trainer")):
        out = {}
        for k, v in data.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): data}


def _harmless(key: str) -> bool:
    return any(key == h or key.startswith(h + ".") for h in HARMLESS_KEYS)


def resumed_config(cfg: TrainConfig, point: ResumePoint) -> TrainConfig:
    """The saved config with the harmless changes `cfg` makes (logging, evaluation, saving, workers, a longer
    `max_steps`); a ConfigError naming every key that would change what is trained."""
    if point.saved is None:
        return cfg
    current, saved = _flatten(comparable(cfg)), _flatten(point.saved)
    # A random base is saved into the run folder: the checkpoint's config names that folder instead.
    if current.get("model.init") == "random" and saved.get("model.init") == "pretrained":
        for key in ("model.init", "model.path"):
            current[key] = saved.get(key)
    changed = sorted(k for k in current.keys() | saved.keys() if current.get(k) != saved.get(k))
    refused = [k for k in changed if not _harmless(k)]
    if refused:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise ConfigError(f"resume: the run was trained with other values of {shown}{more}; a resumed run keeps "
                          "what it trains (model, data, sft_type, batch geometry); start a new run instead")
    merged = dict(point.saved)
    for key in changed:
        _set(merged, key, current.get(key))
    merged["run_dir"] = str(point.run_dir)
    new = validate(merged)
    step = checkpoint_step(point.checkpoint) if point.checkpoint else 0
    max_steps = new.trainer.get("max_steps")
    if max_steps is not None and 0 < max_steps < step:
        raise ConfigError(f"trainer.max_steps={max_steps}: the checkpoint is already at step {step}")
    return dataclasses.replace(new, resume=cfg.resume, resume_only_model=cfg.resume_only_model,
                               resume_force=cfg.resume_force)


def _set(data: dict, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if rest and isinstance(data.get(head), dict):
        data[head] = dict(data[head])
        _set(data[head], rest, value)
    elif value is None and head in data and not rest:
        data[head] = None
    else:
        data[head] = value


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
