"""Which records train and which evaluate: dataset specs and the train / held-out split.

`dataset.train` / `dataset.val` list specs, mixed freely:
  - `path/to/file.jsonl[#N]`: a JSONL file of records;
  - `NAME[#N]`, `HF::NAME[#N]`, `MS::NAME[#N]`: a hub dataset from `HUB_DATASETS` (e.g. `coco-en-2-mini`), fetched
    with HF `datasets` (or ModelScope), its rows written once as a JSONL file with image files under the cache
    folder, then read like any other file (so every problem still names a file and a line).
`#N` samples N rows (every row `N // size` times, then `N % size` distinct rows chosen with a seed), as ms-swift
does; on the command line quote such a spec (`'dataset.train=["data.jsonl#1000"]'`: Hydra's grammar rejects a bare
`#`). Without `dataset.val`, `dataset.val_ratio` of the training rows is held out, reproducibly from
`dataset.seed`, so a later evaluation can rebuild exactly the rows the run never trained on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from vltrain.config import ConfigError, DatasetConfig
from vltrain.data.records import Record, RecordError, read_records
from vltrain.files import write_atomic
from vltrain.progress import progress, quiet_library_bars

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^(?:(?P<hub>HF|MS)::)?(?P<name>.+?)(?:#(?P<n>\d+))?$")
DEFAULT_CACHE = Path("~/.cache/vltrain/datasets")


# ---- hub datasets ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubDataset:
    """A published dataset and how its rows become records (one image, a fixed query, a caption as response)."""

    query: str
    ms_id: str | None = None
    ms_subset: str | None = None
    ms_splits: tuple[str, ...] = ()
    hf_id: str | None = None
    hf_splits: tuple[str, ...] = ()
    image_column: str = "image"
    caption_column: str = "caption"
    """A string (the text before the first `&&` is the response, as ms-swift reads it) or a list (its first item)."""
    hf_caption_column: str | None = None


# ms-swift 2.x's `coco-en-2-mini` is ModelScope's `modelscope/coco_2014_caption` (subset `coco_2014_caption`),
# validation split, query `please describe the image.` (v2.4.2+), response the first caption. On the HF Hub,
# `lmms-lab/COCO-Caption` split `val` holds the same 40,504 COCO 2014 validation images (captions as a list).
HUB_DATASETS: dict[str, HubDataset] = {
    "coco-en-2-mini": HubDataset(
        query="please describe the image.", ms_id="modelscope/coco_2014_caption", ms_subset="coco_2014_caption",
        ms_splits=("validation",), hf_id="lmms-lab/COCO-Caption", hf_splits=("val",), hf_caption_column="answer"),
    "coco-en-2": HubDataset(
        query="please describe the image.", ms_id="modelscope/coco_2014_caption", ms_subset="coco_2014_caption",
        ms_splits=("train", "validation")),
}


class HubUnavailable(ConfigError):
    """A hub dataset that cannot be fetched (offline, client library missing)."""


def _hub_host_reachable(url: str, timeout: float = 5.0) -> str | None:
    """None when a TCP connection to the host of `url` opens within `timeout`, else the reason it did not.

    The hub clients retry for tens of seconds before giving up; this answers in seconds. Behind a proxy the
    proxy is what must be reachable.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    parsed = urllib.parse.urlparse(proxy or url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def _choose_hub(name: str, entry: HubDataset, hub: str | None) -> str:
    if hub is None:
        hub = "HF" if entry.hf_id else "MS"
    if hub == "HF" and not entry.hf_id:
        raise HubUnavailable(f"{name}: no Hugging Face copy is known; use MS::{name} (ModelScope: {entry.ms_id})")
    if hub == "MS" and not entry.ms_id:
        raise HubUnavailable(f"{name}: no ModelScope copy is known; use HF::{name} (Hugging Face: {entry.hf_id})")
    return hub


def _fetch_hub_rows(name: str, entry: HubDataset, hub: str):
    """The raw rows of a hub dataset (an HF `datasets.Dataset`, images left undecoded). Fails in seconds offline."""
    import datasets

    quiet_library_bars()  # in a log, no carriage-return bars from the download

    if hub == "HF":
        from huggingface_hub import constants

        where = f"the Hugging Face Hub ({entry.hf_id})"
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
            raise HubUnavailable(f"{name}: needs {where}, but HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and "
                                 "it is not in the vltrain dataset cache")
        reason = _hub_host_reachable(constants.ENDPOINT)
        if reason:
            raise HubUnavailable(f"{name}: needs {where}, which cannot be reached ({reason}); fetch it once on a "
                                 "machine with network (same cache folder), or pass local JSONL files")
        parts = [datasets.load_dataset(entry.hf_id, split=s) for s in entry.hf_splits]
    else:
        where = f"ModelScope ({entry.ms_id})"
        try:
            from modelscope.msdatasets import MsDataset
        except ImportError:
            raise HubUnavailable(f"{name}: MS:: needs the modelscope package (pip install modelscope), or use "
                                 f"HF::{name}") from None
        reason = _hub_host_reachable("https://www.modelscope.cn")
        if reason:
            raise HubUnavailable(f"{name}: needs {where}, which cannot be reached ({reason})")
        parts = [MsDataset.load(entry.ms_id, subset_name=entry.ms_subset, split=s).to_hf_dataset()
                 for s in entry.ms_splits]
    rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if isinstance(rows.features.get(entry.image_column), datasets.Image):
        rows = rows.cast_column(entry.image_column, datasets.Image(decode=False))
    return rows


def _caption(value) -> str:
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else ""
    return str(value).split("&&")[0]


def _write_image(value, folder: Path, index: int) -> str:
    """Save one hub image as a file (its original bytes when it has them); returns the path relative to `folder`."""
    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
        suffix = Path(value.get("path") or "").suffix or _sniff_suffix(data)
    elif isinstance(value, dict) and value.get("path"):
        return str(Path(value["path"]).resolve())
    elif isinstance(value, str):
        return str(Path(value).resolve())
    else:  # a decoded PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data, suffix = buffer.getvalue(), ".png"
    name = f"images/{index:08d}{suffix}"
    (folder / name).write_bytes(data)
    return name


def _sniff_suffix(data: bytes) -> str:
    return ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"


def hub_spec_file(name: str, hub: str | None, n: int | None, seed: int, cache_dir: Path) -> Path:
    """The JSONL file holding the rows of a hub spec (fetched and written on first use; reused offline after).

    Processes sharing the cache (the ranks of one run, or two runs) take a file lock on the dataset's folder, so
    one fetches and writes while the others wait and then read its file."""
    from filelock import FileLock

    entry = HUB_DATASETS[name]
    hub = _choose_hub(name, entry, hub)
    folder = cache_dir.expanduser() / f"{name}-{hub.lower()}"
    path = folder / f"rows-{'all' if n is None else n}-seed{seed}.jsonl"
    if path.is_file():
        return path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".lock"):
        if path.is_file():  # written by another process while this one waited
            return path
        rows = _fetch_hub_rows(name, entry, hub)
        indices = (list(range(len(rows))) if n is None
                   else sample_indices(len(rows), n, random.Random(f"{seed}:{name}")))
        caption_column = entry.hf_caption_column if hub == "HF" and entry.hf_caption_column else entry.caption_column
        written: dict[int, str] = {}
        lines = []
        for i in progress(indices, desc=f"{name}: writing rows", unit="rows"):
            row = rows[i]
            if i not in written:
                written[i] = _write_image(row[entry.image_column], folder, i)
            record = {"query": entry.query, "response": _caption(row[caption_column]), "images": [written[i]]}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        write_atomic(path, "".join(lines))  # complete files only: an interrupted fetch leaves no half JSONL behind
    return path


# ---- specs and splits -----------------------------------------------------------------------------------------


def sample_indices(size: int, n: int, rng: random.Random) -> list[int]:
    """`#N`: every index `n // size` times, then `n % size` distinct indices drawn with `rng`."""
    if size == 0:
        return []
    repeats, rest = divmod(n, size)
    return list(range(size)) * repeats + rng.sample(range(size), rest)


def read_spec(spec: str, seed: int, errors: list[RecordError] | None = None,
              cache_dir: Path = DEFAULT_CACHE, key: str = "dataset.train") -> list[Record]:
    """Rows of one spec (`path[#N]` or a hub name). With `errors`, bad rows are collected there and left out (`#N`
    then samples among the rows that parsed)."""
    match = _SPEC.match(spec)
    name, hub = match["name"], match["hub"]
    n = None if match["n"] is None else int(match["n"])
    if n == 0:
        raise ConfigError(f"{key}: '{spec}': #0 selects no rows")
    if _is_hub_spec(name, hub):
        if name not in HUB_DATASETS:
            raise ConfigError(f"{key}: '{spec}': unknown hub dataset (known: {', '.join(HUB_DATASETS)})")
        try:
            path = hub_spec_file(name, hub, n, seed, Path(cache_dir))
        except HubUnavailable as e:
            raise HubUnavailable(f"{key}: {e}") from None
        return _read(path, errors, key, spec)  # already sampled
    path = Path(name)
    if not path.is_file():
        known = f"; known dataset names: {', '.join(HUB_DATASETS)}" if "/" not in name else ""
        raise ConfigError(f"{key}: '{spec}': dataset file not found{known}")
    records = _read(path, errors, key, spec)
    if n is None:
        return records
    # Seeded by the file's name, not the spec as written: the same rows whether the path is relative or absolute
    # (a run's saved config holds absolute paths).
    return [records[i] for i in sample_indices(len(records), n, random.Random(f"{seed}:{path.name}#{n}"))]


def _is_hub_spec(name: str, hub: str | None) -> bool:
    return bool(hub) or (name in HUB_DATASETS and not Path(name).exists())


def absolute_spec(spec: str) -> str:
    """`spec` with its file path made absolute (a hub name stays as it is), for a config usable from any folder."""
    match = _SPEC.match(spec)
    if _is_hub_spec(match["name"], match["hub"]):
        return spec
    return str(Path(match["name"]).resolve()) + ("" if match["n"] is None else f"#{match['n']}")


def _read(path: Path, errors: list[RecordError] | None, key: str, spec: str) -> list[Record]:
    try:
        records = read_records(path, errors)
    except RecordError as e:  # the file itself (or, without `errors`, its first bad row): nothing to train on
        raise ConfigError(f"{key}: {e}") from None
    if not records:  # only with `errors`: every row is listed there
        log.warning("%s: '%s': none of the rows of %s could be read; it contributes no rows", key, spec, path)
    return records


def load_splits(cfg: DatasetConfig, errors: list[RecordError] | None = None,
                cache_dir: Path = DEFAULT_CACHE) -> tuple[list[Record], list[Record]]:
    """(train, val) records. A demo dataset is generated first when `demo_root` is set.

    With `errors`, malformed rows are collected there (and absent from the splits) instead of raising; the
    held-out split is then drawn from the rows that parsed. Held out are distinct rows (`Record.key`): every copy
    of a row repeated by `#N` goes to the same side, so no held-out row is ever trained on.
    """
    if cfg.demo_root:
        from vltrain.data.demo import write_demo_dataset

        write_demo_dataset(Path(cfg.demo_root))
    train = [r for i, spec in enumerate(cfg.train)
             for r in read_spec(spec, cfg.seed, errors, cache_dir, f"dataset.train[{i}]")]
    if cfg.val:
        return train, [r for i, spec in enumerate(cfg.val)
                       for r in read_spec(spec, cfg.seed, errors, cache_dir, f"dataset.val[{i}]")]
    if cfg.val_ratio == 0 or not train:
        return train, []
    distinct = list(dict.fromkeys(r.key for r in train))
    n_val = max(1, int(len(distinct) * cfg.val_ratio))
    if n_val >= len(distinct):
        raise ConfigError(f"dataset.val_ratio={cfg.val_ratio} leaves no training rows out of {len(distinct)} "
                          "distinct rows")
    random.Random(cfg.seed).shuffle(distinct)
    held_out = set(distinct[:n_val])
    val, seen = [], set()
    for r in train:
        if r.key in held_out and r.key not in seen:
            seen.add(r.key)
            val.append(r)
    return [r for r in train if r.key not in held_out], val
