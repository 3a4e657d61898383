"""The data of a training run: every record read, checked and encoded once (rank 0 first), then served to the
Trainer as datasets (pre-encoded or encoded lazily, packed or not). A bad record stops the run before any weight
loads, or is left out and listed (`data.on_error`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from vltrain.config import ConfigError, TrainConfig
from vltrain.data import encode_cache
from vltrain.data.check import DataError, check_splits, enforce, iter_outcomes, outcome_from_encoded_row
from vltrain.data.dataset import EncodedDataset, PackedDataset, PreEncodedDataset
from vltrain.data.encode import Encoder
from vltrain.data.encode_cache import encode_with_datasets
from vltrain.data.records import RecordError
from vltrain.data.specs import load_splits
from vltrain.train import parallel

log = logging.getLogger(__name__)


def prepare_data_once(cfg: TrainConfig, encoder: Encoder, run_dir: Path):
    """`prepare_data` on rank 0 first (reading the records, hub downloads, the data check; with `data.encode=
    datasets` the encoding into the cache), then on each other node's local rank 0 (which encodes into its own
    cache folder when that is not shared with rank 0), then on the remaining ranks, which open their node's entry.
    All take rank 0's verdict on bad rows instead of checking again, and wait up to `parallel.wait_minutes`,
    whatever the collective timeout."""
    minutes = cfg.parallel.wait_minutes
    verdict = None
    result = None
    with parallel.rank0_first(minutes) as first:
        if first:
            try:
                result = prepare_data(cfg, encoder, run_dir)
                verdict = ("ok", result[3])  # (bad row keys, tokens per record key)
            except ConfigError as e:  # DataError among them: every rank stops with the same message
                verdict = ("error", e)
    verdict = parallel.broadcast_from_rank0(verdict, minutes)
    if verdict[0] == "error":
        raise verdict[1]
    # Then each node's first process before the rest of its node: where the encode cache folder is not shared
    # with rank 0 (no shared filesystem) a node encodes once, not once per rank; a shared one opens rank 0's entry.
    with parallel.rank0_first(minutes, local=True) as first:
        if first and result is None:
            result = prepare_data(cfg, encoder, run_dir, write_skipped=False, verdict=verdict[1])
    if result is None:
        result = prepare_data(cfg, encoder, run_dir, write_skipped=False, verdict=verdict[1])
    return result[:3]


def prepare_data(cfg: TrainConfig, encoder: Encoder, run_dir: Path, write_skipped: bool = True,
                 verdict: tuple[set, dict] | None = None):
    """(train dataset, eval dataset or None, held-out records, verdict): every record read and encoded once,
    problems handled by `data.on_error` (raise: DataError listing all; skip: rows left out, listed in
    skipped_rows.jsonl, written when `write_skipped`). The verdict is (keys of the bad rows, tokens per record
    key); given, the check already ran elsewhere (rank 0) and is applied without encoding the records again.

    `data.encode=datasets` keeps this first encoding (HF datasets, in `data.encode_cache` under a fingerprint, so
    a rerun on the same data encodes nothing) and serves samples from it; `lazy` encodes again in the DataLoader
    workers. The check's token counts give the datasets their `lengths` (length grouping, packing); with
    `data.packing` the training split is served as packs (`PackedDataset`).
    """
    read_errors: list[RecordError] = []
    train_records, val_records = load_splits(cfg.dataset, errors=read_errors)  # hub datasets behind a file lock
    splits = {"train": train_records, "val": val_records}
    start = time.perf_counter()
    unique = list({id(r): r for rs in splits.values() for r in rs}.values())
    if cfg.data.encode == "datasets":  # on the ranks after the first, this opens the cache rank 0 wrote
        cache = Path(cfg.data.encode_cache or encode_cache.DEFAULT_ENCODE_CACHE).expanduser()
        encoded = encode_with_datasets(unique, encoder, cache, cfg.data.num_proc, cfg.data.encode_cache_max_gb)
        row_of = {id(r): i for i, r in enumerate(unique)}
    if verdict is not None:
        bad, tokens = verdict
    else:
        if cfg.data.encode == "datasets":
            sizes = encoded.select_columns(["input_ids", "labels", "tiles_per_image", "error"])  # not the pixels
            outcomes = {id(r): outcome_from_encoded_row(row) for r, row in zip(unique, sizes)}
        else:
            outcomes = dict(zip([id(r) for r in unique], iter_outcomes(unique, encoder, cfg.data.num_proc)))
        report = check_splits(splits, encoder, read_errors=read_errors, outcomes=outcomes)
        log.info("data check: %d records encoded in %.1fs (data.num_proc=%d)\n%s",
                 len(train_records) + len(val_records), time.perf_counter() - start, cfg.data.num_proc,
                 report.format(problems=False))
        bad = enforce(report, cfg.data.on_error, run_dir if write_skipped else None)
        tokens = {r.key: outcomes[id(r)].tokens for r in unique}
    train_records = [r for r in train_records if r.key not in bad]
    val_records = [r for r in val_records if r.key not in bad]
    if not train_records:
        raise DataError("no training rows left after leaving out the bad ones")

    def make(records):
        lengths = [tokens[r.key] for r in records]
        if cfg.data.encode == "datasets":
            return PreEncodedDataset(encoded, [row_of[id(r)] for r in records], lengths)
        return EncodedDataset(records, encoder, lengths)

    train_dataset = make(train_records)
    where = [r.where() for r in train_records]  # `file:line` of each training row, for messages about a batch
    if cfg.data.packing:
        train_dataset = PackedDataset(train_dataset, train_dataset.lengths, cfg.data.max_length)
        where = [", ".join(where[i] for i in group) for group in train_dataset.groups]
        log.info("data.packing: %d training records in %d packs of up to %d tokens (%.1f%% of the tokens real)",
                 len(train_records), len(train_dataset), cfg.data.max_length,
                 100 * sum(train_dataset.lengths) / (len(train_dataset) * cfg.data.max_length))
    train_dataset.where = where
    return train_dataset, (make(val_records) if val_records else None), val_records, (set(bad), tokens)
