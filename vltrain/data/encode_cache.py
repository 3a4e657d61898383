"""The encode cache: every record encoded once, up front, into an Arrow file read back as an HF `datasets.Dataset`.

`data.encode=datasets` (the default): `encode_with_datasets` encodes the records (`num_proc` processes,
`parallel_map`) into an entry of `data.encode_cache`, shared across runs, named by a fingerprint of the records,
their media files, the encoder's settings, the tokenizer, the encoding code and library versions: no encoding per
epoch, none at all on a rerun on the same data. The cache keeps within `data.encode_cache_max_gb` (least recently
used entries evicted whole, never one a running job uses: `vltrain.data.cache_store`). The data check reads its
sizes from the rows (`row_error`); the datasets (vltrain.data.dataset) serve samples from them (`row_to_sample`).
Tiles are kept as their uint8 pixels (0.6 MB per 448 px tile); `try_encode` is the one place a record's encoding
problem becomes a `RecordError`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vltrain.data.encode import Encoder, Sample
from vltrain.data.records import Record, RecordError
from vltrain.data.tiling import normalise as normalise_tiles
from vltrain.progress import progress
from vltrain.speed import one_thread

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


def parallel_map(fn, items: list, num_proc: int = 1):
    """`fn(item)` for each item, yielded in order; in `num_proc` DataLoader worker processes when > 1. `fn` must
    be picklable (a module-level function or a functools.partial of one)."""
    if num_proc <= 1 or len(items) < 2:
        yield from map(fn, items)
        return
    yield from DataLoader(_Apply(fn, items), batch_size=None, num_workers=min(num_proc, len(items)),
                          collate_fn=_identity, worker_init_fn=one_thread, prefetch_factor=4)


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
