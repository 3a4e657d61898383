"""Datasets: which records train and which evaluate, and the torch Datasets that hand samples to the Trainer.

`dataset.train` / `dataset.val` list specs, mixed freely:
  - `path/to/file.jsonl[#N]`: a JSONL file of records;
  - `NAME[#N]`, `HF::NAME[#N]`, `MS::NAME[#N]`: a hub dataset from `HUB_DATASETS` (e.g. `coco-en-2-mini`), fetched
    with HF `datasets` (or ModelScope), its rows written once as a JSONL file with image files under the cache
    folder, then read like any other file (so every problem still names a file and a line).
`#N` samples N rows (every row `N // size` times, then `N % size` distinct rows chosen with a seed), as ms-swift
does; on the command line quote such a spec (`'dataset.train=["data.jsonl#1000"]'`: Hydra's grammar rejects a bare
`#`). Without `dataset.val`, `dataset.val_ratio` of the training rows is held out, reproducibly from
`dataset.seed`, so a later evaluation can rebuild exactly the rows the run never trained on.

Samples reach the Trainer one of two ways (`data.encode`), giving identical tensors:
  - `datasets` (default): `encode_with_datasets` encodes every record once, up front (`num_proc` processes), into an
    Arrow file opened as an HF `datasets.Dataset` (memory-mapped) in a cache shared across runs
    (`data.encode_cache`), keyed by a fingerprint of the records, their media files, the encoder's settings, the
    tokenizer, the encoding code and library versions; the data check reads its sizes from them and
    `PreEncodedDataset` serves the samples: no encoding per epoch, none at all on a rerun on the same data. The
    cache keeps within `data.encode_cache_max_gb` (least recently used entries evicted whole, never one a running
    job uses: `vltrain.data.cache_store`).
  - `lazy`: `EncodedDataset` encodes record i when the DataLoader asks for it (in its workers), every epoch.
Tiles are kept and served as their uint8 pixels (0.6 MB per 448 px tile) and normalised by the trainer on its
device (`VLTrainer._prepare_inputs`) by the function the encoder uses, so the floats are the same bits.
`PackedDataset` groups samples into packs of up to `data.max_length` tokens (`data.packing`), from the token
counts the check measured (`lengths`, also what `group_by_length` sorts by).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
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
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from vltrain.config import ConfigError, DatasetConfig
from vltrain.context import process
from vltrain.data.encode import Encoder, Sample
from vltrain.data.records import Record, RecordError, read_records
from vltrain.data.tiling import normalise as normalise_tiles
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


# ---- lazy encoding --------------------------------------------------------------------------------------------


_ALLOCATOR_TUNED: dict[int, bool] = {}


def keep_freed_memory() -> bool:
    """Let this process's C allocator (glibc) keep large freed blocks for reuse: tiles and batches (tens of MB)
    are then carved from memory already mapped instead of mmap'ed, page-faulted and unmapped for every sample,
    which made normalising tiles cost 3x the whole encoding (kernel time). Once per process (DataLoader workers
    call it on their first sample); False where there is no glibc `mallopt`."""
    pid = os.getpid()
    if pid not in _ALLOCATOR_TUNED:
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            _ALLOCATOR_TUNED[pid] = False
        else:
            m_trim_threshold, m_mmap_threshold = -1, -3
            _ALLOCATOR_TUNED[pid] = bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold,
                                                                                                1 << 30))
    return _ALLOCATOR_TUNED[pid]


def ready_data_process() -> None:
    """Set up a process that makes samples, on its first sample: `keep_freed_memory`, and in a DataLoader worker,
    torch's `file_system` sharing strategy. The default strategy passes each tensor of a batch to the main process
    as a file descriptor through a socket, a round trip with the worker per tensor; by shared-memory name the
    trainer waited 1.1 ms instead of 2.2-2.8 ms for a batch of the demo (`scripts/bench/step.py`). Segments are
    still reference-counted and cleaned up by torch's shared-memory manager."""
    keep_freed_memory()
    if get_worker_info() is not None and torch.multiprocessing.get_sharing_strategy() != "file_system":
        torch.multiprocessing.set_sharing_strategy("file_system")


class EncodedDataset(Dataset):
    """Encodes record i on access (in DataLoader workers), so images are decoded only when needed. Tiles come out
    as uint8 pixels (4x fewer bytes between processes); the trainer normalises them. `lengths`: tokens per record,
    from the data check (for length grouping and packing)."""

    def __init__(self, records: list[Record], encoder: Encoder, lengths: list[int] | None = None):
        self.records = records
        self.encoder = encoder
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        ready_data_process()
        return self.encoder(self.records[index], normalise=False)


# ---- packing --------------------------------------------------------------------------------------------------


def pack_groups(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of records grouped into packs of at most `max_length` tokens (best fit, longest first: a few
    percent of padding at most on realistic mixes). No record is split; each pack lists its records in dataset
    order; packs come in the order of their first record. Deterministic."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, pack number), sorted: the tightest pack that fits is found by
    for i in order:                   # bisection
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"a record of {n} tokens does not fit data.max_length={max_length}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, p = free.pop(k)
            packs[p].append(i)
            if space - n > 0:
                bisect.insort(free, (space - n, p))
        else:
            packs.append([i])
            if max_length - n > 0:
                bisect.insort(free, (max_length - n, len(packs) - 1))
    groups = [sorted(p) for p in packs]
    return sorted(groups, key=lambda g: g[0])


class PackedDataset(Dataset):
    """Packs of samples (`pack_groups`): item i is the list of samples of pack i, in order; `Collator(packing=True)`
    puts them in one row. `lengths` are the packs' token counts (for length grouping)."""

    def __init__(self, dataset: Dataset, lengths: list[int], max_length: int):
        self.dataset = dataset
        self.groups = pack_groups(lengths, max_length)
        self.lengths = [sum(lengths[i] for i in g) for g in self.groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[Sample]:
        return [self.dataset[i] for i in self.groups[index]]


# ---- encoding up front with HF datasets -----------------------------------------------------------------------


DEFAULT_ENCODE_CACHE = Path(os.environ.get("VLTRAIN_ENCODE_CACHE", "~/.cache/vltrain/encoded"))
"""Where `data.encode_cache: null` keeps encoded records (the environment variable moves it, e.g. for tests)."""


def try_encode(encoder: Encoder, record: Record, normalise: bool = True) -> tuple[Sample | None, RecordError | None]:
    """(sample, None), or (None, the problem) when the record cannot be encoded. An unexpected exception is reported
    against its row (field `encode`) like any other problem, never swallowed."""
    try:
        return encoder(record, normalise=normalise), None
    except RecordError as e:
        return None, e
    except Exception as e:  # noqa: BLE001
        return None, record.error("encode", f"{type(e).__name__}: {e}")


def encode_row(encoder: Encoder, record: Record) -> dict[str, Any]:
    """One record as a row of the encoded cache: ids, labels, tiles per image and the tiles' uint8 pixels
    (`pixels`: a (T, 3, S, S) uint8 tensor, or None without tiles; `pixel_shape` its shape); a failed row has an
    empty sample and its error as `[source, line, field, message, row]`. `row_table` turns it into Arrow."""
    sample, error = try_encode(encoder, record, normalise=False)
    if sample is None:
        return {"input_ids": [], "labels": [], "tiles_per_image": [], "pixels": None, "pixel_shape": [],
                "error": [error.source, str(error.line), error.field, error.message, str(error.row)]}
    pixels = sample.pixel_values
    return {"input_ids": sample.input_ids.tolist(), "labels": sample.labels.tolist(),
            "tiles_per_image": list(sample.tiles_per_image), "pixels": pixels,
            "pixel_shape": [] if pixels is None else list(pixels.shape), "error": []}


def row_table(row: dict[str, Any]):
    """An `encode_row` row as a one-row Arrow table of the cache's schema. The pixel column points at the tile
    tensor's memory instead of copying it (datasets' `ArrowWriter.write` builds its columns from Python objects:
    1.4x the CPU for the same file, `scripts/bench/data.py`), so writing a row costs one copy, into the file."""
    import pyarrow as pa

    schema = _schema()
    pixels = row["pixels"]
    data = pa.py_buffer(np.ascontiguousarray(pixels.numpy()) if pixels is not None else b"")
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int32))
    columns = {name: pa.array([row[name]], type=schema.field(name).type) for name in schema.names if name != "pixels"}
    columns["pixels"] = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, data])
    return pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)


def row_error(row: dict[str, Any]) -> RecordError | None:
    """The problem stored in a row of the encoded cache, if any."""
    if not row["error"]:
        return None
    source, line, field_name, message, row_number = row["error"]
    return RecordError(source, int(line), field_name, message, int(row_number))


class _Apply(Dataset):
    def __init__(self, fn, items: list):
        self.fn, self.items = fn, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.fn(self.items[index])


def _identity(item):
    return item


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism


def parallel_map(fn, items: list, num_proc: int = 1):
    """`fn(item)` for each item, yielded in order; in `num_proc` DataLoader worker processes when > 1. `fn` must
    be picklable (a module-level function or a functools.partial of one)."""
    if num_proc <= 1 or len(items) < 2:
        yield from map(fn, items)
        return
    yield from DataLoader(_Apply(fn, items), batch_size=None, num_workers=min(num_proc, len(items)),
                          collate_fn=_identity, worker_init_fn=_one_thread, prefetch_factor=4)


def _features():
    import datasets

    ints = datasets.List(datasets.Value("int64"))
    return datasets.Features({
        "input_ids": ints, "labels": ints, "tiles_per_image": ints, "pixels": datasets.Value("binary"),
        "pixel_shape": ints, "error": datasets.List(datasets.Value("string")),
    })


@functools.lru_cache(maxsize=1)
def _schema():
    return _features().arrow_schema


def _file_stamp(path) -> list:
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [str(p), st.st_size, st.st_mtime_ns]
    return [str(path)]


def _tokenizer_digest(tokenizer) -> str:
    """Hash of what decides a tokenizer's ids: its class, vocabulary and rules (tokenizer.json, or the
    sentencepiece model of a slow tokenizer), added and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    sp_model = getattr(tokenizer, "sp_model", None)
    parts = [f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
             backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())),
             hashlib.sha256(sp_model.serialized_model_proto()).hexdigest() if sp_model is not None else "",
             json.dumps(sorted(tokenizer.get_added_vocab().items())),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _library_versions() -> str:
    """Versions of the libraries whose output lands in a sample (resizing, video decoding, tokenization)."""
    from importlib import metadata

    versions = []
    for name in ("pillow", "numpy", "torch", "tokenizers", "transformers", "sentencepiece", "decord", "av"):
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=-")
    return " ".join(versions)


# The code an encoded sample depends on: this package's data modules and the tokenizer classes.
_ENCODING_CODE = (*sorted(Path(__file__).parent.glob("*.py")), Path(__file__).parents[1] / "model" / "tokenizer.py")


def fingerprint(records: list[Record], encoder: Encoder) -> str:
    """Hash (HF `datasets`' `Hasher`) of everything an encoded sample depends on: the records (their text, media
    references and where they come from), their media files (path, size and mtime; a URL by its address, as it is
    fetched only once), the encoder's settings and tokenizer, the encoding code and the versions of the libraries
    it calls."""
    from datasets.fingerprint import Hasher

    h = Hasher()
    for record in records:
        fields = dataclasses.asdict(record)
        media = [_file_stamp(p) for p in [*record.images, *record.videos]]
        h.update(json.dumps([fields, media], sort_keys=True, default=str, ensure_ascii=False).encode())
    for name, value in sorted(vars(encoder).items()):
        digest = _tokenizer_digest(value) if hasattr(value, "get_vocab") else repr(value)
        h.update(f"{name}={digest}\n".encode())
    for source in _ENCODING_CODE:
        h.update(source.read_bytes())
    h.update(_library_versions().encode())
    return h.hexdigest()


def encode_with_datasets(records: list[Record], encoder: Encoder, cache_dir: Path | None = None,
                         num_proc: int = 1, max_gb: float | None = None):
    """Encode every record (in `num_proc` processes) into an Arrow file read back as an HF `datasets.Dataset`,
    one row per record in order (`encode_row`). Cached under `cache_dir` (default `DEFAULT_ENCODE_CACHE`) by
    `fingerprint`: a second call with the same records and settings only opens the file. The entry stays in use
    (never evicted) while this process lives; after writing one, least recently used entries not in use are
    evicted until the cache holds at most `max_gb` GB (`vltrain.data.cache_store`).

    Written by DataLoader worker processes (`parallel_map`) feeding one `ArrowWriter`, not with datasets'
    `Dataset.from_generator` / `Dataset.map(num_proc=...)`: with 2 processes those took 1.4-1.9x the CPU and wall
    time on the same records, and were no faster in one (`scripts/bench/data.py`, BENCHMARKS.md).

    Safe when several processes (ranks, nodes on a shared folder) encode the same records at once: each writes a
    folder of its own and renames it into place when complete; the first rename wins, the others are discarded.
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter

    from vltrain.data.cache_store import EncodeCache

    cache = EncodeCache(cache_dir or DEFAULT_ENCODE_CACHE)
    name = fingerprint(records, encoder)
    entry = cache.open(name)
    if entry is None:
        sources = sorted({r.source for r in records})
        with cache.writing(name, {"rows": len(records), "sources": sources}) as tmp:
            writer = ArrowWriter(features=_features(), path=str(tmp / "encoded.arrow"))
            try:
                rows = parallel_map(functools.partial(encode_row, encoder), records, num_proc)
                for row in progress(rows, len(records), desc="encoding records", unit="records"):
                    writer.write_table(row_table(row))  # one record batch per row: a row can hold tens of MB
                writer.finalize()
            finally:
                writer.close()
        entry = cache.open(name)
        cache.enforce(max_gb, keep=(name,))
    return datasets.Dataset.from_file(str(entry / "encoded.arrow"))


def row_to_sample(row, normalise: bool = True) -> Sample:
    """A row of the encoded cache, as a one-row Arrow table (the dataset's "arrow" format: memory-mapped, nothing
    converted to Python objects), as a Sample; `normalise=False` keeps the tiles as their uint8 pixels, copied once
    out of the file."""
    def ints(name: str) -> np.ndarray:
        return row.column(name).chunk(0).flatten().to_numpy()  # flatten, not .values: the row's own slice

    shape = ints("pixel_shape")
    pixels = None
    if len(shape):
        mapped = np.frombuffer(row.column("pixels").chunk(0)[0].as_buffer(), dtype=np.uint8).reshape(shape)
        pixels = normalise_tiles(mapped) if normalise else torch.from_numpy(mapped.copy())  # copy: writable
    return Sample(
        input_ids=torch.from_numpy(ints("input_ids").copy()),
        labels=torch.from_numpy(ints("labels").copy()),
        pixel_values=pixels,
        tiles_per_image=ints("tiles_per_image").tolist(),
    )


class PreEncodedDataset(Dataset):
    """Samples read back from `encode_with_datasets`' cache, tiles as uint8 (the trainer normalises them); `rows`
    selects (and orders) the rows served. `lengths`: tokens per served row."""

    def __init__(self, encoded, rows: list[int] | None = None, lengths: list[int] | None = None):
        self.encoded = encoded.with_format("arrow")
        self.rows = list(range(len(encoded))) if rows is None else rows
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        ready_data_process()
        return row_to_sample(self.encoded[self.rows[index]], normalise=False)


# ---- threads --------------------------------------------------------------------------------------------------


def share_cores(num_workers: int, local_processes: int | None = None) -> int:
    """Give torch's intra-op threads the cores this process's data workers leave free (at least one) and return
    that number. Several ranks on one machine (`local_processes`, default: the process context's local world
    size) split its cores first.

    torch starts one intra-op thread per core; with data workers (and other ranks) beside them the cores are
    oversubscribed, and OpenMP threads that wait for each other at every op then lose whole time slices to any
    other busy process (8x slower steps of the demo beside one busy process on 2 cores,
    `scripts/bench/contention.py`). An explicit `OMP_NUM_THREADS` is left alone."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = max(1, local_processes or process().local_world_size)
    threads = max(1, cores // ranks - num_workers)
    torch.set_num_threads(threads)
    return threads
