"""What a run folder and its checkpoints hold, by name, and reading it back: the one place these names live.

A run folder (`outputs/<model>/<time>/`) holds the validated config (`vltrain.yaml`), `logging.jsonl`, a random
base model (`base_model/`, `base_model.json`) and `checkpoint-<step>/` folders. A checkpoint is complete when its
`vltrain_checkpoint.json` lists every file at its size (train/checkpoint.py writes it last); its
`data_manifest.json` records the data it was trained on. Readers: the config resolution (resume), training,
inference and export.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vltrain.config import ConfigError
from vltrain.files import file_sha256

RUN_CONFIG = "vltrain.yaml"
"""The resolved TrainConfig, saved in the run folder and in every checkpoint (what reloading it needs)."""
COMPLETE_FILE = "vltrain_checkpoint.json"
"""Written last into a checkpoint: step, world size, parallel mode and the size of every other file."""
MANIFEST_FILE = "data_manifest.json"
"""The data a checkpoint was trained on: record files (path, size, sha256) and the held-out record keys."""
LOG_FILE = "logging.jsonl"
"""One JSON line per logged step (rank 0)."""
STAGING_DIR = ".staging"
"""Where a checkpoint is written before it is complete (inside the run folder, so the rename stays on one disk)."""
BASE_MODEL_DIR = "base_model"
"""A randomly initialised base, saved so that LoRA checkpoints reload onto the same weights."""
BASE_RECORD = "base_model.json"
"""How to rebuild a random base (seed, dtype, digest of its weights), copied into every checkpoint."""

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
log = logging.getLogger(__name__)


# ---- checkpoints -------------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(Path(path).name)
    return int(match[1]) if match else None


def is_complete(ckpt: Path) -> bool:
    """The checkpoint's completion file exists and every file it lists has its recorded size."""
    return incompleteness(ckpt) is None


def incompleteness(ckpt: Path) -> str | None:
    """Why a checkpoint folder is not complete (None: it is)."""
    try:
        record = json.loads((Path(ckpt) / COMPLETE_FILE).read_text(encoding="utf-8"))
    except OSError:
        return f"no {COMPLETE_FILE} (interrupted while saving, or not written by vltrain)"
    except ValueError:
        return f"{COMPLETE_FILE} is not valid JSON"
    try:
        for name, size in record["files"].items():
            path = Path(ckpt) / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} recorded"
    except (KeyError, TypeError, AttributeError):
        return f"{COMPLETE_FILE} lists no files"
    return None


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every `checkpoint-<step>` folder of a run, complete or not, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                  key=checkpoint_step)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete `checkpoint-<step>` folders of a run, oldest first."""
    return [p for p in checkpoint_folders(run_dir) if is_complete(p)]


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


# ---- the run folder ----------------------------------------------------------------------------------------------


def holds_run(run_dir: Path) -> bool:
    """The folder already holds a training run (its config, logs, a base model or checkpoints)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    return any((run_dir / name).exists() for name in (RUN_CONFIG, LOG_FILE, BASE_MODEL_DIR, STAGING_DIR)) \
        or any(checkpoint_step(p) is not None for p in run_dir.iterdir())


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never writes into a folder holding another run: one ConfigError, the same wherever asked."""
    if holds_run(Path(run_dir)):
        raise ConfigError(f"run folder {Path(run_dir).resolve()} already holds a run; continue it with resume=auto "
                          "(same hydra.run.dir) or resume=<that folder>, or choose another hydra.run.dir")


@dataclass
class ResumePoint:
    """Where a resumed run continues: its run folder, the checkpoint (None: no complete one yet, start at step 0
    in that folder) and the saved config (None when the run never got as far as writing it)."""

    run_dir: Path
    checkpoint: Path | None
    saved: dict[str, Any] | None

    @property
    def step(self) -> int:
        return checkpoint_step(self.checkpoint) if self.checkpoint else 0


def find_resume_point(resume: str, run_dir: str | Path) -> ResumePoint:
    """`resume=auto`: the newest complete checkpoint of `run_dir`. `resume=<path>`: that run folder's newest
    complete checkpoint, or that checkpoint (which must be complete). Incomplete checkpoints newer than the one
    chosen are named in a warning; a folder whose checkpoints are all incomplete is refused with the reason of
    each; `resume=auto` in a folder without any checkpoint starts at step 0 there, with a warning."""
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
    if ckpt is None:
        folders = checkpoint_folders(folder)
        reasons = [(p, incompleteness(p)) for p in folders]
        complete = [p for p, why in reasons if why is None]
        rejected = [(p, why) for p, why in reasons if why is not None]
        if folders and not complete:
            raise ConfigError(f"resume={resume}: no complete checkpoint in {folder}; rejected: "
                              + "; ".join(f"{p.name}: {why}" for p, why in rejected)
                              + ". Move them out of the folder to start again at step 0")
        ckpt = complete[-1] if complete else None
        newer = [(p, why) for p, why in rejected if ckpt is None or checkpoint_step(p) > checkpoint_step(ckpt)]
        if newer:
            log.warning("resume: newer checkpoints rejected (incomplete): %s",
                        "; ".join(f"{p.name}: {why}" for p, why in newer))
        if ckpt is None:
            log.warning("resume=auto: %s holds no checkpoint yet; starting at step 0 in that folder", folder)
    source = ckpt / RUN_CONFIG if ckpt else folder / RUN_CONFIG
    saved = yaml.safe_load(source.read_text(encoding="utf-8")) if source.is_file() else None
    if resume != "auto" and saved is None:
        raise ConfigError(f"resume={resume}: {folder} is not a vltrain run folder (no {RUN_CONFIG})")
    return ResumePoint(folder, ckpt, saved)


# ---- the data manifest -------------------------------------------------------------------------------------------


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


def files_changed(saved: dict[str, Any]) -> list[str]:
    """What differs between the record files a manifest lists and those files now (the held-out keys aside)."""
    paths = [f["path"] for f in saved.get("files", [])]
    return manifest_changes({"files": saved.get("files", [])}, {"files": data_manifest(paths, [])["files"]})


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    path = Path(ckpt) / MANIFEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
